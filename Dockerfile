# syntax=docker/dockerfile:1
# qforge: the coordinator, the worker, the CLI and the Python client in one image.
#
#   docker build -t qforge:0.1.0 .                                  # CPU workers
#   docker build -t qforge:0.1.0-cuda --build-arg QFORGE_CUDA=ON \
#       --build-arg BUILD_BASE=<a Debian 12 image with the CUDA 13 toolkit in /usr/local/cuda> .
#
# The builder is BUILD_BASE (Debian 12) with the distribution's packages
# (scripts/install-deps.sh); nothing else is downloaded. For the CUDA backends, BUILD_BASE must
# already hold the CUDA 13 toolkit at /usr/local/cuda (QFORGE_CUDA=ON fails clearly otherwise). The
# runtime stage is debian:12-slim (RUNTIME_BASE may name another glibc >= 2.36 image) holding
# the three binaries and the shared libraries they link, copied from the builder, so no
# package names need to be kept in sync. The NVIDIA driver (libcuda) is not in the image: the
# NVIDIA container toolkit mounts it (`--gpus all`, or the device plugin on Kubernetes).
ARG BUILD_BASE=debian:12
ARG RUNTIME_BASE=debian:12-slim

# ---- build ---------------------------------------------------------------------------------
FROM ${BUILD_BASE} AS builder
ARG QFORGE_CUDA=OFF
ARG CUDA_ARCHITECTURES="80;90"
ENV DEBIAN_FRONTEND=noninteractive
COPY scripts/install-deps.sh /src/scripts/install-deps.sh
RUN /src/scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DQFORGE_CUDA="$QFORGE_CUDA" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHITECTURES" \
      -DQFORGE_BUILD_TESTS=OFF && \
    cmake --build /build --target qforge-coordinator qforge-worker qforge
# The Python client (stubs generated from proto/ by setup.py) and the pipeline step example.
RUN python3 -m pip install --no-index --no-build-isolation --no-deps --target /out/python /src/python && \
    mkdir -p /out/examples && cp /src/examples/pipeline_step.py /out/examples/
# The binaries side by side (the coordinator finds qforge-worker next to itself for
# --local-workers), and every shared library they need except glibc's own, which the runtime
# base provides.
RUN mkdir -p /out/bin /out/lib && \
    cp /build/server/qforge-coordinator /build/worker/qforge-worker /build/client/qforge /out/bin/ && \
    strip --strip-unneeded /out/bin/* && \
    for b in /out/bin/*; do ldd "$b"; done | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u | \
      grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*)\.so' | \
      xargs -r -I{} cp -L {} /out/lib/ && \
    /out/bin/qforge-coordinator --version

# ---- runtime -------------------------------------------------------------------------------
FROM ${RUNTIME_BASE}
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates \
      python3 python3-grpcio python3-protobuf && \
    rm -rf /var/lib/apt/lists/* && \
    groupadd --gid 10001 qforge && \
    useradd --uid 10001 --gid qforge --home-dir /var/lib/qforge --create-home qforge
COPY --from=builder /out/lib/ /usr/local/lib/qforge/
COPY --from=builder /out/bin/ /usr/local/bin/
# `import qforge` (python/) for pipeline steps: python3 /opt/qforge/examples/pipeline_step.py
COPY --from=builder /out/python/ /opt/qforge/python/
COPY --from=builder /out/examples/ /opt/qforge/examples/
ENV PYTHONPATH=/opt/qforge/python
RUN echo /usr/local/lib/qforge > /etc/ld.so.conf.d/qforge.conf && ldconfig && \
    qforge-coordinator --version && qforge --help > /dev/null && \
    python3 -c "import qforge, qforge.v1.job_service_pb2_grpc" && \
    python3 /opt/qforge/examples/pipeline_step.py --help > /dev/null
USER 10001:10001
WORKDIR /var/lib/qforge
VOLUME ["/var/lib/qforge"]
# gRPC, coordinator metrics, worker metrics.
EXPOSE 50051 9464 9465
# The embedded default, reachable from outside the container. Workers run the same image
# with `qforge-worker --coordinator <host>:50051`.
ENTRYPOINT ["qforge-coordinator"]
CMD ["--listen=0.0.0.0:50051", "--metrics-listen=0.0.0.0:9464", "--data-dir=/var/lib/qforge"]

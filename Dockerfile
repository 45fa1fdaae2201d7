# qforge images: the coordinator, the worker, the CLI and the offline driver in one runtime image.
#   docker build -t qforge .                       # CPU workers (Debian 12)
# The CUDA backends need an image with the CUDA 13 toolkit as BUILD_BASE/RUNTIME_BASE and
# --build-arg QFORGE_CUDA=ON; the default builds them OFF.
ARG BUILD_BASE=debian:12
ARG RUNTIME_BASE=debian:12

FROM ${BUILD_BASE} AS build
ARG QFORGE_CUDA=OFF
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN bash scripts/install-deps.sh
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DQFORGE_BUILD_TESTS=OFF \
      -DQFORGE_CUDA=${QFORGE_CUDA} \
 && cmake --build build -j"$(nproc)" --target qforge-coordinator qforge-worker qforge qforge-quantize

FROM ${RUNTIME_BASE}
# The shared libraries the binaries link (ldd of each, mapped to Debian 12 packages).
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      ca-certificates libabsl20220623 libc-ares2 libcivetweb1 libgrpc++1.51 libgrpc29 \
      liblapacke libopenblas0-pthread libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 \
      libprotobuf32 libre2-9 libsqlite3-0 libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/qforge --create-home qforge
COPY --from=build /src/build/server/qforge-coordinator /src/build/worker/qforge-worker \
     /src/build/client/qforge /src/build/tools/qforge-quantize /usr/local/bin/
USER qforge
WORKDIR /var/lib/qforge
# gRPC and /metrics of the coordinator.
EXPOSE 50051 9464
ENTRYPOINT ["qforge-coordinator"]
CMD ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464", "--data-dir", "/var/lib/qforge/data"]

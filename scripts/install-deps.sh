#!/usr/bin/env bash
# Installs qforge's build and test dependencies from Debian 12 packages. Idempotent: when
# everything is already installed it only checks (no apt-get update) and returns in well
# under a second. Run as root (CI and fresh machines) or with sudo available.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libabsl-dev nlohmann-json3-dev libcli11-dev
  libopenblas-dev liblapacke-dev
  libgtest-dev libgmock-dev libssl-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libsqlite3-dev sqlite3 libcurl4-openssl-dev prometheus-cpp-dev prometheus
  # the openssl command makes the TLS test certificates (tests/integration/tls_integration_test.cc)
  openssl
  # expat parses S3 answers (common/s3_client.cc)
  libexpat1-dev
  # layer include/exclude patterns are RE2 (linear-time matching: job/layer_selection.h)
  libre2-dev
  python3
  # libFuzzer targets of fuzz/ (scripts/fuzz.sh, ctest fuzz_libfuzzer_short)
  clang libclang-rt-14-dev
  # deploy/check_kubernetes.py (ctest deploy_kubernetes) parses the manifests;
  # tests/integration/prometheus_scrape_test.py writes a test copy of prometheus.yml
  python3-yaml
  # the Python client (python/, tests/python): grpc and protobuf runtimes, pytest, offline pip
  python3-grpcio python3-protobuf python3-pytest python3-setuptools python3-pip python3-wheel
  # headless Chromium renders report.html (tests/job/quality_report_browser_test.cc)
  chromium
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: missing packages (${missing[*]}) and not root; run as root" >&2
    exit 1
  fi
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Packages with services (prometheus) must not start them: tests run their own instances.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  trap '$SUDO rm -f "$policy"' EXIT
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

# The CUDA toolkit is optional: with nvcc at /usr/local/cuda the CUDA sources are compiled
# (QFORGE_CUDA=AUTO); without it the CPU build is complete on its own.
if [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "install-deps: note: no CUDA toolkit at /usr/local/cuda; building without CUDA backends"
fi

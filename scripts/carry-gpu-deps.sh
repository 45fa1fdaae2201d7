#!/usr/bin/env bash
# Copies what the lent GPU machine lacks (it has nvcc, CMake and PyTorch but no Debian -dev
# packages) into .carry/prefix, mirroring /usr, so that a core-only CUDA build there finds it
# with -DCMAKE_PREFIX_PATH=$PWD/.carry/prefix: GoogleTest (static libraries, headers, CMake
# config) for the parity tests, and the header-only nlohmann-json and CLI11 for qforge-bench.
# Run here (after scripts/install-deps.sh); then carry ".carry" with the device call and run
# scripts/gpu-check.sh there. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
P="$ROOT/.carry/prefix"
rm -rf "$P"
mkdir -p "$P/include" "$P/lib/x86_64-linux-gnu/cmake" "$P/share/cmake"
cp -a /usr/include/gtest /usr/include/gmock /usr/include/nlohmann /usr/include/CLI "$P/include/"
cp -a /usr/lib/x86_64-linux-gnu/libgtest.a /usr/lib/x86_64-linux-gnu/libgtest_main.a \
      /usr/lib/x86_64-linux-gnu/libgmock.a /usr/lib/x86_64-linux-gnu/libgmock_main.a \
      "$P/lib/x86_64-linux-gnu/"
cp -a /usr/lib/x86_64-linux-gnu/cmake/GTest "$P/lib/x86_64-linux-gnu/cmake/"
cp -a /usr/share/cmake/nlohmann_json /usr/share/cmake/CLI11 "$P/share/cmake/"
du -sh "$P" | sed 's/^/carry: /'

#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan + UBSan) and runs each one.
#   scripts/fuzz.sh [--seconds S] [--runs N] [--jobs J] [--build-dir DIR] [TARGET...]
#   --seconds S   per target, libFuzzer -max_total_time (default 60)
#   --runs N      per target, libFuzzer -runs (instead of a time budget; e.g. 10000000)
#   --jobs J      parallel build jobs (default nproc)
#   --build-dir   where the clang build goes (default build-fuzz/)
# New inputs go to DIR/corpus/<target>/ (seeded from the checked-in fuzz/corpus/<target>/,
# which is never modified); a crash leaves DIR/findings/<target>/crash-* and exits 1.
# ctest runs it as `fuzz_libfuzzer_short` (--seconds 10). Exits 77 (ctest: skipped) when clang
# or libFuzzer's runtime is missing (apt-get install clang libclang-rt-14-dev).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECONDS_PER_TARGET=60
RUNS=""
JOBS="$(nproc)"
BUILD="$ROOT/build-fuzz"
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_PER_TARGET="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --build-dir) BUILD="$2"; shift 2 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
ALL=(safetensors_header_fuzz uri_fuzz model_config_fuzz hessian_file_fuzz job_spec_fuzz)
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")

if ! command -v clang++ >/dev/null 2>&1; then
  echo "fuzz.sh: clang++ not found; skipping (apt-get install clang libclang-rt-14-dev)"
  exit 77
fi
if ! echo 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }' |
     clang++ -x c++ -fsanitize=fuzzer - -o /dev/null 2>/dev/null; then
  echo "fuzz.sh: clang++ cannot link -fsanitize=fuzzer; skipping (apt-get install libclang-rt-14-dev)"
  exit 77
fi

LAUNCHER=()
command -v ccache >/dev/null 2>&1 && LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DQFORGE_FUZZ=ON -DQFORGE_CUDA=OFF \
    "${LAUNCHER[@]}" >/dev/null
fi
cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"

status=0
for t in "${TARGETS[@]}"; do
  corpus="$BUILD/corpus/$t"
  findings="$BUILD/findings/$t"
  mkdir -p "$corpus" "$findings"
  budget=(-max_total_time="$SECONDS_PER_TARGET")
  [ -n "$RUNS" ] && budget=(-runs="$RUNS")
  echo "== $t: ${budget[*]}"
  # -rss_limit_mb: a parser must not need more than 2 GB for any input of -max_len bytes.
  if ! (cd "$findings" && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        "$BUILD/fuzz/$t" "${budget[@]}" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 "$corpus" "$ROOT/fuzz/corpus/$t" 2>"$findings/log.txt"); then
    echo "fuzz.sh: $t found a failure; see $findings (log.txt, crash-*)" >&2
    tail -n 40 "$findings/log.txt" >&2
    status=1
  fi
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$findings/log.txt" | tr '\n' ' '
  echo
done
exit $status

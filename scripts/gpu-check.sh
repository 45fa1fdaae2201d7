#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (see docs/DEVELOPING.md "GPU checks"):
#   1. a core-only CUDA build (nvcc + CMake; GoogleTest, nlohmann-json and CLI11 from the
#      .carry/prefix that scripts/carry-gpu-deps.sh fills on the build machine)
#   2. the GPU-vs-CPU parity tests (cuda_*_test), then the same under compute-sanitizer
#      (memcheck, racecheck, synccheck)
#   3. qforge-bench --device cuda:0: GPTQ 4-bit g128 act-order on 4096×4096 and 11008×4096,
#      VPTQ v8 k65536 r256 on 4096×4096 and 14336×4096, and the calibration forward pass of
#      one 7B-proportioned decoder layer over 128 × 2048 tokens (--mode calibrate)
#   4. the plain-PyTorch baselines on the same GPU (bench/torch_*_baseline.py)
# Logs go to $OUT (or ./gpu-check-out): per bench run NAME.txt (the table, stdout), NAME.log
# (stderr) and NAME.json (the JSON lines of NAME.log); the last lines are a summary table.
# A missing nvidia-smi or compute-sanitizer is reported, not fatal (the tests then skip).
# Usage (from the device tool): bash scripts/gpu-check.sh [tests|sanitize|bench|torch|all]...
# BUILD overrides the build folder (default build-gpu).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu-check-out}"
BUILD="${BUILD:-$ROOT/build-gpu}"
STEPS=("${@:-all}")
for s in "${STEPS[@]}"; do
  case $s in
    all | tests | sanitize | bench | torch) ;;
    *) echo "unknown step '$s' (tests, sanitize, bench, torch or all)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
cd "$ROOT" || exit 2
shopt -s nullglob
summary=()
want() { local s; for s in "${STEPS[@]}"; do [[ $s == all || $s == "$1" ]] && return 0; done; return 1; }
note() { summary+=("$1"); echo "== $1"; }

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
  note "gpu: rc=$? $(head -n1 "$OUT/gpu.txt")"
else
  echo "nvidia-smi not found" > "$OUT/gpu.txt"
  note "gpu: nvidia-smi not found (no NVIDIA driver here?): GPU tests will skip, --device cuda:0 fails"
fi

if want tests || want sanitize || want bench; then
  if [[ ! -d .carry/prefix ]]; then
    echo "missing .carry/prefix: run scripts/carry-gpu-deps.sh on the build machine and carry .carry" >&2
    exit 2
  fi
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQFORGE_CORE_ONLY=ON -DQFORGE_BLAS=OFF \
    -DQFORGE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_PREFIX_PATH="$ROOT/.carry/prefix" \
    > "$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
  cmake --build "$BUILD" -j"$(nproc)" > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -30; exit 1; }
  note "build: ok ($BUILD)"
  TESTS=("$BUILD"/tests/quant/cuda_*_test)
  (( ${#TESTS[@]} )) || note "no $BUILD/tests/quant/cuda_*_test built"
fi

if want tests; then
  for t in "${TESTS[@]}"; do
    name=$(basename "$t")
    "$t" --gtest_brief=1 > "$OUT/$name.log" 2>&1
    note "$name: rc=$? $(grep -E '^\[  (PASSED|FAILED|SKIPPED)' "$OUT/$name.log" | tr '\n' ' ')"
  done
fi

if want sanitize; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if [[ ! -x $SAN ]]; then
    note "sanitize: compute-sanitizer not found (PATH, /usr/local/cuda/bin): skipped"
  else
    for tool in memcheck racecheck synccheck; do
      for t in "${TESTS[@]}"; do
        name=$(basename "$t")
        "$SAN" --tool "$tool" --error-exitcode 99 "$t" --gtest_brief=1 \
          --gtest_filter='-*Large*:*Bench*' > "$OUT/$name.$tool.log" 2>&1
        note "$tool $name: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/$name.$tool.log" | tail -n1)"
      done
    done
  fi
fi

# bench_run NAME ARGS...: runs qforge-bench ARGS; notes its rc and its table rows (or, when it
# fails, its last stderr line).
bench_run() {
  local name=$1 rc
  shift
  "$BUILD/bench/qforge-bench" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log"
  rc=$?
  grep '^{' "$OUT/$name.log" > "$OUT/$name.json"
  note "$name: rc=$rc"
  if (( rc == 0 )); then
    local row
    while IFS= read -r row; do summary+=("    $row"); done < <(tail -n +2 "$OUT/$name.txt")
  else
    summary+=("    $(tail -n1 "$OUT/$name.log")")
  fi
}

if want bench; then
  for shape in "4096 4096" "11008 4096"; do
    read -r rows cols <<< "$shape"
    bench_run "bench-gptq-${rows}x${cols}" --device cuda:0 --method gptq --rows "$rows" \
      --cols "$cols" --samples 4096 --bits 4 --group-size 128 --act-order --repeats 10
  done
  for shape in "4096 4096" "14336 4096"; do
    read -r rows cols <<< "$shape"
    bench_run "bench-vptq-${rows}x${cols}" --device cuda:0 --method vptq --rows "$rows" \
      --cols "$cols" --samples 4096 --vector-len 8 --centroids 65536 --res-centroids 256 --repeats 3
  done
  bench_run "bench-calibrate-7b-layer" --device cuda:0 --mode calibrate --hidden 4096 \
    --intermediate 11008 --heads 32 --kv-heads 32 --samples 128 --seq-len 2048 --repeats 3
fi

if want torch; then
  for method in gptq vptq; do
    python3 "bench/torch_${method}_baseline.py" > "$OUT/torch-$method.json" 2> "$OUT/torch-$method.log"
    rc=$?
    if (( rc == 0 )); then
      note "torch $method: rc=0 $(tail -c 400 "$OUT/torch-$method.json" | tr '\n' ' ')"
    else
      note "torch $method: rc=$rc $(tail -n1 "$OUT/torch-$method.log")"
    fi
  done
fi

echo
echo "==== summary ===="
printf '%s\n' "${summary[@]}"

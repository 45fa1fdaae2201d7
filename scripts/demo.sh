#!/usr/bin/env bash
# The demo behind `make demo`: the whole service loop on one machine with embedded defaults.
#   1. generate a small Llama-shaped model and calibration token data for it
#   2. start qforge-coordinator (SQLite state + file:// store under demo-out/) with 2 local workers
#   3. qforge submit ... --calibration DATA --watch: CALIBRATE shards on the workers, REDUCE into
#      the Hessian cache, then GPTQ 4-bit g128 act-order, layers leased to the workers
#   4. show the artifact, the manifest summary (calibration included), the workers and /metrics
#   5. qforge submit --bits 3: the same model at GPTQ 3-bit g128 (cached Hessians reused)
#   6. qforge submit --method vptq with the same data: the cached Hessians are reused (no
#      calibration), VPTQ v8 k256 + residual 256 of the same model, same service
#   7. the quality table: every job above ran with --eval on held-out token data (EVALUATE shards
#      + EVAL_REDUCE on the workers); perplexity original vs quantized, mean KL, bits per weight
set -euo pipefail
BUILD_DIR="$(cd "${1:-build}" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${QFORGE_DEMO_DIR:-$ROOT/demo-out}"
rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"

echo "== 1. a Llama-shaped model, calibration and held-out evaluation token data: $OUT/model,"
echo "      $OUT/calib.safetensors, $OUT/heldout.safetensors"
"$BUILD_DIR/tools/qforge-make-demo-model" --output "file://$OUT/model" \
  --calibration-out "file://$OUT/calib.safetensors" --eval-out "file://$OUT/heldout.safetensors"
EVAL=(--eval "file://$OUT/heldout.safetensors")

echo
echo "== 2. qforge-coordinator with 2 local workers (state: $OUT/qforge-data)"
"$BUILD_DIR/server/qforge-coordinator" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --data-dir "$OUT/qforge-data" --allow-root "$OUT" --local-workers 2 --local-worker-arg=--threads \
  --local-worker-arg=1 2> "$OUT/coordinator.log" &
COORD=$!
trap 'kill -TERM $COORD 2>/dev/null || true; wait $COORD 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
  grep -q "qforge-coordinator listening on" "$OUT/coordinator.log" && break
  kill -0 $COORD 2>/dev/null || { cat "$OUT/coordinator.log"; exit 1; }
  sleep 0.05
done
read -r ENDPOINT METRICS < <(sed -n 's/.*qforge-coordinator listening on \([^ ]*\) metrics on \([^ ]*\).*/\1 \2/p' "$OUT/coordinator.log" | head -n 1)
export QFORGE_ENDPOINT="$ENDPOINT"
echo "coordinator at $ENDPOINT, metrics at http://$METRICS/metrics"
for _ in $(seq 1 200); do
  [ "$("$BUILD_DIR/client/qforge" workers -o json 2>/dev/null | grep -c '"id"')" -ge 2 ] && break
  sleep 0.1
done
"$BUILD_DIR/client/qforge" workers

echo
echo "== 3. qforge submit ... --calibration calib.safetensors --eval heldout.safetensors --watch"
echo "      (calibrate, quantize, assemble, then evaluate the artifact against the original)"
START=$(date +%s.%N)
"$BUILD_DIR/client/qforge" submit "file://$OUT/model" --method gptq --bits 4 --group-size 128 \
  --desc-act --calibration "file://$OUT/calib.safetensors" --calib-shard-samples 16 \
  "${EVAL[@]}" --output "file://$OUT/model-gptq-4b" --watch
END=$(date +%s.%N)
echo "job wall time: $(python3 -c "print(f'{$END - $START:.2f}')") s"

echo
echo "== 4. the artifact: $OUT/model-gptq-4b"
ls -l "$OUT/model-gptq-4b"
python3 - "$OUT/model-gptq-4b" <<'PY'
import json, sys
d = sys.argv[1]
print("quantization_config:", json.dumps(json.load(open(d + "/config.json"))["quantization_config"]))
m = json.load(open(d + "/qforge_manifest.json"))
layers = m["layers"]
rel = sorted(l["relative_error"] for l in layers.values())
print(f'manifest: qforge {m["qforge_version"]}, {m["format"]}, {len(m["tensors"])} tensors, '
      f'{len(layers)} quantized layers')
print(f'  relative output error: median {rel[len(rel)//2]:.3e}, max {rel[-1]:.3e}')
print(f'  solver time: {sum(l.get("solve_seconds", 0) for l in layers.values()):.2f} s over the workers')
c = m.get("calibration")
if c:
    print(f'  calibration: {c["samples"]} x {c["seq_len"]} tokens ({c["tokens"]} real), {c["shards"]} shards, '
          f'{c["seconds"]:.2f} s, cache {"hit" if c["cache_hit"] else "miss"}, data sha256 {c["dataset_sha256"][:16]}...')
PY
echo
echo "/metrics excerpt:"
python3 -c "import urllib.request,sys; t=urllib.request.urlopen('http://$METRICS/metrics').read().decode(); print('\n'.join(l for l in t.splitlines() if l.startswith(('qforge_jobs','qforge_tasks','qforge_workers','qforge_task_duration_seconds_count','qforge_bytes')))[:2000])"

echo
echo "== 5. qforge submit --bits 3, same data: cached Hessians, GPTQ 3-bit g128 -> $OUT/model-gptq-3b"
"$BUILD_DIR/client/qforge" submit "file://$OUT/model" --method gptq --bits 3 --group-size 128 \
  --desc-act --calibration "file://$OUT/calib.safetensors" --calib-shard-samples 16 \
  "${EVAL[@]}" --output "file://$OUT/model-gptq-3b" --wait

echo
echo "== 6. qforge submit --method vptq, same data: cached Hessians, v8 k256 + residual 256 -> $OUT/model-vptq"
START=$(date +%s.%N)
"$BUILD_DIR/client/qforge" submit "file://$OUT/model" --method vptq --vector-len 8 \
  --centroids 256 --res-centroids 256 --calibration "file://$OUT/calib.safetensors" \
  --calib-shard-samples 16 "${EVAL[@]}" --output "file://$OUT/model-vptq" --watch
END=$(date +%s.%N)
echo "job wall time: $(python3 -c "print(f'{$END - $START:.2f}')") s"
python3 - "$OUT/model-vptq" <<'PY'
import json, sys
c = json.load(open(sys.argv[1] + "/config.json"))["quantization_config"]
m = json.load(open(sys.argv[1] + "/qforge_manifest.json"))
rel = sorted(l["relative_error"] for l in m["layers"].values())
bpw = sorted(l["bits_per_weight"] for l in m["layers"].values())
print(f'  quant_method {c["quant_method"]}, {len(c["config_for_layers"])} layers in config_for_layers')
print(f'  relative output error: median {rel[len(rel)//2]:.3e}; bits/weight incl. codebooks: {bpw[0]:.2f}..{bpw[-1]:.2f}')
c = m.get("calibration")
if c:
    print(f'  calibration: cache {"hit (no CALIBRATE task ran)" if c["cache_hit"] else "miss"}, Hessians {c["hessians_uri"]}')
PY

echo
echo "== 7. quality on the held-out data (each artifact decoded and run against the original model)"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [("GPTQ 4-bit g128", "model-gptq-4b"), ("GPTQ 3-bit g128", "model-gptq-3b"),
        ("VPTQ v8 k256+256", "model-vptq")]
print(f'{"job":<18} {"ppl original":>12} {"ppl quantized":>13} {"increase":>9} {"mean KL":>9} '
      f'{"top-1":>6} {"bits/weight":>11}')
for name, d in rows:
    q = json.load(open(f"{out}/{d}/qforge_manifest.json"))["quality"]
    print(f'{name:<18} {q["ppl_reference"]:>12.3f} {q["ppl_candidate"]:>13.3f} '
          f'{q["ppl_increase_pct"]:>8.2f}% {q["mean_kl"]:>9.5f} {100 * q["top1_agreement"]:>5.1f}% '
          f'{q.get("bits_per_weight", 0):>11.3f}')
print(f'({q["samples"]} held-out samples, {q["tokens"]} tokens; details: qforge report ID, or '
      f'report.html beside each manifest)')
PY

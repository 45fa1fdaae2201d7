#!/usr/bin/env bash
# The demo behind `make demo`: generates a small Llama-shaped model with per-layer Hessians,
# quantizes it with GPTQ (4-bit, group 128, act-order) into a Hugging Face GPTQ directory, and
# shows what was written.
set -euo pipefail
BUILD_DIR="${1:-build}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${QFORGE_DEMO_DIR:-$ROOT/demo-out}"
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. a Llama-shaped model with Hessians: $OUT/model"
"$BUILD_DIR/tools/qforge-make-demo-model" --output "file://$OUT/model"

echo
echo "== 2. GPTQ 4-bit g128 act-order -> $OUT/model-gptq-4b"
"$BUILD_DIR/tools/qforge-quantize" --model "file://$OUT/model" \
  --hessians "file://$OUT/model/hessians.safetensors" \
  --output "file://$OUT/model-gptq-4b" --bits 4 --group-size 128 --desc-act

echo
echo "== 3. the artifact"
ls -l "$OUT/model-gptq-4b"
echo
echo "quantization_config in config.json:"
python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["quantization_config"], indent=2))' \
  "$OUT/model-gptq-4b/config.json"
echo
echo "manifest summary:"
python3 - "$OUT/model-gptq-4b/qforge_manifest.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
layers = m["layers"]
rel = sorted(l["relative_error"] for l in layers.values())
print(f'  qforge {m["qforge_version"]}, {m["format"]}, {len(m["tensors"])} tensors, {len(layers)} quantized layers')
print(f'  relative output error: median {rel[len(rel)//2]:.3e}, max {rel[-1]:.3e}')
print(f'  solver time: {sum(l["solve_seconds"] for l in layers.values()):.2f} s')
PY

echo
echo "== 4. VPTQ v8 k4096 + residual 256 -> $OUT/model-vptq"
"$BUILD_DIR/tools/qforge-quantize" --model "file://$OUT/model" \
  --hessians "file://$OUT/model/hessians.safetensors" \
  --output "file://$OUT/model-vptq" --method vptq --vector-len 8 --centroids 4096 --res-centroids 256 \
  | tail -n 8
python3 - "$OUT/model-vptq" <<'PY'
import json, sys
c = json.load(open(sys.argv[1] + "/config.json"))["quantization_config"]
m = json.load(open(sys.argv[1] + "/qforge_manifest.json"))
rel = sorted(l["relative_error"] for l in m["layers"].values())
bpw = sorted(l["bits_per_weight"] for l in m["layers"].values())
print(f'  quant_method {c["quant_method"]}, {len(c["config_for_layers"])} layers in config_for_layers')
print(f'  relative output error: median {rel[len(rel)//2]:.3e}; bits/weight incl. codebooks: {bpw[0]:.2f}..{bpw[-1]:.2f}')
PY

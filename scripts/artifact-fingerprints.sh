#!/usr/bin/env bash
# Fingerprints of the artifacts a build writes, for checking that a change leaves them
# byte-identical: `scripts/artifact-fingerprints.sh build-a > a.txt; ... build-b > b.txt;
# diff a.txt b.txt`. Generates the demo model (f16 and bf16), quantizes it with
# qforge-quantize in several GPTQ and VPTQ configurations and through the service (the
# `make demo` jobs: coordinator + 2 local workers + CLI), and prints "sha256  path" for every
# file of every output directory. qforge_manifest.json is printed with what differs run to run
# removed (timings, byte counts, created_at, job and worker ids, the staged objects' hashes
# (their metadata holds timings), the temporary directory's name); every other byte
# is compared.
set -euo pipefail
BUILD_DIR="$(cd "${1:-build}" && pwd)"
WORK="$(mktemp -d /tmp/qforge-fingerprints.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
Q="$BUILD_DIR/tools/qforge-quantize"
export QFORGE_NUM_THREADS=1

"$BUILD_DIR/tools/qforge-make-demo-model" --output "file://$WORK/model" --layers 2 --hidden 256 \
  --intermediate 512 --heads 4 --kv-heads 2 --max-shard-bytes 1000000 > /dev/null
"$BUILD_DIR/tools/qforge-make-demo-model" --output "file://$WORK/model-bf16" --layers 1 \
  --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --dtype bf16 --seed 7 > /dev/null

run() {  # name model args...
  local name=$1 model=$2; shift 2
  "$Q" --model "file://$WORK/$model" --hessians "file://$WORK/$model/hessians.safetensors" \
    --output "file://$WORK/out-$name" "$@" > /dev/null
}
run gptq4-act model --bits 4 --group-size 128 --desc-act
run gptq3-v2 model --bits 3 --group-size 64 --format gptq_v2 --asym
run gptq8-static model --bits 8 --group-size 128 --desc-act --static-groups --mse
run gptq2-channel model-bf16 --bits 2 --group-size -1
run vptq-res model --method vptq --vector-len 8 --centroids 256 --res-centroids 16 --kmeans-iters 10
run vptq-outlier model-bf16 --method vptq --vector-len 4 --centroids 256 --outlier-size 16 \
  --outlier-centroids 16 --group-num 2 --kmeans-iters 5 --seed 3
run vptq-plain model --method vptq --vector-len 8 --centroids 16 --no-norm --kmeans-iters 5

# The demo's two service jobs (the same commands as scripts/demo.sh, quietly).
if [ "${QFORGE_FINGERPRINT_SERVICE:-1}" = 1 ]; then
  QFORGE_DEMO_DIR="$WORK/demo" bash "$(dirname "$0")/demo.sh" "$BUILD_DIR" > "$WORK/demo.log" 2>&1 ||
    { cat "$WORK/demo.log" >&2; exit 1; }
fi

cd "$WORK"
for d in out-* demo/model-gptq-4b demo/model-vptq; do
  [ -d "$d" ] || continue
  find "$d" -type f ! -name qforge_manifest.json | sort | while read -r f; do
    echo "$(sha256sum < "$f" | cut -c1-64)  $f"
  done
  python3 - "$d/qforge_manifest.json" "$WORK" <<'PY'
import json, re, sys
m = json.load(open(sys.argv[1]))
work = sys.argv[2]
def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items()
                if not (k.endswith("_seconds") or k in ("bytes_read", "bytes_written", "created_at",
                        "seconds", "staged_sha256", "worker_id"))}
    if isinstance(x, list):
        return [strip(v) for v in x]
    if isinstance(x, str):
        x = x.replace(work, "<work>")  # the temporary directory's name
        return re.sub(r"job-[0-9a-f]{12}", "<job>", x)
    return x
import hashlib
text = json.dumps(strip(m), sort_keys=True)
print(hashlib.sha256(text.encode()).hexdigest() + "  " + sys.argv[1] + " (timings removed)")
PY
done

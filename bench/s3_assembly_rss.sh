#!/usr/bin/env bash
# Peak RSS of the coordinator while it assembles a model with one multi-GB shard into S3
# (moto_server on loopback), against the same job assembled into a file:// directory.
#   bench/s3_assembly_rss.sh [BUILD_DIR] [VOCAB=2097152] [HIDDEN=256]
# The model (qforge-make-demo-model, 2 decoder layers) is local; its embed_tokens and lm_head
# are VOCAB x HIDDEN f16 each (2 GiB together at the defaults), all in one shard
# (--max-shard-bytes 8e9), so the output holds one shard of that size. Only the output is in
# S3: the assembly reads the source shard and streams the artifact into a multipart upload
# under the hidden temp prefix, then publishes it by server-side copy. Prints the coordinator's
# and the worker's VmHWM (peak RSS) from /proc after each job, and the wall time.
set -euo pipefail
BUILD_DIR="$(cd "${1:-build}" && pwd)"
VOCAB="${2:-2097152}"
HIDDEN="${3:-256}"
command -v moto_server >/dev/null || { echo "moto_server is not on PATH" >&2; exit 77; }
TMP="$(mktemp -d /tmp/qforge-s3rss-XXXXXX)"
trap 'kill -TERM $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOTO_PORT=$(port)
moto_server -H 127.0.0.1 -p "$MOTO_PORT" > "$TMP/moto.log" 2>&1 &
for _ in $(seq 1 300); do curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT/" && break; sleep 0.1; done
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
curl -s -X PUT "http://127.0.0.1:$MOTO_PORT/bench" > /dev/null

echo "generating the model (vocab $VOCAB, hidden $HIDDEN)..." >&2
"$BUILD_DIR/tools/qforge-make-demo-model" --output "$TMP/model" --layers 2 --hidden "$HIDDEN" \
  --intermediate $((HIDDEN * 3)) --heads 4 --kv-heads 2 --vocab "$VOCAB" --samples 64 \
  --max-shard-bytes 8000000000 > /dev/null
ls -l "$TMP"/model/*.safetensors >&2

peak_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

run_job() {  # $1: label, $2: output URI
  local label=$1 out=$2
  rm -rf "$TMP/data"
  "$BUILD_DIR/server/qforge-coordinator" --listen 127.0.0.1:0 --metrics-listen off \
    --data-dir "$TMP/data" --allow-root "$TMP" --s3-endpoint "http://127.0.0.1:$MOTO_PORT" \
    2> "$TMP/coordinator-$label.log" &
  local coord=$!
  for _ in $(seq 1 200); do grep -q "listening on" "$TMP/coordinator-$label.log" && break; sleep 0.05; done
  local endpoint
  endpoint=$(sed -n 's/.*listening on \([^ ]*\) .*/\1/p' "$TMP/coordinator-$label.log" | head -n 1)
  "$BUILD_DIR/worker/qforge-worker" --coordinator "$endpoint" --threads 2 \
    --s3-endpoint "http://127.0.0.1:$MOTO_PORT" 2> "$TMP/worker-$label.log" &
  local worker=$!
  local start end
  start=$(date +%s.%N)
  QFORGE_ENDPOINT="$endpoint" "$BUILD_DIR/client/qforge" submit "$TMP/model" --method gptq \
    --bits 4 --group-size 128 --hessians "$TMP/model/hessians.safetensors" --output "$out" \
    --wait -o json > "$TMP/job-$label.json"
  end=$(date +%s.%N)
  grep -q JOB_STATE_SUCCEEDED "$TMP/job-$label.json" || { cat "$TMP/job-$label.json" "$TMP/coordinator-$label.log" >&2; exit 1; }
  printf '%-8s coordinator peak RSS %7d MiB   worker peak RSS %7d MiB   job %6.1f s\n' "$label" \
    $(( $(peak_kib $coord) / 1024 )) $(( $(peak_kib $worker) / 1024 )) "$(echo "$end - $start" | bc)"
  kill -TERM $worker $coord; wait $worker $coord 2>/dev/null || true
}

run_job file "file://$TMP/out"
rm -rf "$TMP/out"
run_job s3 "s3://bench/out?endpoint=http://127.0.0.1:$MOTO_PORT"
curl -s "http://127.0.0.1:$MOTO_PORT/bench?list-type=2&prefix=out/" | grep -o '<Key>[^<]*</Key><LastModified>[^<]*</LastModified><ETag>[^<]*</ETag><Size>[0-9]*' \
  | sed 's/<LastModified>.*<Size>/ /; s/<Key>//; s/<\/Key>//' >&2

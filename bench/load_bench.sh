#!/usr/bin/env bash
# Load and fairness of the coordinator: J jobs from T tenants (equal priority, all queued at
# once) against W workers on loopback, with tiny layers so that the figure is the
# coordinator's and the protocol's (bench/service_load.cc says what is measured).
#   bench/load_bench.sh [BUILD_DIR] [WORKERS=32] [JOBS=200] [TENANTS=4] [DECODER_LAYERS=2]
# Prints the JSON line of qforge-service-load; exits 1 when a job did not succeed.
set -euo pipefail
BUILD_DIR="$(cd "${1:-build}" && pwd)"
WORKERS="${2:-32}"
JOBS="${3:-200}"
TENANTS="${4:-4}"
LAYERS="${5:-2}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/qforge-load-XXXXXX")"
trap 'kill -TERM $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT

"$BUILD_DIR/tools/qforge-make-demo-model" --output "$TMP/model" --layers "$LAYERS" --hidden 32 \
  --intermediate 128 --heads 1 --kv-heads 1 --vocab 64 --samples 8 >/dev/null
TOKENS=""
for t in $(seq 1 "$TENANTS"); do
  echo "token-$t tenant-$t allow-root=$TMP" >> "$TMP/tokens"
  TOKENS="$TOKENS${TOKENS:+,}token-$t"
done
"$BUILD_DIR/server/qforge-coordinator" --listen 127.0.0.1:0 --metrics-listen off \
  --data-dir "$TMP/data" --allow-root "$TMP" --tokens-file "$TMP/tokens" \
  --worker-token worker-secret --heartbeat-ms 1000 2> "$TMP/coordinator.log" &
COORDINATOR=$!
for _ in $(seq 1 200); do
  grep -q "listening on" "$TMP/coordinator.log" && break
  sleep 0.05
done
ENDPOINT=$(sed -n 's/.*listening on \([^ ]*\) .*/\1/p' "$TMP/coordinator.log" | head -n 1)
QFORGE_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$BUILD_DIR/bench/qforge-service-load" \
  --endpoint "$ENDPOINT" --model "file://$TMP/model" --out "file://$TMP/out" \
  --tokens "$TOKENS" --worker-token worker-secret --workers "$WORKERS" --jobs "$JOBS" \
  --coordinator-pid "$COORDINATOR"

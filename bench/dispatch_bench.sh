#!/usr/bin/env bash
# Coordinator dispatch throughput: tasks per second from queue to completion, with many tiny
# (no-op-sized) layers and N worker processes (each its own gRPC connection) on loopback.
#   bench/dispatch_bench.sh [BUILD_DIR] [WORKERS=32] [DECODER_LAYERS=64]
# A model of DECODER_LAYERS × 7 linear layers of 32×32..128×32 is quantized (GPTQ 4-bit g32,
# identity H); each solve takes microseconds, so the figure is the coordinator's and the
# protocol's: lease, heartbeat, completion, SQLite transaction, staging I/O, assembly.
set -euo pipefail
BUILD_DIR="$(cd "${1:-build}" && pwd)"
WORKERS="${2:-32}"
LAYERS="${3:-64}"
TMP="$(mktemp -d /tmp/qforge-dispatch-XXXXXX)"
trap 'kill -TERM $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT

"$BUILD_DIR/tools/qforge-make-demo-model" --output "$TMP/model" --layers "$LAYERS" --hidden 32 \
  --intermediate 128 --heads 1 --kv-heads 1 --vocab 64 --samples 64 >/dev/null
"$BUILD_DIR/server/qforge-coordinator" --listen 127.0.0.1:0 --metrics-listen off \
  --data-dir "$TMP/data" --allow-root "$TMP" --heartbeat-ms 1000 2> "$TMP/coordinator.log" &
COORDINATOR=$!
# CPU seconds (user + system) the coordinator has used so far (proc(5): fields 14 and 15).
coordinator_cpu() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' \
    "/proc/$COORDINATOR/stat"
}
for _ in $(seq 1 200); do
  grep -q "listening on" "$TMP/coordinator.log" && break
  sleep 0.05
done
ENDPOINT=$(sed -n 's/.*listening on \([^ ]*\) .*/\1/p' "$TMP/coordinator.log" | head -n 1)
export QFORGE_ENDPOINT="$ENDPOINT"
for i in $(seq 1 "$WORKERS"); do
  QFORGE_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$BUILD_DIR/worker/qforge-worker" \
    --coordinator "$ENDPOINT" --threads 1 2> "$TMP/worker-$i.log" &
done
for _ in $(seq 1 300); do
  [ "$("$BUILD_DIR/client/qforge" workers -o json 2>/dev/null | grep -c '"id"')" -ge "$WORKERS" ] && break
  sleep 0.1
done
REGISTERED=$("$BUILD_DIR/client/qforge" workers -o json | grep -c '"id"')
START=$(date +%s.%N)
CPU_START=$(coordinator_cpu)
"$BUILD_DIR/client/qforge" submit "file://$TMP/model" --bits 4 --group-size 32 --calibration none \
  --output "file://$TMP/out" --wait -o json > "$TMP/job.json"
END=$(date +%s.%N)
CPU_END=$(coordinator_cpu)
python3 - "$TMP/job.json" "$START" "$END" "$REGISTERED" "$CPU_START" "$CPU_END" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))
tasks = job.get("tasks", {})
total = int(tasks.get("total", 0))
secs = float(sys.argv[3]) - float(sys.argv[2])
cpu = float(sys.argv[6]) - float(sys.argv[5])
print(json.dumps({"workers": int(sys.argv[4]), "tasks": total, "state": job.get("state"),
                  "seconds": round(secs, 3), "tasks_per_second": round(total / secs, 1),
                  "coordinator_cpu_s": round(cpu, 2),
                  "coordinator_cpu_ms_per_task": round(1000 * cpu / max(1, total), 3),
                  "coordinator_tasks_per_cpu_second": round(total / cpu) if cpu > 0 else None}))
PY

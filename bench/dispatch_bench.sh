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
TMP="$(mktemp -d "${TMPDIR:-/tmp}/qforge-dispatch-XXXXXX")"
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
# The coordinator's CPU time every 50 ms, to split it between dispatch and assembly.
while kill -0 "$COORDINATOR" 2>/dev/null; do
  echo "$(date +%s.%N) $(coordinator_cpu 2>/dev/null || echo 0)"
  sleep 0.05
done > "$TMP/cpu.log" &
START=$(date +%s.%N)
CPU_START=$(coordinator_cpu)
"$BUILD_DIR/client/qforge" submit "file://$TMP/model" --bits 4 --group-size 32 --calibration none \
  --output "file://$TMP/out" --wait -o json > "$TMP/job.json"
END=$(date +%s.%N)
CPU_END=$(coordinator_cpu)
JOB_ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$TMP/job.json")
"$BUILD_DIR/client/qforge" events "$JOB_ID" -o json > "$TMP/events.jsonl"
sleep 0.1
python3 - "$TMP/job.json" "$START" "$END" "$REGISTERED" "$CPU_START" "$CPU_END" \
  "$TMP/events.jsonl" "$TMP/cpu.log" <<'PY'
import bisect, json, sys
job = json.load(open(sys.argv[1]))
# Dispatch: from the first lease to the event that starts the assembly (every QUANTIZE task
# done), with the coordinator's CPU time over the same window (interpolated from cpu.log).
events = [json.loads(line) for line in open(sys.argv[7]) if line.strip()]
first_lease = min(int(e["timeUnixMs"]) for e in events if "leased to" in e.get("message", ""))
assembling = min(int(e["timeUnixMs"]) for e in events
                 if e.get("message", "").startswith("assembling"))
submitted = min(int(e["timeUnixMs"]) for e in events)
ended = max(int(e["timeUnixMs"]) for e in events)
samples = [tuple(map(float, line.split())) for line in open(sys.argv[8]) if line.strip()]
times = [t for t, _ in samples]
def cpu_at(unix_s):
    i = min(max(bisect.bisect_left(times, unix_s), 1), len(samples) - 1)
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 if t1 <= t0 else c0 + (c1 - c0) * (unix_s - t0) / (t1 - t0)
tasks = job.get("tasks", {})
total = int(tasks.get("total", 0))
secs = float(sys.argv[3]) - float(sys.argv[2])
cpu = float(sys.argv[6]) - float(sys.argv[5])
layers = int(tasks.get("layers", total - 1))
dispatch_s = (assembling - first_lease) / 1000.0
dispatch_cpu = cpu_at(assembling / 1000.0) - cpu_at(first_lease / 1000.0)
print(json.dumps({"workers": int(sys.argv[4]), "tasks": total, "state": job.get("state"),
                  "seconds": round(secs, 3), "tasks_per_second": round(total / secs, 1),
                  "coordinator_cpu_s": round(cpu, 2),
                  "coordinator_cpu_ms_per_task": round(1000 * cpu / max(1, total), 3),
                  "coordinator_tasks_per_cpu_second": round(total / cpu) if cpu > 0 else None,
                  "dispatch_seconds": round(dispatch_s, 3),
                  "dispatch_tasks_per_second": round(layers / dispatch_s, 1),
                  "dispatch_coordinator_cpu_ms_per_task": round(1000 * dispatch_cpu / layers, 3),
                  "dispatch_tasks_per_coordinator_cpu_second": round(layers / dispatch_cpu),
                  "submitted_to_first_lease_seconds": round((first_lease - submitted) / 1000.0, 3),
                  "assembly_seconds": round((ended - assembling) / 1000.0, 3)}))
PY

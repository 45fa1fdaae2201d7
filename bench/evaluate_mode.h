// qforge-bench's evaluate mode: the EVALUATE step (job/evaluation.h) timed end to end on a
// generated model. Builds a Llama-shaped model of --layers decoder layers of --hidden /
// --intermediate / --heads / --kv-heads with --vocab tokens (random BF16 weights, in memory),
// its GPTQ 4-bit g128 artifact (identity Hessians, the job/ layer runner and assembler, in
// memory), and --samples × --seq-len random tokens, then runs RunEvaluationShard of the
// artifact against the model (layers on --device, the head on the CPU) --repeats times and
// prints one JSON line: shapes, tokens, predicted tokens, the median seconds, evaluation
// tokens/s (predicted positions per second), the split (forward, head + module errors, reads),
// the metrics of the run and the peak RSS. Needs job/ (full builds only).
// Thread-safety: one call at a time.
#ifndef QFORGE_BENCH_EVALUATE_MODE_H_
#define QFORGE_BENCH_EVALUATE_MODE_H_

#include "base/status.h"
#include "bench/bench_config.h"

namespace qforge::bench {

// Defaults when not given: --hidden 1024, --intermediate 2816, --heads 16, --kv-heads 4,
// --layers 4, --vocab 32000, --samples 4, --seq-len 512 (a ~0.1B model on the CPU).
qforge::Status RunEvaluateMode(const Flags& f, const Device& device);

}  // namespace qforge::bench

#endif  // QFORGE_BENCH_EVALUATE_MODE_H_

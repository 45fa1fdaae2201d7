// qforge-bench's calibrate mode: the calibration forward pass (quant/decoder.h) over one
// decoder layer with random weights (7B proportions by default), timed, with the FLOPs it
// does and the peak memory. Needs only the quantization core (and its CUDA backends), so it
// builds in core-only configurations. Thread-safety: one call at a time.
#ifndef QFORGE_BENCH_CALIBRATE_MODE_H_
#define QFORGE_BENCH_CALIBRATE_MODE_H_

#include <cstdint>

#include "bench/bench_config.h"
#include "base/status.h"

namespace qforge::bench {

// Batch defaults when --samples / --seq-len are not given: the 128 × 2048 tokens on a
// GPU, a reduced 2 × 512 on the CPU.
int64_t DefaultCalibrationSamples(const Device& device);
int64_t DefaultCalibrationSeqLen(const Device& device);

// The FLOPs one ForwardLayer call does, counted from the shapes (2 per multiply-add):
//   projections  2·T·hidden·(q_out + 2·kv_out) + 2·T·q_out·hidden + 3 · 2·T·hidden·intermediate
//   attention    2·head_dim·L·(L+1) per head and sample (q·kᵀ and P·v over the causal
//                triangle, L(L+1)/2 query-key pairs each)
//   hessian      T·dim·(dim+1) per input (x xᵀ's lower triangle with the diagonal), the four
//                inputs (hidden, q_out, hidden, intermediate)
// with T = samples · seq_len (all tokens real). Elementwise work (norms, RoPE, softmax's
// exponentials, SwiGLU) is not counted.
struct CalibrationFlops {
  double projections = 0, attention = 0, hessian = 0;
  double total() const { return projections + attention + hessian; }
};
CalibrationFlops CountCalibrationFlops(int64_t hidden, int64_t intermediate, int64_t heads,
                                       int64_t kv_heads, int64_t head_dim, int64_t samples,
                                       int64_t seq_len);

// Builds the layer of f.hidden, f.intermediate, f.heads, f.kv_heads (0: = heads), f.head_dim
// (0: hidden / heads) with random weights and random hidden states of f.samples × f.seq_len
// tokens (0: the defaults above), runs ForwardLayer on `device` with all four Hessian sums
// (one untimed warm-up, then max(1, f.repeats) timed runs from the same input), and prints
// one JSON line on stdout: shapes, tokens, median seconds, tokens/s, the counted GFLOP and
// achieved GFLOP/s, on the CPU the SGEMM rate of quant::Gemm on the layer's gate_proj shape
// (the ceiling) and the fraction reached, the peak RSS (getrusage) and the device.
// INVALID_ARGUMENT for shapes the decoder refuses; UNAVAILABLE when the device has no
// calibration backend (a binary without CUDA).
qforge::Status RunCalibrateMode(const Flags& f, const Device& device);

}  // namespace qforge::bench

#endif  // QFORGE_BENCH_CALIBRATE_MODE_H_

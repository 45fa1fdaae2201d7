// The min-max grid quantizer of GPTQ (FORMATS.md, "Quantizer (reference)"): per row of a
// group of columns, an integer grid {scale * (q - zero) : q = 0 .. 2^bits - 1}.
//
//   xmin = min(min(x), 0), xmax = max(max(x), 0)
//   sym:  xmax = max(|xmin|, xmax), xmin = -xmax; zero = 2^(bits-1)
//   asym: zero = round(-xmin / scale)
//   xmin == xmax == 0 (an all-zero group): xmin = -1, xmax = 1 (scale-0 guard)
//   scale = (xmax - xmin) / maxq, maxq = 2^bits - 1
//   q = clamp(round(x / scale) + zero, 0, maxq) (round half to even), dequant = scale (q - zero)
//
// Ties. Under sym the group's negative extreme lands exactly on a rounding midpoint
// (xmin / scale = -maxq/2), so float rounding of the scale would decide its code by chance
// (and differently on every backend). The sym scale is therefore multiplied by
// kSymScaleNudge = 1 - 2^-20: the extreme then takes code 0 (= -2^(bits-1), what exact
// arithmetic with round-half-even gives) on every platform, at a negligible change of scale
// (it vanishes when the scale is stored as float16).
//
// Options beyond the reference:
// - sym_keep_positive_xmin (reference quirk, off by default): under sym, a group whose values
//   are all >= 0 keeps xmin = 0, so scale = xmax / maxq around zero 2^(bits-1) and the upper
//   half of the range clips. Measured on all-positive groups of 128 |Student-t| values
//   (tests/quant/quantizer_test.cc, QuantizerTest.PositiveGroupQuirkCostsLoss): the quirk
//   costs 2.7x the squared error at 4 bits and ~600x at 8 bits, ties at 3 bits and wins at
//   2 bits (0.7x: its finer, clipping grid suits mass near 0); inside GPTQ on |W| with
//   4-bit groups of 32 it costs 3.5x the proxy loss. The default is therefore the symmetric
//   grid; the quirk is there for comparisons with the reference (GptqOptions::reference_compat).
// - asym_zero_at_least_one: GPTQ v1 checkpoints store zero - 1 and cannot hold zero 0. When
//   the asymmetric zero would round to 0 (xmin > -scale/2), the grid is refitted with
//   zero = 1 and scale = xmax / (maxq - 1), which covers [-scale, (maxq-1) scale] ⊇
//   [xmin, xmax]: nothing clips, the loss is only the coarser step and is accounted for by
//   the solver (the same params are used for the error feedback and the reported loss).
// - mse: the reference grid search that shrinks [xmin, xmax] by p = 1 - i/grid for
//   i < maxshrink·grid and keeps the p minimising Σ |dequant(q(x)) - x|^norm
//   (reference: norm 2.4, grid 100, maxshrink 0.8). The same fix-ups apply to each candidate.
//
// Thread-safety: pure functions.
#ifndef QFORGE_QUANT_QUANTIZER_H_
#define QFORGE_QUANT_QUANTIZER_H_

#include <cstdint>

#include "base/status.h"
#include "quant/quantizer_math.h"

namespace qforge::quant {

struct QuantizerOptions {
  int bits = 4;                         // 2, 3, 4 or 8
  bool sym = true;                      // symmetric grid, zero = 2^(bits-1)
  bool sym_keep_positive_xmin = false;  // reference quirk (see above)
  bool asym_zero_at_least_one = false;  // GPTQ v1 checkpoint compatibility (see above)
  bool mse = false;                     // grid search for the scale
  float mse_norm = 2.4f;                // exponent of the search's error norm
  int mse_grid = 100;                   // shrink step = 1 / mse_grid
  float mse_max_shrink = 0.8f;          // candidates p = 1 - i/grid, i < max_shrink * grid
};

// INVALID_ARGUMENT naming the field: bits not in {2, 3, 4, 8}; mse_norm not finite or <= 0;
// mse_grid < 1; mse_max_shrink not in (0, 1].
Status ValidateQuantizerOptions(const QuantizerOptions& options);

// The options as the shared arithmetic of quantizer_math.h reads them (maxq, the number of
// MSE candidates). Options must be valid (ValidateQuantizerOptions).
QuantizerSpec MakeQuantizerSpec(const QuantizerOptions& options);

// Parameters of the grid for the n values x[0], x[stride], ... (n >= 1, finite).
// Options must be valid (ValidateQuantizerOptions).
QuantParams FindQuantParams(const float* x, int64_t n, int64_t stride,
                            const QuantizerOptions& options);

// Min-max parameters for a value range (xmin <= xmax), without the MSE search.
QuantParams ParamsFromRange(float xmin, float xmax, const QuantizerOptions& options);

// kSymScaleNudge, MaxQ, QuantParams, QuantizeToCode, DequantizeCode and QuantizeValue: see
// quantizer_math.h, which defines them for host and device code alike.

// Σ |QuantizeValue(x_i) - x_i|^norm over n values with a stride (the MSE search's objective;
// exact std::pow, for tests and diagnostics).
double QuantizationErrorNorm(const float* x, int64_t n, int64_t stride, const QuantParams& p,
                             int maxq, double norm);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_QUANTIZER_H_

// GPTQ (Frantar et al. 2022) for one linear layer: quantizes W [out, in] column by column
// with second-order error feedback through the upper Cholesky factor of the inverse
// Hessian, on the min-max grid of quantizer.h. The algorithm follows FORMATS.md ("GPTQ
// reference algorithm"): dead columns, optional act-order, damping with automatic increase,
// lazy blocks of block_size columns, per-group parameters at group boundaries (or static
// groups fitted on the original W), g_idx per original column.
//
// Dynamic group parameters. The reference fits the parameters of a group that starts inside
// a block on the *global* W, whose columns have not yet received the current block's error
// feedback. By default this solver fits them on the columns as the sequential algorithm
// sees them (every earlier column's feedback applied), which makes the result independent
// of block_size (so backends with different blockings agree); stale_group_params (implied
// by reference_compat) reproduces the reference. The two coincide when every group starts
// at a block start (group_size a multiple of block_size, or per-channel). Measured on
// synthetic 512x1024 layers (4 seeds x groups 16/32/64/96 x act-order x sym/asym x 3/4
// bits = 128 configurations): stale/fresh proxy loss geometric mean 0.9988, fresh lower in
// 50 of 128 — a difference within noise, so the block-size invariance decides the default.
//
// Ties. See quantizer.h: the sym scale carries a 1 - 2^-20 nudge so the group's negative
// extreme deterministically takes code 0.
//
// Thread-safety: the functions are reentrant; a GptqSolver is thread-compatible (Quantize
// may run concurrently on different instances, each using up to NumThreads() threads).
#ifndef QFORGE_QUANT_GPTQ_H_
#define QFORGE_QUANT_GPTQ_H_

#include <cstddef>  // before matrix.h, which uses ::size_t without including it
#include <cstdint>
#include <memory>
#include <vector>

#include "base/matrix.h"
#include "quant/hessian.h"
#include "quant/progress.h"
#include "quant/quantizer.h"
#include "base/status.h"

namespace qforge::quant {

struct GptqOptions {
  int bits = 4;          // 2, 3, 4 or 8
  int group_size = 128;  // -1 = one group per output channel over all inputs ("per channel")
  bool sym = true;
  bool act_order = false;             // desc_act: process columns by descending diag(H)
  bool static_groups = false;         // group params from the original W, before the sweep
  double damp_percent = 0.01;         // fraction of mean(diag H) added to the diagonal
  double damp_auto_increment = 0.01;  // added to damp_percent per failed Cholesky (0: no retry)
  int block_size = 128;               // columns per lazy block (does not change the result)
  bool mse = false;                   // MSE grid search for scales (norm 2.4, grid 100, shrink 0.8)
  bool v1_zero_compat = true;  // asym: keep zero >= 1 so checkpoint_format "gptq" (v1) can store it
  bool reference_compat = false;  // reproduce the reference quirks exactly (see FORMATS.md):
                                  // sym all-positive groups keep xmin = 0, stale dynamic group fits
  bool stale_group_params = false;   // only the second quirk: fit dynamic groups on the
                                     // block-start weights (implied by reference_compat)
  double max_damp_percent = 1.0;     // the automatic increase stops here
  bool compute_output_error = true;  // fill output_error / weight_energy (costs two
                                     // [in,in]-sized products in double: ~1.4 s at 4096²)
  // Progress and cancellation (progress.h), empty by default: called after each lazy block
  // with the columns done / in_features (every column costs the same), so the last call of
  // a successful solve is 1.0 at the end of the sweep, before the metrics. The result does
  // not depend on it.
  SolveProgress progress;
};

// INVALID_ARGUMENT naming the field (bits, group_size, block_size, damp_percent,
// damp_auto_increment, max_damp_percent, out_features, in_features). OK otherwise.
Status ValidateGptqOptions(const GptqOptions& o, int64_t out_features, int64_t in_features);

// The input checks every GPTQ backend (and RTN) makes before any work, with the CPU solver's
// messages: W's and H's storage match their shapes, the options are valid for W
// (ValidateGptqOptions), H is [in, in], W and H are finite. INVALID_ARGUMENT otherwise.
Status CheckGptqInputs(const Matrix& w, const Matrix& h, const GptqOptions& o);

// The Hessian preparation every GPTQ backend runs for `o` (PrepareHessian, or its host steps
// around a device factorisation): damping, automatic increase (max_damp_percent at least
// damp_percent), act-order.
HessianOptions GptqHessianOptions(const GptqOptions& o);

// The progress report of every GPTQ backend after the lazy block that ends at processing
// column `columns_done` (of in_features; blocks of min(block_size, in_features) columns):
// calls o.progress(columns_done / in_features) when it is set. CANCELLED "solve cancelled
// after column block b of B" when it returns false; OK otherwise.
Status ReportGptqProgress(const GptqOptions& o, int64_t columns_done, int64_t in_features);

// The quantizer settings GPTQ uses for `o` (bits, sym, mse, quirks).
QuantizerOptions GptqQuantizerOptions(const GptqOptions& o);

struct GptqResult {
  int64_t out_features = 0, in_features = 0;
  int bits = 0;
  int64_t group_size = 0;      // effective (in_features when -1)
  int64_t num_groups = 0;      // ceil(in_features / group_size)
  std::vector<uint8_t> codes;  // [out, in] row-major, ORIGINAL column order, in [0, 2^bits)
  std::vector<float> scales;   // [num_groups, out]
  std::vector<int32_t> zeros;  // [num_groups, out], integer zero points (sym: 2^(bits-1))
  std::vector<int32_t> g_idx;  // [in], group of each original input column
  double proxy_loss = 0;       // Σ (w−q)²/d²/2 as the reference reports it
  double output_error = 0;   // tr(ΔW H ΔWᵀ) with the ORIGINAL (undamped) H, ΔW = W − dequant
  double weight_energy = 0;  // tr(W H Wᵀ); relative error = output_error / weight_energy
  double damp_percent_used = 0;
  int cholesky_attempts = 0;
  double seconds = 0;          // wall time of the whole Quantize call
  double prepare_seconds = 0;  // of which: Hessian preparation (factorization)
  double sweep_seconds = 0;    // of which: the column sweep
  double metrics_seconds = 0;  // of which: output_error and weight_energy
  std::vector<int32_t> perm;   // processing order (perm[k] = original column); identity
                               // without act-order
};

// [out, in]: W[o,i] = scales[g_idx[i],o] * (codes[o,i] - zeros[g_idx[i],o]). An empty matrix
// when the result's arrays do not match its shape.
Matrix DequantizeGptq(const GptqResult& r);
// Same, with the scales rounded through float16 first (what a loader of the checkpoint computes).
Matrix DequantizeGptqF16Scales(const GptqResult& r);

// The solver interface; the CUDA backend implements it too. Thread-compatible.
class GptqSolver {
 public:
  virtual ~GptqSolver() = default;
  virtual const char* backend() const = 0;  // "cpu"
  // w: [out, in]; h: [in, in] symmetric PSD Hessian (an asymmetric one is used as (H+Hᵀ)/2).
  // INVALID_ARGUMENT on shape/option errors and non-finite W/H; FAILED_PRECONDITION when no
  // damping up to max_damp_percent makes H positive definite.
  virtual StatusOr<GptqResult> Quantize(const Matrix& w, const Matrix& h,
                                        const GptqOptions& options) = 0;
};

std::unique_ptr<GptqSolver> NewCpuGptqSolver();

// Round-to-nearest on the same grid (same groups/g_idx/bits/sym/mse; group params from the
// original W), no error feedback, for comparisons. h is used for act-order and the metrics.
// proxy_loss is Σ (w−q)²/2 (no Hessian weighting); options.progress is not called (there
// is no sweep). Errors as GptqSolver::Quantize.
StatusOr<GptqResult> QuantizeRtn(const Matrix& w, const Matrix& h, const GptqOptions& options);

// tr((W−Ŵ) H (W−Ŵ)ᵀ), accumulated in double (only (H+Hᵀ)/2 matters). W, Ŵ: [out, in];
// H: [in, in]. NaN when the shapes do not match. Costs one [in, in] symmetric rank-out
// update in double (BLAS dsyrk: ~0.7 s for 4096 x 4096 on 2 cores).
double OutputError(const Matrix& w, const Matrix& w_hat, const Matrix& h);

// tr(W H Wᵀ) in double, as OutputError with Ŵ = 0.
double WeightEnergy(const Matrix& w, const Matrix& h);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_GPTQ_H_

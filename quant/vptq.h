// VPTQ (Liu et al. 2024, "VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large
// Language Models") for one linear layer, following FORMATS.md "VPTQ reference algorithm":
//
//   W [out, in] ── dead columns zeroed ── per-column min-max normalisation (enable_norm) ──
//   act-order permutation by diag(H) (enable_perm) ── vectors of length v along the OUTPUT
//   dimension (column c, rows r·v .. r·v+v−1; out padded with zeros to a multiple of v) ──
//   Hessian-weighted k-means codebook per group (sample weight H[c,c]) ── channel-
//   independent second-order pass: columns in permuted order, each v-chunk → nearest
//   centroid, err = (w − q)/U[c,c] fed to the later columns through U (upper Cholesky factor
//   of H⁻¹), lazy updates per block of 128 columns ── optional residual codebook, trained on
//   the error left by that pass, then the pass re-run from the original W with both codebooks
//   frozen (nearest main centroid, then nearest residual centroid to the remainder).
//   The first outlier_size permuted columns (largest diag H) have their own codebook (vector
//   length v0, k0 entries, no residual); the other columns split into group_num equal
//   contiguous groups, each with its own codebook(s).
//
// Decisions (measured; numbers in tests/quant/vptq_test.cc and the lead's report):
// - Normalisation and the Hessian (FORMATS.md leaves it open). After normalisation the
//   solver works on Wn = (W − 1·bᵀ)·diag(s)⁻¹, and the layer's loss is exactly
//   tr(ΔWn · diag(s) H diag(s) · ΔWnᵀ). HessianSpace::kScaled uses Hs = diag(s)·H·diag(s)
//   for the error feedback, the act-order permutation and the k-means weights (Hs[c,c]);
//   HessianSpace::kReference keeps the un-normalised H everywhere as microsoft/VPTQ does.
//   kScaled is the default: it is the consistent choice and gave the lower output error on
//   every synthetic layer we measured (VptqTest.ScaledHessianBeatsReferenceHessian).
// - The loss reported is computed from the FINAL dequantised weights (codebooks, scales
//   and biases rounded to param_dtype as the checkpoint stores them) against the original W
//   and H — not the reference's logged figure, which is wrong with norm + perm.
// - Scale and bias are rounded to param_dtype BEFORE normalising, so the quantisation sees
//   (and compensates) exactly the values the checkpoint stores.
// - A partial last vector of a column (out % v != 0) is assigned by the distance over its
//   real rows only (the padding rows are never stored), and is left out of k-means training.
//
// Thread-safety: a VptqSolver is thread-compatible (concurrent Quantize calls on different
// instances are fine; each uses up to NumThreads() threads).
#ifndef QFORGE_QUANT_VPTQ_H_
#define QFORGE_QUANT_VPTQ_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "quant/kmeans.h"
#include "base/matrix.h"
#include "quant/progress.h"
#include "base/status.h"

namespace qforge::quant {

// How the stored parameters (codebooks, weight_scale, weight_bias) are rounded.
enum class VptqParamDtype {
  kFloat32,   // no rounding (the packed checkpoint then rounds, and the loss is optimistic)
  kFloat16,   // the model is float16
  kBFloat16,  // the model is bfloat16
};

// Which Hessian the normalised problem uses (see the header comment).
enum class HessianSpace {
  kScaled,     // diag(s)·H·diag(s): consistent with normalisation (default)
  kReference,  // un-normalised H, as microsoft/VPTQ
};

struct VptqOptions {
  // ---- Codebook shape.
  // Vector length v (rows per vector, along out_features). Checkpoints: {2,4,6,8,10,12,16}.
  int vector_len = 8;
  // Main codebook entries k per group (>= 1). Checkpoints: a power of two with
  // log2 k in {4,8,10,12,13,14,15,16}.
  int64_t num_centroids = 4096;
  // Residual codebook entries kr per group; 0 = no residual. Checkpoints: 0 or a power of
  // two with log2 kr in {2..12,15,16}.
  int64_t num_res_centroids = 0;
  // Outlier columns O: the first O permuted columns (largest diag H), with their own
  // codebook of outlier_num_centroids entries of length outlier_vector_len. 0 = none.
  int64_t outlier_size = 0;
  int outlier_vector_len = 4;          // v0 (used only when outlier_size > 0; the vptq GEMV takes only 4)
  int64_t outlier_num_centroids = 4096;  // k0 (used only when outlier_size > 0)
  // Groups G: the in − O non-outlier columns split into G equal contiguous groups (in
  // permuted order), each with its own codebook(s). (in − O) % G must be 0.
  int group_num = 1;

  // ---- Transformations.
  bool enable_norm = true;  // per input column: scale = max − min, bias = min over rows
  bool enable_perm = true;  // act-order: columns by descending diag(H) (of the space below)
  HessianSpace hessian_space = HessianSpace::kScaled;
  VptqParamDtype param_dtype = VptqParamDtype::kFloat16;

  // ---- k-means (the same settings for the main, outlier and residual codebooks).
  int kmeans_iterations = 100;  // Lloyd steps (reference: 100)
  double kmeans_tol = 1e-5;     // relative inertia decrease that stops (reference: 1e-5)
  uint64_t kmeans_seed = 0;     // codebook g uses seed + g (outliers: seed + G; residual:
                                // seed + 1000 + g)
  KMeansInit kmeans_init = KMeansInit::kKMeansPlusPlus;  // see kmeans.h for the choice
  int64_t kmeans_init_max_samples = 262144;
  // Sample weight of every vector of column c is H[c,c] (of hessian_space); false gives
  // plain unweighted k-means (for ablations).
  bool hessian_weighted_kmeans = true;

  // ---- Second-order pass.
  // false: no error feedback (each column quantised as it is: plain VQ, for ablations).
  bool error_feedback = true;
  double damp_percent = 0.01;         // fraction of mean(diag H) added before factorising
  double damp_auto_increment = 0.01;  // added per failed Cholesky (0: no retry)
  double max_damp_percent = 1.0;      // the automatic increase stops here
  int block_size = 128;               // columns per lazy block (does not change the result)

  // ---- Reporting.
  // Also compute the output error after k-means alone (nearest centroids of the original
  // normalised weights) and after the first pass (when there is a residual): one extra
  // [out, in] × [in, in] product each.
  bool report_phase_errors = false;
  // Progress and cancellation (progress.h), empty by default: called after each Lloyd step
  // of every codebook's k-means and after each lazy block of every pass, with the stages
  // weighted by an a-priori work estimate that every backend shares (VptqProgress in
  // vptq_layout.h), so the fraction is monotone and the same on the CPU and on CUDA. The
  // last call of a successful solve is 1.0 at the end of the last pass, before the metrics.
  // The result does not depend on it.
  SolveProgress progress;
};

// INVALID_ARGUMENT naming the field: out/in < 1; vector_len, outlier_vector_len < 1;
// num_centroids, outlier_num_centroids outside [1, 2^31 − 1]; num_res_centroids < 0;
// group_num < 1; outlier_size < 0 or leaving fewer than group_num columns;
// (in − outlier_size) % group_num != 0; kmeans_iterations < 0; kmeans_tol or
// kmeans_init_max_samples < 0; damping values not finite or < 0; block_size < 1.
// Checkpoint limits (power-of-two sizes, the kernel's bit widths) are checked by
// ValidateVptqLayerConfig in vptq_pack.h, not here.
Status ValidateVptqOptions(const VptqOptions& o, int64_t out_features, int64_t in_features);

struct VptqTimings {
  double hessian_seconds = 0;          // normalisation, permutation, Cholesky factors
  double kmeans_seconds = 0;           // main and outlier codebooks
  double first_pass_seconds = 0;       // second-order pass with the main codebooks
  double residual_kmeans_seconds = 0;  // residual codebooks
  double second_pass_seconds = 0;      // pass with main + residual codebooks
  double metrics_seconds = 0;          // output_error / weight_energy (and phase errors)
  double total_seconds = 0;
};

// Everything in the layout of the checkpoint (FORMATS.md "VPTQ checkpoint"). Codebook values
// are in normalised units (the checkpoint's), already rounded to param_dtype.
struct VptqResult {
  int64_t out_features = 0, in_features = 0;
  // The effective configuration.
  int vector_len = 0;
  int64_t num_centroids = 0, num_res_centroids = 0;  // num_res_centroids 0 = none
  int64_t outlier_size = 0;
  int outlier_vector_len = 0;          // 0 without outliers
  int64_t outlier_num_centroids = 0;   // 0 without outliers
  int group_num = 0;
  int64_t group_size = 0;              // (in − O) / G
  bool enable_norm = false, enable_perm = false;
  VptqParamDtype param_dtype = VptqParamDtype::kFloat32;

  int64_t num_vector_rows = 0;          // R = ceil(out / v)
  int64_t num_outlier_vector_rows = 0;  // R0 = ceil(out / v0), 0 without outliers

  std::vector<std::vector<float>> centroids;      // [G][k·v]: entry i at [i·v, i·v+v)
  std::vector<std::vector<float>> res_centroids;  // [G][kr·v]; empty without a residual
  // [G, R, S] row-major: the index of vector (r, c) of group g, c = position within the
  // group (permuted order). res_indices likewise; empty without a residual.
  std::vector<int32_t> indices;
  std::vector<int32_t> res_indices;
  std::vector<float> outlier_centroids;  // [k0·v0]; empty without outliers
  std::vector<int32_t> outlier_indices;  // [R0, O] row-major; empty without outliers
  // perm[p] = original column at permuted position p (identity without enable_perm).
  std::vector<int32_t> perm;
  // [in], ORIGINAL column order; all 1 / 0 without enable_norm.
  std::vector<float> weight_scale, weight_bias;
  std::vector<int32_t> dead_columns;  // original indices with H[c,c] == 0 (weights zeroed)

  // The final dequantised weights [out, in] (original order): exactly what the packed
  // checkpoint decodes to, up to float32 arithmetic order.
  Matrix dequantized;

  // Losses of the final weights against the ORIGINAL W and H: tr(ΔW H ΔWᵀ), tr(W H Wᵀ).
  double output_error = 0;
  double weight_energy = 0;
  // Σ_c ‖err_c‖²/2 of the last pass, err = (w − q)/U[c,c] in the normalised space (the
  // GPTQ reference's proxy figure; comparable only between runs on the same layer).
  double proxy_loss = 0;
  // With report_phase_errors (else −1): output error after k-means alone and after the
  // first pass (equals output_error without a residual).
  double kmeans_output_error = -1;
  double first_pass_output_error = -1;

  double damp_percent_used = 0;
  int cholesky_attempts = 0;
  int kmeans_iterations_max = 0;  // the largest iteration count over the codebooks
  VptqTimings timings;
};

// The solver interface; the CUDA backend implements it too. Thread-compatible.
class VptqSolver {
 public:
  virtual ~VptqSolver() = default;
  virtual const char* backend() const = 0;  // "cpu"
  // w: [out, in]; h: [in, in] symmetric PSD Hessian. INVALID_ARGUMENT on shape/option
  // errors and non-finite W/H; FAILED_PRECONDITION when no damping up to max_damp_percent
  // makes H positive definite.
  virtual StatusOr<VptqResult> Quantize(const Matrix& w, const Matrix& h,
                                        const VptqOptions& options) = 0;
};

// The CPU solver. `search` (not owned, may be null = the CPU search of kmeans.h) is used for
// k-means and for the column sweep; it must outlive the solver.
std::unique_ptr<VptqSolver> NewCpuVptqSolver(NearestCentroidSearch* search = nullptr);

// Rebuilds the [out, in] weights from a result's codebooks, indices, perm and scales (the
// published formula, on the unpacked arrays; float32). Used to fill `dequantized` and by
// tests. INVALID_ARGUMENT when the arrays do not match the configuration.
StatusOr<Matrix> DequantizeVptqResult(const VptqResult& r);

// Bits per weight of a result, counted honestly: indices (log2 k + log2 kr per v weights),
// outlier indices (16 bits each, stored unpacked) and every stored float in 16 bits
// (codebooks, weight_scale, weight_bias), divided by out·in. Perm (16 bits per column) is
// counted as well; all three are stored for every layer, identity tensors without norm / perm.
double VptqBitsPerWeight(const VptqResult& r);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_VPTQ_H_

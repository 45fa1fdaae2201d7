// The host-side pieces of a VPTQ solve that every backend (the CPU solver of vptq.cc, the
// CUDA solver of cuda/vptq_cuda.cu) does identically, written once: the input checks, the
// layer geometry (vector rows, padding, which codebook a permuted column uses), the header
// fields of a VptqResult, the normalisation set-up (dead columns, per-column scale and bias,
// the Hessian of the normalised problem, the k-means sample weights), the k-means settings of
// a codebook and the progress weighting of the solve's stages. A backend that computes one of
// these on a device must compute exactly what is stated here. The notation is vptq.h's:
// W [M, N] = [out, in], O outlier columns, G groups of S columns, vector lengths v and v0.
// Thread-safety: pure functions and value types; a VptqProgress belongs to one solve.
#ifndef QFORGE_QUANT_VPTQ_LAYOUT_H_
#define QFORGE_QUANT_VPTQ_LAYOUT_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "quant/hessian.h"
#include "quant/kmeans.h"
#include "base/matrix.h"
#include "quant/progress.h"
#include "base/status.h"
#include "quant/vptq.h"

namespace qforge::quant {

// ---- Input checks -----------------------------------------------------------------------

// INVALID_ARGUMENT "<what> entry (r, c) is not finite" for the first non-finite entry of m in
// row-major order; OK otherwise.
Status CheckMatrixFinite(const Matrix& m, const char* what);

// The checks of VptqSolver::Quantize before any work, in this order with these messages:
// ValidateVptqOptions(o, w.rows, w.cols); W's storage matches its shape; H is [in, in] with
// matching storage; W is finite. INVALID_ARGUMENT otherwise. H's finiteness is NOT checked
// here: the CPU solver leaves it to PrepareHessian on the normalised problem's Hessian (same
// message format); a backend that builds that Hessian elsewhere calls
// CheckMatrixFinite(h, "Hessian") right after this.
Status CheckVptqInputs(const Matrix& w, const Matrix& h, const VptqOptions& o);

// ---- Geometry ---------------------------------------------------------------------------

// Vectors per column: ceil(out_features / vector_len). out_features >= 0, vector_len >= 1.
int64_t VptqVectorRows(int64_t out_features, int64_t vector_len);

// Which codebook a permuted column p uses.
struct VptqColumnPart {
  bool outlier = false;  // p < O: the outlier codebook
  int group = 0;         // the group (non-outlier columns only)
  int64_t pos = 0;       // position within the group, or p itself for an outlier column
};

// The shapes of one layer's solve.
struct VptqGeometry {
  int64_t M = 0;     // out_features
  int64_t N = 0;     // in_features
  int64_t Mpad = 0;  // max(R·v, R0·v0): rows of the padded, transposed working columns
  int64_t O = 0;     // outlier columns (the first O permuted columns)
  int64_t S = 0;     // columns per group: (N − O) / G
  int G = 0;         // groups
  int v = 0;         // vector length of the group codebooks
  int v0 = 0;        // vector length of the outlier codebook; 0 without outliers
  int64_t R = 0;     // vectors per column, ceil(M / v)
  int64_t R0 = 0;    // vectors per outlier column, ceil(M / v0); 0 without outliers

  // p in [0, N).
  VptqColumnPart Part(int64_t p) const;
  // The first permuted column of group g (g in [0, G)): O + g·S.
  int64_t GroupBegin(int g) const { return O + g * S; }
};

// The geometry of a [out_features, in_features] layer under `o`. Requires options that pass
// ValidateVptqOptions for that shape.
VptqGeometry MakeVptqGeometry(int64_t out_features, int64_t in_features, const VptqOptions& o);

// A VptqResult whose configuration fields (out/in features, vector_len, num_centroids,
// num_res_centroids, outlier_size, outlier_vector_len, outlier_num_centroids (0 without
// outliers), group_num, group_size, enable_norm, enable_perm, param_dtype, num_vector_rows,
// num_outlier_vector_rows) describe geometry `g` under `o`; every other field is default.
VptqResult MakeVptqResultHeader(const VptqGeometry& g, const VptqOptions& o);

// ---- Normalisation set-up ---------------------------------------------------------------

// x rounded to `dtype` as the checkpoint stores it (identity for kFloat32).
float RoundVptqParam(float x, VptqParamDtype dtype);

// Original indices c, ascending, with H[c,c] == 0 (h square): the dead columns, whose
// weights the solver zeroes before anything else.
std::vector<int32_t> FindDeadColumns(const Matrix& h);

// The stored normalisation of one column (weight_scale, weight_bias of VptqResult).
struct VptqColumnNorm {
  float scale = 1.0f;
  float bias = 0.0f;
};

// The normalisation of a column whose values (dead columns read as 0) span [mn, mx]:
// scale = RoundVptqParam(mx − mn), 0 when that is not finite; bias = RoundVptqParam(mn). The
// normalised value of w is (w − bias)/scale when scale > 0, else 0.
VptqColumnNorm ColumnNormFromRange(float mn, float mx, VptqParamDtype dtype);

// Whether the normalised problem uses Hf = diag(s)·H·diag(s) (enable_norm with
// HessianSpace::kScaled) rather than H itself.
bool UsesScaledHessian(const VptqOptions& o);

// The Hessian preparation every VPTQ backend runs on the (normalised) problem's Hessian for
// `o`: damping, automatic increase, act-order permutation when enable_perm.
HessianOptions VptqHessianOptions(const VptqOptions& o);

// Hf = diag(s)·H·diag(s) as float: Hf[a,b] = H[a,b]·(s[a]·s[b]). h [n, n], scale [n].
Matrix ScaleHessian(const Matrix& h, const std::vector<float>& scale);

// diag(Hf) [n] with exactly ScaleHessian's float operations: H[c,c]·(s[c]·s[c]) when
// `scaled`, else H[c,c]. h [n, n]; scale [n] (read only when scaled).
std::vector<float> NormalizedHessianDiagonal(const Matrix& h, const std::vector<float>& scale,
                                             bool scaled);

// The k-means sample weight of every vector of permuted column p: max(0, diag(Hf)[perm[p]])
// with `hessian_weighted`, else 1. hf_diag [n] in original order; perm [n].
std::vector<float> KMeansColumnWeights(const std::vector<float>& hf_diag,
                                       const std::vector<int32_t>& perm, bool hessian_weighted);

// ---- k-means of a codebook --------------------------------------------------------------

// Vectors per column that k-means trains on: the full ones, floor(M / v), or the one padded
// vector when M < v.
int64_t KMeansVectorsPerColumn(int64_t out_features, int vector_len);

// The k-means settings of a codebook with k entries and `seed` (vptq.h: the iterations,
// tolerance, initialisation and its sample limit come from `o`), reporting to `progress`
// (VptqProgress::KMeans; may be empty).
KMeansOptions VptqKMeansOptions(const VptqOptions& o, int64_t k, uint64_t seed,
                                SolveProgress progress = {});

// The error a backend's codebook training returns for a failed k-means `s`: "<what>:
// <message>" with s's code, or for CANCELLED "solve cancelled during <what> (<message>)".
Status CodebookKMeansError(const Status& s, const std::string& what);

// ---- Progress ---------------------------------------------------------------------------

// The stages of a VPTQ solve that report progress, in the order every backend runs them.
enum class VptqStage {
  kOutlierKMeans,   // the outlier codebook (outlier_size > 0)
  kGroupKMeans,     // the main codebook of each group, g = 0 .. G − 1
  kPhaseErrorPass,  // the plain nearest-centroid pass of report_phase_errors
  kFirstPass,       // the second-order pass with the main codebooks
  kResidualKMeans,  // the residual codebook of each group (num_res_centroids > 0)
  kSecondPass,      // the pass with main + residual codebooks (num_res_centroids > 0)
};

// The progress of one VPTQ solve (VptqOptions::progress). Every stage is worth an a-priori
// estimate of its work, fixed before the solve starts, so that the fraction is monotone and
// both backends report the same fractions. The unit is one point–centroid distance:
//  - the k-means of a codebook with k entries on n training vectors (KMeansVectorsPerColumn
//    per column): n·k·(kmeans_iterations + 1), a full assignment for the initial step and
//    for each Lloyd step (KMeansOptions::progress). Pruning and early convergence make a run
//    cheaper than that: a converged run jumps to its stage's end;
//  - a pass: the search of every vector of every column, O·R0·k0 + G·S·R·k, plus G·S·R·kr
//    in the second pass; reported at the end of each lazy block.
// The preparation (normalisation, factorisation), k-means++ initialisations and the metrics
// count nothing. The last report of a successful solve, at the end of its last pass, is
// exactly 1.0. After the callback returned false no report calls it again.
class VptqProgress {
 public:
  // Reports to o.progress (nothing when it is empty); `g` is MakeVptqGeometry's for `o`.
  VptqProgress(const VptqGeometry& g, const VptqOptions& o);

  // KMeansOptions::progress for the k-means of `stage` (kOutlierKMeans, or kGroupKMeans /
  // kResidualKMeans of group `group`): the k-means' fraction mapped into the stage's span.
  // Empty when o.progress is. This object must outlive the k-means run.
  SolveProgress KMeans(VptqStage stage, int group);

  // Whether there is a callback to report to (o.progress is not empty).
  bool active() const { return static_cast<bool>(report_); }

  // After the pass of `stage` (kPhaseErrorPass, kFirstPass, kSecondPass) has finished the
  // permuted columns [0, columns_done) at the end of a lazy block. OK, or CANCELLED "solve
  // cancelled after column block b of B of the <pass>" when the callback asks to stop.
  Status PassColumns(VptqStage stage, int64_t columns_done);

 private:
  // Work before `stage` (its group `group` for the per-group k-means) starts.
  double Begin(VptqStage stage, int group) const;
  // Work of the pass of `stage` up to column `columns`.
  double PassWork(VptqStage stage, int64_t columns) const;
  // Reports `done` units (kept nondecreasing, at most 1.0); false once asked to stop.
  bool Report(double done);

  SolveProgress report_;
  int64_t columns_ = 0, outliers_ = 0, block_size_ = 0;
  int groups_ = 0;
  bool phase_errors_ = false, residual_ = false;
  double outlier_kmeans_ = 0, group_kmeans_ = 0, residual_kmeans_ = 0;  // per codebook
  double outlier_column_ = 0, group_column_ = 0, residual_column_ = 0;  // per column of a pass
  double total_ = 0;
  double last_ = 0;
  bool stopped_ = false;
};

// ---- Timing -----------------------------------------------------------------------------

// Seconds from `since` to now on the steady clock (VptqTimings).
double ElapsedSeconds(std::chrono::steady_clock::time_point since);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_VPTQ_LAYOUT_H_

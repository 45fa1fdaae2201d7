// Hessian preparation shared by the GPTQ and VPTQ solvers (and their CUDA backends), and
// the running-mean accumulation H = 2/n Σ x xᵀ used to build Hessians from activations.
// Thread-safety: pure functions; HessianAccumulator is not thread-safe.
#ifndef QFORGE_QUANT_HESSIAN_H_
#define QFORGE_QUANT_HESSIAN_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "base/matrix.h"
#include "base/status.h"

namespace qforge::quant {

struct HessianOptions {
  // Fraction of mean(diag H) added to the diagonal before factorisation.
  double damp_percent = 0.01;
  // When Cholesky fails, damp_percent grows by this much and the factorisation is retried,
  // while damp_percent stays <= max_damp_percent. 0 disables the retries.
  double damp_auto_increment = 0.01;
  double max_damp_percent = 1.0;
  // Act-order: process columns by descending diag(H).
  bool act_order = false;
};

struct PreparedHessian {
  int64_t n = 0;
  // perm[k] = original column processed at position k (identity without act-order).
  std::vector<int32_t> perm;
  // Original indices of dead columns (diag(H) == 0): their H diagonal was set to 1 and the
  // solver must zero the corresponding weight columns.
  std::vector<int32_t> dead_columns;
  // U, [n, n] upper triangular, in permuted order: (P H P^T + damp I)^-1 = Uᵀ U.
  Matrix hinv_upper;
  double damp_percent_used = 0;  // the damping that succeeded
  int cholesky_attempts = 0;     // 1 when the first damping worked
};

// Dead-column fix, act-order permutation, damping with automatic increase, Cholesky,
// inverse, upper Cholesky factor of the inverse, as the GPTQ reference does:
// ValidateHessianOptions, CheckHessian, MakeHessianLayout, then FactorWithDamping around the
// factorisation on the CPU. INVALID_ARGUMENT for invalid options and as CheckHessian;
// FAILED_PRECONDITION as FactorWithDamping when no damping up to max_damp_percent makes h
// positive definite.
StatusOr<PreparedHessian> PrepareHessian(const Matrix& h, const HessianOptions& options);

// The steps of PrepareHessian that run on the host, shared with the CUDA backends, which
// factorise on the device (quant/cuda/gptq_cuda.cu, vptq_cuda.cu).

// INVALID_ARGUMENT naming the field when damp_percent, damp_auto_increment or
// max_damp_percent is negative or not finite. OK otherwise.
Status ValidateHessianOptions(const HessianOptions& options);

// PrepareHessian's checks of h, the first failure reported: INVALID_ARGUMENT when h is not
// square, is empty, its storage does not hold rows·cols values, it has more than INT32_MAX
// rows, or (row by row) an entry is not finite or the diagonal entry is negative. OK otherwise.
Status CheckHessian(const Matrix& h);

// diag(h) of a square h: [h.rows].
std::vector<float> HessianDiagonal(const Matrix& h);

// What PrepareHessian derives from diag(H) alone.
struct HessianLayout {
  int64_t n = 0;
  // perm[k] = original column processed at position k: identity, or with act-order the
  // columns by descending diagonal (dead ones counted as 1), ties in the original order.
  std::vector<int32_t> perm;
  // Original indices of the dead columns (diagonal 0), ascending.
  std::vector<int32_t> dead_columns;
  // [n] diag(H) with the dead entries set to 1: the diagonal of the matrix to factorise
  // before the damping is added, in the original order.
  std::vector<float> diagonal;
  // Mean of `diagonal`, summed in double in index order: damping = damp_percent · this.
  double mean_diagonal = 0;
};

// The layout for a Hessian whose diagonal is `diagonal` (finite values). INVALID_ARGUMENT
// "Hessian is empty" for no entries, "Hessian is too large" for more than INT32_MAX, and
// "Hessian diagonal entry i is negative (v)" for the first negative entry.
StatusOr<HessianLayout> MakeHessianLayout(std::vector<float> diagonal, bool act_order);

// The damping that made the factorisation work, and how many attempts it took (1 when the
// first damping worked).
struct DampingOutcome {
  double damp_percent_used = 0;
  int cholesky_attempts = 0;
};

// Damping with automatic increase: calls attempt(static_cast<float>(damp · mean_diagonal)) for
// damp = damp_percent, then damp_percent + k · damp_auto_increment for k = 1, 2, ... while
// damp_auto_increment > 0 and that stays within max_damp_percent (up to a relative 1e-9 and an
// absolute 1e-12), until an attempt succeeds. `attempt` factorises the matrix with its argument
// added to the diagonal and returns OK when the factor is usable, FAILED_PRECONDITION with the
// reason when this damping is not enough, or another error when the backend failed. Returns
// the outcome of the first success; another error of an attempt at once; FAILED_PRECONDITION
// "Hessian is not positive definite even with damp_percent=<last> after <k> attempt(s)
// (max_damp_percent=<max>): <last reason>" when no damping worked. Options must be valid
// (ValidateHessianOptions).
StatusOr<DampingOutcome> FactorWithDamping(const HessianOptions& options, double mean_diagonal,
                                           const std::function<Status(float)>& attempt);

// Running mean of 2 x xᵀ over samples, as the GPTQ reference accumulates it:
// H *= n/(n+b); n += b; x = sqrt(2/n)·X; H += x xᵀ.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t in_features);
  // x: [batch, in_features] row-major activations.
  Status Add(const float* x, int64_t batch);
  int64_t num_samples() const { return n_; }
  const MatrixD& hessian() const { return h_; }
  Matrix HessianF32() const;

 private:
  int64_t in_features_;
  int64_t n_ = 0;
  MatrixD h_;
};

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_HESSIAN_H_

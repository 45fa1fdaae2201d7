// Hessian preparation shared by the GPTQ and VPTQ solvers (and their CUDA backends), and
// the running-mean accumulation H = 2/n Σ x xᵀ used to build Hessians from activations.
// Thread-safety: pure functions; HessianAccumulator is not thread-safe.
#ifndef QFORGE_QUANT_HESSIAN_H_
#define QFORGE_QUANT_HESSIAN_H_

#include <cstdint>
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
// inverse, upper Cholesky factor of the inverse, as the GPTQ reference does.
// INVALID_ARGUMENT if h is not square, not finite or has a negative diagonal entry;
// FAILED_PRECONDITION naming the last damping tried when no damping up to
// max_damp_percent makes it positive definite.
StatusOr<PreparedHessian> PrepareHessian(const Matrix& h, const HessianOptions& options);

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

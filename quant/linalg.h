// Dense linear algebra for the CPU solvers: GEMM, Cholesky, triangular inverse, and a
// thread pool-free ParallelFor. Uses OpenBLAS/LAPACKE when built with QFORGE_HAVE_BLAS,
// otherwise portable blocked, multi-threaded C++ of the same contracts (so the core builds
// with only a C++ compiler). All matrices are row-major with explicit leading dimensions.
// Thread-safety: functions are reentrant; they may use several threads internally.
#ifndef QFORGE_QUANT_LINALG_H_
#define QFORGE_QUANT_LINALG_H_

#include <cstdint>
#include <functional>

#include "base/matrix.h"
#include "base/status.h"

namespace qforge::quant {

// C[m, n] = alpha * op(A) * op(B) + beta * C, where op(A) is [m, k] (A is [k, m] when
// trans_a) and op(B) is [k, n] (B is [n, k] when trans_b). Row-major, leading dimensions in
// elements. beta == 0 overwrites C without reading it.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

// In place: a [n, n] symmetric positive definite (lower triangle read) becomes its lower
// Cholesky factor L (A = L Lᵀ); the strict upper triangle is set to zero.
// FAILED_PRECONDITION "matrix is not positive definite (pivot k)" when it is not; `a` is
// then unspecified.
Status CholeskyLower(float* a, int64_t n);
Status CholeskyLowerD(double* a, int64_t n);

// In place: given the lower Cholesky factor L of A (as CholeskyLower leaves it), writes
// the full symmetric A⁻¹ = L⁻ᵀ L⁻¹ into `a`.
Status CholeskyInverse(float* a, int64_t n);
Status CholeskyInverseD(double* a, int64_t n);

// In place: a [n, n] symmetric positive definite becomes its upper Cholesky factor U
// (A = Uᵀ U); the strict lower triangle is set to zero. Errors as CholeskyLower.
Status CholeskyUpper(float* a, int64_t n);
Status CholeskyUpperD(double* a, int64_t n);

// Runs fn(begin, end) over [0, n) split into contiguous chunks of at least `grain`
// iterations on up to NumThreads() threads; returns when all chunks are done.
void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Worker threads the CPU solvers use: QFORGE_NUM_THREADS if set, else hardware concurrency.
int NumThreads();

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_LINALG_H_

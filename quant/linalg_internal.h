// Internal linear-algebra entry points of the CPU solvers (worker/quant), beyond the public
// contracts of linalg.h: double-precision GEMM/SYRK, triangular inverse, and a switch that
// forces the portable kernels so tests can exercise both the BLAS and the fallback path in
// one binary. Not part of the core's public API: only quant/*.cc and tests use it.
// Thread-safety: as linalg.h; SetForcePortableLinalg is a process-wide switch (atomic).
#ifndef QFORGE_QUANT_LINALG_INTERNAL_H_
#define QFORGE_QUANT_LINALG_INTERNAL_H_

#include <cstdint>
#include <functional>

#include "base/status.h"

namespace qforge::quant::internal {

// true: every linalg call uses the portable C++ kernels even when BLAS is compiled in.
// For tests and for diagnosing a misbehaving BLAS; the default is false.
void SetForcePortableLinalg(bool force);
// Whether a linalg call made on this thread right now would use BLAS/LAPACKE: BLAS is
// compiled in, not forced off, and the caller is not inside a ParallelFor body (bodies use
// the single-threaded portable kernels so BLAS threads never multiply ParallelFor's).
bool BlasActiveHere();

// Gemm of linalg.h in double precision (same contract).
void GemmD(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
           const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
           int64_t ldc);

// Lower triangle of C [n, n] = alpha * op(A) * op(A)ᵀ + beta * C, where op(A) is [n, k]
// (A is [k, n] when trans, i.e. C = alpha AᵀA + beta C). The strict upper triangle of C is
// not written. beta == 0 overwrites the lower triangle without reading it.
void SyrkLower(bool trans, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               float beta, float* c, int64_t ldc);
void SyrkLowerD(bool trans, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                double beta, double* c, int64_t ldc);

// In place: a [n, n] lower triangular with a non-zero diagonal (strict upper triangle
// ignored) becomes L⁻¹ (lower triangular; the strict upper triangle is set to zero).
// FAILED_PRECONDITION "triangular matrix is singular (diagonal k)" on a zero diagonal.
Status TriangularInverseLower(float* a, int64_t n);
Status TriangularInverseLowerD(double* a, int64_t n);

// Copies the strict lower triangle of a [n, n] onto the strict upper triangle.
void MirrorLowerToUpper(float* a, int64_t n);
void MirrorLowerToUpperD(double* a, int64_t n);

// tr(X H Xᵀ) in double for X [rows, in] and H [in, in] (float, row-major; only (H+Hᵀ)/2
// matters). fill(r0, r1, dst) writes rows [r0, r1) of X in double into dst ([r1-r0, in]),
// so X never has to exist whole. G = XᵀX is accumulated in double over row slices (dsyrk)
// and contracted with H; when in² doubles exceed max_panel_bytes, G is built in column
// panels (X is then produced once per panel).
double TraceXHXt(int64_t rows, int64_t in, const float* h,
                 const std::function<void(int64_t, int64_t, double*)>& fill,
                 int64_t max_panel_bytes);

}  // namespace qforge::quant::internal

#endif  // QFORGE_QUANT_LINALG_INTERNAL_H_

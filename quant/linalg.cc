// Dense linear algebra of the CPU solvers: OpenBLAS/LAPACKE when compiled with
// QFORGE_HAVE_BLAS, otherwise (or when forced, or inside a ParallelFor body) portable
// blocked C++ kernels. See linalg.h and linalg_internal.h for the contracts.
//
// Threading. ParallelFor starts its own std::threads per call (no pool): the callers in the
// solvers make few, large calls. A ParallelFor body runs with a thread-local "inside a
// parallel region" mark; linalg calls made there (and nested ParallelFor calls) run
// single-threaded on the portable kernels, so OpenBLAS's threads never multiply ours.
// OpenBLAS's own thread count is set once to NumThreads() so QFORGE_NUM_THREADS governs both.
//
// Portable GEMM: Goto-style packing of A (panels of kMR rows) and B (panels of kNR columns)
// per kKC-deep slice, a register-blocked kMR x kNR micro-kernel written with GNU vector
// extensions (compiled twice on x86-64: AVX2/FMA and baseline, chosen at load time), and
// ParallelFor over kMC x kNC tiles of C. Each element of C is accumulated by one thread in a
// fixed order, so results do not depend on the thread count.
#include "quant/linalg.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "quant/linalg_internal.h"
#include "quant/multiversion.h"

#if defined(__linux__)
#include <sched.h>
#endif

#ifdef QFORGE_HAVE_BLAS
#include <cblas.h>
#include <lapacke.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define QF_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define QF_ALWAYS_INLINE inline
#endif

namespace qforge::quant {
namespace {

std::atomic<bool> g_force_portable{false};
thread_local int t_parallel_depth = 0;

int DetectThreads() {
  if (const char* env = std::getenv("QFORGE_NUM_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1) return static_cast<int>(std::min<long>(v, 1024));
  }
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int c = CPU_COUNT(&set);
    if (c > 0) return c;
  }
#endif
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

#ifdef QFORGE_HAVE_BLAS
void ConfigureBlasThreadsOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
#ifdef OPENBLAS_VERSION
    openblas_set_num_threads(NumThreads());
#endif
  });
}

bool FitsBlasInt(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v < 0 || v > INT_MAX) return false;
  }
  return true;
}

// Whether this call should go to BLAS (and, if so, BLAS's thread count is configured).
bool UseBlas() {
  if (g_force_portable.load(std::memory_order_relaxed) || t_parallel_depth > 0) return false;
  ConfigureBlasThreadsOnce();
  return true;
}
#endif  // QFORGE_HAVE_BLAS

// ---- Portable GEMM ------------------------------------------------------------------------

template <typename T>
struct KernelShape;
template <>
struct KernelShape<float> {
  static constexpr int kMR = 6;
  static constexpr int kNR = 16;
};
template <>
struct KernelShape<double> {
  static constexpr int kMR = 6;
  static constexpr int kNR = 8;
};
constexpr int64_t kKC = 256;  // depth of one packed slice
constexpr int64_t kMC = 96;   // rows of C per tile (multiple of kMR)
constexpr int64_t kNC = 512;  // columns of C per tile (multiple of kNR)

// out[MR][NR] = Σ_p ap[p][0..MR) ⊗ bp[p][0..NR)
template <typename T>
QF_ALWAYS_INLINE void MicroKernel(int64_t kc, const T* __restrict ap, const T* __restrict bp,
                                  T* __restrict out) {
  constexpr int MR = KernelShape<T>::kMR;
  constexpr int NR = KernelShape<T>::kNR;
#if QF_VECTOR_EXT
  typedef T V __attribute__((vector_size(32)));
  constexpr int VL = static_cast<int>(32 / sizeof(T));
  constexpr int NV = NR / VL;
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  }
  for (int64_t p = 0; p < kc; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], bp + p * NR + v * VL, sizeof(V));
    for (int r = 0; r < MR; ++r) {
      const T a = ap[p * MR + r];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  std::memcpy(out, acc, sizeof(acc));
#else
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    for (int r = 0; r < MR; ++r) {
      const T a = ap[p * MR + r];
      for (int j = 0; j < NR; ++j) acc[r][j] += a * bp[p * NR + j];
    }
  }
  std::memcpy(out, acc, sizeof(acc));
#endif
}

// C[i0:i1, j0:j1] += alpha * Apacked · Bpacked for one kc slice. i0 is a multiple of kMR and
// j0 of kNR; lower_only stores only elements with column <= row.
template <typename T>
QF_ALWAYS_INLINE void ComputeTileImpl(const T* ap, const T* bp, int64_t kc, int64_t i0, int64_t i1,
                                      int64_t j0, int64_t j1, T alpha, T* c, int64_t ldc,
                                      bool lower_only) {
  constexpr int MR = KernelShape<T>::kMR;
  constexpr int NR = KernelShape<T>::kNR;
  alignas(64) T tile[MR * NR];
  for (int64_t jp = j0; jp < j1; jp += NR) {
    const T* b = bp + (jp / NR) * kc * NR;
    const int64_t nr = std::min<int64_t>(NR, j1 - jp);
    for (int64_t ip = i0; ip < i1; ip += MR) {
      const int64_t mr = std::min<int64_t>(MR, i1 - ip);
      if (lower_only && jp > ip + mr - 1) continue;  // micro-tile strictly above the diagonal
      MicroKernel<T>(kc, ap + (ip / MR) * kc * MR, b, tile);
      for (int64_t r = 0; r < mr; ++r) {
        T* crow = c + (ip + r) * ldc + jp;
        int64_t jmax = nr;
        if (lower_only) jmax = std::min<int64_t>(nr, ip + r - jp + 1);
        const T* t = tile + r * NR;
        for (int64_t j = 0; j < jmax; ++j) crow[j] += alpha * t[j];
      }
    }
  }
}

QF_MULTIVERSION void ComputeTileF(const float* ap, const float* bp, int64_t kc, int64_t i0,
                                  int64_t i1, int64_t j0, int64_t j1, float alpha, float* c,
                                  int64_t ldc, bool lower_only) {
  ComputeTileImpl<float>(ap, bp, kc, i0, i1, j0, j1, alpha, c, ldc, lower_only);
}
QF_MULTIVERSION void ComputeTileD(const double* ap, const double* bp, int64_t kc, int64_t i0,
                                  int64_t i1, int64_t j0, int64_t j1, double alpha, double* c,
                                  int64_t ldc, bool lower_only) {
  ComputeTileImpl<double>(ap, bp, kc, i0, i1, j0, j1, alpha, c, ldc, lower_only);
}
inline void ComputeTile(const float* ap, const float* bp, int64_t kc, int64_t i0, int64_t i1,
                        int64_t j0, int64_t j1, float alpha, float* c, int64_t ldc,
                        bool lower_only) {
  ComputeTileF(ap, bp, kc, i0, i1, j0, j1, alpha, c, ldc, lower_only);
}
inline void ComputeTile(const double* ap, const double* bp, int64_t kc, int64_t i0, int64_t i1,
                        int64_t j0, int64_t j1, double alpha, double* c, int64_t ldc,
                        bool lower_only) {
  ComputeTileD(ap, bp, kc, i0, i1, j0, j1, alpha, c, ldc, lower_only);
}

// C[m, n] = alpha op(A) op(B) + beta C; lower_only restricts reads/writes of C to column <= row.
template <typename T>
void GemmPortable(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                  int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc,
                  bool lower_only) {
  constexpr int MR = KernelShape<T>::kMR;
  constexpr int NR = KernelShape<T>::kNR;
  if (m <= 0 || n <= 0) return;
  if (beta != T(1)) {
    ParallelFor(m, std::max<int64_t>(1, 16384 / n), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        T* row = c + i * ldc;
        const int64_t jn = lower_only ? std::min<int64_t>(n, i + 1) : n;
        if (beta == T(0)) {
          std::fill(row, row + jn, T(0));
        } else {
          for (int64_t j = 0; j < jn; ++j) row[j] *= beta;
        }
      }
    });
  }
  if (k <= 0 || alpha == T(0)) return;
  const int64_t m_panels = (m + MR - 1) / MR;
  const int64_t n_panels = (n + NR - 1) / NR;
  const int64_t kc_max = std::min(k, kKC);
  std::vector<T> apack(static_cast<size_t>(m_panels * MR * kc_max));
  std::vector<T> bpack(static_cast<size_t>(n_panels * NR * kc_max));
  const int64_t tiles_m = (m + kMC - 1) / kMC;
  const int64_t tiles_n = (n + kNC - 1) / kNC;
  for (int64_t p0 = 0; p0 < k; p0 += kKC) {
    const int64_t kc = std::min(kKC, k - p0);
    ParallelFor(m_panels, 8, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        T* dst = apack.data() + q * kc * MR;
        for (int r = 0; r < MR; ++r) {
          const int64_t i = q * MR + r;
          if (i >= m) {
            for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = T(0);
          } else if (ta) {
            for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = a[(p0 + p) * lda + i];
          } else {
            const T* src = a + i * lda + p0;
            for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = src[p];
          }
        }
      }
    });
    ParallelFor(n_panels, 8, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        T* dst = bpack.data() + q * kc * NR;
        const int64_t j0 = q * NR;
        const int64_t nr = std::min<int64_t>(NR, n - j0);
        if (tb) {
          for (int64_t jj = 0; jj < NR; ++jj) {
            if (jj >= nr) {
              for (int64_t p = 0; p < kc; ++p) dst[p * NR + jj] = T(0);
              continue;
            }
            const T* src = b + (j0 + jj) * ldb + p0;
            for (int64_t p = 0; p < kc; ++p) dst[p * NR + jj] = src[p];
          }
        } else {
          for (int64_t p = 0; p < kc; ++p) {
            const T* src = b + (p0 + p) * ldb + j0;
            T* d = dst + p * NR;
            for (int64_t jj = 0; jj < nr; ++jj) d[jj] = src[jj];
            for (int64_t jj = nr; jj < NR; ++jj) d[jj] = T(0);
          }
        }
      }
    });
    ParallelFor(tiles_m * tiles_n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = (t / tiles_n) * kMC;
        const int64_t j0 = (t % tiles_n) * kNC;
        const int64_t i1 = std::min(m, i0 + kMC);
        const int64_t j1 = std::min(n, j0 + kNC);
        if (lower_only && j0 > i1 - 1) continue;
        ComputeTile(apack.data(), bpack.data(), kc, i0, i1, j0, j1, alpha, c, ldc, lower_only);
      }
    });
  }
}

// ---- Portable factorizations (row-major) ---------------------------------------------------

template <typename T>
T Dot(const T* x, const T* y, int64_t n) {
  T acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += x[i + l] * y[i + l];
  }
  T s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

template <typename T>
Status NotPositiveDefinite(int64_t pivot) {
  return FailedPreconditionError("matrix is not positive definite (pivot " + std::to_string(pivot) +
                                 ")");
}

// Right-looking blocked Cholesky, lower triangle read and written; strict upper zeroed.
template <typename T>
Status CholeskyLowerPortable(T* a, int64_t n) {
  constexpr int64_t kNB = 96;
  for (int64_t j0 = 0; j0 < n; j0 += kNB) {
    const int64_t jb = std::min(kNB, n - j0);
    // Diagonal block (earlier blocks were already subtracted by the trailing updates).
    for (int64_t j = j0; j < j0 + jb; ++j) {
      T* rj = a + j * n;
      const T d = rj[j] - Dot(rj + j0, rj + j0, j - j0);
      if (!(d > T(0)) || !std::isfinite(d)) return NotPositiveDefinite<T>(j);
      const T l = std::sqrt(d);
      rj[j] = l;
      for (int64_t i = j + 1; i < j0 + jb; ++i) {
        T* ri = a + i * n;
        ri[j] = (ri[j] - Dot(ri + j0, rj + j0, j - j0)) / l;
      }
    }
    const int64_t rest = n - (j0 + jb);
    if (rest <= 0) break;
    // Panel: L21 = A21 L11⁻ᵀ, one forward substitution per row.
    ParallelFor(rest, 32, [&](int64_t r0, int64_t r1) {
      for (int64_t i = j0 + jb + r0; i < j0 + jb + r1; ++i) {
        T* ri = a + i * n;
        for (int64_t j = j0; j < j0 + jb; ++j) {
          const T* rj = a + j * n;
          ri[j] = (ri[j] - Dot(ri + j0, rj + j0, j - j0)) / rj[j];
        }
      }
    });
    // Trailing: A22 -= L21 L21ᵀ (lower triangle only).
    T* l21 = a + (j0 + jb) * n + j0;
    GemmPortable<T>(false, true, rest, rest, jb, T(-1), l21, n, l21, n, T(1),
                    a + (j0 + jb) * n + (j0 + jb), n, /*lower_only=*/true);
  }
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * n + i + 1, a + (i + 1) * n, T(0));
  return OkStatus();
}

// In place inverse of the lower triangular block a [n, n] (leading dimension lda) whose strict
// upper triangle is zero. Recursive: [L11 0; L21 L22]⁻¹ = [X11 0; -X22 L21 X11  X22].
template <typename T>
Status TriInvLowerRec(T* a, int64_t n, int64_t lda, int64_t offset) {
  if (n <= 48) {
    for (int64_t j = 0; j < n; ++j) {
      if (a[j * lda + j] == T(0) || !std::isfinite(a[j * lda + j])) {
        return FailedPreconditionError("triangular matrix is singular (diagonal " +
                                       std::to_string(offset + j) + ")");
      }
    }
    // Column by column: X[j][j] = 1/L[j][j]; X[i][j] = -(Σ_{k=j}^{i-1} L[i][k] X[k][j]) / L[i][i].
    std::vector<T> x(static_cast<size_t>(n * n), T(0));
    for (int64_t j = 0; j < n; ++j) {
      x[j * n + j] = T(1) / a[j * lda + j];
      for (int64_t i = j + 1; i < n; ++i) {
        T s = 0;
        for (int64_t k = j; k < i; ++k) s += a[i * lda + k] * x[k * n + j];
        x[i * n + j] = -s / a[i * lda + i];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j <= i; ++j) a[i * lda + j] = x[i * n + j];
    }
    return OkStatus();
  }
  const int64_t n1 = (n / 2 + 15) / 16 * 16;
  const int64_t n2 = n - n1;
  T* a11 = a;
  T* a21 = a + n1 * lda;
  T* a22 = a + n1 * lda + n1;
  QF_RETURN_IF_ERROR(TriInvLowerRec(a11, n1, lda, offset));
  QF_RETURN_IF_ERROR(TriInvLowerRec(a22, n2, lda, offset + n1));
  std::vector<T> tmp(static_cast<size_t>(n2 * n1));
  GemmPortable<T>(false, false, n2, n1, n1, T(1), a21, lda, a11, lda, T(0), tmp.data(), n1, false);
  GemmPortable<T>(false, false, n2, n1, n2, T(-1), a22, lda, tmp.data(), n1, T(0), a21, lda, false);
  return OkStatus();
}

template <typename T>
void MirrorLower(T* a, int64_t n) {
  // Blocked transpose-copy of the strict lower triangle onto the upper one.
  constexpr int64_t kB = 64;
  ParallelFor((n + kB - 1) / kB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t i0 = bi * kB, i1 = std::min(n, i0 + kB);
      for (int64_t j0 = 0; j0 < i1; j0 += kB) {
        const int64_t j1 = std::min(n, j0 + kB);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = j0; j < std::min(j1, i); ++j) a[j * n + i] = a[i * n + j];
        }
      }
    }
  });
}

template <typename T>
void ZeroStrictUpper(T* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * n + i + 1, a + (i + 1) * n, T(0));
}
template <typename T>
void ZeroStrictLower(T* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * n, a + i * n + i, T(0));
}

// Transposes the lower triangle onto the upper one and zeroes the lower: L -> Lᵀ.
template <typename T>
void TransposeLowerToUpper(T* a, int64_t n) {
  MirrorLower(a, n);
  ZeroStrictLower(a, n);
}
// Copies the strict upper triangle onto the strict lower one.
template <typename T>
void MirrorUpper(T* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) a[i * n + j] = a[j * n + i];
  }
}

Status CheckSquareArgs(const void* a, int64_t n) {
  if (n < 0) return InvalidArgumentError("matrix size must be >= 0, got " + std::to_string(n));
  if (n > 0 && a == nullptr) return InvalidArgumentError("matrix pointer is null");
  return OkStatus();
}

// ---- BLAS/LAPACKE wrappers. Row-major data is handed to LAPACK as column-major: the
// row-major lower triangle is the column-major upper one.

#ifdef QFORGE_HAVE_BLAS
Status LapackInfo(int info, const char* what) {
  if (info == 0) return OkStatus();
  if (info > 0) return NotPositiveDefinite<float>(info - 1);
  // LAPACKE's NaN check reports the matrix argument (-4) as illegal.
  if (info == -4) {
    return FailedPreconditionError(std::string("matrix is not positive definite (") + what +
                                   ": non-finite entries)");
  }
  return InternalError(std::string(what) + " failed with info " + std::to_string(info));
}

Status BlasCholeskyLower(float* a, int64_t n) {
  return LapackInfo(
      LAPACKE_spotrf(LAPACK_COL_MAJOR, 'U', static_cast<int>(n), a, static_cast<int>(n)), "spotrf");
}
Status BlasCholeskyLower(double* a, int64_t n) {
  return LapackInfo(
      LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', static_cast<int>(n), a, static_cast<int>(n)), "dpotrf");
}
Status BlasCholeskyUpper(float* a, int64_t n) {
  return LapackInfo(
      LAPACKE_spotrf(LAPACK_COL_MAJOR, 'L', static_cast<int>(n), a, static_cast<int>(n)), "spotrf");
}
Status BlasCholeskyUpper(double* a, int64_t n) {
  return LapackInfo(
      LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', static_cast<int>(n), a, static_cast<int>(n)), "dpotrf");
}
Status BlasCholeskyInverse(float* a, int64_t n) {
  return LapackInfo(
      LAPACKE_spotri(LAPACK_COL_MAJOR, 'U', static_cast<int>(n), a, static_cast<int>(n)), "spotri");
}
Status BlasCholeskyInverse(double* a, int64_t n) {
  return LapackInfo(
      LAPACKE_dpotri(LAPACK_COL_MAJOR, 'U', static_cast<int>(n), a, static_cast<int>(n)), "dpotri");
}
int BlasTriInv(float* a, int64_t n) {
  return LAPACKE_strtri(LAPACK_COL_MAJOR, 'U', 'N', static_cast<int>(n), a, static_cast<int>(n));
}
int BlasTriInv(double* a, int64_t n) {
  return LAPACKE_dtrtri(LAPACK_COL_MAJOR, 'U', 'N', static_cast<int>(n), a, static_cast<int>(n));
}
#endif

template <typename T>
Status CholeskyLowerT(T* a, int64_t n) {
  QF_RETURN_IF_ERROR(CheckSquareArgs(a, n));
  if (n == 0) return OkStatus();
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && n <= INT_MAX) {
    QF_RETURN_IF_ERROR(BlasCholeskyLower(a, n));
    ZeroStrictUpper(a, n);
    return OkStatus();
  }
#endif
  return CholeskyLowerPortable(a, n);
}

template <typename T>
Status CholeskyUpperT(T* a, int64_t n) {
  QF_RETURN_IF_ERROR(CheckSquareArgs(a, n));
  if (n == 0) return OkStatus();
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && n <= INT_MAX) {
    QF_RETURN_IF_ERROR(BlasCholeskyUpper(a, n));
    ZeroStrictLower(a, n);
    return OkStatus();
  }
#endif
  MirrorUpper(a, n);  // the upper triangle is the input
  QF_RETURN_IF_ERROR(CholeskyLowerPortable(a, n));
  TransposeLowerToUpper(a, n);
  return OkStatus();
}

template <typename T>
Status TriangularInverseLowerT(T* a, int64_t n) {
  QF_RETURN_IF_ERROR(CheckSquareArgs(a, n));
  if (n == 0) return OkStatus();
  ZeroStrictUpper(a, n);
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && n <= INT_MAX) {
    const int info = BlasTriInv(a, n);
    if (info > 0) {
      return FailedPreconditionError("triangular matrix is singular (diagonal " +
                                     std::to_string(info - 1) + ")");
    }
    // LAPACKE's NaN check reports the matrix argument (-5) as illegal.
    if (info == -5) return FailedPreconditionError("triangular matrix has non-finite entries");
    if (info < 0) return InternalError("trtri failed with info " + std::to_string(info));
    return OkStatus();
  }
#endif
  return TriInvLowerRec(a, n, n, 0);
}

template <typename T>
Status CholeskyInverseT(T* a, int64_t n) {
  QF_RETURN_IF_ERROR(CheckSquareArgs(a, n));
  if (n == 0) return OkStatus();
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && n <= INT_MAX) {
    QF_RETURN_IF_ERROR(BlasCholeskyInverse(a, n));
    MirrorLower(a, n);
    return OkStatus();
  }
#endif
  std::vector<T> x(a, a + n * n);
  ZeroStrictUpper(x.data(), n);
  QF_RETURN_IF_ERROR(TriInvLowerRec(x.data(), n, n, 0));
  // A⁻¹ = L⁻ᵀ L⁻¹ = Xᵀ X, lower triangle, then mirrored.
  GemmPortable<T>(true, false, n, n, n, T(1), x.data(), n, x.data(), n, T(0), a, n, true);
  MirrorLower(a, n);
  return OkStatus();
}

}  // namespace

int NumThreads() {
  static const int n = DetectThreads();
  return n;
}

void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int threads =
      t_parallel_depth > 0 ? 1 : static_cast<int>(std::min<int64_t>(NumThreads(), max_chunks));
  if (threads <= 1) {
    fn(0, n);
    return;
  }
  // About four chunks per thread for balance, each at least `grain` long.
  const int64_t chunk = std::max(grain, (n + 4 * threads - 1) / (4 * threads));
  const int64_t num_chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  std::mutex error_mu;
  std::exception_ptr error;
  auto work = [&] {
    ++t_parallel_depth;
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) break;
      try {
        fn(c * chunk, std::min(n, (c + 1) * chunk));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!error) error = std::current_exception();
        next.store(num_chunks, std::memory_order_relaxed);
      }
    }
    --t_parallel_depth;
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // could not start a thread: the remaining chunks run on the others
    }
  }
  work();
  for (std::thread& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && FitsBlasInt({m, n, k, lda, ldb, ldc})) {
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb),
                beta, c, static_cast<int>(ldc));
    return;
  }
#endif
  GemmPortable<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, false);
}

Status CholeskyLower(float* a, int64_t n) { return CholeskyLowerT(a, n); }
Status CholeskyLowerD(double* a, int64_t n) { return CholeskyLowerT(a, n); }
Status CholeskyUpper(float* a, int64_t n) { return CholeskyUpperT(a, n); }
Status CholeskyUpperD(double* a, int64_t n) { return CholeskyUpperT(a, n); }
Status CholeskyInverse(float* a, int64_t n) { return CholeskyInverseT(a, n); }
Status CholeskyInverseD(double* a, int64_t n) { return CholeskyInverseT(a, n); }

namespace internal {

void SetForcePortableLinalg(bool force) {
  g_force_portable.store(force, std::memory_order_relaxed);
}

bool BlasActiveHere() {
#ifdef QFORGE_HAVE_BLAS
  return !g_force_portable.load(std::memory_order_relaxed) && t_parallel_depth == 0;
#else
  return false;
#endif
}

void GemmD(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
           const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c,
           int64_t ldc) {
  if (m <= 0 || n <= 0) return;
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && FitsBlasInt({m, n, k, lda, ldb, ldc})) {
    cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb),
                beta, c, static_cast<int>(ldc));
    return;
  }
#endif
  GemmPortable<double>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, false);
}

void SyrkLower(bool trans, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               float beta, float* c, int64_t ldc) {
  if (n <= 0) return;
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && FitsBlasInt({n, k, lda, ldc})) {
    cblas_ssyrk(CblasRowMajor, CblasLower, trans ? CblasTrans : CblasNoTrans, static_cast<int>(n),
                static_cast<int>(k), alpha, a, static_cast<int>(lda), beta, c,
                static_cast<int>(ldc));
    return;
  }
#endif
  GemmPortable<float>(trans, !trans, n, n, k, alpha, a, lda, a, lda, beta, c, ldc, true);
}

void SyrkLowerD(bool trans, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                double beta, double* c, int64_t ldc) {
  if (n <= 0) return;
#ifdef QFORGE_HAVE_BLAS
  if (UseBlas() && FitsBlasInt({n, k, lda, ldc})) {
    cblas_dsyrk(CblasRowMajor, CblasLower, trans ? CblasTrans : CblasNoTrans, static_cast<int>(n),
                static_cast<int>(k), alpha, a, static_cast<int>(lda), beta, c,
                static_cast<int>(ldc));
    return;
  }
#endif
  GemmPortable<double>(trans, !trans, n, n, k, alpha, a, lda, a, lda, beta, c, ldc, true);
}

Status TriangularInverseLower(float* a, int64_t n) { return TriangularInverseLowerT(a, n); }
Status TriangularInverseLowerD(double* a, int64_t n) { return TriangularInverseLowerT(a, n); }

void MirrorLowerToUpper(float* a, int64_t n) { MirrorLower(a, n); }
void MirrorLowerToUpperD(double* a, int64_t n) { MirrorLower(a, n); }

double TraceXHXt(int64_t rows, int64_t in, const float* h,
                 const std::function<void(int64_t, int64_t, double*)>& fill,
                 int64_t max_panel_bytes) {
  if (rows <= 0 || in <= 0) return 0.0;
  // Row slices of up to 64 MB of doubles: few rank-k updates of G (each pass reads and
  // writes all of G), bounded memory.
  const int64_t kSlice = std::max<int64_t>(64, (int64_t{64} << 20) / (8 * in));
  int64_t panel = in;
  if (in * in * 8 > max_panel_bytes) panel = std::max<int64_t>(16, max_panel_bytes / (in * 8));
  std::vector<double> xs(static_cast<size_t>(std::min(rows, kSlice) * in));
  const bool whole = panel >= in;
  std::vector<double> g;
  double total = 0;
  for (int64_t j0 = 0; j0 < in; j0 += panel) {
    const int64_t j1 = std::min(in, j0 + panel), pw = j1 - j0, m = in - j0;
    // g: rows i in [j0, in), columns j in [j0, j1): G[i][j] (lower part used).
    g.assign(static_cast<size_t>(whole ? in * in : m * pw), 0.0);
    for (int64_t r0 = 0; r0 < rows; r0 += kSlice) {
      const int64_t b = std::min(kSlice, rows - r0);
      fill(r0, r0 + b, xs.data());
      if (whole) {
        SyrkLowerD(/*trans=*/true, in, b, 1.0, xs.data(), in, 1.0, g.data(), in);
      } else {
        GemmD(/*trans_a=*/true, false, m, pw, b, 1.0, xs.data() + j0, in, xs.data() + j0, in, 1.0,
              g.data(), pw);
      }
    }
    std::vector<double> partial(static_cast<size_t>(m), 0.0);
    if (whole) {
      // Σ over j <= i of (H_ij + H_ji) G_ij (the diagonal once), in 64 x 64 tiles so that
      // H's transposed tile is read from cache; one partial sum per tile row.
      constexpr int64_t kT = 64;
      const int64_t tiles = (in + kT - 1) / kT;
      partial.assign(static_cast<size_t>(tiles), 0.0);
      ParallelFor(tiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t ti = t0; ti < t1; ++ti) {
          const int64_t i0 = ti * kT, i1 = std::min(in, i0 + kT);
          double sum = 0;
          for (int64_t c0 = 0; c0 <= i0; c0 += kT) {
            const int64_t c1 = std::min(in, c0 + kT);
            for (int64_t i = i0; i < i1; ++i) {
              const double* grow = g.data() + i * in;
              const float* hrow = h + i * in;
              const int64_t cend = std::min(c1, i);
              for (int64_t c = c0; c < cend; ++c) {
                sum += grow[c] * (static_cast<double>(hrow[c]) + h[c * in + i]);
              }
              if (i >= c0 && i < c1) sum += grow[i] * static_cast<double>(hrow[i]);
            }
          }
          partial[ti] = sum;
        }
      });
    } else {
      // Panel [j0, j1): Σ over i >= j of (H_ij + H_ji) G_ij, the diagonal once.
      ParallelFor(m, 64, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          const int64_t i = j0 + a;
          const double* grow = g.data() + a * pw;
          const float* hrow = h + i * in;
          double s = 0;
          const int64_t jend = std::min(j1, i + 1);
          for (int64_t j = j0; j < jend; ++j) {
            const double hij = j == i ? static_cast<double>(hrow[i])
                                      : static_cast<double>(hrow[j]) + h[j * in + i];
            s += hij * grow[j - j0];
          }
          partial[a] = s;
        }
      });
    }
    for (double s : partial) total += s;
  }
  return total;
}

}  // namespace internal
}  // namespace qforge::quant

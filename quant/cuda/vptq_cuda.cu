// The CUDA VPTQ solver (NewCudaVptqSolver of backends.h): the algorithm of vptq.h, written
// after the CPU solver (vptq.cc) step for step, with the heavy steps on the device:
//
//   host: the pieces shared with the CPU solver (vptq_layout.h: input checks, geometry,
//         result header, dead columns, scale/bias rounding, diag of the normalised Hessian,
//         k-means weights and settings), the Hessian preparation's host steps (hessian.h:
//         MakeHessianLayout, FactorWithDamping around the device attempts), k-means++ init
//         (KMeansInitialCentroids, see vptq_kernels.cuh), DequantizeVptqResult.
//   device: column min/max, normalisation + permutation + transposition, the damped
//         J·P·sym(H)·Pᵀ·J (cuSOLVER potrf, cuBLAS trsm for the inverse factor, U = J R⁻¹ J),
//         Lloyd iterations, the column sweep (per column: nearest-centroid search, then one
//         kernel that forms q, the error, the codes and the in-block feedback; per block of
//         block_size columns: the lazy update W[j:] −= U[i:j, j:]ᵀ·E as one SGEMM), the
//         losses tr(ΔW H ΔWᵀ) in float64 (DGEMM over row tiles).
//
// The working copy of W is kept transposed and permuted, [in, Mpad] (row p = permuted column
// p), so the vectors of a column are one contiguous [rows, v] matrix for the search.
// Numerics: the GEMMs use the context's cuBLAS math mode (float32 unless the context allows
// TF32); the search and the k-means sums follow the CPU code's rounding where it is cheap.
// Progress: the CPU solver's stages and weights (VptqProgress of vptq_layout.h). The k-means
// reports after each Lloyd step, when the host has read the step's inertia back; a pass
// reports each lazy block once the device has finished it (DeviceProgress: the next block is
// enqueued first, so the device is not left idle). A cancellation returns at once; the
// stream-ordered frees of the buffers follow the work already enqueued.
#include <cstddef>  // before matrix.h (via the headers below), which uses ::size_t

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "quant/cuda/backends.h"
#include "quant/cuda/gpu_context.cuh"
#include "quant/cuda/vptq_kernels.cuh"
#include "quant/hessian.h"
#include "quant/vptq.h"
#include "quant/vptq_layout.h"

namespace qforge::quant {
namespace cuda_vptq {
namespace {

using Clock = std::chrono::steady_clock;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kThreads = 256;
constexpr int kReductionBlocks = 1024;          // most blocks of the metric reductions
constexpr int64_t kMetricTileElements = int64_t{1} << 24;  // rows·in per float64 tile

int Blocks(int64_t count, int threads = kThreads) {
  return static_cast<int>(std::max<int64_t>(1, CeilDiv(count, threads)));
}

// Grid-stride launches: enough blocks to fill the device, never more than the work.
int StrideBlocks(int64_t count) { return static_cast<int>(std::min<int64_t>(Blocks(count), 4096)); }

// ---- Kernels: preparation -------------------------------------------------------------------

// Per column of w [M, N]: min and max over the rows, the columns flagged in `dead` read as 0.
// Block (32, 8): 32 columns, 8 row lanes.
__global__ void ColumnMinMaxKernel(const float* __restrict__ w,        // [M, N]
                                   int64_t M, int64_t N,
                                   const uint8_t* __restrict__ dead,   // [N]
                                   float* __restrict__ mn,             // [N]
                                   float* __restrict__ mx) {           // [N]
  __shared__ float s_mn[8][32];
  __shared__ float s_mx[8][32];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  float lo = kInf, hi = -kInf;
  if (c < N) {
    const bool zero = dead[c] != 0;
    for (int64_t r = ty; r < M; r += 8) {
      const float v = zero ? 0.0f : w[r * N + c];
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
  s_mn[ty][tx] = lo;
  s_mx[ty][tx] = hi;
  __syncthreads();
  if (ty == 0 && c < N) {
    for (int y = 1; y < 8; ++y) {
      lo = fminf(lo, s_mn[y][tx]);
      hi = fmaxf(hi, s_mx[y][tx]);
    }
    mn[c] = lo;
    mx[c] = hi;
  }
}

// wt[inv_perm[c], r] = Wn[r, c] for r < M, c < N, where Wn is 0 on zero_col columns and
// otherwise (normalize) (w − bias)/scale (0 when scale <= 0) or w. Rows M.. of wt are not
// written. Block (32, 8) per 32×32 tile: x over columns, y over rows.
__global__ void NormalizeTransposeKernel(const float* __restrict__ w,          // [M, N]
                                         int64_t M, int64_t N,
                                         const uint8_t* __restrict__ zero_col,  // [N]
                                         const float* __restrict__ scale,       // [N]
                                         const float* __restrict__ bias,        // [N]
                                         bool normalize,
                                         const int32_t* __restrict__ inv_perm,  // [N]
                                         float* __restrict__ wt,                // [N, Mpad]
                                         int64_t Mpad) {
  __shared__ float tile[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32, r0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int i = 0; i < 32; i += 8) {
    const int64_t r = r0 + ty + i, c = c0 + tx;
    if (r < M && c < N) {
      float v = w[r * N + c];
      if (zero_col[c] != 0) {
        v = 0.0f;
      } else if (normalize) {
        v = scale[c] > 0.0f ? (v - bias[c]) / scale[c] : 0.0f;
      }
      tile[ty + i][tx] = v;
    }
  }
  __syncthreads();
  for (int i = 0; i < 32; i += 8) {
    const int64_t c = c0 + ty + i, r = r0 + tx;
    if (c < N && r < M) wt[static_cast<int64_t>(inv_perm[c]) * Mpad + r] = tile[tx][ty + i];
  }
}

// work [n, n] = J·P·sym(Hf)·Pᵀ·J with the diagonal replaced by diag[.] + add, where
// Hf = diag(scale)·H·diag(scale) (scale null: H) and (J·P·X·Pᵀ·J)[a, b] = X[pa, pb],
// pa = perm[n − 1 − a]. Exactly the CPU's PrepareHessian fill (same float operations).
__global__ void FillDampedKernel(const float* __restrict__ h,       // [n, n]
                                 int64_t n,
                                 const int32_t* __restrict__ perm,  // [n]
                                 const float* __restrict__ scale,   // [n] or null
                                 const float* __restrict__ diag,    // [n] (dead entries 1)
                                 float add,
                                 float* __restrict__ work) {        // [n, n]
  const int64_t total = n * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t a = e / n, b = e % n;
    const int64_t pa = perm[n - 1 - a], pb = perm[n - 1 - b];
    float v;
    if (a == b) {
      v = diag[pa] + add;
    } else {
      float hab = h[pa * n + pb], hba = h[pb * n + pa];
      if (scale != nullptr) {
        hab = hab * (scale[pa] * scale[pb]);
        hba = hba * (scale[pb] * scale[pa]);
      }
      v = 0.5f * (hab + hba);
    }
    work[e] = v;
  }
}

__global__ void SetIdentityKernel(float* __restrict__ x, int64_t n) {  // x [n, n], zeroed
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i * n + i] = 1.0f;
}

// Counts the non-finite entries of the lower triangle of x (column-major [n, n]).
__global__ void CountNonFiniteLowerKernel(const float* __restrict__ x, int64_t n,
                                          unsigned long long* __restrict__ count) {
  unsigned long long bad = 0;
  const int64_t total = n * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e % n, col = e / n;
    if (col <= row && !isfinite(x[e])) ++bad;
  }
  bad = BlockSum(bad);
  if (threadIdx.x == 0 && bad > 0) atomicAdd(count, bad);
}

// u [n, n] row-major = J·X·J restricted to the upper triangle: u[k, l] = X(n−1−k, n−1−l) for
// l >= k, 0 below, where X (column-major) is the lower-triangular R⁻¹. Block (32, 8) per
// 32×32 tile of u: x over l, y over k.
__global__ void UpperFromInverseKernel(const float* __restrict__ x,  // [n, n] column-major
                                       int64_t n, float* __restrict__ u) {
  __shared__ float tile[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t l0 = static_cast<int64_t>(blockIdx.x) * 32, k0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int i = 0; i < 32; i += 8) {
    const int64_t l = l0 + ty + i, k = k0 + tx;  // consecutive tx read consecutive addresses
    if (k < n && l < n) tile[ty + i][tx] = x[(n - 1 - k) + (n - 1 - l) * n];
  }
  __syncthreads();
  for (int i = 0; i < 32; i += 8) {
    const int64_t k = k0 + ty + i, l = l0 + tx;
    if (k < n && l < n) u[k * n + l] = l >= k ? tile[tx][ty + i] : 0.0f;
  }
}

// ---- Kernels: the column sweep --------------------------------------------------------------

// rem[row] = w[row] − cmain[idx[row / v]][row % v] for row < M, 0 for M <= row < Mpad.
__global__ void ResidualInputKernel(const float* __restrict__ w,      // [Mpad]
                                    const float* __restrict__ cmain,  // [k, v]
                                    const int32_t* __restrict__ idx,  // [ceil(M / v)]
                                    int v, int64_t M, int64_t Mpad, float* __restrict__ rem) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= Mpad) return;
  rem[row] = row < M ? w[row] - cmain[static_cast<int64_t>(idx[row / v]) * v + row % v] : 0.0f;
}

// One column of the sweep after its search(es). Per row (thread): q = main (+ residual)
// centroid value, e = w − q (0 on padding rows), err = e/d; q, e (optional) and err
// (optional, the block's error row) are stored, and the later columns of the block receive
// the feedback work[c] −= U[p, c]·err. Thread r < rows writes the codes of vector r. The
// block's Σ err² is added to *loss.
struct ColumnStep {
  const float* w = nullptr;          // [Mpad] work row p
  const float* cmain = nullptr;      // [k, v]
  const int32_t* idx = nullptr;      // [rows]
  const float* cres = nullptr;       // [kr, v] or null
  const int32_t* ridx = nullptr;     // [rows] (with cres)
  int v = 0;
  int64_t rows = 0;
  float d = 1.0f;                    // U[p, p] (1 without feedback)
  float* q = nullptr;                // [Mpad] output row p
  float* qerr = nullptr;             // [Mpad] or null
  float* err_row = nullptr;          // [Mpad] row p − i of the block's E, or null
  const float* urow = nullptr;       // [N] row p of U, or null (no feedback)
  float* work = nullptr;             // [N, Mpad] base of the working weights
  int64_t feedback_begin = 0, feedback_end = 0;  // work rows receiving feedback
  int32_t* codes = nullptr;          // codes[r·code_stride] = idx[r]
  int32_t* res_codes = nullptr;      // same layout, residual (with cres)
  int64_t code_stride = 0;
  double* loss = nullptr;            // Σ err² accumulator
};

__global__ void ApplyColumnKernel(ColumnStep s, int64_t M, int64_t Mpad) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double sq = 0;
  if (row < Mpad) {
    float qv = 0.0f, e = 0.0f;
    if (row < M) {
      const int64_t r = row / s.v;
      const int t = static_cast<int>(row % s.v);
      qv = s.cmain[static_cast<int64_t>(s.idx[r]) * s.v + t];
      if (s.cres != nullptr) qv += s.cres[static_cast<int64_t>(s.ridx[r]) * s.v + t];
      e = s.w[row] - qv;
    }
    s.q[row] = qv;
    if (s.qerr != nullptr) s.qerr[row] = e;
    const float err = e / s.d;
    if (s.err_row != nullptr) s.err_row[row] = err;
    sq = static_cast<double>(err) * static_cast<double>(err);
    if (s.urow != nullptr && row < M) {
      for (int64_t c = s.feedback_begin; c < s.feedback_end; ++c) {
        float* dst = s.work + c * Mpad + row;
        *dst = __fsub_rn(*dst, __fmul_rn(s.urow[c], err));
      }
    }
    if (row < s.rows) {
      s.codes[row * s.code_stride] = s.idx[row];
      if (s.res_codes != nullptr) s.res_codes[row * s.code_stride] = s.ridx[row];
    }
  }
  sq = BlockSum(sq);
  if (threadIdx.x == 0) atomicAdd(s.loss, sq);
}

// out [M, N] = q[inv_perm[c], r]·scale[c] + bias[c]: a pass's weights in the original layout.
// Block (32, 8) per 32×32 tile: x over columns, y over rows.
__global__ void DenormalizeKernel(const float* __restrict__ q,          // [N, Mpad]
                                  int64_t M, int64_t N, int64_t Mpad,
                                  const int32_t* __restrict__ inv_perm,  // [N]
                                  const float* __restrict__ scale,       // [N]
                                  const float* __restrict__ bias,        // [N]
                                  float* __restrict__ out) {             // [M, N]
  __shared__ float tile[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * 32, r0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int i = 0; i < 32; i += 8) {
    const int64_t c = c0 + ty + i, r = r0 + tx;
    if (c < N && r < M) tile[ty + i][tx] = q[static_cast<int64_t>(inv_perm[c]) * Mpad + r];
  }
  __syncthreads();
  for (int i = 0; i < 32; i += 8) {
    const int64_t r = r0 + ty + i, c = c0 + tx;
    if (r < M && c < N) out[r * N + c] = __fadd_rn(__fmul_rn(tile[tx][ty + i], scale[c]), bias[c]);
  }
}

// ---- Kernels: metrics -----------------------------------------------------------------------

// out[i] = a[i] − b[i] (b null: a[i]) in float64.
__global__ void DifferenceKernel(const float* __restrict__ a, const float* __restrict__ b,
                                 int64_t count, double* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<double>(a[i]) - (b != nullptr ? static_cast<double>(b[i]) : 0.0);
  }
}

// partial[blockIdx.x] = Σ a[i]·b[i] over the block's grid-stride share.
__global__ void DotPartialKernel(const double* __restrict__ a, const double* __restrict__ b,
                                 int64_t count, double* __restrict__ partial) {
  double s = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    s += a[i] * b[i];
  }
  s = BlockSum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// ---- Host-side pieces -----------------------------------------------------------------------

// tr((A − B)·H·(A − B)ᵀ) in float64 for device A, B [m, n] and the layer's H, over row tiles:
// D = A − B (float64), T = D·H (DGEMM), Σ D∘T (fixed-order reduction).
class TraceMetric {
 public:
  // h: device H [n, n] (copied to float64 here).
  Status Init(const GpuContext& ctx, const float* h, int64_t m, int64_t n) {
    ctx_ = &ctx;
    m_ = m;
    n_ = n;
    rows_ = std::clamp<int64_t>(kMetricTileElements / n, 1, m);
    QF_RETURN_IF_ERROR(h64_.Allocate(ctx, n * n));
    QF_RETURN_IF_ERROR(d_.Allocate(ctx, rows_ * n));
    QF_RETURN_IF_ERROR(t_.Allocate(ctx, rows_ * n));
    QF_RETURN_IF_ERROR(partial_.Allocate(ctx, kReductionBlocks));
    QF_RETURN_IF_ERROR(acc_.Allocate(ctx, 1));
    DifferenceKernel<<<StrideBlocks(n * n), kThreads, 0, ctx.stream()>>>(h, nullptr, n * n, h64_.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return OkStatus();
  }
  bool initialized() const { return ctx_ != nullptr; }

  // a, b: device [m, n]; b null gives tr(A H Aᵀ).
  StatusOr<double> Trace(const float* a, const float* b) {
    const GpuContext& ctx = *ctx_;
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(acc_.get(), 0, sizeof(double), ctx.stream()));
    const double one = 1.0, zero = 0.0;
    const int n = static_cast<int>(n_);
    for (int64_t r0 = 0; r0 < m_; r0 += rows_) {
      const int64_t rows = std::min(rows_, m_ - r0);
      const int64_t count = rows * n_;
      DifferenceKernel<<<StrideBlocks(count), kThreads, 0, ctx.stream()>>>(
          a + r0 * n_, b != nullptr ? b + r0 * n_ : nullptr, count, d_.get());
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      // Column-major: T [n, rows] = Hᵀ·D (tr(D H Dᵀ) = tr(D Hᵀ Dᵀ)); T's layout is D's.
      QF_CUBLAS_RETURN_IF_ERROR(cublasDgemm(ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, n,
                                            static_cast<int>(rows), n, &one, h64_.get(), n,
                                            d_.get(), n, &zero, t_.get(), n));
      // One block per kThreads elements up to kReductionBlocks: the grid (and so the order of
      // the sum) depends only on the tile's size.
      const int blocks = std::min(kReductionBlocks, Blocks(count));
      DotPartialKernel<<<blocks, kThreads, 0, ctx.stream()>>>(d_.get(), t_.get(), count,
                                                              partial_.get());
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      QF_RETURN_IF_ERROR(SumPartials(ctx, partial_.get(), blocks, acc_.get(), true));
    }
    double total = 0;
    QF_RETURN_IF_ERROR(Download(ctx, acc_.get(), 1, &total));
    return total;
  }

 private:
  const GpuContext* ctx_ = nullptr;
  int64_t m_ = 0, n_ = 0, rows_ = 0;
  DeviceBuffer<double> h64_, d_, t_, partial_, acc_;
};

// A codebook on the host (rounded to the parameter dtype, the result's copy) and on the
// device with its norms, plus the centroids cut to the real rows of a partial last vector
// (out % v != 0) for the masked search of that vector.
struct DeviceCodebook {
  int v = 0;
  int64_t k = 0;
  int tail = 0;
  std::vector<float> host;                // [k, v]
  DeviceBuffer<float> c, norms;           // [k, v], [k]
  DeviceBuffer<float> ctail, tail_norms;  // [k, tail], [k] (tail > 0)
  int kmeans_iterations = 0;

  DeviceCodebookView Full() const { return {c.get(), norms.get(), k, v}; }
  DeviceCodebookView Tail() const { return {ctail.get(), tail_norms.get(), k, tail}; }

  Status Upload(const GpuContext& ctx, int64_t out_features) {
    QF_RETURN_IF_ERROR(c.Allocate(ctx, k * v));
    QF_RETURN_IF_ERROR(norms.Allocate(ctx, k));
    QF_RETURN_IF_ERROR(qforge::quant::Upload(ctx, host.data(), k * v, c.get()));
    QF_RETURN_IF_ERROR(ComputeCentroidNorms(ctx, c.get(), k, v, norms.get()));
    tail = static_cast<int>(out_features % v);
    if (tail == 0) return OkStatus();
    QF_RETURN_IF_ERROR(ctail.Allocate(ctx, k * tail));
    QF_RETURN_IF_ERROR(tail_norms.Allocate(ctx, k));
    QF_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(ctail.get(), sizeof(float) * tail, c.get(), sizeof(float) * v,
                                              sizeof(float) * tail, static_cast<size_t>(k),
                                              cudaMemcpyDeviceToDevice, ctx.stream()));
    return ComputeCentroidNorms(ctx, ctail.get(), k, tail, tail_norms.get());
  }
};

// The shapes and codebooks of one Quantize call.
struct Layer : VptqGeometry {
  explicit Layer(const VptqGeometry& geometry) : VptqGeometry(geometry) {}

  std::vector<DeviceCodebook> main;      // [G]
  std::vector<DeviceCodebook> residual;  // [G] or empty
  DeviceCodebook outlier;
};

// The factor of the normalised problem's Hessian and what PrepareHessian reports.
struct DeviceFactor {
  std::vector<int32_t> perm;          // perm[p] = original column at position p
  std::vector<int32_t> dead_columns;  // diag(Hf) == 0
  DeviceBuffer<float> u;              // [N, N] row-major upper factor of (P Hf Pᵀ + λI)⁻¹
  std::vector<float> u_diag;          // [N]
  double damp_percent_used = 0;
  int cholesky_attempts = 0;
};

// PrepareHessian (hessian.h) with the heavy steps on the device: for the layout of diag(Hf)
// (MakeHessianLayout: dead entries, act-order permutation, mean diagonal), FactorWithDamping
// over attempts that factorise the damped J·P·Hf·Pᵀ·J (Cholesky, triangular inverse), then
// U = J R⁻¹ J. dscale: device scale for Hf = diag(s) H diag(s), or null for Hf = H. Errors as
// FactorWithDamping.
StatusOr<DeviceFactor> FactorHessian(const GpuContext& ctx, const float* dh, HessianLayout layout,
                                     const float* dscale, const HessianOptions& ho) {
  const int64_t n = layout.n;
  DeviceFactor f;
  f.perm = std::move(layout.perm);
  f.dead_columns = std::move(layout.dead_columns);
  DeviceBuffer<int32_t> dperm;
  DeviceBuffer<float> ddiag, a, x, workspace;
  DeviceBuffer<int> dinfo;
  DeviceBuffer<unsigned long long> dbad;
  QF_RETURN_IF_ERROR(dperm.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(ddiag.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(a.Allocate(ctx, n * n));
  QF_RETURN_IF_ERROR(x.Allocate(ctx, n * n));
  QF_RETURN_IF_ERROR(dinfo.Allocate(ctx, 1));
  QF_RETURN_IF_ERROR(dbad.Allocate(ctx, 1));
  QF_RETURN_IF_ERROR(Upload(ctx, f.perm.data(), n, dperm.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, layout.diagonal.data(), n, ddiag.get()));
  const int ni = static_cast<int>(n);
  int lwork = 0;
  QF_CUSOLVER_RETURN_IF_ERROR(
      cusolverDnSpotrf_bufferSize(ctx.cusolver(), CUBLAS_FILL_MODE_LOWER, ni, a.get(), ni, &lwork));
  QF_RETURN_IF_ERROR(workspace.Allocate(ctx, std::max(lwork, 1)));

  // One attempt: OK, or FAILED_PRECONDITION saying why the factor is unusable.
  auto attempt = [&](float add) -> Status {
    FillDampedKernel<<<StrideBlocks(n * n), kThreads, 0, ctx.stream()>>>(dh, n, dperm.get(), dscale,
                                                                         ddiag.get(), add, a.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    // Symmetric, so row- and column-major agree; the lower factor L (column-major) is R.
    QF_CUSOLVER_RETURN_IF_ERROR(cusolverDnSpotrf(ctx.cusolver(), CUBLAS_FILL_MODE_LOWER, ni, a.get(), ni,
                                                 workspace.get(), lwork, dinfo.get()));
    int info = 0;
    QF_RETURN_IF_ERROR(Download(ctx, dinfo.get(), 1, &info));
    if (info < 0) return InternalError("cusolverDnSpotrf: invalid argument " + std::to_string(-info));
    if (info > 0) {
      return FailedPreconditionError("matrix is not positive definite (pivot " + std::to_string(info - 1) + ")");
    }
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(x.get(), 0, x.bytes(), ctx.stream()));
    SetIdentityKernel<<<Blocks(n), kThreads, 0, ctx.stream()>>>(x.get(), n);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    const float one = 1.0f;
    QF_CUBLAS_RETURN_IF_ERROR(cublasStrsm(ctx.cublas(), CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER,
                                          CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, ni, ni, &one, a.get(), ni,
                                          x.get(), ni));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dbad.get(), 0, sizeof(unsigned long long), ctx.stream()));
    CountNonFiniteLowerKernel<<<StrideBlocks(n * n), kThreads, 0, ctx.stream()>>>(x.get(), n, dbad.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    unsigned long long bad = 0;
    QF_RETURN_IF_ERROR(Download(ctx, dbad.get(), 1, &bad));
    if (bad > 0) return FailedPreconditionError("inverse factor is not finite");
    return OkStatus();
  };

  QF_ASSIGN_OR_RETURN(const DampingOutcome outcome,
                      FactorWithDamping(ho, layout.mean_diagonal, attempt));
  f.damp_percent_used = outcome.damp_percent_used;
  f.cholesky_attempts = outcome.cholesky_attempts;
  // U into `a` (R is no longer needed), then U's diagonal for the sweep.
  const dim3 tiles(static_cast<unsigned>(CeilDiv(n, 32)), static_cast<unsigned>(CeilDiv(n, 32)));
  UpperFromInverseKernel<<<tiles, dim3(32, 8), 0, ctx.stream()>>>(x.get(), n, a.get());
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  f.u_diag.resize(static_cast<size_t>(n));
  QF_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(
      f.u_diag.data(), sizeof(float), a.get(), sizeof(float) * static_cast<size_t>(n + 1),
      sizeof(float), static_cast<size_t>(n), cudaMemcpyDeviceToHost, ctx.stream()));
  QF_RETURN_IF_ERROR(ctx.Synchronize());
  f.u = std::move(a);
  return f;
}

// k-means over the full vectors of columns [c0, c1) of `src` (device [N, Mpad]), each vector
// weighted by colw[column]; the partial last vectors are left out unless there is no full
// vector at all (TrainCodebook of vptq.cc). Reports to `progress` (VptqProgress::KMeans).
StatusOr<DeviceCodebook> TrainCodebook(const GpuContext& ctx, DeviceNearestSearch& search,
                                       const float* src, int64_t Mpad, int64_t c0, int64_t c1, int v,
                                       int64_t k, int64_t M, const std::vector<float>& colw,
                                       const VptqOptions& o, uint64_t seed, const std::string& what,
                                       SolveProgress progress) {
  const int64_t rows = KMeansVectorsPerColumn(M, v);
  const int64_t n = (c1 - c0) * rows;
  DeviceBuffer<float> points;
  QF_RETURN_IF_ERROR(points.Allocate(ctx, n * v));
  QF_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(points.get(), sizeof(float) * static_cast<size_t>(rows * v),
                                            src + c0 * Mpad, sizeof(float) * static_cast<size_t>(Mpad),
                                            sizeof(float) * static_cast<size_t>(rows * v),
                                            static_cast<size_t>(c1 - c0), cudaMemcpyDeviceToDevice,
                                            ctx.stream()));
  std::vector<float> weights(static_cast<size_t>(n));
  bool any_weight = false;
  for (int64_t c = c0; c < c1; ++c) {
    const float wc = colw[static_cast<size_t>(c)];
    std::fill(weights.begin() + (c - c0) * rows, weights.begin() + (c - c0 + 1) * rows, wc);
    any_weight = any_weight || wc > 0;
  }
  auto km = DeviceKMeans(ctx, search, points.get(), n, v, any_weight ? weights.data() : nullptr,
                         VptqKMeansOptions(o, k, seed, std::move(progress)));
  if (!km.ok()) return CodebookKMeansError(km.status(), what);
  DeviceCodebook cb;
  cb.v = v;
  cb.k = k;
  cb.host = std::move(km->centroids);
  cb.kmeans_iterations = km->iterations;
  for (float& x : cb.host) x = RoundVptqParam(x, o.param_dtype);
  QF_RETURN_IF_ERROR(cb.Upload(ctx, M));
  return cb;
}

// What a pass leaves: the quantised normalised weights, optionally the error at quantisation
// time (both device [N, Mpad], row = permuted column), the codes in the checkpoint layout and
// the proxy loss.
struct PassOutput {
  DeviceBuffer<float> q;
  DeviceBuffer<float> qerr;
  std::vector<int32_t> indices, res_indices, outlier_indices;
  double proxy_loss = 0;
};

// The channel-independent second-order pass (RunPass of vptq.cc), or without u plain
// nearest-centroid VQ, reporting the end of each lazy block as `stage`. wt0: device
// [N, Mpad]; u: device [N, N] or null; u_diag its diagonal.
StatusOr<PassOutput> RunPass(const GpuContext& ctx, DeviceNearestSearch& search, const Layer& L,
                             const float* wt0, const float* u, const std::vector<float>& u_diag,
                             bool use_residual, bool want_qerr, int block_size,
                             VptqProgress& progress, VptqStage stage) {
  const int64_t N = L.N, M = L.M, Mpad = L.Mpad;
  const int64_t block = std::min<int64_t>(block_size, N);
  const int64_t max_rows = std::max(L.R, L.R0);
  PassOutput out;
  DeviceBuffer<float> work, eblock, rem;
  DeviceBuffer<int32_t> idx, ridx, indices, res_indices, outlier_indices;
  DeviceBuffer<double> loss;
  QF_RETURN_IF_ERROR(work.Allocate(ctx, N * Mpad));
  QF_RETURN_IF_ERROR(out.q.Allocate(ctx, N * Mpad));
  if (want_qerr) QF_RETURN_IF_ERROR(out.qerr.Allocate(ctx, N * Mpad));
  if (u != nullptr) QF_RETURN_IF_ERROR(eblock.Allocate(ctx, block * Mpad));
  QF_RETURN_IF_ERROR(rem.Allocate(ctx, Mpad));
  QF_RETURN_IF_ERROR(idx.Allocate(ctx, max_rows));
  QF_RETURN_IF_ERROR(ridx.Allocate(ctx, max_rows));
  QF_RETURN_IF_ERROR(indices.Allocate(ctx, L.G * L.R * L.S));
  if (use_residual) QF_RETURN_IF_ERROR(res_indices.Allocate(ctx, L.G * L.R * L.S));
  QF_RETURN_IF_ERROR(outlier_indices.Allocate(ctx, L.R0 * L.O));
  QF_RETURN_IF_ERROR(loss.Allocate(ctx, 1));
  QF_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(work.get(), wt0, work.bytes(), cudaMemcpyDeviceToDevice, ctx.stream()));
  QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(loss.get(), 0, sizeof(double), ctx.stream()));

  // Nearest entries of `cb` for the vectors of one column x [Mpad] (first M rows real): the
  // full vectors through the search, the partial last one over its real rows only.
  auto assign_column = [&](const DeviceCodebook& cb, const float* x, int32_t* out_idx) -> Status {
    const int64_t full = M / cb.v;
    if (full > 0) QF_RETURN_IF_ERROR(search.Run(x, full, cb.Full(), out_idx, nullptr, nullptr));
    if (cb.tail > 0) QF_RETURN_IF_ERROR(search.Run(x + full * cb.v, 1, cb.Tail(), out_idx + full, nullptr, nullptr));
    return OkStatus();
  };

  const float minus_one = -1.0f, one = 1.0f;
  DeviceProgress::Report report;
  if (progress.active()) {
    report = [&](int64_t columns) { return progress.PassColumns(stage, columns); };
  }
  DeviceProgress done(ctx, std::move(report));
  for (int64_t i = 0; i < N; i += block) {
    const int64_t j = std::min(N, i + block);
    for (int64_t p = i; p < j; ++p) {
      const VptqColumnPart part = L.Part(p);
      const DeviceCodebook& cb = part.outlier ? L.outlier : L.main[static_cast<size_t>(part.group)];
      float* wcol = work.get() + p * Mpad;
      QF_RETURN_IF_ERROR(assign_column(cb, wcol, idx.get()));
      const bool res = use_residual && !part.outlier;
      ColumnStep s;
      if (res) {
        const DeviceCodebook& rb = L.residual[static_cast<size_t>(part.group)];
        ResidualInputKernel<<<Blocks(Mpad), kThreads, 0, ctx.stream()>>>(wcol, cb.c.get(), idx.get(), cb.v,
                                                                          M, Mpad, rem.get());
        QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
        QF_RETURN_IF_ERROR(assign_column(rb, rem.get(), ridx.get()));
        s.cres = rb.c.get();
        s.ridx = ridx.get();
      }
      s.w = wcol;
      s.cmain = cb.c.get();
      s.idx = idx.get();
      s.v = cb.v;
      s.rows = part.outlier ? L.R0 : L.R;
      s.d = u != nullptr ? u_diag[static_cast<size_t>(p)] : 1.0f;
      s.q = out.q.get() + p * Mpad;
      s.qerr = want_qerr ? out.qerr.get() + p * Mpad : nullptr;
      if (u != nullptr) {
        s.err_row = eblock.get() + (p - i) * Mpad;
        s.urow = u + p * N;
        s.work = work.get();
        s.feedback_begin = p + 1;
        s.feedback_end = j;
      }
      if (part.outlier) {
        s.codes = outlier_indices.get() + part.pos;
        s.code_stride = L.O;
      } else {
        const int64_t base = static_cast<int64_t>(part.group) * L.R * L.S + part.pos;
        s.codes = indices.get() + base;
        s.res_codes = res ? res_indices.get() + base : nullptr;
        s.code_stride = L.S;
      }
      s.loss = loss.get();
      ApplyColumnKernel<<<Blocks(Mpad), kThreads, 0, ctx.stream()>>>(s, M, Mpad);
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
    // Lazy update of the later columns: W[j:] −= U[i:j, j:]ᵀ·E. Column-major view:
    // work[j:]ᵀ [Mpad, N − j] −= Eᵀ [Mpad, j − i] · U[i:j, j:] (read as its transpose, op T).
    if (u != nullptr && j < N) {
      QF_CUBLAS_RETURN_IF_ERROR(cublasSgemm(ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(Mpad),
                                            static_cast<int>(N - j), static_cast<int>(j - i), &minus_one,
                                            eblock.get(), static_cast<int>(Mpad), u + i * N + j,
                                            static_cast<int>(N), &one, work.get() + j * Mpad,
                                            static_cast<int>(Mpad)));
    }
    QF_RETURN_IF_ERROR(done.Enqueued(j));
  }
  QF_RETURN_IF_ERROR(done.Finished());
  out.indices.resize(static_cast<size_t>(indices.size()));
  QF_RETURN_IF_ERROR(Download(ctx, indices.get(), indices.size(), out.indices.data()));
  if (use_residual) {
    out.res_indices.resize(static_cast<size_t>(res_indices.size()));
    QF_RETURN_IF_ERROR(Download(ctx, res_indices.get(), res_indices.size(), out.res_indices.data()));
  }
  out.outlier_indices.resize(static_cast<size_t>(outlier_indices.size()));
  QF_RETURN_IF_ERROR(Download(ctx, outlier_indices.get(), outlier_indices.size(), out.outlier_indices.data()));
  double sum_sq = 0;
  QF_RETURN_IF_ERROR(Download(ctx, loss.get(), 1, &sum_sq));
  out.proxy_loss = sum_sq / 2;
  return out;
}

class CudaVptqSolver final : public VptqSolver {
 public:
  explicit CudaVptqSolver(std::shared_ptr<GpuContext> ctx) : ctx_(std::move(ctx)) {}
  const char* backend() const override { return "cuda"; }
  StatusOr<VptqResult> Quantize(const Matrix& w, const Matrix& h, const VptqOptions& o) override;

 private:
  std::shared_ptr<GpuContext> ctx_;
};

StatusOr<VptqResult> CudaVptqSolver::Quantize(const Matrix& w, const Matrix& h, const VptqOptions& o) {
  const auto t_total = Clock::now();
  QF_RETURN_IF_ERROR(CheckVptqInputs(w, h, o));
  QF_RETURN_IF_ERROR(CheckMatrixFinite(h, "Hessian"));

  Layer L(MakeVptqGeometry(w.rows, w.cols, o));
  const int64_t M = L.M, N = L.N, Mpad = L.Mpad;
  // cuBLAS takes int dimensions; the 32×32-tile kernels put a dimension in gridDim.y.
  constexpr int64_t kMaxDim = int64_t{65535} * 32;
  if (Mpad > kMaxDim || N > kMaxDim || o.vector_len > kMaxSearchDim ||
      (L.O > 0 && o.outlier_vector_len > kMaxSearchDim)) {
    return InvalidArgumentError("VPTQ layer [" + std::to_string(M) + ", " + std::to_string(N) +
                                "] with vector lengths " + std::to_string(L.v) + "/" + std::to_string(L.v0) +
                                " exceeds the CUDA backend's limits (dimensions <= " + std::to_string(kMaxDim) +
                                ", vectors <= " + std::to_string(kMaxSearchDim) + ")");
  }
  QF_RETURN_IF_ERROR(ctx_->Activate());
  const GpuContext& ctx = *ctx_;

  VptqResult res = MakeVptqResultHeader(L, o);
  VptqProgress progress(L, o);

  // ---- Dead columns, normalisation, Hessian of the normalised problem, permutation.
  auto t = Clock::now();
  res.dead_columns = FindDeadColumns(h);
  std::vector<uint8_t> dead(static_cast<size_t>(N), 0);
  for (int32_t c : res.dead_columns) dead[static_cast<size_t>(c)] = 1;
  DeviceBuffer<float> dw, dh, dscale, dbias;
  DeviceBuffer<uint8_t> ddead;
  QF_RETURN_IF_ERROR(dw.Allocate(ctx, M * N));
  QF_RETURN_IF_ERROR(dh.Allocate(ctx, N * N));
  QF_RETURN_IF_ERROR(ddead.Allocate(ctx, N));
  QF_RETURN_IF_ERROR(Upload(ctx, w.data.data(), M * N, dw.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, h.data.data(), N * N, dh.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, dead.data(), N, ddead.get()));
  res.weight_scale.assign(static_cast<size_t>(N), 1.0f);
  res.weight_bias.assign(static_cast<size_t>(N), 0.0f);
  if (o.enable_norm) {
    DeviceBuffer<float> dmn, dmx;
    QF_RETURN_IF_ERROR(dmn.Allocate(ctx, N));
    QF_RETURN_IF_ERROR(dmx.Allocate(ctx, N));
    ColumnMinMaxKernel<<<static_cast<unsigned>(CeilDiv(N, 32)), dim3(32, 8), 0, ctx.stream()>>>(
        dw.get(), M, N, ddead.get(), dmn.get(), dmx.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    std::vector<float> mn(static_cast<size_t>(N)), mx(static_cast<size_t>(N));
    QF_RETURN_IF_ERROR(Download(ctx, dmn.get(), N, mn.data()));
    QF_RETURN_IF_ERROR(Download(ctx, dmx.get(), N, mx.data()));
    for (size_t c = 0; c < static_cast<size_t>(N); ++c) {
      const VptqColumnNorm norm = ColumnNormFromRange(mn[c], mx[c], o.param_dtype);
      res.weight_scale[c] = norm.scale;
      res.weight_bias[c] = norm.bias;
    }
  }
  QF_RETURN_IF_ERROR(dscale.Allocate(ctx, N));
  QF_RETURN_IF_ERROR(dbias.Allocate(ctx, N));
  QF_RETURN_IF_ERROR(Upload(ctx, res.weight_scale.data(), N, dscale.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, res.weight_bias.data(), N, dbias.get()));

  // Hf = diag(s)·H·diag(s) (kScaled with normalisation) or H: its diagonal on the host, its
  // finiteness checked where the scaling could overflow, as PrepareHessian(Hf) would.
  const bool scaled = UsesScaledHessian(o);
  const std::vector<float>& s = res.weight_scale;
  const std::vector<float> hf_diag = NormalizedHessianDiagonal(h, s, scaled);
  if (scaled) {
    double hmax = 0, smax = 0;
    for (float x : h.data) hmax = std::max(hmax, static_cast<double>(std::fabs(x)));
    for (float x : s) smax = std::max(smax, static_cast<double>(x));
    if (hmax * smax * smax >= 0.5 * std::numeric_limits<float>::max()) {
      for (int64_t a = 0; a < N; ++a) {
        for (int64_t b = 0; b < N; ++b) {
          if (!std::isfinite(h(a, b) * (s[static_cast<size_t>(a)] * s[static_cast<size_t>(b)]))) {
            return InvalidArgumentError("Hessian entry (" + std::to_string(a) + ", " + std::to_string(b) +
                                        ") is not finite");
          }
        }
      }
    }
  }
  const HessianOptions ho = VptqHessianOptions(o);
  QF_ASSIGN_OR_RETURN(HessianLayout layout, MakeHessianLayout(hf_diag, ho.act_order));
  QF_ASSIGN_OR_RETURN(DeviceFactor factor, FactorHessian(ctx, dh.get(), std::move(layout),
                                                         scaled ? dscale.get() : nullptr, ho));
  res.perm = factor.perm;
  res.damp_percent_used = factor.damp_percent_used;
  res.cholesky_attempts = factor.cholesky_attempts;
  // Columns zeroed in the normalised problem: dead in H, or dead in Hf (e.g. scale 0).
  std::vector<uint8_t> zero_col = dead;
  for (int32_t c : factor.dead_columns) zero_col[static_cast<size_t>(c)] = 1;
  std::vector<int32_t> inv_perm(static_cast<size_t>(N));
  for (int64_t p = 0; p < N; ++p) inv_perm[static_cast<size_t>(res.perm[static_cast<size_t>(p)])] = static_cast<int32_t>(p);
  DeviceBuffer<int32_t> dinv;
  DeviceBuffer<float> wt0;
  QF_RETURN_IF_ERROR(dinv.Allocate(ctx, N));
  QF_RETURN_IF_ERROR(Upload(ctx, inv_perm.data(), N, dinv.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, zero_col.data(), N, ddead.get()));
  // Transposed, permuted working copy: wt0[p, r] = Wn[r, perm[p]], rows M.. zero.
  QF_RETURN_IF_ERROR(wt0.Allocate(ctx, N * Mpad));
  QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(wt0.get(), 0, wt0.bytes(), ctx.stream()));
  {
    const dim3 tiles(static_cast<unsigned>(CeilDiv(N, 32)), static_cast<unsigned>(CeilDiv(M, 32)));
    NormalizeTransposeKernel<<<tiles, dim3(32, 8), 0, ctx.stream()>>>(
        dw.get(), M, N, ddead.get(), dscale.get(), dbias.get(), o.enable_norm, dinv.get(), wt0.get(), Mpad);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  const std::vector<float> colw = KMeansColumnWeights(hf_diag, res.perm, o.hessian_weighted_kmeans);
  const float* u = o.error_feedback ? factor.u.get() : nullptr;
  QF_RETURN_IF_ERROR(ctx.Synchronize());
  res.timings.hessian_seconds = ElapsedSeconds(t);

  // ---- Codebooks.
  t = Clock::now();
  DeviceNearestSearch search;
  QF_RETURN_IF_ERROR(search.Init(ctx));
  if (L.O > 0) {
    QF_ASSIGN_OR_RETURN(L.outlier, TrainCodebook(ctx, search, wt0.get(), Mpad, 0, L.O, L.v0,
                                                 o.outlier_num_centroids, M, colw, o,
                                                 o.kmeans_seed + static_cast<uint64_t>(L.G),
                                                 "outlier codebook k-means",
                                                 progress.KMeans(VptqStage::kOutlierKMeans, 0)));
    res.kmeans_iterations_max = std::max(res.kmeans_iterations_max, L.outlier.kmeans_iterations);
  }
  for (int g = 0; g < L.G; ++g) {
    const int64_t c0 = L.GroupBegin(g);
    QF_ASSIGN_OR_RETURN(DeviceCodebook cb,
                        TrainCodebook(ctx, search, wt0.get(), Mpad, c0, c0 + L.S, L.v, o.num_centroids, M,
                                      colw, o, o.kmeans_seed + static_cast<uint64_t>(g),
                                      "group " + std::to_string(g) + " codebook k-means",
                                      progress.KMeans(VptqStage::kGroupKMeans, g)));
    res.kmeans_iterations_max = std::max(res.kmeans_iterations_max, cb.kmeans_iterations);
    L.main.push_back(std::move(cb));
  }
  QF_RETURN_IF_ERROR(ctx.Synchronize());
  res.timings.kmeans_seconds = ElapsedSeconds(t);

  // Output error of a pass's quantised weights (device [N, Mpad]) against W and H.
  TraceMetric metric;
  double metrics = 0;
  auto error_of = [&](const float* q) -> StatusOr<double> {
    const auto tm = Clock::now();
    if (!metric.initialized()) QF_RETURN_IF_ERROR(metric.Init(ctx, dh.get(), M, N));
    DeviceBuffer<float> what;
    QF_RETURN_IF_ERROR(what.Allocate(ctx, M * N));
    const dim3 tiles(static_cast<unsigned>(CeilDiv(N, 32)), static_cast<unsigned>(CeilDiv(M, 32)));
    DenormalizeKernel<<<tiles, dim3(32, 8), 0, ctx.stream()>>>(q, M, N, Mpad, dinv.get(), dscale.get(),
                                                                dbias.get(), what.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_ASSIGN_OR_RETURN(const double e, metric.Trace(dw.get(), what.get()));
    metrics += ElapsedSeconds(tm);
    return e;
  };
  if (o.report_phase_errors) {
    QF_ASSIGN_OR_RETURN(PassOutput km_only, RunPass(ctx, search, L, wt0.get(), nullptr, factor.u_diag,
                                                    false, false, o.block_size, progress,
                                                    VptqStage::kPhaseErrorPass));
    QF_ASSIGN_OR_RETURN(res.kmeans_output_error, error_of(km_only.q.get()));
  }

  // ---- First pass.
  t = Clock::now();
  const bool residual = o.num_res_centroids > 0;
  QF_ASSIGN_OR_RETURN(PassOutput pass, RunPass(ctx, search, L, wt0.get(), u, factor.u_diag, false,
                                               residual, o.block_size, progress,
                                               VptqStage::kFirstPass));
  QF_RETURN_IF_ERROR(ctx.Synchronize());
  res.timings.first_pass_seconds = ElapsedSeconds(t);

  if (residual) {
    if (o.report_phase_errors) {
      QF_ASSIGN_OR_RETURN(res.first_pass_output_error, error_of(pass.q.get()));
    }
    // ---- Residual codebooks on the error the first pass left, then the second pass from
    // the original weights with every codebook frozen.
    t = Clock::now();
    pass.q.Reset();
    for (int g = 0; g < L.G; ++g) {
      const int64_t c0 = L.GroupBegin(g);
      QF_ASSIGN_OR_RETURN(DeviceCodebook rb,
                          TrainCodebook(ctx, search, pass.qerr.get(), Mpad, c0, c0 + L.S, L.v,
                                        o.num_res_centroids, M, colw, o,
                                        o.kmeans_seed + 1000 + static_cast<uint64_t>(g),
                                        "group " + std::to_string(g) + " residual k-means",
                                        progress.KMeans(VptqStage::kResidualKMeans, g)));
      res.kmeans_iterations_max = std::max(res.kmeans_iterations_max, rb.kmeans_iterations);
      L.residual.push_back(std::move(rb));
    }
    QF_RETURN_IF_ERROR(ctx.Synchronize());
    res.timings.residual_kmeans_seconds = ElapsedSeconds(t);
    t = Clock::now();
    pass = PassOutput();
    QF_ASSIGN_OR_RETURN(pass, RunPass(ctx, search, L, wt0.get(), u, factor.u_diag, true, false,
                                      o.block_size, progress, VptqStage::kSecondPass));
    QF_RETURN_IF_ERROR(ctx.Synchronize());
    res.timings.second_pass_seconds = ElapsedSeconds(t);
  }

  // ---- Result in the checkpoint layout.
  for (const DeviceCodebook& cb : L.main) res.centroids.push_back(cb.host);
  for (const DeviceCodebook& cb : L.residual) res.res_centroids.push_back(cb.host);
  if (L.O > 0) res.outlier_centroids = L.outlier.host;
  res.indices = std::move(pass.indices);
  res.res_indices = std::move(pass.res_indices);
  res.outlier_indices = std::move(pass.outlier_indices);
  res.proxy_loss = pass.proxy_loss;
  pass = PassOutput();
  wt0.Reset();
  factor.u.Reset();

  const auto tm = Clock::now();
  QF_ASSIGN_OR_RETURN(res.dequantized, DequantizeVptqResult(res));
  if (!metric.initialized()) QF_RETURN_IF_ERROR(metric.Init(ctx, dh.get(), M, N));
  {
    DeviceBuffer<float> dq;
    QF_RETURN_IF_ERROR(dq.Allocate(ctx, M * N));
    QF_RETURN_IF_ERROR(Upload(ctx, res.dequantized.data.data(), M * N, dq.get()));
    QF_ASSIGN_OR_RETURN(res.output_error, metric.Trace(dw.get(), dq.get()));
  }
  QF_ASSIGN_OR_RETURN(res.weight_energy, metric.Trace(dw.get(), nullptr));
  metrics += ElapsedSeconds(tm);
  if (o.report_phase_errors && !residual) res.first_pass_output_error = res.output_error;
  res.timings.metrics_seconds = metrics;
  res.timings.total_seconds = ElapsedSeconds(t_total);
  return res;
}

}  // namespace
}  // namespace cuda_vptq

StatusOr<std::unique_ptr<VptqSolver>> NewCudaVptqSolver(std::shared_ptr<GpuContext> ctx) {
  if (ctx == nullptr) return InvalidArgumentError("NewCudaVptqSolver: null GPU context");
  QF_RETURN_IF_ERROR(ctx->Activate());
  return std::unique_ptr<VptqSolver>(std::make_unique<cuda_vptq::CudaVptqSolver>(std::move(ctx)));
}

}  // namespace qforge::quant

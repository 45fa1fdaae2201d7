// CUDA GPTQ solver: the algorithm of gptq.cc (the reference this backend must match) with the
// heavy steps on the device. See gptq.h for the contract, FORMATS.md for the algorithm.
//
// Steps of one Quantize call, all on ctx->stream():
//  1. Host: the CPU's input checks (CheckGptqInputs), then the host steps of the Hessian
//     preparation, hessian.h's own functions: MakeHessianLayout (negative diagonal, dead
//     columns, act-order permutation, mean diagonal); and the group layout (g_idx, group of
//     each processing position).
//  2. Factorisation, as hessian.cc: M = J P sym(H) Pᵀ J + λI in float (J reverses the
//     order), cusolverDnSpotrf, cusolverDnXtrtri (R⁻¹ of the lower factor R), then the 180°
//     rotation U = J R⁻¹ J, the upper factor of (P H Pᵀ + λI)⁻¹ = UᵀU; one such attempt per
//     damping of FactorWithDamping (hessian.h), which retries a failed attempt (devInfo > 0,
//     or a non-finite factor) with more damping and words the final error.
//  3. Sweep, per lazy block [b0, b1) of block_size columns (the CPU's blocking, so that the
//     stale group fits of reference_compat see the same values): SweepBlockKernel, one warp
//     per output row, quantizes the block's columns in order with the quantizer fused in
//     (group parameters fitted at group starts on the columns as the sequential algorithm
//     sees them, or stale, or static from FitStaticGroupsKernel), writes the codes in the
//     original column order and the scaled errors E [out, b1-b0]; then the trailing update
//     W[:, b1:] -= E U[b0:b1, b1:] is one cuBLAS GEMM in float32 with
//     CUBLAS_COMPUTE_32F_PEDANTIC (never TF32, whatever the context allows). After each
//     block's launches the host reports progress (ReportGptqProgress, the CPU's fractions) of
//     the block before it once the device has finished that one (DeviceProgress: one block
//     stays queued ahead while the host waits), and of the last block at the end, so the
//     fraction is what the device has done. A cancellation returns at once; the stream-ordered
//     frees of the buffers follow the (at most one) block still queued.
//  4. Metrics (compute_output_error): tr(X H Xᵀ) for X = W and X = W - Ŵ in double: Xᵀ X by
//     cublasDsyrk over row chunks, contracted with the original H by a deterministic two-stage
//     reduction.
//
// Sweep kernel layout. A CTA holds kSweepWarps rows. With the default block of 128 columns
// the block of U (64 KiB) and each warp's row segment (and its stale copy) sit in dynamic
// shared memory (> 48 KiB: cudaFuncSetAttribute). Larger blocks keep U in global memory,
// then the row segments too (the kernel reaches both through generic pointers), so every
// valid block_size runs. Within a row, lanes share the column loop: every lane evaluates
// the quantizer on the same value (the results are identical), lane 0 writes the code, the
// error and the loss, and lane l updates columns k+1+l, k+1+l+32, ...; __syncwarp orders the
// steps. Group fits are warp-collective: lanes gather the group's values (min/max by
// shuffles; the MSE search spreads its candidates over the lanes and keeps the CPU's first
// minimum). Rows are independent and each is computed in a fixed order, so results are
// deterministic. The row arithmetic is the CPU's: float32, with fmaf exactly where the
// x86-64-v3 clone of gptq.cc's SweepRows contracts to FMA (the residual, the in-block update,
// the feedback correction of fresh group fits) and the quantizer of quantizer_math.h, so that
// given the same factor and trailing updates, codes and losses agree with the CPU's bit for
// bit (the MSE objective up to nvcc's FMA contraction of it).
//
// Memory. Persistent buffers: W, H, the factor, codes, scales, zeros, the index vectors, the
// row losses. One scratch buffer is shared by two phases that never coexist: (a) the working
// weights, the error block, the MSE value rows, the stale rows of the global fallback and the
// cuSOLVER workspaces, (b) the metrics' Gram matrix and row chunk. gptq_memory.cc bounds the
// total; keep the two in step.
//
// Thread-safety: as backends.h, one Quantize at a time per GpuContext.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "quant/cuda/backends.h"
#include "quant/cuda/gptq_kernels.cuh"
#include "quant/cuda/gpu_context.cuh"
#include "quant/gptq.h"
#include "quant/hessian.h"
#include "quant/quantizer.h"

namespace qforge::quant {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kSweepWarps = 8;  // rows per CTA of the sweep and static-fit kernels
constexpr int kSweepThreads = kSweepWarps * kWarpSize;
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxGridBlocks = 65536;  // grid-stride kernels
constexpr int kReduceThreads = 256;
constexpr int kReducePartials = 1024;  // blocks of the trace contraction
// Doubles per row chunk of the metrics (64 MiB); gptq_memory.cc uses the same bound.
constexpr int64_t kMetricsChunkElems = int64_t{1} << 23;
constexpr size_t kScratchAlign = 256;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int GridFor(int64_t total, int threads) {
  return static_cast<int>(std::clamp<int64_t>(CeilDiv(total, threads), 1, kMaxGridBlocks));
}

// ---------------------------------------------------------------------------------------------
// Kernels (file-local; the launchers below check every launch).

// The matrix of one factorisation attempt, row-major (and symmetric, so column-major alike):
// a[x][y] = sym(H)[perm[n-1-x]][perm[n-1-y]] off the diagonal, and on it the diagonal of H
// (a dead 0 counted as 1) plus `add`, exactly as hessian.cc fills its work matrix.
__global__ void BuildFactorInputKernel(const float* __restrict__ h,       // [n, n] original H
                                       const int32_t* __restrict__ perm,  // [n]
                                       int64_t n, float add,
                                       float* __restrict__ a) {  // [n, n]
  const int64_t total = n * n;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t x = i / n, y = i - x * n;
    const int64_t px = perm[n - 1 - x], py = perm[n - 1 - y];
    float v;
    if (x == y) {
      float d = h[px * n + px];
      if (d == 0.0f) d = 1.0f;
      v = d + add;
    } else {
      v = 0.5f * (h[px * n + py] + h[py * n + px]);
    }
    a[i] = v;
  }
}

// In place: the row-major lower triangle of `a` holds R⁻¹; it becomes U[k][l] = R⁻¹[n-1-k][n-1-l]
// (the flat array reversed) with the strict lower triangle zeroed. Sets *nonfinite = 1 when
// an entry of U is not finite. One thread per pair (i, n²-1-i).
__global__ void RotateToUpperKernel(float* __restrict__ a,  // [n, n]
                                    int64_t n, int* __restrict__ nonfinite) {
  const int64_t total = n * n;
  const int64_t pairs = (total + 1) / 2;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < pairs;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = total - 1 - i;
    const float vi = a[i], vj = a[j];
    const float ni = (i % n) < (i / n) ? 0.0f : vj;
    const float nj = (j % n) < (j / n) ? 0.0f : vi;
    a[i] = ni;
    if (j != i) a[j] = nj;
    if (!isfinite(ni) || !isfinite(nj)) *nonfinite = 1;
  }
}

// wp[r][k] = W[r][perm[k]], or 0 for a dead column: the working weights in processing order.
__global__ void GatherWorkingWeightsKernel(const float* __restrict__ w,       // [out, in]
                                           const int32_t* __restrict__ perm,  // [in]
                                           const uint8_t* __restrict__ dead,  // [in]
                                           int64_t out, int64_t in,
                                           float* __restrict__ wp) {  // [out, in]
  const int64_t total = out * in;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / in, k = i - r * in;
    const int64_t c = perm[k];
    wp[i] = dead[c] ? 0.0f : w[r * in + c];
  }
}

// FindQuantParams of quantizer.cc for the n values value_at(0 .. n-1) of one row, by a whole
// warp (every lane must call it; every lane returns the same parameters). vals [n] is the
// row's scratch for the MSE search (unused without it).
template <typename ValueAt>
__device__ QuantParams FitGroupWarp(ValueAt value_at, int64_t n, float* vals,
                                    const QuantizerSpec& q, int lane) {
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t i = lane; i < n; i += kWarpSize) {
    const float v = value_at(i);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    if (q.mse) vals[i] = v;
  }
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    lo = std::min(lo, __shfl_xor_sync(kFullMask, lo, offset));
    hi = std::max(hi, __shfl_xor_sync(kFullMask, hi, offset));
  }
  const QuantRange range = AdjustRange(lo, hi, q);
  const QuantParams minmax = ParamsForRange(range.xmin, range.xmax, q);
  __syncwarp();  // every value is read (and written to vals) before anyone goes on
  if (!q.mse) return minmax;

  // The CPU keeps the first candidate whose error is strictly below the best so far (starting
  // from +inf): per lane the same over its candidates, across lanes the lowest index on ties.
  float best_err = INFINITY;
  int best_i = INT_MAX;
  for (int i = lane; i < q.mse_candidates; i += kWarpSize) {
    const QuantParams c = MseCandidate(i, range, minmax, q);
    const float err = CandidateError(vals, n, c.scale, static_cast<float>(c.zero),
                                     static_cast<float>(q.maxq), q.mse_norm);
    if (err < best_err) {
      best_err = err;
      best_i = i;
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    const float other_err = __shfl_xor_sync(kFullMask, best_err, offset);
    const int other_i = __shfl_xor_sync(kFullMask, best_i, offset);
    if (other_err < best_err || (other_err == best_err && other_i < best_i)) {
      best_err = other_err;
      best_i = other_i;
    }
  }
  __syncwarp();  // vals fully read before the caller's next fit overwrites it
  if (best_i == INT_MAX) return minmax;
  return MseCandidate(best_i, range, minmax, q);
}

struct StaticFitArgs {
  const float* w;       // [out, in] original weights
  const uint8_t* dead;  // [in]
  int64_t out, in;
  int64_t group_size;  // effective
  int64_t num_groups;
  float* vals;  // [out, vals_cols] MSE scratch (null without MSE)
  int64_t vals_cols;
  QuantizerSpec q;
  float* scales;   // [num_groups, out]
  int32_t* zeros;  // [num_groups, out]
};

// Static groups (FitParamsFromOriginal of gptq.cc): group g is the original columns
// [g·gs, (g+1)·gs), dead ones as 0, fitted on the original W. One warp per row.
__global__ void __launch_bounds__(kSweepThreads) FitStaticGroupsKernel(StaticFitArgs a) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = int64_t{blockIdx.x} * kSweepWarps + threadIdx.x / kWarpSize;
  if (r >= a.out) return;
  const float* wr = a.w + r * a.in;
  float* vals = a.vals == nullptr ? nullptr : a.vals + r * a.vals_cols;
  for (int64_t g = 0; g < a.num_groups; ++g) {
    const int64_t c0 = g * a.group_size;
    const int64_t n = std::min(a.in, c0 + a.group_size) - c0;
    const QuantParams p = FitGroupWarp(
        [&](int64_t i) { return a.dead[c0 + i] ? 0.0f : wr[c0 + i]; }, n, vals, a.q, lane);
    if (lane == 0) {
      a.scales[g * a.out + r] = p.scale;
      a.zeros[g * a.out + r] = p.zero;
    }
  }
}

struct SweepArgs {
  int64_t out, in;
  int64_t b0, nb;               // the block [b0, b0 + nb)
  int64_t group_size;           // effective
  bool dynamic;                 // group params fitted during the sweep
  bool stale;                   // dynamic fits on the block-start weights
  bool u_in_smem;               // U[b0:b1, b0:b1] staged in shared memory
  bool rows_in_smem;            // each warp's row segment (and stale copy) in shared memory
  const float* u;               // [in, in] upper factor, processing order
  const int32_t* perm;          // [in]
  const int32_t* group_of_pos;  // [in]
  float* w;                     // [out, in] working weights, processing order
  float* err;                   // [out, nb] scaled errors of this block
  float* stale_rows;            // [out, nb] stale copies when !rows_in_smem && stale
  float* vals;                  // [out, vals_cols] MSE scratch (null without MSE)
  int64_t vals_cols;
  uint8_t* codes;    // [out, in] original column order
  float* scales;     // [num_groups, out]
  int32_t* zeros;    // [num_groups, out]
  double* row_loss;  // [out], Σ err² accumulated over blocks
  QuantizerSpec q;
};

// Dynamic shared memory of one SweepBlockKernel launch for a block of nb columns, in floats.
__host__ __device__ inline int64_t SweepSmemFloats(int64_t nb, bool u_in_smem, bool rows_in_smem,
                                                   bool stale) {
  return (u_in_smem ? nb * nb : 0) + (rows_in_smem ? kSweepWarps * nb * (stale ? 2 : 1) : 0);
}

// One lazy block of the sweep (SweepRows of gptq.cc), one warp per row.
__global__ void __launch_bounds__(kSweepThreads) SweepBlockKernel(SweepArgs a) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t in = a.in, b0 = a.b0, nb = a.nb, b1 = b0 + nb;

  const float* ublk;  // U[b0 + x][b0 + y] = ublk[x * ldu + y]
  int64_t ldu;
  if (a.u_in_smem) {
    for (int64_t i = threadIdx.x; i < nb * nb; i += blockDim.x) {
      const int64_t x = i / nb, y = i - x * nb;
      smem[i] = a.u[(b0 + x) * in + b0 + y];
    }
    __syncthreads();
    ublk = smem;
    ldu = nb;
  } else {
    ublk = a.u + b0 * in + b0;
    ldu = in;
  }

  const int64_t r = int64_t{blockIdx.x} * kSweepWarps + warp;
  if (r >= a.out) return;  // warp-uniform; no block-wide barrier follows

  float* wglob = a.w + r * in;  // the row, processing order
  float* wrow;                  // wrow[x] = W[r][b0 + x] during the block
  float* stale = nullptr;       // the block-start values, for stale fits
  if (a.rows_in_smem) {
    float* mine = smem + (a.u_in_smem ? nb * nb : 0) + warp * nb * (a.stale ? 2 : 1);
    wrow = mine;
    if (a.stale) stale = mine + nb;
    for (int64_t x = lane; x < nb; x += kWarpSize) {
      const float v = wglob[b0 + x];
      wrow[x] = v;
      if (a.stale) stale[x] = v;
    }
  } else {
    wrow = wglob + b0;
    if (a.stale) {
      stale = a.stale_rows + r * nb;
      for (int64_t x = lane; x < nb; x += kWarpSize) stale[x] = wrow[x];
    }
  }
  __syncwarp();

  float* er = a.err + r * nb;
  float* vals = a.vals == nullptr ? nullptr : a.vals + r * a.vals_cols;
  const int64_t gs = a.group_size;
  QuantParams p{1.0f, 0};
  int64_t next_group_start = (b0 + gs - 1) / gs * gs;  // of the dynamic groups
  if (a.dynamic && next_group_start != b0) {
    // The group containing b0 was fitted by an earlier launch.
    const int64_t g = a.group_of_pos[b0];
    p = QuantParams{a.scales[g * a.out + r], a.zeros[g * a.out + r]};
  }
  double loss = 0;  // lane 0's
  for (int64_t k = b0; k < b1; ++k) {
    const int64_t x = k - b0;
    const int64_t g = a.group_of_pos[k];
    if (a.dynamic) {
      if (k == next_group_start) {
        next_group_start += gs;
        const int64_t kend = std::min(in, k + gs);
        // The group's values as the sequential algorithm sees them at column k (or, stale,
        // as they were at the block start); beyond the block, the feedback of this block's
        // earlier columns is not yet applied by the GEMM, so it is added here.
        auto value_at = [&](int64_t i) -> float {
          const int64_t j = k + i;
          if (j < b1) return a.stale ? stale[j - b0] : wrow[j - b0];
          float v = wglob[j];
          if (!a.stale) {
            for (int64_t c = b0; c < k; ++c) v = fmaf(-er[c - b0], a.u[c * in + j], v);
          }
          return v;
        };
        p = FitGroupWarp(value_at, kend - k, vals, a.q, lane);
        if (lane == 0) {
          a.scales[g * a.out + r] = p.scale;
          a.zeros[g * a.out + r] = p.zero;
        }
      }
    } else {
      p = QuantParams{a.scales[g * a.out + r], a.zeros[g * a.out + r]};
    }
    const float wk = wrow[x];
    const int code = QuantizeToCode(wk, p, a.q.maxq);
    const float e = gpu::QuantizationResidual(wk, code, p) / ublk[x * ldu + x];
    if (lane == 0) {
      a.codes[r * in + a.perm[k]] = static_cast<uint8_t>(code);
      er[x] = e;
      loss = fma(static_cast<double>(e), static_cast<double>(e), loss);
    }
    const float* urow = ublk + x * ldu;
    for (int64_t y = x + 1 + lane; y < nb; y += kWarpSize) wrow[y] = fmaf(-e, urow[y], wrow[y]);
    __syncwarp();
  }
  if (a.rows_in_smem) {
    for (int64_t x = lane; x < nb; x += kWarpSize) wglob[b0 + x] = wrow[x];
  }
  if (lane == 0) a.row_loss[r] += loss;
}

// x[i][j] = W[r0 + i][j] in double, rows [r0, r0 + rows).
__global__ void FillWeightRowsKernel(const float* __restrict__ w,  // [out, in]
                                     int64_t in, int64_t r0, int64_t rows,
                                     double* __restrict__ x) {  // [rows, in]
  const int64_t total = rows * in;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = static_cast<double>(w[r0 * in + i]);
  }
}

// x[i][j] = W[r][j] - dequant(codes[r][j]) in double for r = r0 + i (FillMetrics of gptq.cc).
__global__ void FillDeltaRowsKernel(const float* __restrict__ w,        // [out, in]
                                    const uint8_t* __restrict__ codes,  // [out, in]
                                    const float* __restrict__ scales,   // [num_groups, out]
                                    const int32_t* __restrict__ zeros,  // [num_groups, out]
                                    const int32_t* __restrict__ g_idx,  // [in]
                                    int64_t out, int64_t in, int64_t r0, int64_t rows,
                                    double* __restrict__ x) {  // [rows, in]
  const int64_t total = rows * in;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t rr = i / in, j = i - rr * in;
    const int64_t r = r0 + rr;
    const int64_t g = g_idx[j];
    const QuantParams p{scales[g * out + r], zeros[g * out + r]};
    const float q = DequantizeCode(codes[r * in + j], p);
    x[i] = static_cast<double>(w[r * in + j]) - static_cast<double>(q);
  }
}

// Deterministic block sum of `v` (blockDim.x == kReduceThreads); thread 0 gets the total.
__device__ double BlockSum(double v) {
  __shared__ double buf[kReduceThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  return buf[0];
}

// partials[block] = this block's share of Σ_{i >= j} G[i][j]·(H[i][j] + H[j][i]) (the diagonal
// once), i.e. tr(G H) for symmetric G. g: the lower triangle of G, column-major (cublasDsyrk).
__global__ void __launch_bounds__(kReduceThreads)
    TraceContractKernel(const double* __restrict__ g,                // [n, n] column-major, lower
                        const float* __restrict__ h,                 // [n, n] original H
                        int64_t n, double* __restrict__ partials) {  // [gridDim.x]
  double s = 0;
  const int64_t total = n * n;
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < total;
       t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = t / n, i = t - j * n;  // g[t] = G[i][j]
    if (i > j) {
      s += g[t] * (static_cast<double>(h[i * n + j]) + static_cast<double>(h[j * n + i]));
    } else if (i == j) {
      s += g[t] * static_cast<double>(h[i * n + i]);
    }
  }
  const double total_s = BlockSum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = total_s;
}

// *result = Σ partials[0 .. count), in a fixed order. One block of kReduceThreads.
__global__ void __launch_bounds__(kReduceThreads)
    SumPartialsKernel(const double* __restrict__ partials, int count, double* __restrict__ result) {
  double s = 0;
  for (int i = threadIdx.x; i < count; i += kReduceThreads) s += partials[i];
  const double total = BlockSum(s);
  if (threadIdx.x == 0) *result = total;
}

// ---------------------------------------------------------------------------------------------
// Host side.

// Everything decided on the host from the inputs (n numbers, as hessian.cc and gptq.cc).
struct HostPlan {
  int64_t out = 0, in = 0;
  int64_t block = 0;       // min(block_size, in)
  int64_t group_size = 0;  // effective
  int64_t num_groups = 0;
  int64_t vals_cols = 0;  // columns of the MSE scratch (0 without MSE)
  bool dynamic = true;
  bool stale = false;                 // dynamic fits on the block-start weights
  std::vector<int32_t> perm;          // [in] processing position -> original column
  std::vector<int32_t> group_of_pos;  // [in]
  std::vector<int32_t> g_idx;         // [in] original column -> group
  std::vector<uint8_t> dead;          // [in]
  double mean_diag = 0;               // mean(diag H), dead diagonals as 1
  QuantizerSpec quantizer;
};

// hessian: MakeHessianLayout of diag(H) (its permutation, dead columns and mean diagonal).
HostPlan MakeHostPlan(const Matrix& w, const GptqOptions& o, HessianLayout hessian) {
  HostPlan p;
  p.out = w.rows;
  p.in = w.cols;
  const int64_t n = p.in;
  p.block = std::min<int64_t>(o.block_size, n);
  p.group_size = o.group_size == -1 ? n : o.group_size;
  p.num_groups = (n + p.group_size - 1) / p.group_size;
  p.dynamic = !o.static_groups;
  p.stale = p.dynamic && (o.reference_compat || o.stale_group_params);
  p.quantizer = MakeQuantizerSpec(GptqQuantizerOptions(o));
  p.vals_cols = o.mse ? std::min(p.group_size, n) : 0;

  p.perm = std::move(hessian.perm);
  p.dead.assign(static_cast<size_t>(n), 0);
  for (int32_t c : hessian.dead_columns) p.dead[c] = 1;
  p.mean_diag = hessian.mean_diagonal;

  p.g_idx.resize(static_cast<size_t>(n));
  p.group_of_pos.resize(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    const int64_t orig = p.perm[k];
    const int64_t g = p.dynamic ? k / p.group_size : orig / p.group_size;
    p.g_idx[orig] = static_cast<int32_t>(g);
    p.group_of_pos[k] = static_cast<int32_t>(g);
  }
  return p;
}

// Where the sweep keeps U's block and the row segments (see the header comment).
struct SweepPlan {
  bool u_in_smem = false;
  bool rows_in_smem = false;
  size_t smem_bytes = 0;  // for the largest block
};

SweepPlan MakeSweepPlan(int64_t block, bool stale, size_t smem_limit) {
  SweepPlan s;
  for (const auto& [u, rows] : {std::pair{true, true}, std::pair{false, true}}) {
    const size_t bytes =
        static_cast<size_t>(SweepSmemFloats(block, u, rows, stale)) * sizeof(float);
    if (bytes <= smem_limit) {
      s.u_in_smem = u;
      s.rows_in_smem = rows;
      s.smem_bytes = bytes;
      return s;
    }
  }
  return s;  // everything in global memory
}

// Offsets of the buffers carved from the shared scratch allocation.
class ScratchLayout {
 public:
  template <typename T>
  size_t Add(int64_t count) {
    const size_t offset = bytes_;
    bytes_ += (static_cast<size_t>(count) * sizeof(T) + kScratchAlign - 1) / kScratchAlign *
              kScratchAlign;
    return offset;
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

// Device state of one Quantize call. Persistent buffers own their memory; the phase buffers
// point into `scratch`.
struct DeviceLayer {
  DeviceBuffer<float> w;               // [out, in] original weights
  DeviceBuffer<float> h;               // [in, in] original Hessian
  DeviceBuffer<float> factor;          // [in, in] factorisation work, then U
  DeviceBuffer<uint8_t> codes;         // [out, in] original column order
  DeviceBuffer<float> scales;          // [num_groups, out]
  DeviceBuffer<int32_t> zeros;         // [num_groups, out]
  DeviceBuffer<int32_t> perm;          // [in]
  DeviceBuffer<int32_t> group_of_pos;  // [in]
  DeviceBuffer<int32_t> g_idx;         // [in]
  DeviceBuffer<uint8_t> dead;          // [in]
  DeviceBuffer<double> row_loss;       // [out]
  DeviceBuffer<int> status;            // [3]: potrf devInfo, trtri devInfo, non-finite flag
  DeviceBuffer<uint8_t> scratch;       // phase (a) or (b), see the header comment

  // Phase (a): factorisation and sweep.
  float* wp = nullptr;          // [out, in] working weights, processing order
  float* err = nullptr;         // [out, block]
  float* vals = nullptr;        // [out, vals_cols], MSE only
  float* stale_rows = nullptr;  // [out, block], stale fits with rows in global memory only
  float* potrf_work = nullptr;  // [potrf_lwork]
  void* trtri_work = nullptr;   // [trtri_device_bytes]
  int potrf_lwork = 0;
  size_t trtri_device_bytes = 0;
  std::vector<uint8_t> trtri_host_work;
  // Phase (b): metrics.
  double* gram = nullptr;      // [in, in]
  double* xrows = nullptr;     // [metric_rows, in]
  double* partials = nullptr;  // [kReducePartials]
  double* trace = nullptr;     // [1]
  int64_t metric_rows = 0;

  SweepPlan sweep;
};

Status AllocateLayer(const GpuContext& ctx, const HostPlan& p, DeviceLayer& d) {
  const int64_t m = p.out, n = p.in;
  QF_RETURN_IF_ERROR(d.w.Allocate(ctx, m * n));
  QF_RETURN_IF_ERROR(d.h.Allocate(ctx, n * n));
  QF_RETURN_IF_ERROR(d.factor.Allocate(ctx, n * n));
  QF_RETURN_IF_ERROR(d.codes.Allocate(ctx, m * n));
  QF_RETURN_IF_ERROR(d.scales.Allocate(ctx, p.num_groups * m));
  QF_RETURN_IF_ERROR(d.zeros.Allocate(ctx, p.num_groups * m));
  QF_RETURN_IF_ERROR(d.perm.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(d.group_of_pos.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(d.g_idx.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(d.dead.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(d.row_loss.Allocate(ctx, m));
  QF_RETURN_IF_ERROR(d.status.Allocate(ctx, 3));

  // cuSOLVER workspaces, queried for this n (the matrix is not read).
  QF_CUSOLVER_RETURN_IF_ERROR(cusolverDnSpotrf_bufferSize(ctx.cusolver(), CUBLAS_FILL_MODE_UPPER,
                                                          static_cast<int>(n), d.factor.get(),
                                                          static_cast<int>(n), &d.potrf_lwork));
  size_t trtri_host_bytes = 0;
  QF_CUSOLVER_RETURN_IF_ERROR(cusolverDnXtrtri_bufferSize(
      ctx.cusolver(), CUBLAS_FILL_MODE_UPPER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F, d.factor.get(),
      n, &d.trtri_device_bytes, &trtri_host_bytes));
  d.trtri_host_work.resize(std::max<size_t>(trtri_host_bytes, 1));  // never a null pointer

  d.sweep = MakeSweepPlan(p.block, p.stale, ctx.properties().sharedMemPerBlockOptin);

  ScratchLayout a;
  const size_t wp_at = a.Add<float>(m * n);
  const size_t err_at = a.Add<float>(m * p.block);
  const size_t vals_at = a.Add<float>(m * p.vals_cols);
  const bool stale_global = p.stale && !d.sweep.rows_in_smem;
  const size_t stale_at = a.Add<float>(stale_global ? m * p.block : 0);
  const size_t potrf_at = a.Add<float>(d.potrf_lwork);
  const size_t trtri_at = a.Add<uint8_t>(static_cast<int64_t>(d.trtri_device_bytes));

  d.metric_rows = std::min(m, std::max<int64_t>(1, kMetricsChunkElems / n));
  ScratchLayout b;
  const size_t gram_at = b.Add<double>(n * n);
  const size_t xrows_at = b.Add<double>(d.metric_rows * n);
  const size_t partials_at = b.Add<double>(kReducePartials);
  const size_t trace_at = b.Add<double>(1);

  QF_RETURN_IF_ERROR(d.scratch.Allocate(ctx, static_cast<int64_t>(std::max(a.bytes(), b.bytes()))));
  uint8_t* base = d.scratch.get();
  d.wp = reinterpret_cast<float*>(base + wp_at);
  d.err = reinterpret_cast<float*>(base + err_at);
  d.vals = p.vals_cols > 0 ? reinterpret_cast<float*>(base + vals_at) : nullptr;
  d.stale_rows = stale_global ? reinterpret_cast<float*>(base + stale_at) : nullptr;
  d.potrf_work = reinterpret_cast<float*>(base + potrf_at);
  d.trtri_work = base + trtri_at;
  d.gram = reinterpret_cast<double*>(base + gram_at);
  d.xrows = reinterpret_cast<double*>(base + xrows_at);
  d.partials = reinterpret_cast<double*>(base + partials_at);
  d.trace = reinterpret_cast<double*>(base + trace_at);
  return OkStatus();
}

Status UploadLayer(const GpuContext& ctx, const Matrix& w, const Matrix& h, const HostPlan& p,
                   DeviceLayer& d) {
  QF_RETURN_IF_ERROR(Upload(ctx, w.data.data(), p.out * p.in, d.w.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, h.data.data(), p.in * p.in, d.h.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, p.perm.data(), p.in, d.perm.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, p.group_of_pos.data(), p.in, d.group_of_pos.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, p.g_idx.data(), p.in, d.g_idx.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, p.dead.data(), p.in, d.dead.get()));
  QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d.row_loss.get(), 0, d.row_loss.bytes(), ctx.stream()));
  return OkStatus();
}

// One factorisation attempt with diagonal increment `add` (the attempt of FactorWithDamping):
// OK with U in d.factor, or FAILED_PRECONDITION saying why this damping did not work, or
// another error from the device.
Status FactorAttempt(const GpuContext& ctx, const HostPlan& p, float add, DeviceLayer& d) {
  const int64_t n = p.in;
  const int ni = static_cast<int>(n);
  BuildFactorInputKernel<<<GridFor(n * n, kElementwiseThreads), kElementwiseThreads, 0,
                           ctx.stream()>>>(d.h.get(), d.perm.get(), n, add, d.factor.get());
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d.status.get(), 0, d.status.bytes(), ctx.stream()));
  // Column-major, the upper factor V of M = VᵀV; read row-major, the buffer then holds
  // R = Vᵀ in its lower triangle, M = R Rᵀ (the lower factor hessian.cc computes).
  QF_CUSOLVER_RETURN_IF_ERROR(cusolverDnSpotrf(ctx.cusolver(), CUBLAS_FILL_MODE_UPPER, ni,
                                               d.factor.get(), ni, d.potrf_work, d.potrf_lwork,
                                               d.status.get()));
  int info[3] = {0, 0, 0};
  QF_RETURN_IF_ERROR(Download(ctx, d.status.get(), 1, info));
  if (info[0] < 0) {
    return InternalError("cusolverDnSpotrf rejected parameter " + std::to_string(-info[0]));
  }
  if (info[0] > 0) {
    return FailedPreconditionError("matrix is not positive definite (leading minor " +
                                   std::to_string(info[0]) + ")");
  }
  // V⁻¹ in place; read row-major, (V⁻¹)ᵀ = R⁻¹.
  QF_CUSOLVER_RETURN_IF_ERROR(
      cusolverDnXtrtri(ctx.cusolver(), CUBLAS_FILL_MODE_UPPER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F,
                       d.factor.get(), n, d.trtri_work, d.trtri_device_bytes,
                       d.trtri_host_work.data(), d.trtri_host_work.size(), d.status.get() + 1));
  RotateToUpperKernel<<<GridFor((n * n + 1) / 2, kElementwiseThreads), kElementwiseThreads, 0,
                        ctx.stream()>>>(d.factor.get(), n, d.status.get() + 2);
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  QF_RETURN_IF_ERROR(Download(ctx, d.status.get(), 3, info));
  if (info[1] < 0) {
    return InternalError("cusolverDnXtrtri rejected parameter " + std::to_string(-info[1]));
  }
  if (info[1] > 0) {
    return FailedPreconditionError("triangular matrix is singular (diagonal " +
                                   std::to_string(info[1] - 1) + ")");
  }
  if (info[2] != 0) return FailedPreconditionError("inverse factor is not finite");
  return OkStatus();
}

// Static group fits, working weights, and the blocked sweep with its trailing GEMMs,
// reporting progress to o.progress after each block.
Status Sweep(const GpuContext& ctx, const HostPlan& p, const GptqOptions& o, DeviceLayer& d) {
  const int64_t m = p.out, n = p.in;
  const int rows_grid = static_cast<int>(CeilDiv(m, kSweepWarps));
  if (!p.dynamic) {
    StaticFitArgs s;
    s.w = d.w.get();
    s.dead = d.dead.get();
    s.out = m;
    s.in = n;
    s.group_size = p.group_size;
    s.num_groups = p.num_groups;
    s.vals = d.vals;
    s.vals_cols = p.vals_cols;
    s.q = p.quantizer;
    s.scales = d.scales.get();
    s.zeros = d.zeros.get();
    FitStaticGroupsKernel<<<rows_grid, kSweepThreads, 0, ctx.stream()>>>(s);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  GatherWorkingWeightsKernel<<<GridFor(m * n, kElementwiseThreads), kElementwiseThreads, 0,
                               ctx.stream()>>>(d.w.get(), d.perm.get(), d.dead.get(), m, n, d.wp);
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  QF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(SweepBlockKernel,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(d.sweep.smem_bytes)));
  SweepArgs s;
  s.out = m;
  s.in = n;
  s.group_size = p.group_size;
  s.dynamic = p.dynamic;
  s.stale = p.stale;
  s.u_in_smem = d.sweep.u_in_smem;
  s.rows_in_smem = d.sweep.rows_in_smem;
  s.u = d.factor.get();
  s.perm = d.perm.get();
  s.group_of_pos = d.group_of_pos.get();
  s.w = d.wp;
  s.err = d.err;
  s.stale_rows = d.stale_rows;
  s.vals = d.vals;
  s.vals_cols = p.vals_cols;
  s.codes = d.codes.get();
  s.scales = d.scales.get();
  s.zeros = d.zeros.get();
  s.row_loss = d.row_loss.get();
  s.q = p.quantizer;
  const float minus_one = -1.0f, one = 1.0f;
  DeviceProgress::Report report;
  if (o.progress) report = [&](int64_t columns) { return ReportGptqProgress(o, columns, n); };
  DeviceProgress done(ctx, std::move(report));
  for (int64_t b0 = 0; b0 < n; b0 += p.block) {
    const int64_t b1 = std::min(n, b0 + p.block);
    s.b0 = b0;
    s.nb = b1 - b0;
    const size_t smem =
        static_cast<size_t>(SweepSmemFloats(s.nb, s.u_in_smem, s.rows_in_smem, s.stale)) *
        sizeof(float);
    SweepBlockKernel<<<rows_grid, kSweepThreads, smem, ctx.stream()>>>(s);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    if (b1 < n) {
      // Row-major W[:, b1:] -= E U[b0:b1, b1:] is, column-major,
      // W[:, b1:]ᵀ -= U[b0:b1, b1:]ᵀ Eᵀ: an (n-b1) x m result with inner dimension nb.
      QF_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
          ctx.cublas(), CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n - b1), static_cast<int>(m),
          static_cast<int>(s.nb), &minus_one, d.factor.get() + b0 * n + b1, CUDA_R_32F,
          static_cast<int>(n), d.err, CUDA_R_32F, static_cast<int>(s.nb), &one, d.wp + b1,
          CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
    }
    QF_RETURN_IF_ERROR(done.Enqueued(b1));
  }
  return done.Finished();
}

enum class TraceOf { kWeights, kDelta };

// tr(X H Xᵀ) in double with X = W or X = W - dequant(result on the device).
StatusOr<double> DeviceTrace(const GpuContext& ctx, const HostPlan& p, DeviceLayer& d,
                             TraceOf what) {
  const int64_t m = p.out, n = p.in;
  for (int64_t r0 = 0; r0 < m; r0 += d.metric_rows) {
    const int64_t rows = std::min(d.metric_rows, m - r0);
    const int grid = GridFor(rows * n, kElementwiseThreads);
    if (what == TraceOf::kWeights) {
      FillWeightRowsKernel<<<grid, kElementwiseThreads, 0, ctx.stream()>>>(d.w.get(), n, r0, rows,
                                                                           d.xrows);
    } else {
      FillDeltaRowsKernel<<<grid, kElementwiseThreads, 0, ctx.stream()>>>(
          d.w.get(), d.codes.get(), d.scales.get(), d.zeros.get(), d.g_idx.get(), m, n, r0, rows,
          d.xrows);
    }
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    // Row-major X [rows, n] is column-major Xᵀ [n, rows]: G = Xᵀ (Xᵀ)ᵀ, lower triangle.
    const double alpha = 1.0, beta = r0 == 0 ? 0.0 : 1.0;
    QF_CUBLAS_RETURN_IF_ERROR(cublasDsyrk(ctx.cublas(), CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                                          static_cast<int>(n), static_cast<int>(rows), &alpha,
                                          d.xrows, static_cast<int>(n), &beta, d.gram,
                                          static_cast<int>(n)));
  }
  const int blocks =
      static_cast<int>(std::min<int64_t>(kReducePartials, CeilDiv(n * n, kReduceThreads)));
  TraceContractKernel<<<blocks, kReduceThreads, 0, ctx.stream()>>>(d.gram, d.h.get(), n,
                                                                   d.partials);
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  SumPartialsKernel<<<1, kReduceThreads, 0, ctx.stream()>>>(d.partials, blocks, d.trace);
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  double trace = 0;
  QF_RETURN_IF_ERROR(Download(ctx, d.trace, 1, &trace));
  return trace;
}

class CudaGptqSolver final : public GptqSolver {
 public:
  explicit CudaGptqSolver(std::shared_ptr<GpuContext> ctx) : ctx_(std::move(ctx)) {}

  const char* backend() const override { return "cuda"; }

  StatusOr<GptqResult> Quantize(const Matrix& w, const Matrix& h, const GptqOptions& o) override {
    const Clock::time_point t_start = Clock::now();
    // The CPU solver's checks, in its order with its messages, before any device work.
    QF_RETURN_IF_ERROR(CheckGptqInputs(w, h, o));
    const HessianOptions ho = GptqHessianOptions(o);
    QF_ASSIGN_OR_RETURN(HessianLayout layout, MakeHessianLayout(HessianDiagonal(h), ho.act_order));
    const GpuContext& ctx = *ctx_;
    QF_RETURN_IF_ERROR(ctx.Activate());
    const HostPlan plan = MakeHostPlan(w, o, std::move(layout));
    DeviceLayer d;
    QF_RETURN_IF_ERROR(AllocateLayer(ctx, plan, d));
    QF_RETURN_IF_ERROR(UploadLayer(ctx, w, h, plan, d));
    QF_ASSIGN_OR_RETURN(const DampingOutcome factor,
                        FactorWithDamping(ho, plan.mean_diag, [&](float add) {
                          return FactorAttempt(ctx, plan, add, d);
                        }));
    const double prepare_seconds = SecondsSince(t_start);

    const Clock::time_point t_sweep = Clock::now();
    QF_RETURN_IF_ERROR(Sweep(ctx, plan, o, d));
    GptqResult r;
    r.out_features = plan.out;
    r.in_features = plan.in;
    r.bits = o.bits;
    r.group_size = plan.group_size;
    r.num_groups = plan.num_groups;
    r.codes.resize(static_cast<size_t>(plan.out * plan.in));
    r.scales.resize(static_cast<size_t>(plan.num_groups * plan.out));
    r.zeros.resize(static_cast<size_t>(plan.num_groups * plan.out));
    std::vector<double> row_loss(static_cast<size_t>(plan.out));
    QF_RETURN_IF_ERROR(Download(ctx, d.codes.get(), d.codes.size(), r.codes.data()));
    QF_RETURN_IF_ERROR(Download(ctx, d.scales.get(), d.scales.size(), r.scales.data()));
    QF_RETURN_IF_ERROR(Download(ctx, d.zeros.get(), d.zeros.size(), r.zeros.data()));
    QF_RETURN_IF_ERROR(Download(ctx, d.row_loss.get(), d.row_loss.size(), row_loss.data()));
    double loss = 0;
    for (double v : row_loss) loss += v;
    r.proxy_loss = loss / 2;
    r.g_idx = plan.g_idx;
    r.perm = plan.perm;
    r.damp_percent_used = factor.damp_percent_used;
    r.cholesky_attempts = factor.cholesky_attempts;
    r.sweep_seconds = SecondsSince(t_sweep);
    r.prepare_seconds = prepare_seconds;

    if (o.compute_output_error) {
      const Clock::time_point t_metrics = Clock::now();
      QF_ASSIGN_OR_RETURN(r.weight_energy, DeviceTrace(ctx, plan, d, TraceOf::kWeights));
      QF_ASSIGN_OR_RETURN(r.output_error, DeviceTrace(ctx, plan, d, TraceOf::kDelta));
      r.metrics_seconds = SecondsSince(t_metrics);
    }
    r.seconds = SecondsSince(t_start);
    return r;
  }

 private:
  std::shared_ptr<GpuContext> ctx_;
};

}  // namespace

StatusOr<std::unique_ptr<GptqSolver>> NewCudaGptqSolver(std::shared_ptr<GpuContext> ctx) {
  if (ctx == nullptr) return InvalidArgumentError("NewCudaGptqSolver: null GpuContext");
  std::unique_ptr<GptqSolver> solver = std::make_unique<CudaGptqSolver>(std::move(ctx));
  return solver;
}

}  // namespace qforge::quant

// The CUDA nearest-centroid search (NewCudaNearestCentroidSearch of backends.h) and the device
// k-means of the VPTQ backend. See vptq_kernels.cuh for the design and the contracts.
#include <cstddef>  // before matrix.h (via the headers below), which uses ::size_t

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "quant/cuda/backends.h"
#include "quant/cuda/gpu_context.cuh"
#include "quant/cuda/vptq_kernels.cuh"

namespace qforge::quant {
namespace cuda_vptq {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- Search kernels -------------------------------------------------------------------------

constexpr int kSearchThreads = 128;
constexpr int kPointsPerThread = 4;
constexpr int64_t kPointsPerBlock = kSearchThreads * kPointsPerThread;
constexpr int kTileBytes = 32 * 1024;                 // shared memory per search block
constexpr int64_t kMinCentroidsPerSplit = 256;

// Centroids per shared-memory tile for dimension d: −2·c [tile, d] and ‖c‖² [tile] fit
// kTileBytes. A multiple of 32 whenever at least 32 fit; 1 for d = kMaxSearchDim.
int TileCentroids(int d) {
  const int raw = kTileBytes / (4 * (d + 1));
  return raw >= 32 ? raw / 32 * 32 : std::max(1, raw);
}

int64_t SearchScratchEntries(int sm_count) {
  return 2 * static_cast<int64_t>(kSearchBlocksPerSm) * std::max(sm_count, 1) * kPointsPerBlock;
}

// Where a search kernel writes: the final outputs with one split, the per-split partials
// ([splits, n], split-major) with several.
struct SearchOutputs {
  int32_t* idx = nullptr;      // [n]
  float* dist = nullptr;       // [n] or null
  float* second = nullptr;     // [n] or null (top-2)
  int32_t* part_index = nullptr;  // [splits, n]
  float* part_best = nullptr;     // [splits, n] ‖c‖² − 2x·c of the split's winner
  float* part_second = nullptr;   // [splits, n] (top-2 only)
};

// ‖x‖² with separate multiply and add roundings, as the CPU search's Finish computes it.
__device__ __forceinline__ float SquaredNorm(const float* x, int d) {
  float s = 0.0f;
  for (int t = 0; t < d; ++t) s = __fadd_rn(s, __fmul_rn(x[t], x[t]));
  return s;
}

__device__ __forceinline__ void WriteFinal(int64_t i, float xnorm, float best, int32_t best_index,
                                           float second_best, const SearchOutputs& out) {
  out.idx[i] = best_index;
  if (out.dist != nullptr) out.dist[i] = fmaxf(0.0f, xnorm + best);
  if (out.second != nullptr) {
    out.second[i] = second_best == kInf ? kInf : fmaxf(0.0f, xnorm + second_best);
  }
}

// One candidate value a = ‖c_j‖² − 2x·c_j against the running best (strict <: centroids are
// visited in increasing j, so exact ties keep the lowest index).
template <bool kTop2>
__device__ __forceinline__ void Consider(float a, int32_t j, float& best, int32_t& best_index,
                                         float& second_best) {
  if (kTop2) second_best = fminf(second_best, fmaxf(a, best));
  if (a < best) {
    best = a;
    best_index = j;
  }
}

// Loads one centroid row of −2·c from shared memory (vector loads when D allows; the row
// offset jj·D·4 bytes is then 16- or 8-byte aligned).
template <int D>
__device__ __forceinline__ void LoadRow(const float* s, float (&cv)[D]) {
  if constexpr (D % 4 == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(s);
#pragma unroll
    for (int t = 0; t < D / 4; ++t) {
      const float4 q = s4[t];
      cv[4 * t] = q.x;
      cv[4 * t + 1] = q.y;
      cv[4 * t + 2] = q.z;
      cv[4 * t + 3] = q.w;
    }
  } else if constexpr (D % 2 == 0) {
    const float2* s2 = reinterpret_cast<const float2*>(s);
#pragma unroll
    for (int t = 0; t < D / 2; ++t) {
      const float2 q = s2[t];
      cv[2 * t] = q.x;
      cv[2 * t + 1] = q.y;
    }
  } else {
#pragma unroll
    for (int t = 0; t < D; ++t) cv[t] = s[t];
  }
}

// Grid (point blocks, splits); block kSearchThreads; dynamic shared memory
// tile·(d + 1)·4 bytes. Block (bx, by) handles points [bx·512, bx·512 + 512) (thread t: points
// bx·512 + t + p·128, p < 4) against centroids [by·split_len, min(k, (by + 1)·split_len)).
// D > 0: d == D, the points live in registers; D == 0: any d, points read from global memory.
template <int D, bool kTop2>
__global__ void __launch_bounds__(kSearchThreads)
    NearestCentroidKernel(const float* __restrict__ x,      // [n, d]
                          int64_t n, int d,
                          const float* __restrict__ c,      // [k, d]
                          const float* __restrict__ norms,  // [k]
                          int64_t k, int tile, int64_t split_len, SearchOutputs out) {
  extern __shared__ float4 search_smem[];
  float* s_c = reinterpret_cast<float*>(search_smem);  // [tile, d] of −2·c
  float* s_norm = s_c + static_cast<int64_t>(tile) * d;  // [tile]
  constexpr int kRegDim = D > 0 ? D : 1;
  const int tid = threadIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kPointsPerBlock + tid;

  const float* xp[kPointsPerThread];
  float xr[kPointsPerThread][kRegDim];
#pragma unroll
  for (int p = 0; p < kPointsPerThread; ++p) {
    const int64_t i = first + p * kSearchThreads;
    xp[p] = x + (i < n ? i : n - 1) * d;  // out-of-range slots search a valid point, unused
    if constexpr (D > 0) {
#pragma unroll
      for (int t = 0; t < D; ++t) xr[p][t] = xp[p][t];
    }
  }
  float best[kPointsPerThread], second_best[kPointsPerThread];
  int32_t best_index[kPointsPerThread];
#pragma unroll
  for (int p = 0; p < kPointsPerThread; ++p) {
    best[p] = kInf;
    second_best[p] = kInf;
    best_index[p] = 0;
  }

  const int64_t j_begin = static_cast<int64_t>(blockIdx.y) * split_len;
  const int64_t j_end = min(k, j_begin + split_len);
  for (int64_t t0 = j_begin; t0 < j_end; t0 += tile) {
    const int len = static_cast<int>(min(static_cast<int64_t>(tile), j_end - t0));
    __syncthreads();  // the previous tile is consumed
    const float* ct = c + t0 * d;
    for (int q = tid; q < len * d; q += kSearchThreads) s_c[q] = -2.0f * ct[q];
    for (int q = tid; q < len; q += kSearchThreads) s_norm[q] = norms[t0 + q];
    __syncthreads();
    for (int jj = 0; jj < len; ++jj) {
      const int32_t j = static_cast<int32_t>(t0 + jj);
      const float nj = s_norm[jj];
      if constexpr (D > 0) {
        float cv[D];
        LoadRow<D>(s_c + jj * D, cv);
#pragma unroll
        for (int p = 0; p < kPointsPerThread; ++p) {
          float a = nj;
#pragma unroll
          for (int t = 0; t < D; ++t) a = fmaf(xr[p][t], cv[t], a);
          Consider<kTop2>(a, j, best[p], best_index[p], second_best[p]);
        }
      } else {
        const float* cj = s_c + static_cast<int64_t>(jj) * d;
#pragma unroll
        for (int p = 0; p < kPointsPerThread; ++p) {
          float a = nj;
          for (int t = 0; t < d; ++t) a = fmaf(__ldg(xp[p] + t), cj[t], a);
          Consider<kTop2>(a, j, best[p], best_index[p], second_best[p]);
        }
      }
    }
  }

#pragma unroll
  for (int p = 0; p < kPointsPerThread; ++p) {
    const int64_t i = first + p * kSearchThreads;
    if (i >= n) continue;
    if (gridDim.y == 1) {
      const bool need_norm = out.dist != nullptr || out.second != nullptr;
      WriteFinal(i, need_norm ? SquaredNorm(xp[p], d) : 0.0f, best[p], best_index[p],
                 second_best[p], out);
    } else {
      const int64_t at = static_cast<int64_t>(blockIdx.y) * n + i;
      out.part_index[at] = best_index[p];
      out.part_best[at] = best[p];
      if (kTop2) out.part_second[at] = second_best[p];
    }
  }
}

// One thread per point: merges the splits' winners in split order (as the CPU search's
// MergeBest), then writes the final outputs.
template <bool kTop2>
__global__ void MergeSplitsKernel(const float* __restrict__ x,  // [n, d]
                                  int64_t n, int d, int splits, SearchOutputs out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float best = out.part_best[i];
  int32_t best_index = out.part_index[i];
  float second_best = kTop2 ? out.part_second[i] : kInf;
  for (int s = 1; s < splits; ++s) {
    const int64_t at = static_cast<int64_t>(s) * n + i;
    const float o1 = out.part_best[at];
    const float o2 = kTop2 ? out.part_second[at] : kInf;
    if (o1 < best) {
      second_best = fminf(best, o2);
      best = o1;
      best_index = out.part_index[at];
    } else {
      second_best = fminf(second_best, o1);
    }
  }
  const bool need_norm = out.dist != nullptr || out.second != nullptr;
  WriteFinal(i, need_norm ? SquaredNorm(x + i * d, d) : 0.0f, best, best_index, second_best, out);
}

// norms [k] of c [k, d], with the CPU search's rounding (separate multiply and add).
__global__ void CentroidNormsKernel(const float* __restrict__ c, int64_t k, int d,
                                    float* __restrict__ norms) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < k) norms[j] = SquaredNorm(c + j * d, d);
}

template <bool kTop2>
Status LaunchSearchKernel(int d, dim3 grid, size_t smem, cudaStream_t stream, const float* x,
                          int64_t n, const DeviceCodebookView& cb, int tile, int64_t split_len,
                          const SearchOutputs& out) {
#define QF_SEARCH_CASE(DIM)                                                                  \
  case DIM:                                                                                  \
    NearestCentroidKernel<DIM, kTop2><<<grid, kSearchThreads, smem, stream>>>(              \
        x, n, d, cb.centroids, cb.norms, cb.k, tile, split_len, out);                        \
    break;
  switch (d) {
    QF_SEARCH_CASE(1)
    QF_SEARCH_CASE(2)
    QF_SEARCH_CASE(3)
    QF_SEARCH_CASE(4)
    QF_SEARCH_CASE(6)
    QF_SEARCH_CASE(8)
    QF_SEARCH_CASE(10)
    QF_SEARCH_CASE(12)
    QF_SEARCH_CASE(16)
    default:
      NearestCentroidKernel<0, kTop2><<<grid, kSearchThreads, smem, stream>>>(
          x, n, d, cb.centroids, cb.norms, cb.k, tile, split_len, out);
      break;
  }
#undef QF_SEARCH_CASE
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return OkStatus();
}

// ---- k-means kernels ------------------------------------------------------------------------

constexpr int kReduceThreads = 256;
constexpr int kStatBlocks = 1024;  // fixed grid of the reductions (deterministic partials)

// Read once per iteration (and after each update) by the host.
struct IterationScalars {
  double inertia;                 // Σ w·dist of the last assignment
  unsigned long long changed;     // points whose assignment changed
  unsigned long long empty;       // clusters without weight after the last update
};

__global__ void SumPartialsKernel(const double* __restrict__ partial, int count,
                                  double* __restrict__ out, bool accumulate) {
  double v = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) v += partial[i];
  v = BlockSum(v);
  if (threadIdx.x == 0) *out = accumulate ? *out + v : v;
}

// x [n, d] −= mean [d].
__global__ void CenterKernel(float* __restrict__ x, int64_t n, int d,
                             const float* __restrict__ mean) {
  const int64_t total = n * d;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    x[i] -= mean[i % d];
  }
}

// ‖a − b‖² with the rounding of the CPU k-means's SqDist (no contraction).
__device__ __forceinline__ float SquaredDistance(const float* a, const float* b, int d) {
  float s = 0.0f;
  for (int t = 0; t < d; ++t) {
    const float e = __fsub_rn(a[t], b[t]);
    s = __fadd_rn(s, __fmul_rn(e, e));
  }
  return s;
}

// Exact distances of the assignment (the CPU's SqDist rounding), the weighted inertia per
// block (partial [gridDim.x]) and the number of changed assignments (when prev != null).
__global__ void AssignmentStatsKernel(const float* __restrict__ x,  // [n, d]
                                      int64_t n, int d,
                                      const float* __restrict__ c,  // [k, d]
                                      const int32_t* __restrict__ a,     // [n]
                                      const int32_t* __restrict__ prev,  // [n] or null
                                      const float* __restrict__ w,       // [n] or null
                                      float* __restrict__ dist,          // [n]
                                      double* __restrict__ partial,      // [gridDim.x]
                                      unsigned long long* __restrict__ changed) {
  double inertia = 0;
  unsigned long long moved = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = SquaredDistance(x + i * d, c + static_cast<int64_t>(a[i]) * d, d);
    dist[i] = s;
    inertia += static_cast<double>(w != nullptr ? w[i] : 1.0f) * static_cast<double>(s);
    if (prev != nullptr && prev[i] != a[i]) ++moved;
  }
  inertia = BlockSum(inertia);
  moved = BlockSum(moved);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = inertia;
    if (prev != nullptr) atomicAdd(changed, moved);
  }
}

// Weighted sums of the members of each cluster (points with w > 0 only, as the CPU).
__global__ void AccumulateClustersKernel(const float* __restrict__ x,  // [n, d]
                                         int64_t n, int d,
                                         const int32_t* __restrict__ a,  // [n]
                                         const float* __restrict__ w,    // [n] or null
                                         double* __restrict__ sums,      // [k, d]
                                         double* __restrict__ wsum,      // [k]
                                         unsigned long long* __restrict__ npos) {  // [k]
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float wi = w != nullptr ? w[i] : 1.0f;
  if (!(wi > 0.0f)) return;
  const int64_t j = a[i];
  const float* xi = x + i * d;
  for (int t = 0; t < d; ++t) {
    atomicAdd(sums + j * d + t, static_cast<double>(wi) * static_cast<double>(xi[t]));
  }
  atomicAdd(wsum + j, static_cast<double>(wi));
  atomicAdd(npos + j, 1ull);
}

// c[j] = sums[j] / wsum[j] where wsum[j] > 0; the other clusters keep their centroid and are
// listed in empties (in no particular order).
__global__ void FinalizeCentroidsKernel(int64_t k, int d, const double* __restrict__ sums,
                                        const double* __restrict__ wsum, float* __restrict__ c,
                                        int32_t* __restrict__ empties,
                                        unsigned long long* __restrict__ num_empty) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  const double ws = wsum[j];
  if (ws > 0) {
    for (int t = 0; t < d; ++t) c[j * d + t] = static_cast<float>(sums[j * d + t] / ws);
  } else {
    empties[atomicAdd(num_empty, 1ull)] = static_cast<int32_t>(j);
  }
}

// ---- Pruning kernels: KMeans()'s bound-based assignment (kmeans.cc) step by step ------------
// Bounds are distances (not squared). lower[i] bounds from below the distance of point i to
// every centroid other than its own. The margin eps_rel·(‖x‖² + max‖c‖²) covers the float32
// expansion error of the search's squared distances, as on the CPU.

// Written on the device, read by the host once per step.
struct PruneScalars {
  float max1;               // largest centroid drift ‖c_new − c_old‖ (0 when none moved)
  float max2;               // largest drift of the other centroids
  float cmax;               // max_j ‖c_j‖²
  int32_t arg1;             // the centroid with drift max1 (lowest index; −1 when max1 == 0)
  unsigned int moved;       // centroids with drift > 0, listed in increasing order
  unsigned int candidates;  // points that failed the Hamerly test (step 1)
  unsigned int fallbacks;   // candidates left for a full search (step 2)
};

constexpr int kSummaryThreads = 1024;
constexpr int kListThreads = 256;  // a multiple of 32: the list kernels append warp by warp

// Appends `value` to list[*count ..] when `take`; every lane of the warp calls it together.
__device__ __forceinline__ void WarpAppend(bool take, int32_t value, int32_t* list,
                                           unsigned int* count) {
  const unsigned int mask = __ballot_sync(0xffffffffu, take);
  if (mask == 0) return;  // uniform across the warp
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int leader = __ffs(static_cast<int>(mask)) - 1;
  unsigned int base = 0;
  if (lane == leader) base = atomicAdd(count, static_cast<unsigned int>(__popc(mask)));
  base = __shfl_sync(0xffffffffu, base, leader);
  if (take) list[base + static_cast<unsigned int>(__popc(mask & ((1u << lane) - 1u)))] = value;
}

// sqrt(max(0, squared − margin)): a distance bound from a search's squared distance.
__device__ __forceinline__ float BoundFromSquared(float squared, float margin) {
  return __fsqrt_rn(fmaxf(0.0f, __fsub_rn(squared, margin)));
}

__device__ __forceinline__ float Margin(float eps_rel, const float* x, int d, float cmax) {
  return __fmul_rn(eps_rel, __fadd_rn(SquaredNorm(x, d), cmax));
}

// drift[j] = ‖c_j − c_old_j‖.
__global__ void DriftKernel(const float* __restrict__ c, const float* __restrict__ c_old, int64_t k,
                            int d, float* __restrict__ drift) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < k) drift[j] = __fsqrt_rn(SquaredDistance(c + j * d, c_old + j * d, d));
}

// One block of kSummaryThreads, thread t owning a contiguous chunk of the centroids. max1,
// arg1 and max2 as KMeans()'s sequential scan (strict >, so the lowest index wins a tie;
// max2 = the largest drift of the centroids other than arg1); the moved centroids listed in
// increasing order.
__global__ void __launch_bounds__(kSummaryThreads)
    DriftSummaryKernel(const float* __restrict__ drift, int64_t k, int32_t* __restrict__ moved,
                       PruneScalars* __restrict__ out) {
  __shared__ float s_val[kSummaryThreads];
  __shared__ int32_t s_idx[kSummaryThreads];
  __shared__ unsigned int s_count[kSummaryThreads];
  const int t = static_cast<int>(threadIdx.x);
  const int64_t chunk = (k + kSummaryThreads - 1) / kSummaryThreads;
  const int64_t j0 = t * chunk < k ? t * chunk : k;
  const int64_t j1 = j0 + chunk < k ? j0 + chunk : k;
  float m1 = 0.0f;
  int32_t a1 = -1;
  unsigned int count = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const float v = drift[j];
    if (v > m1) {
      m1 = v;
      a1 = static_cast<int32_t>(j);
    }
    if (v > 0.0f) ++count;
  }
  s_val[t] = m1;
  s_idx[t] = a1;
  s_count[t] = count;
  __syncthreads();
  // Chunks are in index order, so on equal values the lower thread holds the lower index.
  for (int stride = kSummaryThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride && s_val[t + stride] > s_val[t]) {
      s_val[t] = s_val[t + stride];
      s_idx[t] = s_idx[t + stride];
    }
    __syncthreads();
  }
  const float max1 = s_val[0];
  const int32_t arg1 = s_idx[0];
  __syncthreads();  // everyone has read s_val[0] before it is reused
  float m2 = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    if (j != arg1) m2 = fmaxf(m2, drift[j]);
  }
  s_val[t] = m2;
  __syncthreads();
  for (int stride = kSummaryThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) s_val[t] = fmaxf(s_val[t], s_val[t + stride]);
    __syncthreads();
  }
  if (t == 0) {
    unsigned int run = 0;  // exclusive prefix sum of the per-chunk counts
    for (int q = 0; q < kSummaryThreads; ++q) {
      const unsigned int cq = s_count[q];
      s_count[q] = run;
      run += cq;
    }
    out->max1 = max1;
    out->max2 = s_val[0];
    out->arg1 = arg1;
    out->moved = run;
  }
  __syncthreads();
  unsigned int pos = s_count[t];
  for (int64_t j = j0; j < j1; ++j) {
    if (drift[j] > 0.0f) moved[pos++] = static_cast<int32_t>(j);
  }
}

// *out = max(0, max_j v[j]); one block of kSummaryThreads.
__global__ void __launch_bounds__(kSummaryThreads)
    MaxValueKernel(const float* __restrict__ v, int64_t count, float* __restrict__ out) {
  __shared__ float s_val[kSummaryThreads];
  const int t = static_cast<int>(threadIdx.x);
  float m = 0.0f;
  for (int64_t j = t; j < count; j += kSummaryThreads) m = fmaxf(m, v[j]);
  s_val[t] = m;
  __syncthreads();
  for (int stride = kSummaryThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) s_val[t] = fmaxf(s_val[t], s_val[t + stride]);
    __syncthreads();
  }
  if (t == 0) *out = s_val[0];
}

// After a full top-2 search of every point: lower[i] from the second-nearest distance.
__global__ void BoundsFromSecondKernel(const float* __restrict__ x, int64_t n, int d,
                                       const float* __restrict__ second,
                                       const PruneScalars* __restrict__ ps, float eps_rel,
                                       float* __restrict__ lower) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  lower[i] = BoundFromSquared(second[i], Margin(eps_rel, x + i * d, d, ps->cmax));
}

// Step 1 (Hamerly): the exact distance to the own centroid against the lower bound shrunk by
// the largest drift of any other centroid; a point within it keeps its centroid (and the
// shrunk bound), the others are listed as candidates (their bound still holds for every
// unmoved centroid). Writes dist[i] = the exact squared distance to the own centroid.
__global__ void __launch_bounds__(kListThreads)
    HamerlyTestKernel(const float* __restrict__ x, int64_t n, int d, const float* __restrict__ c,
                      const int32_t* __restrict__ a, PruneScalars* __restrict__ ps,
                      float* __restrict__ lower, float* __restrict__ dist,
                      int32_t* __restrict__ cand) {
  const float max1 = ps->max1, max2 = ps->max2;
  const int32_t arg1 = ps->arg1;
  // The loop bound is uniform across each warp, so WarpAppend sees every lane.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < n;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    bool need = false;
    if (i < n) {
      const int32_t own = a[i];
      const float bound = __fsub_rn(lower[i], own == arg1 ? max2 : max1);
      const float d2 = SquaredDistance(x + i * d, c + static_cast<int64_t>(own) * d, d);
      dist[i] = d2;
      if (__fsqrt_rn(d2) <= bound) {
        lower[i] = bound;
      } else {
        need = true;
      }
    }
    WarpAppend(need, static_cast<int32_t>(i), cand, &ps->candidates);
  }
}

// dst[q] = src[rows[q]] for q < count (rows of d floats).
__global__ void GatherRowsKernel(const float* __restrict__ src, int d,
                                 const int32_t* __restrict__ rows, int64_t count,
                                 float* __restrict__ dst) {
  const int64_t total = count * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = e / d;
    dst[e] = src[static_cast<int64_t>(rows[q]) * d + (e - q * d)];
  }
}

// Step 2: candidate q (point s = cand[q]) was searched against the moved centroids only
// (nearest moved[idx[q]] at squared distance d1[q], second d2[q]). The old bound l still
// holds for every unmoved centroid other than the own, u is the exact distance to the own
// centroid. Settled exactly when the own (unmoved) centroid or the best moved one is within
// l; otherwise s is listed for a full search.
__global__ void __launch_bounds__(kListThreads)
    MovedCentroidsDecisionKernel(const float* __restrict__ x, int d, const float* __restrict__ c,
                                 const float* __restrict__ drift,
                                 const int32_t* __restrict__ moved,
                                 const int32_t* __restrict__ cand, int64_t num_cand,
                                 const int32_t* __restrict__ idx, const float* __restrict__ d1,
                                 const float* __restrict__ d2, float eps_rel,
                                 PruneScalars* __restrict__ ps, int32_t* __restrict__ a,
                                 float* __restrict__ dist, float* __restrict__ lower,
                                 int32_t* __restrict__ full) {
  const float cmax = ps->cmax;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < num_cand;
       base += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = base + threadIdx.x;
    bool fallback = false;
    int32_t s = 0;
    if (q < num_cand) {
      s = cand[q];
      const float* xs = x + static_cast<int64_t>(s) * d;
      const float margin = Margin(eps_rel, xs, d, cmax);
      const int32_t j1 = moved[idx[q]];
      const float e1sq = SquaredDistance(xs, c + static_cast<int64_t>(j1) * d, d);
      const float e1 = __fsqrt_rn(e1sq);
      const float b1 = BoundFromSquared(d1[q], margin);
      const float b2 = BoundFromSquared(d2[q], margin);
      const float u = __fsqrt_rn(dist[s]);
      const float l = lower[s];
      const bool own_moved = drift[a[s]] > 0.0f;
      if (!own_moved && u <= l && u <= e1) {
        lower[s] = fminf(l, b1);  // keeps its centroid
      } else if (e1 <= l && (own_moved || e1 < u)) {
        lower[s] = own_moved ? fminf(l, b2) : fminf(fminf(l, u), b2);
        a[s] = j1;
        dist[s] = e1sq;
      } else {
        fallback = true;
      }
    }
    WarpAppend(fallback, s, full, &ps->fallbacks);
  }
}

// Step 3: point s = list[q] was searched against every centroid (nearest idx[q], second
// nearest at squared distance second[q]).
__global__ void FullSearchDecisionKernel(const float* __restrict__ x, int d,
                                         const float* __restrict__ c,
                                         const int32_t* __restrict__ list, int64_t count,
                                         const int32_t* __restrict__ idx,
                                         const float* __restrict__ second, float eps_rel,
                                         const PruneScalars* __restrict__ ps,
                                         int32_t* __restrict__ a, float* __restrict__ dist,
                                         float* __restrict__ lower) {
  const int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= count) return;
  const int32_t s = list[q];
  const int32_t j = idx[q];
  const float* xs = x + static_cast<int64_t>(s) * d;
  a[s] = j;
  dist[s] = SquaredDistance(xs, c + static_cast<int64_t>(j) * d, d);
  lower[s] = BoundFromSquared(second[q], Margin(eps_rel, xs, d, ps->cmax));
}

int BlocksFor(int64_t count, int threads) {
  return static_cast<int>(std::max<int64_t>(1, CeilDiv(count, threads)));
}

// ---- The host-facing search -----------------------------------------------------------------

// Copies the points and centroids to the device per call, searches there, copies the
// results back (the VPTQ solver keeps its data on the device and uses DeviceNearestSearch).
class CudaNearestCentroidSearch final : public NearestCentroidSearch {
 public:
  explicit CudaNearestCentroidSearch(std::shared_ptr<GpuContext> ctx) : ctx_(std::move(ctx)) {}

  Status Init() {
    QF_RETURN_IF_ERROR(ctx_->Activate());
    return search_.Init(*ctx_);
  }

  const char* name() const override { return "cuda-direct"; }
  bool SupportsSecondNearest() const override { return true; }

 protected:
  // After the checks of kmeans.h's Assign / AssignTop2: the CUDA search's dimension limit.
  Status Search(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
                float* dist, float* second) override {
    if (d > kMaxSearchDim) {
      return InvalidArgumentError("nearest-centroid search: d = " + std::to_string(d) +
                                  " exceeds the CUDA search's limit of " +
                                  std::to_string(kMaxSearchDim));
    }
    if (n == 0) return OkStatus();
    QF_RETURN_IF_ERROR(ctx_->Activate());
    const GpuContext& ctx = *ctx_;
    DeviceBuffer<float> dx, dc, dnorms, ddist, dsecond;
    DeviceBuffer<int32_t> didx;
    QF_RETURN_IF_ERROR(dx.Allocate(ctx, n * d));
    QF_RETURN_IF_ERROR(dc.Allocate(ctx, k * d));
    QF_RETURN_IF_ERROR(dnorms.Allocate(ctx, k));
    QF_RETURN_IF_ERROR(didx.Allocate(ctx, n));
    if (dist != nullptr) QF_RETURN_IF_ERROR(ddist.Allocate(ctx, n));
    if (second != nullptr) QF_RETURN_IF_ERROR(dsecond.Allocate(ctx, n));
    QF_RETURN_IF_ERROR(Upload(ctx, x, n * d, dx.get()));
    QF_RETURN_IF_ERROR(Upload(ctx, c, k * d, dc.get()));
    QF_RETURN_IF_ERROR(ComputeCentroidNorms(ctx, dc.get(), k, d, dnorms.get()));
    const DeviceCodebookView view{dc.get(), dnorms.get(), k, d};
    QF_RETURN_IF_ERROR(search_.Run(dx.get(), n, view, didx.get(), ddist.get(), dsecond.get()));
    QF_RETURN_IF_ERROR(Download(ctx, didx.get(), n, idx));
    if (dist != nullptr) QF_RETURN_IF_ERROR(Download(ctx, ddist.get(), n, dist));
    if (second != nullptr) QF_RETURN_IF_ERROR(Download(ctx, dsecond.get(), n, second));
    return OkStatus();
  }

  std::shared_ptr<GpuContext> ctx_;
  DeviceNearestSearch search_;
};

}  // namespace

// ---- DeviceNearestSearch --------------------------------------------------------------------

Status ComputeCentroidNorms(const GpuContext& ctx, const float* c, int64_t k, int d, float* norms) {
  if (k == 0) return OkStatus();
  CentroidNormsKernel<<<BlocksFor(k, 256), 256, 0, ctx.stream()>>>(c, k, d, norms);
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return OkStatus();
}

Status DeviceNearestSearch::Init(const GpuContext& ctx) {
  ctx_ = &ctx;
  scratch_entries_ = SearchScratchEntries(ctx.properties().multiProcessorCount);
  QF_RETURN_IF_ERROR(part_best_.Allocate(ctx, scratch_entries_));
  QF_RETURN_IF_ERROR(part_second_.Allocate(ctx, scratch_entries_));
  QF_RETURN_IF_ERROR(part_index_.Allocate(ctx, scratch_entries_));
  return OkStatus();
}

Status DeviceNearestSearch::Run(const float* x, int64_t n, const DeviceCodebookView& cb,
                                int32_t* idx, float* dist, float* second) {
  if (ctx_ == nullptr) return InternalError("DeviceNearestSearch::Run before Init");
  if (n == 0) return OkStatus();
  const int d = cb.d;
  if (d < 1 || d > kMaxSearchDim) {
    return InvalidArgumentError("nearest-centroid search: d = " + std::to_string(d) +
                                " outside [1, " + std::to_string(kMaxSearchDim) + "]");
  }
  if (cb.k < 1 || cb.k > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError("nearest-centroid search: k = " + std::to_string(cb.k) +
                                " outside [1, 2^31 - 1]");
  }
  const int tile = TileCentroids(d);
  const size_t smem = static_cast<size_t>(tile) * static_cast<size_t>(d + 1) * sizeof(float);
  const int64_t point_blocks = CeilDiv(n, kPointsPerBlock);
  if (point_blocks > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError("nearest-centroid search: n = " + std::to_string(n) + " is too large");
  }
  // Split the centroids across blocks when the points alone leave the device idle. Then
  // splits·n < 2·target·512 = scratch_entries_ (n <= point_blocks·512, point_blocks < target).
  const int64_t target = static_cast<int64_t>(kSearchBlocksPerSm) *
                         std::max(ctx_->properties().multiProcessorCount, 1);
  int64_t splits = 1;
  if (point_blocks < target) {
    splits = std::max<int64_t>(1, std::min(CeilDiv(target, point_blocks),
                                           CeilDiv(cb.k, kMinCentroidsPerSplit)));
  }
  const int64_t split_len = CeilDiv(cb.k, splits);
  splits = CeilDiv(cb.k, split_len);
  if (splits > 1 && splits * n > scratch_entries_) {
    return InternalError("nearest-centroid search: split scratch too small");
  }
  SearchOutputs out;
  out.idx = idx;
  out.dist = dist;
  out.second = second;
  out.part_index = part_index_.get();
  out.part_best = part_best_.get();
  out.part_second = part_second_.get();
  const dim3 grid(static_cast<unsigned>(point_blocks), static_cast<unsigned>(splits));
  const bool top2 = second != nullptr;
  if (top2) {
    QF_RETURN_IF_ERROR(LaunchSearchKernel<true>(d, grid, smem, ctx_->stream(), x, n, cb, tile, split_len, out));
  } else {
    QF_RETURN_IF_ERROR(LaunchSearchKernel<false>(d, grid, smem, ctx_->stream(), x, n, cb, tile, split_len, out));
  }
  if (splits > 1) {
    const int blocks = BlocksFor(n, 256);
    if (top2) {
      MergeSplitsKernel<true><<<blocks, 256, 0, ctx_->stream()>>>(x, n, d, static_cast<int>(splits), out);
    } else {
      MergeSplitsKernel<false><<<blocks, 256, 0, ctx_->stream()>>>(x, n, d, static_cast<int>(splits), out);
    }
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return OkStatus();
}

Status SumPartials(const GpuContext& ctx, const double* partial, int count, double* out,
                   bool accumulate) {
  SumPartialsKernel<<<1, kReduceThreads, 0, ctx.stream()>>>(partial, count, out, accumulate);
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return OkStatus();
}

// ---- k-means++ on the device ----------------------------------------------------------------
// KMeansPlusPlusIndices of kmeans.cc with its D² updates and draws on the device, replaying the
// host's seeded choices (DrawKMeansPlusPlus): k − 1 steps of two kernels each, no host round
// trip. The per-chunk sums of w·D² are accumulated as the CPU's AVX-512 update does (16 float
// lanes with FMAs, then the lanes in order in float64), so on an AVX-512 host they are bit-
// identical; the draw inside the chosen chunk uses a float64 prefix sum instead of the CPU's
// running subtraction, so a uniform within rounding of a boundary may pick the neighbour.

namespace {

constexpr int kPlusPlusChunk = 4096;   // the CPU's chunk of the sample
constexpr int kPlusPlusThreads = 256;  // update: one block per chunk
constexpr int kDrawThreads = 1024;     // draw: one block, kPlusPlusChunk / kDrawThreads points each
static_assert(kPlusPlusChunk % kDrawThreads == 0, "draw threads must tile a chunk");

struct PlusPlusState {
  int32_t pick;             // the centre chosen last (an index into the sample)
  int32_t degenerate_step;  // the first step whose total w·D² was 0 (then nothing more is done); 0 = none
};

// xs [d][mp] = x[sample[i]] transposed, zero for the padding i >= m.
__global__ void GatherSampleKernel(const float* __restrict__ x, int d,
                                   const int64_t* __restrict__ sample, int64_t m, int64_t mp,
                                   float* __restrict__ xs) {
  const int64_t total = static_cast<int64_t>(d) * mp;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / mp, i = e - t * mp;
    xs[e] = i < m ? x[sample[i] * d + t] : 0.0f;
  }
}

// Block b: chunk [b·4096, min(mp, (b + 1)·4096)): dmin = min(dmin, ‖x − c‖²) against the centre
// chosen last, and chunk_sum[b] = Σ w·dmin (UpdateMinDistAvx512 of kmeans.cc).
__global__ void __launch_bounds__(kPlusPlusThreads)
    PlusPlusUpdateKernel(const float* __restrict__ xs, int64_t mp, int d,
                         const float* __restrict__ ws, float* __restrict__ dmin,
                         double* __restrict__ chunk_sum, const PlusPlusState* __restrict__ state) {
  __shared__ float s_v[kPlusPlusChunk];
  __shared__ float s_w[kPlusPlusChunk];
  __shared__ float s_lane[16];
  if (state->degenerate_step != 0) return;  // uniform across the grid
  const int64_t a = static_cast<int64_t>(blockIdx.x) * kPlusPlusChunk;
  const int64_t e = a + kPlusPlusChunk < mp ? a + kPlusPlusChunk : mp;
  const int64_t pick = state->pick;
  for (int64_t i = a + threadIdx.x; i < e; i += blockDim.x) {
    float acc = 0.0f;
    for (int t = 0; t < d; ++t) {
      const float diff = __fsub_rn(xs[t * mp + i], xs[t * mp + pick]);
      acc = fmaf(diff, diff, acc);
    }
    const float old = dmin[i];
    const float v = old < acc ? old : acc;
    dmin[i] = v;
    s_v[i - a] = v;
    s_w[i - a] = ws[i];
  }
  __syncthreads();
  if (threadIdx.x < 16) {
    float sum = 0.0f;
    for (int64_t q = threadIdx.x; q < e - a; q += 16) sum = fmaf(s_v[q], s_w[q], sum);
    s_lane[threadIdx.x] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int l = 0; l < 16; ++l) total += s_lane[l];
    chunk_sum[blockIdx.x] = total;
  }
}

// Step `step`: the chunk as the CPU scans it (sequential float64), then the first point of the
// chunk with positive w·D² whose prefix sum exceeds the rest of the draw (the last positive
// one, or the chunk's first, when rounding leaves none).
__global__ void __launch_bounds__(kDrawThreads)
    PlusPlusDrawKernel(const double* __restrict__ chunk_sum, int64_t chunks,
                       const float* __restrict__ ws, const float* __restrict__ dmin, int64_t mp,
                       const double* __restrict__ uniforms, int32_t step,
                       PlusPlusState* __restrict__ state, int32_t* __restrict__ chosen) {
  constexpr int kPer = kPlusPlusChunk / kDrawThreads;
  __shared__ double s_scan[kDrawThreads];
  __shared__ double s_r;
  __shared__ int64_t s_chunk;
  __shared__ int s_stop, s_pick, s_last;
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) {
    s_stop = state->degenerate_step != 0;
    if (!s_stop) {
      double total = 0;
      for (int64_t ch = 0; ch < chunks; ++ch) total += chunk_sum[ch];
      if (total <= 0) {
        state->degenerate_step = step;
        s_stop = 1;
      } else {
        double r = uniforms[step - 1] * total;
        int64_t ch = 0;
        while (ch < chunks - 1 && r >= chunk_sum[ch]) {
          r -= chunk_sum[ch];
          ++ch;
        }
        s_r = r;
        s_chunk = ch;
      }
    }
    s_pick = kPlusPlusChunk;
    s_last = -1;
  }
  __syncthreads();
  if (s_stop) return;  // uniform across the block
  const int64_t a = s_chunk * kPlusPlusChunk;
  const int64_t e = a + kPlusPlusChunk < mp ? a + kPlusPlusChunk : mp;
  const int64_t i0 = a + static_cast<int64_t>(kPer) * tid;
  double v[kPer];
  double local = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t i = i0 + q;
    v[q] = i < e ? static_cast<double>(ws[i]) * static_cast<double>(dmin[i]) : 0.0;
    local += v[q];
  }
  s_scan[tid] = local;
  __syncthreads();
  for (int off = 1; off < kDrawThreads; off <<= 1) {  // inclusive scan (Hillis-Steele)
    const double add = tid >= off ? s_scan[tid - off] : 0.0;
    __syncthreads();
    s_scan[tid] += add;
    __syncthreads();
  }
  double run = tid > 0 ? s_scan[tid - 1] : 0.0;
  const double r = s_r;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int64_t i = i0 + q;
    if (i >= e) break;
    run += v[q];
    if (v[q] > 0) {
      atomicMax(&s_last, static_cast<int>(i - a));
      if (run > r) atomicMin(&s_pick, static_cast<int>(i - a));
    }
  }
  __syncthreads();
  if (tid == 0) {
    const int64_t pick = s_pick < kPlusPlusChunk ? a + s_pick : (s_last >= 0 ? a + s_last : a);
    state->pick = static_cast<int32_t>(pick);
    chosen[step] = static_cast<int32_t>(pick);
  }
}

// The k-means++ initial indices into [0, n) of the device points x [n, d] (uncentred), as
// KMeansInitialCentroids chooses them (up to the rounding noted above); empty when a step's
// total was 0 (every remaining point on a centre: the CPU then draws differently, so the
// caller replays on the host). Requires n > k and validated inputs.
StatusOr<std::vector<int64_t>> DevicePlusPlusIndices(const GpuContext& ctx, const float* x,
                                                     int64_t n, int d, const float* weights,
                                                     const KMeansOptions& options) {
  const int64_t k = options.num_centroids;
  const KMeansPlusPlusDraws draws = DrawKMeansPlusPlus(weights, n, options);
  const int64_t m = static_cast<int64_t>(draws.sample.size());
  if (m > std::numeric_limits<int32_t>::max()) return std::vector<int64_t>{};  // host replay
  const int64_t mp = CeilDiv(m, 16) * 16;
  const int64_t chunks = CeilDiv(mp, kPlusPlusChunk);
  std::vector<float> ws(static_cast<size_t>(mp), 0.0f), dmin(static_cast<size_t>(mp), 0.0f);
  std::copy(draws.weights.begin(), draws.weights.end(), ws.begin());
  std::fill(dmin.begin(), dmin.begin() + m, std::numeric_limits<float>::infinity());
  std::vector<int32_t> chosen(static_cast<size_t>(k), 0);
  chosen[0] = static_cast<int32_t>(draws.first);
  const PlusPlusState start{static_cast<int32_t>(draws.first), 0};

  DeviceBuffer<int64_t> dsample;
  DeviceBuffer<float> dxs, dws, ddmin;
  DeviceBuffer<double> dchunk, duniforms;
  DeviceBuffer<int32_t> dchosen;
  DeviceBuffer<PlusPlusState> dstate;
  QF_RETURN_IF_ERROR(dsample.Allocate(ctx, m));
  QF_RETURN_IF_ERROR(dxs.Allocate(ctx, d * mp));
  QF_RETURN_IF_ERROR(dws.Allocate(ctx, mp));
  QF_RETURN_IF_ERROR(ddmin.Allocate(ctx, mp));
  QF_RETURN_IF_ERROR(dchunk.Allocate(ctx, chunks));
  QF_RETURN_IF_ERROR(duniforms.Allocate(ctx, k - 1));
  QF_RETURN_IF_ERROR(dchosen.Allocate(ctx, k));
  QF_RETURN_IF_ERROR(dstate.Allocate(ctx, 1));
  QF_RETURN_IF_ERROR(Upload(ctx, draws.sample.data(), m, dsample.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, ws.data(), mp, dws.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, dmin.data(), mp, ddmin.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, draws.uniforms.data(), k - 1, duniforms.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, chosen.data(), k, dchosen.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, &start, 1, dstate.get()));
  GatherSampleKernel<<<std::min(BlocksFor(d * mp, 256), 65535), 256, 0, ctx.stream()>>>(
      x, d, dsample.get(), m, mp, dxs.get());
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  for (int64_t j = 1; j < k; ++j) {
    PlusPlusUpdateKernel<<<static_cast<unsigned>(chunks), kPlusPlusThreads, 0, ctx.stream()>>>(
        dxs.get(), mp, d, dws.get(), ddmin.get(), dchunk.get(), dstate.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    PlusPlusDrawKernel<<<1, kDrawThreads, 0, ctx.stream()>>>(
        dchunk.get(), chunks, dws.get(), ddmin.get(), mp, duniforms.get(),
        static_cast<int32_t>(j), dstate.get(), dchosen.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  PlusPlusState end{};
  QF_RETURN_IF_ERROR(Download(ctx, dchosen.get(), k, chosen.data()));
  QF_RETURN_IF_ERROR(Download(ctx, dstate.get(), 1, &end));
  if (end.degenerate_step != 0) return std::vector<int64_t>{};
  std::vector<int64_t> idx(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) idx[static_cast<size_t>(j)] = draws.sample[static_cast<size_t>(chosen[static_cast<size_t>(j)])];
  return idx;
}

}  // namespace

// ---- DeviceKMeans ---------------------------------------------------------------------------

namespace {

// The device state of one k-means run and its steps; see DeviceKMeans below.
class DeviceLloyd {
 public:
  DeviceLloyd(const GpuContext& ctx, DeviceNearestSearch& search, float* x, int64_t n, int d,
              int64_t k, bool prune)
      : ctx_(ctx), search_(search), x_(x), n_(n), d_(d), k_(k), prune_(prune),
        eps_rel_(4.0f * static_cast<float>(d + 2) * std::numeric_limits<float>::epsilon()) {}

  Status Allocate(const float* weights, const std::vector<float>& c) {
    const int64_t kd = k_ * d_;
    if (weights != nullptr) {
      QF_RETURN_IF_ERROR(w_.Allocate(ctx_, n_));
      QF_RETURN_IF_ERROR(Upload(ctx_, weights, n_, w_.get()));
    }
    QF_RETURN_IF_ERROR(c_.Allocate(ctx_, kd));
    QF_RETURN_IF_ERROR(norms_.Allocate(ctx_, k_));
    QF_RETURN_IF_ERROR(dist_.Allocate(ctx_, n_));
    QF_RETURN_IF_ERROR(a_.Allocate(ctx_, n_));
    QF_RETURN_IF_ERROR(prev_.Allocate(ctx_, n_));
    QF_RETURN_IF_ERROR(empties_.Allocate(ctx_, k_));
    QF_RETURN_IF_ERROR(sums_.Allocate(ctx_, kd));
    QF_RETURN_IF_ERROR(wsum_.Allocate(ctx_, k_));
    QF_RETURN_IF_ERROR(npos_.Allocate(ctx_, k_));
    QF_RETURN_IF_ERROR(partial_.Allocate(ctx_, kStatBlocks));
    QF_RETURN_IF_ERROR(scalars_.Allocate(ctx_, 1));
    if (prune_) {
      QF_RETURN_IF_ERROR(lower_.Allocate(ctx_, n_));
      QF_RETURN_IF_ERROR(c_old_.Allocate(ctx_, kd));
      QF_RETURN_IF_ERROR(drift_.Allocate(ctx_, k_));
      QF_RETURN_IF_ERROR(moved_.Allocate(ctx_, k_));
      QF_RETURN_IF_ERROR(moved_c_.Allocate(ctx_, kd));
      QF_RETURN_IF_ERROR(moved_norms_.Allocate(ctx_, k_));
      QF_RETURN_IF_ERROR(cand_.Allocate(ctx_, n_));
      QF_RETURN_IF_ERROR(full_.Allocate(ctx_, n_));
      QF_RETURN_IF_ERROR(gathered_.Allocate(ctx_, n_ * d_));
      QF_RETURN_IF_ERROR(found_.Allocate(ctx_, n_));
      QF_RETURN_IF_ERROR(found_d1_.Allocate(ctx_, n_));
      QF_RETURN_IF_ERROR(found_d2_.Allocate(ctx_, n_));
      QF_RETURN_IF_ERROR(prune_scalars_.Allocate(ctx_, 1));
    }
    return Upload(ctx_, c.data(), kd, c_.get());
  }

  // The first assignment: a full search of every point (top-2 when pruning, for the bounds).
  Status InitialAssignment() {
    QF_RETURN_IF_ERROR(ComputeCentroidNorms(ctx_, c_.get(), k_, d_, norms_.get()));
    searched_points_ += n_;
    if (!prune_) return search_.Run(x_, n_, Codebook(), a_.get(), nullptr, nullptr);
    QF_RETURN_IF_ERROR(search_.Run(x_, n_, Codebook(), a_.get(), found_d1_.get(), found_d2_.get()));
    QF_RETURN_IF_ERROR(MaxCentroidNorm());
    BoundsFromSecondKernel<<<BlocksFor(n_, 256), 256, 0, ctx_.stream()>>>(
        x_, n_, d_, found_d2_.get(), prune_scalars_.get(), eps_rel_, lower_.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return OkStatus();
  }

  // Lloyd update on the device: weighted means; the clusters without weight keep their
  // centroid and are counted (IterationScalars::empty) and listed in empties_.
  Status Update() {
    if (prune_) {
      QF_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(c_old_.get(), c_.get(), c_.bytes(),
                                              cudaMemcpyDeviceToDevice, ctx_.stream()));
    }
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(sums_.get(), 0, sums_.bytes(), ctx_.stream()));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(wsum_.get(), 0, wsum_.bytes(), ctx_.stream()));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(npos_.get(), 0, npos_.bytes(), ctx_.stream()));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(scalars_.get(), 0, sizeof(IterationScalars), ctx_.stream()));
    AccumulateClustersKernel<<<BlocksFor(n_, 256), 256, 0, ctx_.stream()>>>(
        x_, n_, d_, a_.get(), w_.get(), sums_.get(), wsum_.get(), npos_.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    FinalizeCentroidsKernel<<<BlocksFor(k_, 256), 256, 0, ctx_.stream()>>>(
        k_, d_, sums_.get(), wsum_.get(), c_.get(), empties_.get(), &scalars_.get()->empty);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return Download(ctx_, scalars_.get(), 1, &scalars_host_);
  }

  int64_t empty_clusters() const { return static_cast<int64_t>(scalars_host_.empty); }

  // KMeans()'s empty-cluster repair (RepairEmptyClusters of kmeans.h) on host copies of the
  // state; xc are the centred points, w the weights (all 1 when none were given). Returns the
  // number of repairs.
  StatusOr<int64_t> Repair(const std::vector<float>& xc, const std::vector<float>& w) {
    const int64_t ne = empty_clusters();
    const size_t kd = static_cast<size_t>(k_ * d_);
    std::vector<int32_t> listed(static_cast<size_t>(ne)), a(static_cast<size_t>(n_));
    std::vector<float> dist(static_cast<size_t>(n_)), c(kd);
    std::vector<unsigned long long> npos(static_cast<size_t>(k_));
    KMeansClusterSums cs;
    cs.sums.resize(kd);
    cs.wsum.resize(static_cast<size_t>(k_));
    QF_RETURN_IF_ERROR(Download(ctx_, empties_.get(), ne, listed.data()));
    QF_RETURN_IF_ERROR(Download(ctx_, a_.get(), n_, a.data()));
    QF_RETURN_IF_ERROR(Download(ctx_, dist_.get(), n_, dist.data()));
    QF_RETURN_IF_ERROR(Download(ctx_, sums_.get(), static_cast<int64_t>(kd), cs.sums.data()));
    QF_RETURN_IF_ERROR(Download(ctx_, wsum_.get(), k_, cs.wsum.data()));
    QF_RETURN_IF_ERROR(Download(ctx_, npos_.get(), k_, npos.data()));
    QF_RETURN_IF_ERROR(Download(ctx_, c_.get(), static_cast<int64_t>(kd), c.data()));
    cs.npos.assign(npos.begin(), npos.end());
    std::vector<int64_t> empties(listed.begin(), listed.end());
    std::sort(empties.begin(), empties.end());
    std::vector<int64_t> moved_points;
    const int64_t repaired = RepairEmptyClusters(empties, xc.data(), n_, d_, w.data(), a.data(),
                                                 dist.data(), cs, c.data(), &moved_points);
    if (repaired == 0) return repaired;
    QF_RETURN_IF_ERROR(Upload(ctx_, c.data(), static_cast<int64_t>(kd), c_.get()));
    QF_RETURN_IF_ERROR(Upload(ctx_, a.data(), n_, a_.get()));
    QF_RETURN_IF_ERROR(Upload(ctx_, dist.data(), n_, dist_.get()));
    if (prune_) {
      for (const int64_t i : moved_points) {  // forces a search of the moved points
        QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(lower_.get() + i, 0, sizeof(float), ctx_.stream()));
      }
    }
    QF_RETURN_IF_ERROR(ctx_.Synchronize());  // the sources are host temporaries (pageable: staged)
    return repaired;
  }

  // Assignment against the updated centroids (a full search, or KMeans()'s three pruning
  // steps), then the exact distances, the inertia and the number of changed assignments.
  Status Assign() {
    QF_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(prev_.get(), a_.get(), a_.bytes(),
                                            cudaMemcpyDeviceToDevice, ctx_.stream()));
    QF_RETURN_IF_ERROR(ComputeCentroidNorms(ctx_, c_.get(), k_, d_, norms_.get()));
    if (prune_) {
      QF_RETURN_IF_ERROR(PrunedAssignment());
    } else {
      searched_points_ += n_;
      QF_RETURN_IF_ERROR(search_.Run(x_, n_, Codebook(), a_.get(), nullptr, nullptr));
    }
    return Stats(prev_.get());
  }

  // Exact distances, inertia and (with prev) the changed count of the current assignment.
  Status Stats(const int32_t* prev) {
    const int stat_blocks = std::min(kStatBlocks, BlocksFor(n_, 256));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(scalars_.get(), 0, sizeof(IterationScalars), ctx_.stream()));
    AssignmentStatsKernel<<<stat_blocks, kReduceThreads, 0, ctx_.stream()>>>(
        x_, n_, d_, c_.get(), a_.get(), prev, w_.get(), dist_.get(), partial_.get(),
        &scalars_.get()->changed);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_RETURN_IF_ERROR(SumPartials(ctx_, partial_.get(), stat_blocks, &scalars_.get()->inertia, false));
    return Download(ctx_, scalars_.get(), 1, &scalars_host_);
  }

  double inertia() const { return scalars_host_.inertia; }
  bool changed() const { return scalars_host_.changed > 0; }
  int64_t searched_points() const { return searched_points_; }

  Status DownloadCentroids(std::vector<float>& c) {
    return Download(ctx_, c_.get(), k_ * d_, c.data());
  }

 private:
  DeviceCodebookView Codebook() const { return DeviceCodebookView{c_.get(), norms_.get(), k_, d_}; }

  Status MaxCentroidNorm() {
    MaxValueKernel<<<1, kSummaryThreads, 0, ctx_.stream()>>>(norms_.get(), k_,
                                                             &prune_scalars_.get()->cmax);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return OkStatus();
  }

  Status Gather(const float* src, const int32_t* rows, int64_t count, float* dst) {
    GatherRowsKernel<<<std::min(BlocksFor(count * d_, 256), 65535), 256, 0, ctx_.stream()>>>(
        src, d_, rows, count, dst);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return OkStatus();
  }

  // KMeans()'s bound-based assignment (kmeans.cc), with the same decisions per point.
  Status PrunedAssignment() {
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(prune_scalars_.get(), 0, sizeof(PruneScalars), ctx_.stream()));
    DriftKernel<<<BlocksFor(k_, 256), 256, 0, ctx_.stream()>>>(c_.get(), c_old_.get(), k_, d_, drift_.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    DriftSummaryKernel<<<1, kSummaryThreads, 0, ctx_.stream()>>>(drift_.get(), k_, moved_.get(),
                                                                 prune_scalars_.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_RETURN_IF_ERROR(MaxCentroidNorm());
    // Step 1 (Hamerly).
    const int list_blocks = std::min(BlocksFor(n_, kListThreads), 65535);
    HamerlyTestKernel<<<list_blocks, kListThreads, 0, ctx_.stream()>>>(
        x_, n_, d_, c_.get(), a_.get(), prune_scalars_.get(), lower_.get(), dist_.get(), cand_.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    PruneScalars ps;
    QF_RETURN_IF_ERROR(Download(ctx_, prune_scalars_.get(), 1, &ps));
    const int64_t km = ps.moved, nc = ps.candidates;
    // Step 2: the candidates against the moved centroids only.
    const int32_t* full = cand_.get();
    int64_t nf = nc;
    if (km > 0 && km * 10 < k_ * 9 && nc > 0) {
      QF_RETURN_IF_ERROR(Gather(c_.get(), moved_.get(), km, moved_c_.get()));
      QF_RETURN_IF_ERROR(ComputeCentroidNorms(ctx_, moved_c_.get(), km, d_, moved_norms_.get()));
      QF_RETURN_IF_ERROR(Gather(x_, cand_.get(), nc, gathered_.get()));
      QF_RETURN_IF_ERROR(search_.Run(gathered_.get(), nc,
                                     DeviceCodebookView{moved_c_.get(), moved_norms_.get(), km, d_},
                                     found_.get(), found_d1_.get(), found_d2_.get()));
      MovedCentroidsDecisionKernel<<<std::min(BlocksFor(nc, kListThreads), 65535), kListThreads, 0,
                                     ctx_.stream()>>>(
          x_, d_, c_.get(), drift_.get(), moved_.get(), cand_.get(), nc, found_.get(),
          found_d1_.get(), found_d2_.get(), eps_rel_, prune_scalars_.get(), a_.get(), dist_.get(),
          lower_.get(), full_.get());
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      QF_RETURN_IF_ERROR(Download(ctx_, prune_scalars_.get(), 1, &ps));
      searched_points_ += (nc * km + k_ - 1) / k_;  // in full-search equivalents
      full = full_.get();
      nf = ps.fallbacks;
    }
    // Step 3: a full search for the rest.
    if (nf == 0) return OkStatus();
    QF_RETURN_IF_ERROR(Gather(x_, full, nf, gathered_.get()));
    QF_RETURN_IF_ERROR(search_.Run(gathered_.get(), nf, Codebook(), found_.get(), found_d1_.get(),
                                   found_d2_.get()));
    FullSearchDecisionKernel<<<BlocksFor(nf, 256), 256, 0, ctx_.stream()>>>(
        x_, d_, c_.get(), full, nf, found_.get(), found_d2_.get(), eps_rel_, prune_scalars_.get(),
        a_.get(), dist_.get(), lower_.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    searched_points_ += nf;
    return OkStatus();
  }

  const GpuContext& ctx_;
  DeviceNearestSearch& search_;
  float* const x_;
  const int64_t n_;
  const int d_;
  const int64_t k_;
  const bool prune_;
  const float eps_rel_;  // margin for the float32 expansion error, as KMeans()
  int64_t searched_points_ = 0;
  IterationScalars scalars_host_{};

  DeviceBuffer<float> w_, c_, norms_, dist_;
  DeviceBuffer<int32_t> a_, prev_, empties_;
  DeviceBuffer<double> sums_, wsum_, partial_;
  DeviceBuffer<unsigned long long> npos_;
  DeviceBuffer<IterationScalars> scalars_;
  // Pruning only.
  DeviceBuffer<float> lower_, c_old_, drift_, moved_c_, moved_norms_, gathered_, found_d1_, found_d2_;
  DeviceBuffer<int32_t> moved_, cand_, full_, found_;
  DeviceBuffer<PruneScalars> prune_scalars_;
};

}  // namespace

StatusOr<DeviceKMeansResult> DeviceKMeans(const GpuContext& ctx, DeviceNearestSearch& search,
                                          float* x, int64_t n, int d, const float* weights,
                                          const KMeansOptions& options) {
  // Null or empty input: nothing to download; KMeans()'s checks give the message (they read
  // no point when n < 1 or d < 1).
  if (x == nullptr || n < 1 || d < 1) return ValidateKMeansInputs(x, n, d, weights, options);
  const int64_t k = options.num_centroids;
  const size_t nd = static_cast<size_t>(n) * static_cast<size_t>(d);
  // Host copy of the points: the checks, the centering offset, the seeded initialisation and
  // the repairs are KMeans()'s own code on it.
  std::vector<float> xh(nd);
  QF_RETURN_IF_ERROR(Download(ctx, x, static_cast<int64_t>(nd), xh.data()));
  QF_RETURN_IF_ERROR(ValidateKMeansInputs(xh.data(), n, d, weights, options));
  const std::vector<float> mean = KMeansCenteringOffset(xh.data(), n, d, weights, options.center);
  const size_t kd = static_cast<size_t>(k) * static_cast<size_t>(d);

  DeviceKMeansResult res;
  auto finish = [&](std::vector<float>& cent) {
    for (size_t i = 0; i < kd; ++i) cent[i] += mean[i % static_cast<size_t>(d)];
    res.centroids = std::move(cent);
  };
  std::vector<float> c(kd);
  if (n <= k) {  // every point is a centroid (cyclically), as KMeans()
    for (int64_t j = 0; j < k; ++j) {
      for (int t = 0; t < d; ++t) {
        c[static_cast<size_t>(j * d + t)] = xh[static_cast<size_t>((j % n) * d + t)] - mean[static_cast<size_t>(t)];
      }
    }
    res.converged = true;
    QF_RETURN_IF_ERROR(ReportKMeansProgress(options, 0, true));
    finish(c);
    return res;
  }
  // k-means++ on the device (the host loop is ~0.15 ms per centroid at a 262144-point sample);
  // the host replays it only in the rare case the device run cannot follow (see above).
  bool initialised = false;
  if (options.init == KMeansInit::kKMeansPlusPlus) {
    QF_ASSIGN_OR_RETURN(const std::vector<int64_t> idx,
                        DevicePlusPlusIndices(ctx, x, n, d, weights, options));
    for (int64_t j = 0; j < static_cast<int64_t>(idx.size()); ++j) {
      std::copy_n(xh.begin() + idx[static_cast<size_t>(j)] * d, d, c.begin() + j * d);
    }
    initialised = !idx.empty();
  }
  if (!initialised) {
    QF_ASSIGN_OR_RETURN(c, KMeansInitialCentroids(xh.data(), n, d, weights, options));
  }

  for (size_t i = 0; i < kd; ++i) c[i] -= mean[i % static_cast<size_t>(d)];
  // From here on xh holds the centred points, as KMeans()'s xc.
  for (size_t i = 0; i < nd; ++i) xh[i] -= mean[i % static_cast<size_t>(d)];
  if (options.center) {
    DeviceBuffer<float> dmean;
    QF_RETURN_IF_ERROR(dmean.Allocate(ctx, d));
    QF_RETURN_IF_ERROR(Upload(ctx, mean.data(), d, dmean.get()));
    CenterKernel<<<BlocksFor(static_cast<int64_t>(nd), 256 * 8), 256, 0, ctx.stream()>>>(x, n, d, dmean.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  std::vector<float> w(static_cast<size_t>(n), 1.0f);
  if (weights != nullptr) std::copy(weights, weights + n, w.begin());

  // Point indices are int32 in the pruning lists.
  const bool prune = options.prune && n <= std::numeric_limits<int32_t>::max();
  DeviceLloyd lloyd(ctx, search, x, n, d, k, prune);
  QF_RETURN_IF_ERROR(lloyd.Allocate(weights, c));
  QF_RETURN_IF_ERROR(lloyd.InitialAssignment());
  QF_RETURN_IF_ERROR(lloyd.Stats(nullptr));
  double inertia = lloyd.inertia();
  QF_RETURN_IF_ERROR(ReportKMeansProgress(options, 0, false));
  for (int it = 0; it < options.max_iterations; ++it) {
    QF_RETURN_IF_ERROR(lloyd.Update());
    bool repaired_any = false;
    if (lloyd.empty_clusters() > 0) {  // rare after a k-means++ start: on the host
      QF_ASSIGN_OR_RETURN(const int64_t repaired, lloyd.Repair(xh, w));
      res.empty_clusters_repaired += repaired;
      repaired_any = repaired > 0;
    }
    QF_RETURN_IF_ERROR(lloyd.Assign());
    res.iterations = it + 1;
    const double prev = inertia;
    inertia = lloyd.inertia();
    if (!(repaired_any || lloyd.changed()) || (options.tol > 0 && prev - inertia <= options.tol * prev) ||
        inertia == 0) {
      res.converged = true;
      break;
    }
    QF_RETURN_IF_ERROR(ReportKMeansProgress(options, it + 1, false));
  }
  QF_RETURN_IF_ERROR(ReportKMeansProgress(options, res.iterations, true));
  res.inertia = inertia;
  res.searched_points = lloyd.searched_points();
  QF_RETURN_IF_ERROR(lloyd.DownloadCentroids(c));
  finish(c);
  return res;
}

}  // namespace cuda_vptq

StatusOr<std::unique_ptr<NearestCentroidSearch>> NewCudaNearestCentroidSearch(
    std::shared_ptr<GpuContext> ctx) {
  if (ctx == nullptr) return InvalidArgumentError("NewCudaNearestCentroidSearch: null GPU context");
  auto search = std::make_unique<cuda_vptq::CudaNearestCentroidSearch>(std::move(ctx));
  QF_RETURN_IF_ERROR(search->Init());
  return std::unique_ptr<NearestCentroidSearch>(std::move(search));
}

StatusOr<KMeansResult> CudaKMeans(std::shared_ptr<GpuContext> ctx, const float* x, int64_t n,
                                  int d, const float* weights, const KMeansOptions& options) {
  if (ctx == nullptr) return InvalidArgumentError("CudaKMeans: null GPU context");
  if (x == nullptr || n < 1 || d < 1) return ValidateKMeansInputs(x, n, d, weights, options);
  QF_RETURN_IF_ERROR(ctx->Activate());
  cuda_vptq::DeviceNearestSearch search;
  QF_RETURN_IF_ERROR(search.Init(*ctx));
  DeviceBuffer<float> points;
  QF_RETURN_IF_ERROR(points.Allocate(*ctx, n * d));
  QF_RETURN_IF_ERROR(Upload(*ctx, x, n * d, points.get()));
  QF_ASSIGN_OR_RETURN(cuda_vptq::DeviceKMeansResult km,
                      cuda_vptq::DeviceKMeans(*ctx, search, points.get(), n, d, weights, options));
  KMeansResult res;
  res.num_centroids = options.num_centroids;
  res.dim = d;
  res.centroids = std::move(km.centroids);
  res.inertia = km.inertia;
  res.iterations = km.iterations;
  res.converged = km.converged;
  res.empty_clusters_repaired = km.empty_clusters_repaired;
  res.searched_points = km.searched_points;
  return res;
}

}  // namespace qforge::quant

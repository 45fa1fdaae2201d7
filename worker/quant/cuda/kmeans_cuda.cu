// The CUDA nearest-centroid search (NewCudaNearestCentroidSearch of backends.h) and the device
// k-means of the VPTQ backend. See vptq_kernels.cuh for the design and the contracts.
#include <cstddef>  // before matrix.h (via the headers below), which uses ::size_t

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "worker/quant/cuda/backends.h"
#include "worker/quant/cuda/gpu_context.cuh"
#include "worker/quant/cuda/vptq_kernels.cuh"

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
    const float* xi = x + i * d;
    const float* cj = c + static_cast<int64_t>(a[i]) * d;
    float s = 0.0f;
    for (int t = 0; t < d; ++t) {
      const float e = __fsub_rn(xi[t], cj[t]);
      s = __fadd_rn(s, __fmul_rn(e, e));
    }
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

int BlocksFor(int64_t count, int threads) {
  return static_cast<int>(std::max<int64_t>(1, CeilDiv(count, threads)));
}

// ---- Host side of k-means -------------------------------------------------------------------

Status ValidateKMeansOptions(int64_t n, int d, const KMeansOptions& o) {
  if (n < 1) return InvalidArgumentError("k-means: n = " + std::to_string(n) + " points; need >= 1");
  if (d < 1) return InvalidArgumentError("k-means: dimension d = " + std::to_string(d) + " < 1");
  if (o.num_centroids < 1 || o.num_centroids > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError("k-means: num_centroids = " + std::to_string(o.num_centroids) +
                                " outside [1, 2^31 - 1]");
  }
  if (o.max_iterations < 0) {
    return InvalidArgumentError("k-means: max_iterations = " + std::to_string(o.max_iterations) + " < 0");
  }
  if (!(o.tol >= 0) || !std::isfinite(o.tol)) return InvalidArgumentError("k-means: tol must be finite and >= 0");
  if (o.init_max_samples < 0) return InvalidArgumentError("k-means: init_max_samples < 0");
  return OkStatus();
}

// The finiteness and weight checks of KMeans(), with its messages.
Status CheckPointsAndWeights(const std::vector<float>& x, int64_t n, int d, const float* w) {
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) {
      return InvalidArgumentError("k-means: point " + std::to_string(i / static_cast<size_t>(d)) +
                                  " coordinate " + std::to_string(i % static_cast<size_t>(d)) +
                                  " is not finite");
    }
  }
  if (w == nullptr) return OkStatus();
  bool any = false;
  for (int64_t i = 0; i < n; ++i) {
    if (!(w[i] >= 0) || !std::isfinite(w[i])) {
      return InvalidArgumentError("k-means: weight " + std::to_string(i) + " is negative or not finite");
    }
    any = any || w[i] > 0;
  }
  if (!any) return InvalidArgumentError("k-means: all sample weights are zero");
  return OkStatus();
}

// The empty-cluster repair of KMeans() (kmeans.h), on host copies of the iteration state:
// `empties` ascending, a/dist of the last assignment, sums/wsum/npos/c of the update just
// made. xh are the uncentred points, mean the centering offset. Returns the repairs made.
int64_t RepairEmptyClusters(const std::vector<int32_t>& empties, int64_t n, int d,
                            const std::vector<float>& xh, const std::vector<float>& mean,
                            const std::vector<float>& w, std::vector<int32_t>& a,
                            std::vector<float>& dist, std::vector<double>& sums,
                            std::vector<double>& wsum, std::vector<int64_t>& npos,
                            std::vector<float>& c) {
  std::vector<std::pair<double, int64_t>> cands;
  for (int64_t i = 0; i < n; ++i) {
    const size_t s = static_cast<size_t>(i);
    if (w[s] > 0 && dist[s] > 0 && npos[static_cast<size_t>(a[s])] >= 2) {
      cands.emplace_back(static_cast<double>(w[s]) * dist[s], i);
    }
  }
  auto better = [](const std::pair<double, int64_t>& p, const std::pair<double, int64_t>& q) {
    return p.first > q.first || (p.first == q.first && p.second < q.second);
  };
  size_t window = std::min(cands.size(), empties.size() * 4 + 256);
  std::partial_sort(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(window), cands.end(),
                    better);
  size_t pos = 0;
  int64_t repaired = 0;
  std::vector<float> xi(static_cast<size_t>(d));
  for (const int32_t j : empties) {
    int64_t chosen = -1;
    while (chosen < 0) {
      if (pos == window) {
        if (window == cands.size()) break;
        std::sort(cands.begin() + static_cast<std::ptrdiff_t>(window), cands.end(), better);
        window = cands.size();
        continue;
      }
      const int64_t i = cands[pos++].second;
      const size_t s = static_cast<size_t>(i);
      if (npos[static_cast<size_t>(a[s])] >= 2 && dist[s] > 0) chosen = i;
    }
    if (chosen < 0) continue;  // nothing to move: the centroid stays
    const size_t s = static_cast<size_t>(chosen);
    const int64_t old = a[s];
    for (int t = 0; t < d; ++t) {
      xi[static_cast<size_t>(t)] = xh[s * static_cast<size_t>(d) + static_cast<size_t>(t)] - mean[static_cast<size_t>(t)];
    }
    for (int t = 0; t < d; ++t) {
      sums[static_cast<size_t>(old * d + t)] -= static_cast<double>(w[s]) * xi[static_cast<size_t>(t)];
    }
    wsum[static_cast<size_t>(old)] -= w[s];
    --npos[static_cast<size_t>(old)];
    for (int t = 0; t < d; ++t) {
      c[static_cast<size_t>(old * d + t)] =
          static_cast<float>(sums[static_cast<size_t>(old * d + t)] / wsum[static_cast<size_t>(old)]);
      c[static_cast<size_t>(static_cast<int64_t>(j) * d + t)] = xi[static_cast<size_t>(t)];
    }
    wsum[static_cast<size_t>(j)] = w[s];
    npos[static_cast<size_t>(j)] = 1;
    a[s] = j;
    dist[s] = 0;
    ++repaired;
  }
  return repaired;
}

// ---- The host-facing search -----------------------------------------------------------------

Status CheckSearchArgs(const float* x, int64_t n, const float* c, int64_t k, int d,
                       const int32_t* idx) {
  if (n < 0) return InvalidArgumentError("nearest-centroid search: n = " + std::to_string(n) + " < 0");
  if (k < 1 || k > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError("nearest-centroid search: k = " + std::to_string(k) +
                                " outside [1, 2^31 - 1]");
  }
  if (d < 1) return InvalidArgumentError("nearest-centroid search: d = " + std::to_string(d) + " < 1");
  if (d > kMaxSearchDim) {
    return InvalidArgumentError("nearest-centroid search: d = " + std::to_string(d) +
                                " exceeds the CUDA search's limit of " + std::to_string(kMaxSearchDim));
  }
  if (n > 0 && (x == nullptr || c == nullptr || idx == nullptr)) {
    return InvalidArgumentError("nearest-centroid search: null x, c or idx");
  }
  return OkStatus();
}

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

  Status Assign(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
                float* dist) override {
    QF_RETURN_IF_ERROR(CheckSearchArgs(x, n, c, k, d, idx));
    return Run(x, n, c, k, d, idx, dist, nullptr);
  }

  Status AssignTop2(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
                    float* dist, float* second_dist) override {
    QF_RETURN_IF_ERROR(CheckSearchArgs(x, n, c, k, d, idx));
    if (n > 0 && (dist == nullptr || second_dist == nullptr)) {
      return InvalidArgumentError("AssignTop2: null dist or second_dist");
    }
    return Run(x, n, c, k, d, idx, dist, second_dist);
  }

 private:
  Status Run(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
             float* dist, float* second) {
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

// ---- DeviceKMeans ---------------------------------------------------------------------------

StatusOr<DeviceKMeansResult> DeviceKMeans(const GpuContext& ctx, DeviceNearestSearch& search,
                                          float* x, int64_t n, int d, const float* weights,
                                          const KMeansOptions& options) {
  QF_RETURN_IF_ERROR(ValidateKMeansOptions(n, d, options));
  const int64_t k = options.num_centroids;
  const size_t nd = static_cast<size_t>(n) * static_cast<size_t>(d);
  const size_t kd = static_cast<size_t>(k) * static_cast<size_t>(d);

  // Host copy of the points: the centering mean, the seeded initialisation and the repairs
  // follow the CPU code on it.
  std::vector<float> xh(nd);
  QF_RETURN_IF_ERROR(Download(ctx, x, static_cast<int64_t>(nd), xh.data()));
  QF_RETURN_IF_ERROR(CheckPointsAndWeights(xh, n, d, weights));
  std::vector<float> w(static_cast<size_t>(n), 1.0f);
  if (weights != nullptr) std::copy(weights, weights + n, w.begin());
  std::vector<double> mean(static_cast<size_t>(d), 0.0);
  if (options.center) {
    double wsum = 0;
    for (int64_t i = 0; i < n; ++i) {
      wsum += w[static_cast<size_t>(i)];
      for (int t = 0; t < d; ++t) {
        mean[static_cast<size_t>(t)] += static_cast<double>(w[static_cast<size_t>(i)]) * xh[static_cast<size_t>(i * d + t)];
      }
    }
    for (double& m : mean) m /= wsum;
  }
  const std::vector<float> meanf(mean.begin(), mean.end());

  DeviceKMeansResult res;
  if (n <= k) {  // every point is a centroid (cyclically), as KMeans()
    res.centroids.resize(kd);
    for (int64_t j = 0; j < k; ++j) {
      for (int t = 0; t < d; ++t) {
        const float centred = xh[static_cast<size_t>((j % n) * d + t)] - meanf[static_cast<size_t>(t)];
        res.centroids[static_cast<size_t>(j * d + t)] = centred + meanf[static_cast<size_t>(t)];
      }
    }
    res.converged = true;
    return res;
  }
  // KMeansInitialCentroids validates the points and weights as KMeans() does.
  QF_ASSIGN_OR_RETURN(std::vector<float> c, KMeansInitialCentroids(xh.data(), n, d, weights, options));
  for (size_t i = 0; i < kd; ++i) c[i] -= meanf[i % static_cast<size_t>(d)];
  auto finish = [&](std::vector<float>& cent) {
    for (size_t i = 0; i < kd; ++i) cent[i] += meanf[i % static_cast<size_t>(d)];
    res.centroids = std::move(cent);
  };
  if (options.max_iterations == 0) {
    finish(c);
    return res;
  }

  if (options.center) {
    DeviceBuffer<float> dmean;
    QF_RETURN_IF_ERROR(dmean.Allocate(ctx, d));
    QF_RETURN_IF_ERROR(Upload(ctx, meanf.data(), d, dmean.get()));
    CenterKernel<<<BlocksFor(static_cast<int64_t>(nd), 256 * 8), 256, 0, ctx.stream()>>>(x, n, d, dmean.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  DeviceBuffer<float> dw, dc, dnorms, ddist;
  DeviceBuffer<int32_t> da, dprev, dempties;
  DeviceBuffer<double> dsums, dwsum, dpartial;
  DeviceBuffer<unsigned long long> dnpos;
  DeviceBuffer<IterationScalars> dscalars;
  if (weights != nullptr) {
    QF_RETURN_IF_ERROR(dw.Allocate(ctx, n));
    QF_RETURN_IF_ERROR(Upload(ctx, weights, n, dw.get()));
  }
  QF_RETURN_IF_ERROR(dc.Allocate(ctx, static_cast<int64_t>(kd)));
  QF_RETURN_IF_ERROR(dnorms.Allocate(ctx, k));
  QF_RETURN_IF_ERROR(ddist.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(da.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(dprev.Allocate(ctx, n));
  QF_RETURN_IF_ERROR(dempties.Allocate(ctx, k));
  QF_RETURN_IF_ERROR(dsums.Allocate(ctx, static_cast<int64_t>(kd)));
  QF_RETURN_IF_ERROR(dwsum.Allocate(ctx, k));
  QF_RETURN_IF_ERROR(dnpos.Allocate(ctx, k));
  QF_RETURN_IF_ERROR(dpartial.Allocate(ctx, kStatBlocks));
  QF_RETURN_IF_ERROR(dscalars.Allocate(ctx, 1));
  QF_RETURN_IF_ERROR(Upload(ctx, c.data(), static_cast<int64_t>(kd), dc.get()));
  const int point_blocks = BlocksFor(n, 256);
  const int stat_blocks = std::min(kStatBlocks, point_blocks);
  IterationScalars scalars{};

  // Assignment into `a` (nearest centroids), exact distances, inertia and (with prev) the
  // number of changed assignments, read back in one copy.
  auto assign = [&](int32_t* a, const int32_t* prev) -> Status {
    QF_RETURN_IF_ERROR(ComputeCentroidNorms(ctx, dc.get(), k, d, dnorms.get()));
    QF_RETURN_IF_ERROR(search.Run(x, n, DeviceCodebookView{dc.get(), dnorms.get(), k, d}, a, nullptr, nullptr));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dscalars.get(), 0, sizeof(IterationScalars), ctx.stream()));
    AssignmentStatsKernel<<<stat_blocks, kReduceThreads, 0, ctx.stream()>>>(
        x, n, d, dc.get(), a, prev, dw.get(), ddist.get(), dpartial.get(), &dscalars.get()->changed);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_RETURN_IF_ERROR(SumPartials(ctx, dpartial.get(), stat_blocks, &dscalars.get()->inertia, false));
    return Download(ctx, dscalars.get(), 1, &scalars);
  };

  int32_t* a_cur = da.get();
  int32_t* a_prev = dprev.get();
  QF_RETURN_IF_ERROR(assign(a_cur, nullptr));
  double inertia = scalars.inertia;
  for (int it = 0; it < options.max_iterations; ++it) {
    // ---- Update: weighted means on the device.
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dsums.get(), 0, dsums.bytes(), ctx.stream()));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dwsum.get(), 0, dwsum.bytes(), ctx.stream()));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dnpos.get(), 0, dnpos.bytes(), ctx.stream()));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dscalars.get(), 0, sizeof(IterationScalars), ctx.stream()));
    AccumulateClustersKernel<<<point_blocks, 256, 0, ctx.stream()>>>(x, n, d, a_cur, dw.get(), dsums.get(),
                                                                      dwsum.get(), dnpos.get());
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    FinalizeCentroidsKernel<<<BlocksFor(k, 256), 256, 0, ctx.stream()>>>(
        k, d, dsums.get(), dwsum.get(), dc.get(), dempties.get(), &dscalars.get()->empty);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_RETURN_IF_ERROR(Download(ctx, dscalars.get(), 1, &scalars));

    // ---- Empty-cluster repair on the host (rare).
    bool repaired_any = false;
    if (scalars.empty > 0) {
      const int64_t ne = static_cast<int64_t>(scalars.empty);
      std::vector<int32_t> empties(static_cast<size_t>(ne)), a(static_cast<size_t>(n));
      std::vector<float> dist(static_cast<size_t>(n)), ch(kd);
      std::vector<double> sums(kd), wsum(static_cast<size_t>(k));
      std::vector<unsigned long long> npos_raw(static_cast<size_t>(k));
      QF_RETURN_IF_ERROR(Download(ctx, dempties.get(), ne, empties.data()));
      QF_RETURN_IF_ERROR(Download(ctx, a_cur, n, a.data()));
      QF_RETURN_IF_ERROR(Download(ctx, ddist.get(), n, dist.data()));
      QF_RETURN_IF_ERROR(Download(ctx, dsums.get(), static_cast<int64_t>(kd), sums.data()));
      QF_RETURN_IF_ERROR(Download(ctx, dwsum.get(), k, wsum.data()));
      QF_RETURN_IF_ERROR(Download(ctx, dnpos.get(), k, npos_raw.data()));
      QF_RETURN_IF_ERROR(Download(ctx, dc.get(), static_cast<int64_t>(kd), ch.data()));
      std::sort(empties.begin(), empties.end());
      std::vector<int64_t> npos(npos_raw.begin(), npos_raw.end());
      const int64_t repaired = RepairEmptyClusters(empties, n, d, xh, meanf, w, a, dist, sums, wsum, npos, ch);
      if (repaired > 0) {
        res.empty_clusters_repaired += repaired;
        repaired_any = true;
        QF_RETURN_IF_ERROR(Upload(ctx, ch.data(), static_cast<int64_t>(kd), dc.get()));
        QF_RETURN_IF_ERROR(ctx.Synchronize());  // `ch` is a host temporary (pageable: staged)
      }
    }

    // ---- Assignment against the new centroids.
    std::swap(a_cur, a_prev);
    QF_RETURN_IF_ERROR(assign(a_cur, a_prev));
    res.iterations = it + 1;
    const bool changed = repaired_any || scalars.changed > 0;
    const double prev = inertia;
    inertia = scalars.inertia;
    if (!changed || (options.tol > 0 && prev - inertia <= options.tol * prev) || inertia == 0) {
      res.converged = true;
      break;
    }
  }
  res.inertia = inertia;
  QF_RETURN_IF_ERROR(Download(ctx, dc.get(), static_cast<int64_t>(kd), c.data()));
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

}  // namespace qforge::quant

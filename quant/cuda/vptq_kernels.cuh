// Device building blocks of the CUDA VPTQ backend, shared by kmeans_cuda.cu (the nearest-
// centroid search and the Lloyd iterations) and vptq_cuda.cu (the solver). Host launchers
// only; the kernels stay file-local. Include only from .cu files.
//
// Everything runs on the context's stream; pointers marked "device" live on the context's
// device, the others on the host. Thread-compatible: one caller per context at a time.
#ifndef QFORGE_QUANT_CUDA_VPTQ_KERNELS_CUH_
#define QFORGE_QUANT_CUDA_VPTQ_KERNELS_CUH_

#include <cstddef>  // before matrix.h (via kmeans.h/vptq.h), which uses ::size_t
#include <cstdint>
#include <vector>

#include "quant/cuda/gpu_context.cuh"
#include "quant/kmeans.h"

namespace qforge::quant::cuda_vptq {

// Largest vector dimension the search handles (one centroid row plus its norm must fit the
// 32 KiB shared-memory tile).
inline constexpr int kMaxSearchDim = 8191;

// The search's split scratch holds 2 · kSearchBlocksPerSm · multiprocessors · 512 entries of
// 12 bytes whatever n and k (6.5 MiB on an H100); vptq_memory.cc bounds it for 256 SMs.
inline constexpr int kSearchBlocksPerSm = 4;

// A codebook resident on the device.
struct DeviceCodebookView {
  const float* centroids = nullptr;  // [k, d] row-major, device
  const float* norms = nullptr;      // [k] ‖c_j‖², device (ComputeCentroidNorms)
  int64_t k = 0;
  int d = 0;
};

// norms[j] = ‖c_j‖² (float32, sequential over the d coordinates) for device c [k, d].
Status ComputeCentroidNorms(const GpuContext& ctx, const float* c, int64_t k, int d, float* norms);

// Exhaustive nearest-centroid search on device-resident data with the contract of
// NearestCentroidSearch::Assign / AssignTop2 (kmeans.h): squared distances as
// ‖x‖² − 2x·c + ‖c‖² in float32 (clamped at 0), the lowest index on exact ties.
//
// Kernel: a block of 128 threads owns 512 points (4 per thread, held in registers for
// d in {1,2,3,4,6,8,10,12,16}; other d read them from global memory); the centroids stream
// through shared memory in tiles of −2·c and ‖c‖² (≤ 32 KiB); each thread accumulates
// ‖c‖² − 2x·c with FMAs and keeps its running best (and second best) in registers. Nothing
// is stored per (point, centroid) pair. When the points alone fill fewer than 4 blocks per
// multiprocessor (the column sweep: a few thousand points), the centroids are also split
// across blocks and a second kernel merges the per-split winners in split order.
class DeviceNearestSearch {
 public:
  // Allocates the split scratch. `ctx` must outlive this object.
  Status Init(const GpuContext& ctx);

  // x [n, d] (device), codebook `cb` (cb.d == d); writes idx [n] and, when not null,
  // dist [n] and second [n] (device). second != null selects the top-2 kernel. n == 0 is a
  // no-op. INVALID_ARGUMENT: d outside [1, kMaxSearchDim], k outside [1, 2^31 − 1].
  Status Run(const float* x, int64_t n, const DeviceCodebookView& cb, int32_t* idx, float* dist,
             float* second);

 private:
  const GpuContext* ctx_ = nullptr;
  int64_t scratch_entries_ = 0;
  DeviceBuffer<float> part_best_;    // [splits, n]
  DeviceBuffer<float> part_second_;  // [splits, n]
  DeviceBuffer<int32_t> part_index_;  // [splits, n]
};

struct DeviceKMeansResult {
  std::vector<float> centroids;  // [k, d] host, in the coordinates of the input points
  int iterations = 0;
  bool converged = false;
  double inertia = 0;  // Σ w·‖x − c_a‖² for the returned centroids (as KMeansResult)
  int64_t empty_clusters_repaired = 0;
  int64_t searched_points = 0;  // in full-search equivalents, as KMeansResult
};

// Weighted k-means of the device points x [n, d] following KMeans() of kmeans.h step by step:
// its input checks, centering offset, seeded initialisation (k-means++ on the device replaying
// the host's DrawKMeansPlusPlus, the random init and the rare k-means++ the device cannot
// follow by KMeansInitialCentroids on a host copy: a seed gives the CPU path's initial
// codebook, up to rounding at a k-means++ draw boundary), update, empty-cluster
// repair (RepairEmptyClusters on the host; rare after a k-means++ start), stopping test and,
// with options.prune, its bound-based assignment: (1) the Hamerly test, (2) a search of the
// failing points against the moved centroids only, (3) a full search for the rest, each
// decision per point as on the CPU (the lists of points are built with warp-aggregated
// atomics, in no particular order; results do not depend on it). Same result as the CPU path
// up to floating-point ties in the search.
// Per iteration on the device: the update by float64 atomics, the drift summary, the pruning
// steps and searches, exact distances and the inertia / changed-count reduction; the host
// reads 16–32 bytes at each of 2–4 points to size the next launch and to stop, and then
// reports options.progress as KMeans() does (ReportKMeansProgress; CANCELLED when it asks to
// stop).
// `x` is centred in place (it is scratch for the caller). `weights` [n] (host, may be null =
// all 1) must have a positive entry when given. Device memory beyond x (when n > k):
// KMeansBytes in vptq_memory.cc (16·n + 12·k·d + 24·k bytes + 8 KiB without pruning; pruning
// adds 24·n + 4·n·d + 8·k·d + 12·k bytes).
// INVALID_ARGUMENT as KMeans(); errors of CUDA calls as Status.
StatusOr<DeviceKMeansResult> DeviceKMeans(const GpuContext& ctx, DeviceNearestSearch& search,
                                          float* x, int64_t n, int d, const float* weights,
                                          const KMeansOptions& options);

// Sums partial[0 .. count) (device) in a fixed order into *out (device); adds to *out
// instead when `accumulate`. Deterministic.
Status SumPartials(const GpuContext& ctx, const double* partial, int count, double* out,
                   bool accumulate);

// Sum of v over the block, valid in thread 0. Every thread of the block must call it;
// blockDim.x must be a multiple of 32 (at most 1024).
template <typename T>
__device__ T BlockSum(T v) {
  __shared__ T warp_sums[32];
  __syncthreads();  // a previous call's readers are done with warp_sums
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : T(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

}  // namespace qforge::quant::cuda_vptq

#endif  // QFORGE_QUANT_CUDA_VPTQ_KERNELS_CUH_

// Device-memory estimate of the CUDA VPTQ backend (pure arithmetic; built everywhere).
//
// Mirrors the allocations of vptq_cuda.cu and kmeans_cuda.cu phase by phase: what lives for
// the whole call (W, H, per-column vectors, codebooks, search scratch) plus the largest of
// what each phase adds (factorisation, k-means, a pass with its optional phase-error metric,
// the final metric). Every count is an upper bound of the corresponding allocation.
#include <algorithm>

#include "quant/cuda/memory_estimates.h"

namespace qforge::quant {
namespace {

using u64 = uint64_t;

u64 Pos(int64_t x) { return static_cast<u64>(std::max<int64_t>(x, 0)); }

// DeviceKMeans of n points of dimension d into k centroids, with the gathered points: points
// 4nd, weights/distances/two assignment buffers 16n, centroids and norms 4k(d + 1), float64
// sums and weights 8k(d + 1), member counts 8k, empty list 4k, mean 4d, partials 8 KiB; the
// pruning state (always on in VPTQ): bounds, two point lists, the gathered points and the
// search results 24n + 4nd, old and moved centroids 8kd, drift, moved list and norms 12k.
// The device k-means++ runs before any of these exist and needs less (at most the transposed
// sample 4nd, sample indices, weights and D² 16n, draws and choices 12k).
u64 KMeansBytes(u64 n, u64 d, u64 k) {
  const u64 lloyd = 4 * n * d + 16 * n + 4 * k * (d + 1) + 8 * k * (d + 1) + 12 * k + 4 * d + 8192 + 64;
  const u64 pruning = 24 * n + 4 * n * d + 8 * k * d + 12 * k + 64;
  return lloyd + pruning;
}

}  // namespace

uint64_t CudaVptqMemoryBytes(int64_t out_features, int64_t in_features, const VptqOptions& o) {
  const u64 M = Pos(out_features), N = Pos(in_features);
  const u64 v = Pos(std::max(o.vector_len, 1));
  const u64 k = Pos(std::max<int64_t>(o.num_centroids, 1));
  const u64 kr = Pos(o.num_res_centroids);
  const u64 G = Pos(std::max(o.group_num, 1));
  const u64 O = std::min(Pos(o.outlier_size), N);
  const u64 v0 = O > 0 ? Pos(std::max(o.outlier_vector_len, 1)) : 0;
  const u64 k0 = O > 0 ? Pos(std::max<int64_t>(o.outlier_num_centroids, 1)) : 0;
  const u64 S = (N - O) / G;
  const u64 R = (M + v - 1) / v;
  const u64 R0 = O > 0 ? (M + v0 - 1) / v0 : 0;
  const u64 Mpad = std::max(R * v, R0 * v0);
  const u64 block = std::min(Pos(std::max(o.block_size, 1)), N);

  // Whole call: W, H, the per-column vectors (dead flags, scale, bias, inverse permutation,
  // min/max), the codebooks on the device (centroids, norms, the tail copy and its norms),
  // the search's split scratch (12 bytes × 2·4·SMs·512, bounded for 256 SMs).
  const u64 codebook = 4 * (G * k * (2 * v + 2) + G * kr * (2 * v + 2) + k0 * (2 * v0 + 2));
  const u64 search_scratch = 12 * (2 * 4 * 256 * 512);
  const u64 base = 4 * M * N + 4 * N * N + 32 * N + codebook + search_scratch;

  // The factor U and the transposed working copy live from the factorisation to the end of
  // the last pass.
  const u64 u = 4 * N * N, wt0 = 4 * N * Mpad;
  // Factorisation: the damped matrix and its inverse factor (U is written into the first),
  // cuSOLVER's potrf workspace (bounded by the matrix), permutation and diagonal.
  const u64 factorisation = 4 * N * N + 4 * N * N + 4 * N * N + 8 * N + 64;
  // The float64 metric: H in float64, two tiles of max(N, min(M·N, 2^24)) doubles, partials;
  // kept from its first use. A phase error adds the denormalised [M, N] weights.
  const u64 tile = std::max(N, std::min(M * N, u64{1} << 24));
  const u64 metric = 8 * N * N + 16 * tile + 8256;
  const u64 phase_error = o.report_phase_errors ? metric + 4 * M * N : 0;
  // k-means: the largest codebook's points; during the residual k-means the first pass's
  // error copy (wt0-sized) is alive too, and the float64 metric when phase errors are on.
  const u64 rows = std::max<u64>(1, M / v);
  const u64 rows0 = O > 0 ? std::max<u64>(1, M / v0) : 0;
  const u64 kmeans_main = KMeansBytes(S * rows, v, k);
  const u64 kmeans_outlier = O > 0 ? KMeansBytes(O * rows0, v0, k0) : 0;
  const u64 kmeans_residual =
      kr > 0 ? wt0 + KMeansBytes(S * rows, v, kr) + (o.report_phase_errors ? metric : 0) : 0;
  const u64 kmeans = std::max({kmeans_main, kmeans_outlier, kmeans_residual});
  // One pass: working copy, quantised copy, error copy, the block's error rows, the column
  // scratch and the codes.
  const u64 pass = 3 * wt0 + 4 * block * Mpad + 4 * Mpad + 8 * std::max(R, R0) + 8 * G * R * S +
                   4 * R0 * O + 64;
  const u64 final_metric = metric + 4 * M * N;

  const u64 during_solve = u + wt0 + std::max({factorisation - u, kmeans, pass + phase_error});
  const u64 library_slack = u64{64} << 20;  // cuBLAS/cuSOLVER internal workspaces
  return base + std::max(during_solve, final_metric) + library_slack;
}

}  // namespace qforge::quant

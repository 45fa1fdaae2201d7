// Device-memory estimate of the CUDA VPTQ backend (pure arithmetic; built everywhere).
#include <algorithm>

#include "worker/quant/cuda/backends.h"

namespace qforge::quant {

uint64_t CudaVptqMemoryBytes(int64_t out_features, int64_t in_features, const VptqOptions& o) {
  const uint64_t m = static_cast<uint64_t>(std::max<int64_t>(out_features, 0));
  const uint64_t n = static_cast<uint64_t>(std::max<int64_t>(in_features, 0));
  const uint64_t k = static_cast<uint64_t>(std::max<int64_t>(o.num_centroids, 1));
  const uint64_t kr = static_cast<uint64_t>(std::max<int64_t>(o.num_res_centroids, 0));
  const uint64_t v = static_cast<uint64_t>(std::max(o.vector_len, 1));
  const uint64_t g = static_cast<uint64_t>(std::max(o.group_num, 1));
  // W (original, normalised, working), dequantised: 4·m·n floats; H, factor: 3·n² floats;
  // indices: 2·m·n/v int32; codebooks and k-means accumulators: 4·g·(k + kr)·(v + 2) floats;
  // 64 MiB slack for library workspaces.
  return 4 * (4 * m * n + 3 * n * n) + 8 * (m * n / v + n) + 16 * g * (k + kr) * (v + 2) +
         (64ull << 20);
}

}  // namespace qforge::quant

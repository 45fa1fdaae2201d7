// Device-memory estimate of the CUDA GPTQ backend (pure arithmetic; built everywhere).
#include <algorithm>

#include "worker/quant/cuda/backends.h"

namespace qforge::quant {

uint64_t CudaGptqMemoryBytes(int64_t out_features, int64_t in_features, const GptqOptions& o) {
  const uint64_t m = static_cast<uint64_t>(std::max<int64_t>(out_features, 0));
  const uint64_t n = static_cast<uint64_t>(std::max<int64_t>(in_features, 0));
  (void)o;
  // W, working W, error block: 3·m·n floats; H and its factor: 2·n² floats; codes, scales,
  // zeros, metrics scratch; cuSOLVER workspace (bounded by n² floats); 64 MiB slack.
  return 4 * (3 * m * n + 3 * n * n) + m * n + (64ull << 20);
}

}  // namespace qforge::quant

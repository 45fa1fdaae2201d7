// Placeholder replaced by the CUDA GPTQ backend.
#include "worker/quant/cuda/gpu_context.cuh"

namespace qforge::quant {
StatusOr<std::unique_ptr<GptqSolver>> NewCudaGptqSolver(std::shared_ptr<GpuContext>) {
  return UnimplementedError("CUDA GPTQ backend not built yet");
}
}  // namespace qforge::quant

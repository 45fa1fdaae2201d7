// Placeholder replaced by the CUDA VPTQ backend.
#include "worker/quant/cuda/gpu_context.cuh"

namespace qforge::quant {
StatusOr<std::unique_ptr<NearestCentroidSearch>> NewCudaNearestCentroidSearch(std::shared_ptr<GpuContext>) {
  return UnimplementedError("CUDA nearest-centroid search not built yet");
}
StatusOr<std::unique_ptr<VptqSolver>> NewCudaVptqSolver(std::shared_ptr<GpuContext>) {
  return UnimplementedError("CUDA VPTQ backend not built yet");
}
}  // namespace qforge::quant

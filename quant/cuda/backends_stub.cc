// The CUDA backends' factories in a build without CUDA: every one says so.
#include "quant/cuda/backends.h"

namespace qforge::quant {
namespace {
Status NoCuda() { return UnavailableError("this binary was built without CUDA (QFORGE_CUDA=OFF or no nvcc)"); }
}  // namespace

StatusOr<std::shared_ptr<GpuContext>> CreateGpuContext(const GpuContextOptions&) { return NoCuda(); }
int GpuContextDevice(const GpuContext*) { return -1; }
const char* GpuContextDeviceName(const GpuContext*) { return ""; }
StatusOr<std::unique_ptr<GptqSolver>> NewCudaGptqSolver(std::shared_ptr<GpuContext>) { return NoCuda(); }
StatusOr<std::unique_ptr<NearestCentroidSearch>> NewCudaNearestCentroidSearch(std::shared_ptr<GpuContext>) {
  return NoCuda();
}
StatusOr<KMeansResult> CudaKMeans(std::shared_ptr<GpuContext>, const float*, int64_t, int,
                                  const float*, const KMeansOptions&) {
  return NoCuda();
}
StatusOr<std::unique_ptr<VptqSolver>> NewCudaVptqSolver(std::shared_ptr<GpuContext>) { return NoCuda(); }
StatusOr<std::unique_ptr<DecoderForward>> NewCudaDecoderForward(std::shared_ptr<GpuContext>) {
  return NoCuda();
}

}  // namespace qforge::quant

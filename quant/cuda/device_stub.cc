// ListCudaDevices for builds without the CUDA toolkit.
#include "quant/cuda/device.h"

namespace qforge::quant {

bool CudaCompiledIn() { return false; }

StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  return UnavailableError("qforge was built without CUDA (QFORGE_CUDA=OFF or no nvcc found)");
}

StatusOr<uint64_t> CudaDeviceFreeMemoryBytes(int) {
  return UnavailableError("qforge was built without CUDA (QFORGE_CUDA=OFF or no nvcc found)");
}

}  // namespace qforge::quant

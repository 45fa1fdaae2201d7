#include <cuda_runtime.h>

#include <string>

#include "worker/quant/cuda/device.h"

namespace qforge::quant {

bool CudaCompiledIn() { return true; }

StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error state of the runtime
    return UnavailableError(std::string("no CUDA driver or device: ") + cudaGetErrorName(err) +
                            " (" + cudaGetErrorString(err) + ")");
  }
  if (count == 0) return UnavailableError("no CUDA device");
  std::vector<CudaDeviceInfo> devices;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    err = cudaGetDeviceProperties(&prop, i);
    if (err != cudaSuccess) {
      return UnavailableError("cudaGetDeviceProperties(" + std::to_string(i) +
                              "): " + cudaGetErrorString(err));
    }
    CudaDeviceInfo d;
    d.index = i;
    d.name = prop.name;
    d.compute_major = prop.major;
    d.compute_minor = prop.minor;
    d.total_memory_bytes = prop.totalGlobalMem;
    d.multiprocessors = prop.multiProcessorCount;
    size_t free_b = 0, total_b = 0;
    if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
      d.free_memory_bytes = free_b;
    }
    devices.push_back(std::move(d));
  }
  return devices;
}

}  // namespace qforge::quant

#include <cuda_runtime.h>

#include <string>

#include "quant/cuda/device.h"

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
    devices.push_back(std::move(d));
  }
  return devices;
}

StatusOr<uint64_t> CudaDeviceFreeMemoryBytes(int index) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return UnavailableError(std::string("no CUDA driver or device: ") + cudaGetErrorName(err));
  }
  if (index < 0 || index >= count) {
    return UnavailableError("no CUDA device " + std::to_string(index) + " (" +
                            std::to_string(count) + " visible)");
  }
  // Not restored afterwards: with CUDA 12+ setting a device creates its context, and the
  // previous one may never have been used.
  if ((err = cudaSetDevice(index)) == cudaSuccess) {
    size_t free_b = 0, total_b = 0;
    if ((err = cudaMemGetInfo(&free_b, &total_b)) == cudaSuccess) return static_cast<uint64_t>(free_b);
  }
  cudaGetLastError();
  return UnavailableError("cudaMemGetInfo on device " + std::to_string(index) + ": " +
                          cudaGetErrorString(err));
}

}  // namespace qforge::quant

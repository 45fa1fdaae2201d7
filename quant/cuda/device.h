// CUDA device discovery for the worker (registration, `--device` default) and the bench.
// Built into every configuration: without the CUDA toolkit (QFORGE_HAVE_CUDA unset) or without
// a usable driver/GPU, ListCudaDevices returns UNAVAILABLE with the reason, which callers treat
// as "no GPU here: use the CPU backend".
// Thread-safety: safe to call from any thread.
#ifndef QFORGE_QUANT_CUDA_DEVICE_H_
#define QFORGE_QUANT_CUDA_DEVICE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace qforge::quant {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;            // "NVIDIA H100 80GB HBM3"
  int compute_major = 0, compute_minor = 0;
  uint64_t total_memory_bytes = 0;
  int multiprocessors = 0;
};

// True when this binary was built with the CUDA backends.
bool CudaCompiledIn();

// The visible CUDA devices, from their properties only: no CUDA context is created on any of
// them (a context holds ~0.5 GB of device memory, and a worker pinned to one GPU of a node
// must not take it on the others). UNAVAILABLE ("built without CUDA", "no CUDA driver: ...",
// "no CUDA device") when there is none to use.
StatusOr<std::vector<CudaDeviceInfo>> ListCudaDevices();

// The free memory of device `index` now (cudaMemGetInfo). This makes `index` the calling
// thread's current device and creates, or reuses, this process's primary context on it (on
// no other device): call it for the device the process uses, after its context exists.
// UNAVAILABLE as ListCudaDevices, or naming the index.
StatusOr<uint64_t> CudaDeviceFreeMemoryBytes(int index);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_CUDA_DEVICE_H_

// The device memory the CUDA backends need per layer: pure arithmetic, built in every
// configuration (library qforge_quant_cuda_memory, no CUDA runtime). The coordinator places
// tasks with these through job/ without linking the backends themselves.
// Thread-safety: pure functions.
#ifndef QFORGE_QUANT_CUDA_MEMORY_ESTIMATES_H_
#define QFORGE_QUANT_CUDA_MEMORY_ESTIMATES_H_

#include <cstdint>

#include "quant/gptq.h"
#include "quant/vptq.h"

namespace qforge::quant {

// Upper bounds of the device memory one Quantize call allocates for an [out, in] layer
// (every buffer the backend allocates at once, plus cuSOLVER/cuBLAS workspaces), in bytes.
// No task fails with out-of-memory on a device whose free memory is at least this.
uint64_t CudaGptqMemoryBytes(int64_t out_features, int64_t in_features, const GptqOptions& o);
uint64_t CudaVptqMemoryBytes(int64_t out_features, int64_t in_features, const VptqOptions& o);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_CUDA_MEMORY_ESTIMATES_H_

// The device memory the CUDA backends need per layer: pure arithmetic, built in every
// configuration (library qforge_quant_cuda_memory, no CUDA runtime). The coordinator places
// tasks with these through job/ without linking the backends themselves.
// Thread-safety: pure functions.
#ifndef QFORGE_QUANT_CUDA_MEMORY_ESTIMATES_H_
#define QFORGE_QUANT_CUDA_MEMORY_ESTIMATES_H_

#include <cstdint>

#include "quant/decoder.h"
#include "quant/gptq.h"
#include "quant/vptq.h"

namespace qforge::quant {

// Upper bounds of the device memory one Quantize call allocates for an [out, in] layer
// (every buffer the backend allocates at once, plus cuSOLVER/cuBLAS workspaces), in bytes.
// No task fails with out-of-memory on a device whose free memory is at least this.
uint64_t CudaGptqMemoryBytes(int64_t out_features, int64_t in_features, const GptqOptions& o);
uint64_t CudaVptqMemoryBytes(int64_t out_features, int64_t in_features, const VptqOptions& o);

// Upper bound of the device memory one ForwardLayer call of the CUDA decoder forward pass
// (NewCudaDecoderForward) allocates for `samples_per_call` samples of `seq_len` tokens with
// every Hessian sum wanted and a padding mask, plus cuBLAS's workspace, in bytes. It grows with
// samples_per_call only up to one micro-batch (about 4096 tokens of whole samples: the hidden
// states are streamed through the device), and with seq_len (the attention buffers of one
// sample). `config` must pass ValidateDecoderConfig; sizes below 1 count as 1.
uint64_t CudaDecoderForwardMemoryBytes(const DecoderConfig& config, int64_t samples_per_call,
                                       int64_t seq_len);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_CUDA_MEMORY_ESTIMATES_H_

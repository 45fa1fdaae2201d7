// The device side of the min-max grid quantizer for the CUDA GPTQ backend (gptq_cuda.cu):
// quant/quantizer_math.h, whose functions host and device code share, plus the one expression
// whose rounding only the device has to choose. Include only from .cu files.
//
// The shared functions give the CPU's group parameters and codes bit for bit (host_device.h
// says how). FindQuantParams is split: its loops are warp-collective in gptq_cuda.cu (the
// min/max reduction, the candidate search spread over the lanes), its scalar pieces are
// AdjustRange, ParamsForRange, MseCandidate and CandidateError. The MSE objective matches the
// CPU's up to FMA contraction: nvcc contracts its products where it chooses, the CPU's
// x86-64-v3 clone where GCC does.
//
// Thread-safety: pure device functions.
#ifndef QFORGE_QUANT_CUDA_GPTQ_KERNELS_CUH_
#define QFORGE_QUANT_CUDA_GPTQ_KERNELS_CUH_

#include <cuda_runtime.h>

#include "quant/quantizer_math.h"

namespace qforge::quant::gpu {

// x - DequantizeCode(code, p) with one rounding: what the CPU sweep (SweepRows of gptq.cc)
// computes in its x86-64-v3 clone, chosen on every AVX2 host, where GCC contracts it into an
// FMA. Not in quantizer_math.h: the CPU writes the plain difference and leaves the fusing to
// the clone (its baseline clone rounds twice), so no single host expression matches it.
__device__ __forceinline__ float QuantizationResidual(float x, int code, QuantParams p) {
  return fmaf(-p.scale, static_cast<float>(code - p.zero), x);
}

}  // namespace qforge::quant::gpu

#endif  // QFORGE_QUANT_CUDA_GPTQ_KERNELS_CUH_

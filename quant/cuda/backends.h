// The CUDA backends of the quantization core, as the rest of the system sees them: plain C++
// (no CUDA header), built in every configuration. Without the CUDA toolkit (QFORGE_HAVE_CUDA
// unset) every factory returns UNAVAILABLE "built without CUDA"; with it but without a usable
// GPU, CreateGpuContext returns UNAVAILABLE with the driver's reason. The memory estimates
// (memory_estimates.h, included here) are pure arithmetic and work everywhere.
//
// One GpuContext per worker: one device, one CUDA stream, one cuBLAS and one cuSOLVER handle,
// shared by that worker's solvers (and search). Every CUDA, cuBLAS and cuSOLVER call of the
// backends is checked; a failure becomes a Status (RESOURCE_EXHAUSTED for out-of-memory,
// INTERNAL otherwise) whose message names the call, never an abort.
//
// Thread-safety: a GpuContext and the solvers built on it are thread-compatible: one Quantize
// at a time per context (the worker runs one task at a time per device).
#ifndef QFORGE_QUANT_CUDA_BACKENDS_H_
#define QFORGE_QUANT_CUDA_BACKENDS_H_

#include <cstdint>
#include <memory>

#include "quant/cuda/memory_estimates.h"
#include "quant/decoder.h"
#include "quant/gptq.h"
#include "quant/kmeans.h"
#include "quant/layer_quantizer.h"
#include "base/status.h"
#include "quant/vptq.h"

namespace qforge::quant {

class GpuContext;  // defined in cuda/gpu_context.cuh (CUDA translation units only)

struct GpuContextOptions {
  int device = 0;
  // Allow TF32 tensor-core math in the cuBLAS GEMMs where a backend says the parity bound
  // still holds (the GPTQ trailing updates do not use it; see gptq_cuda.cu).
  bool allow_tf32 = false;
};

// Selects the device, creates the stream and the library handles. UNAVAILABLE when the
// binary has no CUDA, there is no driver, or `device` does not exist (naming the count).
StatusOr<std::shared_ptr<GpuContext>> CreateGpuContext(const GpuContextOptions& options = {});

// The device the context drives, and its name ("NVIDIA H100 80GB HBM3"); -1 / "" for null.
int GpuContextDevice(const GpuContext* ctx);
const char* GpuContextDeviceName(const GpuContext* ctx);

// GPTQ on the GPU (backend() == "cuda"): the same contract and options as NewCpuGptqSolver;
// codes agree with the CPU path on >= 99.9 % of entries and proxy loss within 1e-3 relative.
StatusOr<std::unique_ptr<GptqSolver>> NewCudaGptqSolver(std::shared_ptr<GpuContext> ctx);

// The nearest-centroid primitive of kmeans.h on the GPU (points and centroids are copied in
// and the assignment copied out per call; the VPTQ solver uses device-resident variants).
StatusOr<std::unique_ptr<NearestCentroidSearch>> NewCudaNearestCentroidSearch(
    std::shared_ptr<GpuContext> ctx);

// The VPTQ backend's device k-means on host data (the points are copied in, the codebook
// copied out): KMeans() of kmeans.h with its checks, initialisation, repairs, stopping test
// and bound-based pruning, the Lloyd iterations on the GPU. Same result as KMeans() with the
// same options up to floating-point ties in the search. Fills centroids, inertia, iterations,
// converged, empty_clusters_repaired and searched_points; `assignment`, `inertia_history` and
// the timings are left empty.
StatusOr<KMeansResult> CudaKMeans(std::shared_ptr<GpuContext> ctx, const float* x, int64_t n,
                                  int d, const float* weights, const KMeansOptions& options);

// VPTQ on the GPU (backend() == "cuda"): the same contract and options as NewCpuVptqSolver;
// proxy loss within 2 % of the CPU path with the same seed.
StatusOr<std::unique_ptr<VptqSolver>> NewCudaVptqSolver(std::shared_ptr<GpuContext> ctx);

// The layer quantizers of the GPU `ctx` drives (layer_quantizer.h): GPTQ and VPTQ on
// NewCudaGptqSolver and NewCudaVptqSolver, sharing `ctx` (backend() == "cuda"). Errors: those
// of the two factories (UNAVAILABLE in a build without CUDA, INVALID_ARGUMENT for a null ctx).
StatusOr<LayerQuantizerSet> NewCudaLayerQuantizers(std::shared_ptr<GpuContext> ctx);

// The calibration forward pass on the GPU `ctx` drives (quant/decoder.h, backend() ==
// "cuda"): cuBLAS GEMMs, own kernels for RMSNorm, RoPE, the causal softmax and SwiGLU, the
// Hessian sums accumulated on the device in float64 and copied out once per call. Hidden
// states agree with NewCpuDecoderForward within 1e-4 relative (Frobenius), Hessian sums
// within 1e-5. Errors: UNAVAILABLE in a build without CUDA, INVALID_ARGUMENT for a null ctx.
StatusOr<std::unique_ptr<DecoderForward>> NewCudaDecoderForward(std::shared_ptr<GpuContext> ctx);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_CUDA_BACKENDS_H_

// NewCudaLayerQuantizers (backends.h): the CUDA solvers behind the LayerQuantizer interface.
// Plain C++ over the solver factories, so it builds in every configuration (without CUDA the
// factories answer UNAVAILABLE, and so does this).
#include <utility>

#include "base/status_macros.h"
#include "quant/cuda/backends.h"
#include "quant/gptq_layer_quantizer.h"
#include "quant/vptq_layer_quantizer.h"

namespace qforge::quant {

StatusOr<LayerQuantizerSet> NewCudaLayerQuantizers(std::shared_ptr<GpuContext> ctx) {
  QF_ASSIGN_OR_RETURN(std::unique_ptr<GptqSolver> gptq, NewCudaGptqSolver(ctx));
  QF_ASSIGN_OR_RETURN(std::unique_ptr<VptqSolver> vptq, NewCudaVptqSolver(std::move(ctx)));
  LayerQuantizerSet set;
  set.Add(NewGptqLayerQuantizer(std::move(gptq)));
  set.Add(NewVptqLayerQuantizer(std::move(vptq)));
  return set;
}

}  // namespace qforge::quant

// VPTQ behind the LayerQuantizer interface (layer_quantizer.h): checks the layer's
// `config_for_layers` entry against the `vptq` kernels' limits before solving, solves with a
// VptqSolver (CPU or CUDA) with the parameters rounded to the model's dtype, and packs the
// result into the VPTQ checkpoint tensors (vptq_pack.h). QuantizedLayer::layer_config is the
// layer's `config_for_layers` entry as JSON (VptqLayerConfigJson).
// Thread-safety: as LayerQuantizer (one Quantize at a time per instance); VptqLayerConfigJson
// is a pure function.
#ifndef QFORGE_QUANT_VPTQ_LAYER_QUANTIZER_H_
#define QFORGE_QUANT_VPTQ_LAYER_QUANTIZER_H_

#include <memory>
#include <string>

#include "quant/layer_quantizer.h"
#include "quant/vptq.h"
#include "quant/vptq_pack.h"

namespace qforge::quant {

// A VPTQ LayerQuantizer solving with `solver` (not null; owned). Quantize takes
// VptqLayerOptions; codebooks and scales are bfloat16 for a bfloat16 weight and float16 for
// any other. Its errors are VptqConfigFromOptions', ValidateVptqLayerConfig's, the solver's and
// PackVptqLayer's.
std::unique_ptr<LayerQuantizer> NewVptqLayerQuantizer(std::unique_ptr<VptqSolver> solver);

// `c` as the JSON object of its `config_for_layers` entry: exactly the loader's keys, sorted,
// without spaces (what nlohmann::json's dump() writes for the same object), e.g.
// {"bias":false,"enable_norm":true,...,"vector_lens":[-1,8]}.
std::string VptqLayerConfigJson(const VptqLayerConfig& c);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_VPTQ_LAYER_QUANTIZER_H_

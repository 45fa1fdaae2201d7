// GPTQ behind the LayerQuantizer interface (layer_quantizer.h): checks that the layer can be
// stored as a GPTQ checkpoint, solves it with a GptqSolver (CPU or CUDA) and packs the
// result into the Hugging Face GPTQ tensors (gptq_pack.h) for the requested checkpoint
// format. GPTQ has no per-layer artifact config (QuantizedLayer::layer_config stays empty).
// Thread-safety: as LayerQuantizer (one Quantize at a time per instance).
#ifndef QFORGE_QUANT_GPTQ_LAYER_QUANTIZER_H_
#define QFORGE_QUANT_GPTQ_LAYER_QUANTIZER_H_

#include <memory>

#include "quant/gptq.h"
#include "quant/layer_quantizer.h"

namespace qforge::quant {

// The tensors of a GPTQ layer (suffixes after "<module>."), in the order Quantize returns
// them: g_idx I32 [in], qweight I32 [in·bits/32, out], qzeros I32 [groups, out·bits/32],
// scales F16 [groups, out].
inline constexpr const char* kGptqTensorSuffixes[] = {"g_idx", "qweight", "qzeros", "scales"};

// A GPTQ LayerQuantizer solving with `solver` (not null; owned). Quantize takes
// GptqLayerOptions; its errors are CheckGptqPackable's, the solver's and PackGptqLayer's.
std::unique_ptr<LayerQuantizer> NewGptqLayerQuantizer(std::unique_ptr<GptqSolver> solver);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_GPTQ_LAYER_QUANTIZER_H_

// Reads a quantized layer back as the loaders do: the float32 weight [out, in] that
// transformers / vLLM (GPTQ) and the `vptq` package (VPTQ) compute from its tensors, decoded
// with the published formulas (quant/gptq_pack.h DequantizeGptqPacked, quant/vptq_pack.h
// DequantizeVptqLayer), never from the solver's own result. Works on a staged object
// (job/staged_layer.h) and on the artifact's shards alike (both name the tensors
// "<module>.<suffix>"), and scores the result: the relative output error
// tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) under any Hessian, which is how qforge-quantize --score-hessians
// compares a data-free artifact with a calibrated one.
//
// Thread-safety: pure functions; I/O through the given store only.
#ifndef QFORGE_JOB_LAYER_DEQUANTIZER_H_
#define QFORGE_JOB_LAYER_DEQUANTIZER_H_

#include <cstdint>
#include <string_view>

#include "absl/status/statusor.h"
#include "base/matrix.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "nlohmann/json.hpp"
#include "quant/gptq_pack.h"
#include "quant/vptq_pack.h"

namespace qforge {

// The tensors of one quantized module in one safetensors object.
struct QuantizedModuleSource {
  ObjectStore* store = nullptr;
  std::string_view key;            // the object (a staged layer or an artifact shard)
  const SafetensorsHeader* header = nullptr;
  std::string_view module;         // "model.layers.0.mlp.down_proj"
};

// GPTQ: reads <module>.{qweight, qzeros, scales, g_idx}; the bit width follows from the
// shapes (qweight rows · 32 / in_features); `format` says how qzeros is stored (v1: zero − 1).
// INVALID_ARGUMENT naming the tensor when one is missing or of the wrong dtype / shape.
absl::StatusOr<Matrix> DequantizeGptqModule(const QuantizedModuleSource& source,
                                            int64_t out_features, int64_t in_features,
                                            quant::GptqCheckpointFormat format);

// VPTQ: reads the tensors its `config_for_layers` entry `layer_config` (the JSON object the
// staged object's "qforge.vptq_config" or config.json holds) calls for. INVALID_ARGUMENT for a
// malformed config (naming the field) or a missing / ill-shaped tensor.
absl::StatusOr<Matrix> DequantizeVptqModule(const QuantizedModuleSource& source,
                                            const nlohmann::json& layer_config);

// The `config_for_layers` entry as the `vptq` package reads it (the fields of
// quant::VptqLayerConfig; unknown keys ignored). INVALID_ARGUMENT naming the field.
absl::StatusOr<quant::VptqLayerConfig> VptqLayerConfigFromJson(const nlohmann::json& j);

}  // namespace qforge

#endif  // QFORGE_JOB_LAYER_DEQUANTIZER_H_

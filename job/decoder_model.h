// A Llama-family model as the calibration forward pass reads it: config.json → the
// quant::DecoderConfig (architecture checked), one decoder layer's weights as float32
// (ranged reads of that layer's tensors only), embedding rows, and which of a layer's four
// Hessian inputs (quant::DecoderInput, quant/decoder.h) each linear module reads.
//
// Supported architectures (config.json "architectures"[0], or "model_type"):
//   LlamaForCausalLM (llama; Llama 1/2/3, rope_scaling {"rope_type": "llama3"} or none;
//     attention_bias, mlp_bias), MistralForCausalLM (mistral; sliding_window must be null or
//     at least the calibration seq_len, checked by the caller), Qwen2ForCausalLM (qwen2:
//     q/k/v biases), Qwen3ForCausalLM (qwen3: q_norm / k_norm, head_dim from config).
//
// Thread-safety: pure functions, I/O through the given store only.
#ifndef QFORGE_JOB_DECODER_MODEL_H_
#define QFORGE_JOB_DECODER_MODEL_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "quant/decoder.h"

namespace qforge {

// "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM".
const char* SupportedCalibrationArchitectures();

struct DecoderModelConfig {
  std::string architecture;      // e.g. "Qwen2ForCausalLM"
  int64_t sliding_window = 0;    // Mistral's sliding_window (Qwen2/3's with use_sliding_window),
                                 // 0 when null / absent / unused
  quant::DecoderConfig decoder;  // validated (quant::ValidateDecoderConfig)
};

// Parses config.json text. INVALID_ARGUMENT whose message starts with `source` (e.g.
// "spec.model_uri: config.json") and names the field: malformed JSON, an unsupported
// architecture (naming it and the supported ones), a missing or ill-typed size, a
// rope_scaling other than null or llama3 (naming its type), hidden_act other than "silu".
absl::StatusOr<DecoderModelConfig> ParseDecoderModelConfig(std::string_view config_json,
                                                           std::string_view source);
// Reads `<model_dir>config.json` (model_dir "" or ending in "/") from `store`, then as above.
absl::StatusOr<DecoderModelConfig> ReadDecoderModelConfig(ObjectStore& store,
                                                          std::string_view model_dir);

// Reads layer `layer`'s weights (model.layers.<layer>.{input_layernorm, self_attn.*,
// post_attention_layernorm, mlp.*}) as float32 from F16/BF16/F32 tensors and checks them
// (quant::ValidateDecoderLayerWeights). INVALID_ARGUMENT / NOT_FOUND naming the tensor.
absl::StatusOr<quant::DecoderLayerWeights> ReadDecoderLayerWeights(
    ObjectStore& store, const SafetensorsModel& model, const quant::DecoderConfig& config,
    int64_t layer);

// As ReadDecoderLayerWeights, except that the ".weight" tensors of the linear modules named in
// `skip_modules` (full names, "model.layers.3.mlp.down_proj") are neither required nor read:
// their vectors stay empty for the caller to fill (job/evaluation.h decodes them from quantized
// tensors). With a non-empty `skip_modules` nothing is validated: the caller runs
// quant::ValidateDecoderLayerWeights once the weights are complete.
absl::StatusOr<quant::DecoderLayerWeights> ReadDecoderLayerTensors(
    ObjectStore& store, const SafetensorsModel& model, const quant::DecoderConfig& config,
    int64_t layer, const std::vector<std::string>& skip_modules);

// Bytes of one layer's float32 weights (projections, norms, biases) for `config`: what
// ReadDecoderLayerWeights holds at most.
uint64_t DecoderLayerWeightBytes(const quant::DecoderConfig& config);

// out[i · hidden .. ] = row ids[i] of model.embed_tokens.weight, as float32, for i < n
// (reads the rows it needs; any dtype ReadTensorAsF32 takes). INVALID_ARGUMENT for an id
// outside [0, vocab_size) or a table of the wrong shape; NOT_FOUND without the table.
absl::Status EmbedTokens(ObjectStore& store, const SafetensorsModel& model,
                         const quant::DecoderConfig& config, const int32_t* ids, int64_t n,
                         float* out);

// The decoder linear `module` ("model.layers.3.self_attn.k_proj") → its layer and the
// Hessian input it reads (q/k/v → qkv, o_proj → o, gate/up → gate_up, down_proj → down);
// nullopt for any other name.
struct ModuleInput {
  int64_t layer = 0;
  quant::DecoderInput input = quant::DecoderInput::kQkv;
};
std::optional<ModuleInput> DecoderModuleInput(std::string_view module);

// The Hessian-file layout of one layer: the tensor name of each input (the first module
// reading it: q_proj, o_proj, gate_proj, down_proj) and every module reading it, that tensor
// first (so the rest are its aliases: k_proj, v_proj → q_proj; up_proj → gate_proj).
std::string DecoderInputTensorName(int64_t layer, quant::DecoderInput input);
std::vector<std::string> DecoderInputModules(int64_t layer, quant::DecoderInput input);

}  // namespace qforge

#endif  // QFORGE_JOB_DECODER_MODEL_H_

// Evaluation: how good a quantized model is, measured against its original on token data
// the user supplies (the calibration formats, job/calibration_data.h). The job DAG gains
//   ... ASSEMBLE → EVALUATE × shards → EVAL_REDUCE (metrics, quality gate)
// and `qforge eval MODEL --reference ORIGINAL` runs the last two steps alone. The
// coordinator, the worker and the offline drivers all call the functions here.
//
// The candidate model is read exactly as a loader reads it (never from a solver's in-memory
// result), so an evaluation also proves that the artifact decodes:
//   - every decoder linear module <m> of the candidate directory is taken from <m>.weight
//     when that tensor exists (unquantized), else decoded from GPTQ tensors
//     <m>.{qweight,qzeros,scales,g_idx} (config.json quantization_config: bits, group_size,
//     desc_act, sym, checkpoint_format "gptq" | "gptq_v2"; job/layer_dequantizer.h), else
//     from VPTQ tensors <m>.{indices, centroids, ...} with the quantization_config's
//     config_for_layers[<m>] entry; anything else is INVALID_ARGUMENT naming the module.
//   - every other tensor (embeddings, norms, lm_head) is the candidate's own.
// This works for any Hugging Face GPTQ or VPTQ directory of a supported architecture
// (job/decoder_model.h), not only qforge's, and for unquantized ones.
//
// 1. RunEvaluationShard (one EVALUATE task): samples [begin, end) of the evaluation data.
//    Both models are embedded and run decoder layer by decoder layer (one layer of each
//    model's float32 weights in memory at a time; the shard's two hidden-state buffers
//    [samples · seq_len, hidden] float32 live in memory or, above spill_above_bytes, in
//    mapped files under spill_dir) with the device's quant::DecoderForward. The reference
//    model's forward accumulates its layer's four input sums S (quant::LayerHessianSums,
//    the evaluation activations); for every linear module the candidate stores quantized,
//    with W the reference weight and Ŵ the candidate's decoded weight, ΔW = Ŵ − W:
//        output_error += tr(ΔW S ΔWᵀ),   reference_energy += tr(W S Wᵀ)
//    (S summed in float64, rounded to float32 once; ΔW S and W S by float32 GEMMs in blocks
//    of 256 rows; the traces summed in float64), so the module's relative output error on
//    the evaluation data is their ratio, additive over shards. Only the inputs some
//    quantized module reads are summed (none for an unquantized candidate). After the last layer: the final RMSNorm (model.norm) and
//    the LM head (lm_head.weight, or embed_tokens with tie_word_embeddings) of each model
//    (quant/decoder_head.h, on the CPU) give full logits [vocab] per position, in float32
//    GEMM chunks, reduced in float64 per position t whose
//    token and next token are both real (mask 1; t + 1 < seq_len), with y = ids[t + 1],
//    p = softmax(reference logits), q = softmax(candidate logits):
//        nll_reference += −log p[y],   nll_candidate += −log q[y],
//        kl += Σ_v p[v] (log p[v] − log q[v])          (KL(reference ‖ candidate) ≥ 0),
//        top1_agree += (argmax p == argmax q)  (ties: the lowest index),
//        predicted_tokens += 1.
//    The shard's sums are written as JSON (EvaluationSumsToJson) at staged_key.
// 2. ReduceEvaluation (one EVAL_REDUCE task): the shards' sums added (any order) →
//    QualityMetrics; CheckQualityGate applies the user's thresholds.
//
// Thread-safety: pure functions; a DecoderForward runs one call at a time.
#ifndef QFORGE_JOB_EVALUATION_H_
#define QFORGE_JOB_EVALUATION_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "job/calibration.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "nlohmann/json.hpp"
#include "quant/decoder.h"
#include "quant/gptq_pack.h"

namespace qforge {

inline constexpr char kEvaluationPartialName[] = "evaluation.partial.json";

// How a model directory stores its decoder linear modules, from config.json's
// "quantization_config" (absent: kNone).
struct ModelQuantization {
  enum class Method { kNone, kGptq, kVptq };
  Method method = Method::kNone;
  // GPTQ (quant_method "gptq"): the checkpoint format of qzeros ("gptq" = v1, "gptq_v2").
  quant::GptqCheckpointFormat gptq_format = quant::GptqCheckpointFormat::kV1;
  int gptq_bits = 0;
  // VPTQ (quant_method "vptq"): config_for_layers, module name → its layer config object.
  nlohmann::json vptq_config_for_layers = nlohmann::json::object();
  // "gptq 4-bit", "vptq", "none": for messages and the report.
  std::string Describe() const;
};

// Parses `<model_dir>config.json`'s quantization_config. INVALID_ARGUMENT naming the field
// (an unknown quant_method names it and the supported ones: gptq, vptq; a malformed
// config_for_layers; GPTQ bits other than 2, 3, 4, 8).
absl::StatusOr<ModelQuantization> ReadModelQuantization(ObjectStore& store,
                                                        std::string_view model_dir);

// Layer `layer`'s weights as a loader computes them (see above): every linear from .weight
// or decoded from its quantized tensors. `quantized_modules` (optional) receives the full
// names of the modules that were decoded ("model.layers.3.mlp.down_proj"), in the order
// q, k, v, o, gate, up, down. INVALID_ARGUMENT / NOT_FOUND / DATA_LOSS naming the tensor.
absl::StatusOr<quant::DecoderLayerWeights> ReadLoaderLayerWeights(
    ObjectStore& store, const SafetensorsModel& model, const ModelQuantization& quantization,
    const quant::DecoderConfig& config, int64_t layer,
    std::vector<std::string>* quantized_modules = nullptr);

// One quantized module's error sums on the evaluation activations (see above).
struct ModuleErrorSums {
  std::string module;            // "model.layers.3.mlp.down_proj"
  int64_t layer = 0;
  double output_error = 0;       // Σ tr(ΔW S ΔWᵀ)
  double reference_energy = 0;   // Σ tr(W S Wᵀ)
  double relative_error() const {
    return reference_energy > 0 ? output_error / reference_energy : 0.0;
  }
};

// What one or more shards measured (additive).
struct EvaluationSums {
  int64_t samples = 0;
  int64_t predicted_tokens = 0;
  double nll_reference = 0, nll_candidate = 0, kl = 0;
  int64_t top1_agree = 0;
  std::vector<ModuleErrorSums> modules;  // layer order, then q, k, v, o, gate, up, down

  // Adds `other` (modules matched by name; INVALID_ARGUMENT when the sets differ).
  absl::Status Add(const EvaluationSums& other);
};

// {"samples": .., "predicted_tokens": .., "nll_reference": .., "nll_candidate": .., "kl": ..,
//  "top1_agree": .., "modules": [{"module", "layer", "output_error", "reference_energy"}]}
// (doubles printed so they read back exactly).
std::string EvaluationSumsToJson(const EvaluationSums& sums);
// INVALID_ARGUMENT naming `source` and the field for malformed, negative or non-finite values.
absl::StatusOr<EvaluationSums> EvaluationSumsFromJson(std::string_view json,
                                                      std::string_view source);

struct EvaluationShardJob {
  // The original (unquantized) model.
  ObjectStore* reference_store = nullptr;
  const SafetensorsModel* reference_model = nullptr;
  // The model evaluated, read as a loader does (quantization from ReadModelQuantization).
  ObjectStore* candidate_store = nullptr;
  const SafetensorsModel* candidate_model = nullptr;
  const ModelQuantization* candidate_quantization = nullptr;
  // Both models' decoder configs must agree (the caller reads both; checked here:
  // INVALID_ARGUMENT naming the first field that differs).
  const DecoderModelConfig* reference_config = nullptr;
  const DecoderModelConfig* candidate_config = nullptr;
  const CalibrationData* data = nullptr;         // the evaluation tokens
  int64_t sample_begin = 0, sample_end = 0;
  quant::DecoderForward* forward = nullptr;      // the device's (layers); the head runs on the CPU
  std::function<bool(double)> progress;          // fraction done, may cancel (CANCELLED)
  ObjectStore* out_store = nullptr;              // where the shard's sums go (JSON)
  std::string staged_key;
  std::string spill_dir;
  uint64_t spill_above_bytes = kDefaultSpillAboveBytes;
};

struct EvaluationShardOutcome {
  EvaluationSums sums;
  double forward_seconds = 0, head_seconds = 0, read_seconds = 0;
  bool spilled = false;
};

// Step 1 (see above). Errors: INVALID_ARGUMENT (missing pointers, empty / out of range
// samples, configs that differ); the models' errors naming the tensor; the forward's;
// the store's; CANCELLED.
absl::StatusOr<EvaluationShardOutcome> RunEvaluationShard(const EvaluationShardJob& job);

// The metrics of a whole evaluation (sums of every shard).
struct QualityMetrics {
  int64_t samples = 0;
  int64_t tokens = 0;                   // predicted positions
  double ppl_reference = 0;             // exp(nll_reference / tokens)
  double ppl_candidate = 0;             // exp(nll_candidate / tokens)
  double ppl_increase_pct = 0;          // (ppl_candidate / ppl_reference − 1) · 100
  double mean_kl = 0;                   // kl / tokens (nats)
  double top1_agreement = 0;            // top1_agree / tokens
  std::vector<ModuleErrorSums> modules;
  // Storage bits per weight of the candidate's quantized modules (QuantizedBitsPerWeight);
  // not part of the sums: the caller sets it (0 = unknown / nothing quantized).
  double bits_per_weight = 0;
};
QualityMetrics MetricsFromSums(const EvaluationSums& sums);

// Step 2: reads every partial (JSON at `partial_keys` in `store`), adds them, and returns the
// metrics. INVALID_ARGUMENT / DATA_LOSS naming the partial; NOT_FOUND for a missing one.
absl::StatusOr<QualityMetrics> ReduceEvaluation(ObjectStore& store,
                                                const std::vector<std::string>& partial_keys);

// The user's thresholds (unset: not checked).
struct QualityGate {
  std::optional<double> max_ppl_increase_pct;
  std::optional<double> max_kl;
  bool enabled() const { return max_ppl_increase_pct || max_kl; }
};
// OK when every set threshold holds; FAILED_PRECONDITION otherwise, the message giving
// every missed one with the measured and the allowed value ("quality gate: perplexity rose
// 12.40 % (7.113 → 7.995), allowed 5.00 %; mean KL 0.0812 nats, allowed 0.05").
absl::Status CheckQualityGate(const QualityMetrics& metrics, const QualityGate& gate);

// The manifest's / report's "quality" object:
// {"samples", "tokens", "ppl_reference", "ppl_candidate", "ppl_increase_pct", "mean_kl",
//  "top1_agreement", "modules": [{"module", "layer", "relative_error"}],
//  "bits_per_weight"? (only when > 0),
//  "gate": {"max_ppl_increase_pct"?, "max_kl"?, "passed": bool} (only when enabled)}.
nlohmann::json QualityMetricsToJson(const QualityMetrics& metrics, const QualityGate& gate);

// Σ bytes · 8 of every tensor "<module>.*" except "<module>.bias" over Σ out · in of the
// quantized `modules` (full names, as EvaluationSums lists them): the storage cost per weight
// including scales, zeros, g_idx, codebooks, norms and permutations. 0 for no module.
// INVALID_ARGUMENT for a name that is not a decoder linear module of `config`.
absl::StatusOr<double> QuantizedBitsPerWeight(const SafetensorsModel& candidate,
                                              const quant::DecoderConfig& config,
                                              const std::vector<ModuleErrorSums>& modules);

// Re-writes `<dir>qforge_manifest.json` (dir "" or ending in "/") in `store` atomically with
// "quality" = `quality` and, when `gate` is enabled, "quality_gate" = "passed" | "failed"
// (absent otherwise); every other key kept; 2-space JSON, sorted keys, trailing newline (the
// assembler's form). NOT_FOUND without a manifest; INVALID_ARGUMENT when it is not a JSON object.
absl::Status RecordQualityInManifest(ObjectStore& store, std::string_view dir,
                                     const QualityMetrics& metrics, const QualityGate& gate);

// Host memory of one EVALUATE task: two layers' float32 weights (reference + candidate,
// plus the decode's scratch), the float64 sums and the float32 copy of the largest input's,
// the two hidden-state buffers (counted up to spill_above_bytes each), both models' LM heads
// (float32 [vocab, hidden] each) and one chunk of logits of both models.
uint64_t EvaluationTaskMemoryBytes(const quant::DecoderConfig& config, int64_t samples,
                                   int64_t seq_len, uint64_t spill_above_bytes);

}  // namespace qforge

#endif  // QFORGE_JOB_EVALUATION_H_

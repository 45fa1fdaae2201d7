// The staged-layer format, defined once: the safetensors object a QUANTIZE task writes (the
// layer runner, through WriteStagedLayer) and the assembler reads (ReadStagedLayer), and where
// a layer's weight lies in the source model (TensorLocation, LocateTensor).
//
// A staged object holds one layer's quantized tensors, named "<module>.<suffix>" (the suffixes
// are the method's: quant::QuantizedTensor), and two `__metadata__` entries:
//   "qforge.layer"        the LayerOutcome as JSON (LayerOutcomeToJson), so the assembler can
//                         build the manifest from staged objects alone;
//   "qforge.vptq_config"  the method's per-layer artifact config when it has one (VPTQ's
//                         `config_for_layers` entry). The key's name predates other methods
//                         and is kept, so that objects staged by earlier versions assemble.
// The object's header is written before its data, so the recorded outcome has the read and
// solve figures, and bytes_written = the tensors' bytes, but write_seconds = 0.
//
// Thread-safety: pure functions and values; the store calls are as thread-safe as the store.
#ifndef QFORGE_JOB_STAGED_LAYER_H_
#define QFORGE_JOB_STAGED_LAYER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "nlohmann/json.hpp"
#include "quant/layer_quantizer.h"

namespace qforge {

// The metadata key of the LayerOutcome JSON.
inline constexpr char kStagedOutcomeKey[] = "qforge.layer";
// The metadata key of the method's per-layer artifact config.
inline constexpr char kStagedLayerConfigKey[] = "qforge.vptq_config";

// Where a weight's bytes are: one ranged read of `length` bytes at absolute `offset` of `key`.
struct TensorLocation {
  std::string name;  // tensor name, for messages
  std::string key;   // shard key in the model store
  uint64_t offset = 0;
  uint64_t length = 0;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// The location of `tensor` in a (possibly sharded) model. NOT_FOUND naming the tensor.
absl::StatusOr<TensorLocation> LocateTensor(const SafetensorsModel& model, std::string_view tensor);

// The statistics of one quantized layer, as staged and then recorded in the manifest.
struct LayerOutcome {
  std::string module;
  int64_t out_features = 0, in_features = 0;
  double proxy_loss = 0;       // Σ (w−q)²/d²/2 (the GPTQ reference's figure)
  // tr(ΔW H ΔWᵀ) with ΔW = W − the weight a loader decodes in its dtype (quant::QuantizeStats:
  // GPTQ float16, VPTQ the model dtype, rounded as the loaders' torch path rounds).
  double output_error = 0;
  double weight_energy = 0;    // tr(W H Wᵀ)
  double relative_error = 0;   // output_error / weight_energy (0 when the energy is 0)
  // The same figures from the solver's float32 result (QuantizeStats::output_error_f32).
  double output_error_f32 = 0;
  double relative_error_f32 = 0;
  double damp_percent_used = 0;
  double read_seconds = 0, solve_seconds = 0, write_seconds = 0;
  double bits_per_weight = 0;  // VPTQ: indices, codebooks, scales and perm per weight
  uint64_t bytes_read = 0, bytes_written = 0;
  std::string staged_key;      // not part of the JSON
};

// LayerOutcome <-> its JSON object (every field but staged_key, keys as the field names).
// FromJson: INVALID_ARGUMENT when `j` is not an object or lacks a field or has one of the
// wrong type (bits_per_weight, which older objects lack, defaults to 0; output_error_f32 and
// relative_error_f32, which they lack too, default to output_error and relative_error, the
// float32 figures those objects recorded).
nlohmann::json LayerOutcomeToJson(const LayerOutcome& o);
absl::StatusOr<LayerOutcome> LayerOutcomeFromJson(const nlohmann::json& j);

// The name of tensor `suffix` of `module` in a staged object and in the artifact:
// "<module>.<suffix>".
std::string StagedTensorName(std::string_view module, std::string_view suffix);

// Writes the staged object `key` of `store` for layer `outcome.module`: the tensors of `layer`
// in their order, its outcome (as recorded now) and its layer config when it has one. The
// object is published atomically by the writer's Finish. Errors: INVALID_ARGUMENT for a tensor
// with an unknown dtype or a byte count that does not match its shape (naming it); the
// store's errors.
absl::Status WriteStagedLayer(ObjectStore& store, std::string_view key, const LayerOutcome& outcome,
                              const quant::QuantizedLayer& layer);

// A staged object as the assembler reads it.
struct StagedLayerObject {
  std::string module;
  SafetensorsHeader header;             // every tensor and its data offsets
  std::optional<LayerOutcome> outcome;  // none when the object has none or it is unreadable
  // The layer config as JSON: null when the object has none, discarded when it is not JSON.
  nlohmann::json layer_config;

  // The module's tensor "<module>.<suffix>", or null. Lives as long as this object.
  const TensorInfo* FindTensor(std::string_view suffix) const;
  // The module's tensors, in data order. The pointers live as long as this object.
  std::vector<const TensorInfo*> Tensors() const;
};

// Reads the header of the staged object `key` of `store`, written for `module`. Errors: those
// of ReadSafetensorsHeader (the store's, INVALID_ARGUMENT for a malformed header).
absl::StatusOr<StagedLayerObject> ReadStagedLayer(ObjectStore& store, std::string_view key,
                                                  std::string_view module);

}  // namespace qforge

#endif  // QFORGE_JOB_STAGED_LAYER_H_

// Quantizes one linear layer: the unit of work of a QUANTIZE task. Reads exactly that
// layer's weight (ranged read from its shard) and its Hessian, runs the solver, packs the
// result into the Hugging Face GPTQ tensors and writes them as one staged safetensors object.
// The offline driver (qforge-quantize) and the worker process both call this.
// Thread-safety: RunGptqLayer may run concurrently for different layers.
#ifndef QFORGE_JOB_LAYER_RUNNER_H_
#define QFORGE_JOB_LAYER_RUNNER_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "common/hessian_file.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "quant/gptq.h"
#include "quant/gptq_pack.h"
#include "quant/vptq.h"
#include "quant/vptq_pack.h"

namespace qforge {

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

struct GptqLayerJob {
  std::string module;  // e.g. "model.layers.0.mlp.down_proj"
  ObjectStore* model_store = nullptr;
  TensorLocation weight;  // "<module>.weight"
  // The Hessian source; both null means identity H (`--calibration none`, data-free).
  ObjectStore* hessian_store = nullptr;
  const HessianFile* hessians = nullptr;
  quant::GptqOptions options;
  quant::GptqCheckpointFormat format = quant::GptqCheckpointFormat::kV1;
  ObjectStore* out_store = nullptr;
  std::string staged_key;  // where the packed tensors are written
};

// Statistics of one quantized layer (also stored in the staged file's metadata under
// "qforge.layer", as JSON, so the assembler can build the manifest from staged files alone).
struct LayerOutcome {
  std::string module;
  int64_t out_features = 0, in_features = 0;
  double proxy_loss = 0;       // Σ (w−q)²/d²/2 (the GPTQ reference's figure)
  double output_error = 0;     // tr(ΔW H ΔWᵀ)
  double weight_energy = 0;    // tr(W H Wᵀ)
  double relative_error = 0;   // output_error / weight_energy
  double damp_percent_used = 0;
  double read_seconds = 0, solve_seconds = 0, write_seconds = 0;
  double bits_per_weight = 0;  // VPTQ: indices, codebooks, scales and perm per weight
  uint64_t bytes_read = 0, bytes_written = 0;
  std::string staged_key;
};

// Errors: NOT_FOUND (weight or Hessian missing, naming it), INVALID_ARGUMENT (not 2-D, bad
// dtype, shape not packable, options invalid for this layer), FAILED_PRECONDITION (Hessian
// not positive definite at any damping), store errors as the store reports them.
absl::StatusOr<LayerOutcome> RunGptqLayer(const GptqLayerJob& job, quant::GptqSolver& solver);

// The same for VPTQ: the staged file holds the layer's VPTQ tensors ("<module>.centroids.weight",
// "<module>.indices", ..., FORMATS.md) with codebooks and scales in the weight's dtype (BF16
// stays BF16, anything else F16), and its `config_for_layers` entry as JSON under the
// metadata key "qforge.vptq_config". A bias, if the layer has one, stays in the model.
struct VptqLayerJob {
  std::string module;
  ObjectStore* model_store = nullptr;
  TensorLocation weight;
  bool has_bias = false;
  ObjectStore* hessian_store = nullptr;  // both null: identity H
  const HessianFile* hessians = nullptr;
  quant::VptqOptions options;
  ObjectStore* out_store = nullptr;
  std::string staged_key;
};
absl::StatusOr<LayerOutcome> RunVptqLayer(const VptqLayerJob& job, quant::VptqSolver& solver);

// The JSON `config_for_layers` entry of a VPTQ layer (exactly the loader's keys).
std::string VptqLayerConfigToJson(const quant::VptqLayerConfig& c);

// The staged tensors' names for `module` ("<module>.qweight", ...).
std::string StagedTensorName(std::string_view module, std::string_view suffix);

// LayerOutcome <-> the JSON stored in staged metadata.
std::string LayerOutcomeToJson(const LayerOutcome& o);
absl::StatusOr<LayerOutcome> LayerOutcomeFromJson(std::string_view json);

}  // namespace qforge

#endif  // QFORGE_JOB_LAYER_RUNNER_H_

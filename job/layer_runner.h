// Quantizes one linear layer: the unit of work of a QUANTIZE task. Reads exactly that layer's
// weight (one ranged read from its shard) and its Hessian (or uses the identity), quantizes it
// with a quant::LayerQuantizer of any method and device, and writes the result as one staged
// object (job/staged_layer.h). The offline driver (qforge-quantize) and the worker process
// both call this.
// Thread-safety: RunLayer may run concurrently for different layers with different quantizers
// (a LayerQuantizer runs one Quantize at a time).
#ifndef QFORGE_JOB_LAYER_RUNNER_H_
#define QFORGE_JOB_LAYER_RUNNER_H_

#include <string>

#include "absl/status/statusor.h"
#include "common/hessian_file.h"
#include "common/object_store.h"
#include "job/staged_layer.h"
#include "quant/layer_quantizer.h"
#include "quant/progress.h"

namespace qforge {

struct LayerJob {
  std::string module;  // e.g. "model.layers.0.mlp.down_proj"
  ObjectStore* model_store = nullptr;
  TensorLocation weight;  // "<module>.weight"
  bool has_bias = false;  // the layer has "<module>.bias" (it stays in the model)
  // The Hessian source; both null means identity H (`--calibration none`, data-free).
  ObjectStore* hessian_store = nullptr;
  const HessianFile* hessians = nullptr;
  quant::QuantizeOptions options;  // the method's options (the quantizer's method)
  quant::SolveProgress progress;   // optional: the solve's progress, may cancel it
  ObjectStore* out_store = nullptr;
  std::string staged_key;  // where the staged object is written
};

// Runs `job` with `quantizer`, which must implement the method of job.options, and returns
// the layer's outcome (staged_key filled in; the staged object records it too, without
// write_seconds). Errors: INVALID_ARGUMENT when a store is missing, the weight is not 2-D or
// its byte length does not match its shape and dtype (naming the tensor); NOT_FOUND when the
// Hessian is missing (naming it); the store's errors; the quantizer's errors with the layer
// named ("layer '<module>': ..."): INVALID_ARGUMENT (options of another method, shape not
// packable, options invalid for this layer, non-finite W/H), FAILED_PRECONDITION (H not
// positive definite at any damping), CANCELLED (job.progress returned false).
absl::StatusOr<LayerOutcome> RunLayer(const LayerJob& job, quant::LayerQuantizer& quantizer);

}  // namespace qforge

#endif  // QFORGE_JOB_LAYER_RUNNER_H_

// Planner: the I/O half of accepting a job. Given its converted spec (JobConfig,
// job/spec.h), it reads the model's safetensors headers and checks that config.json is
// there, selects the layers and validates each for the spec, checks that the Hessian file
// holds a Hessian of the right shape for every selected layer, refuses an output prefix
// that already holds objects (staging objects of jobs in flight aside), and produces the
// job's QUANTIZE tasks: one per selected layer with the weight's location (shard, byte
// range, dtype, shape) and both memory estimates (host bytes for a CPU worker, device bytes
// for a CUDA worker), computed here once.
//
// Stores are opened through the injected StoreOpener; headers only are read (no tensor data).
//
// Thread-safety: immutable after construction; Plan may run concurrently when the opener
// may.
#ifndef QFORGE_SERVER_PLANNER_H_
#define QFORGE_SERVER_PLANNER_H_

#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "job/spec.h"
#include "server/state_store.h"
#include "server/store_opener.h"

namespace qforge {

class Planner {
 public:
  // `task_memory_factor`: the CPU solver's workspace factor passed to TaskMemoryBytes.
  Planner(StoreOpener open_store, double task_memory_factor)
      : open_store_(std::move(open_store)), task_memory_factor_(task_memory_factor) {}

  // The QUANTIZE tasks of a job with `config`, in plan order (the order SelectLayers
  // gives). Each has kind QUANTIZE, state QUEUED, `layer` filled in (module, weight
  // tensor, model_uri, shard key, byte offset and length, dtype, out/in features,
  // hessians_uri, has_bias), memory_bytes = TaskMemoryBytes(config, out, in,
  // task_memory_factor), gpu_memory_bytes = GpuTaskMemoryBytes(config, out, in) and
  // backends {"cpu", "cuda"}; id, job_id, ordinal and times are left to the caller.
  // Errors name the spec field: INVALID_ARGUMENT for "spec.model_uri" (no model, no
  // config.json), "spec.include" (nothing selected), a layer the spec cannot quantize,
  // "spec.calibration.hessians_uri" (no Hessian file, a module without a Hessian, a wrong
  // shape), "spec.output_uri" (not empty); a store's UNAVAILABLE or DEADLINE_EXCEEDED keeps
  // its code (retrying may succeed).
  absl::StatusOr<std::vector<TaskRecord>> Plan(const JobConfig& config) const;

 private:
  StoreOpener open_store_;
  double task_memory_factor_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_PLANNER_H_

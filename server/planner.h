// Planner: the I/O half of accepting a job. Given its converted spec (JobConfig,
// job/spec.h), it reads the model's safetensors headers and checks that config.json is
// there, selects the layers and validates each for the spec, checks the Hessian source,
// refuses an output prefix that already holds objects (staging objects of jobs in flight
// aside), and produces the job's tasks with the memory they need, computed here once.
//
// Hessian sources:
//  - calibration.hessians_uri: the file must hold a Hessian of the right shape for every
//    selected layer; one QUANTIZE task per layer (QUEUED).
//  - calibration.none: identity Hessians; QUANTIZE tasks as above.
//  - calibration.dataset_uri (job/calibration.h): config.json must be a supported decoder
//    (ReadDecoderModelConfig), the token data is loaded and validated in full
//    (LoadCalibrationData: every error of the data, naming "spec.calibration.dataset_uri"),
//    every selected layer must be a decoder linear, and the model's fingerprint and the
//    data's sha256 give the Hessian cache entry (HessianCacheEntryKey) in the coordinator's
//    cache store. A complete entry (VerifyHessianCacheEntry, headers only) is a cache hit
//    unless calibration.no_cache: QUANTIZE tasks only, QUEUED, reading the entry. Otherwise
//    CALIBRATE × shards (QUEUED), one REDUCE (PENDING until every shard succeeded) that
//    writes the entry, and QUANTIZE × layers (PENDING until the REDUCE succeeded).
//
// Evaluation (spec.evaluation.dataset_uri, job/evaluation.h): the reference model's
// config.json must be a supported decoder, every selected layer a decoder linear, and the
// evaluation data is loaded and validated in full like calibration data (errors naming
// "spec.evaluation.dataset_uri"; "spec.evaluation.seq_len" above the sliding window). Data
// with the calibration data's sha256 is refused unless allow_calibration_data. Then
// EVALUATE × shards (shard size from the live workers and their budgets with
// EvaluationTaskMemoryBytes, or spec.evaluation.shard_samples; PENDING until ASSEMBLE
// succeeded) and one EVAL_REDUCE (PENDING until every shard succeeded); the candidate is the
// artifact at spec.output_uri.
// An evaluation-only job (spec.reference_model_uri): spec.model_uri is the candidate. Both
// models must be supported decoders with the same dimensions ("spec.model_uri" names the
// first that differs), the candidate's quantization_config readable (ReadModelQuantization),
// an output_uri, when given, empty; then only EVALUATE × shards (QUEUED) and EVAL_REDUCE.
//
// Stores are opened through the injected StoreOpener wrapped in NonCreatingOpener
// (server/file_uri_access.h): planning, validate_only included, creates no directory, and a
// missing local directory is "does not exist". No tensor data is read except the
// token data and, for dataset calibration, every model shard once (ModelFingerprint).
//
// Thread-safety: immutable after construction; Plan may run concurrently when the opener
// may.
#ifndef QFORGE_SERVER_PLANNER_H_
#define QFORGE_SERVER_PLANNER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "job/spec.h"
#include "server/file_uri_access.h"
#include "server/state_store.h"
#include "server/store_opener.h"

namespace qforge {

// What a job's plan is.
struct JobPlan {
  // In plan order: CALIBRATE × shards, REDUCE, QUANTIZE × layers (the JobManager adds the
  // ASSEMBLE step). Each has kind, state, backends {"cpu", "cuda"}, memory_bytes,
  // gpu_memory_bytes and its `layer` (QUANTIZE) or `calibration` (CALIBRATE, REDUCE) filled
  // in; id, job_id, ordinal and times are left to the caller.
  std::vector<TaskRecord> tasks;
  int layers = 0;                   // QUANTIZE tasks
  int shards = 0;                   // CALIBRATE tasks
  // Dataset calibration only: what the data is (dataset_uri, dataset_sha256, samples,
  // seq_len, tokens, packed), shards, cache_hit, hessians_uri (the cache entry) and
  // model_fingerprint; seconds is 0.
  bool dataset_calibration = false;
  v1::CalibrationInfo calibration;
  std::string cache_key;            // the entry's key in the cache store
  std::string cache_note;           // why an existing entry was not used ("" when none was)

  // Evaluation (spec.evaluation.dataset_uri): EVALUATE × shards then EVAL_REDUCE, in plan
  // order, with `evaluation` filled in; the JobManager puts them after the ASSEMBLE step
  // (an evaluation-only job has no other task).
  bool evaluation = false;
  std::vector<TaskRecord> evaluation_tasks;
  int eval_shards = 0;
  int64_t eval_samples = 0, eval_seq_len = 0, eval_tokens = 0;
  std::string eval_dataset_sha256;
};

// Samples per CALIBRATE task. `requested` > 0: that (at most `samples`). Otherwise
// ceil(samples / max(1, live_workers)), reduced to the largest count for which `fits`
// holds (fits(n): a task of n samples fits every live worker's budget); at least 1.
int64_t ChooseShardSamples(int64_t samples, int64_t requested, int live_workers,
                           const std::function<bool(int64_t)>& fits);

class Planner {
 public:
  // `task_memory_factor`: the CPU solver's workspace factor passed to TaskMemoryBytes.
  // `hessian_cache_uri`: the store root of the coordinator's Hessian cache.
  Planner(StoreOpener open_store, double task_memory_factor, std::string hessian_cache_uri)
      : open_store_(NonCreatingOpener(std::move(open_store))),
        task_memory_factor_(task_memory_factor),
        hessian_cache_uri_(std::move(hessian_cache_uri)) {}

  // The plan of a job with `config` (see JobPlan and the file comment). `live_workers`:
  // the registered workers that are not lost (for the CALIBRATE shard size).
  // QUANTIZE tasks carry the weight's location (module, weight tensor, model_uri, shard
  // key, byte offset and length, dtype, out/in features, hessians_uri, has_bias),
  // memory_bytes = TaskMemoryBytes(config, out, in, task_memory_factor) and
  // gpu_memory_bytes = GpuTaskMemoryBytes(config, out, in).
  // Errors name the spec field: INVALID_ARGUMENT for "spec.model_uri" (no model, no
  // config.json, an architecture calibration does not support), "spec.include" (nothing
  // selected; with dataset calibration, a layer that is not a decoder linear), a layer the
  // spec cannot quantize, "spec.calibration.hessians_uri" (no Hessian file, a module
  // without a Hessian, a wrong shape), "spec.calibration.dataset_uri" (no data, or data
  // that does not validate: ids outside the vocabulary, ragged rows, empty data, ...),
  // "spec.calibration.seq_len" (above max_position_embeddings or Mistral's sliding
  // window), "spec.output_uri" (not empty); a store's UNAVAILABLE or DEADLINE_EXCEEDED
  // keeps its code (retrying may succeed).
  absl::StatusOr<JobPlan> Plan(const JobConfig& config,
                               const std::vector<WorkerRecord>& live_workers) const;

  const std::string& hessian_cache_uri() const { return hessian_cache_uri_; }

 private:
  StoreOpener open_store_;
  double task_memory_factor_;
  std::string hessian_cache_uri_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_PLANNER_H_

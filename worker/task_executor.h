// TaskExecutor: runs one leased task on this worker: fetch → solve → stage.
//
// A CALIBRATE task (job/calibration.h) opens the model (SafetensorsModel, config.json →
// ReadDecoderModelConfig), loads the token data with the job's samples / seq_len and checks
// that its sha256 is still Task.calibration.dataset_sha256, runs RunCalibrationShard on its
// sample range with the device's DecoderForward (the layers' progress goes to the
// heartbeat) and stages the partial Hessians at Task.staging_key, with sha256 and size as a
// QUANTIZE task's layer. A REDUCE task sums the partials (Task.calibration.partial_keys in
// the staging store) into Task.staging_key (= calibration.hessians_key) of the cache store
// calibration.hessians_uri (ReduceHessians, written atomically). Both report
// TaskMetrics.tokens.
//
// An EVALUATE task (job/evaluation.h) opens both models of Task.evaluation (the reference
// and the candidate, read as a loader reads it: ReadModelQuantization), loads the
// evaluation data with the job's samples / seq_len, checks its sha256 and shape against the
// plan's, runs RunEvaluationShard on its sample range with the device's DecoderForward
// (progress to the heartbeat) and stages the shard's sums (EvaluationSumsToJson) at
// Task.staging_key. An EVAL_REDUCE task adds the partials (ReduceEvaluation), applies the
// job's gate (CheckQualityGate, for its phase only: the coordinator decides the job) and
// stages QualityMetricsToJson(metrics, gate) at Task.staging_key (job/evaluation_record.h).
// Errors carry EVALUATION_FAILED, EVALUATION_DATA_UNREADABLE, EVALUATION_DATA_CHANGED,
// MODEL_READ_FAILED, STAGING_READ_FAILED / STAGING_WRITE_FAILED.
//
// For a QUANTIZE task it opens (and caches) the model, Hessian and output stores by URI,
// builds the weight's TensorLocation from Task.layer (one ranged read; the model is never
// parsed), opens the Hessian file (cached per URI) or uses the identity Hessian, calls
// RunLayer (job/layer_runner.h) with Task.staging_key, the options that ConvertJobSpec
// (job/spec.h, the one spec → options conversion) gives for Task.spec and the device's
// LayerQuantizer of their method, and returns the staged object's sha256 and size with the
// task's metrics. Store I/O goes through a RetryingStore (UNAVAILABLE is retried with
// exponential backoff) and through a per-task wrapper that counts bytes, hashes what is
// written, reports the phase, and refuses further I/O once the task is cancelled, so a
// cancelled task never publishes a staged object. The quantizer reports the
// solve's progress through RunLayer's progress callback (quant/progress.h), which also
// stops it once the task is cancelled.
//
// This header is also the ONE place where a device maps to its quantizers (ParseDeviceSpec /
// ResolveDevice / NewQuantizersForDevice), and the worker's registration (backend) follows
// from it.
//
// Errors returned by Execute carry a canonical code; IsRetryableError says what the worker
// reports to the coordinator, and ToErrorInfo turns the status into the API's ErrorInfo with
// a machine-readable reason ("HESSIAN_MISSING", "MODEL_READ_FAILED", ...) and subject.
//
// Thread-safety: a TaskExecutor runs one Execute at a time (it owns one quantizer set; the worker
// never runs two tasks at once). TaskControl is thread-safe: the heartbeat thread reads the
// phase and cancels while Execute runs. RetryingStore is as thread-safe as the store it wraps.
#ifndef QFORGE_WORKER_TASK_EXECUTOR_H_
#define QFORGE_WORKER_TASK_EXECUTOR_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/forwarding_store.h"
#include "common/hessian_file.h"
#include "common/object_store.h"
#include "qforge/v1/worker_service.pb.h"
#include "job/calibration.h"
#include "quant/cuda/device.h"
#include "quant/decoder.h"
#include "quant/layer_quantizer.h"

namespace qforge {

// ---- Store I/O retries -----------------------------------------------------------------

struct StoreRetryPolicy {
  int max_attempts = 3;              // tries in all, including the first (1 = no retry)
  int64_t initial_backoff_ms = 100;  // sleep before the second try
  double multiplier = 2.0;           // backoff growth per further try
};

// Retries calls that fail with UNAVAILABLE (transient I/O: the store's contract) up to
// policy.max_attempts tries, sleeping initial_backoff_ms, ×multiplier, ... between them; any
// other code, and the last UNAVAILABLE, is returned as is. Stat, ReadRange, Put (atomic, so
// idempotent), NewWriter (the creation only: bytes appended to a writer are not replayed),
// List and Delete (idempotent) are retried. The wrapped store is not owned.
class RetryingStore : public ForwardingStore {
 public:
  using SleepFn = std::function<void(int64_t ms)>;
  // `sleep` defaults to std::this_thread::sleep_for (tests pass a recorder).
  RetryingStore(ObjectStore* target, StoreRetryPolicy policy, SleepFn sleep = nullptr);

  absl::StatusOr<ObjectInfo> Stat(std::string_view key) override;
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override;
  absl::Status Put(std::string_view key, std::string_view data) override;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override;
  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override;
  absl::Status Delete(std::string_view key) override;

  // Retries performed so far (tries beyond the first), over all calls.
  uint64_t retries() const { return retries_.load(); }

 private:
  template <typename Fn>
  auto Retry(Fn&& fn) -> decltype(fn());

  const StoreRetryPolicy policy_;
  SleepFn sleep_;
  std::atomic<uint64_t> retries_{0};
};

// ---- Devices and backends (the one place that maps a device to its quantizers) ---------

struct DeviceSpec {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;  // CUDA ordinal
  std::string ToString() const;  // "cpu", "cuda:0"
  std::string backend() const;   // "cpu" or "cuda": the backend name used at registration
};

// "cpu", "cuda" (= cuda:0) or "cuda:N". INVALID_ARGUMENT naming the text otherwise.
absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view text);

// True when this build has solvers for `device` (CPU always; CUDA when compiled in).
bool HasSolversFor(const DeviceSpec& device);

// The layer quantizers of `device`, one per method: quant::NewCpuLayerQuantizers() for the
// CPU; for CUDA, quant::NewCudaLayerQuantizers on a GpuContext of the device (one stream, one
// cuBLAS and one cuSOLVER handle, shared by the quantizers, which keep it alive). Errors, for
// CUDA, naming the device: UNAVAILABLE when the build has no CUDA or the device cannot be
// opened (the driver's reason), or the error of a backend that cannot be created.
absl::StatusOr<quant::LayerQuantizerSet> NewQuantizersForDevice(const DeviceSpec& device);

// Everything a device runs: its layer quantizers and its calibration forward pass
// (quant::NewCpuDecoderForward, or quant::NewCudaDecoderForward on the same GpuContext as
// the CUDA quantizers). Errors as NewQuantizersForDevice's, and the CUDA forward's.
struct DeviceBackends {
  quant::LayerQuantizerSet quantizers;
  std::shared_ptr<quant::DecoderForward> forward;
};
absl::StatusOr<DeviceBackends> NewBackendsForDevice(const DeviceSpec& device);

// Chooses the device the worker solves on.
//  - `requested` empty (the default): the first GPU of `gpus` when there is one and a solver
//    exists for it; otherwise the CPU, with *note saying why a GPU was not used (no GPU, or
//    "GPU found but this build has no CUDA backend: using cpu").
//  - explicit "cpu": the CPU.
//  - explicit "cuda[:N]": that GPU; INVALID_ARGUMENT (a usage error) when it does not exist
//    in `gpus` or when no CUDA solver exists in this build.
// `gpus` is what quant::ListCudaDevices() returned (empty when it failed).
absl::StatusOr<DeviceSpec> ResolveDevice(std::string_view requested,
                                         const std::vector<quant::CudaDeviceInfo>& gpus,
                                         std::string* note);

// ---- Task control, results and errors --------------------------------------------------

// Shared by the executor (which reports its phase) and the worker's heartbeat thread (which
// reads the phase and may cancel). Thread-safe.
class TaskControl {
 public:
  // Requests cancellation: every later store call of the task fails with CANCELLED and no
  // staged object is published; a running solver stops at its next progress report (after
  // a lazy column block or a Lloyd step, see quant/progress.h) and Execute returns
  // CANCELLED.
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  // phase: "fetch", "read", "solve", "write", "verify", "done"; progress in [0, 1]. During
  // "solve" the progress follows the solver's fraction f as 0.15 + 0.75·f (so 0.9 when the
  // write starts).
  void SetPhase(std::string_view phase, double progress);
  std::pair<std::string, double> Snapshot() const;

 private:
  std::atomic<bool> cancelled_{false};
  mutable std::mutex mu_;
  std::string phase_ ABSL_GUARDED_BY(mu_) = "fetch";
  double progress_ ABSL_GUARDED_BY(mu_) = 0;
};

struct TaskResult {
  std::string output_key;     // == Task.staging_key
  std::string output_sha256;  // lowercase hex of the staged object's bytes
  uint64_t output_bytes = 0;  // its size
  v1::TaskMetrics metrics;    // seconds per phase, bytes actually read/written, losses, backend
};

// Whether the coordinator should retry a task that failed with `code`. Bad input
// (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE, PERMISSION_DENIED,
// UNIMPLEMENTED, CANCELLED, ALREADY_EXISTS, UNAUTHENTICATED) is not; infrastructure trouble
// (UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, DATA_LOSS, DEADLINE_EXCEEDED, ABORTED, UNKNOWN)
// is.
bool IsRetryableError(absl::StatusCode code);

// Attaches a machine-readable reason and subject to `s` (as status payloads).
absl::Status WithReason(absl::Status s, std::string_view reason, std::string_view subject);
// The API error for `s`: code, message, and the reason/subject attached by WithReason (the
// reason defaults to the code's name, e.g. "UNAVAILABLE").
v1::ErrorInfo ToErrorInfo(const absl::Status& s);

// ---- The executor ----------------------------------------------------------------------

struct TaskExecutorOptions {
  // Opens a store by URI (default: OpenCountedObjectStore, common/store_traffic.h). Tests
  // inject fault-injecting stores.
  std::function<absl::StatusOr<std::unique_ptr<ObjectStore>>(std::string_view uri)> open_store;
  StoreRetryPolicy retry;
  RetryingStore::SleepFn sleep;  // default: real sleep
  size_t max_cached_stores = 32;    // no LRU: a cache is cleared when it grows past its limit
  size_t max_cached_hessians = 8;
  // The calibration forward pass of the device (DeviceBackends::forward); null: the CPU one
  // (quant::NewCpuDecoderForward), created when the first CALIBRATE task runs.
  std::shared_ptr<quant::DecoderForward> forward;
  // Where a CALIBRATE task's hidden states are spilled above spill_above_bytes, and a
  // REDUCE stages its output while hashing it ("": the system's temp directory;
  // job/calibration.h).
  std::string spill_dir;
  uint64_t spill_above_bytes = kDefaultSpillAboveBytes;
};

class TaskExecutor {
 public:
  // `quantizers` run every task (NewQuantizersForDevice's result): a task's method is
  // looked up in it.
  explicit TaskExecutor(quant::LayerQuantizerSet quantizers, TaskExecutorOptions options = {});
  ~TaskExecutor();
  TaskExecutor(const TaskExecutor&) = delete;
  TaskExecutor& operator=(const TaskExecutor&) = delete;

  // Runs `task`. `control` (not owned, may be null) receives the phase and may cancel.
  // Errors (reason in parentheses, see ToErrorInfo):
  //  - INVALID_ARGUMENT (BAD_TASK): missing or inconsistent Task fields (kind, layer, dtype,
  //    shape vs byte_length, staging key); (INVALID_SPEC): the spec, converted by the
  //    coordinator's own ConvertJobSpec / ValidateLayerForSpec (job/spec.h), is invalid
  //    for this layer;
  //  - UNIMPLEMENTED (UNSUPPORTED_TASK): ASSEMBLE tasks, a method without a quantizer in
  //    the set;
  //  - CALIBRATE / REDUCE: INVALID_ARGUMENT (BAD_TASK) for missing calibration fields or a
  //    sample range outside the data; FAILED_PRECONDITION (CALIBRATION_DATA_CHANGED) when
  //    the data's sha256, samples or seq_len differ from what the job was planned with;
  //    the data's, the model's and the forward's errors (CALIBRATION_FAILED,
  //    MODEL_READ_FAILED, CALIBRATION_DATA_UNREADABLE), the stores' (STAGING_WRITE_FAILED,
  //    STAGING_READ_FAILED, CACHE_WRITE_FAILED);
  //  - NOT_FOUND (HESSIAN_MISSING): Hessian file or the module's Hessian missing;
  //  - store errors as the store reports them (MODEL_READ_FAILED, HESSIAN_UNREADABLE,
  //    STAGING_WRITE_FAILED), after retries for UNAVAILABLE;
  //  - solver errors (INVALID_ARGUMENT for non-finite weights, FAILED_PRECONDITION when H is
  //    not positive definite at any damping), naming the layer;
  //  - DATA_LOSS (STAGED_SIZE_MISMATCH) when the staged object's size differs from what was
  //    written; CANCELLED when `control` was cancelled (nothing left staged).
  // Messages always name the module (QUANTIZE) or the task and its shard.
  absl::StatusOr<TaskResult> Execute(const v1::Task& task, TaskControl* control);

  std::string backend() const { return quantizers_.backend(); }
  // Retries of store calls so far (all stores).
  uint64_t store_retries() const;

 private:
  struct CachedStore {
    std::unique_ptr<ObjectStore> base;
    std::unique_ptr<RetryingStore> retrying;
  };
  struct CachedHessian {
    ObjectStore* store = nullptr;  // owned by stores_
    std::string key;
    uint64_t size = 0;             // object size when opened: a changed file is reopened
    std::unique_ptr<HessianFile> file;
  };

  absl::StatusOr<TaskResult> ExecuteQuantize(const v1::Task& task, TaskControl* control);
  absl::StatusOr<TaskResult> ExecuteCalibrate(const v1::Task& task, TaskControl* control);
  absl::StatusOr<TaskResult> ExecuteReduce(const v1::Task& task, TaskControl* control);
  absl::StatusOr<TaskResult> ExecuteEvaluate(const v1::Task& task, TaskControl* control);
  absl::StatusOr<TaskResult> ExecuteEvalReduce(const v1::Task& task, TaskControl* control);
  // A cached retrying store for `uri`.
  absl::StatusOr<ObjectStore*> Store(std::string_view uri);
  absl::StatusOr<CachedHessian*> Hessians(std::string_view uri);
  // Drops the caches when they have grown past their limits (between tasks only).
  void TrimCaches();

  quant::LayerQuantizerSet quantizers_;
  TaskExecutorOptions options_;
  std::map<std::string, CachedStore, std::less<>> stores_;
  std::map<std::string, CachedHessian, std::less<>> hessians_;
  uint64_t retries_of_dropped_stores_ = 0;
};

}  // namespace qforge

#endif  // QFORGE_WORKER_TASK_EXECUTOR_H_

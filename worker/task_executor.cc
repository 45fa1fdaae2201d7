#include "worker/task_executor.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/absl_compat.h"
#include "common/fault_point.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "common/store_traffic.h"
#include "base/status_macros.h"
#include "common/uri.h"
#include "job/calibration.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "job/evaluation.h"
#include "job/evaluation_record.h"
#include "job/spec.h"
#include "job/layer_runner.h"
#include "common/status_bridge.h"
#include "quant/cuda/backends.h"

namespace qforge {
namespace {

constexpr char kReasonUrl[] = "type.qforge.dev/qforge.v1.ErrorInfo.reason";
constexpr char kSubjectUrl[] = "type.qforge.dev/qforge.v1.ErrorInfo.subject";

const absl::Status& StatusOf(const absl::Status& s) { return s; }
template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& s) {
  return s.status();
}

// A copy of `s` with `prefix` in front of its message, keeping its payloads.
absl::Status Prefixed(const absl::Status& s, std::string_view prefix) {
  absl::Status out(s.code(), absl::StrCat(Sv(prefix), s.message()));
  s.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) {
    out.SetPayload(url, payload);
  });
  return out;
}

// Makes sure a task error names its module, and tags it with a reason unless it has one.
absl::Status Annotate(const absl::Status& s, std::string_view module, std::string_view reason,
                      std::string_view subject) {
  absl::Status out = s;
  if (!module.empty() && !absl::StrContains(s.message(), Sv(module))) {
    out = Prefixed(s, absl::StrCat("layer '", Sv(module), "': "));
  }
  if (!out.GetPayload(kReasonUrl).has_value()) out = WithReason(out, reason, subject);
  return out;
}

// ---- Per-task store wrappers -----------------------------------------------------------

// What a TaskStore saw; read by the executor after RunLayer returns.
struct IoRecord {
  std::mutex mu;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  std::optional<absl::StatusCode> last_error;  // code of the last failed call
  std::string last_error_key;
  // Objects published through this store: key -> (sha256 hex, size).
  std::map<std::string, std::pair<std::string, uint64_t>> published;
};

// The task's progress at the start of the solve and of the write: the solve fills the span
// between them with the solver's fraction.
constexpr double kSolveStart = 0.15;
constexpr double kWriteStart = 0.9;

// The solver's progress callback for a task: phase "solve" at kSolveStart + (kWriteStart −
// kSolveStart)·fraction, and a stop request once the task is cancelled (the solver then
// returns CANCELLED, and Execute ends the task as cancelled).
quant::SolveProgress SolveProgressFor(TaskControl* control) {
  return [control](double fraction) {
    control->SetPhase("solve", kSolveStart + (kWriteStart - kSolveStart) * fraction);
    return !control->cancelled();
  };
}

absl::Status CancelledError(std::string_view role, std::string_view key) {
  return absl::CancelledError(absl::StrCat("task cancelled: ", Sv(role), " I/O on '", Sv(key),
                                           "' refused"));
}

// An ObjectWriter that hashes what it forwards and refuses to publish once cancelled.
class HashingWriter final : public ObjectWriter {
 public:
  HashingWriter(std::unique_ptr<ObjectWriter> target, std::string key, std::string role,
                TaskControl* control, IoRecord* io)
      : target_(std::move(target)),
        key_(std::move(key)),
        role_(std::move(role)),
        control_(control),
        io_(io) {}

  absl::Status Append(std::string_view data) override {
    if (control_->cancelled()) return CancelledError(role_, key_);
    sha_.Update(data);
    absl::Status s = target_->Append(data);
    if (!s.ok()) Record(s);
    return s;
  }

  absl::Status Close() override {
    // A cancelled task publishes nothing: dropping the unclosed writer discards its bytes.
    if (control_->cancelled()) {
      target_.reset();
      return CancelledError(role_, key_);
    }
    absl::Status s = target_->Close();
    if (!s.ok()) {
      Record(s);
      return s;
    }
    std::lock_guard<std::mutex> l(io_->mu);
    io_->bytes_written += target_->bytes_written();
    io_->published[key_] = {sha_.HexDigest(), target_->bytes_written()};
    return s;
  }

  uint64_t bytes_written() const override { return target_ ? target_->bytes_written() : 0; }

 private:
  void Record(const absl::Status& s) {
    std::lock_guard<std::mutex> l(io_->mu);
    io_->last_error = s.code();
    io_->last_error_key = key_;
  }

  std::unique_ptr<ObjectWriter> target_;
  const std::string key_, role_;
  TaskControl* const control_;
  IoRecord* const io_;
  Sha256 sha_;
};

// Wraps one of the task's stores ("model", "hessian", "staging"): counts bytes, records the
// last failure, reports read completion, and refuses I/O after cancellation (Delete and Stat
// stay allowed, for cleanup).
class TaskStore final : public ForwardingStore {
 public:
  TaskStore(ObjectStore* target, std::string role, TaskControl* control,
            std::function<void()> on_read)
      : ForwardingStore(target),
        role_(std::move(role)),
        control_(control),
        on_read_(std::move(on_read)) {}

  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override {
    if (control_->cancelled()) return CancelledError(role_, key);
    absl::Status s = ForwardingStore::ReadRange(key, offset, length, out);
    if (!s.ok()) {
      Record(s, key);
      return s;
    }
    {
      std::lock_guard<std::mutex> l(io_.mu);
      io_.bytes_read += length;
    }
    if (on_read_) on_read_();
    return s;
  }

  absl::Status Put(std::string_view key, std::string_view data) override {
    if (control_->cancelled()) return CancelledError(role_, key);
    absl::Status s = ForwardingStore::Put(key, data);
    if (!s.ok()) {
      Record(s, key);
      return s;
    }
    std::lock_guard<std::mutex> l(io_.mu);
    io_.bytes_written += data.size();
    io_.published[std::string(key)] = {Sha256Hex(data), data.size()};
    return s;
  }

  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    if (control_->cancelled()) return CancelledError(role_, key);
    control_->SetPhase("write", kWriteStart);
    auto w = ForwardingStore::NewWriter(key);
    if (!w.ok()) {
      Record(w.status(), key);
      return w.status();
    }
    return std::unique_ptr<ObjectWriter>(
        new HashingWriter(*std::move(w), std::string(key), role_, control_, &io_));
  }

  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override {
    if (control_->cancelled()) return CancelledError(role_, prefix);
    return ForwardingStore::List(prefix);
  }

  IoRecord& io() { return io_; }

  // The last failure if it has `code`: the key it concerned.
  std::optional<std::string> FailedWith(absl::StatusCode code) {
    std::lock_guard<std::mutex> l(io_.mu);
    if (io_.last_error.has_value() && *io_.last_error == code) return io_.last_error_key;
    return std::nullopt;
  }

 private:
  void Record(const absl::Status& s, std::string_view key) {
    std::lock_guard<std::mutex> l(io_.mu);
    io_.last_error = s.code();
    io_.last_error_key = std::string(key);
  }

  const std::string role_;
  TaskControl* const control_;
  std::function<void()> on_read_;
  IoRecord io_;
};

}  // namespace

// ---- RetryingStore ---------------------------------------------------------------------

RetryingStore::RetryingStore(ObjectStore* target, StoreRetryPolicy policy, SleepFn sleep)
    : ForwardingStore(target), policy_(policy), sleep_(std::move(sleep)) {
  if (!sleep_) {
    sleep_ = [](int64_t ms) { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); };
  }
}

template <typename Fn>
auto RetryingStore::Retry(Fn&& fn) -> decltype(fn()) {
  double backoff = static_cast<double>(policy_.initial_backoff_ms);
  for (int attempt = 1;; ++attempt) {
    auto result = fn();
    if (StatusOf(result).code() != absl::StatusCode::kUnavailable ||
        attempt >= policy_.max_attempts) {
      return result;
    }
    retries_.fetch_add(1);
    sleep_(static_cast<int64_t>(backoff));
    backoff *= policy_.multiplier;
  }
}

absl::StatusOr<ObjectInfo> RetryingStore::Stat(std::string_view key) {
  return Retry([&] { return ForwardingStore::Stat(key); });
}

absl::Status RetryingStore::ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                                      std::string* out) {
  return Retry([&] { return ForwardingStore::ReadRange(key, offset, length, out); });
}

absl::Status RetryingStore::Put(std::string_view key, std::string_view data) {
  return Retry([&] { return ForwardingStore::Put(key, data); });
}

absl::StatusOr<std::unique_ptr<ObjectWriter>> RetryingStore::NewWriter(std::string_view key) {
  return Retry([&] { return ForwardingStore::NewWriter(key); });
}

absl::StatusOr<std::vector<ObjectInfo>> RetryingStore::List(std::string_view prefix) {
  return Retry([&] { return ForwardingStore::List(prefix); });
}

absl::Status RetryingStore::Delete(std::string_view key) {
  return Retry([&] { return ForwardingStore::Delete(key); });
}

// ---- Devices ---------------------------------------------------------------------------

std::string DeviceSpec::ToString() const {
  return kind == Kind::kCpu ? "cpu" : absl::StrCat("cuda:", index);
}

std::string DeviceSpec::backend() const { return kind == Kind::kCpu ? "cpu" : "cuda"; }

absl::StatusOr<DeviceSpec> ParseDeviceSpec(std::string_view text) {
  DeviceSpec d;
  if (text == "cpu") return d;
  if (text == "cuda") {
    d.kind = DeviceSpec::Kind::kCuda;
    return d;
  }
  if (text.rfind("cuda:", 0) == 0) {
    int index = -1;
    if (absl::SimpleAtoi(Sv(text.substr(5)), &index) && index >= 0) {
      d.kind = DeviceSpec::Kind::kCuda;
      d.index = index;
      return d;
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device is '", Sv(text), "'; expected cpu, cuda or cuda:N"));
}

bool HasSolversFor(const DeviceSpec& device) {
  return device.kind == DeviceSpec::Kind::kCpu || quant::CudaCompiledIn();
}

absl::StatusOr<quant::LayerQuantizerSet> NewQuantizersForDevice(const DeviceSpec& device) {
  if (device.kind == DeviceSpec::Kind::kCpu) return quant::NewCpuLayerQuantizers();
  auto context_error = [&](const qforge::Status& s) {
    return absl::Status(ToAbslStatus(s).code(), absl::StrCat(device.ToString(), ": ", s.message()));
  };
  quant::GpuContextOptions o;
  o.device = device.index;
  auto ctx = quant::CreateGpuContext(o);
  if (!ctx.ok()) return context_error(ctx.status());
  auto quantizers = quant::NewCudaLayerQuantizers(*std::move(ctx));
  if (!quantizers.ok()) return context_error(quantizers.status());
  return *std::move(quantizers);
}

absl::StatusOr<DeviceBackends> NewBackendsForDevice(const DeviceSpec& device) {
  DeviceBackends b;
  if (device.kind == DeviceSpec::Kind::kCpu) {
    b.quantizers = quant::NewCpuLayerQuantizers();
    b.forward = quant::NewCpuDecoderForward();
    return b;
  }
  auto context_error = [&](const qforge::Status& s) {
    return absl::Status(ToAbslStatus(s).code(), absl::StrCat(device.ToString(), ": ", s.message()));
  };
  quant::GpuContextOptions o;
  o.device = device.index;
  auto ctx = quant::CreateGpuContext(o);
  if (!ctx.ok()) return context_error(ctx.status());
  auto quantizers = quant::NewCudaLayerQuantizers(*ctx);
  if (!quantizers.ok()) return context_error(quantizers.status());
  auto forward = quant::NewCudaDecoderForward(*std::move(ctx));
  if (!forward.ok()) return context_error(forward.status());
  b.quantizers = *std::move(quantizers);
  b.forward = std::shared_ptr<quant::DecoderForward>(*std::move(forward));
  return b;
}

absl::StatusOr<DeviceSpec> ResolveDevice(std::string_view requested,
                                         const std::vector<quant::CudaDeviceInfo>& gpus,
                                         std::string* note) {
  note->clear();
  if (requested.empty()) {
    DeviceSpec cpu;
    if (gpus.empty()) {
      *note = "no CUDA device found: using cpu";
      return cpu;
    }
    DeviceSpec gpu;
    gpu.kind = DeviceSpec::Kind::kCuda;
    gpu.index = gpus.front().index;
    if (!HasSolversFor(gpu)) {
      *note = absl::StrCat("found ", gpus.front().name, " (", gpu.ToString(),
                           ") but this build has no CUDA backend: using cpu");
      return cpu;
    }
    return gpu;
  }
  QF_ASSIGN_OR_RETURN(DeviceSpec d, ParseDeviceSpec(requested));
  if (d.kind == DeviceSpec::Kind::kCpu) return d;
  if (!HasSolversFor(d)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--device ", d.ToString(),
        ": this build has no CUDA backend; use --device cpu (or omit --device)"));
  }
  for (const quant::CudaDeviceInfo& g : gpus) {
    if (g.index == d.index) return d;
  }
  return absl::InvalidArgumentError(absl::StrCat("--device ", d.ToString(), ": no such CUDA device (",
                                                 gpus.size(), " visible)"));
}

// ---- Control, errors -------------------------------------------------------------------

void TaskControl::SetPhase(std::string_view phase, double progress) {
  std::lock_guard<std::mutex> l(mu_);
  phase_ = std::string(phase);
  progress_ = progress;
}

std::pair<std::string, double> TaskControl::Snapshot() const {
  std::lock_guard<std::mutex> l(mu_);
  return {phase_, progress_};
}

bool IsRetryableError(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kResourceExhausted:
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kAborted:
    case absl::StatusCode::kUnknown:
      return true;
    default:
      return false;
  }
}

absl::Status WithReason(absl::Status s, std::string_view reason, std::string_view subject) {
  if (s.ok()) return s;
  s.SetPayload(kReasonUrl, absl::Cord(Sv(reason)));
  s.SetPayload(kSubjectUrl, absl::Cord(Sv(subject)));
  return s;
}

v1::ErrorInfo ToErrorInfo(const absl::Status& s) {
  v1::ErrorInfo e;
  e.set_code(static_cast<int32_t>(s.code()));
  e.set_message(std::string(s.message()));
  if (auto r = s.GetPayload(kReasonUrl); r.has_value()) {
    e.set_reason(std::string(*r));
  } else {
    e.set_reason(absl::StatusCodeToString(s.code()));
  }
  if (auto subj = s.GetPayload(kSubjectUrl); subj.has_value()) e.set_subject(std::string(*subj));
  return e;
}

// ---- TaskExecutor ----------------------------------------------------------------------

TaskExecutor::TaskExecutor(quant::LayerQuantizerSet quantizers, TaskExecutorOptions options)
    : quantizers_(std::move(quantizers)), options_(std::move(options)) {
  if (!options_.open_store) {
    options_.open_store = [](std::string_view uri) { return OpenCountedObjectStore(uri); };
  }
}

TaskExecutor::~TaskExecutor() = default;

uint64_t TaskExecutor::store_retries() const {
  uint64_t n = retries_of_dropped_stores_;
  for (const auto& [uri, s] : stores_) n += s.retrying->retries();
  return n;
}

absl::StatusOr<ObjectStore*> TaskExecutor::Store(std::string_view uri) {
  auto it = stores_.find(uri);
  if (it != stores_.end()) return it->second.retrying.get();
  QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> base, options_.open_store(uri));
  CachedStore c;
  c.retrying = std::make_unique<RetryingStore>(base.get(), options_.retry, options_.sleep);
  c.base = std::move(base);
  ObjectStore* out = c.retrying.get();
  stores_.emplace(std::string(uri), std::move(c));
  return out;
}

absl::StatusOr<TaskExecutor::CachedHessian*> TaskExecutor::Hessians(std::string_view uri) {
  QF_ASSIGN_OR_RETURN(ObjectUri ou, SplitObjectUri(uri));
  QF_ASSIGN_OR_RETURN(ObjectStore * store, Store(ou.store_uri));
  QF_ASSIGN_OR_RETURN(ObjectInfo info, store->Stat(ou.key));
  auto it = hessians_.find(uri);
  if (it != hessians_.end() && it->second.store == store && it->second.size == info.size) {
    return &it->second;
  }
  if (it != hessians_.end()) hessians_.erase(it);
  QF_ASSIGN_OR_RETURN(HessianFile file, HessianFile::Open(*store, ou.key));
  CachedHessian c;
  c.store = store;
  c.key = ou.key;
  c.size = info.size;
  c.file = std::make_unique<HessianFile>(std::move(file));
  return &hessians_.insert_or_assign(std::string(uri), std::move(c)).first->second;
}

void TaskExecutor::TrimCaches() {
  // Only between tasks: a task holds pointers into both caches while it runs.
  if (hessians_.size() >= options_.max_cached_hessians) hessians_.clear();
  if (stores_.size() >= options_.max_cached_stores) {
    hessians_.clear();  // its entries point into the stores
    for (const auto& [uri, s] : stores_) retries_of_dropped_stores_ += s.retrying->retries();
    stores_.clear();
  }
}

absl::StatusOr<TaskResult> TaskExecutor::Execute(const v1::Task& task, TaskControl* control) {
  TrimCaches();
  TaskControl local;
  if (control == nullptr) control = &local;
  control->SetPhase("fetch", 0.0);
  switch (task.kind()) {
    case v1::TASK_KIND_QUANTIZE:
      break;
    case v1::TASK_KIND_CALIBRATE:
      return ExecuteCalibrate(task, control);
    case v1::TASK_KIND_REDUCE:
      return ExecuteReduce(task, control);
    case v1::TASK_KIND_EVALUATE:
      return ExecuteEvaluate(task, control);
    case v1::TASK_KIND_EVAL_REDUCE:
      return ExecuteEvalReduce(task, control);
    default:
      return WithReason(absl::UnimplementedError(absl::StrCat(
                            "task ", task.id(), ": kind ", v1::TaskKind_Name(task.kind()),
                            " does not run on workers")),
                        "UNSUPPORTED_TASK", task.id());
  }
  return ExecuteQuantize(task, control);
}

absl::StatusOr<TaskResult> TaskExecutor::ExecuteQuantize(const v1::Task& task,
                                                         TaskControl* control) {
  const v1::LayerInput& layer = task.layer();
  const std::string& module = layer.module();
  auto bad_task = [&](std::string_view what) {
    return WithReason(absl::InvalidArgumentError(absl::StrCat(
                          "task ", task.id(), " (layer '", module, "'): ", Sv(what))),
                      "BAD_TASK", module);
  };
  if (!task.has_layer() || module.empty()) return bad_task("layer.module is empty");
  if (layer.model_uri().empty()) return bad_task("layer.model_uri is empty");
  if (layer.shard_key().empty()) return bad_task("layer.shard_key is empty");
  if (task.staging_uri().empty()) return bad_task("staging_uri is empty");
  if (task.staging_key().empty()) return bad_task("staging_key is empty");
  if (layer.out_features() <= 0 || layer.in_features() <= 0) {
    return bad_task(absl::StrCat("layer shape [", layer.out_features(), ", ",
                                 layer.in_features(), "] is not a positive 2-D shape"));
  }
  auto dtype = ParseDType(layer.dtype());
  if (!dtype.ok() || (*dtype != DType::kF16 && *dtype != DType::kBF16 && *dtype != DType::kF32)) {
    return bad_task(absl::StrCat("layer.dtype is '", layer.dtype(), "'; expected F16, BF16 or F32"));
  }
  const uint64_t expected = static_cast<uint64_t>(layer.out_features()) *
                            static_cast<uint64_t>(layer.in_features()) * DTypeSize(*dtype);
  if (layer.byte_length() != expected) {
    return bad_task(absl::StrCat("layer.byte_length is ", layer.byte_length(), " but [",
                                 layer.out_features(), ", ", layer.in_features(), "] ",
                                 layer.dtype(), " takes ", expected, " bytes"));
  }

  // The spec → options conversion the coordinator validated the job with.
  absl::StatusOr<JobConfig> config = ConvertJobSpec(task.spec());
  if (!config.ok()) {
    return Annotate(config.status(), module,
                    absl::IsUnimplemented(config.status()) ? "UNSUPPORTED_TASK" : "INVALID_SPEC",
                    module);
  }
  absl::Status s = ValidateLayerForSpec(*config, module, layer.out_features(), layer.in_features());
  if (!s.ok()) return Annotate(s, module, "INVALID_SPEC", module);
  quant::LayerQuantizer* quantizer = quantizers_.For(config->quantize);
  if (quantizer == nullptr) {
    return WithReason(absl::UnimplementedError(absl::StrCat(
                          "layer '", module, "': this worker (", quantizers_.backend(),
                          ") has no quantizer for method ",
                          quant::QuantizeMethod(config->quantize))),
                      "UNSUPPORTED_TASK", module);
  }

  // Fault tests (common/fault_point.h): before anything is read.
  if (absl::Status f = FaultPoint("worker.quantize.fetch"); !f.ok()) {
    return Annotate(f, module, "MODEL_READ_FAILED", layer.model_uri());
  }
  // Stores and the Hessian file (cached across tasks).
  auto model_store = Store(layer.model_uri());
  if (!model_store.ok()) {
    return Annotate(model_store.status(), module, "MODEL_READ_FAILED", layer.model_uri());
  }
  // The shard must still be the one the job was planned on (pinned at submit): a shard
  // rewritten since would give a layer of another model, so the task fails for good.
  if (layer.shard_size() != 0 || !layer.shard_version().empty()) {
    auto info = (*model_store)->Stat(layer.shard_key());
    if (!info.ok()) {
      return Annotate(info.status(), module, "MODEL_READ_FAILED",
                      absl::StrCat(layer.model_uri(), "/", layer.shard_key()));
    }
    const bool size_changed = info->size != layer.shard_size();
    const bool version_changed = !layer.shard_version().empty() && !info->version.empty() &&
                                 info->version != layer.shard_version();
    if (size_changed || version_changed) {
      return WithReason(
          absl::FailedPreconditionError(absl::StrCat(
              "layer '", module, "': source shard ", layer.model_uri(), "/", layer.shard_key(),
              " changed after the job was submitted (",
              size_changed ? absl::StrCat("size ", info->size, " bytes, was ", layer.shard_size())
                           : absl::StrCat("version ", info->version, ", was ",
                                          layer.shard_version()),
              "); the model must not change while a job reads it: submit the job again")),
          "SOURCE_CHANGED", absl::StrCat(layer.model_uri(), "/", layer.shard_key()));
    }
  }
  // The layer names its Hessian file; a spec with --hessians covers a coordinator that left
  // it out. Neither: identity H (--calibration none).
  std::string hessians_uri = layer.hessians_uri();
  if (hessians_uri.empty() && !config->identity_hessian) hessians_uri = config->hessians_uri;
  CachedHessian* hessians = nullptr;
  if (!hessians_uri.empty()) {
    auto h = Hessians(hessians_uri);
    if (!h.ok()) {
      return Annotate(Prefixed(h.status(), absl::StrCat("Hessian file ", hessians_uri, ": ")),
                      module, absl::IsNotFound(h.status()) ? "HESSIAN_MISSING" : "HESSIAN_UNREADABLE",
                      hessians_uri);
    }
    hessians = *h;
    auto t = hessians->file->Find(module);
    if (!t.ok()) {
      return Annotate(Prefixed(t.status(), absl::StrCat("Hessian file ", hessians_uri, ": ")),
                      module, "HESSIAN_MISSING", module);
    }
    const TensorInfo* info = *t;
    if (info->shape.size() != 2 || info->shape[0] != layer.in_features()) {
      return WithReason(
          absl::InvalidArgumentError(absl::StrCat(
              "Hessian for layer '", module, "' in ", hessians_uri, " is [",
              info->shape.empty() ? 0 : info->shape[0], ", ",
              info->shape.size() < 2 ? 0 : info->shape[1], "] but the layer has in_features = ",
              layer.in_features())),
          "HESSIAN_SHAPE_MISMATCH", module);
    }
  }
  auto out_store = Store(task.staging_uri());
  if (!out_store.ok()) {
    return Annotate(out_store.status(), module, "STAGING_WRITE_FAILED", task.staging_uri());
  }

  // Per-task views: byte counts, the phase, cancellation.
  std::function<void()> solve_phase = [control] { control->SetPhase("solve", kSolveStart); };
  TaskStore model(*model_store, "model", control,
                  hessians != nullptr ? std::function<void()>() : solve_phase);
  std::optional<TaskStore> hessian;
  if (hessians != nullptr) hessian.emplace(hessians->store, "hessian", control, solve_phase);
  TaskStore staging(*out_store, "staging", control, nullptr);

  TensorLocation weight;
  weight.name = layer.weight_tensor().empty() ? absl::StrCat(module, ".weight")
                                              : layer.weight_tensor();
  weight.key = layer.shard_key();
  weight.offset = layer.byte_offset();
  weight.length = layer.byte_length();
  weight.dtype = *dtype;
  weight.shape = {layer.out_features(), layer.in_features()};

  control->SetPhase("read", 0.05);
  LayerJob job;
  job.module = module;
  job.model_store = &model;
  job.weight = std::move(weight);
  job.has_bias = layer.has_bias();
  if (hessians != nullptr) {
    job.hessian_store = &*hessian;
    job.hessians = hessians->file.get();
  }
  job.options = config->quantize;
  // Fault tests: while the solver runs (at its first progress report), an injected error
  // stops it and fails the task as a solver error would.
  absl::Status solve_fault;
  bool solve_fault_checked = false;
  job.progress = [&, progress = SolveProgressFor(control)](double fraction) {
    if (!solve_fault_checked) {
      solve_fault_checked = true;
      solve_fault = FaultPoint("worker.quantize.solve");
    }
    return solve_fault.ok() && progress(fraction);
  };
  job.out_store = &staging;
  job.staged_key = task.staging_key();
  absl::StatusOr<LayerOutcome> outcome = RunLayer(job, *quantizer);
  if (!solve_fault.ok() && !control->cancelled()) {
    (void)(*out_store)->Delete(task.staging_key());
    return Annotate(solve_fault, module, "SOLVER_FAILED", module);
  }
  if (control->cancelled()) {
    // Whatever slipped through is removed; the coordinator cleans the staging prefix too.
    (void)(*out_store)->Delete(task.staging_key());
    return WithReason(absl::CancelledError(absl::StrCat("layer '", module, "': task ", task.id(),
                                                        " cancelled")),
                      "CANCELLED", module);
  }
  if (!outcome.ok()) {
    const absl::Status& e = outcome.status();
    if (auto key = staging.FailedWith(e.code()); key.has_value()) {
      return Annotate(e, module, "STAGING_WRITE_FAILED",
                      absl::StrCat(task.staging_uri(), "/", *key));
    }
    if (auto key = model.FailedWith(e.code()); key.has_value()) {
      return Annotate(e, module, "MODEL_READ_FAILED", absl::StrCat(layer.model_uri(), "/", *key));
    }
    if (hessian.has_value()) {
      if (auto key = hessian->FailedWith(e.code()); key.has_value()) {
        return Annotate(e, module, "HESSIAN_UNREADABLE", hessians_uri);
      }
    }
    const char* reason = absl::IsFailedPrecondition(e) ? "SOLVER_FAILED"
                         : absl::IsInvalidArgument(e)  ? "INVALID_LAYER"
                                                       : "SOLVER_FAILED";
    return Annotate(e, module, reason, module);
  }

  // Verify what was staged: the bytes we hashed are the object at rest.
  control->SetPhase("verify", 0.97);
  std::pair<std::string, uint64_t> published;
  {
    std::lock_guard<std::mutex> l(staging.io().mu);
    auto it = staging.io().published.find(task.staging_key());
    if (it == staging.io().published.end()) {
      return WithReason(absl::InternalError(absl::StrCat(
                            "layer '", module, "': the layer runner returned without publishing ",
                            task.staging_key())),
                        "STAGING_WRITE_FAILED", task.staging_key());
    }
    published = it->second;
  }
  auto info = (*out_store)->Stat(task.staging_key());
  if (!info.ok()) {
    return Annotate(info.status(), module, "STAGING_WRITE_FAILED", task.staging_key());
  }
  if (info->size != published.second) {
    return WithReason(absl::DataLossError(absl::StrCat(
                          "layer '", module, "': staged object ", task.staging_uri(), "/",
                          task.staging_key(), " has ", info->size, " bytes but ", published.second,
                          " were written")),
                      "STAGED_SIZE_MISMATCH", task.staging_key());
  }

  // Fault tests: staged and verified, not yet reported (CompleteTask comes next).
  if (absl::Status f = FaultPoint("worker.quantize.staged"); !f.ok()) {
    return Annotate(f, module, "STAGING_WRITE_FAILED", task.staging_key());
  }

  TaskResult r;
  r.output_key = task.staging_key();
  r.output_sha256 = published.first;
  r.output_bytes = published.second;
  v1::TaskMetrics& m = r.metrics;
  m.set_read_seconds(outcome->read_seconds);
  m.set_solve_seconds(outcome->solve_seconds);
  m.set_write_seconds(outcome->write_seconds);
  uint64_t bytes_read = 0;
  {
    std::lock_guard<std::mutex> l(model.io().mu);
    bytes_read += model.io().bytes_read;
  }
  if (hessian.has_value()) {
    std::lock_guard<std::mutex> l(hessian->io().mu);
    bytes_read += hessian->io().bytes_read;
  }
  m.set_bytes_read(bytes_read);
  {
    std::lock_guard<std::mutex> l(staging.io().mu);
    m.set_bytes_written(staging.io().bytes_written);
  }
  m.set_proxy_loss(outcome->proxy_loss);
  m.set_output_error(outcome->output_error);
  m.set_weight_energy(outcome->weight_energy);
  m.set_relative_error(outcome->relative_error);
  m.set_damp_percent_used(outcome->damp_percent_used);
  m.set_bits_per_weight(outcome->bits_per_weight);
  m.set_backend(quantizer->backend());
  control->SetPhase("done", 1.0);
  return r;
}


namespace {

// The published object `key` of `staging` is the object at rest in `base`: its sha256 and
// size, or DATA_LOSS / INTERNAL naming it.
absl::StatusOr<std::pair<std::string, uint64_t>> VerifyPublished(TaskStore& staging,
                                                                 ObjectStore* base,
                                                                 const std::string& uri,
                                                                 const std::string& key,
                                                                 std::string_view what,
                                                                 std::string_view reason) {
  std::pair<std::string, uint64_t> published;
  {
    std::lock_guard<std::mutex> l(staging.io().mu);
    auto it = staging.io().published.find(key);
    if (it == staging.io().published.end()) {
      return WithReason(absl::InternalError(absl::StrCat(Sv(what), " returned without publishing ",
                                                         uri, "/", key)),
                        reason, key);
    }
    published = it->second;
  }
  auto info = base->Stat(key);
  if (!info.ok()) return WithReason(info.status(), reason, key);
  if (info->size != published.second) {
    return WithReason(absl::DataLossError(absl::StrCat(Sv(what), ": ", uri, "/", key, " has ",
                                                       info->size, " bytes but ",
                                                       published.second, " were written")),
                      "STAGED_SIZE_MISMATCH", key);
  }
  return published;
}

// The errors of a CALIBRATE or REDUCE task: prefixed with `where` (which names the task and
// its work) unless the message already names the task, and carrying a reason and subject.
struct CalibrationTaskErrors {
  std::string task_id;
  std::string where;

  absl::Status Fail(const absl::Status& s, std::string_view reason,
                    std::string_view subject) const {
    absl::Status out = s;
    if (!absl::StrContains(s.message(), task_id)) out = Prefixed(s, absl::StrCat(where, ": "));
    if (!out.GetPayload(kReasonUrl).has_value()) out = WithReason(out, reason, subject);
    return out;
  }
  // INVALID_ARGUMENT "BAD_TASK": the coordinator sent a task that cannot be run.
  absl::Status BadTask(std::string_view what) const {
    return WithReason(absl::InvalidArgumentError(absl::StrCat(where, ": ", Sv(what))), "BAD_TASK",
                      task_id);
  }
};

// The heartbeat's progress of a calibration or evaluation task: `phase` from 0.05 to 0.95
// with the step's fraction; a stop request once the task is cancelled.
std::function<bool(double)> StepProgressFor(TaskControl* control, std::string phase) {
  return [control, phase = std::move(phase)](double fraction) {
    control->SetPhase(phase, 0.05 + 0.9 * std::clamp(fraction, 0.0, 1.0));
    return !control->cancelled();
  };
}


// The token data of a CALIBRATE or EVALUATE task, loaded as the coordinator loaded it when it
// planned the job. `stage` ("calibration" or "evaluation") names the spec field
// (spec.<stage>.dataset_uri) and the reasons: <STAGE>_DATA_UNREADABLE when it cannot be
// read, <STAGE>_FAILED when it no longer validates, <STAGE>_DATA_CHANGED (FAILED_PRECONDITION)
// when its sha256 or shape differs from the planned one, BAD_TASK for a malformed URI or a
// shard beyond the data. *bytes_read receives the bytes read from the data's store.
struct PlannedTokenData {
  std::string_view stage;
  std::string_view uri, sha256;
  int64_t samples = 0, seq_len = 0;  // as planned; 0: not recorded
  int64_t sample_end = 0;            // the shard's end
  CalibrationDataOptions options;
};

absl::StatusOr<CalibrationData> LoadPlannedTokenData(
    const PlannedTokenData& planned, const quant::DecoderConfig& config,
    const std::function<absl::StatusOr<ObjectStore*>(std::string_view)>& store_for,
    TaskControl* control, const CalibrationTaskErrors& errors, uint64_t* bytes_read) {
  const std::string stage = absl::AsciiStrToUpper(Sv(planned.stage));
  auto split = SplitObjectUri(planned.uri);
  if (!split.ok()) return errors.BadTask(std::string(split.status().message()));
  auto data_base = store_for(split->store_uri);
  if (!data_base.ok()) {
    return errors.Fail(data_base.status(), absl::StrCat(stage, "_DATA_UNREADABLE"), planned.uri);
  }
  TaskStore data_store(*data_base, "data", control, nullptr);
  auto data = LoadCalibrationData(data_store, split->key, planned.options, config,
                                  absl::StrCat("spec.", Sv(planned.stage), ".dataset_uri"));
  {
    std::lock_guard<std::mutex> l(data_store.io().mu);
    *bytes_read = data_store.io().bytes_read;
  }
  if (!data.ok()) {
    return errors.Fail(data.status(),
                       absl::StrCat(stage, absl::IsInvalidArgument(data.status())
                                               ? "_FAILED"
                                               : "_DATA_UNREADABLE"),
                       planned.uri);
  }
  if (data->sha256 != planned.sha256 ||
      (planned.samples != 0 && data->samples != planned.samples) ||
      (planned.seq_len != 0 && data->seq_len != planned.seq_len)) {
    return WithReason(
        absl::FailedPreconditionError(absl::StrCat(
            errors.where, ": the ", Sv(planned.stage), " data changed since the job was submitted: ",
            Sv(planned.uri), " now has sha256 ", data->sha256, " (", data->samples, " samples × ",
            data->seq_len, " tokens), the job was planned with ", Sv(planned.sha256), " (",
            planned.samples, " × ", planned.seq_len, "); resubmit the job")),
        absl::StrCat(stage, "_DATA_CHANGED"), planned.uri);
  }
  if (planned.sample_end > data->samples) {
    return errors.BadTask(absl::StrCat("the sample range ends beyond the data's ", data->samples,
                                       " samples"));
  }
  return data;
}
}  // namespace

absl::StatusOr<TaskResult> TaskExecutor::ExecuteCalibrate(const v1::Task& task,
                                                          TaskControl* control) {
  const v1::CalibrationWork& w = task.calibration();
  const std::string shard = absl::StrCat("calibration shard [", w.sample_begin(), ", ",
                                         w.sample_end(), ")");
  const std::string where = absl::StrCat("task ", task.id(), " (", shard, ")");
  // Every error names the task and its shard, and carries a reason.
  const CalibrationTaskErrors errors{task.id(), where};
  auto fail = [&errors](const absl::Status& s, std::string_view reason, std::string_view subject) {
    return errors.Fail(s, reason, subject);
  };
  auto bad_task = [&errors](std::string_view what) { return errors.BadTask(what); };
  if (w.model_uri().empty()) return bad_task("calibration.model_uri is empty");
  if (w.dataset_uri().empty()) return bad_task("calibration.dataset_uri is empty");
  if (w.dataset_sha256().empty()) return bad_task("calibration.dataset_sha256 is empty");
  if (task.staging_uri().empty()) return bad_task("staging_uri is empty");
  if (task.staging_key().empty()) return bad_task("staging_key is empty");
  if (w.sample_begin() < 0 || w.sample_end() <= w.sample_begin()) {
    return bad_task("the sample range is empty or negative");
  }

  // The model: headers and config.json.
  auto model_base = Store(w.model_uri());
  if (!model_base.ok()) return fail(model_base.status(), "MODEL_READ_FAILED", w.model_uri());
  TaskStore model_store(*model_base, "model", control, nullptr);
  control->SetPhase("read", 0.01);
  auto model = SafetensorsModel::Open(model_store, "");
  if (!model.ok()) return fail(model.status(), "MODEL_READ_FAILED", w.model_uri());
  auto model_config = ReadDecoderModelConfig(model_store, "");
  if (!model_config.ok()) return fail(model_config.status(), "MODEL_READ_FAILED", w.model_uri());

  // The data, as the coordinator loaded it when it planned the job.
  uint64_t data_bytes_read = 0;
  PlannedTokenData planned{"calibration", w.dataset_uri(), w.dataset_sha256(), w.samples(),
                           w.seq_len(), w.sample_end(), {}};
  planned.options.max_samples = task.spec().calibration().samples();
  planned.options.seq_len = task.spec().calibration().seq_len();
  auto data = LoadPlannedTokenData(planned, model_config->decoder,
                                   [this](std::string_view uri) { return Store(uri); }, control,
                                   errors, &data_bytes_read);
  if (!data.ok()) return data.status();

  auto out_base = Store(task.staging_uri());
  if (!out_base.ok()) return fail(out_base.status(), "STAGING_WRITE_FAILED", task.staging_uri());
  TaskStore staging(*out_base, "staging", control, nullptr);
  if (options_.forward == nullptr) options_.forward = quant::NewCpuDecoderForward();

  CalibrationShardJob job;
  job.model_store = &model_store;
  job.model = &*model;
  job.model_config = &*model_config;
  job.data = &*data;
  job.sample_begin = w.sample_begin();
  job.sample_end = w.sample_end();
  job.forward = options_.forward.get();
  job.progress = StepProgressFor(control, "forward");
  job.out_store = &staging;
  job.staged_key = task.staging_key();
  job.spill_dir = options_.spill_dir;
  job.spill_above_bytes = options_.spill_above_bytes;
  control->SetPhase("forward", 0.05);
  absl::StatusOr<CalibrationShardOutcome> outcome = RunCalibrationShard(job);
  if (control->cancelled()) {
    (void)(*out_base)->Delete(task.staging_key());
    return WithReason(absl::CancelledError(absl::StrCat(where, ": cancelled")), "CANCELLED",
                      task.id());
  }
  if (!outcome.ok()) {
    const absl::Status& e = outcome.status();
    if (auto key = staging.FailedWith(e.code()); key.has_value()) {
      return fail(e, "STAGING_WRITE_FAILED", absl::StrCat(task.staging_uri(), "/", *key));
    }
    if (auto key = model_store.FailedWith(e.code()); key.has_value()) {
      return fail(e, "MODEL_READ_FAILED", absl::StrCat(w.model_uri(), "/", *key));
    }
    return fail(e, "CALIBRATION_FAILED", shard);
  }

  control->SetPhase("verify", 0.97);
  auto published = VerifyPublished(staging, *out_base, task.staging_uri(), task.staging_key(),
                                   where, "STAGING_WRITE_FAILED");
  if (!published.ok()) return fail(published.status(), "STAGING_WRITE_FAILED", task.staging_key());

  TaskResult r;
  r.output_key = task.staging_key();
  r.output_sha256 = published->first;
  r.output_bytes = published->second;
  v1::TaskMetrics& m = r.metrics;
  m.set_read_seconds(outcome->read_seconds);
  m.set_solve_seconds(outcome->forward_seconds);
  m.set_write_seconds(outcome->write_seconds);
  uint64_t bytes_read = data_bytes_read;
  {
    std::lock_guard<std::mutex> l(model_store.io().mu);
    bytes_read += model_store.io().bytes_read;
  }
  m.set_bytes_read(bytes_read);
  {
    std::lock_guard<std::mutex> l(staging.io().mu);
    m.set_bytes_written(staging.io().bytes_written);
  }
  m.set_tokens(outcome->tokens);
  m.set_backend(options_.forward->backend());
  control->SetPhase("done", 1.0);
  return r;
}

absl::StatusOr<TaskResult> TaskExecutor::ExecuteReduce(const v1::Task& task,
                                                       TaskControl* control) {
  const v1::CalibrationWork& w = task.calibration();
  const std::string where = absl::StrCat("task ", task.id(), " (reduce of ",
                                         w.partial_keys_size(), " calibration shards)");
  const CalibrationTaskErrors errors{task.id(), where};
  auto fail = [&errors](const absl::Status& s, std::string_view reason, std::string_view subject) {
    return errors.Fail(s, reason, subject);
  };
  auto bad_task = [&errors](std::string_view what) { return errors.BadTask(what); };
  if (w.partial_keys().empty()) return bad_task("calibration.partial_keys is empty");
  if (w.hessians_uri().empty()) return bad_task("calibration.hessians_uri is empty");
  if (w.hessians_key().empty()) return bad_task("calibration.hessians_key is empty");
  if (task.staging_uri().empty()) return bad_task("staging_uri is empty");
  if (task.staging_key() != w.hessians_key()) {
    return bad_task(absl::StrCat("staging_key '", task.staging_key(),
                                 "' is not calibration.hessians_key '", w.hessians_key(), "'"));
  }
  auto in_base = Store(task.staging_uri());
  if (!in_base.ok()) return fail(in_base.status(), "STAGING_READ_FAILED", task.staging_uri());
  auto out_base = Store(w.hessians_uri());
  if (!out_base.ok()) return fail(out_base.status(), "CACHE_WRITE_FAILED", w.hessians_uri());
  TaskStore partials(*in_base, "staging", control, nullptr);
  TaskStore cache(*out_base, "cache", control, nullptr);

  ReduceJob job;
  job.in_store = &partials;
  job.partial_keys.assign(w.partial_keys().begin(), w.partial_keys().end());
  job.out_store = &cache;
  job.out_key = w.hessians_key();
  job.progress = StepProgressFor(control, "reduce");
  job.spill_dir = options_.spill_dir;
  control->SetPhase("reduce", 0.05);
  absl::StatusOr<ReduceOutcome> outcome = ReduceHessians(job);
  if (control->cancelled()) {
    // A complete entry is valid whoever wrote it; only a partial one would need removing,
    // and the cache is written atomically.
    return WithReason(absl::CancelledError(absl::StrCat(where, ": cancelled")), "CANCELLED",
                      task.id());
  }
  if (!outcome.ok()) {
    const absl::Status& e = outcome.status();
    if (auto key = cache.FailedWith(e.code()); key.has_value()) {
      return fail(e, "CACHE_WRITE_FAILED", absl::StrCat(w.hessians_uri(), "/", *key));
    }
    if (auto key = partials.FailedWith(e.code()); key.has_value()) {
      return fail(e, "STAGING_READ_FAILED", absl::StrCat(task.staging_uri(), "/", *key));
    }
    return fail(e, "CALIBRATION_FAILED", task.id());
  }

  control->SetPhase("verify", 0.97);
  auto published = VerifyPublished(cache, *out_base, w.hessians_uri(), w.hessians_key(), where,
                                   "CACHE_WRITE_FAILED");
  if (!published.ok()) return fail(published.status(), "CACHE_WRITE_FAILED", w.hessians_key());

  TaskResult r;
  r.output_key = w.hessians_key();
  r.output_sha256 = published->first;
  r.output_bytes = published->second;
  v1::TaskMetrics& m = r.metrics;
  {
    std::lock_guard<std::mutex> l(partials.io().mu);
    m.set_bytes_read(partials.io().bytes_read);
  }
  {
    std::lock_guard<std::mutex> l(cache.io().mu);
    m.set_bytes_written(cache.io().bytes_written);
  }
  m.set_tokens(outcome->tokens);
  m.set_backend("cpu");
  control->SetPhase("done", 1.0);
  return r;
}

}  // namespace qforge

namespace qforge {
namespace {

// One model directory of an evaluation: its store (wrapped for the task), headers and
// decoder config.
struct EvaluationModel {
  std::unique_ptr<TaskStore> store;
  std::optional<SafetensorsModel> model;
  std::optional<DecoderModelConfig> config;
};

}  // namespace

absl::StatusOr<TaskResult> TaskExecutor::ExecuteEvaluate(const v1::Task& task,
                                                         TaskControl* control) {
  const v1::EvaluationWork& w = task.evaluation();
  const std::string shard = absl::StrCat("evaluation shard [", w.sample_begin(), ", ",
                                         w.sample_end(), ")");
  const std::string where = absl::StrCat("task ", task.id(), " (", shard, ")");
  const CalibrationTaskErrors errors{task.id(), where};
  auto fail = [&errors](const absl::Status& s, std::string_view reason, std::string_view subject) {
    return errors.Fail(s, reason, subject);
  };
  auto bad_task = [&errors](std::string_view what) { return errors.BadTask(what); };
  if (w.reference_model_uri().empty()) return bad_task("evaluation.reference_model_uri is empty");
  if (w.candidate_model_uri().empty()) return bad_task("evaluation.candidate_model_uri is empty");
  if (w.dataset_uri().empty()) return bad_task("evaluation.dataset_uri is empty");
  if (w.dataset_sha256().empty()) return bad_task("evaluation.dataset_sha256 is empty");
  if (task.staging_uri().empty()) return bad_task("staging_uri is empty");
  if (task.staging_key().empty()) return bad_task("staging_key is empty");
  if (w.sample_begin() < 0 || w.sample_end() <= w.sample_begin()) {
    return bad_task("the sample range is empty or negative");
  }

  // Both models: headers and config.json; the candidate's quantization_config.
  control->SetPhase("read", 0.01);
  auto open_model = [&](const std::string& uri, const char* role,
                        EvaluationModel* m) -> absl::Status {
    auto base = Store(uri);
    if (!base.ok()) return fail(base.status(), "MODEL_READ_FAILED", uri);
    m->store = std::make_unique<TaskStore>(*base, role, control, nullptr);
    auto model = SafetensorsModel::Open(*m->store, "");
    if (!model.ok()) return fail(model.status(), "MODEL_READ_FAILED", uri);
    m->model = *std::move(model);
    auto config = ReadDecoderModelConfig(*m->store, "");
    if (!config.ok()) return fail(config.status(), "MODEL_READ_FAILED", uri);
    m->config = *std::move(config);
    return absl::OkStatus();
  };
  EvaluationModel reference, candidate;
  QF_RETURN_IF_ERROR(open_model(w.reference_model_uri(), "reference", &reference));
  QF_RETURN_IF_ERROR(open_model(w.candidate_model_uri(), "candidate", &candidate));
  auto quantization = ReadModelQuantization(*candidate.store, "");
  if (!quantization.ok()) {
    return fail(quantization.status(), "MODEL_READ_FAILED", w.candidate_model_uri());
  }

  // The data, as the coordinator loaded it when it planned the job.
  uint64_t data_bytes_read = 0;
  PlannedTokenData planned{"evaluation", w.dataset_uri(), w.dataset_sha256(), w.samples(),
                           w.seq_len(), w.sample_end(), {}};
  planned.options.max_samples = task.spec().evaluation().samples();
  planned.options.seq_len = task.spec().evaluation().seq_len();
  auto data = LoadPlannedTokenData(planned, reference.config->decoder,
                                   [this](std::string_view uri) { return Store(uri); }, control,
                                   errors, &data_bytes_read);
  if (!data.ok()) return data.status();

  auto out_base = Store(task.staging_uri());
  if (!out_base.ok()) return fail(out_base.status(), "STAGING_WRITE_FAILED", task.staging_uri());
  TaskStore staging(*out_base, "staging", control, nullptr);
  if (options_.forward == nullptr) options_.forward = quant::NewCpuDecoderForward();

  EvaluationShardJob job;
  job.reference_store = reference.store.get();
  job.reference_model = &*reference.model;
  job.candidate_store = candidate.store.get();
  job.candidate_model = &*candidate.model;
  job.candidate_quantization = &*quantization;
  job.reference_config = &*reference.config;
  job.candidate_config = &*candidate.config;
  job.data = &*data;
  job.sample_begin = w.sample_begin();
  job.sample_end = w.sample_end();
  job.forward = options_.forward.get();
  job.progress = StepProgressFor(control, "evaluate");
  job.out_store = &staging;
  job.staged_key = task.staging_key();
  job.spill_dir = options_.spill_dir;
  job.spill_above_bytes = options_.spill_above_bytes;
  control->SetPhase("evaluate", 0.05);
  absl::StatusOr<EvaluationShardOutcome> outcome = RunEvaluationShard(job);
  if (control->cancelled()) {
    (void)(*out_base)->Delete(task.staging_key());
    return WithReason(absl::CancelledError(absl::StrCat(where, ": cancelled")), "CANCELLED",
                      task.id());
  }
  if (!outcome.ok()) {
    const absl::Status& e = outcome.status();
    if (auto key = staging.FailedWith(e.code()); key.has_value()) {
      return fail(e, "STAGING_WRITE_FAILED", absl::StrCat(task.staging_uri(), "/", *key));
    }
    if (auto key = reference.store->FailedWith(e.code()); key.has_value()) {
      return fail(e, "MODEL_READ_FAILED", absl::StrCat(w.reference_model_uri(), "/", *key));
    }
    if (auto key = candidate.store->FailedWith(e.code()); key.has_value()) {
      return fail(e, "MODEL_READ_FAILED", absl::StrCat(w.candidate_model_uri(), "/", *key));
    }
    return fail(e, "EVALUATION_FAILED", shard);
  }

  control->SetPhase("verify", 0.97);
  auto published = VerifyPublished(staging, *out_base, task.staging_uri(), task.staging_key(),
                                   where, "STAGING_WRITE_FAILED");
  if (!published.ok()) return fail(published.status(), "STAGING_WRITE_FAILED", task.staging_key());

  TaskResult r;
  r.output_key = task.staging_key();
  r.output_sha256 = published->first;
  r.output_bytes = published->second;
  v1::TaskMetrics& m = r.metrics;
  m.set_read_seconds(outcome->read_seconds);
  m.set_solve_seconds(outcome->forward_seconds + outcome->head_seconds);
  uint64_t bytes_read = data_bytes_read;
  for (TaskStore* st : {reference.store.get(), candidate.store.get()}) {
    std::lock_guard<std::mutex> l(st->io().mu);
    bytes_read += st->io().bytes_read;
  }
  m.set_bytes_read(bytes_read);
  {
    std::lock_guard<std::mutex> l(staging.io().mu);
    m.set_bytes_written(staging.io().bytes_written);
  }
  m.set_tokens(outcome->sums.predicted_tokens);
  m.set_backend(options_.forward->backend());
  control->SetPhase("done", 1.0);
  return r;
}

absl::StatusOr<TaskResult> TaskExecutor::ExecuteEvalReduce(const v1::Task& task,
                                                           TaskControl* control) {
  const v1::EvaluationWork& w = task.evaluation();
  const std::string where = absl::StrCat("task ", task.id(), " (reduce of ",
                                         w.partial_keys_size(), " evaluation shards)");
  const CalibrationTaskErrors errors{task.id(), where};
  auto fail = [&errors](const absl::Status& s, std::string_view reason, std::string_view subject) {
    return errors.Fail(s, reason, subject);
  };
  auto bad_task = [&errors](std::string_view what) { return errors.BadTask(what); };
  if (w.partial_keys().empty()) return bad_task("evaluation.partial_keys is empty");
  if (task.staging_uri().empty()) return bad_task("staging_uri is empty");
  if (task.staging_key().empty()) return bad_task("staging_key is empty");
  // The gate from the job's spec, through the one conversion.
  auto config = ConvertJobSpec(task.spec());
  if (!config.ok()) return WithReason(Prefixed(config.status(), absl::StrCat(where, ": ")),
                                      "INVALID_SPEC", task.id());
  const QualityGate gate = QualityGateOf(config->evaluation);

  auto base = Store(task.staging_uri());
  if (!base.ok()) return fail(base.status(), "STAGING_READ_FAILED", task.staging_uri());
  TaskStore staging(*base, "staging", control, nullptr);
  control->SetPhase("reduce", 0.05);
  absl::StatusOr<QualityMetrics> metrics = ReduceEvaluation(
      staging, std::vector<std::string>(w.partial_keys().begin(), w.partial_keys().end()));
  if (control->cancelled()) {
    return WithReason(absl::CancelledError(absl::StrCat(where, ": cancelled")), "CANCELLED",
                      task.id());
  }
  if (!metrics.ok()) {
    const absl::Status& e = metrics.status();
    if (auto key = staging.FailedWith(e.code()); key.has_value()) {
      return fail(e, "STAGING_READ_FAILED", absl::StrCat(task.staging_uri(), "/", *key));
    }
    return fail(e, "EVALUATION_FAILED", task.id());
  }
  // The coordinator decides the job's outcome from these metrics with the same gate; the
  // task itself succeeds either way (its result is the measurement).
  const absl::Status gated = CheckQualityGate(*metrics, gate);
  control->SetPhase(gated.ok() ? "write" : "write (gate missed)", 0.9);
  const std::string text = QualityMetricsToJson(*metrics, gate).dump(2) + "\n";
  if (absl::Status s = staging.Put(task.staging_key(), text); !s.ok()) {
    return fail(s, "STAGING_WRITE_FAILED", absl::StrCat(task.staging_uri(), "/", task.staging_key()));
  }
  control->SetPhase("verify", 0.97);
  auto published = VerifyPublished(staging, *base, task.staging_uri(), task.staging_key(), where,
                                   "STAGING_WRITE_FAILED");
  if (!published.ok()) return fail(published.status(), "STAGING_WRITE_FAILED", task.staging_key());

  TaskResult r;
  r.output_key = task.staging_key();
  r.output_sha256 = published->first;
  r.output_bytes = published->second;
  v1::TaskMetrics& m = r.metrics;
  {
    std::lock_guard<std::mutex> l(staging.io().mu);
    m.set_bytes_read(staging.io().bytes_read);
    m.set_bytes_written(staging.io().bytes_written);
  }
  m.set_tokens(metrics->tokens);
  m.set_backend("cpu");
  control->SetPhase("done", 1.0);
  return r;
}

}  // namespace qforge

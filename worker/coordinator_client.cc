#include "worker/coordinator_client.h"


#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <new>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/absl_compat.h"
#include "common/tls.h"

namespace qforge {
namespace {

using SteadyClock = std::chrono::steady_clock;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             SteadyClock::now().time_since_epoch())
      .count();
}

// Codes after which a retry of the same call may succeed (the coordinator is restarting, a
// connection dropped, a deadline passed).
bool Transient(absl::StatusCode c) {
  return c == absl::StatusCode::kUnavailable || c == absl::StatusCode::kDeadlineExceeded ||
         c == absl::StatusCode::kAborted || c == absl::StatusCode::kResourceExhausted ||
         c == absl::StatusCode::kUnknown;
}

// The coordinator refuses this worker: retrying cannot help.
bool Fatal(absl::StatusCode c) {
  return c == absl::StatusCode::kUnauthenticated || c == absl::StatusCode::kPermissionDenied ||
         c == absl::StatusCode::kInvalidArgument;
}

std::string Describe(const v1::Task& task) {
  std::string s = absl::StrCat("task ", task.id());
  if (!task.layer().module().empty()) absl::StrAppend(&s, " (", task.layer().module(), ")");
  absl::StrAppend(&s, " attempt ", task.attempt());
  return s;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.error_code())),
                      s.error_message());
}

std::shared_ptr<grpc::Channel> NewCoordinatorChannel(
    const std::string& target, std::shared_ptr<grpc::ChannelCredentials> credentials) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  return grpc::CreateCustomChannel(
      target, credentials != nullptr ? credentials : grpc::InsecureChannelCredentials(), args);
}

// ---- CoordinatorClient -----------------------------------------------------------------

CoordinatorClient::CoordinatorClient(std::unique_ptr<v1::WorkerService::StubInterface> stub,
                                     std::string token, int64_t rpc_timeout_ms)
    : stub_(std::move(stub)), token_(std::move(token)), rpc_timeout_ms_(rpc_timeout_ms) {}

void CoordinatorClient::Prepare(grpc::ClientContext* ctx, int64_t timeout_ms) const {
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  if (!token_.empty()) ctx->AddMetadata("authorization", "Bearer " + token_);
}

absl::StatusOr<v1::RegisterWorkerResponse> CoordinatorClient::RegisterWorker(
    const v1::RegisterWorkerRequest& r) {
  grpc::ClientContext ctx;
  Prepare(&ctx, rpc_timeout_ms_);
  v1::RegisterWorkerResponse resp;
  absl::Status s = FromGrpcStatus(stub_->RegisterWorker(&ctx, r, &resp));
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::AcquireTaskResponse> CoordinatorClient::AcquireTask(
    const v1::AcquireTaskRequest& r, int64_t slack_ms, const std::atomic<bool>* abort) {
  grpc::ClientContext ctx;
  Prepare(&ctx, std::max<int64_t>(r.wait_ms(), 0) + slack_ms);
  {
    std::lock_guard<std::mutex> l(mu_);
    if (abort != nullptr && abort->load()) return absl::CancelledError("long-poll aborted");
    long_polls_.insert(&ctx);
  }
  v1::AcquireTaskResponse resp;
  grpc::Status gs = stub_->AcquireTask(&ctx, r, &resp);
  {
    std::lock_guard<std::mutex> l(mu_);
    long_polls_.erase(&ctx);
  }
  absl::Status s = FromGrpcStatus(gs);
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::HeartbeatResponse> CoordinatorClient::Heartbeat(const v1::HeartbeatRequest& r) {
  grpc::ClientContext ctx;
  Prepare(&ctx, rpc_timeout_ms_);
  v1::HeartbeatResponse resp;
  absl::Status s = FromGrpcStatus(stub_->Heartbeat(&ctx, r, &resp));
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::CompleteTaskResponse> CoordinatorClient::CompleteTask(
    const v1::CompleteTaskRequest& r) {
  grpc::ClientContext ctx;
  Prepare(&ctx, rpc_timeout_ms_);
  v1::CompleteTaskResponse resp;
  absl::Status s = FromGrpcStatus(stub_->CompleteTask(&ctx, r, &resp));
  if (!s.ok()) return s;
  return resp;
}

absl::Status CoordinatorClient::FailTask(const v1::FailTaskRequest& r) {
  grpc::ClientContext ctx;
  Prepare(&ctx, rpc_timeout_ms_);
  v1::FailTaskResponse resp;
  return FromGrpcStatus(stub_->FailTask(&ctx, r, &resp));
}

void CoordinatorClient::CancelLongPolls() {
  std::lock_guard<std::mutex> l(mu_);
  for (grpc::ClientContext* ctx : long_polls_) ctx->TryCancel();
}

// ---- Worker ----------------------------------------------------------------------------

const char* TaskOutcomeName(TaskOutcome o) {
  switch (o) {
    case TaskOutcome::kSucceeded:
      return "succeeded";
    case TaskOutcome::kFailed:
      return "failed";
    case TaskOutcome::kCancelled:
      return "cancelled";
    case TaskOutcome::kLeaseLost:
      return "lost";
    case TaskOutcome::kReleased:
      return "released";
  }
  return "unknown";
}

// One running task, shared by the Run thread and the task thread (which keeps it alive when
// abandoned).
struct Worker::Running {
  TaskControl control;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  absl::StatusOr<TaskResult> result = absl::UnknownError("the task did not run");
  std::thread thread;
};

Worker::Worker(WorkerOptions options, CoordinatorClient* client, TaskRunner runner,
               WorkerListener* listener)
    : options_(std::move(options)),
      client_(client),
      runner_(std::move(runner)),
      listener_(listener),
      heartbeat_interval_ms_(options_.default_heartbeat_interval_ms) {}

Worker::~Worker() = default;

std::string Worker::worker_id() const {
  std::lock_guard<std::mutex> l(mu_);
  return worker_id_;
}

void Worker::Log(const std::string& line) const {
  if (!options_.log) return;
  std::fprintf(stderr, "qforge-worker: %s\n", line.c_str());
  std::fflush(stderr);
}

void Worker::Shutdown(bool immediate) {
  if (!stopping_.exchange(true)) shutdown_at_ms_.store(NowMs());
  if (immediate) immediate_.store(true);
  client_->CancelLongPolls();
  std::shared_ptr<Running> run;
  {
    std::lock_guard<std::mutex> l(mu_);
    run = current_;
  }
  cv_.notify_all();
  if (run != nullptr) {
    std::lock_guard<std::mutex> l(run->mu);  // no lost wake-up: the flags are already set
    run->cv.notify_all();
  }
}

void Worker::Sleep(int64_t ms, bool immediate_only) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait_for(l, std::chrono::milliseconds(ms),
               [&] { return immediate_only ? immediate_.load() : stopping_.load(); });
}

absl::Status Worker::Register(bool again) {
  v1::RegisterWorkerRequest req;
  req.set_hostname(options_.hostname);
  for (const std::string& b : options_.backends) req.add_backends(b);
  for (const v1::DeviceInfo& d : options_.devices) *req.add_devices() = d;
  req.set_version(options_.version);
  req.set_memory_budget_bytes(options_.memory_budget_bytes);
  req.set_worker_id(worker_id());
  int64_t backoff = options_.reconnect_initial_ms;
  bool logged = false;
  for (;;) {
    if (stopping()) return absl::CancelledError("shutting down");
    absl::StatusOr<v1::RegisterWorkerResponse> r = client_->RegisterWorker(req);
    if (r.ok()) {
      {
        std::lock_guard<std::mutex> l(mu_);
        worker_id_ = r->worker_id();
      }
      heartbeat_interval_ms_ = r->heartbeat_interval_ms() > 0
                                   ? r->heartbeat_interval_ms()
                                   : options_.default_heartbeat_interval_ms;
      if (logged) Log(absl::StrCat("reconnected to ", options_.coordinator));
      if (listener_ != nullptr) {
        listener_->OnCoordinatorContact();
        listener_->OnRegistered(r->worker_id(), again);
      }
      return absl::OkStatus();
    }
    if (Fatal(r.status().code())) {
      return absl::Status(r.status().code(),
                          absl::StrCat("the coordinator at ", options_.coordinator,
                                       " refused this worker: ", r.status().message()));
    }
    if (!logged) {
      const std::string hint = TlsHint(std::string(r.status().message()), options_.tls);
      Log(absl::StrCat("coordinator at ", options_.coordinator, " unreachable (",
                       r.status().ToString(), ")", hint.empty() ? "" : "; ", hint,
                       "; retrying"));
      logged = true;
    }
    Sleep(backoff, /*immediate_only=*/false);
    backoff = std::min(backoff * 2, options_.reconnect_max_ms);
  }
}

absl::Status Worker::Run() {
  absl::Status s = Register(/*again=*/false);
  if (!s.ok()) return absl::IsCancelled(s) ? absl::OkStatus() : s;
  bool need_register = false;
  while (!stopping()) {
    if (options_.max_tasks > 0 && tasks_run_.load() >= options_.max_tasks) break;
    if (need_register) {
      s = Register(/*again=*/true);
      if (!s.ok()) return absl::IsCancelled(s) ? absl::OkStatus() : s;
      need_register = false;
    }
    v1::AcquireTaskRequest req;
    req.set_worker_id(worker_id());
    req.set_wait_ms(options_.acquire_wait_ms);
    absl::StatusOr<v1::AcquireTaskResponse> r = client_->AcquireTask(req, 10'000, &stopping_);
    if (!r.ok()) {
      if (stopping()) break;
      const absl::StatusCode code = r.status().code();
      if (code == absl::StatusCode::kUnauthenticated ||
          code == absl::StatusCode::kPermissionDenied) {
        return absl::Status(code, absl::StrCat("the coordinator at ", options_.coordinator,
                                               " refused AcquireTask: ", r.status().message()));
      }
      if (!Transient(code)) {
        // NOT_FOUND / FAILED_PRECONDITION: the coordinator does not know this worker (its
        // state was reset); anything else: unexpected. Either way, register again.
        Log(absl::StrCat("AcquireTask: ", r.status().ToString(), "; registering again"));
        Sleep(options_.reconnect_initial_ms, false);
      }
      need_register = true;  // Register() retries with backoff while the coordinator is down
      continue;
    }
    if (listener_ != nullptr) listener_->OnCoordinatorContact();
    if (!r->has_task()) continue;
    // The task, then each next one the coordinator leased with the previous completion.
    std::optional<v1::Task> task = std::move(*r->mutable_task());
    while (task.has_value() && !stopping()) {
      const bool want_next =
          options_.max_tasks <= 0 || tasks_run_.load() + 1 < options_.max_tasks;
      std::optional<v1::Task> next = RunTask(*task, want_next);
      tasks_run_.fetch_add(1);
      task = std::move(next);
    }
    if (task.has_value()) {
      GiveBack(*task);  // leased just as we stopped
      break;
    }
  }
  return absl::OkStatus();
}

void Worker::GiveBack(const v1::Task& task) {
  v1::FailTaskRequest f;
  f.set_worker_id(worker_id());
  f.set_task_id(task.id());
  f.set_lease_token(task.lease_token());
  *f.mutable_error() = ToErrorInfo(WithReason(absl::UnavailableError("the worker is shutting down"),
                                              "WORKER_SHUTDOWN", worker_id()));
  f.set_retryable(true);
  (void)Report([&] { return client_->FailTask(f); }, "FailTask");
}

absl::Status Worker::Report(const std::function<absl::Status()>& call, std::string_view what) {
  const int64_t deadline = NowMs() + options_.report_timeout_ms;
  int64_t backoff = options_.reconnect_initial_ms;
  bool logged = false;
  for (;;) {
    absl::Status s = call();
    if (s.ok() || !Transient(s.code()) || immediate_.load() || NowMs() + backoff > deadline) {
      if (!s.ok() && logged) Log(absl::StrCat(Sv(what), " gave up: ", s.ToString()));
      return s;
    }
    if (!logged) {
      Log(absl::StrCat(Sv(what), ": ", s.ToString(), "; retrying"));
      logged = true;
    }
    Sleep(backoff, /*immediate_only=*/true);
    backoff = std::min(backoff * 2, options_.reconnect_max_ms);
  }
}

Worker::Verdict Worker::Supervise(const v1::Task& task, Running& run) {
  int64_t next_heartbeat = NowMs() + heartbeat_interval_ms_;
  bool saw_stop = false, saw_immediate = false;
  bool heartbeat_failing = false;
  for (;;) {
    int64_t wake = next_heartbeat;
    if (stopping()) {
      const int64_t drain_end = immediate_.load() ? 0 : shutdown_at_ms_.load() + options_.drain_ms;
      if (NowMs() >= drain_end) {
        std::lock_guard<std::mutex> l(run.mu);
        if (!run.done) return Verdict::kRelease;
      }
      wake = std::min(wake, drain_end);
    }
    {
      std::unique_lock<std::mutex> l(run.mu);
      run.cv.wait_for(l, std::chrono::milliseconds(std::max<int64_t>(wake - NowMs(), 0)), [&] {
        return run.done || stopping() != saw_stop || immediate_.load() != saw_immediate;
      });
      if (run.done) return Verdict::kDone;
    }
    saw_stop = stopping();
    saw_immediate = immediate_.load();
    if (NowMs() < next_heartbeat) continue;

    v1::HeartbeatRequest hb;
    hb.set_worker_id(worker_id());
    hb.set_task_id(task.id());
    hb.set_lease_token(task.lease_token());
    auto [phase, progress] = run.control.Snapshot();
    // The coordinator refuses anything but a fraction (NaN included).
    hb.set_progress(std::isfinite(progress) ? std::clamp(progress, 0.0, 1.0) : 0.0);
    hb.set_phase(phase);
    absl::StatusOr<v1::HeartbeatResponse> r = client_->Heartbeat(hb);
    next_heartbeat = NowMs() + heartbeat_interval_ms_;
    if (!r.ok()) {
      if (absl::IsNotFound(r.status()) || absl::IsFailedPrecondition(r.status())) {
        Log(absl::StrCat(Describe(task), ": heartbeat refused (", r.status().ToString(),
                         "): lease lost"));
        return Verdict::kLeaseLost;
      }
      // The coordinator may be restarting: keep solving; the lease outlives a few misses.
      if (!heartbeat_failing) {
        Log(absl::StrCat(Describe(task), ": heartbeat failed: ", r.status().ToString(),
                         "; still solving"));
        heartbeat_failing = true;
      }
      continue;
    }
    if (listener_ != nullptr) listener_->OnCoordinatorContact();
    if (heartbeat_failing) {
      Log(absl::StrCat(Describe(task), ": heartbeats resumed"));
      heartbeat_failing = false;
    }
    if (r->cancel()) return Verdict::kCancelled;
    if (r->lease_lost()) return Verdict::kLeaseLost;
  }
}

void Worker::FinishOrAbandon(Running& run) {
  std::unique_lock<std::mutex> l(run.mu);
  run.cv.wait(l, [&] { return run.done || stopping(); });
  if (run.done) {
    l.unlock();
    run.thread.join();
  } else {
    run.thread.detach();  // the thread owns a reference to `run`
    abandoned_.store(true);
  }
}

std::optional<v1::Task> Worker::RunTask(const v1::Task& task, bool want_next) {
  const auto start = SteadyClock::now();
  if (listener_ != nullptr) listener_->OnTaskStarted(task);
  Log(absl::StrCat(Describe(task), ": started"));
  auto run = std::make_shared<Running>();
  {
    std::lock_guard<std::mutex> l(mu_);
    current_ = run;
  }
  run->thread = std::thread([run, runner = runner_, task] {
    absl::StatusOr<TaskResult> r;
    try {
      r = runner(task, &run->control);
    } catch (const std::bad_alloc&) {
      r = WithReason(absl::ResourceExhaustedError(absl::StrCat(
                         "out of memory running task ", task.id(), " (layer '",
                         task.layer().module(), "')")),
                     "OUT_OF_MEMORY", task.layer().module());
    } catch (const std::exception& e) {
      r = WithReason(absl::InternalError(absl::StrCat("task ", task.id(), " (layer '",
                                                      task.layer().module(), "'): ", e.what())),
                     "INTERNAL", task.layer().module());
    }
    std::lock_guard<std::mutex> l(run->mu);
    run->result = std::move(r);
    run->done = true;
    run->cv.notify_all();
  });

  const Verdict verdict = Supervise(task, *run);
  {
    std::lock_guard<std::mutex> l(mu_);
    current_.reset();
  }
  TaskOutcome outcome = TaskOutcome::kFailed;
  const TaskResult* result = nullptr;
  std::optional<v1::Task> next;  // leased with the completion
  auto fail = [&](const absl::Status& error, bool retryable) {
    v1::FailTaskRequest f;
    f.set_worker_id(worker_id());
    f.set_task_id(task.id());
    f.set_lease_token(task.lease_token());
    *f.mutable_error() = ToErrorInfo(error);
    f.set_retryable(retryable);
    return Report([&] { return client_->FailTask(f); }, "FailTask");
  };

  switch (verdict) {
    case Verdict::kDone: {
      run->thread.join();
      if (run->result.ok()) {
        result = &*run->result;
        v1::CompleteTaskRequest c;
        c.set_worker_id(worker_id());
        c.set_task_id(task.id());
        c.set_lease_token(task.lease_token());
        c.set_output_key(result->output_key);
        c.set_output_sha256(result->output_sha256);
        c.set_output_bytes(result->output_bytes);
        *c.mutable_metrics() = result->metrics;
        c.set_acquire_next(want_next && !stopping());
        absl::Status s = Report(
            [&] {
              absl::StatusOr<v1::CompleteTaskResponse> r = client_->CompleteTask(c);
              if (r.ok() && r->has_next_task()) next = std::move(*r->mutable_next_task());
              return r.status();
            },
            "CompleteTask");
        if (s.ok()) {
          outcome = TaskOutcome::kSucceeded;
          Log(absl::StrFormat("%s: succeeded in %.2f s (relative error %.3g)", Describe(task),
                              std::chrono::duration<double>(SteadyClock::now() - start).count(),
                              result->metrics.relative_error()));
        } else {
          // Refused (the output is not where the coordinator looks, not what was reported,
          // ...): say so with FailTask, so the task is retried now rather than when its lease
          // expires. A stale lease refuses this too: then the task is simply lost.
          const absl::Status refused = WithReason(
              absl::Status(s.code(), absl::StrCat("the coordinator refused the completion of task ",
                                                  task.id(), ": ", s.message())),
              "COMPLETION_REFUSED", result->output_key);
          const absl::Status reported = fail(refused, /*retryable=*/true);
          outcome = reported.ok() ? TaskOutcome::kFailed : TaskOutcome::kLeaseLost;
          Log(absl::StrCat(Describe(task), ": completion not accepted: ", s.ToString(),
                           reported.ok() ? "; reported with FailTask (retryable)"
                                         : absl::StrCat("; FailTask: ", reported.ToString())));
        }
      } else {
        const absl::Status& e = run->result.status();
        const bool retryable = IsRetryableError(e.code());
        absl::Status s = fail(e, retryable);
        outcome = TaskOutcome::kFailed;
        Log(absl::StrCat(Describe(task), ": failed (", retryable ? "retryable" : "not retryable",
                         "): ", e.ToString(), s.ok() ? "" : absl::StrCat(" [not reported: ", s.ToString(), "]")));
      }
      break;
    }
    case Verdict::kCancelled: {
      run->control.Cancel();
      (void)fail(WithReason(absl::CancelledError(absl::StrCat(
                                "task ", task.id(), " (layer '", task.layer().module(),
                                "') cancelled by the coordinator")),
                            "CANCELLED", task.layer().module()),
                 /*retryable=*/false);
      outcome = TaskOutcome::kCancelled;
      Log(absl::StrCat(Describe(task), ": cancelled"));
      FinishOrAbandon(*run);
      break;
    }
    case Verdict::kLeaseLost:
      run->control.Cancel();
      outcome = TaskOutcome::kLeaseLost;
      Log(absl::StrCat(Describe(task), ": lease lost; dropped"));
      FinishOrAbandon(*run);
      break;
    case Verdict::kRelease: {
      run->control.Cancel();
      (void)fail(WithReason(absl::UnavailableError(absl::StrCat(
                                "worker ", worker_id(), " shut down before task ", task.id(),
                                " finished (drain ", options_.drain_ms / 1000.0, " s)")),
                            "WORKER_SHUTDOWN", worker_id()),
                 /*retryable=*/true);
      outcome = TaskOutcome::kReleased;
      Log(absl::StrCat(Describe(task), ": released (shutting down)"));
      run->thread.detach();
      abandoned_.store(true);
      break;
    }
  }
  if (listener_ != nullptr) {
    listener_->OnTaskFinished(
        task, outcome, std::chrono::duration<double>(SteadyClock::now() - start).count(), result);
  }
  return next;
}

}  // namespace qforge

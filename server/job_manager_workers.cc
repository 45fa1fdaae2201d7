// JobManager: the worker calls (register, acquire, heartbeat, complete, fail) and the
// workers' listing. See job_manager_impl.h.
#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "common/object_digest.h"
#include "server/job_manager_impl.h"
#include "server/request_limits.h"
#include "job/calibration.h"
#include "job/evaluation.h"
#include "job/evaluation_record.h"
#include "job/staging_layout.h"

namespace qforge {
namespace {

constexpr int64_t kMaxWaitSliceMs = 250;  // long-polls re-check at least this often

}  // namespace

std::vector<v1::WorkerInfo> JobManager::Impl::ListWorkers(std::string_view tenant) {
  absl::MutexLock lock(&mu_);
  const int64_t now = Now();
  // worker -> a task it runs; "" when that task is another tenant's (not disclosed).
  std::map<std::string, std::string> current;
  for (const auto& [id, t] : tasks_) {
    if (t.state != v1::TASK_STATE_RUNNING || t.worker_id.empty()) continue;
    auto job = jobs_.find(t.job_id);
    const bool own = job != jobs_.end() && job->second.rec.job.tenant() == tenant;
    std::string& shown = current[t.worker_id];
    if (own) shown = id;
  }
  std::vector<v1::WorkerInfo> out;
  for (const auto& [id, w] : workers_) {
    v1::WorkerInfo info;
    info.set_id(id);
    info.set_hostname(w.registration.hostname());
    auto cur = current.find(id);
    info.set_state(WorkerState(w, cur != current.end(), now));
    *info.mutable_backends() = w.registration.backends();
    *info.mutable_devices() = w.registration.devices();
    info.set_version(w.registration.version());
    info.set_last_heartbeat_unix_ms(w.last_seen_ms);
    if (cur != current.end()) info.set_current_task(cur->second);
    info.set_tasks_completed(w.tasks_completed);
    info.set_tasks_failed(w.tasks_failed);
    out.push_back(std::move(info));
  }
  return out;
}

uint64_t JobManager::Impl::WorkGeneration() {
  absl::MutexLock lock(&mu_);
  return work_generation_;
}

void JobManager::Impl::NotifyOnWork(uint64_t generation, int64_t max_wait_ms,
                                    std::function<void()> wake) {
  {
    absl::MutexLock lock(&mu_);
    if (!shutdown_ && work_generation_ == generation) {
      // Under the lock: SignalWork (which runs under it too) cannot slip in between.
      wakeups_.Add(kWorkWakeupKey, absl::Milliseconds(max_wait_ms), std::move(wake));
      return;
    }
  }
  wakeups_.Add(kWorkWakeupKey, absl::ZeroDuration(), std::move(wake));  // see NotifyOnEvents
}

absl::StatusOr<v1::RegisterWorkerResponse> JobManager::Impl::RegisterWorker(
    const v1::RegisterWorkerRequest& request) {
  QF_RETURN_IF_ERROR(CheckRequest(request));
  if (request.worker_id() == kCoordinatorWorker) {
    return absl::InvalidArgumentError("worker_id: 'coordinator' is reserved");
  }
  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  const int64_t now = Now();
  std::string id = request.worker_id();
  if (id.empty()) {
    do {
      id = absl::StrCat("w-", RandomHex(6));
    } while (workers_.count(id) != 0);
  }
  Txn tx(this);
  WorkerRecord w;
  if (workers_.count(id) != 0) w = workers_.at(id);
  w.id = id;
  w.registration = request;
  w.registration.clear_worker_id();
  if (w.registered_ms == 0) w.registered_ms = now;
  w.last_seen_ms = now;
  if (workers_.count(id) != 0) {
    tx.Worker(id) = w;
  } else {
    tx.NewWorker(w);
  }
  QF_RETURN_IF_ERROR(tx.Commit());
  v1::RegisterWorkerResponse resp;
  resp.set_worker_id(id);
  resp.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  resp.set_lease_duration_ms(options_.lease_duration_ms);
  return resp;
}

void JobManager::Impl::Lease(Txn& tx, const std::string& task_id, const std::string& worker_id,
                             int64_t now) {
  TaskRecord& t = tx.Task(task_id);
  t.state = v1::TASK_STATE_RUNNING;
  t.worker_id = worker_id;
  t.lease_token = RandomHex(16);
  t.lease_expiry_ms = scheduler_.LeaseExpiry(now);
  t.start_ms = now;
  t.end_ms = 0;
  switch (t.kind) {
    case v1::TASK_KIND_CALIBRATE:
      t.staging_key = StagingKey(t.job_id, t.id, t.attempt, kCalibrationPartialName);
      break;
    case v1::TASK_KIND_REDUCE:
      // The Hessian file goes to the cache, whatever the attempt (written atomically).
      t.staging_key = t.calibration.hessians_key();
      break;
    case v1::TASK_KIND_EVALUATE:
      t.staging_key = StagingKey(t.job_id, t.id, t.attempt, kEvaluationPartialName);
      break;
    case v1::TASK_KIND_EVAL_REDUCE:
      t.staging_key = StagingKey(t.job_id, t.id, t.attempt, kQualityResultName);
      break;
    default:
      t.staging_key = StagingKey(t.job_id, t.id, t.attempt);
      break;
  }
  t.output_key.clear();
  t.output_sha256.clear();
  t.output_bytes = 0;
  t.metrics.Clear();
  // The job's record is copied into the transition (and its row written) only when its state
  // changes: the first lease of a job, not every lease.
  if (tx.PeekJob(t.job_id).job.state() == v1::JOB_STATE_QUEUED) {
    JobRecord& j = tx.Job(t.job_id);
    v1::JobState state = v1::JOB_STATE_QUANTIZING;
    if (t.kind == v1::TASK_KIND_CALIBRATE || t.kind == v1::TASK_KIND_REDUCE) {
      state = v1::JOB_STATE_CALIBRATING;
    } else if (t.kind == v1::TASK_KIND_EVALUATE || t.kind == v1::TASK_KIND_EVAL_REDUCE) {
      state = v1::JOB_STATE_EVALUATING;  // an evaluation-only job
    }
    j.job.set_state(state);
    j.job.set_start_time_unix_ms(now);
    tx.Event(t.job_id, state == v1::JOB_STATE_CALIBRATING  ? "calibrating"
                       : state == v1::JOB_STATE_EVALUATING ? "evaluating"
                                                           : "quantizing");
  }
  tx.Event(t.job_id,
           absl::StrCat(TaskSubject(tx, t), " leased to worker ", worker_id, " (attempt ",
                        t.attempt + 1, " of ", tx.PeekJob(t.job_id).job.spec().max_attempts(),
                        ")"),
           &t);
}

const TaskRecord* JobManager::Impl::PickFor(const WorkerRecord& worker, int64_t now) {
  // Every unsettled job with its tasks; the scheduler picks (priority, FIFO, fit).
  std::vector<SchedulableJob> candidates;
  for (auto& [id, e] : jobs_) {
    if (e.task_refs.empty()) continue;
    SchedulableJob& j = candidates.emplace_back();
    j.job = &e.rec.job;
    j.tasks = &e.task_refs;
  }
  return scheduler_.PickTask(worker, candidates, now);
}

v1::Task JobManager::Impl::LeasedTask(const std::string& task_id) {
  const TaskRecord& t = tasks_.at(task_id);
  const JobRecord& j = jobs_.at(t.job_id).rec;
  v1::Task task;
  task.set_id(t.id);
  task.set_job_id(t.job_id);
  task.set_kind(t.kind);
  task.set_attempt(t.attempt);
  task.set_lease_token(t.lease_token);
  task.set_lease_expiry_unix_ms(t.lease_expiry_ms);
  *task.mutable_spec() = j.job.spec();
  if (t.kind == v1::TASK_KIND_QUANTIZE) *task.mutable_layer() = t.layer;
  if (t.kind == v1::TASK_KIND_CALIBRATE || t.kind == v1::TASK_KIND_REDUCE) {
    *task.mutable_calibration() = t.calibration;
  }
  if (t.kind == v1::TASK_KIND_EVALUATE || t.kind == v1::TASK_KIND_EVAL_REDUCE) {
    *task.mutable_evaluation() = t.evaluation;
  }
  task.set_staging_uri(StagingUri(j.job.spec()));
  task.set_staging_key(t.staging_key);
  return task;
}

std::optional<std::string> JobManager::Impl::LeaseNextWithin(Txn& tx, const std::string& worker_id,
                                                             int64_t now) {
  auto wit = workers_.find(worker_id);
  if (wit == workers_.end()) return std::nullopt;
  // The scheduler sees the state before this transition (the finishing task still counts as
  // running for its tenant's fair share); a pick that the transition itself touched (its job
  // moved on, the task changed) is left for the next AcquireTask.
  const TaskRecord* picked = PickFor(wit->second, now);
  if (picked == nullptr) return std::nullopt;
  const std::string pick = picked->id;
  const std::string job_id = picked->job_id;
  if (tx.PeekTask(pick).state != v1::TASK_STATE_QUEUED ||
      tx.PeekJob(job_id).job.state() != jobs_.at(job_id).rec.job.state()) {
    return std::nullopt;
  }
  Lease(tx, pick, worker_id, now);
  return pick;
}

std::optional<std::string> JobManager::Impl::HeldBy(const std::string& worker_id) {
  for (const auto& [id, e] : jobs_) {
    for (const TaskRecord* t : e.task_refs) {
      if (t->state == v1::TASK_STATE_RUNNING && t->worker_id == worker_id &&
          Scheduler::RunsOnWorkers(t->kind)) {
        return t->id;
      }
    }
  }
  return std::nullopt;
}

absl::StatusOr<std::optional<v1::Task>> JobManager::Impl::AcquireTask(
    const v1::AcquireTaskRequest& request) {
  const int64_t wait_ms =
      std::clamp<int64_t>(request.wait_ms(), 0, std::max<int64_t>(0, options_.max_acquire_wait_ms));
  QF_RETURN_IF_ERROR(CheckRequest(request));
  const absl::Time deadline = absl::Now() + absl::Milliseconds(wait_ms);
  std::optional<v1::Task> leased;
  {
    absl::MutexLock lock(&mu_);
    for (;;) {
      QF_RETURN_IF_ERROR(CheckRunning());
      auto wit = workers_.find(request.worker_id());
      if (request.worker_id().empty() || wit == workers_.end()) {
        return absl::NotFoundError(absl::StrCat("worker '", request.worker_id(),
                                                "' is not registered; call RegisterWorker"));
      }
      const int64_t now = Now();
      WorkerRecord& w = wit->second;
      w.last_seen_ms = now;  // in memory; persisted with the next transition

      if (const TaskRecord* picked = PickFor(w, now)) {
        const std::string pick = picked->id;  // the commit below replaces the record
        Txn tx(this);
        Lease(tx, pick, w.id, now);
        tx.Worker(w.id).last_seen_ms = now;
        QF_RETURN_IF_ERROR(tx.Commit());
        leased = LeasedTask(pick);
        break;
      }
      const absl::Time real_now = absl::Now();
      if (real_now >= deadline) break;
      work_cv_.WaitWithDeadline(
          &mu_, std::min(deadline, real_now + absl::Milliseconds(kMaxWaitSliceMs)));
    }
  }
  FlushNotes();
  return leased;
}

absl::StatusOr<v1::HeartbeatResponse> JobManager::Impl::Heartbeat(
    const v1::HeartbeatRequest& request) {
  QF_RETURN_IF_ERROR(CheckRequest(request));
  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  auto it = tasks_.find(request.task_id());
  if (request.task_id().empty() || it == tasks_.end()) {
    return absl::NotFoundError(absl::StrCat("task '", request.task_id(), "' not found"));
  }
  const int64_t now = Now();
  const TaskRecord& t = it->second;
  v1::HeartbeatResponse resp;
  auto wit = workers_.find(request.worker_id());
  if (wit != workers_.end()) wit->second.last_seen_ms = now;
  if (Scheduler::CheckLease(t, request.lease_token()) != LeaseCheck::kHeld) {
    resp.set_lease_lost(true);
    return resp;
  }
  TaskProgress& p = progress_[request.task_id()];
  p.progress = request.progress();  // CheckRequest: within [0, 1]
  p.phase = request.phase();
  Txn tx(this);
  TaskRecord& renewed = tx.Task(t.id);
  renewed.lease_expiry_ms = scheduler_.LeaseExpiry(now);
  if (wit != workers_.end()) tx.Worker(wit->first).last_seen_ms = now;
  // At most one progress event per job per interval, and only when a report moved.
  JobEntry& job = jobs_.at(t.job_id);
  std::string reported;
  if (!IsStopping(job.rec.job.state()) &&
      now - job.progress_event_ms >= options_.progress_event_interval_ms) {
    for (const v1::RunningTask& r : Running(tx, t.job_id)) {
      absl::StrAppend(&reported, r.task_id(), "=", static_cast<int>(r.progress() * 1000), ":",
                      r.phase(), ";");
    }
    if (reported != job.progress_reported) {
      tx.Event(t.job_id, "progress", nullptr, v1::EVENT_TYPE_PROGRESS);
    } else {
      reported.clear();
    }
  }
  QF_RETURN_IF_ERROR(tx.Commit());
  if (!reported.empty()) {
    job.progress_event_ms = now;
    job.progress_reported = std::move(reported);
  }
  const TaskRecord& cur = tasks_.at(request.task_id());
  resp.set_lease_expiry_unix_ms(cur.lease_expiry_ms);
  resp.set_cancel(IsStopping(jobs_.at(cur.job_id).rec.job.state()));
  return resp;
}

absl::Status JobManager::Impl::CompleteTask(const v1::CompleteTaskRequest& request,
                                          v1::CompleteTaskResponse* response) {
  std::string output_uri, output_key;
  // EVAL_REDUCE: what its result needs (read without the lock).
  std::shared_ptr<const JobConfig> eval_config;
  TaskRecord eval_reduce;
  double eval_seconds = 0;
  auto stale = [&](const TaskRecord& t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Txn view(this);
    return absl::FailedPreconditionError(absl::StrCat(
        "stale lease for task ", t.id, " (", TaskSubject(view, t),
        "): the lease expired or was given to another attempt; the result is discarded"));
  };
  QF_RETURN_IF_ERROR(CheckRequest(request));
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    auto it = tasks_.find(request.task_id());
    if (request.task_id().empty() || it == tasks_.end()) {
      return absl::NotFoundError(absl::StrCat("task '", request.task_id(), "' not found"));
    }
    const TaskRecord& t = it->second;
    switch (Scheduler::CheckLease(t, request.lease_token())) {
      case LeaseCheck::kAlreadySucceeded:
        // A retried completion that was already accepted; the task leased with it (the
        // answer that carried it was lost) is handed back while this worker holds it.
        if (response != nullptr && request.acquire_next() && request.worker_id() == t.worker_id) {
          if (std::optional<std::string> held = HeldBy(request.worker_id())) {
            *response->mutable_next_task() = LeasedTask(*held);
          }
        }
        return absl::OkStatus();
      case LeaseCheck::kStale:
        return stale(t);
      case LeaseCheck::kHeld:
        break;
    }
    output_key = request.output_key().empty() ? t.staging_key : request.output_key();
    if (output_key != t.staging_key) {
      return absl::InvalidArgumentError(absl::StrCat("output_key: '", request.output_key(),
                                                     "' is not this attempt's staging key '",
                                                     t.staging_key, "'"));
    }
    // A REDUCE writes to the Hessian cache; every other task to the job's staging.
    const JobEntry& e = jobs_.at(t.job_id);
    output_uri = t.kind == v1::TASK_KIND_REDUCE ? t.calibration.hessians_uri()
                                                : StagingUri(e.rec.job.spec());
    if (t.kind == v1::TASK_KIND_EVAL_REDUCE) {
      eval_config = e.config;
      eval_reduce = t;
      // First EVALUATE lease to now.
      int64_t first = Now();
      for (const std::string& tid : e.task_ids) {
        const TaskRecord& o = tasks_.at(tid);
        if (o.kind == v1::TASK_KIND_EVALUATE && o.start_ms > 0) first = std::min(first, o.start_ms);
      }
      eval_seconds = static_cast<double>(std::max<int64_t>(0, Now() - first)) / 1000.0;
      if (eval_config == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "task ", t.id, ": its job ", t.job_id, " is no longer running"));
      }
    }
  }

  // The staged result must exist and be, byte for byte, what the worker reported (size, then
  // its SHA-256, streamed) before the task counts as done (no lock held: I/O). An object that
  // differs fails this attempt (retryable: the task is queued again, the attempt counted).
  if (!IsSha256Hex(request.output_sha256())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "output_sha256: '", request.output_sha256().substr(0, 80),
        "' is not the staged object's SHA-256 as 64 lowercase hex digits"));
  }
  absl::Status mismatch;  // DATA_LOSS: the staged object is not what was reported
  uint64_t verified_bytes = 0;
  {
    auto store = options_.open_store(output_uri);
    if (!store.ok()) return store.status();
    auto missing = [&](const absl::Status& s) {
      return absl::FailedPreconditionError(absl::StrCat(
          "task ", request.task_id(), " reported output '", output_key, "' but it is not in ",
          output_uri, ": ", std::string(s.message())));
    };
    verified_bytes = request.output_bytes();
    if (verified_bytes == 0) {  // no size reported: the object's own (its sha256 still counts)
      auto info = (*store)->Stat(output_key);
      if (!info.ok()) return absl::IsNotFound(info.status()) ? missing(info.status()) : info.status();
      verified_bytes = info->size;
    }
    absl::Status v = VerifyObjectDigest(**store, output_key,
                                        {verified_bytes, request.output_sha256()});
    if (absl::IsNotFound(v)) return missing(v);
    if (absl::IsDataLoss(v)) {
      mismatch = absl::DataLossError(absl::StrCat("task ", request.task_id(), ": ", v.message()));
    } else if (!v.ok()) {
      return v;  // the store is briefly away (UNAVAILABLE, ...): the worker retries
    }
  }
  // An EVAL_REDUCE's metrics: validated, recorded in the manifest, gated (no lock held: I/O).
  std::optional<EvaluationOutcome> evaluated;
  if (eval_config != nullptr && mismatch.ok()) {
    evaluated = ReadEvaluationResult(output_uri, output_key, eval_config, eval_reduce,
                                     eval_seconds);
    // A store that is briefly away: the worker retries the completion.
    if (!evaluated->error.ok() && evaluated->retryable) return evaluated->error;
  }

  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    auto it = tasks_.find(request.task_id());
    if (it == tasks_.end()) {
      return absl::NotFoundError(absl::StrCat("task '", request.task_id(), "' not found"));
    }
    if (Scheduler::CheckLease(it->second, request.lease_token()) != LeaseCheck::kHeld) {
      return stale(it->second);
    }
    const int64_t now = Now();
    const std::string job_id = it->second.job_id;
    const JobRecord& job = jobs_.at(job_id).rec;
    Txn tx(this);
    if (workers_.count(request.worker_id()) != 0) {
      tx.Worker(request.worker_id()).last_seen_ms = now;
    }
    if (IsStopping(job.job.state())) {
      CancelTaskOfStoppedJob(tx, request.task_id(), now, "completed after the job stopped");
      MaybeFinishCancel(tx, job_id, now);
      QF_RETURN_IF_ERROR(tx.Commit());
      tick_cv_.SignalAll();
    } else if (!mismatch.ok()) {
      // The staged object changed (or was never what was reported): this attempt fails and
      // the task runs again, within its max_attempts.
      const TaskRecord& t = it->second;
      if (workers_.count(t.worker_id) != 0) ++tx.Worker(t.worker_id).tasks_failed;
      RetryOrFail(tx, request.task_id(),
                  MakeError(absl::StatusCode::kDataLoss, std::string(mismatch.message()),
                            "STAGED_OUTPUT_MISMATCH",
                            t.kind == v1::TASK_KIND_QUANTIZE ? t.layer.module() : output_key),
                  /*retryable=*/true, now);
      QF_RETURN_IF_ERROR(tx.Commit());
      tick_cv_.SignalAll();
      SignalWork();
    } else if (evaluated.has_value() && !evaluated->error.ok()) {
      // The reduce's result cannot be used: the task fails (the job with it).
      if (workers_.count(it->second.worker_id) != 0) ++tx.Worker(it->second.worker_id).tasks_failed;
      RetryOrFail(tx, request.task_id(),
                  MakeError(evaluated->error.code(), std::string(evaluated->error.message()),
                            "BAD_EVALUATION_RESULT", output_key),
                  /*retryable=*/false, now);
      QF_RETURN_IF_ERROR(tx.Commit());
      tick_cv_.SignalAll();
    } else {
      TaskRecord& t = tx.Task(request.task_id());
      t.state = v1::TASK_STATE_SUCCEEDED;
      t.end_ms = now;
      t.output_key = output_key;
      t.output_sha256 = request.output_sha256();
      t.output_bytes = verified_bytes;
      t.metrics = request.metrics();
      if (workers_.count(t.worker_id) != 0) {
        WorkerRecord& w = tx.Worker(t.worker_id);
        ++w.tasks_completed;
      }
      switch (t.kind) {
        case v1::TASK_KIND_CALIBRATE:
          tx.Event(job_id,
                   absl::StrCat(TaskSubject(tx, t), " done: ", t.metrics.tokens(), " tokens (",
                                Seconds(t.end_ms - t.start_ms), ")"),
                   &t);
          MaybeStartReduce(tx, job_id, now);
          break;
        case v1::TASK_KIND_REDUCE:
          tx.Event(job_id,
                   absl::StrCat("the Hessians of ", t.metrics.tokens(), " tokens are reduced (",
                                Seconds(t.end_ms - t.start_ms), ")"),
                   &t);
          MaybeFinishCalibration(tx, job_id, now);
          break;
        case v1::TASK_KIND_EVALUATE:
          tx.Event(job_id,
                   absl::StrCat(TaskSubject(tx, t), " done (", Seconds(t.end_ms - t.start_ms),
                                ")"),
                   &t);
          MaybeStartEvalReduce(tx, job_id, now);
          break;
        case v1::TASK_KIND_EVAL_REDUCE:
          tx.Event(job_id,
                   absl::StrCat("the evaluation shards are reduced (",
                                Seconds(t.end_ms - t.start_ms), ")"),
                   &t);
          FinishEvaluation(tx, job_id, std::move(evaluated->report), evaluated->gate, now);
          break;
        default: {
          char figures[96];
          std::snprintf(figures, sizeof(figures), " (relative error %.3g, %s)",
                        t.metrics.relative_error(), Seconds(t.end_ms - t.start_ms).c_str());
          tx.Event(job_id, absl::StrCat("layer ", t.layer.module(), " quantized", figures), &t);
          MaybeStartAssembling(tx, job_id, now);
          break;
        }
      }
      // The worker's next task, leased in the same transition (one commit for both).
      std::optional<std::string> next;
      if (response != nullptr && request.acquire_next() && request.worker_id() == t.worker_id) {
        next = LeaseNextWithin(tx, t.worker_id, now);
      }
      QF_RETURN_IF_ERROR(tx.Commit());
      if (next.has_value()) *response->mutable_next_task() = LeasedTask(*next);
      const TaskRecord& done = tasks_.at(request.task_id());
      const v1::Method method = job.job.spec().method();
      const v1::TaskKind kind = done.kind;
      const double seconds = static_cast<double>(done.end_ms - done.start_ms) / 1000.0;
      const v1::TaskMetrics m = done.metrics;
      Note([kind, method, seconds, m](JobManagerListener& l) {
        l.OnTaskFinished(kind, method, true, seconds);
        l.OnBytes(m.bytes_read(), m.bytes_written());
        if (kind == v1::TASK_KIND_QUANTIZE) {
          l.OnSolverPhase("read", m.read_seconds());
          l.OnSolverPhase("solve", m.solve_seconds());
          l.OnSolverPhase("write", m.write_seconds());
        }
      });
      SignalWork();  // a stage may have queued tasks
      const v1::JobState state = jobs_.at(job_id).rec.job.state();
      // Assembly, or the staging clean-up of a job that just ended.
      if (state == v1::JOB_STATE_ASSEMBLING || IsTerminal(state)) tick_cv_.SignalAll();
    }
  }
  FlushNotes();
  if (!mismatch.ok()) {
    return absl::DataLossError(absl::StrCat(
        mismatch.message(), "; the completion is refused and the attempt counted as failed"));
  }
  return absl::OkStatus();
}

absl::Status JobManager::Impl::FailTask(const v1::FailTaskRequest& request) {
  QF_RETURN_IF_ERROR(CheckRequest(request));
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    auto it = tasks_.find(request.task_id());
    if (request.task_id().empty() || it == tasks_.end()) {
      return absl::NotFoundError(absl::StrCat("task '", request.task_id(), "' not found"));
    }
    const TaskRecord& t = it->second;
    if (Scheduler::CheckLease(t, request.lease_token()) != LeaseCheck::kHeld) {
      Txn view(this);
      return absl::FailedPreconditionError(absl::StrCat(
          "stale lease for task ", t.id, " (", TaskSubject(view, t),
          "): the lease expired or was given to another attempt"));
    }
    const int64_t now = Now();
    const std::string job_id = t.job_id;
    const std::string task_id = t.id;
    Txn tx(this);
    if (workers_.count(request.worker_id()) != 0) {
      tx.Worker(request.worker_id()).last_seen_ms = now;
    }
    if (IsStopping(jobs_.at(job_id).rec.job.state())) {
      CancelTaskOfStoppedJob(tx, task_id, now, "stopped");
      MaybeFinishCancel(tx, job_id, now);
    } else {
      v1::ErrorInfo error = NormalizeWorkerError(request.error());  // capped as stored
      if (workers_.count(t.worker_id) != 0) ++tx.Worker(t.worker_id).tasks_failed;
      RetryOrFail(tx, task_id, std::move(error), request.retryable(), now);
    }
    QF_RETURN_IF_ERROR(tx.Commit());
    tick_cv_.SignalAll();
    SignalWork();
  }
  FlushNotes();
  return absl::OkStatus();
}


}  // namespace qforge

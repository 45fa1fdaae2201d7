// JobManager: housekeeping (Tick: lease expiry, backoff release, cancellations, assemblies,
// staging clean-up) and the gauges' figures. See job_manager_impl.h.
#include <algorithm>
#include <cstdio>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/job_manager_impl.h"

namespace qforge {
namespace {

bool IsRetryableCode(absl::StatusCode c) {
  return c == absl::StatusCode::kUnavailable || c == absl::StatusCode::kDeadlineExceeded ||
         c == absl::StatusCode::kAborted || c == absl::StatusCode::kResourceExhausted;
}

}  // namespace

void JobManager::Impl::ExpireLeases(int64_t now) {
  std::vector<std::string> expired;
  for (const auto& [id, t] : tasks_) {
    if (scheduler_.LeaseExpired(t, now)) expired.push_back(id);
  }
  for (const std::string& id : expired) {
    const TaskRecord& t = tasks_.at(id);
    const std::string job_id = t.job_id;
    Txn tx(this);
    if (IsStopping(jobs_.at(job_id).rec.job.state())) {
      CancelTaskOfStoppedJob(tx, id, now, "its lease expired after the job stopped");
      MaybeFinishCancel(tx, job_id, now);
    } else {
      v1::ErrorInfo error = MakeError(
          absl::StatusCode::kUnavailable,
          absl::StrCat("the lease of worker ", t.worker_id, " expired (no heartbeat for ",
                       Seconds(options_.lease_duration_ms), ")"),
          "LEASE_EXPIRED",
          t.kind == v1::TASK_KIND_QUANTIZE ? t.layer.module() : TaskSubject(tx, t));
      RetryOrFail(tx, id, std::move(error), /*retryable=*/true, now);
    }
    if (absl::Status s = tx.Commit(); !s.ok()) {
      LogError(absl::StrCat("expiring the lease of task ", id), s);
    }
  }
}

void JobManager::Impl::AdvanceJobs(int64_t now) {
  bool runnable = false;
  for (auto& [id, e] : jobs_) {
    const v1::JobState s = e.rec.job.state();
    if (s == v1::JOB_STATE_QUEUED || s == v1::JOB_STATE_CALIBRATING ||
        s == v1::JOB_STATE_QUANTIZING || s == v1::JOB_STATE_EVALUATING) {
      // Each stage's successor, in case a transition was missed (idempotent).
      Txn tx(this);
      MaybeStartReduce(tx, id, now);
      MaybeFinishCalibration(tx, id, now);
      MaybeStartAssembling(tx, id, now);
      MaybeStartEvalReduce(tx, id, now);
      if (absl::Status st = tx.Commit(); !st.ok()) LogError("advancing " + id, st);
      for (const TaskRecord* t : e.task_refs) {
        if (t->state == v1::TASK_STATE_QUEUED && Scheduler::RunsOnWorkers(t->kind) &&
            t->not_before_ms <= now) {
          runnable = true;
        }
      }
    } else if (s == v1::JOB_STATE_CANCELLING) {
      Txn tx(this);
      MaybeFinishCancel(tx, id, now);
      if (absl::Status st = tx.Commit(); !st.ok()) LogError("finishing cancel of " + id, st);
    }
  }
  if (runnable) SignalWork();  // e.g. a retry backoff has elapsed
}

std::vector<AssemblyWork> JobManager::Impl::StartDueAssemblies(int64_t now) {
  std::vector<AssemblyWork> due;
  for (auto& [id, e] : jobs_) {
    if (e.rec.job.state() != v1::JOB_STATE_ASSEMBLING || e.assembling || e.task_ids.empty()) {
      continue;
    }
    const std::string assemble = AssembleTaskOf(e, tasks_);
    if (assemble.empty()) continue;
    const TaskRecord& a = tasks_.at(assemble);
    if (a.state != v1::TASK_STATE_QUEUED || a.not_before_ms > now) continue;
    AssemblyWork work;
    work.job_id = id;
    work.config = e.config;
    if (e.rec.job.has_calibration()) work.calibration = CalibrationInfoToJson(e.rec.job.calibration());
    for (const std::string& tid : e.task_ids) {
      const TaskRecord& t = tasks_.at(tid);
      if (t.kind != v1::TASK_KIND_QUANTIZE) continue;
      StagedLayer l;
      l.module = t.layer.module();
      l.staged_key = t.output_key;
      l.extra = {{"task_id", t.id},
                 {"worker_id", t.worker_id},
                 {"attempt", t.attempt},
                 {"seconds", static_cast<double>(t.end_ms - t.start_ms) / 1000.0},
                 {"backend", t.metrics.backend()},
                 {"staged_sha256", t.output_sha256}};
      // Verified at completion; checked again by the assembler before it copies a byte.
      l.staged_sha256 = t.output_sha256;
      l.staged_bytes = t.output_bytes;
      work.layers.push_back(std::move(l));
    }
    Txn tx(this);
    TaskRecord& run = tx.Task(assemble);
    run.state = v1::TASK_STATE_RUNNING;
    run.worker_id = kCoordinatorWorker;
    run.start_ms = now;
    run.end_ms = 0;
    tx.Event(id, absl::StrCat("assembling the artifact (attempt ", run.attempt + 1, ")"), &run);
    if (absl::Status s = tx.Commit(); !s.ok()) {
      LogError("starting assembly of " + id, s);
      continue;
    }
    e.assembling = true;
    due.push_back(std::move(work));
  }
  return due;
}

bool JobManager::Impl::AssemblyCancelled(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  return jobs_.at(job_id).rec.job.state() == v1::JOB_STATE_CANCELLING;
}

void JobManager::Impl::FinishAssembly(const std::string& job_id,
                                      const AssemblyOutcome& outcome) {
  const absl::Status& status = outcome.status;
  const AssembleResult& result = outcome.result;
  {
    absl::MutexLock lock(&mu_);
    JobEntry& e = jobs_.at(job_id);
    e.assembling = false;
    const int64_t now = Now();
    const std::string assemble = AssembleTaskOf(e, tasks_);
    const v1::Method method = e.rec.job.spec().method();
    Txn tx(this);
    const TaskRecord& before = tasks_.at(assemble);
    const double seconds = static_cast<double>(now - before.start_ms) / 1000.0;
    if (e.rec.job.state() == v1::JOB_STATE_CANCELLING) {
      CancelTaskOfStoppedJob(tx, assemble, now, "the job was cancelled");
      MaybeFinishCancel(tx, job_id, now);
    } else if (status.ok()) {
      TaskRecord& a = tx.Task(assemble);
      a.state = v1::TASK_STATE_SUCCEEDED;
      a.end_ms = now;
      a.metrics.set_bytes_written(result.bytes_written);
      a.output_key = kManifestName;
      tx.Event(job_id,
               outcome.reused ? std::string("the artifact was already complete (its manifest exists)")
                      : absl::StrCat("artifact written: ", result.files_written.size(),
                                     " files, ", result.tensors_quantized, " quantized layers"),
               &a);
      JobRecord& j = tx.Job(job_id);
      j.job.set_manifest_uri(ChildUri(j.job.spec().output_uri(), kManifestName));
      // With evaluation the job goes on (EVALUATING); the artifact is complete either way.
      if (!MaybeStartEvaluation(tx, job_id, now)) {
        j.job.set_state(v1::JOB_STATE_SUCCEEDED);
        j.job.set_end_time_unix_ms(now);
        tx.Event(job_id, absl::StrCat("succeeded: manifest at ", j.job.manifest_uri()));
        if (outcome.staging_deleted) Settle(tx, job_id);
      }
      const uint64_t written = result.bytes_written;
      Note([method, seconds, written](JobManagerListener& l) {
        l.OnTaskFinished(v1::TASK_KIND_ASSEMBLE, method, true, seconds);
        l.OnBytes(0, written);
      });
    } else if (!outcome.corrupt_layers.empty()) {
      // Staged layers changed after their tasks completed: nothing was written. Those layers
      // are quantized again (each a failed attempt of its task) and the job goes back to
      // QUANTIZING; ASSEMBLE waits for them (it counts no attempt).
      TaskRecord& a = tx.Task(assemble);
      a.state = v1::TASK_STATE_PENDING;
      a.start_ms = 0;
      a.end_ms = 0;
      a.worker_id.clear();
      tx.Job(job_id).job.set_state(v1::JOB_STATE_QUANTIZING);
      tx.Event(job_id,
               absl::StrCat("assembly found ", outcome.corrupt_layers.size(),
                            " staged layer(s) changed since their tasks completed; "
                            "quantizing them again"),
               &a);
      const std::set<std::string> corrupt(outcome.corrupt_layers.begin(),
                                          outcome.corrupt_layers.end());
      for (const std::string& tid : e.task_ids) {
        const TaskRecord& t = tx.PeekTask(tid);
        if (t.kind != v1::TASK_KIND_QUANTIZE || corrupt.count(t.layer.module()) == 0) continue;
        if (tx.PeekJob(job_id).job.state() == v1::JOB_STATE_FAILED) break;
        RetryOrFail(tx, tid,
                    MakeError(absl::StatusCode::kDataLoss,
                              absl::StrCat("its staged output ", t.output_key,
                                           " no longer matches the sha256 reported at "
                                           "completion (", t.output_sha256, ")"),
                              "STAGED_OUTPUT_MISMATCH", t.layer.module()),
                    /*retryable=*/true, now);
      }
      SignalWork();
    } else {
      v1::ErrorInfo error =
          MakeError(status.code(),
                    absl::StrCat("assembling the artifact failed: ", std::string(status.message())),
                    "ASSEMBLY_FAILED", e.rec.job.spec().output_uri());
      RetryOrFail(tx, assemble, std::move(error), IsRetryableCode(status.code()), now);
    }
    if (absl::Status s = tx.Commit(); !s.ok()) {
      // Try again later: the next run finds the manifest (if this one wrote it) and only
      // records the outcome. The store still says RUNNING, which a restart also re-runs.
      LogError("recording the assembly of " + job_id, s);
      TaskRecord& a = tasks_.at(assemble);
      a.state = v1::TASK_STATE_QUEUED;
      a.not_before_ms = now + std::max<int64_t>(1000, options_.retry_initial_backoff_ms);
    }
  }
  FlushNotes();
}

void JobManager::Impl::CleanStaging() {
  struct Cleanup {
    std::string job_id, output_uri;
  };
  std::vector<Cleanup> todo;
  {
    absl::MutexLock lock(&mu_);
    Txn view(this);
    for (auto& [id, e] : jobs_) {
      if (!IsTerminal(e.rec.job.state()) || e.rec.settled || e.cleaning || e.assembling) continue;
      if (AnyRunning(view, id)) continue;
      e.cleaning = true;
      todo.push_back({id, StagingUri(e.rec.job.spec())});
    }
  }
  for (const Cleanup& c : todo) {
    absl::Status s = assembly_.DeleteStaging(c.output_uri, c.job_id);
    absl::MutexLock lock(&mu_);
    JobEntry& e = jobs_.at(c.job_id);
    e.cleaning = false;
    if (!s.ok()) {
      LogError("deleting the staging objects of " + c.job_id, s);
      continue;
    }
    Txn tx(this);
    Settle(tx, c.job_id);
    if (absl::Status st = tx.Commit(); !st.ok()) LogError("settling " + c.job_id, st);
  }
}

void JobManager::Impl::Tick() {
  absl::MutexLock tick_lock(&tick_mu_);
  assembly_.ReapFinished();
  std::vector<AssemblyWork> assemblies;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return;
    const int64_t now = Now();
    ExpireLeases(now);
    AdvanceJobs(now);
    assemblies = StartDueAssemblies(now);
    PruneOldJobs(now);
  }
  FlushNotes();
  for (AssemblyWork& work : assemblies) assembly_.Start(std::move(work));
  CleanStaging();
}

void JobManager::Impl::PruneOldJobs(int64_t now) {
  if (options_.retain_jobs_ms <= 0) return;
  constexpr size_t kMaxPerTick = 100;  // bounds the transaction; the next tick goes on
  std::vector<std::string> old;
  for (const auto& [id, e] : jobs_) {
    const v1::Job& job = e.rec.job;
    if (!e.rec.settled || !IsTerminal(job.state()) || job.end_time_unix_ms() <= 0) continue;
    if (now - job.end_time_unix_ms() <= options_.retain_jobs_ms) continue;
    old.push_back(id);
    if (old.size() == kMaxPerTick) break;
  }
  if (old.empty()) return;
  absl::Status s = RemoveJobs(old);
  if (!s.ok()) {
    LogError("deleting jobs past --retain-jobs", s);
    return;
  }
  std::fprintf(stderr, "qforge-coordinator: deleted %zu job(s) that ended more than %s ago\n",
               old.size(),
               absl::FormatDuration(absl::Milliseconds(options_.retain_jobs_ms)).c_str());
}

absl::Status JobManager::Impl::RemoveJobs(const std::vector<std::string>& ids) {
  StateMutation m;
  m.deleted_job_ids = ids;
  QF_RETURN_IF_ERROR(store_->Apply(m));
  for (const std::string& id : ids) {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) continue;
    const v1::Job& job = it->second.rec.job;
    if (!job.request_id().empty()) by_request_.erase({job.tenant(), job.request_id()});
    for (const std::string& task_id : it->second.task_ids) {
      tasks_.erase(task_id);
      progress_.erase(task_id);
    }
    jobs_.erase(it);
  }
  event_cv_.SignalAll();  // open watches of a deleted job end
  for (const std::string& id : ids) wakeups_.Fire(EventWakeupKey(id));
  return absl::OkStatus();
}

JobManagerStats JobManager::Impl::Stats() {
  absl::MutexLock lock(&mu_);
  JobManagerStats s;
  const int64_t now = Now();
  for (const auto& [id, e] : jobs_) ++s.jobs_by_state[e.rec.job.state()];
  std::set<std::string> busy;
  for (const auto& [id, t] : tasks_) {
    if (!Scheduler::RunsOnWorkers(t.kind)) continue;
    const v1::JobState js = jobs_.at(t.job_id).rec.job.state();
    if (t.state == v1::TASK_STATE_QUEUED && !IsStopping(js)) {
      ++s.tasks_queued;
      if (s.oldest_queued_task_create_ms == 0 || t.queued_ms < s.oldest_queued_task_create_ms) {
        s.oldest_queued_task_create_ms = t.queued_ms;
      }
    } else if (t.state == v1::TASK_STATE_RUNNING) {
      ++s.tasks_running;
      busy.insert(t.worker_id);
    }
  }
  s.workers_by_state["idle"] = 0;
  s.workers_by_state["busy"] = 0;
  s.workers_by_state["lost"] = 0;
  s.workers_by_state["unknown"] = 0;
  for (const auto& [id, w] : workers_) {
    const std::string state = WorkerState(w, busy.count(id) != 0, now);
    ++s.workers_by_state[state];
    const bool lost = state == "lost";
    if (!lost && (s.oldest_worker_seen_ms == 0 || w.last_seen_ms < s.oldest_worker_seen_ms)) {
      s.oldest_worker_seen_ms = w.last_seen_ms;
    }
  }
  return s;
}

}  // namespace qforge

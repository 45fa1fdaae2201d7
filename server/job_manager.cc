#include "server/job_manager.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/hessian_file.h"
#include "common/safetensors.h"
#include "base/status_macros.h"
#include "common/uri.h"
#include "google/protobuf/util/message_differencer.h"
#include "job/assembler.h"
#include "job/layer_selection.h"
#include "job/spec.h"
#include "server/state_store.h"
#include "job/layer_runner.h"

namespace qforge {
namespace {

constexpr char kStagingRoot[] = ".qforge-staging";
constexpr char kStagedLayerName[] = "layer.safetensors";
constexpr char kCoordinatorWorker[] = "coordinator";  // runs ASSEMBLE
constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 500;
constexpr int kDefaultWatchEvents = 100;
constexpr int kMaxWatchEvents = 1000;
constexpr int64_t kMaxWaitSliceMs = 250;  // long-polls re-check at least this often

bool IsTerminal(v1::JobState s) {
  return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED ||
         s == v1::JOB_STATE_CANCELLED;
}

// The job no longer wants its tasks' results: running tasks are told to stop.
bool IsStopping(v1::JobState s) { return IsTerminal(s) || s == v1::JOB_STATE_CANCELLING; }

bool IsTaskFinal(v1::TaskState s) {
  return s == v1::TASK_STATE_SUCCEEDED || s == v1::TASK_STATE_FAILED ||
         s == v1::TASK_STATE_CANCELLED;
}

std::string StateName(v1::JobState s) {
  std::string n = v1::JobState_Name(s);
  return n.rfind("JOB_STATE_", 0) == 0 ? n.substr(10) : n;
}

std::string RandomHex(int bytes) {
  std::random_device rd;
  std::string raw;
  while (static_cast<int>(raw.size()) < bytes) {
    uint32_t v = rd();
    for (int i = 0; i < 4 && static_cast<int>(raw.size()) < bytes; ++i) {
      raw.push_back(static_cast<char>(v & 0xff));
      v >>= 8;
    }
  }
  return absl::BytesToHexString(raw);
}

std::string Seconds(int64_t ms) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f s", static_cast<double>(ms) / 1000.0);
  return buf;
}

v1::ErrorInfo MakeError(absl::StatusCode code, std::string message, std::string reason,
                        std::string subject) {
  v1::ErrorInfo e;
  e.set_code(static_cast<int32_t>(code));
  e.set_message(std::move(message));
  e.set_reason(std::move(reason));
  e.set_subject(std::move(subject));
  return e;
}

// Prefixes a status's message with the spec field it concerns; transient store errors keep
// their code (a retry may succeed), everything else becomes INVALID_ARGUMENT.
absl::Status FieldStatus(std::string_view field, const absl::Status& s,
                         std::string_view context = "") {
  std::string msg = absl::StrCat(std::string(field), ": ", std::string(context),
                                 std::string(s.message()));
  if (s.code() == absl::StatusCode::kUnavailable ||
      s.code() == absl::StatusCode::kDeadlineExceeded) {
    return absl::Status(s.code(), msg);
  }
  return absl::InvalidArgumentError(msg);
}

bool IsRetryableCode(absl::StatusCode c) {
  return c == absl::StatusCode::kUnavailable || c == absl::StatusCode::kDeadlineExceeded ||
         c == absl::StatusCode::kAborted || c == absl::StatusCode::kResourceExhausted;
}

bool ValidId(std::string_view id, size_t max_len) {
  if (id.empty() || id.size() > max_len) return false;
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

std::string StagingPrefix(std::string_view job_id) {
  return absl::StrCat(kStagingRoot, "/", std::string(job_id), "/");
}

struct PlannedJob {
  JobConfig config;
  std::vector<TaskRecord> tasks;  // QUANTIZE tasks (ids and times filled in later)
};

struct AssemblyWork {
  std::string job_id;
  v1::JobSpec spec;
  std::vector<StagedLayer> layers;
};

}  // namespace

class JobManager::Impl {
 public:
  Impl(std::unique_ptr<StateStore> store, Clock* clock, JobManagerOptions options,
       JobManagerListener* listener)
      : store_(std::move(store)), clock_(clock), options_(std::move(options)),
        listener_(listener) {
    if (!options_.open_store) {
      options_.open_store = [](std::string_view uri) { return OpenObjectStore(uri); };
    }
    spec_options_.default_max_attempts = options_.default_max_attempts;
    spec_options_.allowed_file_roots = options_.allowed_file_roots;
  }
  ~Impl() { Shutdown(); }

  absl::Status Load();
  void Start();

  absl::StatusOr<v1::Job> SubmitJob(std::string_view tenant, const v1::SubmitJobRequest& request);
  absl::StatusOr<v1::Job> GetJob(std::string_view tenant, std::string_view job_id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(std::string_view tenant,
                                                const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(std::string_view tenant, std::string_view job_id);
  absl::StatusOr<std::vector<v1::JobEvent>> WatchEvents(std::string_view tenant,
                                                        std::string_view job_id,
                                                        int64_t after_sequence, int max_events,
                                                        int64_t wait_ms, bool* job_finished);
  std::vector<v1::WorkerInfo> ListWorkers();
  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(
      const v1::RegisterWorkerRequest& request);
  absl::StatusOr<std::optional<v1::Task>> AcquireTask(const v1::AcquireTaskRequest& request);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  absl::Status CompleteTask(const v1::CompleteTaskRequest& request);
  absl::Status FailTask(const v1::FailTaskRequest& request);
  void Tick();
  JobManagerStats Stats();
  void Shutdown();

 private:
  struct JobEntry {
    JobRecord rec;
    std::vector<std::string> task_ids;  // plan order; empty once settled
    int64_t last_sequence = 0;
    bool assembling = false;  // an assembly run is in flight (memory only)
    bool cleaning = false;    // staging deletion in flight (memory only)
  };
  struct TaskProgress {
    double progress = 0;
    std::string phase;
  };
  struct AssemblyThread {
    std::shared_ptr<std::atomic<bool>> done;
    std::thread thread;
  };

  // A transition: copies of the rows it touches plus the events it appends. Reads go
  // through it so that later steps see earlier ones; Commit() persists everything in one
  // StateStore::Apply and only then installs the copies in memory. Requires mu_.
  class Txn {
   public:
    explicit Txn(Impl* m) : m_(m) {}
    const JobRecord& PeekJob(const std::string& id) const {
      auto it = jobs_.find(id);
      return it != jobs_.end() ? it->second : m_->jobs_.at(id).rec;
    }
    JobRecord& Job(const std::string& id) {
      auto it = jobs_.find(id);
      if (it != jobs_.end()) return it->second;
      return jobs_.emplace(id, m_->jobs_.at(id).rec).first->second;
    }
    const TaskRecord& PeekTask(const std::string& id) const {
      auto it = tasks_.find(id);
      return it != tasks_.end() ? it->second : m_->tasks_.at(id);
    }
    TaskRecord& Task(const std::string& id) {
      auto it = tasks_.find(id);
      if (it != tasks_.end()) return it->second;
      return tasks_.emplace(id, m_->tasks_.at(id)).first->second;
    }
    WorkerRecord& Worker(const std::string& id) {
      auto it = workers_.find(id);
      if (it != workers_.end()) return it->second;
      return workers_.emplace(id, m_->workers_.at(id)).first->second;
    }
    const std::vector<std::string>& TaskIdsOf(const std::string& job_id) const {
      auto it = new_task_ids_.find(job_id);
      return it != new_task_ids_.end() ? it->second : m_->jobs_.at(job_id).task_ids;
    }
    void NewJob(JobRecord rec, std::vector<TaskRecord> tasks) {
      const std::string id = rec.job.id();
      std::vector<std::string>& ids = new_task_ids_[id];
      for (TaskRecord& t : tasks) {
        ids.push_back(t.id);
        tasks_.emplace(t.id, std::move(t));
      }
      jobs_.emplace(id, std::move(rec));
    }
    void NewWorker(WorkerRecord w) {
      const std::string id = w.id;
      workers_.emplace(id, std::move(w));
    }
    bool IsNewJob(const std::string& id) const { return new_task_ids_.count(id) != 0; }

    // Appends an event for `job_id` (with the job's staged state and counts), unless the
    // job was already terminal before this transition (a terminal event is the last).
    void Event(const std::string& job_id, std::string message, const TaskRecord* task = nullptr);

    absl::Status Commit();

   private:
    Impl* m_;
    std::map<std::string, JobRecord> jobs_;
    std::map<std::string, TaskRecord> tasks_;
    std::map<std::string, WorkerRecord> workers_;
    std::map<std::string, std::vector<std::string>> new_task_ids_;
    std::map<std::string, int64_t> sequences_;
    std::vector<v1::JobEvent> events_;
  };

  int64_t Now() const { return clock_->NowMs(); }
  absl::Status CheckRunning() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (shutdown_) return absl::UnavailableError("the coordinator is shutting down");
    return absl::OkStatus();
  }
  void Note(std::function<void(JobManagerListener&)> f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (listener_ != nullptr) notes_.push_back(std::move(f));
  }
  void FlushNotes() ABSL_LOCKS_EXCLUDED(mu_);

  absl::StatusOr<JobEntry*> FindJob(std::string_view tenant, std::string_view job_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::TaskCounts Counts(const Txn& view, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double Eta(const Txn& view, const std::string& job_id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::Job BuildJob(const Txn& view, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool WorkerLost(const WorkerRecord& w, int64_t now) const {
    return now - w.last_seen_ms > options_.worker_lost_after_ms;
  }
  int ActiveWorkers(int64_t now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool AnyRunning(const Txn& view, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::StatusOr<PlannedJob> Plan(const v1::JobSpec& spec) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status CheckOutputFree(const std::string& output_uri, std::string_view tenant) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Transitions (all within `tx`).
  void Lease(Txn& tx, const std::string& task_id, const std::string& worker_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RetryOrFail(Txn& tx, const std::string& task_id, v1::ErrorInfo error, bool retryable,
                   int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FailJob(Txn& tx, const std::string& job_id, v1::ErrorInfo error, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CancelTaskOfStoppedJob(Txn& tx, const std::string& task_id, int64_t now,
                              std::string why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeFinishCancel(Txn& tx, const std::string& job_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeStartAssembling(Txn& tx, const std::string& job_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Settle(Txn& tx, const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Tick steps.
  void ExpireLeases(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AdvanceJobs(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<AssemblyWork> StartDueAssemblies(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunAssembly(const AssemblyWork& work) ABSL_LOCKS_EXCLUDED(mu_);
  void FinishAssembly(const std::string& job_id, const absl::Status& status,
                      const AssembleResult& result, bool reused, bool staging_deleted)
      ABSL_LOCKS_EXCLUDED(mu_);
  void CleanStaging() ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status DeletePrefix(const std::string& store_uri, const std::string& prefix)
      ABSL_LOCKS_EXCLUDED(mu_);
  void ReapAssemblyThreads(bool all) ABSL_LOCKS_EXCLUDED(mu_);
  void LogError(const std::string& what, const absl::Status& s) const {
    std::fprintf(stderr, "qforge-coordinator: %s: %s\n", what.c_str(), s.ToString().c_str());
  }

  const std::unique_ptr<StateStore> store_;
  Clock* const clock_;
  JobManagerOptions options_;
  SpecOptions spec_options_;
  JobManagerListener* const listener_;

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;   // a task may have become runnable
  absl::CondVar event_cv_;  // events were appended
  absl::CondVar tick_cv_;   // wakes the tick thread early
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, JobEntry> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, std::string>, std::string> by_request_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, TaskRecord> tasks_ ABSL_GUARDED_BY(mu_);  // of unsettled jobs
  std::map<std::string, WorkerRecord> workers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, TaskProgress> progress_ ABSL_GUARDED_BY(mu_);  // running tasks
  std::vector<std::function<void(JobManagerListener&)>> notes_ ABSL_GUARDED_BY(mu_);

  absl::Mutex tick_mu_;  // serializes Tick()
  absl::Mutex threads_mu_;
  std::vector<AssemblyThread> assembly_threads_ ABSL_GUARDED_BY(threads_mu_);
  std::thread tick_thread_;
};

// ---- Txn ----------------------------------------------------------------------------------

void JobManager::Impl::Txn::Event(const std::string& job_id, std::string message,
                                  const TaskRecord* task) {
  if (!IsNewJob(job_id) && IsTerminal(m_->jobs_.at(job_id).rec.job.state())) return;
  auto seq = sequences_.find(job_id);
  if (seq == sequences_.end()) {
    const int64_t last = IsNewJob(job_id) ? 0 : m_->jobs_.at(job_id).last_sequence;
    seq = sequences_.emplace(job_id, last).first;
  }
  v1::JobEvent e;
  e.set_sequence(++seq->second);
  e.set_time_unix_ms(m_->Now());
  e.set_job_id(job_id);
  e.set_job_state(PeekJob(job_id).job.state());
  *e.mutable_tasks() = m_->Counts(*this, job_id);
  e.set_message(std::move(message));
  e.set_eta_seconds(m_->Eta(*this, job_id));
  if (task != nullptr) {
    v1::TaskEvent* te = e.mutable_task();
    te->set_task_id(task->id);
    te->set_kind(task->kind);
    te->set_layer(task->layer.module());
    te->set_state(task->state);
    te->set_attempt(task->attempt);
    te->set_worker_id(task->worker_id);
    te->set_proxy_loss(task->metrics.proxy_loss());
    te->set_relative_error(task->metrics.relative_error());
    if (task->end_ms > 0 && task->start_ms > 0) {
      te->set_seconds(static_cast<double>(task->end_ms - task->start_ms) / 1000.0);
    }
    if (task->error.code() != 0) *te->mutable_error() = task->error;
  }
  events_.push_back(std::move(e));
}

absl::Status JobManager::Impl::Txn::Commit() {
  StateMutation m;
  for (const auto& [id, r] : jobs_) m.jobs.push_back(r);
  for (const auto& [id, t] : tasks_) m.tasks.push_back(t);
  for (const auto& [id, w] : workers_) m.workers.push_back(w);
  m.events = events_;
  if (m.empty()) return absl::OkStatus();
  // New jobs first: tasks and events reference them.
  std::stable_partition(m.jobs.begin(), m.jobs.end(),
                        [&](const JobRecord& r) { return IsNewJob(r.job.id()); });
  QF_RETURN_IF_ERROR(m_->store_->Apply(m));

  for (auto& [id, r] : jobs_) {
    auto it = m_->jobs_.find(id);
    if (it == m_->jobs_.end()) {
      JobEntry e;
      e.rec = std::move(r);
      e.task_ids = new_task_ids_[id];
      if (!e.rec.job.request_id().empty()) {
        m_->by_request_[{e.rec.job.tenant(), e.rec.job.request_id()}] = id;
      }
      it = m_->jobs_.emplace(id, std::move(e)).first;
    } else {
      it->second.rec = std::move(r);
    }
  }
  for (auto& [id, t] : tasks_) {
    if (t.state != v1::TASK_STATE_RUNNING) m_->progress_.erase(id);
    m_->tasks_[id] = std::move(t);
  }
  for (auto& [id, w] : workers_) m_->workers_[id] = std::move(w);
  for (const auto& [id, seq] : sequences_) m_->jobs_.at(id).last_sequence = seq;
  // Settled jobs keep only their record (with the final counts).
  for (const auto& [id, unused] : jobs_) {
    JobEntry& e = m_->jobs_.at(id);
    if (!e.rec.settled || e.task_ids.empty()) continue;
    for (const std::string& t : e.task_ids) {
      m_->tasks_.erase(t);
      m_->progress_.erase(t);
    }
    e.task_ids.clear();
  }
  if (!events_.empty()) m_->event_cv_.SignalAll();
  return absl::OkStatus();
}

// ---- Views ----------------------------------------------------------------------------------

v1::TaskCounts JobManager::Impl::Counts(const Txn& view, const std::string& job_id) const {
  const JobRecord& rec = view.PeekJob(job_id);
  if (rec.settled) return rec.job.tasks();
  v1::TaskCounts c;
  for (const std::string& id : view.TaskIdsOf(job_id)) {
    const TaskRecord& t = view.PeekTask(id);
    c.set_total(c.total() + 1);
    c.set_retries(c.retries() + t.attempt);
    switch (t.state) {
      case v1::TASK_STATE_PENDING: c.set_pending(c.pending() + 1); break;
      case v1::TASK_STATE_QUEUED: c.set_queued(c.queued() + 1); break;
      case v1::TASK_STATE_RUNNING: c.set_running(c.running() + 1); break;
      case v1::TASK_STATE_SUCCEEDED: c.set_succeeded(c.succeeded() + 1); break;
      case v1::TASK_STATE_FAILED: c.set_failed(c.failed() + 1); break;
      case v1::TASK_STATE_CANCELLED: c.set_cancelled(c.cancelled() + 1); break;
      default: break;
    }
  }
  return c;
}

int JobManager::Impl::ActiveWorkers(int64_t now) const {
  int n = 0;
  for (const auto& [id, w] : workers_) n += WorkerLost(w, now) ? 0 : 1;
  return n;
}

bool JobManager::Impl::AnyRunning(const Txn& view, const std::string& job_id) const {
  if (view.PeekJob(job_id).settled) return false;
  for (const std::string& id : view.TaskIdsOf(job_id)) {
    if (view.PeekTask(id).state == v1::TASK_STATE_RUNNING) return true;
  }
  return false;
}

double JobManager::Impl::Eta(const Txn& view, const std::string& job_id) const {
  const JobRecord& rec = view.PeekJob(job_id);
  const v1::JobState state = rec.job.state();
  if (IsTerminal(state)) return 0;
  if (state != v1::JOB_STATE_QUEUED && state != v1::JOB_STATE_QUANTIZING) return -1;
  int64_t done_ms = 0;
  int done = 0, remaining = 0, running = 0;
  double in_flight = 0;  // reported progress of running tasks, in tasks
  for (const std::string& id : view.TaskIdsOf(job_id)) {
    const TaskRecord& t = view.PeekTask(id);
    if (t.kind != v1::TASK_KIND_QUANTIZE) continue;
    if (t.state == v1::TASK_STATE_SUCCEEDED) {
      done_ms += std::max<int64_t>(0, t.end_ms - t.start_ms);
      ++done;
    } else {
      ++remaining;
      if (t.state == v1::TASK_STATE_RUNNING) {
        ++running;
        auto p = progress_.find(id);
        if (p != progress_.end()) in_flight += p->second.progress;
      }
    }
  }
  if (done == 0) return -1;
  // Mean layer time × layers left (less what running ones reported) / workers on them.
  int workers = std::max(ActiveWorkers(Now()), running);
  workers = std::max(1, std::min(workers, std::max(remaining, 1)));
  const double mean_s = static_cast<double>(done_ms) / done / 1000.0;
  return mean_s * std::max(0.0, remaining - in_flight) / workers;
}

v1::Job JobManager::Impl::BuildJob(const Txn& view, const std::string& job_id) const {
  const JobRecord& rec = view.PeekJob(job_id);
  v1::Job job = rec.job;
  if (!rec.settled) {
    *job.mutable_tasks() = Counts(view, job_id);
    job.set_eta_seconds(Eta(view, job_id));
  }
  if (IsTerminal(job.state())) job.set_eta_seconds(0);
  return job;
}

absl::StatusOr<JobManager::Impl::JobEntry*> JobManager::Impl::FindJob(std::string_view tenant,
                                                                      std::string_view job_id) {
  auto it = jobs_.find(std::string(job_id));
  if (job_id.empty() || it == jobs_.end() || it->second.rec.job.tenant() != tenant) {
    return absl::NotFoundError(absl::StrCat("job '", std::string(job_id), "' not found"));
  }
  return &it->second;
}

void JobManager::Impl::FlushNotes() {
  std::vector<std::function<void(JobManagerListener&)>> notes;
  {
    absl::MutexLock lock(&mu_);
    notes.swap(notes_);
  }
  for (auto& f : notes) f(*listener_);
}

// ---- Load and start ----------------------------------------------------------------------

absl::Status JobManager::Impl::Load() {
  QF_ASSIGN_OR_RETURN(StateSnapshot snap, store_->Load());
  absl::MutexLock lock(&mu_);
  for (JobRecord& r : snap.jobs) {
    const std::string id = r.job.id();
    JobEntry e;
    e.rec = std::move(r);
    auto seq = snap.last_event_sequence.find(id);
    if (seq != snap.last_event_sequence.end()) e.last_sequence = seq->second;
    if (!e.rec.job.request_id().empty()) {
      by_request_[{e.rec.job.tenant(), e.rec.job.request_id()}] = id;
    }
    jobs_.emplace(id, std::move(e));
  }
  std::sort(snap.tasks.begin(), snap.tasks.end(), [](const TaskRecord& a, const TaskRecord& b) {
    return std::tie(a.job_id, a.ordinal) < std::tie(b.job_id, b.ordinal);
  });
  for (TaskRecord& t : snap.tasks) {
    auto job = jobs_.find(t.job_id);
    if (job == jobs_.end()) {
      return absl::DataLossError(absl::StrCat("state store: task '", t.id,
                                              "' belongs to unknown job '", t.job_id, "'"));
    }
    job->second.task_ids.push_back(t.id);
    const std::string id = t.id;
    tasks_.emplace(id, std::move(t));
  }
  for (WorkerRecord& w : snap.workers) {
    const std::string id = w.id;
    workers_.emplace(id, std::move(w));
  }

  // An assembly that was running when the coordinator stopped runs again (the assembler
  // overwrites what it wrote and writes the manifest last). Leases of QUANTIZE tasks are
  // kept: their workers may still complete them, or they expire.
  const int64_t now = Now();
  Txn tx(this);
  for (auto& [id, t] : tasks_) {
    if (t.kind != v1::TASK_KIND_ASSEMBLE || t.state != v1::TASK_STATE_RUNNING) continue;
    TaskRecord& a = tx.Task(id);
    a.state = v1::TASK_STATE_QUEUED;
    a.lease_token.clear();
    a.queued_ms = now;
    a.not_before_ms = 0;
    tx.Event(a.job_id, "the coordinator restarted during assembly; assembling again", &a);
  }
  return tx.Commit();
}

void JobManager::Impl::Start() {
  if (!options_.background_tick) return;
  tick_thread_ = std::thread([this] {
    for (;;) {
      {
        absl::MutexLock lock(&mu_);
        if (shutdown_) return;
        tick_cv_.WaitWithTimeout(&mu_, absl::Milliseconds(std::max<int64_t>(
                                           1, options_.tick_interval_ms)));
        if (shutdown_) return;
      }
      Tick();
    }
  });
}

void JobManager::Impl::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;  // idempotent
    work_cv_.SignalAll();
    event_cv_.SignalAll();
    tick_cv_.SignalAll();
  }
  if (tick_thread_.joinable() && tick_thread_.get_id() != std::this_thread::get_id()) {
    tick_thread_.join();
  }
  ReapAssemblyThreads(/*all=*/true);
}

void JobManager::Impl::ReapAssemblyThreads(bool all) {
  std::vector<std::thread> finished;
  {
    absl::MutexLock lock(&threads_mu_);
    for (auto it = assembly_threads_.begin(); it != assembly_threads_.end();) {
      if (all || it->done->load()) {
        finished.push_back(std::move(it->thread));
        it = assembly_threads_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (std::thread& t : finished) t.join();
}

// ---- Jobs ---------------------------------------------------------------------------------

absl::StatusOr<PlannedJob> JobManager::Impl::Plan(const v1::JobSpec& input) {
  PlannedJob plan;
  QF_ASSIGN_OR_RETURN(plan.config, ConvertJobSpec(input, spec_options_));
  const JobConfig& c = plan.config;
  const v1::JobSpec& spec = c.spec;

  // The model: headers only.
  auto model_store = options_.open_store(spec.model_uri());
  if (!model_store.ok()) return FieldStatus("spec.model_uri", model_store.status());
  auto model = SafetensorsModel::Open(**model_store, "");
  if (!model.ok()) {
    return FieldStatus("spec.model_uri", model.status(),
                       absl::StrCat("cannot open the model at ", spec.model_uri(), ": "));
  }
  if (absl::Status s = (*model_store)->Stat("config.json").status(); !s.ok()) {
    return FieldStatus("spec.model_uri", s,
                       absl::StrCat(spec.model_uri(),
                                    " has no readable config.json (a Hugging Face model "
                                    "directory is expected): "));
  }
  auto layers = SelectLayers(*model, c.selection);
  if (!layers.ok()) return FieldStatus("spec.include", layers.status());
  for (const PlannedLayer& l : *layers) {
    QF_RETURN_IF_ERROR(ValidateLayerForSpec(c, l.module, l.out_features, l.in_features));
  }

  // The Hessians: every selected module must have one, of the right shape.
  if (!c.identity_hessian) {
    constexpr char kField[] = "spec.calibration.hessians_uri";
    auto split = SplitObjectUri(c.hessians_uri);
    if (!split.ok()) return FieldStatus(kField, split.status());
    auto hstore = options_.open_store(split->store_uri);
    if (!hstore.ok()) return FieldStatus(kField, hstore.status());
    auto hessians = HessianFile::Open(**hstore, split->key);
    if (!hessians.ok()) {
      return FieldStatus(kField, hessians.status(),
                         absl::StrCat("cannot open the Hessian file ", c.hessians_uri, ": "));
    }
    for (const PlannedLayer& l : *layers) {
      auto t = hessians->Find(l.module);
      if (!t.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            kField, ": ", c.hessians_uri, " has no Hessian for module '", l.module, "'"));
      }
      const std::vector<int64_t>& shape = (*t)->shape;
      if (shape.size() != 2 || shape[0] != l.in_features || shape[1] != l.in_features) {
        std::string dims;
        for (int64_t d : shape) absl::StrAppend(&dims, dims.empty() ? "" : ", ", d);
        return absl::InvalidArgumentError(absl::StrCat(
            kField, ": the Hessian of module '", l.module, "' in ", c.hessians_uri, " is [",
            dims, "], expected [", l.in_features, ", ", l.in_features, "] (in_features)"));
      }
    }
  }

  // The output: must be empty (in-flight staging of other jobs aside).
  auto out_store = options_.open_store(spec.output_uri());
  if (!out_store.ok()) return FieldStatus("spec.output_uri", out_store.status());
  auto listing = (*out_store)->List("");
  if (!listing.ok()) return FieldStatus("spec.output_uri", listing.status());
  std::vector<std::string> existing;
  for (const ObjectInfo& o : *listing) {
    if (o.key.rfind(absl::StrCat(kStagingRoot, "/"), 0) == 0) continue;
    existing.push_back(o.key);
  }
  if (!existing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "spec.output_uri: ", spec.output_uri(), " is not empty (it holds '", existing.front(),
        "'", existing.size() > 1 ? absl::StrCat(" and ", existing.size() - 1, " more objects") : "",
        "); give an empty or new output prefix"));
  }

  // One QUANTIZE task per layer, with the weight's byte range.
  const std::vector<std::string> backends = {"cpu", "cuda"};
  for (const PlannedLayer& l : *layers) {
    auto loc = LocateTensor(*model, l.weight);
    if (!loc.ok()) return FieldStatus("spec.model_uri", loc.status());
    TaskRecord t;
    t.kind = v1::TASK_KIND_QUANTIZE;
    t.state = v1::TASK_STATE_QUEUED;
    t.layer.set_module(l.module);
    t.layer.set_weight_tensor(l.weight);
    t.layer.set_model_uri(spec.model_uri());
    t.layer.set_shard_key(loc->key);
    t.layer.set_byte_offset(loc->offset);
    t.layer.set_byte_length(loc->length);
    t.layer.set_dtype(DTypeName(l.dtype));
    t.layer.set_out_features(l.out_features);
    t.layer.set_in_features(l.in_features);
    t.layer.set_hessians_uri(c.hessians_uri);
    t.layer.set_has_bias(model->Find(absl::StrCat(l.module, ".bias")).ok());
    t.memory_bytes = TaskMemoryBytes(c, l.out_features, l.in_features, options_.task_memory_factor);
    t.backends = backends;
    plan.tasks.push_back(std::move(t));
  }
  return plan;
}

absl::Status JobManager::Impl::CheckOutputFree(const std::string& output_uri,
                                               std::string_view tenant) const {
  for (const auto& [id, e] : jobs_) {
    if (IsTerminal(e.rec.job.state()) || e.rec.job.spec().output_uri() != output_uri) continue;
    // Another tenant's job id is not disclosed.
    return absl::InvalidArgumentError(absl::StrCat(
        "spec.output_uri: ", output_uri, " is the output of ",
        e.rec.job.tenant() == tenant ? absl::StrCat("job ", id) : std::string("another job"),
        ", which has not finished"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> JobManager::Impl::SubmitJob(std::string_view tenant,
                                                    const v1::SubmitJobRequest& request) {
  const std::string& rid = request.request_id();
  if (!rid.empty() && !ValidId(rid, 128)) {
    return absl::InvalidArgumentError(
        "request_id: at most 128 characters of [A-Za-z0-9._-] (a UUID is a good choice)");
  }
  QF_ASSIGN_OR_RETURN(JobConfig normalized, ConvertJobSpec(request.spec(), spec_options_));
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
  }
  // Requires mu_.
  auto same_request = [&]() -> absl::StatusOr<v1::Job> {
    auto it = by_request_.find({std::string(tenant), rid});
    if (it == by_request_.end()) return absl::NotFoundError("");
    const JobRecord& prior = jobs_.at(it->second).rec;
    if (!google::protobuf::util::MessageDifferencer::Equals(prior.job.spec(), normalized.spec)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "request_id '", rid, "' was already used for job ", it->second,
          " with a different spec; use a new request_id for a new job"));
    }
    Txn view(this);
    return BuildJob(view, it->second);
  };
  if (!request.validate_only()) {
    absl::MutexLock lock(&mu_);
    if (!rid.empty()) {
      auto prior = same_request();
      if (prior.ok() || prior.status().code() != absl::StatusCode::kNotFound) return prior;
    }
    QF_RETURN_IF_ERROR(CheckOutputFree(normalized.spec.output_uri(), tenant));
  }

  // Validation and planning read headers through the stores: no lock held.
  QF_ASSIGN_OR_RETURN(PlannedJob plan, Plan(request.spec()));
  const int64_t now = Now();

  if (request.validate_only()) {
    v1::Job job;
    job.set_tenant(std::string(tenant));
    *job.mutable_spec() = plan.config.spec;
    job.set_state(v1::JOB_STATE_UNSPECIFIED);
    job.set_request_id(rid);
    job.set_eta_seconds(-1);
    v1::TaskCounts* c = job.mutable_tasks();
    c->set_total(static_cast<int32_t>(plan.tasks.size()) + 1);
    c->set_queued(static_cast<int32_t>(plan.tasks.size()));
    c->set_pending(1);
    return job;
  }

  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  if (!rid.empty()) {  // a concurrent retry may have won
    auto prior = same_request();
    if (prior.ok() || prior.status().code() != absl::StatusCode::kNotFound) return prior;
  }
  QF_RETURN_IF_ERROR(CheckOutputFree(plan.config.spec.output_uri(), tenant));

  std::string job_id;
  do {
    job_id = absl::StrCat("job-", RandomHex(6));
  } while (jobs_.count(job_id) != 0);
  JobRecord rec;
  rec.job.set_id(job_id);
  rec.job.set_tenant(std::string(tenant));
  *rec.job.mutable_spec() = plan.config.spec;
  rec.job.set_state(v1::JOB_STATE_QUEUED);
  rec.job.set_create_time_unix_ms(now);
  rec.job.set_request_id(rid);
  rec.job.set_eta_seconds(-1);

  std::vector<TaskRecord> tasks = std::move(plan.tasks);
  for (size_t i = 0; i < tasks.size(); ++i) {
    TaskRecord& t = tasks[i];
    char suffix[32];
    std::snprintf(suffix, sizeof(suffix), "-q%05zu", i);
    t.id = job_id + suffix;
    t.job_id = job_id;
    t.ordinal = static_cast<int32_t>(i);
    t.create_ms = now;
    t.queued_ms = now;
  }
  TaskRecord assemble;
  assemble.id = job_id + "-assemble";
  assemble.job_id = job_id;
  assemble.ordinal = static_cast<int32_t>(tasks.size());
  assemble.kind = v1::TASK_KIND_ASSEMBLE;
  assemble.state = v1::TASK_STATE_PENDING;
  assemble.create_ms = now;
  const size_t layers = tasks.size();
  tasks.push_back(std::move(assemble));

  Txn tx(this);
  tx.NewJob(std::move(rec), std::move(tasks));
  tx.Event(job_id, absl::StrCat("submitted: ", layers, " layers to quantize"));
  QF_RETURN_IF_ERROR(tx.Commit());
  work_cv_.SignalAll();
  Txn view(this);
  return BuildJob(view, job_id);
}

absl::StatusOr<v1::Job> JobManager::Impl::GetJob(std::string_view tenant,
                                                 std::string_view job_id) {
  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, job_id));
  Txn view(this);
  return BuildJob(view, e->rec.job.id());
}

absl::StatusOr<v1::ListJobsResponse> JobManager::Impl::ListJobs(
    std::string_view tenant, const v1::ListJobsRequest& request) {
  if (request.page_size() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size: ", request.page_size(), " is negative"));
  }
  const int page_size = request.page_size() == 0 ? kDefaultPageSize
                                                 : std::min(request.page_size(), kMaxPageSize);
  // Newest first; the token is the (create time, id) of the last job returned.
  bool have_cursor = false;
  int64_t cursor_ms = 0;
  std::string cursor_id;
  if (!request.page_token().empty()) {
    std::string raw;
    const size_t slash = [&] {
      if (!absl::WebSafeBase64Unescape(request.page_token(), &raw)) return std::string::npos;
      return raw.find('/');
    }();
    if (slash == std::string::npos || !absl::SimpleAtoi(raw.substr(0, slash), &cursor_ms)) {
      return absl::InvalidArgumentError("page_token: malformed (pass back next_page_token as is)");
    }
    cursor_id = raw.substr(slash + 1);
    have_cursor = true;
  }
  std::set<int> states(request.states().begin(), request.states().end());

  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  std::vector<const JobEntry*> matching;
  for (const auto& [id, e] : jobs_) {
    if (e.rec.job.tenant() != tenant) continue;
    if (!states.empty() && states.count(e.rec.job.state()) == 0) continue;
    if (have_cursor) {
      const int64_t ms = e.rec.job.create_time_unix_ms();
      if (ms > cursor_ms || (ms == cursor_ms && id >= cursor_id)) continue;
    }
    matching.push_back(&e);
  }
  std::sort(matching.begin(), matching.end(), [](const JobEntry* a, const JobEntry* b) {
    const int64_t am = a->rec.job.create_time_unix_ms(), bm = b->rec.job.create_time_unix_ms();
    if (am != bm) return am > bm;
    return a->rec.job.id() > b->rec.job.id();
  });
  v1::ListJobsResponse out;
  Txn view(this);
  for (size_t i = 0; i < matching.size() && i < static_cast<size_t>(page_size); ++i) {
    *out.add_jobs() = BuildJob(view, matching[i]->rec.job.id());
  }
  if (matching.size() > static_cast<size_t>(page_size)) {
    const v1::Job& last = out.jobs(out.jobs_size() - 1);
    out.set_next_page_token(
        absl::WebSafeBase64Escape(absl::StrCat(last.create_time_unix_ms(), "/", last.id())));
  }
  return out;
}

absl::StatusOr<v1::Job> JobManager::Impl::CancelJob(std::string_view tenant,
                                                    std::string_view job_id) {
  absl::StatusOr<v1::Job> result;
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, job_id));
    const std::string id = e->rec.job.id();
    const v1::JobState state = e->rec.job.state();
    if (state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED) {
      return absl::FailedPreconditionError(absl::StrCat("job ", id, " already ",
                                                        StateName(state), "; nothing to cancel"));
    }
    if (state != v1::JOB_STATE_CANCELLING && state != v1::JOB_STATE_CANCELLED) {
      const int64_t now = Now();
      Txn tx(this);
      int running = 0;
      for (const std::string& tid : tx.TaskIdsOf(id)) {
        const TaskRecord& t = tx.PeekTask(tid);
        if (t.state == v1::TASK_STATE_RUNNING) {
          ++running;
        } else if (!IsTaskFinal(t.state)) {
          TaskRecord& c = tx.Task(tid);
          c.state = v1::TASK_STATE_CANCELLED;
          c.end_ms = now;
        }
      }
      JobRecord& j = tx.Job(id);
      if (running > 0 || e->assembling) {
        j.job.set_state(v1::JOB_STATE_CANCELLING);
        tx.Event(id, absl::StrCat("cancelling: waiting for ", std::max(running, 1),
                                  " running task(s) to stop"));
      } else {
        j.job.set_state(v1::JOB_STATE_CANCELLED);
        j.job.set_end_time_unix_ms(now);
        tx.Event(id, "cancelled");
      }
      QF_RETURN_IF_ERROR(tx.Commit());
      tick_cv_.SignalAll();  // staging cleanup
    }
    Txn view(this);
    result = BuildJob(view, id);
  }
  FlushNotes();
  return result;
}

absl::StatusOr<std::vector<v1::JobEvent>> JobManager::Impl::WatchEvents(
    std::string_view tenant, std::string_view job_id, int64_t after_sequence, int max_events,
    int64_t wait_ms, bool* job_finished) {
  if (job_finished != nullptr) *job_finished = false;
  if (after_sequence < 0) after_sequence = 0;
  max_events = max_events <= 0 ? kDefaultWatchEvents : std::min(max_events, kMaxWatchEvents);
  const std::string id(job_id);
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, job_id));
    const absl::Time deadline = absl::Now() + absl::Milliseconds(std::max<int64_t>(0, wait_ms));
    while (e->last_sequence <= after_sequence && !IsTerminal(e->rec.job.state()) && !shutdown_ &&
           absl::Now() < deadline) {
      event_cv_.WaitWithDeadline(&mu_, deadline);
    }
    QF_RETURN_IF_ERROR(CheckRunning());
  }
  QF_ASSIGN_OR_RETURN(std::vector<v1::JobEvent> events,
                      store_->ReadEvents(id, after_sequence, max_events));
  if (job_finished != nullptr) {
    absl::MutexLock lock(&mu_);
    const JobEntry& e = jobs_.at(id);
    const int64_t seen = events.empty() ? after_sequence : events.back().sequence();
    *job_finished = IsTerminal(e.rec.job.state()) && seen >= e.last_sequence;
  }
  return events;
}

// ---- Workers ------------------------------------------------------------------------------

std::vector<v1::WorkerInfo> JobManager::Impl::ListWorkers() {
  absl::MutexLock lock(&mu_);
  const int64_t now = Now();
  std::map<std::string, std::string> current;  // worker -> a task it runs
  for (const auto& [id, t] : tasks_) {
    if (t.state == v1::TASK_STATE_RUNNING && !t.worker_id.empty()) current[t.worker_id] = id;
  }
  std::vector<v1::WorkerInfo> out;
  for (const auto& [id, w] : workers_) {
    v1::WorkerInfo info;
    info.set_id(id);
    info.set_hostname(w.registration.hostname());
    auto cur = current.find(id);
    info.set_state(WorkerLost(w, now) ? "lost" : cur != current.end() ? "busy" : "idle");
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

absl::StatusOr<v1::RegisterWorkerResponse> JobManager::Impl::RegisterWorker(
    const v1::RegisterWorkerRequest& request) {
  if (request.backends().empty()) {
    return absl::InvalidArgumentError("backends: at least one is required (\"cpu\", \"cuda\")");
  }
  for (const std::string& b : request.backends()) {
    if (!ValidId(b, 32)) {
      return absl::InvalidArgumentError(absl::StrCat("backends: '", b, "' is not a backend name"));
    }
  }
  if (request.hostname().size() > 255) {
    return absl::InvalidArgumentError("hostname: longer than 255 bytes");
  }
  if (!request.worker_id().empty() && !ValidId(request.worker_id(), 64)) {
    return absl::InvalidArgumentError(
        "worker_id: at most 64 characters of [A-Za-z0-9._-] (or empty to get a new id)");
  }
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
  t.lease_expiry_ms = now + options_.lease_duration_ms;
  t.start_ms = now;
  t.end_ms = 0;
  t.staging_key = absl::StrCat(StagingPrefix(t.job_id), t.id, "/", t.attempt, "/",
                               kStagedLayerName);
  t.output_key.clear();
  t.output_sha256.clear();
  t.output_bytes = 0;
  t.metrics.Clear();
  JobRecord& j = tx.Job(t.job_id);
  if (j.job.state() == v1::JOB_STATE_QUEUED) {
    j.job.set_state(v1::JOB_STATE_QUANTIZING);
    j.job.set_start_time_unix_ms(now);
    tx.Event(t.job_id, "quantizing");
  }
  tx.Event(t.job_id,
           absl::StrCat("layer ", t.layer.module(), " leased to worker ", worker_id,
                        " (attempt ", t.attempt + 1, " of ", j.job.spec().max_attempts(), ")"),
           &t);
}

absl::StatusOr<std::optional<v1::Task>> JobManager::Impl::AcquireTask(
    const v1::AcquireTaskRequest& request) {
  const int64_t wait_ms =
      std::clamp<int64_t>(request.wait_ms(), 0, std::max<int64_t>(0, options_.max_acquire_wait_ms));
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

      // Runnable candidates: jobs by priority (desc), then FIFO; tasks in plan order.
      std::vector<const JobEntry*> order;
      for (const auto& [id, e] : jobs_) {
        const v1::JobState s = e.rec.job.state();
        if (s == v1::JOB_STATE_QUEUED || s == v1::JOB_STATE_QUANTIZING) order.push_back(&e);
      }
      std::sort(order.begin(), order.end(), [](const JobEntry* a, const JobEntry* b) {
        if (a->rec.job.spec().priority() != b->rec.job.spec().priority()) {
          return a->rec.job.spec().priority() > b->rec.job.spec().priority();
        }
        if (a->rec.job.create_time_unix_ms() != b->rec.job.create_time_unix_ms()) {
          return a->rec.job.create_time_unix_ms() < b->rec.job.create_time_unix_ms();
        }
        return a->rec.job.id() < b->rec.job.id();
      });
      const uint64_t budget = w.registration.memory_budget_bytes();
      const auto& worker_backends = w.registration.backends();
      auto has_backend = [&](const char* b) {
        return std::find(worker_backends.begin(), worker_backends.end(), b) !=
               worker_backends.end();
      };
      // A CUDA-only worker's budget is device memory: compare the CUDA backend's estimate.
      const bool gpu_budget = budget != 0 && has_backend("cuda") && !has_backend("cpu");
      std::string pick;
      for (const JobEntry* e : order) {
        std::optional<JobConfig> config;  // for the GPU estimate, converted once per job
        if (gpu_budget) {
          auto c = ConvertJobSpec(e->rec.job.spec());  // normalized: no I/O, cannot fail
          if (c.ok()) config = *std::move(c);
        }
        for (const std::string& tid : e->task_ids) {
          const TaskRecord& t = tasks_.at(tid);
          if (t.kind != v1::TASK_KIND_QUANTIZE || t.state != v1::TASK_STATE_QUEUED) continue;
          if (t.not_before_ms > now) continue;
          const uint64_t need =
              config.has_value()
                  ? GpuTaskMemoryBytes(*config, t.layer.out_features(), t.layer.in_features())
                  : t.memory_bytes;
          if (budget != 0 && need > budget) continue;
          const bool backend_ok = std::any_of(
              t.backends.begin(), t.backends.end(), [&](const std::string& b) {
                return std::find(worker_backends.begin(), worker_backends.end(), b) !=
                       worker_backends.end();
              });
          if (!backend_ok) continue;
          pick = tid;
          break;
        }
        if (!pick.empty()) break;
      }
      if (!pick.empty()) {
        Txn tx(this);
        Lease(tx, pick, w.id, now);
        tx.Worker(w.id).last_seen_ms = now;
        QF_RETURN_IF_ERROR(tx.Commit());
        const TaskRecord& t = tasks_.at(pick);
        const JobRecord& j = jobs_.at(t.job_id).rec;
        v1::Task task;
        task.set_id(t.id);
        task.set_job_id(t.job_id);
        task.set_kind(t.kind);
        task.set_attempt(t.attempt);
        task.set_lease_token(t.lease_token);
        task.set_lease_expiry_unix_ms(t.lease_expiry_ms);
        *task.mutable_spec() = j.job.spec();
        *task.mutable_layer() = t.layer;
        task.set_staging_uri(j.job.spec().output_uri());
        task.set_staging_key(t.staging_key);
        leased = std::move(task);
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
  if (t.state != v1::TASK_STATE_RUNNING || t.lease_token != request.lease_token() ||
      request.lease_token().empty()) {
    resp.set_lease_lost(true);
    return resp;
  }
  Txn tx(this);
  TaskRecord& renewed = tx.Task(t.id);
  renewed.lease_expiry_ms = now + options_.lease_duration_ms;
  if (wit != workers_.end()) tx.Worker(wit->first).last_seen_ms = now;
  QF_RETURN_IF_ERROR(tx.Commit());
  TaskProgress& p = progress_[request.task_id()];
  p.progress = std::clamp(request.progress(), 0.0, 1.0);
  p.phase = request.phase();
  const TaskRecord& cur = tasks_.at(request.task_id());
  resp.set_lease_expiry_unix_ms(cur.lease_expiry_ms);
  resp.set_cancel(IsStopping(jobs_.at(cur.job_id).rec.job.state()));
  return resp;
}

absl::Status JobManager::Impl::CompleteTask(const v1::CompleteTaskRequest& request) {
  std::string output_uri, output_key;
  auto stale = [&](const TaskRecord& t) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stale lease for task ", t.id, " (layer ", t.layer.module(),
        "): the lease expired or was given to another attempt; the result is discarded"));
  };
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    auto it = tasks_.find(request.task_id());
    if (request.task_id().empty() || it == tasks_.end()) {
      return absl::NotFoundError(absl::StrCat("task '", request.task_id(), "' not found"));
    }
    const TaskRecord& t = it->second;
    if (t.state == v1::TASK_STATE_SUCCEEDED && !t.lease_token.empty() &&
        t.lease_token == request.lease_token()) {
      return absl::OkStatus();  // a retried completion that was already accepted
    }
    if (t.state != v1::TASK_STATE_RUNNING || t.lease_token != request.lease_token() ||
        request.lease_token().empty()) {
      return stale(t);
    }
    output_key = request.output_key().empty() ? t.staging_key : request.output_key();
    if (output_key != t.staging_key) {
      return absl::InvalidArgumentError(absl::StrCat("output_key: '", request.output_key(),
                                                     "' is not this attempt's staging key '",
                                                     t.staging_key, "'"));
    }
    output_uri = jobs_.at(t.job_id).rec.job.spec().output_uri();
  }

  // The staged result must exist before the layer counts as done (no lock held: I/O).
  {
    auto store = options_.open_store(output_uri);
    if (!store.ok()) return store.status();
    auto info = (*store)->Stat(output_key);
    if (!info.ok()) {
      if (info.status().code() == absl::StatusCode::kNotFound) {
        return absl::FailedPreconditionError(absl::StrCat(
            "task ", request.task_id(), " reported output '", output_key,
            "' but it is not in ", output_uri, ": ", std::string(info.status().message())));
      }
      return info.status();
    }
    if (request.output_bytes() != 0 && info->size != request.output_bytes()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "task ", request.task_id(), " reported ", request.output_bytes(), " bytes for '",
          output_key, "' but the object holds ", info->size));
    }
  }

  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    auto it = tasks_.find(request.task_id());
    if (it == tasks_.end()) {
      return absl::NotFoundError(absl::StrCat("task '", request.task_id(), "' not found"));
    }
    if (it->second.state != v1::TASK_STATE_RUNNING ||
        it->second.lease_token != request.lease_token()) {
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
    } else {
      TaskRecord& t = tx.Task(request.task_id());
      t.state = v1::TASK_STATE_SUCCEEDED;
      t.end_ms = now;
      t.output_key = output_key;
      t.output_sha256 = request.output_sha256();
      t.output_bytes = request.output_bytes();
      t.metrics = request.metrics();
      if (workers_.count(t.worker_id) != 0) {
        WorkerRecord& w = tx.Worker(t.worker_id);
        ++w.tasks_completed;
      }
      char figures[96];
      std::snprintf(figures, sizeof(figures), " (relative error %.3g, %s)",
                    t.metrics.relative_error(), Seconds(t.end_ms - t.start_ms).c_str());
      tx.Event(job_id, absl::StrCat("layer ", t.layer.module(), " quantized", figures), &t);
      MaybeStartAssembling(tx, job_id, now);
      QF_RETURN_IF_ERROR(tx.Commit());
      const TaskRecord& done = tasks_.at(request.task_id());
      const v1::Method method = job.job.spec().method();
      const double seconds = static_cast<double>(done.end_ms - done.start_ms) / 1000.0;
      const v1::TaskMetrics m = done.metrics;
      Note([method, seconds, m](JobManagerListener& l) {
        l.OnTaskFinished(v1::TASK_KIND_QUANTIZE, method, true, seconds);
        l.OnBytes(m.bytes_read(), m.bytes_written());
        l.OnSolverPhase("read", m.read_seconds());
        l.OnSolverPhase("solve", m.solve_seconds());
        l.OnSolverPhase("write", m.write_seconds());
      });
      if (jobs_.at(job_id).rec.job.state() == v1::JOB_STATE_ASSEMBLING) tick_cv_.SignalAll();
    }
  }
  FlushNotes();
  return absl::OkStatus();
}

absl::Status JobManager::Impl::FailTask(const v1::FailTaskRequest& request) {
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    auto it = tasks_.find(request.task_id());
    if (request.task_id().empty() || it == tasks_.end()) {
      return absl::NotFoundError(absl::StrCat("task '", request.task_id(), "' not found"));
    }
    const TaskRecord& t = it->second;
    if (t.state != v1::TASK_STATE_RUNNING || t.lease_token != request.lease_token() ||
        request.lease_token().empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "stale lease for task ", t.id, " (layer ", t.layer.module(),
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
      v1::ErrorInfo error = request.error();
      if (error.code() == 0) error.set_code(static_cast<int32_t>(absl::StatusCode::kUnknown));
      if (error.message().empty()) error.set_message("the worker gave no message");
      if (workers_.count(t.worker_id) != 0) ++tx.Worker(t.worker_id).tasks_failed;
      RetryOrFail(tx, task_id, std::move(error), request.retryable(), now);
    }
    QF_RETURN_IF_ERROR(tx.Commit());
    tick_cv_.SignalAll();
    work_cv_.SignalAll();
  }
  FlushNotes();
  return absl::OkStatus();
}

// ---- Transitions --------------------------------------------------------------------------

void JobManager::Impl::RetryOrFail(Txn& tx, const std::string& task_id, v1::ErrorInfo error,
                                   bool retryable, int64_t now) {
  TaskRecord& t = tx.Task(task_id);
  const JobRecord& job = tx.PeekJob(t.job_id);
  const int max_attempts = std::max(1, job.job.spec().max_attempts());
  const std::string what = t.kind == v1::TASK_KIND_QUANTIZE
                               ? absl::StrCat("layer ", t.layer.module())
                               : std::string("assembly");
  const double seconds = t.start_ms > 0 ? static_cast<double>(now - t.start_ms) / 1000.0 : 0;
  const v1::TaskKind kind = t.kind;
  const v1::Method method = job.job.spec().method();
  Note([kind, method, seconds](JobManagerListener& l) {
    l.OnTaskFinished(kind, method, false, seconds);
  });
  t.error = error;
  t.lease_token.clear();
  if (retryable && t.attempt + 1 < max_attempts) {
    double backoff = static_cast<double>(options_.retry_initial_backoff_ms) *
                     std::pow(std::max(1.0, options_.retry_backoff_multiplier), t.attempt);
    backoff = std::min(backoff, static_cast<double>(options_.retry_max_backoff_ms));
    const int64_t backoff_ms = static_cast<int64_t>(backoff);
    t.state = v1::TASK_STATE_QUEUED;
    t.end_ms = now;
    tx.Event(t.job_id,
             absl::StrCat(what, " attempt ", t.attempt + 1, " of ", max_attempts,
                          " failed: ", error.message(), "; retrying in ", Seconds(backoff_ms)),
             &t);
    ++t.attempt;
    t.end_ms = 0;
    t.not_before_ms = now + backoff_ms;
    t.queued_ms = now;
    Note([kind](JobManagerListener& l) { l.OnTaskRetried(kind); });
    return;
  }
  t.state = v1::TASK_STATE_FAILED;
  t.end_ms = now;
  tx.Event(t.job_id, absl::StrCat(what, " failed: ", error.message()), &t);
  v1::ErrorInfo job_error = error;
  job_error.set_message(absl::StrCat(
      what, " (task ", t.id, ") failed",
      retryable ? absl::StrCat(" after ", t.attempt + 1, " attempts") : std::string(), ": ",
      error.message()));
  if (job_error.reason().empty()) {
    job_error.set_reason(t.kind == v1::TASK_KIND_QUANTIZE ? "TASK_FAILED" : "ASSEMBLY_FAILED");
  }
  if (job_error.subject().empty()) {
    job_error.set_subject(t.kind == v1::TASK_KIND_QUANTIZE ? t.layer.module()
                                                           : job.job.spec().output_uri());
  }
  FailJob(tx, t.job_id, std::move(job_error), now);
}

void JobManager::Impl::FailJob(Txn& tx, const std::string& job_id, v1::ErrorInfo error,
                               int64_t now) {
  // Queued and pending tasks stop here; running ones learn it from their next heartbeat.
  for (const std::string& tid : tx.TaskIdsOf(job_id)) {
    const TaskRecord& t = tx.PeekTask(tid);
    if (t.state == v1::TASK_STATE_QUEUED || t.state == v1::TASK_STATE_PENDING) {
      TaskRecord& c = tx.Task(tid);
      c.state = v1::TASK_STATE_CANCELLED;
      c.end_ms = now;
    }
  }
  JobRecord& j = tx.Job(job_id);
  j.job.set_state(v1::JOB_STATE_FAILED);
  j.job.set_end_time_unix_ms(now);
  const std::string message = error.message();
  *j.job.mutable_error() = std::move(error);
  tx.Event(job_id, absl::StrCat("failed: ", message));
}

void JobManager::Impl::CancelTaskOfStoppedJob(Txn& tx, const std::string& task_id, int64_t now,
                                              std::string why) {
  TaskRecord& t = tx.Task(task_id);
  t.state = v1::TASK_STATE_CANCELLED;
  t.end_ms = now;
  t.lease_token.clear();
  const std::string what = t.kind == v1::TASK_KIND_QUANTIZE
                               ? absl::StrCat("layer ", t.layer.module())
                               : std::string("assembly");
  tx.Event(t.job_id, absl::StrCat(what, " cancelled (", why, ")"), &t);
}

void JobManager::Impl::MaybeFinishCancel(Txn& tx, const std::string& job_id, int64_t now) {
  if (tx.PeekJob(job_id).job.state() != v1::JOB_STATE_CANCELLING) return;
  if (AnyRunning(tx, job_id) || jobs_.at(job_id).assembling) return;
  JobRecord& j = tx.Job(job_id);
  j.job.set_state(v1::JOB_STATE_CANCELLED);
  j.job.set_end_time_unix_ms(now);
  tx.Event(job_id, "cancelled");
}

void JobManager::Impl::MaybeStartAssembling(Txn& tx, const std::string& job_id, int64_t now) {
  const v1::JobState s = tx.PeekJob(job_id).job.state();
  if (s != v1::JOB_STATE_QUEUED && s != v1::JOB_STATE_QUANTIZING) return;
  std::string assemble;
  for (const std::string& tid : tx.TaskIdsOf(job_id)) {
    const TaskRecord& t = tx.PeekTask(tid);
    if (t.kind == v1::TASK_KIND_QUANTIZE && t.state != v1::TASK_STATE_SUCCEEDED) return;
    if (t.kind == v1::TASK_KIND_ASSEMBLE) assemble = tid;
  }
  if (assemble.empty()) return;
  TaskRecord& a = tx.Task(assemble);
  if (a.state == v1::TASK_STATE_PENDING) {
    a.state = v1::TASK_STATE_QUEUED;
    a.queued_ms = now;
  }
  tx.Job(job_id).job.set_state(v1::JOB_STATE_ASSEMBLING);
  tx.Event(job_id, "assembling: every layer is quantized");
}

void JobManager::Impl::Settle(Txn& tx, const std::string& job_id) {
  const v1::TaskCounts counts = Counts(tx, job_id);
  JobRecord& j = tx.Job(job_id);
  *j.job.mutable_tasks() = counts;
  j.job.set_eta_seconds(0);
  j.settled = true;
}

// ---- Housekeeping -------------------------------------------------------------------------

void JobManager::Impl::ExpireLeases(int64_t now) {
  std::vector<std::string> expired;
  for (const auto& [id, t] : tasks_) {
    if (t.kind == v1::TASK_KIND_QUANTIZE && t.state == v1::TASK_STATE_RUNNING &&
        t.lease_expiry_ms <= now) {
      expired.push_back(id);
    }
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
          "LEASE_EXPIRED", t.layer.module());
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
    if (s == v1::JOB_STATE_QUEUED || s == v1::JOB_STATE_QUANTIZING) {
      Txn tx(this);
      MaybeStartAssembling(tx, id, now);
      if (absl::Status st = tx.Commit(); !st.ok()) LogError("starting assembly of " + id, st);
      for (const std::string& tid : e.task_ids) {
        const TaskRecord& t = tasks_.at(tid);
        if (t.state == v1::TASK_STATE_QUEUED && t.kind == v1::TASK_KIND_QUANTIZE &&
            t.not_before_ms <= now) {
          runnable = true;
        }
      }
    } else if (s == v1::JOB_STATE_CANCELLING) {
      Txn tx(this);
      MaybeFinishCancel(tx, id, now);
      if (absl::Status st = tx.Commit(); !st.ok()) LogError("finishing cancel of " + id, st);
    }
  }
  if (runnable) work_cv_.SignalAll();  // e.g. a retry backoff has elapsed
}

std::vector<AssemblyWork> JobManager::Impl::StartDueAssemblies(int64_t now) {
  std::vector<AssemblyWork> due;
  for (auto& [id, e] : jobs_) {
    if (e.rec.job.state() != v1::JOB_STATE_ASSEMBLING || e.assembling || e.task_ids.empty()) {
      continue;
    }
    const std::string& assemble = e.task_ids.back();
    const TaskRecord& a = tasks_.at(assemble);
    if (a.kind != v1::TASK_KIND_ASSEMBLE || a.state != v1::TASK_STATE_QUEUED ||
        a.not_before_ms > now) {
      continue;
    }
    AssemblyWork work;
    work.job_id = id;
    work.spec = e.rec.job.spec();
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

absl::Status JobManager::Impl::DeletePrefix(const std::string& store_uri,
                                            const std::string& prefix) {
  QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> store, options_.open_store(store_uri));
  QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> objects, store->List(prefix));
  for (const ObjectInfo& o : objects) QF_RETURN_IF_ERROR(store->Delete(o.key));
  return absl::OkStatus();
}

void JobManager::Impl::RunAssembly(const AssemblyWork& work) {
  AssembleResult result;
  bool reused = false;  // a complete artifact of this job was found
  absl::Status status = [&]() -> absl::Status {
    QF_ASSIGN_OR_RETURN(JobConfig config, ConvertJobSpec(work.spec, spec_options_));
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> model_store,
                        options_.open_store(work.spec.model_uri()));
    QF_ASSIGN_OR_RETURN(SafetensorsModel model, SafetensorsModel::Open(*model_store, ""));
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> out_store,
                        options_.open_store(work.spec.output_uri()));
    // A run that completed before a restart (or before a failed state write) left this
    // job's manifest, written last: the artifact is complete and its staging may be gone.
    if (auto prior = out_store->ReadAll(kManifestName); prior.ok()) {
      nlohmann::json m = nlohmann::json::parse(*prior, nullptr, /*allow_exceptions=*/false);
      if (m.is_object() && m.contains("spec") && m["spec"].is_object() &&
          m["spec"].value("job_id", std::string()) == work.job_id) {
        reused = true;
        return absl::OkStatus();
      }
    }
    AssembleRequest req;
    req.model_store = model_store.get();
    req.model_uri = work.spec.model_uri();
    req.model = &model;
    req.staging_store = out_store.get();
    req.layers = work.layers;
    req.output_store = out_store.get();
    req.method = config.method;
    if (config.method == ArtifactMethod::kGptq) req.config = QuantizeConfigForSpec(config);
    req.max_shard_bytes = config.max_shard_bytes;
    req.spec = JobSpecToJson(work.spec);
    req.spec["job_id"] = work.job_id;
    req.qforge_version = options_.qforge_version;
    QF_ASSIGN_OR_RETURN(result, AssembleArtifact(req));
    return absl::OkStatus();
  }();

  bool cancelled = false;
  {
    absl::MutexLock lock(&mu_);
    cancelled = jobs_.at(work.job_id).rec.job.state() == v1::JOB_STATE_CANCELLING;
  }
  bool staging_deleted = false;
  if (status.ok() && cancelled) {
    // The user cancelled while the artifact was being written: remove it again.
    if (auto store = options_.open_store(work.spec.output_uri()); store.ok()) {
      for (auto it = result.files_written.rbegin(); it != result.files_written.rend(); ++it) {
        if (absl::Status s = (*store)->Delete(*it); !s.ok()) {
          LogError("removing the artifact of cancelled job " + work.job_id, s);
        }
      }
    }
  } else if (status.ok()) {
    absl::Status s = DeletePrefix(work.spec.output_uri(), StagingPrefix(work.job_id));
    if (!s.ok()) LogError("deleting the staging objects of " + work.job_id, s);
    staging_deleted = s.ok();
  }
  FinishAssembly(work.job_id, status, result, reused, staging_deleted);
}

void JobManager::Impl::FinishAssembly(const std::string& job_id, const absl::Status& status,
                                      const AssembleResult& result, bool reused,
                                      bool staging_deleted) {
  {
    absl::MutexLock lock(&mu_);
    JobEntry& e = jobs_.at(job_id);
    e.assembling = false;
    const int64_t now = Now();
    const std::string assemble = e.task_ids.back();
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
               reused ? std::string("the artifact was already complete (its manifest exists)")
                      : absl::StrCat("artifact written: ", result.files_written.size(),
                                     " files, ", result.tensors_quantized, " quantized layers"),
               &a);
      JobRecord& j = tx.Job(job_id);
      j.job.set_state(v1::JOB_STATE_SUCCEEDED);
      j.job.set_end_time_unix_ms(now);
      j.job.set_manifest_uri(ChildUri(j.job.spec().output_uri(), kManifestName));
      tx.Event(job_id, absl::StrCat("succeeded: manifest at ", j.job.manifest_uri()));
      if (staging_deleted) Settle(tx, job_id);
      const uint64_t written = result.bytes_written;
      Note([method, seconds, written](JobManagerListener& l) {
        l.OnTaskFinished(v1::TASK_KIND_ASSEMBLE, method, true, seconds);
        l.OnBytes(0, written);
      });
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
      todo.push_back({id, e.rec.job.spec().output_uri()});
    }
  }
  for (const Cleanup& c : todo) {
    absl::Status s = DeletePrefix(c.output_uri, StagingPrefix(c.job_id));
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
  ReapAssemblyThreads(/*all=*/false);
  std::vector<AssemblyWork> assemblies;
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return;
    const int64_t now = Now();
    ExpireLeases(now);
    AdvanceJobs(now);
    assemblies = StartDueAssemblies(now);
  }
  FlushNotes();
  for (AssemblyWork& work : assemblies) {
    if (options_.run_assembly_inline) {
      RunAssembly(work);
      continue;
    }
    auto done = std::make_shared<std::atomic<bool>>(false);
    std::thread t([this, done, w = std::move(work)] {
      RunAssembly(w);
      done->store(true);
    });
    absl::MutexLock lock(&threads_mu_);
    assembly_threads_.push_back({done, std::move(t)});
  }
  CleanStaging();
}

JobManagerStats JobManager::Impl::Stats() {
  absl::MutexLock lock(&mu_);
  JobManagerStats s;
  const int64_t now = Now();
  for (const auto& [id, e] : jobs_) ++s.jobs_by_state[e.rec.job.state()];
  std::set<std::string> busy;
  for (const auto& [id, t] : tasks_) {
    if (t.kind != v1::TASK_KIND_QUANTIZE) continue;
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
  for (const auto& [id, w] : workers_) {
    ++s.workers_by_state[WorkerLost(w, now) ? "lost" : busy.count(id) ? "busy" : "idle"];
  }
  return s;
}

// ---- JobManager -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(std::unique_ptr<StateStore> store,
                                                               Clock* clock,
                                                               JobManagerOptions options,
                                                               JobManagerListener* listener) {
  if (store == nullptr) return absl::InvalidArgumentError("JobManager: no state store");
  if (clock == nullptr) return absl::InvalidArgumentError("JobManager: no clock");
  if (options.lease_duration_ms <= 0 || options.retry_initial_backoff_ms < 0 ||
      options.retry_max_backoff_ms < 0 || options.default_max_attempts < 1) {
    return absl::InvalidArgumentError(
        "JobManager options: lease_duration_ms must be > 0, backoffs >= 0, "
        "default_max_attempts >= 1");
  }
  std::unique_ptr<JobManager> jm(new JobManager());
  jm->impl_ = std::make_unique<Impl>(std::move(store), clock, std::move(options), listener);
  QF_RETURN_IF_ERROR(jm->impl_->Load());
  jm->impl_->Start();
  return jm;
}

JobManager::~JobManager() {
  if (impl_ != nullptr) impl_->Shutdown();
}

absl::StatusOr<v1::Job> JobManager::SubmitJob(std::string_view tenant,
                                              const v1::SubmitJobRequest& request) {
  return impl_->SubmitJob(tenant, request);
}
absl::StatusOr<v1::Job> JobManager::GetJob(std::string_view tenant, std::string_view job_id) {
  return impl_->GetJob(tenant, job_id);
}
absl::StatusOr<v1::ListJobsResponse> JobManager::ListJobs(std::string_view tenant,
                                                          const v1::ListJobsRequest& request) {
  return impl_->ListJobs(tenant, request);
}
absl::StatusOr<v1::Job> JobManager::CancelJob(std::string_view tenant, std::string_view job_id) {
  return impl_->CancelJob(tenant, job_id);
}
absl::StatusOr<std::vector<v1::JobEvent>> JobManager::WatchEvents(
    std::string_view tenant, std::string_view job_id, int64_t after_sequence, int max_events,
    int64_t wait_ms, bool* job_finished) {
  return impl_->WatchEvents(tenant, job_id, after_sequence, max_events, wait_ms, job_finished);
}
std::vector<v1::WorkerInfo> JobManager::ListWorkers() { return impl_->ListWorkers(); }
absl::StatusOr<v1::RegisterWorkerResponse> JobManager::RegisterWorker(
    const v1::RegisterWorkerRequest& request) {
  return impl_->RegisterWorker(request);
}
absl::StatusOr<std::optional<v1::Task>> JobManager::AcquireTask(
    const v1::AcquireTaskRequest& request) {
  return impl_->AcquireTask(request);
}
absl::StatusOr<v1::HeartbeatResponse> JobManager::Heartbeat(const v1::HeartbeatRequest& request) {
  return impl_->Heartbeat(request);
}
absl::Status JobManager::CompleteTask(const v1::CompleteTaskRequest& request) {
  return impl_->CompleteTask(request);
}
absl::Status JobManager::FailTask(const v1::FailTaskRequest& request) {
  return impl_->FailTask(request);
}
void JobManager::Tick() { impl_->Tick(); }
JobManagerStats JobManager::Stats() { return impl_->Stats(); }
void JobManager::Shutdown() { impl_->Shutdown(); }

}  // namespace qforge

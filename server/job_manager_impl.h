// Internal to the JobManager (server/job_manager.h): its Impl class, whose methods are
// defined by concern in
//   job_manager.cc               creation, load/resume, shutdown, the transaction (Txn), the
//                                views (counts, ETA) and the transitions the calls share;
//   job_manager_jobs.cc          the client calls: submit, get, list, cancel, watch;
//   job_manager_workers.cc       the worker calls: register, acquire, heartbeat, complete, fail;
//   job_manager_housekeeping.cc  Tick (lease expiry, assemblies, staging clean-up) and Stats.
// The decisions without I/O are the Scheduler's (server/scheduler.h), planning I/O is the
// Planner's (server/planner.h), assembly threads are the AssemblyRunner's
// (server/assembly_runner.h). Include nowhere else.
//
// Thread-safety: the state below is guarded by mu_; I/O (planning, reading events, checking
// a staged output, assembling, deleting staging) happens without mu_ held.
#ifndef QFORGE_SERVER_JOB_MANAGER_IMPL_H_
#define QFORGE_SERVER_JOB_MANAGER_IMPL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "job/spec.h"
#include "server/assembly_runner.h"
#include "server/job_manager.h"
#include "server/planner.h"
#include "server/scheduler.h"
#include "server/state_store.h"
#include "server/wakeup_board.h"

namespace qforge {

class JobManager::Impl {
 public:
  Impl(std::unique_ptr<StateStore> store, Clock* clock, JobManagerOptions options,
       JobManagerListener* listener);
  // Runs what is still registered on the wakeup board while every member is alive.
  ~Impl() {
    Shutdown();
    wakeups_.Stop();
  }

  // Loads the store's state and resumes (see JobManager::Create); starts the tick thread.
  absl::Status Load();
  void Start();

  absl::StatusOr<v1::Job> SubmitJob(std::string_view tenant, const v1::SubmitJobRequest& request);
  absl::StatusOr<v1::Job> GetJob(std::string_view tenant, std::string_view job_id);
  absl::StatusOr<v1::JobReport> GetJobReport(std::string_view tenant, std::string_view job_id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(std::string_view tenant,
                                                const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(std::string_view tenant, std::string_view job_id);
  absl::StatusOr<std::vector<v1::JobEvent>> WatchEvents(std::string_view tenant,
                                                        std::string_view job_id,
                                                        int64_t after_sequence, int max_events,
                                                        int64_t wait_ms, bool* job_finished);
  std::vector<v1::WorkerInfo> ListWorkers(std::string_view tenant);
  void NotifyOnEvents(std::string_view job_id, int64_t after_sequence, int64_t max_wait_ms,
                      std::function<void()> wake);
  uint64_t WorkGeneration();
  void NotifyOnWork(uint64_t generation, int64_t max_wait_ms, std::function<void()> wake);
  absl::StatusOr<v1::ListLayersResponse> ListLayers(std::string_view tenant,
                                                    const v1::ListLayersRequest& request);
  absl::Status DeleteJob(std::string_view tenant, std::string_view job_id);
  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(
      const v1::RegisterWorkerRequest& request);
  absl::StatusOr<std::optional<v1::Task>> AcquireTask(const v1::AcquireTaskRequest& request);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  absl::Status CompleteTask(const v1::CompleteTaskRequest& request,
                            v1::CompleteTaskResponse* response);
  absl::Status FailTask(const v1::FailTaskRequest& request);
  void Tick();
  JobManagerStats Stats();
  void Shutdown();
  // Delivers the listener notes queued by transitions (Note) to the listener.
  void FlushNotes() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct JobEntry {
    JobRecord rec;
    // The job's converted spec, converted once: at submit, or when the state is loaded for
    // a job that may still schedule or assemble (QUEUED, CALIBRATING, QUANTIZING,
    // ASSEMBLING, EVALUATING); null for
    // other loaded jobs and once the job settles. Immutable; shared with assembly runs.
    std::shared_ptr<const JobConfig> config;
    std::vector<std::string> task_ids;  // plan order; empty once settled
    // &tasks_.at(id) for each of task_ids, kept beside it wherever it is filled or cleared
    // (memory only: nodes of a std::map never move, and a task is only erased when its job
    // settles or is deleted, which clears both).
    std::vector<const TaskRecord*> task_refs;
    int64_t last_sequence = 0;
    // The job's latest committed events (sequences ascending and contiguous, ending at
    // last_sequence; at most options_.watch_memory_bytes_per_job of them, their serialized
    // size, and at least the last one; memory only, empty after a restart and once the job
    // settles): WatchEvents answers a watcher that keeps up from here instead of reading the
    // events back from the store.
    std::deque<v1::JobEvent> recent_events;
    size_t recent_event_bytes = 0;
    bool assembling = false;  // an assembly run is in flight (memory only)
    // The last EVENT_TYPE_PROGRESS event (memory only): when, and what it reported.
    int64_t progress_event_ms = 0;
    std::string progress_reported;
    bool cleaning = false;    // staging deletion in flight (memory only)
  };
  struct TaskProgress {
    double progress = 0;
    std::string phase;
  };

  // A transition: copies of the rows it touches plus the events it appends. Reads go
  // through it so that later steps see earlier ones; Commit() persists everything in one
  // StateStore::Apply and only then installs the copies in memory. Requires mu_.
  class Txn {
   public:
    explicit Txn(Impl* m) : m_(m) {}
    const JobRecord& PeekJob(const std::string& id) const;
    JobRecord& Job(const std::string& id);
    const TaskRecord& PeekTask(const std::string& id) const;
    TaskRecord& Task(const std::string& id);
    WorkerRecord& Worker(const std::string& id);

    // The tasks of `job_id` in plan order as this transition sees them (its staged copy
    // where it has one, as PeekTask would give): `for (const TaskRecord& t :
    // tx.TasksOf(job_id))`. A pass over pointers without a lookup by id, so views and
    // transitions that look at every task of a job stay cheap for jobs of thousands of
    // tasks. Staging a task (Task()) inside the loop is allowed: the elements after it are
    // read as of then.
    class TaskRange {
     public:
      class Iterator {
       public:
        Iterator(const Txn* tx, std::vector<const TaskRecord*>::const_iterator it)
            : tx_(tx), it_(it) {}
        const TaskRecord& operator*() const { return tx_->Staged(*it_); }
        Iterator& operator++() {
          ++it_;
          return *this;
        }
        bool operator!=(const Iterator& o) const { return it_ != o.it_; }

       private:
        const Txn* tx_;
        std::vector<const TaskRecord*>::const_iterator it_;
      };
      TaskRange(const Txn* tx, const std::vector<const TaskRecord*>* refs)
          : tx_(tx), refs_(refs) {}
      Iterator begin() const { return Iterator(tx_, refs_->begin()); }
      Iterator end() const { return Iterator(tx_, refs_->end()); }

     private:
      const Txn* tx_;
      const std::vector<const TaskRecord*>* refs_;
    };
    TaskRange TasksOf(const std::string& job_id) const;
    // A new job with its tasks (plan order) and its converted spec.
    void NewJob(JobRecord rec, std::vector<TaskRecord> tasks,
                std::shared_ptr<const JobConfig> config);
    void NewWorker(WorkerRecord w);
    bool IsNewJob(const std::string& id) const { return new_task_ids_.count(id) != 0; }

    // Appends an event for `job_id` (with the job's staged state and counts), unless the
    // job was already terminal before this transition (a terminal event is the last).
    // `type` UNSPECIFIED: TASK when `task` is given, else JOB. The event carries the job's
    // running tasks (Running) too.
    void Event(const std::string& job_id, std::string message, const TaskRecord* task = nullptr,
               v1::EventType type = v1::EVENT_TYPE_UNSPECIFIED);

    // The store's error, with nothing installed in memory.
    absl::Status Commit();
    // The state changes this transition makes, "job.<STATE>" and "task.<KIND>.<STATE>"
    // (sorted, unique): the names of its fault points (common/fault_point.h).
    std::vector<std::string> FaultPointNames() const;

   private:
    // `base` (a task of m_->tasks_, or a new job's task here) as this transition sees it.
    const TaskRecord& Staged(const TaskRecord* base) const {
      if (staged_index_.empty()) {  // a few staged tasks (the common case): a linear scan
        for (const auto& [original, copy] : staged_) {
          if (original == base) return *copy;
        }
        return *base;
      }
      auto it = staged_index_.find(base);
      return it != staged_index_.end() ? *it->second : *base;
    }

    Impl* m_;
    std::map<std::string, JobRecord> jobs_;
    std::map<std::string, TaskRecord> tasks_;
    // The copy in tasks_ of each task of m_->tasks_ this transition staged, by the address
    // of the original; indexed by a hash map once there are more than kLinearStaged.
    static constexpr size_t kLinearStaged = 8;
    std::vector<std::pair<const TaskRecord*, const TaskRecord*>> staged_;
    std::unordered_map<const TaskRecord*, const TaskRecord*> staged_index_;
    std::map<std::string, std::vector<const TaskRecord*>> new_task_refs_;  // new jobs' tasks
    std::map<std::string, WorkerRecord> workers_;
    std::map<std::string, std::vector<std::string>> new_task_ids_;
    std::map<std::string, std::shared_ptr<const JobConfig>> new_configs_;
    std::map<std::string, int64_t> sequences_;
    std::vector<v1::JobEvent> events_;
  };

  // ---- Helpers shared by the job_manager*.cc files.
  static constexpr char kCoordinatorWorker[] = "coordinator";  // runs ASSEMBLE; reserved
  static bool IsTerminal(v1::JobState s) {
    return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED ||
           s == v1::JOB_STATE_CANCELLED;
  }
  // The job no longer wants its tasks' results: running tasks are told to stop.
  static bool IsStopping(v1::JobState s) {
    return IsTerminal(s) || s == v1::JOB_STATE_CANCELLING;
  }
  // `bytes` random bytes as lowercase hex.
  static std::string RandomHex(int bytes);
  // "1.5 s".
  static std::string Seconds(int64_t ms);
  static v1::ErrorInfo MakeError(absl::StatusCode code, std::string message, std::string reason,
                                 std::string subject);
  static void LogError(const std::string& what, const absl::Status& s);

  int64_t Now() const { return clock_->NowMs(); }
  absl::Status CheckRunning() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (shutdown_) return absl::UnavailableError("the coordinator is shutting down");
    return absl::OkStatus();
  }
  void Note(std::function<void(JobManagerListener&)> f) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (listener_ != nullptr) notes_.push_back(std::move(f));
  }
  // A task may have become runnable: wakes AcquireTask waiters, blocked and registered.
  void SignalWork() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ++work_generation_;
    work_cv_.SignalAll();
    wakeups_.Fire(kWorkWakeupKey);
  }
  static constexpr char kWorkWakeupKey[] = "work";
  static std::string EventWakeupKey(const std::string& job_id) { return "job:" + job_id; }

  // What a task is, for events and errors: "layer <module>", "calibration shard 2/3
  // (samples [4, 8))", "the reduce of the calibration shards", "assembly", "evaluation
  // shard 1/2 (samples [0, 4))", "the reduce of the evaluation shards".
  std::string TaskSubject(const Txn& view, const TaskRecord& t) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Sets e.task_refs from e.task_ids (every id must be in tasks_).
  void FillTaskRefs(JobEntry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    e.task_refs.clear();
    e.task_refs.reserve(e.task_ids.size());
    for (const std::string& id : e.task_ids) e.task_refs.push_back(&tasks_.at(id));
  }

  // ---- Views.
  absl::StatusOr<JobEntry*> FindJob(std::string_view tenant, std::string_view job_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::TaskCounts Counts(const Txn& view, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double Eta(const Txn& view, const std::string& job_id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  double Progress(const Txn& view, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::Job BuildJob(const Txn& view, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The job's RUNNING tasks in plan order with their last heartbeat's progress and phase
  // (Job.running); empty for a terminal job.
  google::protobuf::RepeatedPtrField<v1::RunningTask> Running(const Txn& view,
                                                              const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A QUANTIZE task's result as ListLayers reports it (`progress`: its heartbeat's, if any).
  static v1::LayerResult LayerResultOf(const TaskRecord& t, const v1::JobSpec& spec,
                                       const TaskProgress* progress);
  int ActiveWorkers(int64_t now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // "lost", "unknown" (loaded at start, no call since, within lease_duration_ms of the
  // start), "busy" or "idle" (JobManager::ListWorkers).
  std::string WorkerState(const WorkerRecord& w, bool busy, int64_t now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool AnyRunning(const Txn& view, const std::string& job_id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckOutputFree(const std::string& output_uri, std::string_view tenant) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The tenant's quotas (JobManagerOptions::max_*_per_tenant) with one more job of
  // `new_tasks` tasks: RESOURCE_EXHAUSTED naming the limit, the figure and the flag.
  absl::Status CheckTenantQuota(std::string_view tenant, int64_t new_tasks) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Where a job's tasks stage their outputs: spec.output_uri, or for an evaluation-only job
  // without one, the Hessian cache store.
  std::string StagingUri(const v1::JobSpec& spec) const {
    return spec.output_uri().empty() ? options_.hessian_cache_uri : spec.output_uri();
  }
  // The job's ASSEMBLE task ("" for an evaluation-only job).
  static std::string AssembleTaskOf(const JobEntry& e, const std::map<std::string, TaskRecord>& tasks);

  // ---- Load steps (within the load transaction).
  void RequeueInterruptedAssemblies(Txn& tx, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ConvertLoadedSpecs(Txn& tx, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // ---- Transitions (all within `tx`).
  void Lease(Txn& tx, const std::string& task_id, const std::string& worker_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Leases `worker_id` the task the scheduler picks for it now, within `tx` (a completion
  // that also asks for the next task); nullopt when none fits, the worker is unknown, or
  // `tx` itself touched the pick's task or job state.
  std::optional<std::string> LeaseNextWithin(Txn& tx, const std::string& worker_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The task the scheduler would lease `worker` now (committed state), or null.
  const TaskRecord* PickFor(const WorkerRecord& worker, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The Task message a worker gets for the (committed) lease of `task_id`.
  v1::Task LeasedTask(const std::string& task_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A worker task RUNNING under a lease of `worker_id`, if any.
  std::optional<std::string> HeldBy(const std::string& worker_id)
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
  // Every CALIBRATE succeeded: the REDUCE (PENDING) becomes QUEUED with their output keys.
  void MaybeStartReduce(Txn& tx, const std::string& job_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The REDUCE succeeded: Job.calibration gets tokens and seconds, the QUANTIZE tasks
  // (PENDING) become QUEUED and the job QUANTIZING.
  void MaybeFinishCalibration(Txn& tx, const std::string& job_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The artifact is written: the EVALUATE tasks (PENDING) become QUEUED and the job
  // EVALUATING. False when the job has no evaluation.
  bool MaybeStartEvaluation(Txn& tx, const std::string& job_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Every EVALUATE succeeded: the EVAL_REDUCE (PENDING) becomes QUEUED with their output keys.
  void MaybeStartEvalReduce(Txn& tx, const std::string& job_id, int64_t now)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The EVAL_REDUCE succeeded with `report` (validated, the manifest already rewritten):
  // Job.quality, then SUCCEEDED, or FAILED (QUALITY_GATE, `gate`'s message) when `gate`
  // is not OK.
  void FinishEvaluation(Txn& tx, const std::string& job_id, v1::QualityReport report,
                        const absl::Status& gate, int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The I/O half of an EVAL_REDUCE completion (no lock held): reads and validates its
  // staged metrics, records them in the manifest (quantization jobs), applies the gate.
  struct EvaluationOutcome {
    v1::QualityReport report;
    absl::Status gate;        // CheckQualityGate's
    absl::Status error;       // the result or the manifest could not be used (task fails)
    bool retryable = false;   // of `error`
  };
  EvaluationOutcome ReadEvaluationResult(const std::string& staging_uri,
                                         const std::string& output_key,
                                         const std::shared_ptr<const JobConfig>& config,
                                         const TaskRecord& reduce, double seconds) const;
  void Settle(Txn& tx, const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // ---- Tick steps.
  void ExpireLeases(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AdvanceJobs(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<AssemblyWork> StartDueAssemblies(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // AssemblyRunner callbacks.
  bool AssemblyCancelled(const std::string& job_id) ABSL_LOCKS_EXCLUDED(mu_);
  void FinishAssembly(const std::string& job_id, const AssemblyOutcome& outcome)
      ABSL_LOCKS_EXCLUDED(mu_);
  void CleanStaging() ABSL_LOCKS_EXCLUDED(mu_);
  // Deletes settled jobs that ended more than options_.retain_jobs_ms ago.
  void PruneOldJobs(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Removes the settled jobs `ids` from the StateStore and memory (one transaction).
  absl::Status RemoveJobs(const std::vector<std::string>& ids) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::unique_ptr<StateStore> store_;
  Clock* const clock_;
  const JobManagerOptions options_;  // open_store filled in
  const SpecOptions spec_options_;
  // spec_options_ with `tenant`'s own file roots added (options_.tenant_file_roots).
  SpecOptions SpecOptionsFor(std::string_view tenant) const;
  JobManagerListener* const listener_;
  const Scheduler scheduler_;
  const Planner planner_;

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;   // a task may have become runnable
  absl::CondVar event_cv_;  // events were appended
  absl::CondVar tick_cv_;   // wakes the tick thread early
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  int64_t started_ms_ ABSL_GUARDED_BY(mu_) = 0;  // Now() when the state was loaded
  std::map<std::string, JobEntry> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, std::string>, std::string> by_request_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, TaskRecord> tasks_ ABSL_GUARDED_BY(mu_);  // of unsettled jobs
  std::map<std::string, WorkerRecord> workers_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, TaskProgress> progress_ ABSL_GUARDED_BY(mu_);  // running tasks
  uint64_t work_generation_ ABSL_GUARDED_BY(mu_) = 0;  // SignalWork count
  // Registered waiters of streams and long-polls (NotifyOnEvents, NotifyOnWork).
  WakeupBoard wakeups_;
  std::vector<std::function<void(JobManagerListener&)>> notes_ ABSL_GUARDED_BY(mu_);

  absl::Mutex tick_mu_;  // serializes Tick()
  std::thread tick_thread_;
  // Last: its threads call back into this object, so it is destroyed (joined) first.
  AssemblyRunner assembly_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_JOB_MANAGER_IMPL_H_

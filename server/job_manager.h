// JobManager: the transport-free core of the coordinator. It owns all job, task, worker and
// event state (persisted through a StateStore, every transition in one transaction), plans
// jobs from safetensors headers, schedules worker tasks (priority, then fair share between tenants, then FIFO; only to
// workers that can run them), leases them with expiry and fencing tokens, retries with
// exponential backoff up to a per-task budget, delivers cancellation through heartbeats,
// runs ASSEMBLE when every layer is done, and resumes after a restart.
//
// The job DAG: [CALIBRATE × shards → REDUCE →] QUANTIZE × layers → ASSEMBLE. With dataset
// calibration (spec.calibration.dataset_uri) and no usable cached Hessians, the job is
// CALIBRATING while its CALIBRATE shards (QUEUED from the start) and then its REDUCE
// (QUEUED once every shard succeeded, with the shards' partial keys) run; the REDUCE writes
// the Hessian file to the cache (options.hessian_cache_uri) and, when it succeeds, the
// QUANTIZE tasks (PENDING until then, reading that file) become QUEUED and the job
// QUANTIZING, in one transaction. With cached Hessians the plan has QUANTIZE tasks only.
//
// With evaluation (spec.evaluation.dataset_uri, job/evaluation.h) the DAG continues
// ASSEMBLE → EVALUATE × shards → EVAL_REDUCE: when the artifact is written (its manifest
// exists) the EVALUATE tasks (PENDING until then) become QUEUED and the job EVALUATING
// (progress: samples evaluated of all); the last one queues the EVAL_REDUCE with the shards'
// partial keys. The EVAL_REDUCE stages the metrics (QualityMetricsToJson); on its
// completion the coordinator reads and validates them (job/evaluation_record.h), writes
// "quality" and "quality_gate" into the manifest, sets Job.quality and ends the job
// SUCCEEDED, or FAILED with reason QUALITY_GATE (the gate's message) when a threshold is
// missed: the artifact stays. EVALUATE / EVAL_REDUCE failures fail the job with reason
// EVALUATION_FAILED naming the task. An evaluation-only job (spec.reference_model_uri,
// `qforge eval`) has only EVALUATE × shards and EVAL_REDUCE: QUEUED → EVALUATING →
// SUCCEEDED / FAILED; it stages under spec.output_uri or, without one, the Hessian cache
// store (options.hessian_cache_uri), and writes no manifest.
//
// The gRPC adapters (server/rpc_*.cc) only translate: they authenticate, map the tenant and
// call these methods; every error is an absl::Status whose message says what to fix
// (INVALID_ARGUMENT naming the field, NOT_FOUND naming the job, FAILED_PRECONDITION for a
// stale lease, ...). Proto messages of qforge.v1 are the value types in and out.
//
// Conventions: a QUANTIZE attempt writes `.qforge-staging/<job>/<task>/<attempt>/
// layer.safetensors` in the output store (Task.staging_uri = spec.output_uri), a CALIBRATE
// attempt `.../hessians.partial.safetensors` there; a REDUCE attempt reads those and writes
// Task.staging_key = calibration.hessians_key in the cache store calibration.hessians_uri;
// an EVALUATE attempt `.../evaluation.partial.json`, an EVAL_REDUCE `.../quality.json`;
// ASSEMBLE
// runs in the coordinator (AssembleArtifact, GPTQ or VPTQ; the manifest records the normalized
// spec plus "job_id", and per layer the task, worker, attempt and seconds), then the job's
// staging prefix is deleted. Model, Hessian and output stores are opened through
// options.open_store when needed (I/O never happens under the JobManager's lock).
// Memory: all jobs and workers, and the tasks of jobs not yet settled; events are read
// back from the StateStore.
//
// Thread-safety: all methods are thread-safe. AcquireTask and WatchEvents block up to the
// wait they are given (real time, whatever the Clock) and wake early when work or events
// arrive; Shutdown() wakes them all.
#ifndef QFORGE_SERVER_JOB_MANAGER_H_
#define QFORGE_SERVER_JOB_MANAGER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "qforge/v1/job_service.pb.h"
#include "qforge/v1/worker_service.pb.h"
#include "server/clock.h"

namespace qforge {

class StateStore;  // server/state_store.h

struct JobManagerOptions {
  int64_t lease_duration_ms = 30'000;       // a lease not renewed by a heartbeat expires
  int64_t heartbeat_interval_ms = 5'000;    // told to workers at registration
  int64_t worker_lost_after_ms = 60'000;    // no call from a worker for this long: "lost"
  int64_t retry_initial_backoff_ms = 1'000; // Temporal-style: 1 s, ×2 per attempt
  double retry_backoff_multiplier = 2.0;
  int64_t retry_max_backoff_ms = 60'000;
  int default_max_attempts = 4;             // per task, when the spec says 0
  int64_t max_acquire_wait_ms = 30'000;     // cap on AcquireTask long-polls
  // file:// roots every tenant's jobs may read or write ("" entries ignored). Together with
  // tenant_file_roots: the roots of a job are allowed_file_roots plus its tenant's entry;
  // when both are empty, any path is allowed (embedding and tests; the coordinator binary
  // always gives roots: docs/operations.md "File access").
  std::vector<std::string> allowed_file_roots;
  // Roots of one tenant only (tokens file `allow-root=`; the tenant's own store directory).
  // A tenant without an entry gets allowed_file_roots alone.
  std::map<std::string, std::vector<std::string>> tenant_file_roots;
  // Opens stores for model, Hessian and output URIs (default: OpenCountedObjectStore,
  // common/store_traffic.h).
  std::function<absl::StatusOr<std::unique_ptr<ObjectStore>>(std::string_view uri)> open_store;
  std::string qforge_version;                // recorded in manifests
  // Housekeeping: a background thread calls Tick() every tick_interval_ms (real time).
  // Tests turn it off and call Tick() themselves after moving a FakeClock.
  bool background_tick = true;
  int64_t tick_interval_ms = 100;
  // Tick() runs ASSEMBLE synchronously instead of in a background thread (tests).
  bool run_assembly_inline = false;
  // QUANTIZE memory estimate (TaskMemoryBytes, job/spec.h): float32 W [out, in] and H
  // [in, in] times this factor (CPU solver workspace), plus VPTQ's codebooks, or the CUDA
  // backend's estimate when larger. A worker whose memory_budget_bytes is below it never
  // gets the task (a budget of 0 means no limit).
  double task_memory_factor = 3.0;
  // Store root of the Hessian cache (job/calibration.h): reduced Hessians of dataset
  // calibration, kept under HessianCacheEntryKey for later jobs on the same model and data.
  // The coordinator's own: a spec's hessians_uri may always point into it. "" refuses
  // dataset calibration (FAILED_PRECONDITION).
  std::string hessian_cache_uri;
  // Per-tenant quotas (docs/operations.md "Limits"); 0 = no limit. A SubmitJob that would
  // exceed one is RESOURCE_EXHAUSTED naming the limit, the tenant's current figure and the
  // coordinator flag that sets it. Unfinished jobs: not SUCCEEDED, FAILED or CANCELLED.
  // Queued tasks: the tasks of unfinished jobs not yet leased or run (PENDING or QUEUED,
  // ASSEMBLE included), counting the new job's plan.
  int max_running_jobs_per_tenant = 256;            // --max-running-jobs-per-tenant
  int64_t max_queued_tasks_per_tenant = 100'000;    // --max-queued-tasks-per-tenant
  // A heartbeat whose task's job had no EVENT_TYPE_PROGRESS event for this long appends
  // one (with every running task's progress), when something moved since the last one;
  // heartbeats between only update GetJob (--progress-event-interval).
  int64_t progress_event_interval_ms = 2'000;
  // Jobs that ended longer ago than this are deleted (row, tasks, events; the artifact
  // stays) by Tick; 0 keeps them forever (--retain-jobs).
  int64_t retain_jobs_ms = 30LL * 24 * 3600 * 1000;
  // A job's latest events kept in memory while it has work (their serialized bytes; the last
  // event always): WatchEvents answers a watcher that keeps up from there, one further behind
  // from the state store. An event carries the job's running list (~90 bytes per running
  // task): 1 MiB is ~350 events of a job with 32 tasks running.
  size_t watch_memory_bytes_per_job = size_t{1} << 20;
};

// Observers for metrics (server/metrics.h implements it); all callbacks are cheap and
// called without locks held, from the thread that made the transition. Optional.
// OnTaskFinished: once per finished attempt (succeeded or failed; `seconds` by the
// JobManager's clock). OnTaskRetried: once per requeued attempt. OnBytes / OnSolverPhase:
// the figures a worker reported with its completion ("read", "solve", "write"), and the
// bytes an assembly wrote. OnJobSubmitted: once per created job (not for a validate_only
// request or a request_id replay). OnJobFinished: once per job reaching SUCCEEDED, FAILED
// or CANCELLED, with the seconds from its creation to then (JobManager's clock); jobs that
// were already terminal when the state was loaded are not reported again.
class JobManagerListener {
 public:
  virtual ~JobManagerListener() = default;
  virtual void OnJobSubmitted(v1::Method method) {}
  virtual void OnJobFinished(v1::Method method, v1::JobState state, double seconds) {}
  virtual void OnTaskFinished(v1::TaskKind kind, v1::Method method, bool succeeded,
                              double seconds) {}
  virtual void OnTaskRetried(v1::TaskKind kind) {}
  virtual void OnBytes(uint64_t read, uint64_t written) {}
  virtual void OnSolverPhase(std::string_view phase, double seconds) {}
  // A job's evaluation was reduced: `method` is the job's (METHOD_UNSPECIFIED for an
  // evaluation-only job), `gate` "passed", "failed" or "none" (no thresholds).
  virtual void OnEvaluation(v1::Method method, double ppl_increase_pct, double mean_kl,
                            std::string_view gate) {}
};

// Point-in-time figures for gauges.
struct JobManagerStats {
  std::map<v1::JobState, int64_t> jobs_by_state;
  int64_t tasks_queued = 0;
  int64_t tasks_running = 0;
  int64_t oldest_queued_task_create_ms = 0;  // when the longest-waiting queued task became
                                             // queued (Unix ms); 0 when none is queued
  std::map<std::string, int64_t> workers_by_state;  // "idle", "busy", "lost", "unknown"
  // The oldest last contact (registration, task poll, heartbeat; Unix ms) among workers not
  // lost; 0 when there is none.
  int64_t oldest_worker_seen_ms = 0;
};

class JobManager {
 public:
  // Loads the state `store` holds and resumes: QUEUED tasks stay queued (with their
  // backoff), RUNNING tasks keep their lease until it expires (their workers may still
  // heartbeat and complete them), jobs found ASSEMBLING assemble again, terminal jobs whose
  // staging was not yet deleted are cleaned up. The spec of every job that may still run is
  // converted once here; one these options no longer accept (narrower allowed_file_roots)
  // fails its job (reason SPEC_REJECTED). Starts the tick thread unless
  // options.background_tick is false. `clock` must outlive the JobManager; `listener`
  // (optional) too. INVALID_ARGUMENT for bad options, the store's errors otherwise.
  static absl::StatusOr<std::unique_ptr<JobManager>> Create(std::unique_ptr<StateStore> store,
                                                            Clock* clock,
                                                            JobManagerOptions options,
                                                            JobManagerListener* listener = nullptr);
  // Shutdown(), then waits for running assemblies to finish.
  ~JobManager();

  // ---- Jobs. `tenant` comes from the caller's token ("" when auth is off); a job of
  // another tenant is NOT_FOUND, as an unknown id is.

  // Validates the spec (job/spec.h; then the model's headers, each selected layer, the
  // Hessian source (server/planner.h: the Hessian file, or the token data in full), and
  // that the output holds no object outside `.qforge-staging/` and is no unfinished job's
  // output), plans the job's tasks (CALIBRATE shards sized for the live workers, REDUCE,
  // one QUANTIZE per selected layer) plus one ASSEMBLE, and stores the job QUEUED with its
  // normalized spec and, for dataset calibration, Job.calibration. Errors: INVALID_ARGUMENT
  // naming the field ("spec.gptq.bits: 5 is not one of 2, 3, 4, 8",
  // "spec.calibration.hessians_uri: ... has no Hessian for module 'X'",
  // "spec.calibration.dataset_uri: sample 3, position 17: id 32001 is outside the
  // vocabulary ..."); RESOURCE_EXHAUSTED when the tenant's quota (max_running_jobs_per_tenant,
  // max_queued_tasks_per_tenant) would be exceeded, or the header parse budget stays taken
  // (common/safetensors.h SafetensorsHeaderLimits); FAILED_PRECONDITION for dataset
  // calibration without a Hessian cache;
  // UNAVAILABLE when a store or the state store fails transiently.
  // request_id (AIP-155): a request with the tenant's request_id of an existing job returns
  // that job (also after a restart); with a different spec, ALREADY_EXISTS.
  // validate_only: validates and returns the would-be job (no id, state UNSPECIFIED,
  // task counts filled in) without creating anything.
  absl::StatusOr<v1::Job> SubmitJob(std::string_view tenant, const v1::SubmitJobRequest& request);
  // The job with its task counts (every task, ASSEMBLE included), ETA (-1 = unknown, and
  // always while CALIBRATING) and progress: CALIBRATING: Σ over CALIBRATE shards (1 when
  // succeeded, the reported heartbeat progress while running) × shard samples / samples;
  // QUANTIZING: succeeded QUANTIZE tasks / QUANTIZE tasks; ASSEMBLING and SUCCEEDED: 1;
  // EVALUATING: as CALIBRATING, over the EVALUATE shards.
  absl::StatusOr<v1::Job> GetJob(std::string_view tenant, std::string_view job_id);
  // The job's quality report page (job/quality_report.h RenderQualityReportHtml): rendered
  // from its manifest (a quantization job; reads the output store, no lock held) or from
  // Job.quality (an evaluation-only job); uri = where the job wrote report.html ("" when it
  // has no output). NOT_FOUND for an unknown job; FAILED_PRECONDITION while the job has no
  // evaluation results (none asked for, or not reduced yet); the store's errors.
  absl::StatusOr<v1::JobReport> GetJobReport(std::string_view tenant, std::string_view job_id);
  // The tenant's jobs, newest first, filtered by state; page_size 0 means 50, at most 500;
  // INVALID_ARGUMENT for a negative page_size or a malformed page_token.
  absl::StatusOr<v1::ListJobsResponse> ListJobs(std::string_view tenant,
                                                const v1::ListJobsRequest& request);
  // Queued tasks are cancelled at once; with tasks running (or the assembly) the job is
  // CANCELLING until they stop (their heartbeats answer cancel = true), then CANCELLED, and
  // its staging objects are deleted. Cancelling a CANCELLING or CANCELLED job returns it
  // unchanged; a SUCCEEDED or FAILED one is FAILED_PRECONDITION.
  absl::StatusOr<v1::Job> CancelJob(std::string_view tenant, std::string_view job_id);
  // Events with sequence > after_sequence, ascending (at most max_events; <= 0 means 100,
  // capped at 1000). When there are none yet, waits up to wait_ms (real time) for one.
  // Every job and task transition appends one event; sequences start at 1 and increase by
  // 1 per job; a job's terminal event is its last. *job_finished (may be null) is set when
  // the job is terminal and no event after the returned ones will ever come.
  absl::StatusOr<std::vector<v1::JobEvent>> WatchEvents(std::string_view tenant,
                                                        std::string_view job_id,
                                                        int64_t after_sequence, int max_events,
                                                        int64_t wait_ms, bool* job_finished);
  // All registered workers by id; state "idle", "busy" (holds a lease), "lost" (no call
  // for worker_lost_after_ms; its leases expire normally), or "unknown": a worker loaded
  // from the StateStore that holds no lease and has not called this coordinator process yet
  // (after a restart; it becomes "lost" once lease_duration_ms has passed since the start
  // without a call). `tenant` sees current_task only
  // for a task of its own jobs (a worker busy with another tenant's task is "busy" with
  // current_task ""): no other tenant's task or job id is disclosed.
  std::vector<v1::WorkerInfo> ListWorkers(std::string_view tenant);
  // The job's QUANTIZE tasks in plan order (LayerResult: the job's method and parameters,
  // state, attempt, worker, the worker's metrics once succeeded, the heartbeat's progress
  // while running, the last error). page_size 0 means 100, at most 1000; page_token is the
  // previous response's next_page_token. A settled job's tasks are read from the
  // StateStore. NOT_FOUND for an unknown job; INVALID_ARGUMENT for a negative page_size or
  // a malformed page_token.
  absl::StatusOr<v1::ListLayersResponse> ListLayers(std::string_view tenant,
                                                    const v1::ListLayersRequest& request);
  // Deletes a finished job: its row, tasks and events, from memory and the StateStore (the
  // artifact and report stay where they are). Open WatchJob streams of it end. NOT_FOUND
  // for an unknown job; FAILED_PRECONDITION for a job not yet SUCCEEDED, FAILED or
  // CANCELLED ("cancel it first"), or one still deleting its staging files (retry).
  absl::Status DeleteJob(std::string_view tenant, std::string_view job_id);

  // ---- Notification instead of blocking: the gRPC layer's streams and long-polls
  // register a callback rather than hold a thread (server/wakeup_board.h). `wake` runs once,
  // on a JobManager thread with no lock held, and should only queue work.

  // Wakes when job `job_id` may have events after `after_sequence`: at once when it already
  // has, has ended, is unknown (or was deleted) or the manager is shutting down; else on its
  // next event, its deletion, Shutdown, or after `max_wait_ms` (real time) at the latest.
  void NotifyOnEvents(std::string_view job_id, int64_t after_sequence, int64_t max_wait_ms,
                      std::function<void()> wake);
  // Changes whenever a task may have become runnable (queued, a backoff elapsed, a lease
  // given back). Read it before an AcquireTask that found nothing, then NotifyOnWork.
  uint64_t WorkGeneration();
  // Wakes when WorkGeneration() differs from `generation` (at once if it already does), on
  // Shutdown, or after `max_wait_ms` at the latest.
  void NotifyOnWork(uint64_t generation, int64_t max_wait_ms, std::function<void()> wake);

  // ---- Workers. Any call of a worker counts as "seen". Every request (and ListJobs's, and
  // job ids) is first checked by server/request_limits.h: INVALID_ARGUMENT naming the field
  // and its cap (Heartbeat progress must be a fraction, FailTask's code a canonical one; its
  // message and subject are stored truncated).

  // Assigns an id ("w-<hex>"), or keeps the given worker_id (re-registration after a
  // restart). INVALID_ARGUMENT without backends or for a malformed worker_id.
  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(
      const v1::RegisterWorkerRequest& request);
  // Leases the first runnable worker task (CALIBRATE, REDUCE, QUANTIZE) this worker can run
  // (one of its backends is
  // one of the task's; the memory estimate is within memory_budget_bytes, 0 = no limit):
  // jobs by priority (higher first), then the tenant with fewer running tasks (fair share,
  // server/scheduler.h), then creation time; tasks in plan order; retries only
  // after their backoff. Waits up to min(wait_ms, max_acquire_wait_ms) real time for one;
  // nullopt when none came. The task carries a fresh 128-bit hex lease token, its expiry
  // and the attempt-scoped staging key. NOT_FOUND for an unregistered worker.
  absl::StatusOr<std::optional<v1::Task>> AcquireTask(const v1::AcquireTaskRequest& request);
  // Renews the lease (expiry = now + lease_duration_ms) and records progress. A stale or
  // unknown lease token is not an error: the answer says lease_lost = true (drop the task).
  // cancel = true when the job was cancelled or failed (stop and FailTask). NOT_FOUND for
  // an unknown task id.
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  // The task is done: output_key ("" means the task's staging_key) must be this attempt's
  // staging key and exist in the output store (REDUCE: the cache store), and the object is
  // verified before it counts: its size (output_bytes, when given) and its SHA-256
  // (output_sha256, required), streamed (common/object_digest.h). The last CALIBRATE queues
  // the REDUCE; the REDUCE queues the QUANTIZE tasks and records the calibration's tokens
  // and seconds in Job.calibration. An object that differs from the report fails the attempt
  // (reason STAGED_OUTPUT_MISMATCH, retryable: requeued after its backoff, or the job fails
  // when no attempt is left) and the call answers DATA_LOSS.
  // FAILED_PRECONDITION when the lease token is stale (fencing: the result is discarded) or
  // the output is missing; INVALID_ARGUMENT for another key or a malformed output_sha256;
  // NOT_FOUND for unknown ids; the store's errors (UNAVAILABLE: retry the completion).
  // Blocking: it reads the whole staged object; callers on an RPC thread run it elsewhere.
  // Repeating an accepted completion with the same token is OK. When the last layer is
  // done the job becomes ASSEMBLING (the coordinator assembles in the background).
  // With acquire_next and a non-null `response`, an accepted completion also leases the
  // worker its next task in the same transition (what AcquireTask with wait_ms 0 would pick,
  // fair share counted before the completion), returned in response->next_task; a retried
  // completion that was already accepted returns the worker task that worker holds.
  absl::Status CompleteTask(const v1::CompleteTaskRequest& request,
                            v1::CompleteTaskResponse* response = nullptr);
  // The attempt failed. retryable and attempts left: requeued after a backoff of
  // retry_initial_backoff_ms × multiplier^attempt (capped); otherwise the job FAILS with
  // this error (message naming the layer, or the calibration shard with reason
  // CALIBRATION_FAILED; code kept) and its other tasks stop. After a cancellation this just ends the task. FAILED_PRECONDITION for a stale
  // token; NOT_FOUND for unknown ids.
  absl::Status FailTask(const v1::FailTaskRequest& request);

  // Housekeeping: expires leases (a retry with backoff, counted against max_attempts),
  // releases backoffs, finishes cancellations, starts due assemblies (in a background
  // thread, or synchronously when `run_assembly_inline`), deletes the staging objects of
  // finished jobs. The tick thread calls it every tick_interval_ms; tests call it after
  // moving a FakeClock.
  void Tick();

  // Point-in-time figures for the metrics gauges.
  JobManagerStats Stats();

  // Stops background work and wakes all waiters; later calls return UNAVAILABLE.
  // Idempotent.
  void Shutdown();

 private:
  JobManager() = default;
  class Impl;
  std::unique_ptr<Impl> impl_;
  friend class JobManagerTestPeer;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_JOB_MANAGER_H_

// StateStore: the coordinator's one interface to durable state (its leveldb `Env`), so that
// PostgreSQL can replace SQLite (SqliteStateStore, server/sqlite_state_store.h) without
// touching the JobManager. The JobManager keeps the working set in memory and writes every
// transition through Apply(), which must be atomic: a transition is persisted completely or
// not at all (one SQL transaction). Load() is called once, at startup, to resume.
//
// Records are plain structs around the qforge.v1 messages; stores may keep the messages as
// serialized blobs and index the few columns they need.
//
// Errors: UNAVAILABLE for transient failures (database busy or locked beyond its timeout, I/O
// errors), FAILED_PRECONDITION for a database written by a newer schema, DATA_LOSS for a row
// that cannot be decoded, INTERNAL otherwise. Messages name the table and row.
//
// Thread-safety: all methods of every implementation may be called concurrently.
#ifndef QFORGE_SERVER_STATE_STORE_H_
#define QFORGE_SERVER_STATE_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "qforge/v1/job_service.pb.h"
#include "qforge/v1/worker_service.pb.h"

namespace qforge {

struct JobRecord {
  // id, tenant, normalized spec, state, error, create/start/end times, request_id,
  // manifest_uri. `tasks` (counts) and eta_seconds are a snapshot written when the job
  // settles; before that the JobManager derives them from the task records.
  v1::Job job;
  // Terminal, no task running any more and the staging prefix deleted: the job's tasks
  // are final and need not be loaded.
  bool settled = false;
};

struct TaskRecord {
  std::string id;        // unique across jobs
  std::string job_id;
  int32_t ordinal = 0;   // position in the job's plan (FIFO order within a job)
  v1::TaskKind kind = v1::TASK_KIND_UNSPECIFIED;
  v1::TaskState state = v1::TASK_STATE_UNSPECIFIED;
  int32_t attempt = 0;   // the running attempt, or the next one when QUEUED (0-based)
  v1::LayerInput layer;  // QUANTIZE: the weight's byte range, shape, dtype, Hessian source
  // CALIBRATE: model, data (with its sha256) and the shard's sample range; REDUCE: the
  // shards' partial keys (filled in when it becomes QUEUED) and the cache entry it writes.
  v1::CalibrationWork calibration;
  // EVALUATE: reference and candidate models, data (with its sha256) and the shard's sample
  // range; EVAL_REDUCE: the shards' partial keys (filled in when it becomes QUEUED).
  v1::EvaluationWork evaluation;
  // What running it takes, estimated at plan time (QUANTIZE: job/spec.h; CALIBRATE:
  // job/calibration.h; REDUCE: two float64 [dim, dim]; EVALUATE: job/evaluation.h). memory_bytes:
  // host memory on a CPU worker (TaskMemoryBytes); gpu_memory_bytes: device memory on a
  // CUDA worker (GpuTaskMemoryBytes). gpu_memory_bytes is 0 in rows written before it was
  // stored; the JobManager recomputes those once when it loads them.
  uint64_t memory_bytes = 0;
  uint64_t gpu_memory_bytes = 0;
  std::vector<std::string> backends;  // a worker with any of these can run it; empty:
                                      // the coordinator runs it (ASSEMBLE)
  std::string worker_id;              // lease holder (RUNNING), else the last holder
  std::string lease_token;            // "" when not leased
  int64_t lease_expiry_ms = 0;
  int64_t not_before_ms = 0;          // retry backoff: not leased before this time
  int64_t create_ms = 0;
  int64_t queued_ms = 0;              // when it last became QUEUED
  int64_t start_ms = 0;               // start of the current or last attempt
  int64_t end_ms = 0;                 // when it reached a final state
  std::string staging_key;            // attempt-scoped key the current attempt writes
  std::string output_key;             // SUCCEEDED: the staged result
  std::string output_sha256;
  uint64_t output_bytes = 0;
  v1::TaskMetrics metrics;
  v1::ErrorInfo error;                // the last failure (code 0 when none)
};

struct WorkerRecord {
  std::string id;
  v1::RegisterWorkerRequest registration;  // hostname, backends, devices, version, budget
  int64_t registered_ms = 0;
  int64_t last_seen_ms = 0;
  int32_t tasks_completed = 0;
  int32_t tasks_failed = 0;
};

// Everything needed to resume.
struct StateSnapshot {
  std::vector<JobRecord> jobs;        // all jobs
  std::vector<TaskRecord> tasks;      // the tasks of jobs that are not settled
  std::vector<WorkerRecord> workers;  // all workers
  std::map<std::string, int64_t> last_event_sequence;  // job id -> highest event sequence
};

// One transition: rows to insert or replace (by id; events by (job_id, sequence), which
// must be new). Applied atomically.
struct StateMutation {
  std::vector<JobRecord> jobs;
  std::vector<TaskRecord> tasks;
  std::vector<WorkerRecord> workers;
  std::vector<v1::JobEvent> events;
  // Jobs to remove with their tasks and events (applied after the rows above).
  std::vector<std::string> deleted_job_ids;

  bool empty() const {
    return jobs.empty() && tasks.empty() && workers.empty() && events.empty() &&
           deleted_job_ids.empty();
  }
};

class StateStore {
 public:
  virtual ~StateStore() = default;

  // The whole persisted state (see StateSnapshot).
  virtual absl::StatusOr<StateSnapshot> Load() = 0;

  // Writes `mutation` in one transaction: all of it or, on error, none of it. An event
  // whose (job_id, sequence) already exists fails the whole mutation (INTERNAL).
  virtual absl::Status Apply(const StateMutation& mutation) = 0;

  // Events of `job_id` with sequence > after_sequence, ascending, at most max_events
  // (max_events <= 0: none). An unknown job has no events.
  virtual absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(std::string_view job_id,
                                                               int64_t after_sequence,
                                                               int max_events) = 0;

  // The tasks of `job_id` in plan order (ordinal), settled or not. An unknown job has none.
  virtual absl::StatusOr<std::vector<TaskRecord>> ReadTasks(std::string_view job_id) = 0;
};

// Forwards every call to another store; tests override one method to inject faults
// (leveldb's EnvWrapper). Owns the target.
class ForwardingStateStore : public StateStore {
 public:
  explicit ForwardingStateStore(std::unique_ptr<StateStore> target) : target_(std::move(target)) {}
  absl::StatusOr<StateSnapshot> Load() override { return target_->Load(); }
  absl::Status Apply(const StateMutation& mutation) override { return target_->Apply(mutation); }
  absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(std::string_view job_id,
                                                       int64_t after_sequence,
                                                       int max_events) override {
    return target_->ReadEvents(job_id, after_sequence, max_events);
  }
  absl::StatusOr<std::vector<TaskRecord>> ReadTasks(std::string_view job_id) override {
    return target_->ReadTasks(job_id);
  }
  StateStore* target() const { return target_.get(); }

 private:
  std::unique_ptr<StateStore> target_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_STATE_STORE_H_

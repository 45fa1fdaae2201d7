// Scheduler: the coordinator's scheduling decisions as pure functions of task and worker
// records and the time `now` (Unix ms, from the JobManager's Clock): which queued worker task
// (CALIBRATE, REDUCE, QUANTIZE) a worker gets next, when a lease expires, how long a failed attempt waits before it
// is retried, when a lease or a worker counts as gone, and whether a worker's call still
// holds its task's lease (fencing). It performs no I/O, takes no locks, starts no threads
// and keeps no state beyond its policy: the JobManager calls it under its own lock and
// applies the decisions in one StateStore transaction.
//
// Thread-safety: immutable after construction; all methods are const and may be called
// concurrently.
#ifndef QFORGE_SERVER_SCHEDULER_H_
#define QFORGE_SERVER_SCHEDULER_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "qforge/v1/job_service.pb.h"
#include "server/state_store.h"

namespace qforge {

// Timing rules (the JobManager fills them in from JobManagerOptions).
struct SchedulerPolicy {
  int64_t lease_duration_ms = 30'000;        // a lease not renewed for this long expires
  int64_t worker_lost_after_ms = 60'000;     // no call from a worker for longer: "lost"
  int64_t retry_initial_backoff_ms = 1'000;  // wait before the second attempt
  double retry_backoff_multiplier = 2.0;     // per further attempt; below 1 counts as 1
  int64_t retry_max_backoff_ms = 60'000;     // cap on any wait
};

// One job as the scheduler sees it. Pointers are borrowed for the duration of one call.
struct SchedulableJob {
  const v1::Job* job = nullptr;           // id, state, spec.priority, create time
  const std::vector<const TaskRecord*>* tasks = nullptr;  // the job's tasks in plan order
};

// What a worker's heartbeat, completion or failure is worth (fencing). A lease token is
// fresh for every attempt, so a token names the attempt it was issued to.
enum class LeaseCheck {
  kHeld,              // the task is RUNNING under this token: the call may proceed
  kAlreadySucceeded,  // the attempt with this token already completed the task
  kStale,             // anything else (expired and requeued, another attempt's, empty)
};

// What happens to a task whose attempt failed.
struct RetryDecision {
  bool retry = false;         // true: requeue for another attempt; false: it fails for good
  int64_t backoff_ms = 0;     // retry: the wait before the next attempt may be leased
  int64_t not_before_ms = 0;  // retry: now + backoff_ms
};

class Scheduler {
 public:
  explicit Scheduler(SchedulerPolicy policy) : policy_(policy) {}

  const SchedulerPolicy& policy() const { return policy_; }

  // The task `worker` should be leased next, or nullptr when none. Candidates are the
  // tasks of jobs in state QUEUED, CALIBRATING, QUANTIZING or EVALUATING, by spec.priority
  // (higher first), then fair share between tenants (at equal priority, the jobs of the
  // tenant with fewer tasks RUNNING on workers among `jobs` first, so a tenant with 5 tasks
  // is not queued behind another's 100), then create time (earlier first), then id; within
  // a job in plan order. `jobs` must include the jobs with running tasks for the share to
  // count them. A
  // candidate is a QUEUED task that runs on workers (RunsOnWorkers: CALIBRATE, REDUCE,
  // QUANTIZE, EVALUATE, EVAL_REDUCE) whose not_before_ms <= now (retry backoff) and that
  // FitsWorker. (Stages
  // wait as PENDING tasks: REDUCE until every CALIBRATE succeeded, QUANTIZE until REDUCE
  // did; EVALUATE until ASSEMBLE, EVAL_REDUCE until every EVALUATE succeeded.) The
  // returned pointer is one of `jobs`' task pointers.
  const TaskRecord* PickTask(const WorkerRecord& worker, const std::vector<SchedulableJob>& jobs,
                             int64_t now) const;

  // Whether `worker` can run `task`: one of the worker's backends is one of the task's, and
  // MemoryNeeded(worker, task) is within the worker's memory_budget_bytes (0 = no limit).
  static bool FitsWorker(const WorkerRecord& worker, const TaskRecord& task);

  // The estimate `worker`'s budget is compared with: a worker that offers "cuda" and not
  // "cpu" (and has a budget) states device memory, so the task's gpu_memory_bytes; any
  // other worker its host memory, so memory_bytes.
  static uint64_t MemoryNeeded(const WorkerRecord& worker, const TaskRecord& task);

  // When a lease granted or renewed at `now` expires.
  int64_t LeaseExpiry(int64_t now) const { return now + policy_.lease_duration_ms; }

  // A RUNNING task that runs on workers whose lease expiry is <= now (ASSEMBLE runs in the
  // coordinator and holds no worker lease).
  bool LeaseExpired(const TaskRecord& task, int64_t now) const;

  // Whether tasks of `kind` are leased to workers: CALIBRATE, REDUCE and QUANTIZE (ASSEMBLE
  // runs in the coordinator).
  static bool RunsOnWorkers(v1::TaskKind kind);

  // No call from `worker` for more than worker_lost_after_ms.
  bool WorkerLost(const WorkerRecord& worker, int64_t now) const;

  // The wait after failed attempt `attempt` (0-based): retry_initial_backoff_ms ×
  // multiplier^attempt, capped at retry_max_backoff_ms.
  int64_t RetryBackoffMs(int32_t attempt) const;

  // The attempt `task.attempt` failed at `now`: retried when `retryable` and attempts are
  // left (task.attempt + 1 < max_attempts; max_attempts below 1 counts as 1), after
  // RetryBackoffMs(task.attempt).
  RetryDecision DecideRetry(const TaskRecord& task, int max_attempts, bool retryable,
                            int64_t now) const;

  // Fencing: what a call carrying `lease_token` for `task` is worth (see LeaseCheck). An
  // empty token never holds a lease.
  static LeaseCheck CheckLease(const TaskRecord& task, std::string_view lease_token);

 private:
  SchedulerPolicy policy_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_SCHEDULER_H_

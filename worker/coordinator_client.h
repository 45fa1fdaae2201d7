// The worker's side of WorkerService (proto/qforge/v1/worker_service.proto).
//
// CoordinatorClient is a thin RPC wrapper: deadlines on every call, `authorization: Bearer`
// metadata, grpc::Status → absl::Status (same canonical codes), and CancelLongPolls() to
// abort an in-flight AcquireTask at shutdown.
//
// Worker is the process's loop: RegisterWorker, then AcquireTask long-polls; each task runs on
// its own thread (a TaskRunner, normally TaskExecutor::Execute) while this loop heartbeats
// every heartbeat_interval with the task's phase and progress. A heartbeat answering
// cancel=true cancels the task (no staged object is published) and reports FailTask
// (retryable=false, CANCELLED); lease_lost=true (or a heartbeat refused with NOT_FOUND /
// FAILED_PRECONDITION) drops it without a report. The result is reported with CompleteTask,
// or FailTask with IsRetryableError's classification; a completion asks for the next task in
// the same call (acquire_next, unless draining or at max_tasks) and runs it at once when the
// coordinator leased one, so a busy worker makes one call per task; a completion the
// coordinator refuses (output missing or not matching its digest) is reported with FailTask (reason
// COMPLETION_REFUSED, retryable), so the task runs again at once instead of after its lease
// expires (a stale lease refuses that too: the task is then lost). Reports are retried while the
// coordinator is unreachable (up to report_timeout_ms). When the coordinator is down the
// loop reconnects with exponential backoff and re-registers keeping its worker_id (the
// coordinator may have restarted). Shutdown() drains: the current task may finish within
// drain_ms, else it is released with FailTask(retryable=true) and Run returns.
//
// Thread-safety: CoordinatorClient's methods may be called concurrently. Worker::Run runs on
// one thread; Shutdown() may be called from any thread (e.g. a signal-handling thread).
#ifndef QFORGE_WORKER_COORDINATOR_CLIENT_H_
#define QFORGE_WORKER_COORDINATOR_CLIENT_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "qforge/v1/worker_service.grpc.pb.h"
#include "worker/task_executor.h"

namespace qforge {

// grpc::Status → absl::Status (the canonical codes are the same numbers).
absl::Status FromGrpcStatus(const grpc::Status& s);

// A channel to `target` ("host:port") with short reconnect backoff (100 ms .. 1 s), so a
// restarted coordinator is found again quickly. Plaintext unless `credentials` (TLS,
// common/tls.h ChannelCredentialsFor) are given.
std::shared_ptr<grpc::Channel> NewCoordinatorChannel(
    const std::string& target,
    std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

class CoordinatorClient {
 public:
  // `stub` talks to the coordinator; `token` (may be empty: no metadata) is sent as
  // `authorization: Bearer <token>`; unary calls get `rpc_timeout_ms` deadlines.
  CoordinatorClient(std::unique_ptr<v1::WorkerService::StubInterface> stub, std::string token,
                    int64_t rpc_timeout_ms = 10'000);

  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(const v1::RegisterWorkerRequest& r);
  // Long-poll; the deadline is request.wait_ms + `slack_ms`. Returns CANCELLED at once when
  // `*abort` (may be null) is already true, or when CancelLongPolls() runs during the call.
  // (A task the coordinator leased in a cancelled answer comes back when its lease expires.)
  absl::StatusOr<v1::AcquireTaskResponse> AcquireTask(const v1::AcquireTaskRequest& r,
                                                      int64_t slack_ms = 10'000,
                                                      const std::atomic<bool>* abort = nullptr);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& r);
  // With r.acquire_next, the answer may carry the worker's next task (next_task).
  absl::StatusOr<v1::CompleteTaskResponse> CompleteTask(const v1::CompleteTaskRequest& r);
  absl::Status FailTask(const v1::FailTaskRequest& r);

  // Cancels the AcquireTask calls in flight (they return CANCELLED). Other calls, and later
  // calls, are not affected. Set the `abort` flag first: a long-poll that starts concurrently
  // then sees it.
  void CancelLongPolls();

 private:
  // Deadline and metadata on `ctx`.
  void Prepare(grpc::ClientContext* ctx, int64_t timeout_ms) const;

  std::unique_ptr<v1::WorkerService::StubInterface> stub_;
  const std::string token_;
  const int64_t rpc_timeout_ms_;
  std::mutex mu_;
  std::set<grpc::ClientContext*> long_polls_ ABSL_GUARDED_BY(mu_);
};

// Runs one task: TaskExecutor::Execute in production, fakes in tests. Called on a task thread;
// `control` stays valid until it returns.
using TaskRunner = std::function<absl::StatusOr<TaskResult>(const v1::Task&, TaskControl*)>;

enum class TaskOutcome {
  kSucceeded,  // CompleteTask accepted
  kFailed,     // FailTask reported (retryable or not)
  kCancelled,  // the job was cancelled (heartbeat cancel=true)
  kLeaseLost,  // lease expired or fenced: dropped without a report (or its FailTask refused)
  kReleased,   // given back at shutdown (FailTask retryable)
};
const char* TaskOutcomeName(TaskOutcome o);  // "succeeded", "failed", ...

// Observers (metrics, the ready line). Called on the Run thread, no locks held.
class WorkerListener {
 public:
  virtual ~WorkerListener() = default;
  // After a successful RegisterWorker; `again` for re-registrations after an outage.
  virtual void OnRegistered(const std::string& worker_id, bool again) {}
  // The coordinator answered a RegisterWorker, AcquireTask or Heartbeat: it has seen this
  // worker alive now (what the coordinator's "lost" verdict is based on).
  virtual void OnCoordinatorContact() {}
  virtual void OnTaskStarted(const v1::Task& task) {}
  // `result` is set when the runner succeeded (even if the completion was then refused).
  virtual void OnTaskFinished(const v1::Task& task, TaskOutcome outcome, double seconds,
                              const TaskResult* result) {}
};

struct WorkerOptions {
  std::string coordinator;  // for messages only
  bool tls = false;         // the channel uses TLS (for the hint when it cannot connect)
  std::string hostname;
  std::string version;
  std::vector<std::string> backends = {"cpu"};
  std::vector<v1::DeviceInfo> devices;
  uint64_t memory_budget_bytes = 0;
  int64_t acquire_wait_ms = 20'000;         // long-poll budget (the server caps it)
  int max_tasks = 0;                        // Run returns after this many tasks; 0 = no limit
  int64_t drain_ms = 30'000;                // Shutdown(): grace for the running task
  int64_t reconnect_initial_ms = 200;       // backoff while the coordinator is unreachable
  int64_t reconnect_max_ms = 5'000;
  int64_t report_timeout_ms = 60'000;       // how long Complete/FailTask are retried
  int64_t default_heartbeat_interval_ms = 5'000;  // when the coordinator names none
  bool log = true;                          // progress lines on stderr
};

class Worker {
 public:
  // `client` and `listener` (may be null) are not owned and must outlive the worker.
  Worker(WorkerOptions options, CoordinatorClient* client, TaskRunner runner,
         WorkerListener* listener = nullptr);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Registers and serves tasks until Shutdown() or max_tasks. OK on a normal end (including
  // a shutdown before the first registration); UNAUTHENTICATED / PERMISSION_DENIED /
  // INVALID_ARGUMENT when the coordinator refuses this worker (retrying cannot help).
  absl::Status Run();

  // Starts a drain (idempotent): no new task is taken; the running one may finish within
  // drain_ms. `immediate` skips the grace (a second signal). Thread-safe, non-blocking.
  void Shutdown(bool immediate = false);

  std::string worker_id() const;
  int tasks_run() const { return tasks_run_.load(); }
  // True when Run returned while a released or cancelled task's solver was still running
  // (the solver cannot be interrupted): the process should exit without waiting for it.
  bool has_abandoned_work() const { return abandoned_.load(); }

 private:
  struct Running;

  // Registers (again) with backoff until it succeeds, a fatal error, or shutdown (returns
  // CANCELLED then).
  absl::Status Register(bool again);
  // Runs one leased task to its report. Never fails: outcomes go to the listener. With
  // `want_next` (and not stopping) the completion asks for the next task (acquire_next):
  // returns the task the coordinator leased with it, if any.
  std::optional<v1::Task> RunTask(const v1::Task& task, bool want_next);
  // Hands a leased task straight back (FailTask, retryable, WORKER_SHUTDOWN).
  void GiveBack(const v1::Task& task);
  enum class Verdict { kDone, kCancelled, kLeaseLost, kRelease };
  // Waits on the task until it finishes, or the job is cancelled, the lease is lost, or the
  // drain runs out; heartbeats meanwhile.
  Verdict Supervise(const v1::Task& task, Running& run);
  // Retries `call` while the coordinator is unreachable, up to report_timeout_ms.
  absl::Status Report(const std::function<absl::Status()>& call, std::string_view what);
  // Waits for the task thread after a cancel or lease loss; abandons it (detached) when a
  // shutdown comes first.
  void FinishOrAbandon(Running& run);
  // Sleeps up to `ms`; returns early on Shutdown() (or, with `immediate_only`, only on an
  // immediate one).
  void Sleep(int64_t ms, bool immediate_only);
  bool stopping() const { return stopping_.load(); }
  void Log(const std::string& line) const;

  const WorkerOptions options_;
  CoordinatorClient* const client_;
  const TaskRunner runner_;
  WorkerListener* const listener_;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // Shutdown() wakes sleepers
  std::string worker_id_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<Running> current_ ABSL_GUARDED_BY(mu_);
  int64_t heartbeat_interval_ms_ = 5'000;  // Run thread only
  std::atomic<bool> stopping_{false};
  std::atomic<bool> immediate_{false};
  std::atomic<int64_t> shutdown_at_ms_{0};  // steady clock, ms
  std::atomic<int> tasks_run_{0};
  std::atomic<bool> abandoned_{false};
};

}  // namespace qforge

#endif  // QFORGE_WORKER_COORDINATOR_CLIENT_H_

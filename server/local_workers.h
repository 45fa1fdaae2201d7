// LocalWorkerSupervisor: the embedded default's worker processes (`qforge-coordinator
// --local-workers N`). Starts N child processes with fork/exec, restarts one that exits with
// exponential backoff (initial_backoff, x2 per quick death, capped at max_backoff; a child
// that ran for healthy_after resets its backoff), and on Stop() sends SIGTERM, waits up to a
// grace period for the workers to finish or release their task, then SIGKILLs what is left.
// Children also get SIGTERM from the kernel if the coordinator dies (PR_SET_PDEATHSIG), so a
// kill -9 of the coordinator leaves no orphan workers. Children inherit stdout/stderr and
// start with every signal unblocked and default dispositions.
//
// Thread-safety: all methods are thread-safe; one background thread supervises.
#ifndef QFORGE_SERVER_LOCAL_WORKERS_H_
#define QFORGE_SERVER_LOCAL_WORKERS_H_

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace qforge {

struct LocalWorkerOptions {
  std::string binary;                      // absolute path of the worker executable
  std::vector<std::string> args;           // arguments after argv[0]
  std::vector<std::string> env;            // extra KEY=VALUE (override inherited ones)
  int count = 0;                           // number of workers
  std::chrono::milliseconds initial_backoff{1000};
  std::chrono::milliseconds max_backoff{60'000};
  std::chrono::milliseconds healthy_after{60'000};
  std::chrono::milliseconds poll_interval{100};  // how often exits are noticed
};

class LocalWorkerSupervisor {
 public:
  // Starts the workers. INVALID_ARGUMENT when count < 1 or the binary is not executable
  // (naming it); INTERNAL when fork fails.
  static absl::StatusOr<std::unique_ptr<LocalWorkerSupervisor>> Start(LocalWorkerOptions options);
  ~LocalWorkerSupervisor();  // Stop(10 s) when not stopped yet

  LocalWorkerSupervisor(const LocalWorkerSupervisor&) = delete;
  LocalWorkerSupervisor& operator=(const LocalWorkerSupervisor&) = delete;

  // Stops restarting, SIGTERMs every worker, waits up to `grace` for them to exit, SIGKILLs
  // the rest and reaps them all. Idempotent.
  void Stop(std::chrono::milliseconds grace);

  // Pids of the workers running now (0 for a slot waiting to be restarted).
  std::vector<pid_t> pids() const;
  // Restarts so far, over all slots.
  int restarts() const;

  // The worker executable for `--local-workers`: `override_path` when non-empty, else
  // qforge-worker next to this executable (/proc/self/exe), else ../worker/qforge-worker
  // relative to it (the build tree). NOT_FOUND naming the paths tried.
  static absl::StatusOr<std::string> FindWorkerBinary(std::string_view override_path);

 private:
  struct Slot {
    pid_t pid = 0;
    std::chrono::steady_clock::time_point started;
    std::chrono::steady_clock::time_point restart_at;
    std::chrono::milliseconds backoff{0};
  };

  explicit LocalWorkerSupervisor(LocalWorkerOptions options);
  pid_t Spawn();  // -1 on failure (logged)
  void Loop();    // the supervising thread: restarts, then TerminateAll() once stopping
  // SIGTERM, wait up to grace_, SIGKILL, reap. Called with mu_ held (released while waiting).
  void TerminateAll();

  const LocalWorkerOptions options_;
  std::vector<std::string> argv_storage_, envp_storage_;
  std::vector<char*> argv_, envp_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;  // guarded by mu_
  bool stopping_ = false;    // guarded by mu_
  std::chrono::milliseconds grace_{0};  // guarded by mu_
  int restarts_ = 0;         // guarded by mu_
  std::thread thread_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_LOCAL_WORKERS_H_

// WakeupBoard: callbacks that wait for something keyed (a job's next event, new work), each
// called exactly once: when its key is fired, when its deadline passes, or at Stop(). They
// run on the board's own thread, never on the thread that fires them, so a caller may fire
// while holding its locks and a callback may call back into that caller.
//
// The coordinator's streams and long-polls register here instead of blocking a thread each
// (server/rpc_job_service.h, server/rpc_worker_service.h): N open WatchJob streams cost N
// entries, not N threads, and a new event reaches every stream of its job at once.
//
// Thread-safety: all methods may be called concurrently. Callbacks run one at a time on the
// board's thread and must be short (they typically queue work on an executor).
#ifndef QFORGE_SERVER_WAKEUP_BOARD_H_
#define QFORGE_SERVER_WAKEUP_BOARD_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace qforge {

class WakeupBoard {
 public:
  WakeupBoard();
  ~WakeupBoard();  // Stop()
  WakeupBoard(const WakeupBoard&) = delete;
  WakeupBoard& operator=(const WakeupBoard&) = delete;

  // Registers `wake` under `key`, to run at the latest `max_wait` from now (0: at once).
  // After Stop() it runs on the calling thread.
  void Add(const std::string& key, absl::Duration max_wait, std::function<void()> wake);
  // Runs every callback registered under `key` (soon, on the board's thread).
  void Fire(const std::string& key);
  // Runs every registered callback.
  void FireAll();
  // Registered callbacks (for tests and metrics).
  size_t size() const;

  // Runs every registered callback and joins the thread. Idempotent.
  void Stop();

 private:
  struct Entry {
    std::string key;
    absl::Time deadline;
    std::function<void()> wake;
  };
  void Loop();

  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::multimap<std::string, uint64_t> by_key_ ABSL_GUARDED_BY(mu_);
  std::multimap<absl::Time, uint64_t> by_deadline_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void()>> due_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_WAKEUP_BOARD_H_

// LongPollExecutor: a small fixed pool of threads for the blocking parts of the coordinator's
// RPCs (reading model headers, hashing staged outputs, database reads), so that gRPC's
// callback threads are never held for long. Long-polls (AcquireTask, WatchJob) run one
// non-blocking attempt here at a time and, finding nothing, register with the JobManager
// (NotifyOnWork / NotifyOnEvents) to be queued again when something arrives: waiting
// callers hold no thread, and a pool of P threads serves any number of them in FIFO order.
//
// Shutdown is two-phase: BeginShutdown() makes draining() true, which long-polls check so
// that their next slice finishes the call instead of waiting; Stop() then runs what is still
// queued and joins the threads. A function submitted after Stop() runs inline on the caller's
// thread (so that a reactor is always finished).
//
// Thread-safety: all methods may be called concurrently, except that Stop() must not be
// called from one of the pool's own threads.
#ifndef QFORGE_SERVER_LONG_POLL_EXECUTOR_H_
#define QFORGE_SERVER_LONG_POLL_EXECUTOR_H_

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qforge {

class LongPollExecutor {
 public:
  // Starts `threads` (at least 1) threads.
  explicit LongPollExecutor(int threads);
  ~LongPollExecutor();  // Stop()
  LongPollExecutor(const LongPollExecutor&) = delete;
  LongPollExecutor& operator=(const LongPollExecutor&) = delete;

  // Queues `fn` (FIFO). After Stop() it runs inline instead.
  void Submit(std::function<void()> fn);

  void BeginShutdown() { draining_.store(true); }
  bool draining() const { return draining_.load(); }

  // BeginShutdown(), run every queued function, join the threads. Idempotent.
  void Stop();

  int threads() const { return static_cast<int>(threads_.size()); }

 private:
  void Loop();

  std::atomic<bool> draining_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;  // guarded by mu_
  bool stopping_ = false;                    // guarded by mu_
  bool stopped_ = false;                     // guarded by mu_: threads joined
  std::vector<std::thread> threads_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_LONG_POLL_EXECUTOR_H_

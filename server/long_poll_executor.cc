#include "server/long_poll_executor.h"

#include <utility>

namespace qforge {

LongPollExecutor::LongPollExecutor(int threads) {
  if (threads < 1) threads = 1;
  threads_.reserve(threads);
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Loop(); });
}

LongPollExecutor::~LongPollExecutor() { Stop(); }

void LongPollExecutor::Submit(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!stopped_) {
      queue_.push_back(std::move(fn));
      cv_.notify_one();
      return;
    }
  }
  fn();  // the pool is gone: run inline (only quick, draining work is submitted by then)
}

void LongPollExecutor::Loop() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    fn();
  }
}

void LongPollExecutor::Stop() {
  BeginShutdown();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      // Another caller is stopping or has stopped; threads are joined by that caller.
      return;
    }
    stopping_ = true;
    cv_.notify_all();
  }
  for (std::thread& t : threads_) t.join();
  std::deque<std::function<void()>> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
    rest.swap(queue_);
  }
  for (auto& fn : rest) fn();  // submitted while the threads were exiting
}

}  // namespace qforge

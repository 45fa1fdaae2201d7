#include "server/wakeup_board.h"

#include <utility>

namespace qforge {

WakeupBoard::WakeupBoard() : thread_([this] { Loop(); }) {}

WakeupBoard::~WakeupBoard() { Stop(); }

void WakeupBoard::Add(const std::string& key, absl::Duration max_wait,
                      std::function<void()> wake) {
  {
    absl::MutexLock lock(&mu_);
    if (!stopping_) {
      const uint64_t id = next_id_++;
      const absl::Time deadline = absl::Now() + std::max(max_wait, absl::ZeroDuration());
      by_key_.emplace(key, id);
      by_deadline_.emplace(deadline, id);
      entries_.emplace(id, Entry{key, deadline, std::move(wake)});
      cv_.Signal();
      return;
    }
  }
  wake();  // stopped: nobody else would run it
}

void WakeupBoard::Fire(const std::string& key) {
  absl::MutexLock lock(&mu_);
  auto [begin, end] = by_key_.equal_range(key);
  if (begin == end) return;
  for (auto it = begin; it != end; ++it) {
    auto e = entries_.find(it->second);
    auto [d_begin, d_end] = by_deadline_.equal_range(e->second.deadline);
    for (auto d = d_begin; d != d_end; ++d) {
      if (d->second == it->second) {
        by_deadline_.erase(d);
        break;
      }
    }
    due_.push_back(std::move(e->second.wake));
    entries_.erase(e);
  }
  by_key_.erase(begin, end);
  cv_.Signal();
}

void WakeupBoard::FireAll() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, e] : entries_) due_.push_back(std::move(e.wake));
  entries_.clear();
  by_key_.clear();
  by_deadline_.clear();
  cv_.Signal();
}

size_t WakeupBoard::size() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

void WakeupBoard::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopped_) return;
    stopping_ = true;
    for (auto& [id, e] : entries_) due_.push_back(std::move(e.wake));
    entries_.clear();
    by_key_.clear();
    by_deadline_.clear();
    cv_.Signal();
  }
  if (thread_.joinable()) thread_.join();
  absl::MutexLock lock(&mu_);
  stopped_ = true;
}

void WakeupBoard::Loop() {
  for (;;) {
    std::vector<std::function<void()>> run;
    {
      absl::MutexLock lock(&mu_);
      for (;;) {
        const absl::Time now = absl::Now();
        // Expired entries are due.
        while (!by_deadline_.empty() && by_deadline_.begin()->first <= now) {
          const uint64_t id = by_deadline_.begin()->second;
          by_deadline_.erase(by_deadline_.begin());
          auto e = entries_.find(id);
          auto [k_begin, k_end] = by_key_.equal_range(e->second.key);
          for (auto k = k_begin; k != k_end; ++k) {
            if (k->second == id) {
              by_key_.erase(k);
              break;
            }
          }
          due_.push_back(std::move(e->second.wake));
          entries_.erase(e);
        }
        if (!due_.empty() || (stopping_ && entries_.empty())) break;
        if (by_deadline_.empty()) {
          cv_.Wait(&mu_);
        } else {
          cv_.WaitWithDeadline(&mu_, by_deadline_.begin()->first);
        }
      }
      run.swap(due_);
      if (run.empty() && stopping_) return;
    }
    for (auto& wake : run) wake();
  }
}

}  // namespace qforge

// ByteBudget: a counting semaphore over bytes. Bounds the memory that concurrent work of
// unknown size may take at once (issue 18 defect 7: eight concurrent submits of a model
// with a 100 MiB safetensors header took the coordinator to 1.9 GB): each piece of work
// Acquires its size first and releases it when done.
//
// A request larger than the capacity is granted the whole capacity (it runs alone) rather
// than refused; callers that want a hard size limit check it themselves. Grants are
// first-come-first-served: a large request waiting at the head is not overtaken by small
// ones (no starvation).
//
// Thread-safety: all methods are thread-safe. A Grant must not outlive its ByteBudget.
#ifndef QFORGE_COMMON_BYTE_BUDGET_H_
#define QFORGE_COMMON_BYTE_BUDGET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace qforge {

class ByteBudget {
 public:
  // Bytes held until destroyed (or moved from).
  class Grant {
   public:
    Grant() = default;
    Grant(Grant&& o) noexcept : budget_(o.budget_), bytes_(o.bytes_) { o.budget_ = nullptr; }
    Grant& operator=(Grant&& o) noexcept;
    Grant(const Grant&) = delete;
    Grant& operator=(const Grant&) = delete;
    ~Grant() { Release(); }
    uint64_t bytes() const { return bytes_; }
    void Release();

   private:
    friend class ByteBudget;
    Grant(ByteBudget* budget, uint64_t bytes) : budget_(budget), bytes_(bytes) {}
    ByteBudget* budget_ = nullptr;
    uint64_t bytes_ = 0;
  };

  // `capacity` bytes (0 means no limit: every Acquire is granted at once). `what` names
  // the budget in errors ("safetensors header parsing").
  ByteBudget(uint64_t capacity, std::string what);
  ByteBudget(const ByteBudget&) = delete;
  ByteBudget& operator=(const ByteBudget&) = delete;

  // Waits until min(bytes, capacity) bytes are free and no earlier request waits, then
  // holds them. RESOURCE_EXHAUSTED naming the budget when `timeout` passes first.
  absl::StatusOr<Grant> Acquire(uint64_t bytes, absl::Duration timeout);

  uint64_t capacity() const { return capacity_; }
  uint64_t in_use() const ABSL_LOCKS_EXCLUDED(mu_);
  // Requests waiting now (tests).
  int waiting() const ABSL_LOCKS_EXCLUDED(mu_);
  // The largest in_use() seen (tests and metrics).
  uint64_t peak_in_use() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Release(uint64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Advances serving_ past tickets whose waiters timed out.
  void SkipAbandoned() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t capacity_;
  const std::string what_;
  mutable absl::Mutex mu_;
  uint64_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t peak_ ABSL_GUARDED_BY(mu_) = 0;
  int waiting_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 0;  // FIFO order of the waiters
  uint64_t serving_ ABSL_GUARDED_BY(mu_) = 0;      // the ticket that may be granted next
  std::vector<uint64_t> abandoned_ ABSL_GUARDED_BY(mu_);  // tickets of timed-out waiters
};

}  // namespace qforge

#endif  // QFORGE_COMMON_BYTE_BUDGET_H_

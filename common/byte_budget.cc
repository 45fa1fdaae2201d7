#include "common/byte_budget.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace qforge {

ByteBudget::Grant& ByteBudget::Grant::operator=(Grant&& o) noexcept {
  if (this != &o) {
    Release();
    budget_ = o.budget_;
    bytes_ = o.bytes_;
    o.budget_ = nullptr;
  }
  return *this;
}

void ByteBudget::Grant::Release() {
  if (budget_ != nullptr) budget_->Release(bytes_);
  budget_ = nullptr;
}

ByteBudget::ByteBudget(uint64_t capacity, std::string what)
    : capacity_(capacity), what_(std::move(what)) {}

absl::StatusOr<ByteBudget::Grant> ByteBudget::Acquire(uint64_t bytes, absl::Duration timeout) {
  if (capacity_ == 0) return Grant(nullptr, 0);
  const uint64_t want = std::min(bytes, capacity_);
  const absl::Time deadline = absl::Now() + timeout;
  absl::MutexLock lock(&mu_);
  const uint64_t ticket = next_ticket_++;
  auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return serving_ == ticket && in_use_ + want <= capacity_;
  };
  ++waiting_;
  const bool granted = mu_.AwaitWithDeadline(absl::Condition(&ready), deadline);
  --waiting_;
  if (!granted) {
    // Give up our turn: when it is ours, pass it on; otherwise those ahead will skip it.
    if (serving_ == ticket) {
      ++serving_;
    } else {
      abandoned_.push_back(ticket);
    }
    SkipAbandoned();
    return absl::ResourceExhaustedError(absl::StrCat(
        what_, ": ", bytes, " bytes could not be reserved within ",
        absl::FormatDuration(timeout), " (", in_use_, " of ", capacity_,
        " bytes in use by concurrent requests); retry later"));
  }
  in_use_ += want;
  peak_ = std::max(peak_, in_use_);
  ++serving_;
  SkipAbandoned();
  return Grant(this, want);
}

void ByteBudget::SkipAbandoned() {
  for (bool again = true; again;) {
    again = false;
    auto it = std::find(abandoned_.begin(), abandoned_.end(), serving_);
    if (it != abandoned_.end()) {
      abandoned_.erase(it);
      ++serving_;
      again = true;
    }
  }
}

void ByteBudget::Release(uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  in_use_ -= bytes;
}

uint64_t ByteBudget::in_use() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

int ByteBudget::waiting() const {
  absl::MutexLock lock(&mu_);
  return waiting_;
}

uint64_t ByteBudget::peak_in_use() const {
  absl::MutexLock lock(&mu_);
  return peak_;
}

}  // namespace qforge

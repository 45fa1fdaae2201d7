// qforge::Status and qforge::StatusOr: the status types of the dependency-free floors (base/,
// quant/ and the CUDA backends).
//
// The solvers must build with only a C++ compiler, the CUDA toolkit and an optional BLAS, so
// they cannot depend on abseil. These two small types mirror absl::Status / absl::StatusOr: the
// codes are absl's canonical codes with the same numeric values (so they map 1:1 to gRPC
// codes), and the member names match, so QF_RETURN_IF_ERROR / QF_ASSIGN_OR_RETURN
// (base/status_macros.h) work on both. common/status_bridge.h converts to absl at the
// module boundary. Thread-safety: value types, no shared state.
#ifndef QFORGE_BASE_STATUS_H_
#define QFORGE_BASE_STATUS_H_

#include <cassert>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>

#include "base/status_macros.h"

namespace qforge {

// Same values as absl::StatusCode.
enum class StatusCode : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
  kUnauthenticated = 16,
};

const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message)
      : code_(code), message_(code == StatusCode::kOk ? std::string() : std::move(message)) {}

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "INVALID_ARGUMENT: message", or "OK".
  std::string ToString() const;
  // Lets generic code (QF_RETURN_IF_ERROR on StatusOr-like values) call .status() on both.
  const Status& status() const& { return *this; }
  Status status() && { return std::move(*this); }

  friend bool operator==(const Status& a, const Status& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }
  friend bool operator!=(const Status& a, const Status& b) { return !(a == b); }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status OkStatus() { return Status(); }
inline Status InvalidArgumentError(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status FailedPreconditionError(std::string m) { return {StatusCode::kFailedPrecondition, std::move(m)}; }
inline Status InternalError(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status OutOfRangeError(std::string m) { return {StatusCode::kOutOfRange, std::move(m)}; }
inline Status ResourceExhaustedError(std::string m) { return {StatusCode::kResourceExhausted, std::move(m)}; }
inline Status UnimplementedError(std::string m) { return {StatusCode::kUnimplemented, std::move(m)}; }
inline Status UnavailableError(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status CancelledError(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }
inline Status NotFoundError(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status DataLossError(std::string m) { return {StatusCode::kDataLoss, std::move(m)}; }

// Holds either a value or a non-OK Status. Constructing from an OK Status is a programming
// error; it is turned into an INTERNAL error rather than a crash.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(const Status& status) : status_(status) { CheckNotOk(); }  // NOLINT
  StatusOr(Status&& status) : status_(std::move(status)) { CheckNotOk(); }  // NOLINT
  StatusOr(const T& value) : value_(value) {}  // NOLINT
  StatusOr(T&& value) : value_(std::move(value)) {}  // NOLINT
  template <typename U,
            typename = std::enable_if_t<std::is_constructible_v<T, U&&> &&
                                        !std::is_same_v<std::decay_t<U>, StatusOr> &&
                                        !std::is_same_v<std::decay_t<U>, Status> &&
                                        !std::is_same_v<std::decay_t<U>, T>>>
  StatusOr(U&& value) : value_(T(std::forward<U>(value))) {}  // NOLINT

  bool ok() const { return value_.has_value(); }
  const Status& status() const& { return status_; }
  Status status() && { return std::move(status_); }

  const T& value() const& { return Get(); }
  T& value() & { return Get(); }
  T&& value() && { return std::move(Get()); }
  const T& operator*() const& { return Get(); }
  T& operator*() & { return Get(); }
  T&& operator*() && { return std::move(Get()); }
  const T* operator->() const { return &Get(); }
  T* operator->() { return &Get(); }

 private:
  void CheckNotOk() {
    if (status_.ok()) {
      (void)(status_ = Status(StatusCode::kInternal, "StatusOr constructed from an OK status"));
    }
  }
  T& Get() {
    if (!value_) std::abort();  // Reading the value of an error is a programming error.
    return *value_;
  }
  const T& Get() const {
    if (!value_) std::abort();
    return *value_;
  }

  Status status_;
  std::optional<T> value_;
};

}  // namespace qforge

#endif  // QFORGE_BASE_STATUS_H_

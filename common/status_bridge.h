// The one place where the quantization core's Status (base/status.h, no abseil)
// becomes an absl::Status. The numeric codes are identical by construction.
#ifndef QFORGE_COMMON_STATUS_BRIDGE_H_
#define QFORGE_COMMON_STATUS_BRIDGE_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "base/status.h"

namespace qforge {

inline absl::Status ToAbslStatus(const qforge::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.code())), s.message());
}

template <typename T>
absl::StatusOr<T> ToAbslStatusOr(qforge::StatusOr<T>&& s) {
  if (!s.ok()) return ToAbslStatus(s.status());
  return *std::move(s);
}

}  // namespace qforge

#endif  // QFORGE_COMMON_STATUS_BRIDGE_H_

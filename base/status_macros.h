// Early-return macros for absl::Status / absl::StatusOr and for the dependency-free
// qforge::Status / StatusOr of base/status.h (both expose ok(), status(),
// operator* and value()). Debian's abseil (20220623) has no ABSL_RETURN_IF_ERROR.
// Header-only, no dependencies, usable from any module.
#ifndef QFORGE_BASE_STATUS_MACROS_H_
#define QFORGE_BASE_STATUS_MACROS_H_

#include <utility>

#define QF_STATUS_CONCAT_INNER_(a, b) a##b
#define QF_STATUS_CONCAT_(a, b) QF_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (a Status); returns it from the enclosing function if it is not OK.
#define QF_RETURN_IF_ERROR(expr)                          \
  do {                                                    \
    auto qf_status_macro_value_ = (expr);                 \
    if (!qf_status_macro_value_.ok()) {                   \
      return qf_status_macro_value_;                      \
    }                                                     \
  } while (false)

// `QF_ASSIGN_OR_RETURN(auto x, MakeX());` evaluates a StatusOr; on error returns its status,
// otherwise moves the value into `lhs`.
#define QF_ASSIGN_OR_RETURN(lhs, rexpr) \
  QF_ASSIGN_OR_RETURN_IMPL_(QF_STATUS_CONCAT_(qf_statusor_, __LINE__), lhs, rexpr)

#define QF_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                              \
  if (!statusor.ok()) {                                 \
    return std::move(statusor).status();                \
  }                                                     \
  lhs = *std::move(statusor)

#endif  // QFORGE_BASE_STATUS_MACROS_H_

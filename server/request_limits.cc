#include "server/request_limits.h"

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace qforge {
namespace {

absl::Status FieldError(std::string_view field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": ", what));
}

// At most `max` bytes (empty allowed unless `required`).
absl::Status CheckLength(std::string_view field, std::string_view value, size_t max,
                         bool required = false) {
  if (required && value.empty()) return FieldError(field, "required");
  if (value.size() > max) {
    return FieldError(field, absl::StrCat(value.size(), " bytes is longer than the limit of ",
                                          max));
  }
  return absl::OkStatus();
}

absl::Status CheckCount(std::string_view field, int count, int max) {
  if (count > max) {
    return FieldError(field, absl::StrCat(count, " entries; at most ", max, " are accepted"));
  }
  return absl::OkStatus();
}

// 1..max characters of [A-Za-z0-9._-].
bool IdChars(std::string_view id, size_t max) {
  if (id.empty() || id.size() > max) return false;
  for (char c : id) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return true;
}

absl::Status CheckFinite(std::string_view field, double v) {
  if (!std::isfinite(v)) return FieldError(field, absl::StrCat(v, " is not a finite number"));
  return absl::OkStatus();
}

// The ids and lease token every call about a leased task carries.
absl::Status CheckTaskCall(std::string_view worker_id, std::string_view task_id,
                           std::string_view lease_token) {
  QF_RETURN_IF_ERROR(CheckLength("worker_id", worker_id, kMaxIdBytes));
  QF_RETURN_IF_ERROR(CheckLength("task_id", task_id, kMaxIdBytes, true));
  return CheckLength("lease_token", lease_token, kMaxShortStringBytes);
}

}  // namespace

absl::Status CheckJobIdField(std::string_view field, std::string_view id) {
  return CheckLength(field, id, kMaxIdBytes, true);
}

absl::Status CheckRequest(const v1::SubmitJobRequest& r) {
  if (!r.request_id().empty() && !IdChars(r.request_id(), kMaxIdBytes)) {
    return FieldError("request_id", absl::StrCat("at most ", kMaxIdBytes,
                                                 " characters of [A-Za-z0-9._-] (a UUID is a "
                                                 "good choice)"));
  }
  return absl::OkStatus();
}

absl::Status CheckRequest(const v1::ListLayersRequest& r) {
  QF_RETURN_IF_ERROR(CheckJobIdField("id", r.id()));
  if (r.page_size() < 0) {
    return FieldError("page_size", absl::StrCat(r.page_size(), " is negative"));
  }
  return CheckLength("page_token", r.page_token(), kMaxPageTokenBytes);
}

absl::Status CheckRequest(const v1::ListJobsRequest& r) {
  if (r.page_size() < 0) {
    return FieldError("page_size", absl::StrCat(r.page_size(), " is negative"));
  }
  QF_RETURN_IF_ERROR(CheckLength("page_token", r.page_token(), kMaxPageTokenBytes));
  QF_RETURN_IF_ERROR(CheckCount("states", r.states_size(), kMaxListStates));
  for (int i = 0; i < r.states_size(); ++i) {
    const int v = r.states(i);
    if (!v1::JobState_IsValid(v) || v == v1::JOB_STATE_UNSPECIFIED) {
      return FieldError(absl::StrCat("states[", i, "]"),
                        absl::StrCat(v, " is not a JobState (",
                                     static_cast<int>(v1::JOB_STATE_QUEUED), "..",
                                     static_cast<int>(v1::JobState_MAX),
                                     ", e.g. JOB_STATE_QUEUED = 1)"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckRequest(const v1::RegisterWorkerRequest& r) {
  QF_RETURN_IF_ERROR(CheckLength("hostname", r.hostname(), kMaxHostnameBytes));
  QF_RETURN_IF_ERROR(CheckLength("version", r.version(), kMaxShortStringBytes));
  if (!r.worker_id().empty() && !IdChars(r.worker_id(), kMaxWorkerIdBytes)) {
    return FieldError("worker_id", absl::StrCat("at most ", kMaxWorkerIdBytes,
                                                " characters of [A-Za-z0-9._-] (or empty to get "
                                                "a new id)"));
  }
  if (r.backends().empty()) {
    return FieldError("backends", "at least one is required (\"cpu\", \"cuda\")");
  }
  QF_RETURN_IF_ERROR(CheckCount("backends", r.backends_size(), kMaxBackends));
  for (int i = 0; i < r.backends_size(); ++i) {
    if (!IdChars(r.backends(i), kMaxBackendBytes)) {
      return FieldError(absl::StrCat("backends[", i, "]"),
                        absl::StrCat("not a backend name (at most ", kMaxBackendBytes,
                                     " characters of [A-Za-z0-9._-], e.g. \"cpu\")"));
    }
  }
  QF_RETURN_IF_ERROR(CheckCount("devices", r.devices_size(), kMaxDevices));
  for (int i = 0; i < r.devices_size(); ++i) {
    const v1::DeviceInfo& d = r.devices(i);
    QF_RETURN_IF_ERROR(
        CheckLength(absl::StrCat("devices[", i, "].name"), d.name(), kMaxDeviceNameBytes));
    QF_RETURN_IF_ERROR(
        CheckLength(absl::StrCat("devices[", i, "].kind"), d.kind(), kMaxShortStringBytes));
  }
  return absl::OkStatus();
}

absl::Status CheckRequest(const v1::AcquireTaskRequest& r) {
  return CheckLength("worker_id", r.worker_id(), kMaxIdBytes);
}

absl::Status CheckRequest(const v1::HeartbeatRequest& r) {
  QF_RETURN_IF_ERROR(CheckTaskCall(r.worker_id(), r.task_id(), r.lease_token()));
  const double p = r.progress();
  if (!std::isfinite(p) || p < 0 || p > 1) {
    return FieldError("progress", absl::StrCat(p, " is not a fraction within [0, 1]"));
  }
  return CheckLength("phase", r.phase(), kMaxShortStringBytes);
}

absl::Status CheckRequest(const v1::CompleteTaskRequest& r) {
  QF_RETURN_IF_ERROR(CheckTaskCall(r.worker_id(), r.task_id(), r.lease_token()));
  QF_RETURN_IF_ERROR(CheckLength("output_key", r.output_key(), kMaxKeyBytes));
  QF_RETURN_IF_ERROR(CheckLength("output_sha256", r.output_sha256(), kMaxShortStringBytes));
  const v1::TaskMetrics& m = r.metrics();
  QF_RETURN_IF_ERROR(CheckLength("metrics.backend", m.backend(), kMaxShortStringBytes));
  const std::pair<const char*, double> numbers[] = {
      {"metrics.read_seconds", m.read_seconds()},
      {"metrics.solve_seconds", m.solve_seconds()},
      {"metrics.write_seconds", m.write_seconds()},
      {"metrics.proxy_loss", m.proxy_loss()},
      {"metrics.output_error", m.output_error()},
      {"metrics.weight_energy", m.weight_energy()},
      {"metrics.relative_error", m.relative_error()},
      {"metrics.damp_percent_used", m.damp_percent_used()},
      {"metrics.bits_per_weight", m.bits_per_weight()},
  };
  for (const auto& [field, v] : numbers) QF_RETURN_IF_ERROR(CheckFinite(field, v));
  return absl::OkStatus();
}

absl::Status CheckRequest(const v1::FailTaskRequest& r) {
  QF_RETURN_IF_ERROR(CheckTaskCall(r.worker_id(), r.task_id(), r.lease_token()));
  const int code = r.error().code();
  if (code < 0 || code > static_cast<int>(absl::StatusCode::kUnauthenticated)) {
    return FieldError("error.code",
                      absl::StrCat(code, " is not a canonical status code (0..16, "
                                         "google.rpc.Code)"));
  }
  return CheckLength("error.reason", r.error().reason(), kMaxShortStringBytes);
}

std::string TruncateUtf8(std::string_view s, size_t max_bytes) {
  if (s.size() <= max_bytes) return std::string(s);
  size_t cut = max_bytes;
  // Back up over continuation bytes (10xxxxxx) so no character is split.
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  return absl::StrCat(std::string(s.substr(0, cut)), " [truncated, ", s.size(), " bytes]");
}

v1::ErrorInfo NormalizeWorkerError(const v1::ErrorInfo& error) {
  v1::ErrorInfo out = error;
  if (out.code() == 0) out.set_code(static_cast<int32_t>(absl::StatusCode::kUnknown));
  if (out.message().empty()) {
    out.set_message("the worker gave no message");
  } else {
    out.set_message(TruncateUtf8(error.message(), kMaxStoredErrorMessageBytes));
  }
  out.set_subject(TruncateUtf8(error.subject(), kMaxStoredErrorSubjectBytes));
  return out;
}

}  // namespace qforge

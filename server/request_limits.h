// Request limits: the one place per qforge.v1 request message where every string and
// repeated field is checked against its cap (and enums and numbers against their ranges)
// before the JobManager acts on it. The JobSpec inside a SubmitJobRequest is validated by
// ConvertJobSpec (job/spec.h: URIs and label values at most kMaxSpecStringBytes, at most
// kMaxSpecPatterns include / exclude patterns, kMaxSpecLabels labels); the rest of every
// request is checked here. docs/operations.md "Limits" lists every cap.
//
// Every error is INVALID_ARGUMENT whose message starts with the field's name and says the
// cap, e.g. "phase: 300 bytes is longer than the limit of 64" or "states[0]: 99 is not a
// JobState (1..9)". What a worker reports about a failure is stored, so it is normalized
// rather than refused where it can be: NormalizeWorkerError truncates the message and the
// subject; only a code that is no canonical status code is refused.
//
// Thread-safety: pure functions.
#ifndef QFORGE_SERVER_REQUEST_LIMITS_H_
#define QFORGE_SERVER_REQUEST_LIMITS_H_

#include <cstddef>
#include <string_view>

#include "absl/status/status.h"
#include "qforge/v1/job_service.pb.h"
#include "qforge/v1/worker_service.pb.h"

namespace qforge {

inline constexpr size_t kMaxIdBytes = 128;            // job, task, worker ids, request_id
inline constexpr size_t kMaxPageTokenBytes = 512;
inline constexpr int kMaxListStates = 16;             // ListJobsRequest.states
inline constexpr size_t kMaxHostnameBytes = 255;
inline constexpr size_t kMaxShortStringBytes = 64;    // backend, phase, version, lease token,
                                                      // reason, device kind, metrics.backend
inline constexpr size_t kMaxWorkerIdBytes = 64;       // RegisterWorker's worker_id
inline constexpr size_t kMaxBackendBytes = 32;
inline constexpr int kMaxBackends = 8;
inline constexpr int kMaxDevices = 64;
inline constexpr size_t kMaxDeviceNameBytes = 256;
inline constexpr size_t kMaxKeyBytes = 4096;          // output_key
// FailTask's error as stored: longer messages and subjects are cut at these sizes (on a
// UTF-8 character boundary) and marked "[truncated, N bytes]".
inline constexpr size_t kMaxStoredErrorMessageBytes = 4096;
inline constexpr size_t kMaxStoredErrorSubjectBytes = 512;

// A job id of GetJob / CancelJob / WatchJob / GetJobReport: non-empty, at most kMaxIdBytes.
// `field` names it in the message ("id").
absl::Status CheckJobIdField(std::string_view field, std::string_view id);

// SubmitJobRequest: request_id (empty, or at most kMaxIdBytes of [A-Za-z0-9._-]). The spec
// is ConvertJobSpec's.
absl::Status CheckRequest(const v1::SubmitJobRequest& r);
// ListJobsRequest: page_size not negative; page_token at most kMaxPageTokenBytes; at most kMaxListStates states,
// each a JobState other than UNSPECIFIED ("states[0]: 99 is not a JobState ...").
absl::Status CheckRequest(const v1::ListJobsRequest& r);
// id, page_size (not negative) and page_token (length).
absl::Status CheckRequest(const v1::ListLayersRequest& r);
// RegisterWorkerRequest: hostname, version, 1..kMaxBackends backends (names of
// [A-Za-z0-9._-]), devices and their strings, worker_id (empty, or [A-Za-z0-9._-]).
absl::Status CheckRequest(const v1::RegisterWorkerRequest& r);
// AcquireTaskRequest: worker_id.
absl::Status CheckRequest(const v1::AcquireTaskRequest& r);
// HeartbeatRequest: the ids and token; progress finite and within [0, 1]; phase.
absl::Status CheckRequest(const v1::HeartbeatRequest& r);
// CompleteTaskRequest: the ids, token, output_key, output_sha256 (length only: the
// JobManager checks the digest's form), metrics.backend; metrics numbers finite.
absl::Status CheckRequest(const v1::CompleteTaskRequest& r);
// FailTaskRequest: the ids and token; error.code a canonical code (0..16); error.reason at
// most kMaxShortStringBytes. Message and subject: see NormalizeWorkerError.
absl::Status CheckRequest(const v1::FailTaskRequest& r);

// The error a worker reported, as stored: message and subject truncated to their caps;
// an empty message and code 0 replaced ("the worker gave no message", UNKNOWN). Call after
// CheckRequest accepted the request.
v1::ErrorInfo NormalizeWorkerError(const v1::ErrorInfo& error);

// `s` cut to at most `max_bytes` bytes on a UTF-8 character boundary, with
// " [truncated, N bytes]" appended when cut (the result may then exceed max_bytes by that
// suffix, at most 40 bytes).
std::string TruncateUtf8(std::string_view s, size_t max_bytes);

}  // namespace qforge

#endif  // QFORGE_SERVER_REQUEST_LIMITS_H_

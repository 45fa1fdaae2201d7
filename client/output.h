// Output of the `qforge` CLI: exit codes, tables, JSON (the API resource, printed with
// protobuf's JsonPrintOptions), the live progress line of `watch`, and per-event lines.
// Pure functions of their arguments (the current time is passed in), so tests pin them.
//
// Exit codes (documented in `qforge --help` and docs/):
//   0 success · 1 job failed (or another error) · 2 usage error · 3 server unavailable
//   4 not found · 5 job cancelled · 6 unauthenticated / permission denied
//   7 invalid argument from the server (its message is printed) · 130 interrupted (Ctrl-C)
#ifndef QFORGE_CLIENT_OUTPUT_H_
#define QFORGE_CLIENT_OUTPUT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "client/connection.h"
#include "google/protobuf/message.h"
#include "qforge/v1/job_service.pb.h"

namespace qforge::cli {

enum ExitCode : int {
  kExitOk = 0,
  kExitJobFailed = 1,
  kExitUsage = 2,
  kExitUnavailable = 3,
  kExitNotFound = 4,
  kExitCancelled = 5,
  kExitAuth = 6,
  kExitInvalidArgument = 7,
  kExitInterrupted = 130,
};

// The exit code for an RPC that failed with `code`: UNAVAILABLE/DEADLINE_EXCEEDED 3,
// NOT_FOUND 4, UNAUTHENTICATED/PERMISSION_DENIED 6, INVALID_ARGUMENT/FAILED_PRECONDITION/
// OUT_OF_RANGE/ALREADY_EXISTS 7, OK 0, anything else 1.
int ExitCodeForStatus(grpc::StatusCode code);
// The exit code for a job the command waited on: SUCCEEDED 0, FAILED 1, CANCELLED 5, and 0
// for a job still running (`get` of a running job succeeds).
int ExitCodeForJob(v1::JobState state);

// Writes "qforge: <what>: <server message>" (plus a hint for UNAVAILABLE naming the endpoint
// and, where the message suggests it, about TLS: common/tls.h TlsHint) to stderr and returns
// ExitCodeForStatus.
int ReportRpcError(const grpc::Status& s, std::string_view what, const ClientConfig& config);

enum class OutputFormat { kTable, kJson };

// The API resource as JSON (lowerCamelCase names, enums by name, zero values included),
// followed by a newline.
std::string ToJson(const google::protobuf::Message& m);
// The same on one line (JSON Lines: `qforge events -o json`).
std::string ToJsonLine(const google::protobuf::Message& m);

bool IsTerminal(v1::JobState s);
// "QUANTIZING" (the enum name without JOB_STATE_); "UNKNOWN" for unspecified.
std::string StateName(v1::JobState s);
std::string TaskStateName(v1::TaskState s);
// 65 → "1m05s", 3700 → "1h01m", 9.5 → "9.5s"; negative → "-".
std::string FormatDuration(double seconds);
// Unix ms → "2024-05-01T12:00:00Z"; 0 → "-".
std::string FormatTime(int64_t unix_ms);
// "GPTQ 4-bit g128 sym desc_act" (and the options that differ from defaults).
std::string FormatMethod(const v1::JobSpec& spec);
// What the counts count: "12/28 layers + assemble" (QUANTIZE tasks succeeded / planned, then
// the stage tasks: " + assemble" for the one ASSEMBLE task, " + 5 stage tasks" with
// calibration or evaluation); "3/5 tasks" when the job has no layers (evaluation only).
std::string FormatDone(const v1::TaskCounts& c);
// The bar's fraction: layers succeeded / layers (tasks when there are no layers), 0..1.
double DoneFraction(const v1::TaskCounts& c);
// FormatDone plus what is running, failed and retried: "12/28 layers + assemble, 2 running,
// 1 retry".
std::string FormatCounts(const v1::TaskCounts& c);
// 0.453 → "45%" (clamped to 0..100).
std::string FormatPercent(double fraction);

// The plan of a --validate-only submit: "28 layers would be quantized; 29 tasks: 28 quantize
// + assemble" (stage tasks counted when the job has calibration or evaluation).
std::string FormatPlanSummary(const v1::TaskCounts& c);

// `qforge get`: one job as aligned "Field: value" lines. A job without an id is the plan of a
// --validate-only submit: "Plan:" instead of Job/State, the layers and tasks it would run, no
// times. A CALIBRATING or QUANTIZING job
// shows its progress ("CALIBRATING (45%)"); with dataset calibration, what the data is and
// where the Hessians came from (Job.calibration).
// An EVALUATING job shows its progress too; running tasks follow under "Running:"
// (FormatRunning); a job with Job.quality ends with FormatQuality.
std::string FormatJobTable(const v1::Job& job, int64_t now_ms);
// The quality block: perplexity original -> quantized (+%), mean KL, top-1 agreement, bits
// per weight, the gate (passed / failed with measured and allowed values, or none), and the
// `worst_modules` modules with the largest relative output error.
std::string FormatQuality(const v1::QualityReport& q, int worst_modules = 5);
// `qforge list`: one line per job under a header.
std::string FormatJobList(const v1::ListJobsResponse& r, int64_t now_ms);
// `qforge workers`.
std::string FormatWorkers(const v1::ListWorkersResponse& r, int64_t now_ms);

// `qforge layers`: one row per layer (MODULE, SHAPE, STATE, REL ERR, PROXY LOSS, BITS/W,
// TIME, WORKER, ATTEMPT, PHASE), sorted by `sort`: "error" (largest relative error first;
// layers without a result last, in plan order), "time" (slowest first) or "name" (plan
// order). Running layers show their progress and phase, failed ones their error.
std::string FormatLayers(const std::vector<v1::LayerResult>& layers, std::string_view sort);
// A finished job's layer summary (`watch`, `submit --wait`): layers done, mean and worst
// relative error (the `worst` layers with the largest), mean bits per weight, total and
// slowest layer time. "" when no layer has a result.
std::string FormatLayerSummary(const std::vector<v1::LayerResult>& layers, int worst = 3);
// The running tasks, one line each: "  model.layers.3.mlp.down_proj  45% solve  12.3s  w-1"
// (at most `max_lines`, then "  ... and N more").
std::string FormatRunning(const google::protobuf::RepeatedPtrField<v1::RunningTask>& running,
                          int max_lines = 8);

// What the progress line shows (from the latest event of a job).
struct ProgressState {
  std::string job_id;
  v1::JobState state = v1::JOB_STATE_UNSPECIFIED;
  v1::TaskCounts tasks;
  double eta_seconds = -1;  // -1 unknown
  double progress = 0;      // Job.progress: fraction of the current stage
  google::protobuf::RepeatedPtrField<v1::RunningTask> running;  // shown under the bar
};
// One line of at most `width` columns (no newline):
//   "QUANTIZING [#####.....] 12/28 layers + assemble  2 running  1 retry  ETA 1m05s"
//   "CALIBRATING [####......] 45% of the samples  2 running  ETA --" (bar: progress;
//   EVALUATING the same)
// With `color`, the state is coloured by ANSI escapes (not counted in the width).
std::string RenderProgressLine(const ProgressState& p, int width, bool color);
// A per-event line for logs (no newline), e.g.
//   "12:00:01 QUANTIZING 3/14 layers, 2 running | model.layers.0.mlp.down_proj SUCCEEDED
//    attempt 1 on w-1 in 1.23 s (rel err 1.2e-03)"
// A progress event (EVENT_TYPE_PROGRESS) lists its running tasks instead:
//   "12:00:03 QUANTIZING 3/14 layers, 2 running | progress: model.layers.1.mlp.up_proj 45%
//    solve 2.1s, model.layers.1.mlp.down_proj 10% read 0.4s"
std::string FormatEventLine(const v1::JobEvent& e);

}  // namespace qforge::cli

#endif  // QFORGE_CLIENT_OUTPUT_H_

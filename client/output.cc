#include "client/output.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/tls.h"
#include "google/protobuf/util/json_util.h"

namespace qforge::cli {
namespace {

std::string StripPrefix(std::string name, std::string_view prefix) {
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  return name;
}

// Left-aligned columns separated by two spaces; the last column is not padded.
std::string Columns(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width;
  for (const auto& r : rows) {
    if (width.size() < r.size()) width.resize(r.size(), 0);
    for (size_t i = 0; i < r.size(); ++i) width[i] = std::max(width[i], r[i].size());
  }
  std::string out;
  for (const auto& r : rows) {
    std::string line;
    for (size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(width[i] - r[i].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  }
  return out;
}

std::string Age(int64_t then_ms, int64_t now_ms) {
  if (then_ms <= 0) return "-";
  return FormatDuration(std::max<double>(0, (now_ms - then_ms) / 1000.0));
}

const char* StateColor(v1::JobState s) {
  switch (s) {
    case v1::JOB_STATE_SUCCEEDED:
      return "\x1b[32m";  // green
    case v1::JOB_STATE_FAILED:
      return "\x1b[31m";  // red
    case v1::JOB_STATE_CANCELLED:
    case v1::JOB_STATE_CANCELLING:
      return "\x1b[33m";  // yellow
    default:
      return "\x1b[36m";  // cyan
  }
}

std::string Retries(int64_t n) { return absl::StrCat(n, n == 1 ? " retry" : " retries"); }

}  // namespace

int ExitCodeForStatus(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return kExitOk;
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return kExitUnavailable;
    case grpc::StatusCode::NOT_FOUND:
      return kExitNotFound;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      return kExitAuth;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::ALREADY_EXISTS:
      return kExitInvalidArgument;
    default:
      return kExitJobFailed;
  }
}

int ExitCodeForJob(v1::JobState state) {
  switch (state) {
    case v1::JOB_STATE_FAILED:
      return kExitJobFailed;
    case v1::JOB_STATE_CANCELLED:
      return kExitCancelled;
    default:
      return kExitOk;
  }
}

int ReportRpcError(const grpc::Status& s, std::string_view what, const ClientConfig& config) {
  const int code = ExitCodeForStatus(s.error_code());
  std::string msg = s.error_message();
  if (code == kExitUnavailable) {
    msg = absl::StrCat("cannot reach the coordinator at ", config.endpoint, " (", msg,
                       "); check --endpoint / QFORGE_ENDPOINT");
    const std::string tls = TlsHint(s.error_message(), config.tls.enabled());
    if (!tls.empty()) absl::StrAppend(&msg, "; ", tls);
  } else if (code == kExitAuth) {
    msg = absl::StrCat(msg, " (check --token / QFORGE_TOKEN)");
  }
  std::fprintf(stderr, "qforge: %.*s: %s\n", static_cast<int>(what.size()), what.data(),
               msg.c_str());
  return code;
}

namespace {

std::string PrintJson(const google::protobuf::Message& m, bool whitespace) {
  google::protobuf::util::JsonPrintOptions o;
  o.add_whitespace = whitespace;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = false;
  std::string out;
  auto st = google::protobuf::util::MessageToJsonString(m, &out, o);
  if (!st.ok()) return absl::StrCat("{\"error\": \"cannot print ", m.GetTypeName(), " as JSON\"}\n");
  if (out.empty() || out.back() != '\n') out += "\n";
  return out;
}

}  // namespace

std::string ToJson(const google::protobuf::Message& m) { return PrintJson(m, true); }
std::string ToJsonLine(const google::protobuf::Message& m) { return PrintJson(m, false); }

bool IsTerminal(v1::JobState s) {
  return s == v1::JOB_STATE_SUCCEEDED || s == v1::JOB_STATE_FAILED ||
         s == v1::JOB_STATE_CANCELLED;
}

std::string StateName(v1::JobState s) {
  if (s == v1::JOB_STATE_UNSPECIFIED) return "UNKNOWN";
  const std::string& name = v1::JobState_Name(s);
  return name.empty() ? absl::StrCat("STATE_", static_cast<int>(s)) : StripPrefix(name, "JOB_STATE_");
}

std::string TaskStateName(v1::TaskState s) {
  if (s == v1::TASK_STATE_UNSPECIFIED) return "UNKNOWN";
  const std::string& name = v1::TaskState_Name(s);
  return name.empty() ? absl::StrCat("STATE_", static_cast<int>(s)) : StripPrefix(name, "TASK_STATE_");
}

std::string FormatDuration(double seconds) {
  if (!(seconds >= 0) || !std::isfinite(seconds)) return "-";
  if (seconds < 10) return absl::StrFormat("%.1fs", seconds);
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  if (s < 86400) return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
  return absl::StrFormat("%dd%02dh", s / 86400, (s % 86400) / 3600);
}

std::string FormatTime(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  const std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string FormatMethod(const v1::JobSpec& spec) {
  if (spec.method() == v1::METHOD_VPTQ) {
    const v1::VptqSpec& v = spec.vptq();
    return absl::StrCat("VPTQ v", v.vector_len(), " k", v.num_centroids(),
                        v.num_res_centroids() > 0 ? absl::StrCat("+", v.num_res_centroids()) : "");
  }
  const v1::GptqSpec& g = spec.gptq();
  std::vector<std::string> parts = {absl::StrCat("GPTQ ", g.bits(), "-bit")};
  const int group = g.group_size() == 0 ? 128 : g.group_size();
  parts.push_back(group < 0 ? "per-channel" : absl::StrCat("g", group));
  parts.push_back(g.asym() ? "asym" : "sym");
  if (g.desc_act()) parts.push_back("desc_act");
  if (g.static_groups()) parts.push_back("static_groups");
  if (g.mse()) parts.push_back("mse");
  if (g.damp_percent() != 0 && g.damp_percent() != 0.01) {
    parts.push_back(absl::StrCat("damp ", g.damp_percent()));
  }
  if (!g.checkpoint_format().empty() && g.checkpoint_format() != "gptq") {
    parts.push_back(g.checkpoint_format());
  }
  return absl::StrJoin(parts, " ");
}

std::string FormatDone(const v1::TaskCounts& c) {
  if (c.layers() <= 0) {
    // No layer count (an evaluation-only job, or a job settled before layers were counted).
    return absl::StrCat(c.succeeded(), "/", c.total(), c.total() == 1 ? " task" : " tasks");
  }
  std::string s = absl::StrCat(c.layers_succeeded(), "/", c.layers(),
                               c.layers() == 1 ? " layer" : " layers");
  const int stage_tasks = c.total() - c.layers();
  if (stage_tasks == 1) {
    absl::StrAppend(&s, " + assemble");
  } else if (stage_tasks > 1) {
    absl::StrAppend(&s, " + ", stage_tasks, " stage tasks");
  }
  return s;
}

double DoneFraction(const v1::TaskCounts& c) {
  if (c.layers() > 0) {
    return std::clamp(static_cast<double>(c.layers_succeeded()) / c.layers(), 0.0, 1.0);
  }
  return c.total() > 0 ? std::clamp(static_cast<double>(c.succeeded()) / c.total(), 0.0, 1.0) : 0.0;
}

std::string FormatCounts(const v1::TaskCounts& c) {
  std::string s = FormatDone(c);
  if (c.running() > 0) absl::StrAppend(&s, ", ", c.running(), " running");
  if (c.failed() > 0) absl::StrAppend(&s, ", ", c.failed(), " failed");
  if (c.retries() > 0) absl::StrAppend(&s, ", ", Retries(c.retries()));
  return s;
}

std::string FormatPlanSummary(const v1::TaskCounts& c) {
  const int stage_tasks = c.total() - c.layers();
  std::string s = absl::StrCat(c.layers(), c.layers() == 1 ? " layer" : " layers",
                               " would be quantized; ", c.total(),
                               c.total() == 1 ? " task: " : " tasks: ", c.layers(), " quantize");
  if (stage_tasks == 1) {
    absl::StrAppend(&s, " + assemble");
  } else if (stage_tasks > 1) {
    absl::StrAppend(&s, " + ", stage_tasks, " stage tasks (calibrate, reduce, assemble, evaluate)");
  }
  return s;
}

std::string FormatPercent(double fraction) {
  if (!std::isfinite(fraction)) fraction = 0;
  return absl::StrCat(static_cast<int>(std::floor(std::clamp(fraction, 0.0, 1.0) * 100 + 1e-9)),
                      "%");
}

std::string FormatJobTable(const v1::Job& job, int64_t now_ms) {
  const v1::JobSpec& spec = job.spec();
  const bool plan = job.id().empty() && job.state() == v1::JOB_STATE_UNSPECIFIED;
  std::vector<std::vector<std::string>> rows;
  if (plan) {
    rows.push_back({"Plan:", "valid (--validate-only: no job was created)"});
  } else {
    rows.push_back({"Job:", job.id()});
    std::string state = StateName(job.state());
    if (job.state() == v1::JOB_STATE_CALIBRATING || job.state() == v1::JOB_STATE_QUANTIZING ||
        job.state() == v1::JOB_STATE_EVALUATING) {
      absl::StrAppend(&state, " (", FormatPercent(job.progress()), ")");
    }
    rows.push_back({"State:", state});
  }
  rows.push_back({"Model:", spec.model_uri()});
  const bool evaluation_only = !spec.reference_model_uri().empty();
  if (evaluation_only) rows.push_back({"Reference:", spec.reference_model_uri()});
  rows.push_back({"Output:", spec.output_uri().empty() ? "-" : spec.output_uri()});
  rows.push_back({"Method:", evaluation_only ? "evaluation only" : FormatMethod(spec)});
  std::string calibration = "-";
  switch (spec.calibration().source_case()) {
    case v1::CalibrationSpec::kHessiansUri:
      calibration = absl::StrCat("hessians ", spec.calibration().hessians_uri());
      break;
    case v1::CalibrationSpec::kNone:
      calibration = "none (identity Hessians)";
      break;
    case v1::CalibrationSpec::kDatasetUri:
      calibration = absl::StrCat("dataset ", spec.calibration().dataset_uri());
      break;
    default:
      break;
  }
  if (!evaluation_only) rows.push_back({"Calibration:", calibration});
  if (job.has_calibration() && !job.calibration().dataset_sha256().empty()) {
    const v1::CalibrationInfo& ci = job.calibration();
    std::string data = absl::StrCat(ci.samples(), " samples × ", ci.seq_len(), " tokens (",
                                    ci.tokens(), " real", ci.packed() ? ", packed" : "",
                                    "), sha256 ", ci.dataset_sha256().substr(0, 16));
    rows.push_back({"Calib data:", data});
    std::string hessians =
        ci.cache_hit() ? absl::StrCat("cached: ", ci.hessians_uri())
                       : absl::StrCat(ci.shards(), ci.shards() == 1 ? " shard" : " shards",
                                      ci.seconds() > 0
                                          ? absl::StrCat(" in ", FormatDuration(ci.seconds()))
                                          : std::string(),
                                      " -> ", ci.hessians_uri());
    rows.push_back({"Hessians:", hessians});
  }
  if (spec.has_evaluation() && !spec.evaluation().dataset_uri().empty()) {
    const v1::EvaluationSpec& ev = spec.evaluation();
    std::string evaluation = absl::StrCat("dataset ", ev.dataset_uri());
    std::vector<std::string> gate;
    if (ev.has_max_ppl_increase_pct()) {
      gate.push_back(absl::StrFormat("perplexity +%.2f %% at most", ev.max_ppl_increase_pct()));
    }
    if (ev.has_max_kl()) gate.push_back(absl::StrFormat("mean KL %.4g at most", ev.max_kl()));
    if (!gate.empty()) absl::StrAppend(&evaluation, "; gate: ", absl::StrJoin(gate, ", "));
    rows.push_back({"Evaluation:", evaluation});
  }
  const v1::TaskCounts& c = job.tasks();
  if (plan) {
    if (!spec.include().empty()) rows.push_back({"Include:", absl::StrJoin(spec.include(), "  ")});
    if (!spec.exclude().empty()) rows.push_back({"Exclude:", absl::StrJoin(spec.exclude(), "  ")});
    rows.push_back({"Tasks:", FormatPlanSummary(c)});
    if (spec.max_attempts() > 0) rows.push_back({"Attempts:", absl::StrCat(spec.max_attempts(), " per task")});
    std::string out = Columns(rows);
    return out;
  }
  rows.push_back({"Tasks:", absl::StrCat(FormatCounts(c), " (", c.queued(), " queued, ",
                                         c.pending(), " pending, ", c.cancelled(), " cancelled)")});
  if (!IsTerminal(job.state())) {
    rows.push_back({"ETA:", job.eta_seconds() >= 0 ? FormatDuration(job.eta_seconds()) : "unknown"});
  }
  rows.push_back({"Created:", absl::StrCat(FormatTime(job.create_time_unix_ms()),
                                           job.create_time_unix_ms() > 0
                                               ? absl::StrCat(" (", Age(job.create_time_unix_ms(), now_ms), " ago)")
                                               : "")});
  if (job.start_time_unix_ms() > 0) rows.push_back({"Started:", FormatTime(job.start_time_unix_ms())});
  if (job.end_time_unix_ms() > 0) {
    std::string ended = FormatTime(job.end_time_unix_ms());
    if (job.start_time_unix_ms() > 0) {
      absl::StrAppend(&ended, " (took ",
                      FormatDuration((job.end_time_unix_ms() - job.start_time_unix_ms()) / 1000.0), ")");
    }
    rows.push_back({"Ended:", ended});
  }
  if (job.has_error() && (job.error().code() != 0 || !job.error().message().empty())) {
    const v1::ErrorInfo& e = job.error();
    std::string code = absl::StatusCodeToString(static_cast<absl::StatusCode>(e.code()));
    std::string detail = code;
    if (!e.reason().empty()) absl::StrAppend(&detail, " ", e.reason());
    if (!e.subject().empty()) absl::StrAppend(&detail, " (", e.subject(), ")");
    rows.push_back({"Error:", absl::StrCat(detail, ": ", e.message())});
  }
  if (!job.manifest_uri().empty()) rows.push_back({"Manifest:", job.manifest_uri()});
  if (spec.priority() != 0) rows.push_back({"Priority:", absl::StrCat(spec.priority())});
  if (!spec.labels().empty()) {
    std::vector<std::pair<std::string, std::string>> labels(spec.labels().begin(), spec.labels().end());
    std::sort(labels.begin(), labels.end());
    rows.push_back({"Labels:", absl::StrJoin(labels, ", ", absl::PairFormatter("="))});
  }
  if (!job.tenant().empty()) rows.push_back({"Tenant:", job.tenant()});
  if (!job.request_id().empty()) rows.push_back({"Request ID:", job.request_id()});
  std::string out = Columns(rows);
  if (!job.running().empty()) absl::StrAppend(&out, "Running:\n", FormatRunning(job.running()));
  if (job.has_quality() && job.quality().tokens() > 0) {
    absl::StrAppend(&out, "\n", FormatQuality(job.quality()));
  }
  return out;
}

std::string FormatQuality(const v1::QualityReport& q, int worst_modules) {
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"Quality:", absl::StrFormat("%lld samples, %lld predicted tokens of %s",
                                              static_cast<long long>(q.samples()),
                                              static_cast<long long>(q.tokens()),
                                              q.dataset_uri().empty() ? "-" : q.dataset_uri())});
  rows.push_back({"Perplexity:", absl::StrFormat("%.4f original -> %.4f quantized (%+.2f %%)",
                                                 q.ppl_reference(), q.ppl_quantized(),
                                                 q.ppl_increase_pct())});
  rows.push_back({"Mean KL:", absl::StrFormat("%.5f nats", q.mean_kl())});
  rows.push_back({"Top-1 agree:", absl::StrFormat("%.2f %%", 100.0 * q.top1_agreement())});
  if (q.bits_per_weight() > 0) {
    rows.push_back({"Bits/weight:", absl::StrFormat("%.3f", q.bits_per_weight())});
  }
  std::string gate = "none (no threshold set)";
  if (q.gate_enabled()) {
    std::vector<std::string> limits;
    if (q.has_max_ppl_increase_pct()) {
      limits.push_back(absl::StrFormat("perplexity +%.2f %% (allowed +%.2f %%)",
                                       q.ppl_increase_pct(), q.max_ppl_increase_pct()));
    }
    if (q.has_max_kl()) {
      limits.push_back(absl::StrFormat("mean KL %.5f (allowed %.5f)", q.mean_kl(), q.max_kl()));
    }
    gate = absl::StrCat(q.gate_passed() ? "PASSED: " : "FAILED: ", absl::StrJoin(limits, "; "));
  }
  rows.push_back({"Quality gate:", gate});
  if (q.seconds() > 0) rows.push_back({"Eval time:", FormatDuration(q.seconds())});
  std::string out = Columns(rows);
  std::vector<const v1::ModuleQuality*> modules;
  for (const v1::ModuleQuality& m : q.modules()) modules.push_back(&m);
  std::stable_sort(modules.begin(), modules.end(),
                   [](const v1::ModuleQuality* a, const v1::ModuleQuality* b) {
                     return a->relative_error() > b->relative_error();
                   });
  if (!modules.empty() && worst_modules > 0) {
    std::vector<std::vector<std::string>> worst = {{"  WORST MODULES", "REL. OUTPUT ERROR"}};
    for (int i = 0; i < worst_modules && i < static_cast<int>(modules.size()); ++i) {
      worst.push_back({absl::StrCat("  ", modules[i]->module()),
                       absl::StrFormat("%.3e", modules[i]->relative_error())});
    }
    absl::StrAppend(&out, Columns(worst));
  }
  return out;
}

std::string FormatJobList(const v1::ListJobsResponse& r, int64_t now_ms) {
  std::vector<std::vector<std::string>> rows = {{"ID", "STATE", "LAYERS", "METHOD", "AGE", "MODEL"}};
  for (const v1::Job& j : r.jobs()) {
    rows.push_back({j.id(), StateName(j.state()),
                    j.tasks().layers() > 0
                        ? absl::StrCat(j.tasks().layers_succeeded(), "/", j.tasks().layers())
                        : absl::StrCat(j.tasks().succeeded(), "/", j.tasks().total(), " tasks"),
                    FormatMethod(j.spec()), Age(j.create_time_unix_ms(), now_ms),
                    j.spec().model_uri()});
  }
  std::string out = Columns(rows);
  if (r.jobs().empty()) out = "No jobs.\n";
  return out;
}

std::string FormatWorkers(const v1::ListWorkersResponse& r, int64_t now_ms) {
  if (r.workers().empty()) return "No workers.\n";
  std::vector<std::vector<std::string>> rows = {
      {"ID", "HOST", "STATE", "BACKENDS", "DEVICE", "TASK", "DONE", "FAILED", "LAST SEEN"}};
  for (const v1::WorkerInfo& w : r.workers()) {
    std::vector<std::string> devices;
    for (const v1::DeviceInfo& d : w.devices()) {
      std::string s = d.name().empty() ? d.kind() : d.name();
      if (d.memory_bytes() > 0) absl::StrAppend(&s, absl::StrFormat(" %.0fGiB", d.memory_bytes() / 1073741824.0));
      devices.push_back(s);
    }
    rows.push_back({w.id(), w.hostname(), w.state(), absl::StrJoin(w.backends(), ","),
                    devices.empty() ? "-" : absl::StrJoin(devices, "; "),
                    w.current_task().empty() ? "-" : w.current_task(),
                    absl::StrCat(w.tasks_completed()), absl::StrCat(w.tasks_failed()),
                    w.last_heartbeat_unix_ms() > 0
                        ? absl::StrCat(Age(w.last_heartbeat_unix_ms(), now_ms), " ago")
                        : "-"});
  }
  return Columns(rows);
}

namespace {

// Shortest readable form of a small positive figure: "1.23e-03", "0.512", "-".
std::string Sci(double v) { return v > 0 ? absl::StrFormat("%.2e", v) : "-"; }

std::string RunningShort(const v1::RunningTask& r) {
  std::string s = absl::StrCat(r.module().empty() ? r.subject() : r.module(), " ",
                               FormatPercent(r.progress()));
  if (!r.phase().empty()) absl::StrAppend(&s, " ", r.phase());
  absl::StrAppend(&s, " ", FormatDuration(r.elapsed_seconds()));
  return s;
}

}  // namespace

std::string FormatLayers(const std::vector<v1::LayerResult>& layers, std::string_view sort) {
  if (layers.empty()) return "No layers.\n";
  std::vector<size_t> order(layers.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto done = [&](size_t i) { return layers[i].state() == v1::TASK_STATE_SUCCEEDED; };
  if (sort == "error") {
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      if (done(a) != done(b)) return done(a);
      return done(a) && layers[a].relative_error() > layers[b].relative_error();
    });
  } else if (sort == "time") {
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return layers[a].seconds() > layers[b].seconds();
    });
  }
  std::vector<std::vector<std::string>> rows = {{"MODULE", "SHAPE", "STATE", "REL ERR",
                                                 "PROXY LOSS", "BITS/W", "TIME", "WORKER",
                                                 "ATTEMPT", "NOTE"}};
  for (size_t i : order) {
    const v1::LayerResult& l = layers[i];
    std::string note;
    if (l.state() == v1::TASK_STATE_RUNNING) {
      note = absl::StrCat(FormatPercent(l.progress()), l.phase().empty() ? "" : " ", l.phase());
    } else if (l.error().code() != 0) {
      note = l.error().message().substr(0, 80);
    }
    rows.push_back({l.module(), absl::StrCat(l.out_features(), "x", l.in_features()),
                    TaskStateName(l.state()), Sci(l.relative_error()), Sci(l.proxy_loss()),
                    l.bits_per_weight() > 0 ? absl::StrFormat("%.3f", l.bits_per_weight()) : "-",
                    l.seconds() > 0 ? FormatDuration(l.seconds()) : "-",
                    l.worker_id().empty() ? "-" : l.worker_id(), absl::StrCat(l.attempt() + 1),
                    note.empty() ? "-" : note});
  }
  return Columns(rows);
}

std::string FormatLayerSummary(const std::vector<v1::LayerResult>& layers, int worst) {
  std::vector<const v1::LayerResult*> done;
  double err = 0, bits = 0, seconds = 0;
  const v1::LayerResult* slowest = nullptr;
  for (const v1::LayerResult& l : layers) {
    if (l.state() != v1::TASK_STATE_SUCCEEDED) continue;
    done.push_back(&l);
    err += l.relative_error();
    bits += l.bits_per_weight();
    seconds += l.seconds();
    if (slowest == nullptr || l.seconds() > slowest->seconds()) slowest = &l;
  }
  if (done.empty()) return "";
  const double n = static_cast<double>(done.size());
  std::string s = absl::StrFormat(
      "Layers: %d/%d quantized, mean rel err %.2e, mean %.3f bits/weight, %s of layer time "
      "(slowest %s, %s)\n",
      done.size(), layers.size(), err / n, bits / n, FormatDuration(seconds),
      slowest->module(), FormatDuration(slowest->seconds()));
  std::stable_sort(done.begin(), done.end(), [](const v1::LayerResult* a, const v1::LayerResult* b) {
    return a->relative_error() > b->relative_error();
  });
  for (int i = 0; i < worst && i < static_cast<int>(done.size()); ++i) {
    absl::StrAppend(&s, absl::StrFormat("  worst %d: %s rel err %.2e\n", i + 1,
                                        done[i]->module(), done[i]->relative_error()));
  }
  return s;
}

std::string FormatRunning(const google::protobuf::RepeatedPtrField<v1::RunningTask>& running,
                          int max_lines) {
  std::vector<std::vector<std::string>> rows;
  for (const v1::RunningTask& r : running) {
    if (static_cast<int>(rows.size()) == max_lines) break;
    rows.push_back({"  " + (r.module().empty() ? r.subject() : r.module()),
                    FormatPercent(r.progress()), r.phase().empty() ? "-" : r.phase(),
                    FormatDuration(r.elapsed_seconds()), r.worker_id()});
  }
  std::string s = rows.empty() ? "" : Columns(rows);
  if (running.size() > max_lines) {
    absl::StrAppend(&s, "  ... and ", running.size() - max_lines, " more\n");
  }
  return s;
}

std::string RenderProgressLine(const ProgressState& p, int width, bool color) {
  const v1::TaskCounts& c = p.tasks;
  const std::string state = StateName(p.state);
  // Sharded stages show the fraction of their samples done.
  const bool calibrating =
      p.state == v1::JOB_STATE_CALIBRATING || p.state == v1::JOB_STATE_EVALUATING;
  std::string tail = calibrating
                         ? absl::StrCat(" ", FormatPercent(p.progress), " of the samples")
                         : absl::StrCat(" ", FormatDone(c));
  if (c.running() > 0) absl::StrAppend(&tail, "  ", c.running(), " running");
  if (c.failed() > 0) absl::StrAppend(&tail, "  ", c.failed(), " failed");
  if (c.retries() > 0) absl::StrAppend(&tail, "  ", Retries(c.retries()));
  if (!IsTerminal(p.state)) {
    absl::StrAppend(&tail, "  ETA ", p.eta_seconds >= 0 ? FormatDuration(p.eta_seconds) : "--");
  }
  // The bar takes what is left, between 10 and 40 columns; it is dropped when the line
  // would not fit, and the tail is cut last.
  const int fixed = static_cast<int>(state.size() + tail.size()) + 3;  // " [" + "]"
  int bar = std::min(40, width - fixed);
  std::string line_bar;
  if (bar >= 10) {
    double frac = DoneFraction(c);
    if (calibrating) frac = std::isfinite(p.progress) ? std::clamp(p.progress, 0.0, 1.0) : 0.0;
    const int filled = static_cast<int>(std::floor(frac * bar + 1e-9));
    line_bar = absl::StrCat(" [", std::string(filled, '#'), std::string(bar - filled, '.'), "]");
  }
  std::string plain_tail = line_bar + tail;
  const int room = std::max(0, width - static_cast<int>(state.size()));
  if (static_cast<int>(plain_tail.size()) > room) plain_tail.resize(room);
  std::string shown_state = state;
  if (static_cast<int>(shown_state.size()) > width) shown_state.resize(std::max(0, width));
  if (color) return absl::StrCat(StateColor(p.state), shown_state, "\x1b[0m", plain_tail);
  return shown_state + plain_tail;
}

std::string FormatEventLine(const v1::JobEvent& e) {
  std::string when = "--:--:--";
  if (e.time_unix_ms() > 0) {
    const std::time_t t = static_cast<std::time_t>(e.time_unix_ms() / 1000);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[16];
    std::strftime(buf, sizeof(buf), "%H:%M:%S", &tm);
    when = buf;
  }
  std::string s = absl::StrCat(when, " ", StateName(e.job_state()), " ",
                               e.job_state() == v1::JOB_STATE_CALIBRATING ||
                                       e.job_state() == v1::JOB_STATE_EVALUATING
                                   ? absl::StrCat(FormatPercent(e.progress()), " of the samples, ",
                                                  FormatCounts(e.tasks()))
                                   : FormatCounts(e.tasks()));
  if (e.type() == v1::EVENT_TYPE_PROGRESS) {
    std::vector<std::string> parts;
    for (const v1::RunningTask& r : e.running()) parts.push_back(RunningShort(r));
    absl::StrAppend(&s, " | progress: ", parts.empty() ? "-" : absl::StrJoin(parts, ", "));
    return s;
  }
  if (e.has_task()) {
    const v1::TaskEvent& t = e.task();
    absl::StrAppend(&s, " | ", t.layer().empty() ? t.task_id() : t.layer(), " ",
                    TaskStateName(t.state()), " attempt ", t.attempt() + 1);
    if (!t.worker_id().empty()) absl::StrAppend(&s, " on ", t.worker_id());
    if (t.seconds() > 0) absl::StrAppend(&s, " in ", FormatDuration(t.seconds()));
    if (t.relative_error() > 0) absl::StrAppend(&s, absl::StrFormat(" (rel err %.2e)", t.relative_error()));
    if (t.has_error() && !t.error().message().empty()) {
      absl::StrAppend(&s, ": ", absl::StatusCodeToString(static_cast<absl::StatusCode>(t.error().code())),
                      " ", t.error().message());
    }
  }
  if (!e.message().empty()) absl::StrAppend(&s, " | ", e.message());
  return s;
}

}  // namespace qforge::cli

// Helpers shared by the commands (cli.h).
#include <chrono>
#include <cstdio>
#include <filesystem>

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "client/cli.h"

namespace qforge::cli {

void AddFormatOption(CLI::App* cmd, std::string* format) {
  cmd->add_option("-o", *format, "output format: table (default) or json (the API resource)")
      ->check(CLI::IsMember({"table", "json"}));
}

bool IsTransient(grpc::StatusCode c) {
  return c == grpc::StatusCode::UNAVAILABLE || c == grpc::StatusCode::DEADLINE_EXCEEDED ||
         c == grpc::StatusCode::UNKNOWN || c == grpc::StatusCode::INTERNAL ||
         c == grpc::StatusCode::ABORTED;
}

OutputFormat ParseFormat(const std::string& format) {
  return format == "json" ? OutputFormat::kJson : OutputFormat::kTable;
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void PrintJob(const v1::Job& job, OutputFormat format) {
  const std::string text =
      format == OutputFormat::kJson ? ToJson(job) : FormatJobTable(job, NowUnixMs());
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

bool ParseJobStates(const std::string& text, std::vector<v1::JobState>* out) {
  std::string name = absl::AsciiStrToUpper(text);
  if (name == "ACTIVE") {
    for (v1::JobState s : {v1::JOB_STATE_QUEUED, v1::JOB_STATE_CALIBRATING,
                           v1::JOB_STATE_QUANTIZING, v1::JOB_STATE_ASSEMBLING,
                           v1::JOB_STATE_CANCELLING}) {
      out->push_back(s);
    }
    return true;
  }
  if (name.rfind("JOB_STATE_", 0) != 0) name = "JOB_STATE_" + name;
  v1::JobState s;
  if (!v1::JobState_Parse(name, &s) || s == v1::JOB_STATE_UNSPECIFIED) return false;
  out->push_back(s);
  return true;
}

std::string SuggestCommand(const std::string& typed, const std::vector<std::string>& commands) {
  // Optimal string alignment distance (Damerau-Levenshtein without repeated edits).
  auto distance = [](const std::string& a, const std::string& b) {
    const size_t n = a.size(), m = b.size();
    std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1, 0));
    for (size_t i = 0; i <= n; ++i) d[i][0] = i;
    for (size_t j = 0; j <= m; ++j) d[0][j] = j;
    for (size_t i = 1; i <= n; ++i) {
      for (size_t j = 1; j <= m; ++j) {
        const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
        d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
        if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
          d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
        }
      }
    }
    return d[n][m];
  };
  const std::string lower = absl::AsciiStrToLower(typed);
  if (lower.empty()) return "";
  const size_t limit = lower.size() <= 3 ? 1 : 2;
  std::string best;
  size_t best_distance = limit + 1;
  for (const std::string& c : commands) {
    const size_t dist = distance(lower, c);
    if (dist < best_distance) {
      best = c;
      best_distance = dist;
    }
  }
  if (!best.empty()) return best;
  std::string prefixed;
  for (const std::string& c : commands) {
    if (c.rfind(lower, 0) == 0) {
      if (!prefixed.empty()) return "";  // ambiguous
      prefixed = c;
    }
  }
  return prefixed;
}

std::string FirstPositional(int argc, const char* const* argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") return i + 1 < argc ? argv[i + 1] : "";
    if (a.empty() || a[0] != '-') return a;
    if (a == "--help" || a == "-h" || a == "--version") return "";
    if ((a == "--endpoint" || a == "--token" || a == "--timeout" || a == "--tls-ca" ||
         a == "--tls-cert" || a == "--tls-key") &&
        a.find('=') == std::string::npos) {
      ++i;  // its value
    }
  }
  return "";
}

bool HintIfNoLiveWorker(Connection& conn, const v1::Job& job) {
  if (job.state() != v1::JOB_STATE_QUEUED) return false;
  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::ListWorkersResponse workers;
  if (!conn.jobs().ListWorkers(&ctx, v1::ListWorkersRequest(), &workers).ok()) return false;
  int live = 0, lost = 0;
  for (const v1::WorkerInfo& w : workers.workers()) (w.state() == "lost" ? lost : live) += 1;
  if (live > 0) return false;
  const std::string& endpoint = conn.config().endpoint;
  std::fprintf(stderr,
               "qforge: note: job %s waits QUEUED: the coordinator at %s has no live worker%s. "
               "Start one with `qforge-worker --coordinator %s` (or the coordinator with "
               "--local-workers N); `qforge workers` lists them.\n",
               job.id().c_str(), endpoint.c_str(),
               lost > 0 ? absl::StrCat(" (", lost, " lost: no heartbeat)").c_str() : "",
               endpoint.c_str());
  return true;
}

std::string AbsolutizeLocalUri(const std::string& uri) {
  if (uri.empty() || uri.find("://") != std::string::npos || uri.front() == '/') return uri;
  std::error_code ec;
  std::filesystem::path p = std::filesystem::absolute(uri, ec);
  if (ec) return uri;
  return p.lexically_normal().string();
}

}  // namespace qforge::cli

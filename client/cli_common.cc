// Helpers shared by the commands (cli.h).
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "absl/strings/ascii.h"
#include "client/cli.h"

namespace qforge::cli {

void AddFormatOption(CLI::App* cmd, std::string* format) {
  cmd->add_option("-o", *format, "output format: table (default) or json (the API resource)")
      ->check(CLI::IsMember({"table", "json"}));
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

std::string AbsolutizeLocalUri(const std::string& uri) {
  if (uri.empty() || uri.find("://") != std::string::npos || uri.front() == '/') return uri;
  std::error_code ec;
  std::filesystem::path p = std::filesystem::absolute(uri, ec);
  if (ec) return uri;
  return p.lexically_normal().string();
}

}  // namespace qforge::cli

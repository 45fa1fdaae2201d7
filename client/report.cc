// qforge report ID [--output FILE]: the job's quality report page (GetJobReport: one
// self-contained HTML page) to stdout or FILE; stderr names where the job wrote report.html.
// Exit 7 (FAILED_PRECONDITION) while the job has no evaluation results.
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "client/cli.h"

namespace qforge::cli {
namespace {

struct ReportFlags {
  std::string id;
  std::string output;  // "" or "-": stdout
};

int RunReport(Connection& conn, const ReportFlags& f) {
  v1::GetJobReportRequest req;
  req.set_id(f.id);
  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::JobReport report;
  grpc::Status s = conn.jobs().GetJobReport(&ctx, req, &report);
  if (!s.ok()) return ReportRpcError(s, "report " + f.id, conn.config());
  if (!report.uri().empty()) {
    std::fprintf(stderr, "qforge: the job wrote its report to %s\n", report.uri().c_str());
  }
  if (f.output.empty() || f.output == "-") {
    std::fwrite(report.html().data(), 1, report.html().size(), stdout);
    return kExitOk;
  }
  std::ofstream out(f.output, std::ios::binary | std::ios::trunc);
  out.write(report.html().data(), static_cast<std::streamsize>(report.html().size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "qforge: report %s: cannot write %s\n", f.id.c_str(), f.output.c_str());
    return kExitJobFailed;
  }
  std::fprintf(stderr, "qforge: wrote %s\n", f.output.c_str());
  return kExitOk;
}

}  // namespace

void AddReportCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<ReportFlags>();
  CLI::App* cmd = app.add_subcommand(
      "report", "The quality report of an evaluated job (one self-contained HTML page)");
  cmd->add_option("id", f->id, "job id")->required();
  cmd->add_option("--output,-O", f->output, "write the page to FILE (default: stdout)");
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunReport(conn, *f); }; });
}

}  // namespace qforge::cli

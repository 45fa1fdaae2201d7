// qforge workers [-o table|json]: the coordinator's workers and what they run.
#include <cstdio>
#include <memory>
#include <string>

#include "client/cli.h"

namespace qforge::cli {
namespace {

struct WorkersFlags {
  std::string format = "table";
};

int RunWorkers(Connection& conn, const WorkersFlags& f) {
  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::ListWorkersResponse resp;
  grpc::Status s = conn.jobs().ListWorkers(&ctx, v1::ListWorkersRequest(), &resp);
  if (!s.ok()) return ReportRpcError(s, "workers", conn.config());
  const std::string text = ParseFormat(f.format) == OutputFormat::kJson
                               ? ToJson(resp)
                               : FormatWorkers(resp, NowUnixMs());
  std::fwrite(text.data(), 1, text.size(), stdout);
  return kExitOk;
}

}  // namespace

void AddWorkersCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<WorkersFlags>();
  CLI::App* cmd = app.add_subcommand("workers", "List workers");
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunWorkers(conn, *f); }; });
}

}  // namespace qforge::cli

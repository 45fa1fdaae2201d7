// qforge get ID [-o table|json]: one job. Exit 0 whatever the job's state (4 if unknown).
#include <memory>
#include <string>

#include "client/cli.h"

namespace qforge::cli {
namespace {

struct GetFlags {
  std::string id;
  std::string format = "table";
};

int RunGet(Connection& conn, const GetFlags& f) {
  v1::GetJobRequest req;
  req.set_id(f.id);
  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::Job job;
  grpc::Status s = conn.jobs().GetJob(&ctx, req, &job);
  if (!s.ok()) return ReportRpcError(s, "get " + f.id, conn.config());
  HintIfNoLiveWorker(conn, job);
  PrintJob(job, ParseFormat(f.format));
  return kExitOk;
}

}  // namespace

void AddGetCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<GetFlags>();
  CLI::App* cmd = app.add_subcommand("get", "Show one job");
  cmd->add_option("id", f->id, "job id")->required();
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunGet(conn, *f); }; });
}

}  // namespace qforge::cli

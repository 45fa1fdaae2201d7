// qforge cancel ID [--wait] [-o table|json]: requests cancellation (running tasks learn it
// from their next heartbeat). Exit 0 once the request is accepted; with --wait, follows the
// job until it ends and exits with its outcome (5 when cancelled).
#include <memory>
#include <string>

#include "client/cli.h"

namespace qforge::cli {
namespace {

struct CancelFlags {
  std::string id;
  bool wait = false;
  std::string format = "table";
};

int RunCancel(Connection& conn, const CancelFlags& f) {
  v1::CancelJobRequest req;
  req.set_id(f.id);
  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::Job job;
  grpc::Status s = conn.jobs().CancelJob(&ctx, req, &job);
  if (!s.ok()) return ReportRpcError(s, "cancel " + f.id, conn.config().endpoint);
  if (f.wait) return FollowJob(conn, f.id, /*show_progress=*/false, ParseFormat(f.format));
  PrintJob(job, ParseFormat(f.format));
  return kExitOk;
}

}  // namespace

void AddCancelCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<CancelFlags>();
  CLI::App* cmd = app.add_subcommand("cancel", "Cancel a job");
  cmd->add_option("id", f->id, "job id")->required();
  cmd->add_flag("--wait", f->wait, "wait until the job has stopped");
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunCancel(conn, *f); }; });
}

}  // namespace qforge::cli

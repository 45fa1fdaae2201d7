// qforge cancel ID [--wait] [-o table|json]: requests cancellation (running tasks learn it
// from their next heartbeat). Exit 0 once the request is accepted; with --wait, follows the
// job until it has stopped and exits 0 (the cancel is done). A job that had already ended
// (SUCCEEDED, FAILED, CANCELLED) is not an error: a note on stderr, the job printed, exit 0.
// Unknown ids, an unreachable server, and Ctrl-C keep their exit codes (4, 3, 130).
#include <cstdio>
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
  if (s.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
    // The coordinator refuses to cancel a job that already ended; that is what was asked.
    grpc::ClientContext get_ctx;
    conn.Prepare(&get_ctx);
    v1::GetJobRequest get;
    get.set_id(f.id);
    if (conn.jobs().GetJob(&get_ctx, get, &job).ok() && IsTerminal(job.state())) {
      std::fprintf(stderr, "qforge: note: job %s already ended %s; nothing to cancel\n",
                   f.id.c_str(), StateName(job.state()).c_str());
      PrintJob(job, ParseFormat(f.format));
      return kExitOk;
    }
  }
  if (!s.ok()) return ReportRpcError(s, "cancel " + f.id, conn.config());
  if (f.wait) {
    const int code = FollowJob(conn, f.id, /*show_progress=*/false, ParseFormat(f.format));
    if (code != kExitCancelled && code != kExitJobFailed) return code;
    // 5 or 1: the job has stopped (cancelled, or it failed on its own before the cancel reached
    // it), which is what was asked; unless the 1 was an RPC error, so the job is checked.
    grpc::ClientContext get_ctx;
    conn.Prepare(&get_ctx);
    v1::GetJobRequest get;
    get.set_id(f.id);
    v1::Job now;
    return conn.jobs().GetJob(&get_ctx, get, &now).ok() && IsTerminal(now.state()) ? kExitOk : code;
  }
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

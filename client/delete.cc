// qforge delete ID: removes a finished job (SUCCEEDED, FAILED, CANCELLED) from the
// coordinator: its record, tasks and events. The artifact and report stay where the job
// wrote them. Exit 0; 7 for a job that has not finished (cancel it first), 4 if unknown.
#include <cstdio>
#include <memory>
#include <string>

#include "client/cli.h"

namespace qforge::cli {
namespace {

int RunDelete(Connection& conn, const std::string& id) {
  v1::DeleteJobRequest req;
  req.set_id(id);
  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::DeleteJobResponse resp;
  grpc::Status s = conn.jobs().DeleteJob(&ctx, req, &resp);
  if (!s.ok()) return ReportRpcError(s, "delete " + id, conn.config());
  std::printf("Deleted job %s (its artifact, if any, is kept)\n", id.c_str());
  return kExitOk;
}

}  // namespace

void AddDeleteCommand(CLI::App& app, Cli& cli) {
  auto id = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "delete", "Delete a finished job's record and events (the artifact is kept)");
  cmd->add_option("id", *id, "job id")->required();
  cmd->callback([&cli, id] { cli.run = [id](Connection& conn) { return RunDelete(conn, *id); }; });
}

}  // namespace qforge::cli

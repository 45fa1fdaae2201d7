// qforge list [--state S]... [--limit N] [--page-token T] [-o table|json]: jobs, newest first
// as the server orders them; the next page's token is printed to stderr in table mode.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "client/cli.h"

namespace qforge::cli {
namespace {

struct ListFlags {
  std::vector<std::string> states;
  int limit = 50;
  std::string page_token;
  std::string format = "table";
};

int RunList(Connection& conn, const ListFlags& f) {
  v1::ListJobsRequest req;
  req.set_page_size(f.limit);
  req.set_page_token(f.page_token);
  std::vector<v1::JobState> states;
  for (const std::string& s : f.states) {
    if (!ParseJobStates(s, &states)) {
      std::fprintf(stderr,
                   "qforge list: --state '%s' is not a job state (queued, calibrating, quantizing, "
                   "assembling, succeeded, failed, cancelling, cancelled, or active)\n",
                   s.c_str());
      return kExitUsage;
    }
  }
  for (v1::JobState s : states) req.add_states(s);
  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::ListJobsResponse resp;
  grpc::Status s = conn.jobs().ListJobs(&ctx, req, &resp);
  if (!s.ok()) return ReportRpcError(s, "list", conn.config());
  if (ParseFormat(f.format) == OutputFormat::kJson) {
    const std::string text = ToJson(resp);
    std::fwrite(text.data(), 1, text.size(), stdout);
  } else {
    const std::string text = FormatJobList(resp, NowUnixMs());
    std::fwrite(text.data(), 1, text.size(), stdout);
    if (!resp.next_page_token().empty()) {
      std::fprintf(stderr, "qforge: more jobs: qforge list --page-token %s\n",
                   resp.next_page_token().c_str());
    }
  }
  return kExitOk;
}

}  // namespace

void AddListCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<ListFlags>();
  CLI::App* cmd = app.add_subcommand("list", "List jobs");
  cmd->add_option("--state", f->states, "only jobs in this state (repeatable; 'active' = not finished)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--limit", f->limit, "jobs per page (default 50, at most 500)")
      ->check(CLI::Range(1, 500));
  cmd->add_option("--page-token", f->page_token, "continue a previous listing");
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunList(conn, *f); }; });
}

}  // namespace qforge::cli

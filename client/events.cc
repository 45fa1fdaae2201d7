// qforge events ID [-f] [-o table|json]: the job's event history (WatchJob with
// history_only), one line per event (FormatEventLine; json: one JobEvent per line). With
// -f it keeps following, like `kubectl get events -w`, until the job's last event, resuming
// after the last sequence seen when the connection drops (gives up after 2 minutes of
// failed reconnects, exit 3). Exit 0, or the RPC error's code (4 for an unknown job).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "client/cli.h"

namespace qforge::cli {
namespace {

struct EventsFlags {
  std::string id;
  bool follow = false;
  std::string format = "table";
};

int RunEvents(Connection& conn, const EventsFlags& f) {
  const bool json = ParseFormat(f.format) == OutputFormat::kJson;
  int64_t last_sequence = 0;
  auto failing_since = std::chrono::steady_clock::time_point::min();
  for (;;) {
    grpc::ClientContext ctx;
    conn.Prepare(&ctx, /*stream=*/true);
    v1::WatchJobRequest req;
    req.set_id(f.id);
    req.set_after_sequence(last_sequence);
    req.set_history_only(!f.follow);
    auto reader = conn.jobs().WatchJob(&ctx, req);
    v1::JobEvent e;
    while (reader->Read(&e)) {
      failing_since = std::chrono::steady_clock::time_point::min();
      last_sequence = std::max(last_sequence, e.sequence());
      std::fputs(json ? ToJsonLine(e).c_str() : (FormatEventLine(e) + "\n").c_str(), stdout);
      std::fflush(stdout);
    }
    grpc::Status s = reader->Finish();
    if (s.ok()) return kExitOk;  // history sent, or (-f) the job's last event
    if (!f.follow || !IsTransient(s.error_code())) {
      return ReportRpcError(s, "events " + f.id, conn.config());
    }
    const auto now = std::chrono::steady_clock::now();
    if (failing_since == std::chrono::steady_clock::time_point::min()) {
      failing_since = now;
      std::fprintf(stderr, "qforge: connection to %s lost (%s); reconnecting\n",
                   conn.config().endpoint.c_str(), s.error_message().c_str());
    } else if (now - failing_since > std::chrono::minutes(2)) {
      return ReportRpcError(s, "events " + f.id, conn.config());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

}  // namespace

void AddEventsCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<EventsFlags>();
  CLI::App* cmd = app.add_subcommand(
      "events", "A job's event history (-f: keep following until the job ends)");
  cmd->add_option("id", f->id, "job id")->required();
  cmd->add_flag("-f,--follow", f->follow, "keep printing new events until the job's last one");
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunEvents(conn, *f); }; });
}

}  // namespace qforge::cli

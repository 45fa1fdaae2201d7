// qforge watch ID [-o table|json]: follows a job's events until it ends (FollowJob, also
// used by `submit --wait/--watch` and `cancel --wait`). Ctrl-C detaches; it never cancels.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/ioctl.h>

#include "client/cli.h"

namespace qforge::cli {
namespace {

int g_interrupt_pipe_write = -1;

void OnInterrupt(int) {
  const unsigned char b = 1;
  if (g_interrupt_pipe_write >= 0) (void)!write(g_interrupt_pipe_write, &b, 1);
}

// While alive, SIGINT cancels the registered gRPC call and wakes sleepers instead of killing
// the process. One at a time.
class Interrupter {
 public:
  Interrupter() {
    if (pipe(fds_) != 0) {
      fds_[0] = fds_[1] = -1;
      return;
    }
    g_interrupt_pipe_write = fds_[1];
    struct sigaction sa = {};
    sa.sa_handler = OnInterrupt;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, &old_);
    thread_ = std::thread([this] {
      for (;;) {
        unsigned char b = 0;
        const ssize_t n = read(fds_[0], &b, 1);
        if (n < 0 && errno == EINTR) continue;
        if (n != 1 || b == 0) return;
        std::lock_guard<std::mutex> l(mu_);
        interrupted_.store(true);
        if (ctx_ != nullptr) ctx_->TryCancel();
        cv_.notify_all();
      }
    });
  }

  ~Interrupter() {
    if (fds_[0] < 0) return;
    sigaction(SIGINT, &old_, nullptr);
    g_interrupt_pipe_write = -1;
    const unsigned char stop = 0;
    (void)!write(fds_[1], &stop, 1);
    thread_.join();
    close(fds_[0]);
    close(fds_[1]);
  }

  bool interrupted() const { return interrupted_.load(); }

  // The call Ctrl-C cancels (null: none).
  void SetContext(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> l(mu_);
    ctx_ = ctx;
    if (ctx_ != nullptr && interrupted_.load()) ctx_->TryCancel();
  }

  void Sleep(int64_t ms) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::milliseconds(ms), [&] { return interrupted_.load(); });
  }

 private:
  int fds_[2] = {-1, -1};
  struct sigaction old_ = {};
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  grpc::ClientContext* ctx_ = nullptr;
  std::atomic<bool> interrupted_{false};
};

int TerminalWidth() {
  winsize ws{};
  if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  if (const char* c = std::getenv("COLUMNS"); c != nullptr && std::atoi(c) > 0) return std::atoi(c);
  return 80;
}

// Draws the progress bar or the event lines.
class Display {
 public:
  Display(bool show, bool tty, bool color) : show_(show), tty_(tty), color_(color) {}

  void Event(const v1::JobEvent& e, ProgressState& p) {
    if (!show_) return;
    if (!tty_) {
      Line(FormatEventLine(e));
      return;
    }
    // On a terminal, only notable events get a line above the bar.
    const bool notable = (e.has_task() && (e.task().state() == v1::TASK_STATE_FAILED ||
                                           (e.task().has_error() && !e.task().error().message().empty()))) ||
                         (!e.has_task() && !e.message().empty() &&
                          e.type() != v1::EVENT_TYPE_PROGRESS);
    if (notable) Line(FormatEventLine(e));
    Bar(p);
  }

  void Line(const std::string& line) {
    if (!show_) return;
    Erase();
    std::fprintf(stderr, "%s\n", line.c_str());
    std::fflush(stderr);
  }

  // The bar, and under it the running tasks with their progress, phase and elapsed time.
  void Bar(const ProgressState& p) {
    if (!show_ || !tty_) return;
    Erase();
    const int width = TerminalWidth() - 1;
    std::string text = RenderProgressLine(p, width, color_);
    const std::string running = IsTerminal(p.state) ? "" : FormatRunning(p.running);
    int lines = 0;
    for (size_t start = 0; start < running.size();) {
      size_t end = running.find('\n', start);
      if (end == std::string::npos) end = running.size();
      text += "\n" + running.substr(start, std::min<size_t>(end - start, width));
      ++lines;
      start = end + 1;
    }
    std::fputs(text.c_str(), stderr);
    bar_drawn_ = true;
    extra_lines_ = lines;
    std::fflush(stderr);
  }

  // Leaves the bar on screen and moves to a fresh line.
  void Finish() {
    if (bar_drawn_) std::fputs("\n", stderr);
    bar_drawn_ = false;
    extra_lines_ = 0;
    std::fflush(stderr);
  }

 private:
  // Removes the bar and its running lines (the cursor is at the end of the last one).
  void Erase() {
    if (!tty_ || !bar_drawn_) return;
    if (extra_lines_ > 0) std::fprintf(stderr, "\x1b[%dA", extra_lines_);
    std::fputs("\r\x1b[J", stderr);
    bar_drawn_ = false;
    extra_lines_ = 0;
  }

  const bool show_, tty_, color_;
  bool bar_drawn_ = false;
  int extra_lines_ = 0;  // running-task lines drawn under the bar
};

}  // namespace

int FollowJob(Connection& conn, const std::string& id, bool show_progress, OutputFormat format,
              int64_t reconnect_timeout_ms) {
  Interrupter interrupter;
  const std::string& endpoint = conn.config().endpoint;
  const bool tty = isatty(STDERR_FILENO) == 1;
  const char* no_color = std::getenv("NO_COLOR");
  const char* term = std::getenv("TERM");
  const bool color = tty && (no_color == nullptr || *no_color == '\0') &&
                     !(term != nullptr && std::strcmp(term, "dumb") == 0);
  Display display(show_progress, tty, color);
  auto detach = [&] {
    display.Finish();
    std::fprintf(stderr,
                 "qforge: detached from job %s; it keeps running (qforge watch %s follows it again)\n",
                 id.c_str(), id.c_str());
    return kExitInterrupted;
  };

  // The job as it is now (fails fast on an unknown id or an unreachable server).
  auto get_job = [&](v1::Job* job) {
    grpc::ClientContext ctx;
    conn.Prepare(&ctx);
    interrupter.SetContext(&ctx);
    v1::GetJobRequest req;
    req.set_id(id);
    grpc::Status s = conn.jobs().GetJob(&ctx, req, job);
    interrupter.SetContext(nullptr);
    return s;
  };
  v1::Job job;
  grpc::Status s = get_job(&job);
  if (interrupter.interrupted()) return detach();
  if (!s.ok()) return ReportRpcError(s, "watch " + id, conn.config());

  ProgressState p;
  p.job_id = id;
  p.state = job.state();
  p.tasks = job.tasks();
  p.eta_seconds = job.eta_seconds();
  p.progress = job.progress();
  p.running = job.running();
  display.Bar(p);

  int64_t last_sequence = 0;
  int64_t backoff_ms = 200;
  std::chrono::steady_clock::time_point failing_since{};
  bool failing = false;
  bool finished = IsTerminal(job.state());
  while (!finished) {
    grpc::ClientContext ctx;
    conn.Prepare(&ctx, /*stream=*/true);
    interrupter.SetContext(&ctx);
    v1::WatchJobRequest req;
    req.set_id(id);
    req.set_after_sequence(last_sequence);
    std::unique_ptr<grpc::ClientReaderInterface<v1::JobEvent>> reader =
        conn.jobs().WatchJob(&ctx, req);
    v1::JobEvent e;
    bool got_any = false;
    while (reader->Read(&e)) {
      got_any = true;
      if (failing) {
        display.Line("qforge: reconnected");
        failing = false;
      }
      if (e.sequence() > last_sequence) last_sequence = e.sequence();
      if (e.job_state() != v1::JOB_STATE_UNSPECIFIED) p.state = e.job_state();
      if (e.has_tasks()) p.tasks = e.tasks();
      p.eta_seconds = e.eta_seconds();
      p.progress = e.progress();
      if (e.type() != v1::EVENT_TYPE_UNSPECIFIED) p.running = e.running();
      display.Event(e, p);
      if (IsTerminal(p.state)) finished = true;
    }
    s = reader->Finish();
    interrupter.SetContext(nullptr);
    if (interrupter.interrupted()) return detach();
    if (finished) break;
    if (!s.ok() && !IsTransient(s.error_code())) {
      display.Finish();
      return ReportRpcError(s, "watch " + id, conn.config());
    }
    // The stream ended early (server restart, dropped connection): resume after the last
    // sequence seen, with backoff while the server stays unreachable. A stream that ended
    // cleanly without the terminal event is checked against the job itself.
    if (got_any) backoff_ms = 200;
    if (s.ok()) {
      v1::Job now;
      grpc::Status gs = get_job(&now);
      if (interrupter.interrupted()) return detach();
      if (gs.ok() && IsTerminal(now.state())) break;
    }
    if (!s.ok()) {
      const auto now = std::chrono::steady_clock::now();
      if (!failing) {
        failing = true;
        failing_since = now;
        display.Line("qforge: connection to " + endpoint + " lost (" + s.error_message() +
                     "); reconnecting");
      } else if (now - failing_since > std::chrono::milliseconds(reconnect_timeout_ms)) {
        display.Finish();
        return ReportRpcError(s, "watch " + id, conn.config());
      }
    }
    interrupter.Sleep(backoff_ms);
    if (interrupter.interrupted()) return detach();
    backoff_ms = std::min<int64_t>(backoff_ms * 2, 5'000);
  }
  display.Bar(p);
  display.Finish();

  // The final job, as the API returns it.
  for (int attempt = 0;; ++attempt) {
    s = get_job(&job);
    if (interrupter.interrupted()) return detach();
    if (s.ok() || !IsTransient(s.error_code()) || attempt >= 10) break;
    interrupter.Sleep(500);
  }
  if (!s.ok()) return ReportRpcError(s, "get " + id, conn.config());
  PrintJob(job, format);
  if (format == OutputFormat::kTable && job.tasks().layers() > 0) {
    // What the layers came to (best effort: a failed call only leaves the summary out).
    std::vector<v1::LayerResult> layers;
    if (ListAllLayers(conn, id, &layers).ok()) {
      std::fputs(FormatLayerSummary(layers).c_str(), stdout);
    }
  }
  if (job.state() == v1::JOB_STATE_FAILED) {
    std::fprintf(stderr, "qforge: job %s failed: %s\n", id.c_str(), job.error().message().c_str());
  } else if (job.state() == v1::JOB_STATE_CANCELLED) {
    std::fprintf(stderr, "qforge: job %s was cancelled\n", id.c_str());
  }
  return ExitCodeForJob(job.state());
}

namespace {

struct WatchFlags {
  std::string id;
  std::string format = "table";
};

}  // namespace

void AddWatchCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<WatchFlags>();
  CLI::App* cmd = app.add_subcommand(
      "watch", "Follow a job until it ends (progress on stderr; Ctrl-C detaches, it does not cancel)");
  cmd->add_option("id", f->id, "job id")->required();
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] {
    cli.run = [f](Connection& conn) {
      return FollowJob(conn, f->id, /*show_progress=*/true, ParseFormat(f->format));
    };
  });
}

}  // namespace qforge::cli

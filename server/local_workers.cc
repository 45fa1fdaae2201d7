#include "server/local_workers.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

extern char** environ;

namespace qforge {
namespace {

namespace fs = std::filesystem;

std::string DescribeExit(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exit code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return absl::StrCat("signal ", WTERMSIG(status));
  return absl::StrCat("status ", status);
}

}  // namespace

absl::StatusOr<std::string> LocalWorkerSupervisor::FindWorkerBinary(
    std::string_view override_path) {
  std::vector<std::string> tried;
  auto usable = [&tried](const fs::path& p) {
    tried.push_back(p.string());
    return ::access(p.c_str(), X_OK) == 0 && fs::is_regular_file(p);
  };
  if (!override_path.empty()) {
    if (usable(fs::path(override_path))) return std::string(override_path);
    return absl::NotFoundError(
        absl::StrCat("--worker-binary ", std::string(override_path), ": not an executable file"));
  }
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (ec) {
    return absl::NotFoundError(
        absl::StrCat("cannot resolve /proc/self/exe to find qforge-worker: ", ec.message()));
  }
  const fs::path dir = self.parent_path();
  for (const fs::path& p : {dir / "qforge-worker", dir.parent_path() / "worker" / "qforge-worker"}) {
    if (usable(p)) return p.lexically_normal().string();
  }
  return absl::NotFoundError(absl::StrCat("qforge-worker not found (tried ",
                                          absl::StrJoin(tried, ", "),
                                          "); pass --worker-binary PATH"));
}

LocalWorkerSupervisor::LocalWorkerSupervisor(LocalWorkerOptions options)
    : options_(std::move(options)) {
  // argv and envp are built before any fork: between fork and exec only async-signal-safe
  // calls are allowed.
  argv_storage_.push_back(options_.binary);
  argv_storage_.insert(argv_storage_.end(), options_.args.begin(), options_.args.end());
  std::set<std::string> overridden;
  for (const std::string& kv : options_.env) overridden.insert(kv.substr(0, kv.find('=')));
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string kv(*e);
    if (overridden.count(kv.substr(0, kv.find('='))) == 0) envp_storage_.push_back(std::move(kv));
  }
  envp_storage_.insert(envp_storage_.end(), options_.env.begin(), options_.env.end());
  for (std::string& s : argv_storage_) argv_.push_back(s.data());
  argv_.push_back(nullptr);
  for (std::string& s : envp_storage_) envp_.push_back(s.data());
  envp_.push_back(nullptr);
  slots_.resize(options_.count);
}

absl::StatusOr<std::unique_ptr<LocalWorkerSupervisor>> LocalWorkerSupervisor::Start(
    LocalWorkerOptions options) {
  if (options.count < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--local-workers: ", options.count, " is not a positive count"));
  }
  if (::access(options.binary.c_str(), X_OK) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker binary ", options.binary, ": not executable: ", std::strerror(errno)));
  }
  std::unique_ptr<LocalWorkerSupervisor> s(new LocalWorkerSupervisor(std::move(options)));
  const auto now = std::chrono::steady_clock::now();
  for (Slot& slot : s->slots_) slot.restart_at = now;
  // Children are forked by the supervising thread: PR_SET_PDEATHSIG fires when the thread
  // that forked exits, and this one lives until Stop() has terminated them.
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

LocalWorkerSupervisor::~LocalWorkerSupervisor() { Stop(std::chrono::seconds(10)); }

pid_t LocalWorkerSupervisor::Spawn() {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    std::fprintf(stderr, "qforge-coordinator: fork for a local worker failed: %s\n",
                 std::strerror(errno));
    return -1;
  }
  if (pid == 0) {
    // Child: async-signal-safe calls only.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);  // the coordinator died before prctl
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::signal(SIGPIPE, SIG_DFL);
    ::execve(argv_[0], argv_.data(), envp_.data());
    ::_exit(127);
  }
  return pid;
}

void LocalWorkerSupervisor::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    const auto now = std::chrono::steady_clock::now();
    for (size_t i = 0; i < slots_.size(); ++i) {
      Slot& slot = slots_[i];
      if (slot.pid > 0) {
        int status = 0;
        if (::waitpid(slot.pid, &status, WNOHANG) != slot.pid) continue;
        const bool healthy = now - slot.started >= options_.healthy_after;
        slot.backoff = (healthy || slot.backoff.count() == 0)
                           ? options_.initial_backoff
                           : std::min(options_.max_backoff, slot.backoff * 2);
        slot.restart_at = now + slot.backoff;
        std::fprintf(stderr,
                     "qforge-coordinator: local worker %zu (pid %d) exited with %s; restarting "
                     "in %.1f s\n",
                     i, static_cast<int>(slot.pid), DescribeExit(status).c_str(),
                     slot.backoff.count() / 1000.0);
        slot.pid = 0;
        ++restarts_;
      } else if (now >= slot.restart_at) {
        const pid_t pid = Spawn();
        if (pid > 0) {
          slot.pid = pid;
          slot.started = now;
        } else {
          slot.backoff = slot.backoff.count() == 0 ? options_.initial_backoff
                                                   : std::min(options_.max_backoff, slot.backoff * 2);
          slot.restart_at = now + slot.backoff;
        }
      }
    }
    cv_.wait_for(lock, options_.poll_interval, [this] { return stopping_; });
  }
  TerminateAll();
}

void LocalWorkerSupervisor::Stop(std::chrono::milliseconds grace) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    grace_ = grace;
  }
  cv_.notify_all();
  // The supervising thread terminates the workers itself: had it exited first, the kernel
  // would already have sent them PR_SET_PDEATHSIG's SIGTERM (a second SIGTERM means "give
  // the task back now" to a worker).
  if (thread_.joinable()) thread_.join();
}

void LocalWorkerSupervisor::TerminateAll() {
  for (Slot& slot : slots_) {
    if (slot.pid > 0) ::kill(slot.pid, SIGTERM);
  }
  const auto deadline = std::chrono::steady_clock::now() + grace_;
  for (;;) {
    bool alive = false;
    for (Slot& slot : slots_) {
      if (slot.pid <= 0) continue;
      int status = 0;
      if (::waitpid(slot.pid, &status, WNOHANG) == slot.pid) {
        slot.pid = 0;
      } else {
        alive = true;
      }
    }
    if (!alive || std::chrono::steady_clock::now() >= deadline) break;
    mu_.unlock();  // pids() stays answerable while waiting
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    mu_.lock();
  }
  for (Slot& slot : slots_) {
    if (slot.pid <= 0) continue;
    std::fprintf(stderr, "qforge-coordinator: local worker pid %d did not stop in time; killing\n",
                 static_cast<int>(slot.pid));
    ::kill(slot.pid, SIGKILL);
    int status = 0;
    ::waitpid(slot.pid, &status, 0);
    slot.pid = 0;
  }
}

std::vector<pid_t> LocalWorkerSupervisor::pids() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<pid_t> out;
  for (const Slot& slot : slots_) out.push_back(slot.pid);
  return out;
}

int LocalWorkerSupervisor::restarts() const {
  std::lock_guard<std::mutex> lock(mu_);
  return restarts_;
}

}  // namespace qforge

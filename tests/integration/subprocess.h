// A child process for integration tests: started with posix_spawn, its stdout and stderr
// captured to files, with waits for a line on stderr, signals and exit status.
// Thread-compatible; one object per process.
#ifndef QFORGE_TESTS_INTEGRATION_SUBPROCESS_H_
#define QFORGE_TESTS_INTEGRATION_SUBPROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <optional>
#include <regex>
#include <string>
#include <vector>

namespace qforge::testing {

class Subprocess {
 public:
  // Starts argv[0] (a path) with the given arguments and extra environment (KEY=VALUE).
  // Output goes to <log_prefix>.stdout / .stderr.
  Subprocess(std::vector<std::string> argv, std::string log_prefix,
             std::vector<std::string> env = {});
  ~Subprocess();  // SIGKILLs the process if still running
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // Waits until a line of stderr matches `re`; returns the match groups (group 0 first), or
  // nullopt on timeout or if the process exits first.
  std::optional<std::smatch> WaitForStderr(const std::regex& re, std::chrono::milliseconds timeout);

  void Signal(int sig);
  // Waits for exit; returns the exit code (128+signal when killed), or nullopt on timeout.
  std::optional<int> Wait(std::chrono::milliseconds timeout);
  bool Running();

  std::string Stdout() const;
  std::string Stderr() const;

 private:
  pid_t pid_ = -1;
  std::optional<int> exit_code_;
  std::string out_path_, err_path_;
  std::string last_stderr_;
};

// Runs a command to completion (bounded by `timeout`), returning exit code, stdout, stderr.
struct CommandResult {
  int exit_code = -1;
  std::string out, err;
};
CommandResult RunCommand(std::vector<std::string> argv, std::chrono::milliseconds timeout,
                         std::vector<std::string> env = {});

}  // namespace qforge::testing

#endif  // QFORGE_TESTS_INTEGRATION_SUBPROCESS_H_

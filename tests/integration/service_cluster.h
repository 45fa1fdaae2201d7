// ServiceCluster: the service as real processes on loopback for multi-process tests — a
// temporary directory, generated models, one qforge-coordinator (restartable on the same
// address), qforge-worker processes, and the qforge CLI talking to them — plus the JSON and
// directory checks those tests share. Used by ServiceTest (service_test.cc) and the fault
// matrix (tests/faults/). Free of GoogleTest: errors come back as absl::Status (with the
// process's stderr where it helps), so that the fault soak (a plain program) uses it too.
//
// Thread-compatible; one object per test.
#ifndef QFORGE_TESTS_INTEGRATION_SERVICE_CLUSTER_H_
#define QFORGE_TESTS_INTEGRATION_SERVICE_CLUSTER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "tests/integration/subprocess.h"

namespace qforge::testing {

// ---- Job JSON (as `qforge get -o json` prints it) -------------------------------------------

// A field of a proto-JSON object, whether printed with proto names or lowerCamelCase.
const nlohmann::json* Field(const nlohmann::json& j, const std::string& snake);
// "JOB_STATE_SUCCEEDED", ... ("" when absent).
std::string StateOf(const nlohmann::json& job);
// job.tasks.<name> ("succeeded", "running", "retries", "total", ...); 0 when absent.
int64_t Count(const nlohmann::json& job, const std::string& name);
// SUCCEEDED, FAILED or CANCELLED.
bool Terminal(const nlohmann::json& job);

// ---- Directories -----------------------------------------------------------------------------

// The parsed file (a discarded value when missing or malformed).
nlohmann::json ReadJson(const std::string& path);
// Relative path -> sha256 of every file under `dir` except the manifest.
std::map<std::string, std::string> FileHashes(const std::string& dir);
// Files under `output` inside a `.qforge-staging` directory.
std::vector<std::string> StagingLeft(const std::string& output);

// How a process is started: the binary (empty: the release one), extra arguments and extra
// environment entries (KEY=VALUE).
struct ProcessSpec {
  std::string binary;
  std::vector<std::string> args;
  std::vector<std::string> env;
};

class ServiceCluster {
 public:
  // `bin_dir`: the build tree holding server/, worker/, client/ and tools/.
  explicit ServiceCluster(std::string bin_dir) : bin_(std::move(bin_dir)) {}
  ~ServiceCluster();  // kills what still runs (the directory stays: RemoveDir)
  ServiceCluster(const ServiceCluster&) = delete;
  ServiceCluster& operator=(const ServiceCluster&) = delete;

  // Creates the working directory /tmp/<prefix>-XXXXXX (dir()).
  absl::Status Init(const std::string& prefix);
  // Kills every process and forgets them.
  void StopAll();
  void RemoveDir();

  const std::string& dir() const { return dir_; }
  const std::string& endpoint() const { return endpoint_; }
  const std::string& bin() const { return bin_; }

  // A generated Llama-shaped model with Hessians under dir()/<name>; its path.
  absl::StatusOr<std::string> MakeModel(const std::string& name, int layers, int hidden,
                                        int intermediate);

  // Starts the coordinator (SQLite state under dir()/data, --allow-root dir(), lease 2 s,
  // heartbeats every 300 ms) on `listen` and waits for its ready line; endpoint() and
  // metrics() are then its addresses. The previous coordinator object is dropped (killed
  // if it still runs). On a given port (a restart), a start that finds the port in use is
  // tried again after 200 ms, up to 20 times (StartCoordinatorIn too).
  absl::Status StartCoordinator(const std::string& listen = "127.0.0.1:0",
                                const ProcessSpec& spec = {});
  // The same with the coordinator's working directory `cwd` (created).
  absl::Status StartCoordinatorIn(const std::string& cwd,
                                  const std::string& listen = "127.0.0.1:0");
  // Starts a worker (--threads 1) on endpoint() and waits until it registered; `cwd`
  // (optional) is its working directory.
  absl::Status StartWorker(const std::string& cwd = "", const ProcessSpec& spec = {});

  // The qforge CLI with QFORGE_ENDPOINT=endpoint().
  CommandResult Cli(std::vector<std::string> args,
                    std::chrono::milliseconds timeout = std::chrono::seconds(60));
  // `qforge get ID -o json`; a discarded value when the CLI failed (*exit_code says how).
  nlohmann::json GetJob(const std::string& id, int* exit_code = nullptr);
  // Polls GetJob until `pred(job)` or the timeout; the last job seen. `between` (optional)
  // runs after every poll (e.g. restarting what a fault killed).
  nlohmann::json WaitForJob(const std::string& id,
                            const std::function<bool(const nlohmann::json&)>& pred,
                            std::chrono::milliseconds timeout,
                            const std::function<void()>& between = nullptr);
  // GPTQ 4-bit g128 act-order with the model's own Hessians into `output`, -o json.
  static std::vector<std::string> SubmitArgs(const std::string& model, const std::string& output);

  std::string metrics() const { return metrics_; }

 protected:
  std::string bin_;
  std::string dir_, endpoint_, metrics_;
  std::unique_ptr<Subprocess> coordinator_;
  std::vector<std::unique_ptr<Subprocess>> workers_;
  int coordinator_starts_ = 0, worker_starts_ = 0;

 private:
  absl::Status WaitForCoordinator();
  // Runs `argv` as the coordinator (dropping the previous one) and waits for it, with the
  // retry on a taken `listen` port described at StartCoordinator.
  absl::Status LaunchCoordinator(const std::vector<std::string>& argv,
                                 const std::vector<std::string>& env, const std::string& listen);
};

}  // namespace qforge::testing

#endif  // QFORGE_TESTS_INTEGRATION_SERVICE_CLUSTER_H_

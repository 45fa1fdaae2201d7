#include "tests/integration/service_cluster.h"

#include <stdlib.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/sha256.h"

namespace qforge::testing {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

const std::regex kCoordinatorReady(R"(qforge-coordinator listening on (\S+) metrics on (\S+))");

}  // namespace

const nlohmann::json* Field(const nlohmann::json& j, const std::string& snake) {
  if (!j.is_object()) return nullptr;
  if (j.contains(snake)) return &j[snake];
  std::string camel;
  bool up = false;
  for (char c : snake) {
    if (c == '_') {
      up = true;
    } else {
      camel.push_back(up ? static_cast<char>(std::toupper(c)) : c);
      up = false;
    }
  }
  if (j.contains(camel)) return &j[camel];
  return nullptr;
}

std::string StateOf(const nlohmann::json& job) {
  const nlohmann::json* s = Field(job, "state");
  return s != nullptr && s->is_string() ? s->get<std::string>() : "";
}

int64_t Count(const nlohmann::json& job, const std::string& name) {
  const nlohmann::json* t = Field(job, "tasks");
  if (t == nullptr) return 0;
  const nlohmann::json* v = Field(*t, name);
  if (v == nullptr) return 0;
  return v->is_string() ? std::stoll(v->get<std::string>()) : v->get<int64_t>();
}

bool Terminal(const nlohmann::json& job) {
  const std::string s = StateOf(job);
  return s == "JOB_STATE_SUCCEEDED" || s == "JOB_STATE_FAILED" || s == "JOB_STATE_CANCELLED";
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f, nullptr, false);
}

std::map<std::string, std::string> FileHashes(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const std::string rel = fs::relative(e.path(), dir).string();
    if (rel == "qforge_manifest.json") continue;
    std::ifstream f(e.path(), std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    out[rel] = Sha256Hex(bytes);
  }
  return out;
}

std::vector<std::string> StagingLeft(const std::string& output) {
  std::vector<std::string> left;
  if (!fs::exists(output)) return left;
  for (const auto& e : fs::recursive_directory_iterator(output)) {
    if (e.path().string().find(".qforge-staging") != std::string::npos && e.is_regular_file()) {
      left.push_back(e.path().string());
    }
  }
  return left;
}

ServiceCluster::~ServiceCluster() { StopAll(); }

absl::Status ServiceCluster::Init(const std::string& prefix) {
  std::string tmpl = "/tmp/" + prefix + "-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    return absl::InternalError("mkdtemp " + tmpl + " failed");
  }
  dir_ = tmpl;
  return absl::OkStatus();
}

void ServiceCluster::StopAll() {
  workers_.clear();
  coordinator_.reset();
}

void ServiceCluster::RemoveDir() {
  if (dir_.empty()) return;
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

absl::StatusOr<std::string> ServiceCluster::MakeModel(const std::string& name, int layers,
                                                      int hidden, int intermediate) {
  const std::string path = dir_ + "/" + name;
  CommandResult r = RunCommand(
      {bin_ + "/tools/qforge-make-demo-model", "--output", path, "--layers",
       std::to_string(layers), "--hidden", std::to_string(hidden), "--intermediate",
       std::to_string(intermediate), "--heads", "4", "--kv-heads", "2", "--vocab", "256",
       "--samples", "256", "--max-shard-bytes", std::to_string(2 << 20)},
      60s);
  if (r.exit_code != 0) {
    return absl::InternalError(absl::StrCat("qforge-make-demo-model exited ", r.exit_code, ": ",
                                            r.err));
  }
  return path;
}

absl::Status ServiceCluster::WaitForCoordinator() {
  if (!coordinator_->started()) return absl::FailedPreconditionError("cannot start the coordinator");
  auto m = coordinator_->WaitForStderr(kCoordinatorReady, 30s);
  if (!m.has_value()) {
    return absl::UnavailableError("the coordinator did not start: " + coordinator_->Stderr());
  }
  endpoint_ = (*m)[1];
  metrics_ = (*m)[2];
  return absl::OkStatus();
}

absl::Status ServiceCluster::StartCoordinator(const std::string& listen, const ProcessSpec& spec) {
  std::vector<std::string> argv = {
      spec.binary.empty() ? bin_ + "/server/qforge-coordinator" : spec.binary,
      "--listen", listen, "--data-dir", dir_ + "/data", "--allow-root", dir_,
      "--metrics-listen", "127.0.0.1:0", "--lease-ms", "2000", "--heartbeat-ms", "300"};
  argv.insert(argv.end(), spec.args.begin(), spec.args.end());
  return LaunchCoordinator(argv, spec.env, listen);
}

absl::Status ServiceCluster::StartCoordinatorIn(const std::string& cwd, const std::string& listen) {
  fs::create_directories(cwd);
  return LaunchCoordinator(
      {"/bin/sh", "-c",
       "cd '" + cwd + "' && exec '" + bin_ + "/server/qforge-coordinator' --listen " + listen +
           " --data-dir '" + dir_ + "/data' --allow-root '" + dir_ +
           "' --metrics-listen 127.0.0.1:0 --lease-ms 2000 --heartbeat-ms 300"},
      {}, listen);
}

absl::Status ServiceCluster::LaunchCoordinator(const std::vector<std::string>& argv,
                                               const std::vector<std::string>& env,
                                               const std::string& listen) {
  // A restart on a given port (the one clients know; kernel-chosen at the first start, so in
  // the ephemeral range) can find it briefly taken, e.g. by a client's reconnect that got it
  // as its own source port: such a start is tried again after a pause, a few times.
  const bool fixed_port = !absl::EndsWith(listen, ":0");
  for (int attempt = 0;; ++attempt) {
    coordinator_.reset();
    coordinator_ = std::make_unique<Subprocess>(
        argv, dir_ + "/coordinator-" + std::to_string(coordinator_starts_++), env);
    absl::Status s = WaitForCoordinator();
    if (s.ok() || !fixed_port || attempt >= 20) return s;
    coordinator_->Wait(5s);
    if (!absl::StrContains(coordinator_->Stderr(), "Address already in use")) return s;
    std::this_thread::sleep_for(200ms);
  }
}

absl::Status ServiceCluster::StartWorker(const std::string& cwd, const ProcessSpec& spec) {
  const std::string binary = spec.binary.empty() ? bin_ + "/worker/qforge-worker" : spec.binary;
  std::vector<std::string> argv = {binary, "--coordinator", endpoint_, "--threads", "1"};
  argv.insert(argv.end(), spec.args.begin(), spec.args.end());
  if (!cwd.empty()) {
    fs::create_directories(cwd);
    std::string cmd = "cd '" + cwd + "' && exec";
    for (const std::string& a : argv) cmd += " '" + a + "'";
    argv = {"/bin/sh", "-c", cmd};
  }
  auto w = std::make_unique<Subprocess>(
      std::move(argv), dir_ + "/worker-" + std::to_string(worker_starts_++), spec.env);
  if (!w->started()) return absl::FailedPreconditionError("cannot start " + binary);
  auto m = w->WaitForStderr(std::regex(R"(qforge-worker \S+ registered)"), 30s);
  if (!m.has_value()) return absl::UnavailableError("the worker did not register: " + w->Stderr());
  workers_.push_back(std::move(w));
  return absl::OkStatus();
}

CommandResult ServiceCluster::Cli(std::vector<std::string> args,
                                  std::chrono::milliseconds timeout) {
  args.insert(args.begin(), bin_ + "/client/qforge");
  return RunCommand(std::move(args), timeout, {"QFORGE_ENDPOINT=" + endpoint_, "NO_COLOR=1"});
}

nlohmann::json ServiceCluster::GetJob(const std::string& id, int* exit_code) {
  CommandResult r = Cli({"get", id, "-o", "json"});
  if (exit_code != nullptr) *exit_code = r.exit_code;
  if (r.exit_code != 0) return nlohmann::json::value_t::discarded;
  return nlohmann::json::parse(r.out, nullptr, false);
}

nlohmann::json ServiceCluster::WaitForJob(const std::string& id,
                                          const std::function<bool(const nlohmann::json&)>& pred,
                                          std::chrono::milliseconds timeout,
                                          const std::function<void()>& between) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  nlohmann::json job;
  while (std::chrono::steady_clock::now() < deadline) {
    nlohmann::json seen = GetJob(id);
    if (!seen.is_discarded()) job = std::move(seen);
    if (!job.is_null() && pred(job)) return job;
    if (between) between();
    std::this_thread::sleep_for(100ms);
  }
  return job;
}

std::vector<std::string> ServiceCluster::SubmitArgs(const std::string& model,
                                                    const std::string& output) {
  return {"submit", model, "--method", "gptq", "--bits", "4", "--group-size", "128",
          "--desc-act", "--hessians", model + "/hessians.safetensors", "--output", output,
          "-o", "json"};
}

}  // namespace qforge::testing

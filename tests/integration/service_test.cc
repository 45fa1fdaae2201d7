// The service end to end with real processes on loopback: qforge-coordinator (SQLite state,
// file:// store), qforge-worker processes and the qforge CLI, on a generated Llama-shaped
// model. Covers: success with tensors byte-identical to the offline path, kill -9 of a worker
// mid-task, kill -9 and restart of the coordinator mid-job, cancellation without leftovers,
// bad specs, a corrupt shard, and request_id idempotency. Calibration from token data:
// CALIBRATE shards on two workers, the manifest's calibration block, the same artifact from
// the produced Hessians given back with --hessians, the Hessian cache (hit, --no-cache), bad
// token data refused at submit, and a worker killed during CALIBRATE plus a coordinator
// killed after the shards. Evaluation: a GPTQ job evaluated after assembly with a gate that
// passes (Job.quality, the manifest, `qforge get`, Prometheus), the same artifact through
// `qforge eval`, and a missed gate (QUALITY_GATE, exit code 1, the artifact kept and marked).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_split.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "qforge/v1/job_service.grpc.pb.h"
#include "tests/integration/service_cluster.h"
#include "tests/integration/subprocess.h"

namespace qforge {
namespace {

using namespace std::chrono_literals;
using ::qforge::testing::CommandResult;
using ::qforge::testing::Count;
using ::qforge::testing::Field;
using ::qforge::testing::FileHashes;
using ::qforge::testing::ReadJson;
using ::qforge::testing::RunCommand;
using ::qforge::testing::ServiceCluster;
using ::qforge::testing::StagingLeft;
using ::qforge::testing::StateOf;
using ::qforge::testing::Subprocess;
using ::qforge::testing::Terminal;
namespace fs = std::filesystem;

const std::string kBin = QFORGE_BIN_DIR;

std::string HttpGet(const std::string& host_port, const std::string& path) {
  const size_t colon = host_port.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: " + host_port + "\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

// Reads every event of one job's WatchJob stream until it ends, on gRPC's callback API (500
// of them need no thread each on this side either).
class EventCounter final : public grpc::ClientReadReactor<v1::JobEvent> {
 public:
  EventCounter(v1::JobService::Stub* stub, const std::string& job_id) {
    request_.set_id(job_id);
    stub->async()->WatchJob(&context_, &request_, this);
    StartRead(&event_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (event_.sequence() != last_ + 1) ++gaps_;
      last_ = event_.sequence();
      ++events_;
      cv_.notify_all();
    }
    StartRead(&event_);
  }
  void OnDone(const grpc::Status& s) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = s;
    done_ = true;
    cv_.notify_all();
  }
  // True once at least `n` events arrived (within `timeout`).
  bool WaitForEvents(int n, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] { return events_ >= n || done_; }) && events_ >= n;
  }
  // The stream's final status; nullopt when it did not end within `timeout`.
  std::optional<grpc::Status> WaitDone(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> l(mu_);
    if (!cv_.wait_for(l, timeout, [&] { return done_; })) return std::nullopt;
    return status_;
  }
  int64_t last() {
    std::lock_guard<std::mutex> l(mu_);
    return last_;
  }
  int gaps() {
    std::lock_guard<std::mutex> l(mu_);
    return gaps_;
  }
  void Cancel() { context_.TryCancel(); }

 private:
  grpc::ClientContext context_;
  v1::WatchJobRequest request_;
  v1::JobEvent event_;
  std::mutex mu_;
  std::condition_variable cv_;
  int events_ = 0, gaps_ = 0;
  int64_t last_ = 0;
  bool done_ = false;
  grpc::Status status_;
};

// Threads of process `pid` (/proc/<pid>/status); -1 when unreadable.
int ThreadsOf(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  }
  return -1;
}

class ServiceTest : public ::testing::Test, protected ServiceCluster {
 protected:
  ServiceTest() : ServiceCluster(kBin) {}
  void SetUp() override { ASSERT_TRUE(Init("qforge-it").ok()); }
  void TearDown() override {
    StopAll();
    if (!HasFailure()) RemoveDir();
  }

  // A generated Llama-shaped model with Hessians under dir_/<name>.
  std::string MakeModel(const std::string& name, int layers, int hidden, int intermediate) {
    absl::StatusOr<std::string> path = ServiceCluster::MakeModel(name, layers, hidden, intermediate);
    EXPECT_TRUE(path.ok()) << path.status();
    return path.ok() ? *path : dir_ + "/" + name;
  }

  void StartCoordinator(const std::string& listen = "127.0.0.1:0") {
    absl::Status s = ServiceCluster::StartCoordinator(listen);
    ASSERT_TRUE(s.ok()) << s;
  }

  // `cwd`: the coordinator's working directory (created if missing).
  void StartCoordinatorIn(const std::string& cwd, const std::string& listen = "127.0.0.1:0") {
    absl::Status s = ServiceCluster::StartCoordinatorIn(cwd, listen);
    ASSERT_TRUE(s.ok()) << s;
  }

  void StartWorker(const std::string& cwd = "") {
    absl::Status s = ServiceCluster::StartWorker(cwd);
    ASSERT_TRUE(s.ok()) << s;
  }

  nlohmann::json GetJob(const std::string& id) {
    int exit_code = 0;
    nlohmann::json job = ServiceCluster::GetJob(id, &exit_code);
    EXPECT_EQ(exit_code, 0) << "qforge get " << id;
    return job;
  }

  std::string Submit(const std::vector<std::string>& args) {
    CommandResult r = Cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
    const nlohmann::json* id = Field(job, "id");
    EXPECT_NE(id, nullptr) << r.out;
    return id != nullptr ? id->get<std::string>() : "";
  }

  // Both model directories hold the same tensors with the same bytes; `count` of the names
  // end in `suffix` (the quantized layers).
  void ExpectSameTensors(const std::string& service_dir, const std::string& offline_dir,
                         const std::string& suffix, int count) {
    auto a_store = OpenObjectStore(service_dir);
    auto b_store = OpenObjectStore(offline_dir);
    ASSERT_TRUE(a_store.ok() && b_store.ok());
    auto a = SafetensorsModel::Open(**a_store, "");
    auto b = SafetensorsModel::Open(**b_store, "");
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_EQ(a->TensorNames(), b->TensorNames());
    int matched = 0;
    for (const std::string& name : a->TensorNames()) {
      auto la = a->Find(name);
      auto lb = b->Find(name);
      auto ba = ReadTensorBytes(**a_store, la->key, *la->header, *la->info);
      auto bb = ReadTensorBytes(**b_store, lb->key, *lb->header, *lb->info);
      ASSERT_TRUE(ba.ok() && bb.ok()) << name;
      EXPECT_TRUE(*ba == *bb) << name << " differs between the service and the offline path";
      matched += name.size() >= suffix.size() &&
                 name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
    }
    EXPECT_EQ(matched, count);
  }

  // input_ids I32 [samples, seq_len] of a fixed pseudo-random sequence below `vocab`.
  std::string WriteTokens(const std::string& name, int samples, int seq_len, int vocab,
                          uint32_t seed = 1) {
    auto store = OpenObjectStore(dir_);
    EXPECT_TRUE(store.ok());
    std::string bytes(static_cast<size_t>(samples) * seq_len * 4, '\0');
    uint32_t x = seed;
    for (int i = 0; i < samples * seq_len; ++i) {
      x = x * 1664525u + 1013904223u;
      const int32_t id = static_cast<int32_t>((x >> 8) % static_cast<uint32_t>(vocab));
      std::memcpy(&bytes[4 * static_cast<size_t>(i)], &id, 4);
    }
    auto w = SafetensorsWriter::Create(**store, name, {{"input_ids", DType::kI32, {samples, seq_len}}});
    EXPECT_TRUE(w.ok()) << w.status();
    EXPECT_TRUE((*w)->WriteTensorData("input_ids", bytes).ok());
    EXPECT_TRUE((*w)->Finish().ok());
    return dir_ + "/" + name;
  }

  std::vector<std::string> CalibArgs(const std::string& model, const std::string& data,
                                     const std::string& output) {
    return {"submit", model,     "--method", "gptq",   "--bits", "4", "--group-size",
            "128",    "--calibration", data, "--output", output, "-o",   "json"};
  }

};

TEST_F(ServiceTest, JobSucceedsWithTensorsIdenticalToTheOfflinePath) {
  const std::string model = MakeModel("model", 2, 256, 768);
  StartCoordinator();
  StartWorker();
  StartWorker();
  std::vector<std::string> args = SubmitArgs(model, dir_ + "/out");
  args.push_back("--wait");
  CommandResult r = Cli(args, 180s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << r.out;
  EXPECT_EQ(Count(job, "succeeded"), Count(job, "total")) << r.out;
  EXPECT_TRUE(fs::exists(dir_ + "/out/qforge_manifest.json"));
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());

  // The offline driver on the same model and options, with the workers' thread count (BLAS
  // reductions are only bitwise reproducible for a given number of threads).
  CommandResult offline = RunCommand(
      {kBin + "/tools/qforge-quantize", "--model", model, "--hessians",
       model + "/hessians.safetensors", "--output", dir_ + "/offline", "--bits", "4",
       "--group-size", "128", "--desc-act"},
      180s, {"QFORGE_NUM_THREADS=1"});
  ASSERT_EQ(offline.exit_code, 0) << offline.err;
  ExpectSameTensors(dir_ + "/out", dir_ + "/offline", ".qweight", 2 * 7);

  // The coordinator's metrics saw the job.
  const std::string metrics = HttpGet(metrics_, "/metrics");
  EXPECT_NE(metrics.find("qforge_jobs"), std::string::npos) << metrics.substr(0, 500);
  EXPECT_NE(metrics.find("qforge_build_info"), std::string::npos);
}

TEST_F(ServiceTest, WorkerKilledMidTaskIsRetriedAndTheJobSucceeds) {
  const std::string model = MakeModel("model", 2, 512, 1408);
  StartCoordinator();
  StartWorker();
  const std::string id = Submit(SubmitArgs(model, dir_ + "/out"));
  ASSERT_FALSE(id.empty());
  nlohmann::json job =
      WaitForJob(id, [](const nlohmann::json& j) { return Count(j, "running") >= 1; }, 60s);
  ASSERT_GE(Count(job, "running"), 1) << job.dump();
  workers_.front()->Signal(SIGKILL);
  ASSERT_TRUE(workers_.front()->Wait(10s).has_value());
  StartWorker();
  job = WaitForJob(id, Terminal, 240s);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << job.dump();
  EXPECT_GE(Count(job, "retries"), 1) << job.dump();
  EXPECT_TRUE(fs::exists(dir_ + "/out/qforge_manifest.json"));
}

TEST_F(ServiceTest, CoordinatorKilledAndRestartedMidJobResumes) {
  const std::string model = MakeModel("model", 2, 512, 1408);
  StartCoordinator();
  const std::string listen = endpoint_;  // restart on the same address
  StartWorker();
  const std::string id = Submit(SubmitArgs(model, dir_ + "/out"));
  ASSERT_FALSE(id.empty());
  nlohmann::json job =
      WaitForJob(id, [](const nlohmann::json& j) { return Count(j, "succeeded") >= 2; }, 120s);
  ASSERT_GE(Count(job, "succeeded"), 2) << job.dump();
  ASSERT_FALSE(Terminal(job)) << "the job finished before the coordinator could be killed";
  coordinator_->Signal(SIGKILL);
  ASSERT_TRUE(coordinator_->Wait(10s).has_value());
  StartCoordinator(listen);
  ASSERT_EQ(endpoint_, listen);
  job = WaitForJob(id, Terminal, 240s);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << job.dump();
  EXPECT_TRUE(fs::exists(dir_ + "/out/qforge_manifest.json"));
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());
}

// Files under `dir` whose path contains `part`.
std::vector<std::string> FilesContaining(const std::string& dir, const std::string& part) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it->path().string().find(part) != std::string::npos) out.push_back(it->path().string());
  }
  return out;
}

// Files of the artifact proper: everything under `dir` outside `.qforge-staging/`.
std::vector<std::string> FinalFiles(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    const std::string p = it->path().string();
    if (p.find(".qforge-staging") == std::string::npos && !it->is_directory(ec)) out.push_back(p);
  }
  return out;
}

TEST_F(ServiceTest, AStagedLayerChangedAfterItsTaskCompletedIsQuantizedAgain) {
  const std::string model = MakeModel("model", 2, 512, 1408);
  StartCoordinator();
  StartWorker();
  const std::string id = Submit(SubmitArgs(model, dir_ + "/out"));
  ASSERT_FALSE(id.empty());
  nlohmann::json job =
      WaitForJob(id, [](const nlohmann::json& j) { return Count(j, "succeeded") >= 2; }, 120s);
  ASSERT_GE(Count(job, "succeeded"), 2) << job.dump();
  ASSERT_EQ(StateOf(job), "JOB_STATE_QUANTIZING") << "the job got past QUANTIZING too soon";
  // One bit of a published staged layer flipped, in its tensor data (g_idx comes last).
  std::vector<std::string> staged = FilesContaining(dir_ + "/out/.qforge-staging", "layer.safetensors");
  std::sort(staged.begin(), staged.end());
  ASSERT_FALSE(staged.empty());
  {
    std::fstream f(staged.front(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-2, std::ios::end);
    char c = 0;
    f.read(&c, 1);
    c ^= 0x01;
    f.seekp(-2, std::ios::end);
    f.write(&c, 1);
    ASSERT_TRUE(f.good());
  }
  job = WaitForJob(id, Terminal, 240s);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << job.dump();
  EXPECT_GE(Count(job, "retries"), 1) << job.dump();  // the changed layer ran again
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());
  // The artifact holds what an undisturbed run produces, not the flipped bit.
  CommandResult offline = RunCommand(
      {kBin + "/tools/qforge-quantize", "--model", model, "--hessians",
       model + "/hessians.safetensors", "--output", dir_ + "/offline", "--bits", "4",
       "--group-size", "128", "--desc-act"},
      240s, {"QFORGE_NUM_THREADS=1"});
  ASSERT_EQ(offline.exit_code, 0) << offline.err;
  ExpectSameTensors(dir_ + "/out", dir_ + "/offline", ".qweight", 2 * 7);
  ExpectSameTensors(dir_ + "/out", dir_ + "/offline", ".g_idx", 2 * 7);
}

TEST_F(ServiceTest, ACoordinatorKilledDuringAssemblyLeavesNoFileWithoutItsManifest) {
  // Large unquantized tensors (embeddings, lm_head: 2 x 32 MB) make the assembly last long
  // enough to be caught writing.
  const std::string model = dir_ + "/model";
  CommandResult made = RunCommand(
      {kBin + "/tools/qforge-make-demo-model", "--output", model, "--layers", "2", "--hidden",
       "256", "--intermediate", "768", "--heads", "4", "--kv-heads", "2", "--vocab", "65536",
       "--samples", "64", "--max-shard-bytes", std::to_string(8 << 20)},
      120s);
  ASSERT_EQ(made.exit_code, 0) << made.err;
  StartCoordinator();
  const std::string listen = endpoint_;
  StartWorker();
  const std::string out = dir_ + "/out";
  const std::string id = Submit(SubmitArgs(model, out));
  ASSERT_FALSE(id.empty());
  // Kill the coordinator as soon as the assembly has written anything (or a final file shows).
  const std::string assembly_dir = out + "/.qforge-staging/" + id + "/assembly";
  const auto deadline = std::chrono::steady_clock::now() + 240s;
  bool caught = false;
  while (std::chrono::steady_clock::now() < deadline) {
    if (!FilesContaining(assembly_dir, "model").empty() || !FinalFiles(out).empty()) {
      coordinator_->Signal(SIGKILL);
      caught = true;
      break;
    }
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_TRUE(caught) << "the assembly never started";
  ASSERT_TRUE(coordinator_->Wait(10s).has_value());
  // Killed mid-assembly: no file of the artifact without its manifest, no temp file in it.
  const bool finished = fs::exists(out + "/qforge_manifest.json");
  EXPECT_FALSE(finished) << "the kill came after the assembly had finished: nothing was tested";
  if (!finished) EXPECT_EQ(FinalFiles(out), std::vector<std::string>{});
  for (const std::string& f : FinalFiles(out)) {
    EXPECT_EQ(f.find(".tmp-"), std::string::npos) << f;
  }
  // Restarted: the assembly runs again from a clean temp prefix and publishes everything.
  StartCoordinator(listen);
  nlohmann::json job = WaitForJob(id, Terminal, 240s);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << job.dump();
  EXPECT_TRUE(fs::exists(out + "/qforge_manifest.json"));
  EXPECT_FALSE(fs::exists(out + "/.qforge-staging"));
  for (const std::string& f : FinalFiles(out)) {
    EXPECT_EQ(f.find(".tmp-"), std::string::npos) << f;
  }
  nlohmann::json manifest = ReadJson(out + "/qforge_manifest.json");
  std::set<std::string> files;
  for (auto& [name, t] : manifest["tensors"].items()) files.insert(t["file"].get<std::string>());
  for (const std::string& f : files) EXPECT_TRUE(fs::exists(out + "/" + f)) << f;
  auto store = OpenObjectStore(out);
  ASSERT_TRUE(store.ok());
  EXPECT_TRUE(SafetensorsModel::Open(**store, "").ok());
}

TEST_F(ServiceTest, ARelativeOutputUriIsResolvedAtSubmitForWorkersElsewhere) {
  const std::string model = MakeModel("model", 2, 256, 768);
  // The coordinator runs in <dir>/coord; the worker in <dir>/elsewhere.
  StartCoordinatorIn(dir_ + "/coord");
  StartWorker(dir_ + "/elsewhere");
  // A client that sends a relative path as it is (the CLI would make it absolute itself).
  auto stub = v1::JobService::NewStub(
      grpc::CreateChannel(endpoint_, grpc::InsecureChannelCredentials()));
  v1::SubmitJobRequest req;
  v1::JobSpec* spec = req.mutable_spec();
  spec->set_model_uri(model);
  spec->set_output_uri("out");
  spec->set_method(v1::METHOD_GPTQ);
  spec->mutable_gptq()->set_bits(4);
  spec->mutable_gptq()->set_group_size(128);
  spec->mutable_calibration()->set_hessians_uri(model + "/hessians.safetensors");
  v1::Job submitted;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 60s);
  grpc::Status st = stub->SubmitJob(&ctx, req, &submitted);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(submitted.spec().output_uri(), dir_ + "/coord/out");  // resolved once, at submit
  nlohmann::json job = WaitForJob(submitted.id(), Terminal, 240s);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << job.dump();
  EXPECT_EQ(Count(job, "retries"), 0) << job.dump();
  EXPECT_TRUE(fs::exists(dir_ + "/coord/out/qforge_manifest.json"));
  EXPECT_FALSE(fs::exists(dir_ + "/elsewhere/out"));  // nothing staged where nobody looks
  EXPECT_TRUE(StagingLeft(dir_ + "/coord/out").empty());
}

TEST_F(ServiceTest, CancelGivesCancelledAndLeavesNoStaging) {
  const std::string model = MakeModel("model", 2, 512, 1408);
  StartCoordinator();
  StartWorker();
  const std::string id = Submit(SubmitArgs(model, dir_ + "/out"));
  ASSERT_FALSE(id.empty());
  WaitForJob(id, [](const nlohmann::json& j) { return Count(j, "running") >= 1; }, 60s);
  CommandResult r = Cli({"cancel", id, "-o", "json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json job = WaitForJob(id, Terminal, 60s);
  EXPECT_EQ(StateOf(job), "JOB_STATE_CANCELLED") << job.dump();
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());
  EXPECT_FALSE(fs::exists(dir_ + "/out/qforge_manifest.json"));
  // The CLI reports a cancelled job with its own exit code when waiting on it.
  r = Cli({"get", id});
  EXPECT_EQ(r.exit_code, 0);
}

TEST_F(ServiceTest, VptqJobSucceedsWithTensorsIdenticalToTheOfflinePath) {
  const std::string model = MakeModel("model", 1, 256, 768);
  StartCoordinator();
  StartWorker();
  StartWorker();
  const std::vector<std::string> vptq = {"--vector-len", "8", "--centroids", "256",
                                         "--res-centroids", "16", "--kmeans-iters", "10",
                                         "--seed", "7"};
  std::vector<std::string> args = {"submit", model, "--method", "vptq", "--hessians",
                                   model + "/hessians.safetensors", "--output", dir_ + "/out",
                                   "-o", "json", "--wait"};
  args.insert(args.end(), vptq.begin(), vptq.end());
  CommandResult r = Cli(args, 300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << r.out;
  EXPECT_EQ(Count(job, "succeeded"), Count(job, "total")) << r.out;
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());

  // config.json: quant_method vptq with one config_for_layers entry per quantized layer.
  std::ifstream config_file(dir_ + "/out/config.json");
  nlohmann::json config = nlohmann::json::parse(config_file, nullptr, false);
  ASSERT_TRUE(config.is_object());
  const nlohmann::json& q = config["quantization_config"];
  EXPECT_EQ(q["quant_method"], "vptq");
  ASSERT_TRUE(q["config_for_layers"].is_object());
  EXPECT_EQ(q["config_for_layers"].size(), 7u);
  const nlohmann::json& down = q["config_for_layers"]["model.layers.0.mlp.down_proj"];
  EXPECT_EQ(down["vector_lens"], nlohmann::json::array({-1, 8}));
  EXPECT_EQ(down["num_res_centroids"], nlohmann::json::array({-1, 16}));
  EXPECT_EQ(down["in_features"], 768);

  // The offline driver with the same options gives the same bytes (one solver thread each).
  std::vector<std::string> offline_args = {kBin + "/tools/qforge-quantize", "--model", model,
                                           "--hessians", model + "/hessians.safetensors",
                                           "--output", dir_ + "/offline", "--method", "vptq"};
  offline_args.insert(offline_args.end(), vptq.begin(), vptq.end());
  CommandResult offline = RunCommand(offline_args, 300s, {"QFORGE_NUM_THREADS=1"});
  ASSERT_EQ(offline.exit_code, 0) << offline.err;
  ExpectSameTensors(dir_ + "/out", dir_ + "/offline", ".res_centroids.weight", 7);
}

TEST_F(ServiceTest, BadSpecsAreRejectedWithTheFieldNamed) {
  const std::string model = MakeModel("model", 1, 256, 768);
  StartCoordinator();
  struct Case {
    std::vector<std::string> args;
    std::string needle;
  } cases[] = {
      {{"submit", model, "--bits", "4", "--group-size", "100", "--calibration", "none",
        "--output", dir_ + "/o1"},
       "group"},
      {{"submit", dir_ + "/no-such-model", "--bits", "4", "--calibration", "none", "--output",
        dir_ + "/o2"},
       "no-such-model"},
      {{"submit", model, "--bits", "4", "--hessians", dir_ + "/model/missing.safetensors",
        "--output", dir_ + "/o3"},
       "missing.safetensors"},
      {{"submit", model, "--bits", "4", "--calibration", "none", "--output", model},
       "empty"},
      {{"submit", model, "--method", "vptq", "--centroids", "1000", "--calibration", "none",
        "--output", dir_ + "/o5"},
       "spec.vptq.num_centroids"},
      {{"submit", model, "--method", "vptq", "--bits", "3", "--calibration", "none", "--output",
        dir_ + "/o6"},
       "--bits is a GPTQ option"},
      {{"submit", model, "--centroids", "4096", "--calibration", "none", "--output",
        dir_ + "/o7"},
       "--method vptq"},
  };
  for (const Case& c : cases) {
    CommandResult r = Cli(c.args);
    EXPECT_NE(r.exit_code, 0) << c.needle;
    EXPECT_NE(r.exit_code, 3) << "server unavailable is the wrong answer: " << r.err;
    EXPECT_NE((r.out + r.err).find(c.needle), std::string::npos)
        << "expected the message to mention '" << c.needle << "': " << r.out << r.err;
  }

  // A Hessian file lacking one module: the error names that module.
  std::ofstream(model + "/partial.txt") << "x";
  CommandResult r = RunCommand({kBin + "/tools/qforge-make-demo-model", "--output",
                                dir_ + "/other", "--layers", "1", "--hidden", "256",
                                "--intermediate", "512", "--heads", "4", "--kv-heads", "2",
                                "--vocab", "256", "--samples", "64"},
                               60s);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = Cli({"submit", model, "--bits", "4", "--hessians", dir_ + "/other/hessians.safetensors",
           "--output", dir_ + "/o4"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE((r.out + r.err).find("mlp.down_proj"), std::string::npos) << r.out << r.err;
}

TEST_F(ServiceTest, CorruptShardFailsTheJobNamingTheTensor) {
  const std::string model = MakeModel("model", 1, 256, 768);
  // Overwrite the data of one linear weight with NaNs (the header stays valid).
  auto store = OpenObjectStore(model);
  ASSERT_TRUE(store.ok());
  auto m = SafetensorsModel::Open(**store, "");
  ASSERT_TRUE(m.ok());
  const std::string victim = "model.layers.0.mlp.up_proj.weight";
  auto loc = m->Find(victim);
  ASSERT_TRUE(loc.ok());
  {
    std::fstream f(model + "/" + loc->key, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(loc->header->data_offset() + loc->info->data_begin));
    const std::string nan_bytes(4096, '\xff');  // 0xffff is a NaN in both f16 and bf16
    f.write(nan_bytes.data(), static_cast<std::streamsize>(nan_bytes.size()));
  }
  StartCoordinator();
  StartWorker();
  std::vector<std::string> args = SubmitArgs(model, dir_ + "/out");
  args.push_back("--wait");
  CommandResult r = Cli(args, 180s);
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_EQ(StateOf(job), "JOB_STATE_FAILED") << r.out;
  EXPECT_NE((r.out + r.err).find("model.layers.0.mlp.up_proj"), std::string::npos)
      << r.out << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/out/qforge_manifest.json"));
}

TEST_F(ServiceTest, DuplicateSubmitWithTheSameRequestIdReturnsTheSameJob) {
  const std::string model = MakeModel("model", 1, 256, 768);
  StartCoordinator();
  std::vector<std::string> args = SubmitArgs(model, dir_ + "/out");
  args.push_back("--request-id");
  args.push_back("4f0c8a2e-retry-me");
  const std::string first = Submit(args);
  const std::string second = Submit(args);
  ASSERT_FALSE(first.empty());
  EXPECT_EQ(first, second);
  CommandResult r = Cli({"list", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find(first), r.out.rfind(first)) << "the job must be listed once: " << r.out;
}


// ---- Calibration from token data -----------------------------------------------------------

const nlohmann::json* Calibration(const nlohmann::json& job) { return Field(job, "calibration"); }

int64_t Int(const nlohmann::json* j, const std::string& name) {
  if (j == nullptr) return -1;
  const nlohmann::json* v = Field(*j, name);
  if (v == nullptr) return -1;
  return v->is_string() ? std::stoll(v->get<std::string>()) : v->get<int64_t>();
}

bool Bool(const nlohmann::json* j, const std::string& name) {
  if (j == nullptr) return false;
  const nlohmann::json* v = Field(*j, name);
  return v != nullptr && v->is_boolean() && v->get<bool>();
}

TEST_F(ServiceTest, CalibratedJobSucceedsAndItsHessiansGiveTheSameArtifact) {
  const std::string model = MakeModel("model", 2, 256, 768);
  const std::string data = WriteTokens("data.safetensors", 8, 32, 256);
  StartCoordinator();
  StartWorker();
  StartWorker();
  std::vector<std::string> args = CalibArgs(model, data, dir_ + "/out");
  args.insert(args.end(), {"--calib-shard-samples", "3", "--wait"});
  CommandResult r = Cli(args, 300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << r.out;
  EXPECT_EQ(Count(job, "succeeded"), 3 + 1 + 14 + 1) << r.out;
  const nlohmann::json* cal = Calibration(job);
  ASSERT_NE(cal, nullptr) << r.out;
  EXPECT_EQ(Int(cal, "shards"), 3);
  EXPECT_EQ(Int(cal, "samples"), 8);
  EXPECT_EQ(Int(cal, "seq_len"), 32);
  EXPECT_EQ(Int(cal, "tokens"), 8 * 32);
  EXPECT_FALSE(Bool(cal, "cache_hit"));
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());

  // The manifest records the calibration.
  nlohmann::json manifest = ReadJson(dir_ + "/out/qforge_manifest.json");
  ASSERT_TRUE(manifest.is_object());
  const nlohmann::json& mc = manifest["calibration"];
  ASSERT_TRUE(mc.is_object()) << manifest.dump().substr(0, 2000);
  EXPECT_EQ(mc["dataset_uri"], data);
  EXPECT_EQ(mc["dataset_sha256"].get<std::string>().size(), 64u);
  EXPECT_EQ(mc["samples"], 8);
  EXPECT_EQ(mc["seq_len"], 32);
  EXPECT_EQ(mc["tokens"], 256);
  EXPECT_EQ(mc["shards"], 3);
  EXPECT_EQ(mc["cache_hit"], false);
  EXPECT_EQ(mc["packed"], false);
  EXPECT_EQ(mc["model_fingerprint"].get<std::string>().size(), 64u);
  EXPECT_GT(mc["seconds"].get<double>(), 0.0);
  const std::string hessians = mc["hessians_uri"].get<std::string>();
  ASSERT_NE(hessians.find("/data/hessian-cache/"), std::string::npos) << hessians;

  // The same job given the Hessians the calibration produced: byte-identical files.
  std::vector<std::string> given = SubmitArgs(model, dir_ + "/given");
  for (size_t i = 0; i < given.size(); ++i) {
    if (given[i] == "--hessians") given[i + 1] = hessians;
  }
  given.erase(std::find(given.begin(), given.end(), "--desc-act"));
  given.push_back("--wait");
  r = Cli(given, 300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const auto calibrated = FileHashes(dir_ + "/out");
  EXPECT_GT(calibrated.size(), 3u);
  EXPECT_EQ(calibrated, FileHashes(dir_ + "/given"));
  EXPECT_FALSE(ReadJson(dir_ + "/given/qforge_manifest.json").contains("calibration"));
}

TEST_F(ServiceTest, ASecondJobOnTheSameDataHitsTheCacheAndNoCacheRecalibrates) {
  const std::string model = MakeModel("model", 1, 256, 768);
  const std::string data = WriteTokens("data.safetensors", 4, 16, 256);
  StartCoordinator();
  StartWorker();
  std::vector<std::string> args = CalibArgs(model, data, dir_ + "/out1");
  args.push_back("--wait");
  CommandResult r = Cli(args, 300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json first = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_FALSE(Bool(Calibration(first), "cache_hit")) << r.out;
  EXPECT_EQ(Int(Calibration(first), "shards"), 1) << "one worker: one shard";

  // Same model and data: the cached Hessians, said so in the events; no CALIBRATE task.
  args = CalibArgs(model, data, dir_ + "/out2");
  args.push_back("--watch");
  r = Cli(args, 300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json second = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_TRUE(Bool(Calibration(second), "cache_hit")) << r.out;
  EXPECT_EQ(Int(Calibration(second), "shards"), 0);
  EXPECT_EQ(Count(second, "total"), 7 + 1) << r.out;
  EXPECT_NE(r.err.find("calibration: cached Hessians found ("), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("skipping calibration"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("calibration shard"), std::string::npos) << r.err;
  EXPECT_EQ(ReadJson(dir_ + "/out2/qforge_manifest.json")["calibration"]["cache_hit"], true);
  EXPECT_EQ(FileHashes(dir_ + "/out1"), FileHashes(dir_ + "/out2"));

  // --no-cache calibrates again.
  args = CalibArgs(model, data, dir_ + "/out3");
  args.insert(args.end(), {"--no-cache", "--wait"});
  r = Cli(args, 300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json third = nlohmann::json::parse(r.out, nullptr, false);
  EXPECT_FALSE(Bool(Calibration(third), "cache_hit")) << r.out;
  EXPECT_EQ(Int(Calibration(third), "shards"), 1);
  EXPECT_EQ(Count(third, "total"), 1 + 1 + 7 + 1) << r.out;
}

TEST_F(ServiceTest, BadCalibrationInputsAreRefusedNamingTheFieldSampleAndPosition) {
  const std::string model = MakeModel("model", 1, 256, 768);
  StartCoordinator();
  // An id outside the vocabulary (256) at sample 1, position 5.
  {
    auto store = OpenObjectStore(dir_);
    ASSERT_TRUE(store.ok());
    std::string bytes(3 * 8 * 4, '\0');
    const int32_t bad = 300;
    std::memcpy(&bytes[(1 * 8 + 5) * 4], &bad, 4);
    auto w = SafetensorsWriter::Create(**store, "vocab.safetensors",
                                       {{"input_ids", DType::kI32, {3, 8}}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->WriteTensorData("input_ids", bytes).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  // Ragged JSON Lines rows.
  std::ofstream(dir_ + "/ragged.jsonl") << "{\"input_ids\": [1, 2, 3, 4, 5]}\n"
                                        << "{\"input_ids\": [1, 2, 3, 4, 5, 6, 7]}\n";
  const std::string ok_data = WriteTokens("ok.safetensors", 2, 16, 256);
  // An architecture the forward pass does not know.
  const std::string gpt2 = dir_ + "/gpt2";
  fs::copy(model, gpt2, fs::copy_options::recursive);
  nlohmann::json config = ReadJson(model + "/config.json");
  config["architectures"] = {"GPT2LMHeadModel"};
  config["model_type"] = "gpt2";
  std::ofstream(gpt2 + "/config.json") << config.dump();

  struct Case {
    std::vector<std::string> args;
    std::vector<std::string> needles;
  };
  std::vector<Case> cases = {
      {CalibArgs(model, dir_ + "/vocab.safetensors", dir_ + "/o1"),
       {"spec.calibration.dataset_uri", "sample 1", "position 5", "300", "vocab"}},
      {CalibArgs(model, dir_ + "/ragged.jsonl", dir_ + "/o2"),
       {"spec.calibration.dataset_uri", "--calib-seq-len"}},
      {CalibArgs(gpt2, ok_data, dir_ + "/o4"), {"GPT2LMHeadModel", "LlamaForCausalLM"}},
      {CalibArgs(model, dir_ + "/missing.safetensors", dir_ + "/o5"),
       {"spec.calibration.dataset_uri", "missing.safetensors"}},
  };
  std::vector<std::string> long_seq = CalibArgs(model, ok_data, dir_ + "/o3");
  long_seq.insert(long_seq.end(), {"--calib-seq-len", "5000"});
  cases.push_back({long_seq, {"max_position_embeddings"}});
  for (const Case& c : cases) {
    CommandResult r = Cli(c.args);
    EXPECT_EQ(r.exit_code, 7) << "INVALID_ARGUMENT: " << r.out << r.err;
    for (const std::string& n : c.needles) {
      EXPECT_NE((r.out + r.err).find(n), std::string::npos)
          << "expected '" << n << "' in: " << r.out << r.err;
    }
  }
  // Calibration options without data are a usage error; --calibration none warns.
  CommandResult r = Cli({"submit", model, "--calibration", "none", "--calib-samples", "8",
                         "--output", dir_ + "/o6"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--calib-samples"), std::string::npos) << r.err;
  r = Cli({"submit", model, "--calibration", "none", "--output", dir_ + "/o7", "--validate-only"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("costs quality"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--calibration DATA"), std::string::npos) << r.err;
  r = Cli({"list", "-o", "json"});
  EXPECT_EQ(r.out.find("JOB_STATE"), std::string::npos) << "no job was created: " << r.out;
}

TEST_F(ServiceTest, AWorkerKilledDuringCalibrateAndACoordinatorKilledAfterTheShardsStillFinish) {
  const std::string model = MakeModel("model", 2, 512, 1408);
  const std::string data = WriteTokens("data.safetensors", 12, 256, 256);
  StartCoordinator();
  const std::string listen = endpoint_;
  StartWorker();
  std::vector<std::string> args = CalibArgs(model, data, dir_ + "/out");
  args.insert(args.end(), {"--calib-shard-samples", "4"});
  const std::string id = Submit(args);
  ASSERT_FALSE(id.empty());
  nlohmann::json job = WaitForJob(
      id,
      [](const nlohmann::json& j) {
        return StateOf(j) == "JOB_STATE_CALIBRATING" && Count(j, "running") >= 1;
      },
      120s);
  ASSERT_EQ(StateOf(job), "JOB_STATE_CALIBRATING") << job.dump();
  EXPECT_NE(Field(job, "progress"), nullptr);
  workers_.front()->Signal(SIGKILL);
  ASSERT_TRUE(workers_.front()->Wait(10s).has_value());
  StartWorker();
  StartWorker();

  // Every shard done (nothing else succeeds before): the coordinator goes down hard.
  job = WaitForJob(id, [](const nlohmann::json& j) { return Count(j, "succeeded") >= 3; }, 240s);
  ASSERT_GE(Count(job, "succeeded"), 3) << job.dump();
  ASSERT_FALSE(Terminal(job)) << "the job finished before the coordinator could be killed";
  coordinator_->Signal(SIGKILL);
  ASSERT_TRUE(coordinator_->Wait(10s).has_value());
  StartCoordinator(listen);
  ASSERT_EQ(endpoint_, listen);
  job = WaitForJob(id, Terminal, 300s);
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << job.dump();
  EXPECT_GE(Count(job, "retries"), 1) << "the killed worker's shard ran again: " << job.dump();
  EXPECT_EQ(Int(Calibration(job), "tokens"), 12 * 256) << job.dump();
  nlohmann::json manifest = ReadJson(dir_ + "/out/qforge_manifest.json");
  EXPECT_EQ(manifest["calibration"]["shards"], 3);
  // Every staged object is gone; only the temp file of the killed worker's unfinished write
  // may remain (LocalStore lists no temp files, so the clean-up cannot see it).
  for (const std::string& f : StagingLeft(dir_ + "/out")) {
    EXPECT_NE(f.find(".tmp-"), std::string::npos) << f;
  }
}


// ---- Evaluation (ASSEMBLE → EVALUATE × shards → EVAL_REDUCE → quality gate) ----------------

const nlohmann::json* Quality(const nlohmann::json& job) { return Field(job, "quality"); }

double Num(const nlohmann::json* j, const std::string& name) {
  if (j == nullptr) return -1;
  const nlohmann::json* v = Field(*j, name);
  return v != nullptr && v->is_number() ? v->get<double>() : -1;
}

// The value of the Prometheus sample `series` (name with labels) in `text`, -1 if absent.
double Sample(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + series.size() + 2));
}

TEST_F(ServiceTest, GptqJobWithEvaluationPassesItsGateAndAnEvalOnlyJobMeasuresTheSame) {
  const std::string model = MakeModel("model", 2, 256, 768);
  const std::string data = WriteTokens("data.safetensors", 8, 32, 256, 1);
  const std::string eval = WriteTokens("eval.safetensors", 6, 32, 256, 2);
  StartCoordinator();
  StartWorker();
  StartWorker();
  std::vector<std::string> args = CalibArgs(model, data, dir_ + "/out");
  args.insert(args.end(), {"--calib-shard-samples", "4", "--eval", eval, "--eval-shard-samples",
                           "3", "--max-ppl-increase", "1000", "--max-kld", "100", "--wait"});
  CommandResult r = Cli(args, 300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << r.out;
  // CALIBRATE × 2, REDUCE, QUANTIZE × 14, ASSEMBLE, EVALUATE × 2, EVAL_REDUCE.
  EXPECT_EQ(Count(job, "succeeded"), 2 + 1 + 14 + 1 + 2 + 1) << r.out;
  const nlohmann::json* q = Quality(job);
  ASSERT_NE(q, nullptr) << r.out;
  EXPECT_EQ(Int(q, "samples"), 6);
  EXPECT_EQ(Int(q, "tokens"), 6 * 31);
  EXPECT_GT(Num(q, "ppl_reference"), 1.0);
  EXPECT_GT(Num(q, "ppl_quantized"), 1.0);
  EXPECT_GT(Num(q, "mean_kl"), 0.0);
  EXPECT_GT(Num(q, "top1_agreement"), 0.0);
  EXPECT_TRUE(Bool(q, "gate_enabled"));
  EXPECT_TRUE(Bool(q, "gate_passed"));
  EXPECT_GT(Num(q, "bits_per_weight"), 4.0);
  EXPECT_LT(Num(q, "bits_per_weight"), 5.0);
  EXPECT_EQ(Field(*q, "modules")->size(), 14u);
  EXPECT_EQ(Field(*q, "dataset_uri")->get<std::string>(), eval);
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());

  // The manifest carries the same measurement and the gate's outcome.
  const nlohmann::json manifest = ReadJson(dir_ + "/out/qforge_manifest.json");
  ASSERT_TRUE(manifest.is_object());
  EXPECT_EQ(manifest["quality_gate"], "passed");
  EXPECT_DOUBLE_EQ(manifest["quality"]["mean_kl"].get<double>(), Num(q, "mean_kl"));
  EXPECT_DOUBLE_EQ(manifest["quality"]["ppl_candidate"].get<double>(), Num(q, "ppl_quantized"));
  EXPECT_EQ(manifest["quality"]["gate"]["passed"], true);
  EXPECT_TRUE(manifest["calibration"].is_object());

  // `qforge get` shows the quality block.
  const std::string id = Field(job, "id")->get<std::string>();
  r = Cli({"get", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* needle : {"Perplexity:", "original ->", "Mean KL:", "Top-1 agree:",
                             "Quality gate:", "PASSED", "WORST MODULES", "model.layers."}) {
    EXPECT_NE(r.out.find(needle), std::string::npos) << needle << "\n" << r.out;
  }

  // The report: beside the manifest, and through `qforge report`.
  EXPECT_TRUE(fs::exists(dir_ + "/out/report.html"));
  r = Cli({"report", id, "--output", dir_ + "/page.html"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream page_file(dir_ + "/page.html");
  const std::string page((std::istreambuf_iterator<char>(page_file)),
                         std::istreambuf_iterator<char>());
  EXPECT_NE(page.find("<html"), std::string::npos);
  EXPECT_NE(r.err.find(dir_ + "/out/report.html"), std::string::npos) << r.err;

  // Prometheus: one evaluation of a gptq job, its gate passed; no job-id label.
  const std::string text = HttpGet(metrics_, "/metrics");
  EXPECT_EQ(Sample(text, R"(qforge_eval_ppl_increase_pct_count{method="gptq"})"), 1) << text;
  EXPECT_EQ(Sample(text, R"(qforge_eval_mean_kl_count{method="gptq"})"), 1);
  EXPECT_EQ(Sample(text, R"(qforge_quality_gate_total{result="passed"})"), 1);
  EXPECT_EQ(text.find(id), std::string::npos) << "no job-id labels";

  // The artifact evaluated on its own (`qforge eval`): the same figures.
  r = Cli({"eval", dir_ + "/out", "--reference", model, "--eval", eval, "--max-kld", "100",
           "-o", "json"},
          300s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  nlohmann::json only = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_EQ(StateOf(only), "JOB_STATE_SUCCEEDED") << r.out;
  // Two live workers: two shards of 3 samples, and their reduce.
  EXPECT_EQ(Count(only, "total"), 2 + 1) << r.out;
  const nlohmann::json* oq = Quality(only);
  ASSERT_NE(oq, nullptr);
  EXPECT_NEAR(Num(oq, "mean_kl"), Num(q, "mean_kl"), 1e-9 * Num(q, "mean_kl"));
  EXPECT_NEAR(Num(oq, "ppl_quantized"), Num(q, "ppl_quantized"), 1e-9 * Num(q, "ppl_quantized"));
  EXPECT_DOUBLE_EQ(Num(oq, "top1_agreement"), Num(q, "top1_agreement"));
  EXPECT_NEAR(Num(oq, "bits_per_weight"), Num(q, "bits_per_weight"), 1e-12);
  EXPECT_EQ(ReadJson(dir_ + "/out/qforge_manifest.json"), manifest)
      << "an evaluation-only job does not touch the model it reads";
  EXPECT_EQ(Sample(HttpGet(metrics_, "/metrics"), R"(qforge_eval_mean_kl_count{method="none"})"),
            1);
}

TEST_F(ServiceTest, AMissedQualityGateFailsTheJobAndKeepsTheArtifactMarkedFailed) {
  const std::string model = MakeModel("model", 1, 256, 768);
  const std::string data = WriteTokens("data.safetensors", 4, 16, 256, 1);
  const std::string eval = WriteTokens("eval.safetensors", 4, 16, 256, 3);
  StartCoordinator();
  StartWorker();
  // The calibration data as evaluation data is refused, saying how to override.
  std::vector<std::string> args = CalibArgs(model, data, dir_ + "/out");
  args.insert(args.end(), {"--eval", data, "--validate-only"});
  CommandResult r = Cli(args);
  EXPECT_EQ(r.exit_code, 7) << r.out << r.err;
  EXPECT_NE(r.err.find("spec.evaluation.dataset_uri"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--eval-allow-calibration-data"), std::string::npos) << r.err;
  args.push_back("--eval-allow-calibration-data");
  r = Cli(args);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  // A gate flag without evaluation data is a usage error.
  r = Cli({"submit", model, "--calibration", "none", "--max-kld", "0.1", "--output",
           dir_ + "/o2"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--max-kld"), std::string::npos) << r.err;

  // Any change of the distributions misses a KL threshold of 0.
  args = CalibArgs(model, data, dir_ + "/out");
  args.insert(args.end(), {"--eval", eval, "--max-kld", "0", "--wait"});
  r = Cli(args, 300s);
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;  // the job-failed exit code
  nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_EQ(StateOf(job), "JOB_STATE_FAILED") << r.out;
  const nlohmann::json* error = Field(job, "error");
  ASSERT_NE(error, nullptr);
  EXPECT_EQ(Field(*error, "reason")->get<std::string>(), "QUALITY_GATE");
  const std::string message = Field(*error, "message")->get<std::string>();
  EXPECT_NE(message.find("mean KL"), std::string::npos) << message;
  EXPECT_NE(message.find("allowed 0"), std::string::npos) << message;
  EXPECT_NE(r.err.find("quality gate"), std::string::npos) << r.err;
  const nlohmann::json* q = Quality(job);
  ASSERT_NE(q, nullptr);
  EXPECT_TRUE(Bool(q, "gate_enabled"));
  EXPECT_FALSE(Bool(q, "gate_passed"));
  // The artifact stays, its manifest marked, for a pipeline to inspect.
  const nlohmann::json manifest = ReadJson(dir_ + "/out/qforge_manifest.json");
  ASSERT_TRUE(manifest.is_object());
  EXPECT_EQ(manifest["quality_gate"], "failed");
  EXPECT_EQ(manifest["quality"]["gate"]["passed"], false);
  EXPECT_TRUE(fs::exists(dir_ + "/out/config.json"));
  EXPECT_TRUE(StagingLeft(dir_ + "/out").empty());
  const std::string id = Field(job, "id")->get<std::string>();
  r = Cli({"get", id});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.out.find("QUALITY_GATE"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("FAILED: mean KL"), std::string::npos) << r.out;
  EXPECT_EQ(Sample(HttpGet(metrics_, "/metrics"), R"(qforge_quality_gate_total{result="failed"})"),
            1);

  // `qforge eval` with the same gate fails the same way; without one it succeeds.
  r = Cli({"eval", dir_ + "/out", "--reference", model, "--eval", eval, "--max-kld", "0"}, 300s);
  EXPECT_EQ(r.exit_code, 1) << r.out << r.err;
  EXPECT_NE(r.out.find("QUALITY_GATE"), std::string::npos) << r.out;
  r = Cli({"eval", dir_ + "/out", "--reference", model, "--eval", eval, "--watch"}, 300s);
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("none (no threshold set)"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("EVALUATING"), std::string::npos) << r.err;
}

// What a new user types first: help with no arguments, a near-miss subcommand, --version on
// every binary (issue 17).
TEST_F(ServiceTest, HelpOnNoArgumentsDidYouMeanAndVersionOnEveryBinary) {
  CommandResult r = RunCommand({kBin + "/client/qforge"}, 30s);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  for (const char* word : {"submit", "cancel", "Exit codes"}) {
    EXPECT_NE(r.out.find(word), std::string::npos) << word << "\n" << r.out;
  }
  r = RunCommand({kBin + "/client/qforge", "sumbit", "model"}, 30s);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("'sumbit' is not a qforge command; did you mean 'submit'?"),
            std::string::npos)
      << r.err;
  r = RunCommand({kBin + "/client/qforge", "--endpoint", "127.0.0.1:1", "frobnicate"}, 30s);
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("commands: submit"), std::string::npos) << r.err;
  for (const std::string bin : {"/client/qforge", "/server/qforge-coordinator",
                                "/worker/qforge-worker", "/tools/qforge-quantize",
                                "/tools/qforge-make-demo-model", "/tools/qforge-report"}) {
    r = RunCommand({kBin + bin, "--version"}, 30s);
    EXPECT_EQ(r.exit_code, 0) << bin << ": " << r.err;
    EXPECT_NE((r.out + r.err).find(QFORGE_PROJECT_VERSION), std::string::npos)
        << bin << ": " << r.out << r.err;
  }
}

// The rough edges of issue 17: --validate-only prints the plan, counts name what they count,
// a missing model "does not exist", a job queued with no live worker gets a hint, cancel
// exits 0 once the job is stopped or had already ended, quantize_config.json says
// "true_sequential": false and GPTQ layers have their stored bits per weight.
TEST_F(ServiceTest, ValidatePlanNoWorkerHintCancelExitCodesAndGptqArtifactFigures) {
  const std::string model = MakeModel("model", 4, 128, 256);
  StartCoordinator();
  const std::string hessians = model + "/hessians.safetensors";
  std::vector<std::string> plan = {"submit", model, "--hessians", hessians, "--include",
                                   "q_proj", "--output", dir_ + "/plan", "--validate-only"};
  CommandResult r = Cli(plan);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("4 layers would be quantized; 5 tasks: 4 quantize + assemble"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.out.find("Plan:"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("UNKNOWN"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("Job:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Method:"), std::string::npos) << r.out;

  r = Cli({"submit", dir_ + "/no-such-model", "--hessians", hessians, "--output", dir_ + "/o"});
  EXPECT_EQ(r.exit_code, 7) << r.err;
  EXPECT_NE(r.err.find("does not exist"), std::string::npos) << r.err;

  // No worker: the job waits, and the CLI says why.
  r = Cli({"submit", model, "--hessians", hessians, "--output", dir_ + "/queued", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("no live worker"), std::string::npos) << r.err;
  const std::string queued = Field(nlohmann::json::parse(r.out), "id")->get<std::string>();
  r = Cli({"get", queued});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("0/28 layers + assemble"), std::string::npos) << r.out;
  EXPECT_NE(r.err.find("qforge-worker --coordinator " + endpoint_), std::string::npos) << r.err;
  // cancel --wait exits 0 once the job is cancelled (not 5); again on the cancelled job: 0.
  r = Cli({"cancel", queued, "--wait", "-o", "json"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(StateOf(nlohmann::json::parse(r.out, nullptr, false)), "JOB_STATE_CANCELLED") << r.out;
  r = Cli({"cancel", queued});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  // Waiting on a job someone cancelled still reports it (5).
  r = Cli({"watch", queued});
  EXPECT_EQ(r.exit_code, 5) << r.err;

  StartWorker();
  std::vector<std::string> args = {"submit", model, "--hessians", hessians, "--include",
                                   R"(layers\.0\..*_proj)", "--output", dir_ + "/out", "-o",
                                   "json", "--wait"};
  r = Cli(args, 180s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(r.err.find("no live worker"), std::string::npos) << r.err;
  const std::string done = Field(nlohmann::json::parse(r.out), "id")->get<std::string>();
  // Cancelling a finished job is not an error: a note, exit 0.
  r = Cli({"cancel", done});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("already ended SUCCEEDED; nothing to cancel"), std::string::npos) << r.err;
  r = Cli({"cancel", done, "--wait"});
  EXPECT_EQ(r.exit_code, 0) << r.err;

  const nlohmann::json qc = ReadJson(dir_ + "/out/quantize_config.json");
  EXPECT_EQ(qc["true_sequential"], false) << qc.dump();
  EXPECT_EQ(ReadJson(dir_ + "/out/config.json")["quantization_config"]["true_sequential"], false);
  const nlohmann::json manifest = ReadJson(dir_ + "/out/qforge_manifest.json");
  ASSERT_EQ(manifest["layers"].size(), 7u);
  for (const auto& [name, layer] : manifest["layers"].items()) {
    // 4-bit codes, per group of 128 an fp16 scale and a 4-bit zero, and g_idx: above 4.
    const double bpw = layer["bits_per_weight"].get<double>();
    EXPECT_GT(bpw, 4.0) << name;
    EXPECT_LT(bpw, 5.0) << name;
  }
}

TEST_F(ServiceTest, LayersEventsWatchSummaryAndDeleteThroughTheCli) {
  const std::string model = MakeModel("model", 2, 128, 256);
  StartCoordinator();
  StartWorker();
  const std::string hessians = model + "/hessians.safetensors";
  CommandResult r = Cli({"submit", model, "--hessians", hessians, "--output", dir_ + "/out",
                         "-o", "json", "--wait"},
                        180s);
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  const std::string id = Field(nlohmann::json::parse(r.out), "id")->get<std::string>();

  // qforge layers -o json: every layer with its figures, agreeing with the manifest.
  r = Cli({"layers", id, "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json layers = nlohmann::json::parse(r.out, nullptr, false);
  ASSERT_TRUE(layers.contains("layers")) << r.out;
  ASSERT_EQ(layers["layers"].size(), 14u) << r.out;
  EXPECT_EQ(layers["totalLayers"], 14);
  const nlohmann::json manifest = ReadJson(dir_ + "/out/qforge_manifest.json");
  for (const nlohmann::json& l : layers["layers"]) {
    const std::string module = l["module"].get<std::string>();
    EXPECT_EQ(l["state"], "TASK_STATE_SUCCEEDED") << module;
    EXPECT_EQ(l["method"], "METHOD_GPTQ") << module;
    EXPECT_EQ(l["gptq"]["bits"], 4) << module;
    EXPECT_GT(l["relativeError"].get<double>(), 0) << module;
    EXPECT_GT(l["seconds"].get<double>(), 0) << module;
    EXPECT_FALSE(l["workerId"].get<std::string>().empty()) << module;
    const nlohmann::json* entry = nullptr;
    for (const auto& [name, layer] : manifest["layers"].items()) {
      if (name.rfind(module, 0) == 0) entry = &layer;
    }
    ASSERT_NE(entry, nullptr) << module;
    EXPECT_NEAR(l["bitsPerWeight"].get<double>(), (*entry)["bits_per_weight"].get<double>(), 1e-9)
        << module;
  }
  // The table: largest relative error first.
  r = Cli({"layers", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("MODULE", 0), 0u) << r.out;
  double previous = 1e300;
  int rows = 0;
  const std::vector<std::string> table = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  for (const std::string& line : table) {
    if (line.rfind("MODULE", 0) == 0) continue;
    std::vector<std::string> cols = absl::StrSplit(line, ' ', absl::SkipEmpty());
    ASSERT_GE(cols.size(), 4u) << line;
    const double err = std::stod(cols[3]);
    EXPECT_LE(err, previous) << r.out;
    previous = err;
    ++rows;
  }
  EXPECT_EQ(rows, 14);
  EXPECT_NE(r.err.find("Layers: 14/14 quantized"), std::string::npos) << r.err;

  // qforge events: the history, then the end; -o json: one JobEvent per line, in sequence.
  r = Cli({"events", id});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("SUCCEEDED"), std::string::npos) << r.out;
  r = Cli({"events", id, "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  int64_t last = 0;
  int task_events = 0;
  const std::vector<std::string> lines = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  for (const std::string& line : lines) {
    const nlohmann::json e = nlohmann::json::parse(line, nullptr, false);
    ASSERT_FALSE(e.is_discarded()) << line;
    const int64_t seq = std::stoll(e["sequence"].get<std::string>());
    EXPECT_EQ(seq, last + 1) << line;
    last = seq;
    EXPECT_NE(e["type"], "EVENT_TYPE_UNSPECIFIED") << line;
    task_events += e["type"] == "EVENT_TYPE_TASK";
  }
  EXPECT_GE(task_events, 28);  // each layer leased and succeeded
  r = Cli({"events", id, "-f"}, 30s);  // a finished job: follows to its last event and ends
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("SUCCEEDED"), std::string::npos) << r.out;

  // watch of a finished job: the job, then what its layers came to.
  r = Cli({"watch", id}, 30s);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("Layers: 14/14 quantized, mean rel err"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("worst 1: model.layers."), std::string::npos) << r.out;

  // delete: a queued job is refused (7), a finished one goes (then 4), the artifact stays.
  workers_.clear();  // killed: the next job stays QUEUED
  r = Cli({"submit", model, "--hessians", hessians, "--output", dir_ + "/queued", "-o", "json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string queued = Field(nlohmann::json::parse(r.out), "id")->get<std::string>();
  r = Cli({"delete", queued});
  EXPECT_EQ(r.exit_code, 7) << r.err;
  EXPECT_NE(r.err.find("cancel it first"), std::string::npos) << r.err;
  r = Cli({"delete", id});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = Cli({"get", id});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  r = Cli({"layers", id});
  EXPECT_EQ(r.exit_code, 4) << r.err;
  EXPECT_TRUE(fs::exists(dir_ + "/out/qforge_manifest.json"));
}

TEST_F(ServiceTest, FiveHundredOpenStreamsDoNotSlowAJob) {
  // Defect: 150 open WatchJob streams held the coordinator's threads, so SubmitJob and
  // AcquireTask took seconds and a 1 s job took 37 s. Now a waiting stream holds no thread.
  constexpr int kStreams = 500;
  const std::string model = MakeModel("model", 2, 128, 256);
  StartCoordinator();
  StartWorker();
  const std::string hessians = model + "/hessians.safetensors";
  auto run_seconds = [&](const std::string& id) {
    nlohmann::json job = WaitForJob(id, Terminal, 300s);
    EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED") << job.dump();
    const int64_t start = std::stoll(Field(job, "start_time_unix_ms")->get<std::string>());
    const int64_t end = std::stoll(Field(job, "end_time_unix_ms")->get<std::string>());
    return static_cast<double>(end - start) / 1000.0;
  };
  // The undisturbed job.
  const double alone = run_seconds(
      Submit({"submit", model, "--hessians", hessians, "--output", dir_ + "/alone", "-o", "json"}));

  // The same job, queued (no worker), with 500 streams open on it before it starts.
  workers_.clear();
  const std::string id =
      Submit({"submit", model, "--hessians", hessians, "--output", dir_ + "/watched", "-o", "json"});
  auto channel = grpc::CreateChannel(endpoint_, grpc::InsecureChannelCredentials());
  auto stub = v1::JobService::NewStub(channel);
  std::vector<std::unique_ptr<EventCounter>> streams;
  for (int i = 0; i < kStreams; ++i) streams.push_back(std::make_unique<EventCounter>(stub.get(), id));
  for (auto& s : streams) ASSERT_TRUE(s->WaitForEvents(1, 60s)) << "a stream got no history";
  const int threads_before = ThreadsOf(coordinator_->pid());

  // While they are open: calls answer at once, the worker gets the job, the job runs.
  double slowest_call = 0;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    CommandResult r = Cli({"get", id, "-o", "json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = Cli({"submit", model, "--hessians", hessians, "--output", dir_ + "/probe",
             "--validate-only"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    slowest_call = std::max(
        slowest_call,
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 2);
  }
  StartWorker();
  const double watched = run_seconds(id);
  const int threads_after = ThreadsOf(coordinator_->pid());

  // Every stream saw every event in order and ended with the job.
  const nlohmann::json job = GetJob(id);
  int ended_ok = 0;
  int64_t last = 0;
  for (auto& s : streams) {
    std::optional<grpc::Status> st = s->WaitDone(60s);
    ASSERT_TRUE(st.has_value()) << "a stream did not end with its job";
    ended_ok += st->ok();
    EXPECT_EQ(s->gaps(), 0);
    last = std::max(last, s->last());
  }
  EXPECT_EQ(ended_ok, kStreams);
  for (auto& s : streams) EXPECT_EQ(s->last(), last);
  std::printf("500 streams: job %.2f s (alone %.2f s), slowest CLI call %.2f s, coordinator "
              "threads %d -> %d\n",
              watched, alone, slowest_call, threads_before, threads_after);
  EXPECT_LT(watched, 2 * alone + 3.0) << "the job ran much slower with the streams open";
  EXPECT_LT(slowest_call, 2.0);
  // Streams hold no thread: far fewer threads than streams.
  EXPECT_LT(threads_before, 100) << threads_before;
  EXPECT_EQ(StateOf(job), "JOB_STATE_SUCCEEDED");
}

TEST_F(ServiceTest, ABadRetainJobsIsAUsageErrorNamingTheFlag) {
  for (const std::string& bad : {std::string("abc"), std::string("-5d"), std::string("-1h"),
                                 std::string("99999999999999999d"), std::string("")}) {
    CommandResult r = RunCommand({kBin + "/server/qforge-coordinator", "--listen", "127.0.0.1:0",
                                  "--data-dir", dir_ + "/data", "--metrics-listen", "off",
                                  "--retain-jobs", bad},
                                 30s);
    EXPECT_EQ(r.exit_code, 2) << "'" << bad << "': " << r.err;
    EXPECT_NE(r.err.find("--retain-jobs: '" + bad + "'"), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace qforge

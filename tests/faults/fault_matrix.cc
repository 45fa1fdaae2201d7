#include "tests/faults/fault_matrix.h"

#include <sys/wait.h>

#include <csignal>
#include <optional>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "tests/integration/service_cluster.h"

namespace qforge::testing {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

constexpr char kManifest[] = "qforge_manifest.json";

FaultCell Cell(std::string name, FaultTarget target, std::string plan, std::string reason = "") {
  return FaultCell{std::move(name), target, std::move(plan), std::move(reason)};
}

// Files of the artifact proper: everything under `out` outside `.qforge-staging/`.
std::vector<std::string> FinalFiles(const std::string& out) {
  std::vector<std::string> files;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(out, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    const std::string rel = fs::relative(it->path(), out, ec).string();
    if (rel.rfind(".qforge-staging", 0) == 0) {
      it.disable_recursion_pending();
      continue;
    }
    if (!it->is_directory(ec)) files.push_back(rel);
  }
  return files;
}

// Files under `out` that a store writer left behind (".<name>.tmp-<hex>").
std::vector<std::string> TempFiles(const std::string& out) {
  std::vector<std::string> files;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(out, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (it->path().filename().string().find(".tmp-") != std::string::npos) {
      files.push_back(it->path().string());
    }
  }
  return files;
}

// "" when the output holds no final file without the manifest; else what it holds.
std::string FinalWithoutManifest(const std::string& out) {
  const std::vector<std::string> files = FinalFiles(out);
  bool manifest = false;
  for (const std::string& f : files) manifest |= f == kManifest;
  if (manifest || files.empty()) return "";
  std::string list;
  for (const std::string& f : files) absl::StrAppend(&list, list.empty() ? "" : ", ", f);
  return list;
}

std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Whether any process log under `dir` says a fault fired.
bool FaultFired(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() != ".stderr") continue;
    if (ReadFile(e.path().string()).find("qforge-fault: fired") != std::string::npos) return true;
  }
  return false;
}

// Runs one job on a ServiceCluster, restarting killed processes, and checks the invariants.
class CellRun : public ServiceCluster {
 public:
  CellRun(const std::string& bin, const std::string& model_root, const FaultCell& cell)
      : ServiceCluster(bin), model_root_(model_root), cell_(cell) {}

  void Violation(std::string what) { result.violations.push_back(std::move(what)); }

  // Starts the cluster with the cell's plan; false (with a violation) when it cannot.
  bool Start() {
    const std::string faults = "QFORGE_FAULTS=" + cell_.plan;
    coordinator_spec_ = {bin_ + "/tests/faults/qforge-coordinator-faults",
                         {"--allow-root", model_root_}, {}};
    worker_spec_ = {bin_ + "/tests/faults/qforge-worker-faults", {}, {}};
    ProcessSpec c = coordinator_spec_, w = worker_spec_;
    if (cell_.target != FaultTarget::kWorker) c.env.push_back(faults);
    if (cell_.target != FaultTarget::kCoordinator) w.env.push_back(faults);
    if (absl::Status s = StartCoordinator("127.0.0.1:0", c); !s.ok()) {
      Violation(absl::StrCat("setup: ", s.ToString()));
      return false;
    }
    listen_ = endpoint();
    if (absl::Status s = StartWorker("", w); !s.ok()) {
      Violation(absl::StrCat("setup: ", s.ToString()));
      return false;
    }
    return true;
  }

  // Restarts what died (without faults), checking the output while it is dead. While all
  // live, final files without the manifest seen at two polls in a row (100 ms or more
  // apart: longer than any publication's renames) are a violation too.
  void Supervise() {
    const bool coordinator_dead = !coordinator_->Running();
    bool worker_dead = false;
    for (auto& w : workers_) worker_dead |= !w->Running();
    if (!coordinator_dead && !worker_dead) {
      const std::string left = out_.empty() ? "" : FinalWithoutManifest(out_);
      // (The documented window of a kill between the renames lasts until the restarted
      // coordinator has assembled again.)
      if (!left.empty() && !last_live_left_.empty() && !publishing_window_seen_) {
        Violation("final files without the manifest in two polls in a row: " + left);
      }
      last_live_left_ = left;
      return;
    }
    last_live_left_.clear();
    // Frozen: no coordinator writes while it is dead; a dead worker publishes nothing final.
    if (const std::string left = FinalWithoutManifest(out_); !left.empty()) {
      if (cell_.name == "coordinator.kill.assemble_publishing") {
        publishing_window_seen_ = true;  // documented: repaired by the restarted coordinator
      } else {
        Violation("final files without the manifest while a process was dead: " + left);
      }
    }
    for (const std::string& t : TempFiles(out_)) {
      if (t.find(".qforge-staging") == std::string::npos) {
        Violation("a store temp file outside the staging prefix: " + t);
      }
    }
    if (coordinator_dead) {
      std::optional<int> code = coordinator_->Wait(5s);
      if (code != 128 + SIGKILL) {
        Violation(absl::StrCat("the coordinator exited with ", code.value_or(-1),
                               ", not by a kill: ", coordinator_->Stderr()));
      }
      ++result.restarts;
      // On the port the workers know (StartCoordinator retries while it is briefly taken).
      const absl::Status s = StartCoordinator(listen_, coordinator_spec_);
      if (!s.ok()) Violation("restarting the coordinator: " + s.ToString());
    }
    for (auto it = workers_.begin(); it != workers_.end();) {
      if ((*it)->Running()) {
        ++it;
        continue;
      }
      std::optional<int> code = (*it)->Wait(5s);
      if (code != 128 + SIGKILL) {
        Violation(absl::StrCat("a worker exited with ", code.value_or(-1), ", not by a kill: ",
                               (*it)->Stderr()));
      }
      it = workers_.erase(it);
      ++result.restarts;
    }
    while (workers_.empty()) {
      if (absl::Status s = StartWorker("", worker_spec_); !s.ok()) {
        Violation("restarting a worker: " + s.ToString());
        break;
      }
    }
  }

  // Submits (retrying while the coordinator is down; the request id makes it idempotent).
  std::string Submit(const std::string& model, const std::string& request_id) {
    std::vector<std::string> args = SubmitArgs(model, out_);
    args.insert(args.end(), {"--request-id", request_id});
    const auto deadline = std::chrono::steady_clock::now() + 90s;
    std::string last;
    while (std::chrono::steady_clock::now() < deadline) {
      CommandResult r = Cli(args);
      if (r.exit_code == 0) {
        nlohmann::json job = nlohmann::json::parse(r.out, nullptr, false);
        const nlohmann::json* id = Field(job, "id");
        if (id != nullptr && id->is_string()) return id->get<std::string>();
      }
      last = absl::StrCat("exit ", r.exit_code, ": ", r.err);
      Supervise();
      std::this_thread::sleep_for(200ms);
    }
    Violation("submit never succeeded: " + last);
    return "";
  }

  // Runs the job to its end and checks it; the artifact's hashes in *hashes.
  void RunJob(const std::string& model, const std::string& request_id,
              std::map<std::string, std::string>* hashes, size_t* layers) {
    out_ = dir_ + "/out";
    if (!Start()) {
      result.outcome = "SETUP";
      return;
    }
    const std::string id = Submit(model, request_id);
    if (id.empty()) {
      result.outcome = "SETUP";
      return;
    }
    nlohmann::json job = WaitForJob(id, Terminal, 240s, [this] { Supervise(); });
    const std::string state = StateOf(job);
    result.retries = Count(job, "retries");
    if (!Terminal(job)) {
      result.outcome = "TIMEOUT";
      Violation("the job did not end within 240 s: " + job.dump());
      return;
    }
    result.outcome = state.substr(std::string("JOB_STATE_").size());
    std::string reason;
    if (state == "JOB_STATE_FAILED") {
      const nlohmann::json* error = Field(job, "error");
      const nlohmann::json* r = error != nullptr ? Field(*error, "reason") : nullptr;
      reason = r != nullptr && r->is_string() ? r->get<std::string>() : "";
      result.outcome += ":" + reason;
    }
    // Staging is deleted after the job ends (by the next housekeeping ticks).
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    while (!StagingLeft(out_).empty() && std::chrono::steady_clock::now() < deadline) {
      Supervise();
      std::this_thread::sleep_for(100ms);
    }
    for (const std::string& f : StagingLeft(out_)) Violation("staging left: " + f);
    if (fs::exists(out_ + "/.qforge-staging")) {
      std::error_code ec;
      if (!fs::is_empty(out_ + "/.qforge-staging", ec)) Violation("a .qforge-staging directory left");
    }
    for (const std::string& t : TempFiles(out_)) Violation("temp file left: " + t);
    if (const std::string left = FinalWithoutManifest(out_); !left.empty()) {
      Violation("final files without the manifest at the end: " + left);
    }
    if (cell_.name == "coordinator.kill.assemble_publishing" && !publishing_window_seen_ &&
        result.restarts > 0) {
      Violation("the kill between the publication's renames left no file behind: the cell "
                "did not hit its window");
    }

    if (!cell_.failure_reason.empty()) {
      if (state != "JOB_STATE_FAILED" || reason != cell_.failure_reason) {
        Violation(absl::StrCat("expected FAILED with reason ", cell_.failure_reason, ", got ",
                               result.outcome, ": ", job.dump()));
      }
      if (!FinalFiles(out_).empty()) Violation("a failed job left files in its output");
      return;
    }
    if (state != "JOB_STATE_SUCCEEDED") {
      Violation(absl::StrCat("expected SUCCEEDED, got ", result.outcome, ": ", job.dump()));
      return;
    }
    if (Count(job, "succeeded") != Count(job, "total")) {
      Violation("succeeded tasks != total tasks: " + job.dump());
    }
    // One manifest entry per layer, each from a distinct task.
    const nlohmann::json manifest = ReadJson(out_ + "/" + kManifest);
    if (!manifest.is_object() || !manifest.contains("layers") || !manifest["layers"].is_object()) {
      Violation("no readable manifest");
      return;
    }
    std::set<std::string> tasks;
    for (const auto& [module, entry] : manifest["layers"].items()) {
      const std::string task = entry.value("task_id", std::string());
      if (task.empty() || !tasks.insert(task).second) {
        Violation("layer " + module + ": task '" + task + "' completed twice or unnamed");
      }
    }
    *layers = manifest["layers"].size();
    *hashes = FileHashes(out_);
  }

  CellResult result;

 private:
  const std::string model_root_;
  const FaultCell& cell_;
  ProcessSpec coordinator_spec_, worker_spec_;
  std::string listen_, out_;
  bool publishing_window_seen_ = false;
  std::string last_live_left_;  // what the previous live poll found
};

}  // namespace

const std::vector<FaultCell>& FaultCells() {
  using T = FaultTarget;
  static const std::vector<FaultCell>* cells = new std::vector<FaultCell>{
      // A worker, at each step of a QUANTIZE task.
      Cell("worker.kill.before_read", T::kWorker, "at=worker.quantize.fetch,do=kill"),
      Cell("worker.kill.while_reading", T::kWorker, "at=store.read,match=/model/,skip=1,do=kill"),
      Cell("worker.kill.solve", T::kWorker, "at=worker.quantize.solve,do=kill"),
      Cell("worker.kill.after_staging", T::kWorker, "at=worker.quantize.staged,do=kill"),
      Cell("worker.error.before_read", T::kWorker,
           "at=worker.quantize.fetch,do=error:unavailable"),
      Cell("worker.error.while_reading", T::kWorker,
           "at=store.read,match=/model/,skip=1,times=3,do=error:unavailable"),
      Cell("worker.error.solve", T::kWorker, "at=worker.quantize.solve,do=error:internal"),
      Cell("worker.error.after_staging", T::kWorker,
           "at=worker.quantize.staged,do=error:data_loss"),
      Cell("worker.permanent.before_read", T::kWorker,
           "at=worker.quantize.fetch,times=0,do=error:permission_denied", "MODEL_READ_FAILED"),
      Cell("worker.budget.solve", T::kWorker,
           "at=worker.quantize.solve,times=0,do=error:unavailable", "SOLVER_FAILED"),
      // The coordinator, before and after persisting each transition of the job.
      Cell("coordinator.kill.before_persist_submit", T::kCoordinator,
           "at=coordinator.persist.before.job.QUEUED,do=kill"),
      Cell("coordinator.kill.after_persist_submit", T::kCoordinator,
           "at=coordinator.persist.after.job.QUEUED,do=kill"),
      Cell("coordinator.kill.before_persist_lease", T::kCoordinator,
           "at=coordinator.persist.before.task.QUANTIZE.RUNNING,do=kill"),
      Cell("coordinator.kill.after_persist_lease", T::kCoordinator,
           "at=coordinator.persist.after.task.QUANTIZE.RUNNING,do=kill"),
      Cell("coordinator.kill.before_persist_complete", T::kCoordinator,
           "at=coordinator.persist.before.task.QUANTIZE.SUCCEEDED,do=kill"),
      Cell("coordinator.kill.after_persist_complete", T::kCoordinator,
           "at=coordinator.persist.after.task.QUANTIZE.SUCCEEDED,do=kill"),
      Cell("coordinator.kill.before_persist_retry", T::kBoth,
           "at=worker.quantize.fetch,do=error:unavailable;"
           "at=coordinator.persist.before.task.QUANTIZE.QUEUED,do=kill"),
      Cell("coordinator.kill.after_persist_retry", T::kBoth,
           "at=worker.quantize.fetch,do=error:unavailable;"
           "at=coordinator.persist.after.task.QUANTIZE.QUEUED,do=kill"),
      Cell("coordinator.kill.before_persist_assembling", T::kCoordinator,
           "at=coordinator.persist.before.job.ASSEMBLING,do=kill"),
      Cell("coordinator.kill.after_persist_assembling", T::kCoordinator,
           "at=coordinator.persist.after.job.ASSEMBLING,do=kill"),
      Cell("coordinator.kill.before_persist_succeeded", T::kCoordinator,
           "at=coordinator.persist.before.job.SUCCEEDED,do=kill"),
      Cell("coordinator.kill.after_persist_succeeded", T::kCoordinator,
           "at=coordinator.persist.after.job.SUCCEEDED,do=kill"),
      Cell("coordinator.error.persist_submit", T::kCoordinator,
           "at=coordinator.persist.before.job.QUEUED,do=error:unavailable"),
      Cell("coordinator.error.persist_lease", T::kCoordinator,
           "at=coordinator.persist.before.task.QUANTIZE.RUNNING,do=error:unavailable"),
      Cell("coordinator.error.persist_complete", T::kCoordinator,
           "at=coordinator.persist.before.task.QUANTIZE.SUCCEEDED,do=error:unavailable"),
      Cell("coordinator.error.persist_succeeded", T::kCoordinator,
           "at=coordinator.persist.before.job.SUCCEEDED,do=error:unavailable"),
      // The coordinator during ASSEMBLE.
      Cell("coordinator.kill.assemble_begin", T::kCoordinator, "at=assemble.begin,do=kill"),
      Cell("coordinator.kill.assemble_written", T::kCoordinator, "at=assemble.written,do=kill"),
      Cell("coordinator.kill.assemble_publishing", T::kCoordinator,
           "at=assemble.publishing,do=kill"),
      Cell("coordinator.error.assemble_written", T::kCoordinator,
           "at=assemble.written,do=error:unavailable"),
      Cell("coordinator.permanent.assemble", T::kCoordinator,
           "at=assemble.begin,times=0,do=error:permission_denied", "ASSEMBLY_FAILED"),
      // The object store: read, write and list errors on either side, and a slow store.
      Cell("store.worker.read_error_retried", T::kWorker,
           "at=store.read,match=/model/,do=error:unavailable"),
      Cell("store.worker.write_error", T::kWorker,
           "at=store.write,match=.qforge-staging,times=3,do=error:unavailable"),
      Cell("store.worker.write_permanent", T::kWorker,
           "at=store.write,match=.qforge-staging,times=0,do=error:permission_denied",
           "STAGING_WRITE_FAILED"),
      Cell("store.coordinator.read_error", T::kCoordinator,
           "at=store.read,match=.qforge-staging,times=2,do=error:unavailable"),
      Cell("store.coordinator.write_error", T::kCoordinator,
           "at=store.write,match=/assembly/,do=error:unavailable"),
      Cell("store.coordinator.list_error", T::kCoordinator, "at=store.list,do=error:unavailable"),
      Cell("store.slow", T::kBoth, "at=store.*,times=0,do=delay:20"),
  };
  return *cells;
}

FaultHarness::FaultHarness(std::string bin_dir) : bin_(std::move(bin_dir)) {}

FaultHarness::~FaultHarness() {
  if (!dir_.empty()) {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
}

absl::Status FaultHarness::Prepare() {
  ServiceCluster setup(bin_);
  if (absl::Status s = setup.Init("qforge-faults"); !s.ok()) return s;
  dir_ = setup.dir();
  absl::StatusOr<std::string> model = setup.MakeModel("model", 1, 128, 256);
  if (!model.ok()) return model.status();
  model_ = *model;
  FaultCell undisturbed = Cell("none", FaultTarget::kBoth, "");
  CellRun run(bin_, dir_, undisturbed);
  if (absl::Status s = run.Init("qforge-fault-baseline"); !s.ok()) return s;
  run.RunJob(model_, "baseline", &baseline_, &baseline_layers_);
  const bool ok = run.result.violations.empty() && run.result.outcome == "SUCCEEDED";
  std::string why;
  for (const std::string& v : run.result.violations) absl::StrAppend(&why, "\n  ", v);
  run.StopAll();
  if (!ok) {
    return absl::InternalError(absl::StrCat("the undisturbed run failed (", run.result.outcome,
                                            ", logs in ", run.dir(), "):", why));
  }
  run.RemoveDir();
  if (baseline_layers_ != 7) {
    return absl::InternalError(absl::StrCat("the undisturbed run has ", baseline_layers_,
                                            " layers in its manifest, expected 7"));
  }
  return absl::OkStatus();
}

CellResult FaultHarness::Run(const FaultCell& cell) {
  CellRun run(bin_, dir_, cell);
  if (absl::Status s = run.Init("qforge-fault"); !s.ok()) {
    run.result.outcome = "SETUP";
    run.result.violations.push_back(s.ToString());
    return run.result;
  }
  std::map<std::string, std::string> hashes;
  size_t layers = 0;
  run.RunJob(model_, absl::StrCat("cell-", ++runs_), &hashes, &layers);
  run.StopAll();
  run.result.fired = FaultFired(run.dir());
  if (!run.result.fired) {
    run.result.violations.push_back("the fault never fired: the cell tested nothing");
  }
  if (cell.failure_reason.empty() && run.result.outcome == "SUCCEEDED") {
    if (layers != baseline_layers_) {
      run.result.violations.push_back(
          absl::StrCat(layers, " layers in the manifest, the undisturbed run has ",
                       baseline_layers_));
    }
    if (hashes != baseline_) {
      std::string diff;
      for (const auto& [path, sha] : baseline_) {
        auto it = hashes.find(path);
        if (it == hashes.end()) {
          absl::StrAppend(&diff, " missing ", path, ";");
        } else if (it->second != sha) {
          absl::StrAppend(&diff, " differs ", path, ";");
        }
      }
      for (const auto& [path, sha] : hashes) {
        if (baseline_.count(path) == 0) absl::StrAppend(&diff, " extra ", path, ";");
      }
      run.result.violations.push_back("the artifact differs from the undisturbed run:" + diff);
    }
  }
  run.result.logs = run.dir();
  if (run.result.violations.empty()) run.RemoveDir();
  return run.result;
}

}  // namespace qforge::testing

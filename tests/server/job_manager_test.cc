// server/job_manager.h: the coordinator core driven directly, with a FakeClock, a real
// SQLite file and a real LocalStore holding a tiny generated model. The tests play the worker
// themselves: AcquireTask, RunLayer on the leased byte range, CompleteTask.
#include "server/job_manager.h"

#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/forwarding_store.h"
#include "common/hessian_file.h"
#include "common/object_digest.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "common/uri.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "base/status_macros.h"
#include "job/assembler.h"
#include "job/calibration.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "job/evaluation.h"
#include "job/evaluation_record.h"
#include "job/quality_report.h"
#include "job/spec.h"
#include "server/planner.h"
#include "server/sqlite_state_store.h"
#include "server/state_store.h"
#include "job/layer_runner.h"
#include "base/float16.h"
#include "quant/decoder.h"
#include "quant/layer_quantizer.h"
#include "quant/synthetic.h"

namespace qforge {
namespace {

constexpr int64_t kLeaseMs = 10'000;
constexpr char kLayer0[] = R"(^model\.layers\.0\..*_proj\.weight$)";

std::string F16Bytes(const std::vector<float>& v) {
  std::string out(v.size() * 2, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h = qforge::FloatToHalf(v[i]);
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

std::unique_ptr<ObjectStore> Open(const std::string& uri) {
  auto s = OpenObjectStore(uri);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

// Runs `sql` on a coordinator's database file (WAL: the JobManager may hold it open).
void ExecSql(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  char* err = nullptr;
  EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err), SQLITE_OK) << err;
  sqlite3_free(err);
  sqlite3_close(db);
}

// Task id -> the device-memory estimate stored in a coordinator's database file.
std::map<std::string, uint64_t> StoredGpuEstimates(const std::string& path) {
  std::map<std::string, uint64_t> out;
  sqlite3* db = nullptr;
  EXPECT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(db, "SELECT id, gpu_memory_bytes FROM tasks", -1, &st, nullptr),
            SQLITE_OK);
  while (sqlite3_step(st) == SQLITE_ROW) {
    out[reinterpret_cast<const char*>(sqlite3_column_text(st, 0))] =
        static_cast<uint64_t>(sqlite3_column_int64(st, 1));
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

struct CountingListener : JobManagerListener {
  void OnTaskFinished(v1::TaskKind kind, v1::Method method, bool succeeded,
                      double seconds) override {
    (succeeded ? succeeded_ : failed_)++;
  }
  void OnTaskRetried(v1::TaskKind kind) override { retried_++; }
  void OnJobSubmitted(v1::Method method) override { submitted_++; }
  void OnJobFinished(v1::Method method, v1::JobState state, double seconds) override {
    std::lock_guard<std::mutex> l(mu_);
    finished_.push_back({state, seconds});
  }
  std::vector<std::pair<v1::JobState, double>> finished() {
    std::lock_guard<std::mutex> l(mu_);
    return finished_;
  }
  std::atomic<int> submitted_{0};
  std::vector<std::pair<v1::JobState, double>> finished_;  // guarded by mu_
  void OnBytes(uint64_t read, uint64_t written) override {
    read_ += read;
    written_ += written;
  }
  void OnEvaluation(v1::Method method, double ppl_increase_pct, double mean_kl,
                    std::string_view gate) override {
    std::lock_guard<std::mutex> l(mu_);
    evaluations_.push_back(std::string(gate));
  }
  std::mutex mu_;
  std::vector<std::string> evaluations_;  // the gate results, in order
  std::atomic<int> succeeded_{0}, failed_{0}, retried_{0};
  std::atomic<uint64_t> read_{0}, written_{0};
};

// Fails Apply() for the mutations `fail_if` selects (fault injection).
class FaultyStateStore : public ForwardingStateStore {
 public:
  using ForwardingStateStore::ForwardingStateStore;
  absl::Status Apply(const StateMutation& m) override {
    if (fail_if && fail_if(m)) return absl::UnavailableError("injected state store failure");
    return ForwardingStateStore::Apply(m);
  }
  absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(std::string_view job_id,
                                                       int64_t after_sequence,
                                                       int max_events) override {
    ++event_reads;
    return ForwardingStateStore::ReadEvents(job_id, after_sequence, max_events);
  }
  std::function<bool(const StateMutation&)> fail_if;
  std::atomic<int> event_reads{0};  // ReadEvents calls
};

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qforge-jm-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    WriteModel();
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  // Two decoder layers with q/k (in 64) and down (in 96) projections plus tensors that are
  // copied unchanged; sharded in several files. Hessians for every projection (k via alias).
  void WriteModel() {
    auto store = Open(root_ + "/model");
    quant::Rng rng(7);
    std::vector<std::pair<std::string, std::vector<int64_t>>> ts = {
        {"model.embed_tokens.weight", {32, 64}}};
    for (int i = 0; i < 2; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      ts.push_back({p + "input_layernorm.weight", {64}});
      ts.push_back({p + "self_attn.q_proj.weight", {64, 64}});
      ts.push_back({p + "self_attn.k_proj.weight", {32, 64}});
      ts.push_back({p + "mlp.down_proj.weight", {64, 96}});
    }
    ts.push_back({"lm_head.weight", {32, 64}});
    std::vector<TensorSpec> specs;
    for (const auto& [name, shape] : ts) specs.push_back({name, DType::kF16, shape});
    auto w = ShardedSafetensorsWriter::Create(*store, "", specs, 20000);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const auto& [name, shape] : ts) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = 0.05f * static_cast<float>(rng.StudentT(4.0));
      source_[name] = F16Bytes(v);
      ASSERT_TRUE((*w)->WriteTensorData(name, source_[name]).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    ASSERT_GT((*w)->shard_keys().size(), 1u);
    ASSERT_TRUE(store->Put("config.json", R"({"model_type": "llama", "hidden_size": 64})").ok());

    std::vector<qforge::Matrix> hs;
    std::vector<HessianEntry> entries;
    std::map<std::string, std::string> aliases;
    for (int i = 0; i < 2; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      hs.push_back(quant::MakeSyntheticLayer(8, 64, 256, 11 + i).hessian);
      hs.push_back(quant::MakeSyntheticLayer(8, 96, 256, 21 + i).hessian);
      entries.push_back({p + "self_attn.q_proj", nullptr, 64});
      entries.push_back({p + "mlp.down_proj", nullptr, 96});
      aliases[p + "self_attn.k_proj"] = p + "self_attn.q_proj";
    }
    for (size_t i = 0; i < entries.size(); ++i) entries[i].data = hs[i].data.data();
    auto hstore = Open(root_ + "/h");
    ASSERT_TRUE(WriteHessianFile(*hstore, "hessians.safetensors", entries, aliases, 256).ok());
    // Layer 0 only: layer 1's modules are missing.
    entries.resize(2);
    std::map<std::string, std::string> alias0 = {
        {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"}};
    ASSERT_TRUE(WriteHessianFile(*hstore, "partial.safetensors", entries, alias0, 256).ok());
  }

  JobManagerOptions Options() {
    JobManagerOptions o;
    o.lease_duration_ms = kLeaseMs;
    o.heartbeat_interval_ms = 1000;
    o.worker_lost_after_ms = 30'000;
    o.retry_initial_backoff_ms = 1000;
    o.retry_backoff_multiplier = 2.0;
    o.retry_max_backoff_ms = 60'000;
    o.max_acquire_wait_ms = 5000;
    o.qforge_version = "test";
    o.background_tick = false;
    o.run_assembly_inline = true;
    return o;
  }

  std::unique_ptr<JobManager> Make(std::optional<JobManagerOptions> options = std::nullopt,
                                   FaultyStateStore** faulty = nullptr,
                                   const std::string& db = "state.db") {
    auto sqlite = SqliteStateStore::Open(root_ + "/" + db);
    EXPECT_TRUE(sqlite.ok()) << sqlite.status();
    if (!sqlite.ok()) return nullptr;
    std::unique_ptr<StateStore> store = std::move(*sqlite);
    if (faulty != nullptr) {
      auto f = std::make_unique<FaultyStateStore>(std::move(store));
      *faulty = f.get();
      store = std::move(f);
    }
    auto jm = JobManager::Create(std::move(store), &clock_, options ? *options : Options(),
                                 &listener_);
    EXPECT_TRUE(jm.ok()) << jm.status();
    return jm.ok() ? std::move(*jm) : nullptr;
  }

  v1::SubmitJobRequest Request(const std::string& out, bool hessians = true) {
    v1::SubmitJobRequest r;
    v1::JobSpec* s = r.mutable_spec();
    s->set_model_uri(root_ + "/model");
    s->set_output_uri(root_ + "/" + out);
    s->mutable_gptq()->set_bits(4);
    s->mutable_gptq()->set_group_size(32);
    if (hessians) {
      s->mutable_calibration()->set_hessians_uri(root_ + "/h/hessians.safetensors");
    } else {
      s->mutable_calibration()->set_none(true);
    }
    return r;
  }

  v1::Job Submit(JobManager& jm, const v1::SubmitJobRequest& r, std::string_view tenant = "") {
    auto job = jm.SubmitJob(tenant, r);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? *job : v1::Job();
  }

  std::string Register(JobManager& jm, std::vector<std::string> backends = {"cpu"},
                       uint64_t budget = 0, const std::string& id = "") {
    v1::RegisterWorkerRequest r;
    r.set_hostname("test-host");
    for (const auto& b : backends) r.add_backends(b);
    r.set_memory_budget_bytes(budget);
    r.set_version("test");
    r.set_worker_id(id);
    auto resp = jm.RegisterWorker(r);
    EXPECT_TRUE(resp.ok()) << resp.status();
    return resp.ok() ? resp->worker_id() : "";
  }

  std::optional<v1::Task> Acquire(JobManager& jm, const std::string& worker, int64_t wait_ms = 0) {
    v1::AcquireTaskRequest r;
    r.set_worker_id(worker);
    r.set_wait_ms(wait_ms);
    auto t = jm.AcquireTask(r);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *t : std::nullopt;
  }

  // What a worker does with a leased QUANTIZE task: one ranged read, solve, stage.
  absl::StatusOr<LayerOutcome> RunLayer(const v1::Task& task) {
    auto config = ConvertJobSpec(task.spec());
    if (!config.ok()) return config.status();
    auto model_store = OpenObjectStore(task.layer().model_uri());
    if (!model_store.ok()) return model_store.status();
    std::unique_ptr<ObjectStore> hstore;
    std::optional<HessianFile> hessians;
    if (!task.layer().hessians_uri().empty()) {
      auto split = SplitObjectUri(task.layer().hessians_uri());
      if (!split.ok()) return split.status();
      auto hs = OpenObjectStore(split->store_uri);
      if (!hs.ok()) return hs.status();
      hstore = std::move(*hs);
      auto hf = HessianFile::Open(*hstore, split->key);
      if (!hf.ok()) return hf.status();
      hessians = std::move(*hf);
    }
    auto out = OpenObjectStore(task.staging_uri());
    if (!out.ok()) return out.status();
    auto dtype = ParseDType(task.layer().dtype());
    if (!dtype.ok()) return dtype.status();
    LayerJob job;
    job.module = task.layer().module();
    job.model_store = model_store->get();
    job.weight.name = task.layer().weight_tensor();
    job.weight.key = task.layer().shard_key();
    job.weight.offset = task.layer().byte_offset();
    job.weight.length = task.layer().byte_length();
    job.weight.dtype = *dtype;
    job.weight.shape = {task.layer().out_features(), task.layer().in_features()};
    job.hessian_store = hstore.get();
    job.hessians = hessians ? &*hessians : nullptr;
    job.options = config->quantize;
    job.out_store = out->get();
    job.staged_key = task.staging_key();
    return qforge::RunLayer(job, *quantizers_.For(config->quantize));
  }

  absl::Status Complete(JobManager& jm, const std::string& worker, const v1::Task& task,
                        const LayerOutcome* outcome = nullptr) {
    return jm.CompleteTask(CompletionOf(worker, task, outcome));
  }

  // The completion a worker sends for `task` once its layer is staged.
  v1::CompleteTaskRequest CompletionOf(const std::string& worker, const v1::Task& task,
                                       const LayerOutcome* outcome = nullptr) {
    v1::CompleteTaskRequest r;
    r.set_worker_id(worker);
    r.set_task_id(task.id());
    r.set_lease_token(task.lease_token());
    r.set_output_key(task.staging_key());
    // What the worker reports: the staged object's size and sha256 (a placeholder when it
    // wrote nothing).
    r.set_output_sha256(std::string(64, 'a'));
    if (auto d = DigestObject(*Open(task.staging_uri()), task.staging_key()); d.ok()) {
      r.set_output_bytes(d->size);
      r.set_output_sha256(d->sha256);
    }
    if (outcome != nullptr) {
      v1::TaskMetrics* m = r.mutable_metrics();
      m->set_proxy_loss(outcome->proxy_loss);
      m->set_relative_error(outcome->relative_error);
      m->set_solve_seconds(outcome->solve_seconds);
      m->set_bytes_read(outcome->bytes_read);
      m->set_bytes_written(outcome->bytes_written);
      m->set_backend("cpu");
    }
    return r;
  }

  // Acquire + run + complete, `task_ms` of fake time per task.
  void RunAndComplete(JobManager& jm, const std::string& worker, const v1::Task& task,
                      int64_t task_ms = 0) {
    auto outcome = RunLayer(task);
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    clock_.AdvanceMs(task_ms);
    absl::Status s = Complete(jm, worker, task, &*outcome);
    ASSERT_TRUE(s.ok()) << s;
  }

  absl::Status Fail(JobManager& jm, const std::string& worker, const v1::Task& task,
                    absl::StatusCode code, const std::string& message, bool retryable,
                    const std::string& reason = "", const std::string& subject = "") {
    v1::FailTaskRequest r;
    r.set_worker_id(worker);
    r.set_task_id(task.id());
    r.set_lease_token(task.lease_token());
    r.mutable_error()->set_code(static_cast<int>(code));
    r.mutable_error()->set_message(message);
    r.mutable_error()->set_reason(reason);
    r.mutable_error()->set_subject(subject);
    r.set_retryable(retryable);
    return jm.FailTask(r);
  }

  absl::StatusOr<v1::HeartbeatResponse> Beat(JobManager& jm, const std::string& worker,
                                             const v1::Task& task, double progress = 0.5,
                                             const std::string& phase = "solve") {
    v1::HeartbeatRequest r;
    r.set_worker_id(worker);
    r.set_task_id(task.id());
    r.set_lease_token(task.lease_token());
    r.set_progress(progress);
    r.set_phase(phase);
    return jm.Heartbeat(r);
  }

  v1::Job Get(JobManager& jm, const std::string& id, std::string_view tenant = "") {
    auto j = jm.GetJob(tenant, id);
    EXPECT_TRUE(j.ok()) << j.status();
    return j.ok() ? *j : v1::Job();
  }

  std::vector<std::string> StagingKeys(const std::string& out) {
    auto list = Open(root_ + "/" + out)->List(".qforge-staging/");
    EXPECT_TRUE(list.ok());
    std::vector<std::string> keys;
    if (list.ok()) {
      for (const ObjectInfo& o : *list) keys.push_back(o.key);
    }
    return keys;
  }

  std::vector<v1::JobEvent> Events(JobManager& jm, const std::string& id, int64_t after = 0,
                                   bool* finished = nullptr) {
    auto e = jm.WatchEvents("", id, after, 1000, 0, finished);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? *e : std::vector<v1::JobEvent>();
  }

  std::string root_;
  FakeClock clock_;
  CountingListener listener_;
  const quant::LayerQuantizerSet quantizers_ = quant::NewCpuLayerQuantizers();
  std::map<std::string, std::string> source_;  // tensor -> F16 bytes
};

void ExpectError(const absl::Status& s, absl::StatusCode code,
                 const std::vector<std::string>& parts) {
  EXPECT_EQ(s.code(), code) << s;
  for (const std::string& p : parts) EXPECT_NE(s.message().find(p), std::string::npos) << s;
}

TEST_F(JobManagerTest, SubmitValidatesModelHessiansAndOutput) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  // validate_only: a preview, nothing created.
  v1::SubmitJobRequest r = Request("out");
  r.set_validate_only(true);
  auto preview = jm->SubmitJob("", r);
  ASSERT_TRUE(preview.ok()) << preview.status();
  EXPECT_TRUE(preview->id().empty());
  EXPECT_EQ(preview->tasks().total(), 7);
  EXPECT_EQ(preview->spec().gptq().damp_percent(), 0.01);
  EXPECT_TRUE(jm->ListJobs("", {})->jobs().empty());

  struct Case {
    const char* name;
    std::function<void(v1::SubmitJobRequest&)> mutate;
    absl::StatusCode code;
    std::vector<std::string> parts;
  };
  // A model directory without config.json, and one whose selected weight is I32.
  {
    auto store = Open(root_ + "/noconfig");
    auto w = SafetensorsWriter::Create(*store, "model.safetensors",
                                       {{"model.layers.0.mlp.up_proj.weight", DType::kF16, {32, 32}}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->WriteTensorData("model.layers.0.mlp.up_proj.weight",
                                      std::string(32 * 32 * 2, '\0'))
                    .ok());
    ASSERT_TRUE((*w)->Finish().ok());
    auto istore = Open(root_ + "/intmodel");
    auto wi = SafetensorsWriter::Create(*istore, "model.safetensors",
                                        {{"model.layers.0.mlp.up_proj.weight", DType::kI32, {32, 32}}});
    ASSERT_TRUE(wi.ok());
    ASSERT_TRUE((*wi)->WriteTensorData("model.layers.0.mlp.up_proj.weight",
                                       std::string(32 * 32 * 4, '\0'))
                    .ok());
    ASSERT_TRUE((*wi)->Finish().ok());
    ASSERT_TRUE(istore->Put("config.json", "{}").ok());
    ASSERT_TRUE(Open(root_ + "/full")->Put("README.md", "hello").ok());
  }
  const std::vector<Case> cases = {
      {"missing model",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->set_model_uri(root_ + "/nope"); },
       absl::StatusCode::kInvalidArgument, {"spec.model_uri", "/nope"}},
      {"no config.json",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->set_model_uri(root_ + "/noconfig"); },
       absl::StatusCode::kInvalidArgument, {"spec.model_uri", "config.json"}},
      {"I32 weight",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->set_model_uri(root_ + "/intmodel"); },
       absl::StatusCode::kInvalidArgument,
       {"spec.include", "model.layers.0.mlp.up_proj.weight", "I32"}},
      {"1-D selected",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->add_include("input_layernorm"); },
       absl::StatusCode::kInvalidArgument,
       {"spec.include", "model.layers.0.input_layernorm.weight"}},
      {"nothing selected",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->add_include("^nothing$"); },
       absl::StatusCode::kInvalidArgument, {"spec.include"}},
      {"group size vs in_features",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->mutable_gptq()->set_group_size(64); },
       absl::StatusCode::kInvalidArgument,
       {"spec.gptq.group_size", "in_features 96", "model.layers.0.mlp.down_proj"}},
      {"bits",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->mutable_gptq()->set_bits(5); },
       absl::StatusCode::kInvalidArgument, {"spec.gptq.bits: 5 is not one of 2, 3, 4, 8"}},
      {"output not empty",
       [&](v1::SubmitJobRequest& r) { r.mutable_spec()->set_output_uri(root_ + "/full"); },
       absl::StatusCode::kInvalidArgument, {"spec.output_uri", "not empty"}},
      {"hessian module missing",
       [&](v1::SubmitJobRequest& r) {
         r.mutable_spec()->mutable_calibration()->set_hessians_uri(root_ +
                                                                  "/h/partial.safetensors");
       },
       absl::StatusCode::kInvalidArgument,
       {"spec.calibration.hessians_uri", "module 'model.layers.1.mlp.down_proj'"}},
      {"hessian file missing",
       [&](v1::SubmitJobRequest& r) {
         r.mutable_spec()->mutable_calibration()->set_hessians_uri(root_ + "/h/none.safetensors");
       },
       absl::StatusCode::kInvalidArgument, {"spec.calibration.hessians_uri", "none.safetensors"}},
      {"VPTQ outliers wider than a layer",
       [&](v1::SubmitJobRequest& r) {
         r.mutable_spec()->clear_gptq();
         r.mutable_spec()->set_method(v1::METHOD_VPTQ);
         r.mutable_spec()->mutable_vptq()->set_outlier_size(1 << 20);
       },
       absl::StatusCode::kInvalidArgument, {"spec.vptq", "outlier_size", "model.layers."}},
      {"request id",
       [&](v1::SubmitJobRequest& r) { r.set_request_id("has space"); },
       absl::StatusCode::kInvalidArgument, {"request_id"}},
  };
  for (const Case& c : cases) {
    for (bool validate_only : {true, false}) {
      v1::SubmitJobRequest req = Request("out");
      req.set_validate_only(validate_only);
      c.mutate(req);
      SCOPED_TRACE(std::string(c.name) + (validate_only ? " (validate_only)" : ""));
      ExpectError(jm->SubmitJob("", req).status(), c.code, c.parts);
    }
  }
  EXPECT_TRUE(jm->ListJobs("", {})->jobs().empty());

  // Allowed file roots.
  JobManagerOptions o = Options();
  o.allowed_file_roots = {root_ + "/model", root_ + "/h"};
  auto restricted = Make(o, nullptr, "restricted.db");
  ASSERT_NE(restricted, nullptr);
  ExpectError(restricted->SubmitJob("", Request("out")).status(),
              absl::StatusCode::kInvalidArgument, {"spec.output_uri", "allowed file roots"});
}

// Issue 18, defect 2: validate_only creates nothing, an output directory's file names are
// never echoed, the output check stops at the first object, and file roots are per tenant.
TEST_F(JobManagerTest, FileAccessCreatesNothingEchoesNoNamesAndIsPerTenant) {
  namespace fs = std::filesystem;
  JobManagerOptions o = Options();
  o.tenant_file_roots = {{"a", {root_}}, {"b", {root_ + "/b-only"}}};
  auto jm = Make(o);
  ASSERT_NE(jm, nullptr);

  // validate_only: a new output directory and a missing model directory stay missing.
  v1::SubmitJobRequest req = Request("new/nested/out");
  req.set_validate_only(true);
  auto ok = jm->SubmitJob("a", req);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_FALSE(fs::exists(root_ + "/new")) << "validate_only created the output directory";
  req.mutable_spec()->set_model_uri(root_ + "/no-model/here");
  auto missing = jm->SubmitJob("a", req);
  ExpectError(missing.status(), absl::StatusCode::kInvalidArgument,
              {"spec.model_uri", "does not exist"});
  EXPECT_FALSE(fs::exists(root_ + "/no-model")) << "validate_only created the model directory";

  // A non-empty output: its (deeply nested) object is not named; staging alone is empty.
  fs::create_directories(root_ + "/deep/a/b/c");
  fs::create_directories(root_ + "/deep/.qforge-staging/job-x/t");
  { std::ofstream(root_ + "/deep/.qforge-staging/job-x/t/layer.safetensors") << "x"; }
  auto staging_only = jm->SubmitJob("a", [&] {
    v1::SubmitJobRequest r = Request("deep");
    r.set_validate_only(true);
    return r;
  }());
  EXPECT_TRUE(staging_only.ok()) << staging_only.status();
  { std::ofstream(root_ + "/deep/a/b/c/private-name.txt") << "secret"; }
  auto full = jm->SubmitJob("a", Request("deep"));
  ExpectError(full.status(), absl::StatusCode::kInvalidArgument, {"spec.output_uri", "not empty"});
  EXPECT_EQ(full.status().message().find("private-name"), std::string::npos) << full.status();

  // Tenant b may use only its own root.
  ExpectError(jm->SubmitJob("b", Request("out")).status(), absl::StatusCode::kInvalidArgument,
              {"spec.model_uri", "outside the allowed file roots"});
  EXPECT_TRUE(jm->ListJobs("a", {})->jobs().empty());
}

TEST_F(JobManagerTest, PlansOneTaskPerLayerWithItsByteRange) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const int64_t t0 = clock_.NowMs();
  v1::Job job = Submit(*jm, Request("out"));
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.create_time_unix_ms(), t0);
  EXPECT_EQ(job.tasks().total(), 7);
  EXPECT_EQ(job.tasks().queued(), 6);
  EXPECT_EQ(job.tasks().pending(), 1);
  EXPECT_EQ(job.eta_seconds(), -1);
  EXPECT_EQ(job.spec().max_attempts(), 4);

  const std::string w = Register(*jm);
  auto model_store = Open(root_ + "/model");
  std::vector<std::string> modules;
  std::set<std::string> tokens;
  for (int i = 0; i < 6; ++i) {
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value()) << i;
    EXPECT_EQ(t->job_id(), job.id());
    EXPECT_EQ(t->kind(), v1::TASK_KIND_QUANTIZE);
    EXPECT_EQ(t->attempt(), 0);
    EXPECT_EQ(t->lease_token().size(), 32u);
    tokens.insert(t->lease_token());
    EXPECT_EQ(t->lease_expiry_unix_ms(), t0 + kLeaseMs);
    EXPECT_EQ(t->spec().gptq().group_size(), 32);
    EXPECT_EQ(t->staging_uri(), root_ + "/out");
    EXPECT_EQ(t->staging_key(),
              ".qforge-staging/" + job.id() + "/" + t->id() + ".0.layer.safetensors");
    const v1::LayerInput& l = t->layer();
    modules.push_back(l.module());
    EXPECT_EQ(l.weight_tensor(), l.module() + ".weight");
    EXPECT_EQ(l.model_uri(), root_ + "/model");
    EXPECT_EQ(l.hessians_uri(), root_ + "/h/hessians.safetensors");
    EXPECT_EQ(l.dtype(), "F16");
    // The byte range is exactly the weight's bytes.
    const std::string& expect = source_.at(l.weight_tensor());
    EXPECT_EQ(l.byte_length(), expect.size());
    EXPECT_EQ(static_cast<uint64_t>(l.out_features() * l.in_features() * 2), expect.size());
    std::string got;
    ASSERT_TRUE(model_store->ReadRange(l.shard_key(), l.byte_offset(), l.byte_length(), &got).ok());
    EXPECT_TRUE(got == expect) << l.module();
  }
  EXPECT_EQ(tokens.size(), 6u);
  EXPECT_EQ(modules, (std::vector<std::string>{
                         "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                         "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"}));
  EXPECT_FALSE(Acquire(*jm, w).has_value());  // ASSEMBLE is never leased to a worker
  v1::Job now = Get(*jm, job.id());
  EXPECT_EQ(now.state(), v1::JOB_STATE_QUANTIZING);
  EXPECT_EQ(now.start_time_unix_ms(), t0);
  EXPECT_EQ(now.tasks().running(), 6);
  JobManagerStats stats = jm->Stats();
  EXPECT_EQ(stats.tasks_running, 6);
  EXPECT_EQ(stats.tasks_queued, 0);
  EXPECT_EQ(stats.workers_by_state["busy"], 1);
}

TEST_F(JobManagerTest, SchedulesByPriorityThenFifoAndOnlyWhatFitsTheWorker) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  auto submit = [&](const std::string& out, int priority) {
    v1::SubmitJobRequest r = Request(out);
    r.mutable_spec()->add_include(kLayer0);  // down (in 96), k and q (in 64)
    r.mutable_spec()->set_priority(priority);
    v1::Job j = Submit(*jm, r);
    clock_.AdvanceMs(1);
    return j.id();
  };
  const std::string a = submit("a", 0), b = submit("b", 0), c = submit("c", 5);
  JobManagerStats stats = jm->Stats();
  EXPECT_EQ(stats.tasks_queued, 9);
  EXPECT_GT(stats.oldest_queued_task_create_ms, 0);

  // A worker without a usable backend gets nothing, even after waiting a little.
  const std::string tpu = Register(*jm, {"tpu"});
  EXPECT_FALSE(Acquire(*jm, tpu, 50).has_value());
  // Memory estimates 4·(out·in + in·in)·3: k 73728, q 98304, down 184320 bytes.
  const std::string small = Register(*jm, {"cpu"}, 80'000);
  std::vector<std::string> got;
  while (auto t = Acquire(*jm, small)) got.push_back(t->id());
  EXPECT_EQ(got, (std::vector<std::string>{c + "-q00001", a + "-q00001", b + "-q00001"}));
  // A CUDA worker's budget is device memory, compared with the CUDA backend's estimate:
  // q [64, 64] fits a budget of exactly its estimate; k [32, 64] fits too, down (in 96) not.
  auto config = ConvertJobSpec(Request("x").spec());
  ASSERT_TRUE(config.ok());
  const uint64_t q_gpu = GpuTaskMemoryBytes(*config, 64, 64);
  ASSERT_LT(q_gpu, GpuTaskMemoryBytes(*config, 64, 96));
  const std::string gpu = Register(*jm, {"cuda"}, q_gpu);
  got.clear();
  while (auto t = Acquire(*jm, gpu)) got.push_back(t->id());
  EXPECT_EQ(got, (std::vector<std::string>{c + "-q00002", a + "-q00002", b + "-q00002"}));
  const std::string big = Register(*jm, {"cpu", "cuda"});
  got.clear();
  while (auto t = Acquire(*jm, big)) got.push_back(t->id());
  EXPECT_EQ(got, (std::vector<std::string>{c + "-q00000", a + "-q00000", b + "-q00000"}));
  EXPECT_EQ(jm->Stats().tasks_queued, 0);
}

TEST_F(JobManagerTest, ACudaOnlyWorkerIsPlacedByTheGpuEstimateStoredAtPlanTime) {
  auto config = ConvertJobSpec(Request("x").spec());
  ASSERT_TRUE(config.ok());
  const uint64_t down_gpu = GpuTaskMemoryBytes(*config, 64, 96);
  const uint64_t k_gpu = GpuTaskMemoryBytes(*config, 32, 64);
  const uint64_t q_gpu = GpuTaskMemoryBytes(*config, 64, 64);
  ASSERT_LE(k_gpu, q_gpu);
  ASSERT_LT(q_gpu, down_gpu);
  const std::string db = root_ + "/state.db";
  std::string id;
  {
    auto jm = Make();
    ASSERT_NE(jm, nullptr);
    v1::SubmitJobRequest r = Request("out");
    r.mutable_spec()->add_include(kLayer0);  // down, k, q in plan order
    id = Submit(*jm, r).id();
    EXPECT_EQ(StoredGpuEstimates(db),
              (std::map<std::string, uint64_t>{{id + "-q00000", down_gpu},
                                               {id + "-q00001", k_gpu},
                                               {id + "-q00002", q_gpu},
                                               {id + "-assemble", 0}}));
  }
  // Placement reads the stored estimates and recomputes nothing: swap down's and q's.
  ExecSql(db, absl::StrCat("UPDATE tasks SET gpu_memory_bytes = CASE id WHEN '", id,
                           "-q00000' THEN ", q_gpu, " WHEN '", id, "-q00002' THEN ", down_gpu,
                           " ELSE gpu_memory_bytes END"));
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string gpu = Register(*jm, {"cuda"}, q_gpu);
  std::vector<std::string> got;
  while (auto t = Acquire(*jm, gpu)) got.push_back(t->id());
  EXPECT_EQ(got, (std::vector<std::string>{id + "-q00000", id + "-q00001"}));
  // A CPU worker's budget compares the host estimate, which did not change.
  const std::string cpu = Register(*jm, {"cpu"}, 4 * (64 * 64 + 64 * 64) * 3);
  auto t = Acquire(*jm, cpu);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->id(), id + "-q00002");
}

TEST_F(JobManagerTest, TasksFromAVersion1DatabaseGetTheirGpuEstimateOnceAtLoad) {
  auto config = ConvertJobSpec(Request("x").spec());
  ASSERT_TRUE(config.ok());
  const uint64_t down_gpu = GpuTaskMemoryBytes(*config, 64, 96);
  const uint64_t k_gpu = GpuTaskMemoryBytes(*config, 32, 64);
  const uint64_t q_gpu = GpuTaskMemoryBytes(*config, 64, 64);
  const std::string db = root_ + "/state.db";
  std::string id;
  {
    auto jm = Make();
    ASSERT_NE(jm, nullptr);
    v1::SubmitJobRequest r = Request("out");
    r.mutable_spec()->add_include(kLayer0);
    id = Submit(*jm, r).id();
  }
  // Back to the layout a version-1 coordinator wrote: no column for the device estimate.
  ExecSql(db,
          "ALTER TABLE tasks DROP COLUMN evaluation; ALTER TABLE tasks DROP COLUMN calibration; "
          "ALTER TABLE tasks DROP COLUMN gpu_memory_bytes; UPDATE schema_version SET version = 1");
  // Opening migrates (the estimates read 0); loading recomputes them from the job's spec
  // and stores them.
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  EXPECT_EQ(StoredGpuEstimates(db),
            (std::map<std::string, uint64_t>{{id + "-q00000", down_gpu},
                                             {id + "-q00001", k_gpu},
                                             {id + "-q00002", q_gpu},
                                             {id + "-assemble", 0}}));
  const std::string gpu = Register(*jm, {"cuda"}, q_gpu);
  std::vector<std::string> got;
  while (auto t = Acquire(*jm, gpu)) got.push_back(t->id());
  EXPECT_EQ(got, (std::vector<std::string>{id + "-q00001", id + "-q00002"}));
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_QUANTIZING);
}

TEST_F(JobManagerTest, AJobWhoseSpecIsNoLongerAllowedFailsWhenTheStateIsLoaded) {
  std::string id;
  {
    auto jm = Make();
    ASSERT_NE(jm, nullptr);
    id = Submit(*jm, Request("out")).id();
  }
  // The coordinator comes back with roots that no longer include the job's output.
  JobManagerOptions o = Options();
  o.allowed_file_roots = {root_ + "/model", root_ + "/h"};
  auto jm = Make(o);
  ASSERT_NE(jm, nullptr);
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(job.error().reason(), "SPEC_REJECTED");
  EXPECT_NE(job.error().message().find("spec.output_uri"), std::string::npos)
      << job.error().message();
  EXPECT_EQ(job.tasks().cancelled(), 7);
  const std::string w = Register(*jm);
  EXPECT_FALSE(Acquire(*jm, w).has_value());
  bool finished = false;
  auto events = Events(*jm, id, 0, &finished);
  ASSERT_FALSE(events.empty());
  EXPECT_TRUE(finished);
  EXPECT_EQ(events.back().job_state(), v1::JOB_STATE_FAILED);
}

TEST_F(JobManagerTest, LeaseExpiryRetriesWithBackoffThenFailsWithTheLastError) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->add_include(R"(layers\.0\.self_attn\.q_proj)");
  r.mutable_spec()->set_max_attempts(3);
  const std::string id = Submit(*jm, r).id();
  const std::string w = Register(*jm);
  const std::string module = "model.layers.0.self_attn.q_proj";

  auto t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  clock_.AdvanceMs(kLeaseMs - 1);
  jm->Tick();
  EXPECT_EQ(Get(*jm, id).tasks().running(), 1);  // not yet expired
  clock_.AdvanceMs(1);
  jm->Tick();
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUANTIZING);
  EXPECT_EQ(job.tasks().queued(), 1);
  EXPECT_EQ(job.tasks().retries(), 1);
  // Backoff 1 s: not runnable before it elapses.
  EXPECT_FALSE(Acquire(*jm, w).has_value());
  clock_.AdvanceMs(999);
  jm->Tick();
  EXPECT_FALSE(Acquire(*jm, w).has_value());
  clock_.AdvanceMs(1);
  t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->attempt(), 1);
  EXPECT_EQ(t->staging_key(), ".qforge-staging/" + t->job_id() + "/" + t->id() + ".1.layer.safetensors");

  // Heartbeats keep a lease alive.
  clock_.AdvanceMs(kLeaseMs - 1000);
  auto hb = Beat(*jm, w, *t);
  ASSERT_TRUE(hb.ok());
  EXPECT_FALSE(hb->lease_lost());
  EXPECT_FALSE(hb->cancel());
  EXPECT_EQ(hb->lease_expiry_unix_ms(), clock_.NowMs() + kLeaseMs);
  clock_.AdvanceMs(kLeaseMs - 1000);
  jm->Tick();
  EXPECT_EQ(Get(*jm, id).tasks().running(), 1);
  clock_.AdvanceMs(1000);
  jm->Tick();
  // Second backoff: 2 s.
  clock_.AdvanceMs(1999);
  jm->Tick();
  EXPECT_FALSE(Acquire(*jm, w).has_value());
  clock_.AdvanceMs(1);
  t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->attempt(), 2);

  // The third expiry exhausts the budget: the job fails with that task's error.
  clock_.AdvanceMs(kLeaseMs);
  jm->Tick();
  job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().code(), static_cast<int>(absl::StatusCode::kUnavailable));
  EXPECT_EQ(job.error().reason(), "LEASE_EXPIRED");
  EXPECT_EQ(job.error().subject(), module);
  EXPECT_NE(job.error().message().find("layer " + module), std::string::npos) << job.error().message();
  EXPECT_NE(job.error().message().find("after 3 attempts"), std::string::npos);
  EXPECT_EQ(job.end_time_unix_ms(), clock_.NowMs());
  EXPECT_EQ(job.tasks().failed(), 1);
  EXPECT_EQ(job.tasks().cancelled(), 1);  // ASSEMBLE
  EXPECT_EQ(job.tasks().retries(), 2);
  EXPECT_EQ(listener_.retried_, 2);
  EXPECT_EQ(listener_.failed_, 3);
  // The job was reported once submitted and once failed, with its creation-to-end time.
  EXPECT_EQ(listener_.submitted_, 1);
  ASSERT_EQ(listener_.finished().size(), 1u);
  EXPECT_EQ(listener_.finished()[0].first, v1::JOB_STATE_FAILED);
  EXPECT_DOUBLE_EQ(listener_.finished()[0].second,
                   (job.end_time_unix_ms() - job.create_time_unix_ms()) / 1000.0);
  EXPECT_FALSE(Acquire(*jm, w).has_value());

  // Settling keeps the final counts (the tasks leave memory).
  jm->Tick();
  job = Get(*jm, id);
  EXPECT_EQ(job.tasks().failed(), 1);
  EXPECT_EQ(job.tasks().retries(), 2);
  bool finished = false;
  auto events = Events(*jm, id, 0, &finished);
  ASSERT_FALSE(events.empty());
  EXPECT_TRUE(finished);
  EXPECT_EQ(events.back().job_state(), v1::JOB_STATE_FAILED);
}

TEST_F(JobManagerTest, FailTaskRetriesOrFailsTheJobAndStopsTheOthers) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->add_include(kLayer0);
  const std::string id = Submit(*jm, r).id();
  const std::string w1 = Register(*jm), w2 = Register(*jm);
  auto down = Acquire(*jm, w1);
  auto k = Acquire(*jm, w2);
  ASSERT_TRUE(down && k);

  // Retryable: requeued behind a 1 s backoff, the job goes on.
  ASSERT_TRUE(Fail(*jm, w1, *down, absl::StatusCode::kUnavailable, "read timed out", true).ok());
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_QUANTIZING);
  auto q = Acquire(*jm, w1);
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->layer().module(), "model.layers.0.self_attn.q_proj");  // down is backing off

  // Not retryable: the job fails with this task's error at once.
  ASSERT_TRUE(Fail(*jm, w2, *k, absl::StatusCode::kInvalidArgument, "weight holds NaN", false,
                   "BAD_INPUT", "model.layers.0.self_attn.k_proj.weight")
                  .ok());
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(job.error().reason(), "BAD_INPUT");
  EXPECT_EQ(job.error().subject(), "model.layers.0.self_attn.k_proj.weight");
  EXPECT_NE(job.error().message().find("layer model.layers.0.self_attn.k_proj"), std::string::npos);
  EXPECT_NE(job.error().message().find("weight holds NaN"), std::string::npos);
  // q is still leased, but the failed job shows no running task: it is being stopped.
  EXPECT_EQ(job.tasks().running(), 0);
  EXPECT_EQ(job.tasks().failed(), 1);
  EXPECT_EQ(job.tasks().cancelled(), 3);

  // The running task hears it through its heartbeat; the backing-off one never runs.
  auto hb = Beat(*jm, w1, *q);
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->cancel());
  EXPECT_FALSE(hb->lease_lost());
  clock_.AdvanceMs(5000);
  jm->Tick();
  EXPECT_FALSE(Acquire(*jm, w1).has_value());
  ASSERT_TRUE(RunLayer(*q).ok());  // it had staged its output already
  jm->Tick();
  EXPECT_FALSE(StagingKeys("out").empty());  // not while a task still runs
  ASSERT_TRUE(Fail(*jm, w1, *q, absl::StatusCode::kCancelled, "cancelled", false).ok());
  jm->Tick();
  EXPECT_TRUE(StagingKeys("out").empty());
  job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().reason(), "BAD_INPUT");  // unchanged by the straggler
  EXPECT_EQ(job.tasks().failed(), 1);
  EXPECT_EQ(job.tasks().cancelled(), 3);
  for (const v1::WorkerInfo& info : jm->ListWorkers("")) {
    EXPECT_EQ(info.tasks_failed(), 1) << info.id();
    EXPECT_EQ(info.state(), "idle");
  }
}

TEST_F(JobManagerTest, FencesStaleLeases) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->add_include(R"(layers\.1\.mlp\.down_proj)");
  const std::string id = Submit(*jm, r).id();
  const std::string w1 = Register(*jm), w2 = Register(*jm);
  auto first = Acquire(*jm, w1);
  ASSERT_TRUE(first.has_value());
  auto staged = RunLayer(*first);
  ASSERT_TRUE(staged.ok()) << staged.status();
  clock_.AdvanceMs(kLeaseMs);
  jm->Tick();
  clock_.AdvanceMs(1000);
  auto second = Acquire(*jm, w2);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->id(), first->id());
  EXPECT_NE(second->lease_token(), first->lease_token());

  // The first holder is fenced off everywhere.
  ExpectError(Complete(*jm, w1, *first, &*staged), absl::StatusCode::kFailedPrecondition,
              {"stale lease", first->id()});
  auto hb = Beat(*jm, w1, *first);
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->lease_lost());
  ExpectError(Fail(*jm, w1, *first, absl::StatusCode::kInternal, "x", true),
              absl::StatusCode::kFailedPrecondition, {"stale lease"});
  v1::Task unknown = *second;
  unknown.set_id("no-such-task");
  ExpectError(Complete(*jm, w2, unknown), absl::StatusCode::kNotFound, {"no-such-task"});
  v1::Task tokenless = *second;
  tokenless.set_lease_token("");
  ExpectError(Complete(*jm, w2, tokenless), absl::StatusCode::kFailedPrecondition, {});

  // The holder must have staged its output, under its own attempt's key.
  ExpectError(Complete(*jm, w2, *second), absl::StatusCode::kFailedPrecondition,
              {"not in", second->staging_key()});
  v1::CompleteTaskRequest wrong_key;
  wrong_key.set_task_id(second->id());
  wrong_key.set_lease_token(second->lease_token());
  wrong_key.set_output_key(first->staging_key());
  ExpectError(jm->CompleteTask(wrong_key), absl::StatusCode::kInvalidArgument, {"output_key"});

  RunAndComplete(*jm, w2, *second);
  EXPECT_TRUE(Complete(*jm, w2, *second).ok());  // a retried completion is accepted once more
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  jm->Tick();
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  auto manifest = nlohmann::json::parse(*Open(root_ + "/out")->ReadAll(kManifestName));
  const auto& layer = manifest["layers"]["model.layers.1.mlp.down_proj"];
  EXPECT_EQ(layer["attempt"], 1);
  EXPECT_EQ(layer["worker_id"], w2);
}

TEST_F(JobManagerTest, CancellationReachesRunningTasksThroughHeartbeats) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  auto t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  ASSERT_TRUE(RunLayer(*t).ok());
  ASSERT_FALSE(StagingKeys("out").empty());

  ExpectError(jm->CancelJob("someone-else", id).status(), absl::StatusCode::kNotFound, {id});
  auto c = jm->CancelJob("", id);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->state(), v1::JOB_STATE_CANCELLING);
  EXPECT_EQ(c->tasks().running(), 1);
  EXPECT_EQ(c->tasks().cancelled(), 6);
  EXPECT_FALSE(Acquire(*jm, w).has_value());
  auto hb = Beat(*jm, w, *t);
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->cancel());
  EXPECT_EQ(jm->CancelJob("", id)->state(), v1::JOB_STATE_CANCELLING);  // idempotent

  ASSERT_TRUE(Fail(*jm, w, *t, absl::StatusCode::kCancelled, "cancelled by the job", false).ok());
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(job.end_time_unix_ms(), clock_.NowMs());
  EXPECT_EQ(job.tasks().cancelled(), 7);
  jm->Tick();
  EXPECT_TRUE(StagingKeys("out").empty());
  EXPECT_EQ(jm->CancelJob("", id)->state(), v1::JOB_STATE_CANCELLED);
  bool finished = false;
  auto events = Events(*jm, id, 0, &finished);
  EXPECT_TRUE(finished);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back().job_state(), v1::JOB_STATE_CANCELLED);

  // A queued job is cancelled at once; a running task whose lease expires while its job is
  // cancelling ends the cancellation too.
  const std::string queued = Submit(*jm, Request("out2")).id();
  EXPECT_EQ(jm->CancelJob("", queued)->state(), v1::JOB_STATE_CANCELLED);
  const std::string third = Submit(*jm, Request("out3")).id();
  ASSERT_TRUE(Acquire(*jm, w).has_value());
  EXPECT_EQ(jm->CancelJob("", third)->state(), v1::JOB_STATE_CANCELLING);
  clock_.AdvanceMs(kLeaseMs);
  jm->Tick();
  EXPECT_EQ(Get(*jm, third).state(), v1::JOB_STATE_CANCELLED);
}

TEST_F(JobManagerTest, RequestIdIsIdempotentAcrossRestartsAndTenantsAreIsolated) {
  std::string first;
  {
    auto jm = Make();
    ASSERT_NE(jm, nullptr);
    v1::SubmitJobRequest r = Request("out");
    r.set_request_id("req-1");
    first = Submit(*jm, r, "acme").id();
    EXPECT_EQ(Submit(*jm, r, "acme").id(), first);
    v1::SubmitJobRequest changed = r;
    changed.mutable_spec()->mutable_gptq()->set_bits(8);
    ExpectError(jm->SubmitJob("acme", changed).status(), absl::StatusCode::kAlreadyExists,
                {"req-1", first});
    // Another tenant: its own namespace of request ids, no view of acme's jobs.
    ExpectError(jm->GetJob("other", first).status(), absl::StatusCode::kNotFound, {first});
    ExpectError(jm->WatchEvents("other", first, 0, 10, 0, nullptr).status(),
                absl::StatusCode::kNotFound, {});
    EXPECT_TRUE(jm->ListJobs("other", {})->jobs().empty());
    ExpectError(jm->SubmitJob("other", r).status(), absl::StatusCode::kInvalidArgument,
                {"spec.output_uri", "another job"});
    v1::SubmitJobRequest theirs = Request("theirs");
    theirs.set_request_id("req-1");
    const std::string other = Submit(*jm, theirs, "other").id();
    EXPECT_NE(other, first);
    EXPECT_EQ(jm->ListJobs("other", {})->jobs_size(), 1);
  }
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.set_request_id("req-1");
  EXPECT_EQ(Submit(*jm, r, "acme").id(), first);

  // Paging, newest first, filtered by state.
  clock_.AdvanceMs(10);
  const std::string second = Submit(*jm, Request("out2"), "acme").id();
  clock_.AdvanceMs(10);
  const std::string third = Submit(*jm, Request("out3"), "acme").id();
  ASSERT_TRUE(jm->CancelJob("acme", second).ok());
  v1::ListJobsRequest page;
  page.set_page_size(2);
  auto p1 = jm->ListJobs("acme", page);
  ASSERT_TRUE(p1.ok());
  ASSERT_EQ(p1->jobs_size(), 2);
  EXPECT_EQ(p1->jobs(0).id(), third);
  EXPECT_EQ(p1->jobs(1).id(), second);
  ASSERT_FALSE(p1->next_page_token().empty());
  page.set_page_token(p1->next_page_token());
  auto p2 = jm->ListJobs("acme", page);
  ASSERT_TRUE(p2.ok());
  ASSERT_EQ(p2->jobs_size(), 1);
  EXPECT_EQ(p2->jobs(0).id(), first);
  EXPECT_TRUE(p2->next_page_token().empty());
  v1::ListJobsRequest queued;
  queued.add_states(v1::JOB_STATE_QUEUED);
  auto q = jm->ListJobs("acme", queued);
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->jobs_size(), 2);
  page.set_page_token("not a token");
  EXPECT_EQ(jm->ListJobs("acme", page).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JobManagerTest, ResumesAfterARestartAndSucceeds) {
  std::string id, w;
  v1::Task interrupted;
  LayerOutcome interrupted_outcome;
  {
    auto jm = Make();
    ASSERT_NE(jm, nullptr);
    id = Submit(*jm, Request("out")).id();
    w = Register(*jm);
    for (int i = 0; i < 2; ++i) {
      auto t = Acquire(*jm, w);
      ASSERT_TRUE(t.has_value());
      RunAndComplete(*jm, w, *t, /*task_ms=*/2000);
    }
    // ETA by measured cost per weight (plan order is by name): down_proj (64×96) and k_proj
    // (32×64) of layer 0 took 4 s for 8192 weights; left: q 64×64, down 64×96, k 32×64,
    // q 64×64 = 16384 weights, on one worker.
    EXPECT_NEAR(Get(*jm, id).eta_seconds(), 8.0, 1e-9);
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value());
    interrupted = *t;
    auto outcome = RunLayer(interrupted);
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    interrupted_outcome = *outcome;
    // The coordinator goes away here (its state is only what the file holds).
  }
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUANTIZING);
  EXPECT_EQ(job.tasks().succeeded(), 2);
  EXPECT_EQ(job.tasks().running(), 1);
  EXPECT_EQ(job.tasks().queued(), 3);
  ASSERT_EQ(jm->ListWorkers("").size(), 1u);
  EXPECT_EQ(jm->ListWorkers("")[0].state(), "busy");
  EXPECT_EQ(jm->ListWorkers("")[0].current_task(), interrupted.id());
  // The lease survived the restart: its holder completes it.
  ASSERT_TRUE(Complete(*jm, w, interrupted, &interrupted_outcome).ok());
  while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t, 1000);
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  jm->Tick();
  job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  EXPECT_EQ(job.manifest_uri(), root_ + "/out/" + kManifestName);
  EXPECT_EQ(job.tasks().succeeded(), 7);
  EXPECT_EQ(job.tasks().total(), 7);
  EXPECT_EQ(job.eta_seconds(), 0);
  EXPECT_TRUE(StagingKeys("out").empty());
  ExpectError(jm->CancelJob("", id).status(), absl::StatusCode::kFailedPrecondition,
              {"SUCCEEDED"});

  // The output is a HF GPTQ directory with the manifest written last.
  auto out = Open(root_ + "/out");
  EXPECT_TRUE(out->Stat("config.json").ok());
  EXPECT_TRUE(out->Stat("quantize_config.json").ok());
  auto model = SafetensorsModel::Open(*out, "");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_TRUE(model->Find("model.layers.1.mlp.down_proj.qweight").ok());
  EXPECT_TRUE(model->Find("model.embed_tokens.weight").ok());
  auto manifest = nlohmann::json::parse(*out->ReadAll(kManifestName));
  EXPECT_EQ(manifest["spec"]["job_id"], id);
  EXPECT_EQ(manifest["spec"]["gptq"]["group_size"], 32);
  ASSERT_EQ(manifest["layers"].size(), 6u);
  for (auto& [module, l] : manifest["layers"].items()) {
    EXPECT_EQ(l["worker_id"], w) << module;
    EXPECT_GT(l["relative_error"].get<double>(), 0) << module;
  }
  EXPECT_GT(listener_.written_.load(), 0u);
  EXPECT_EQ(jm->Stats().jobs_by_state[v1::JOB_STATE_SUCCEEDED], 1);
  // Submitted before the restart, finished after it: each reported once.
  EXPECT_EQ(listener_.submitted_, 1);
  ASSERT_EQ(listener_.finished().size(), 1u);
  EXPECT_EQ(listener_.finished()[0].first, v1::JOB_STATE_SUCCEEDED);
  EXPECT_GT(listener_.finished()[0].second, 0.0);

  // Events: consecutive sequences, resumable, the terminal one last.
  bool finished = false;
  auto events = Events(*jm, id, 0, &finished);
  ASSERT_GT(events.size(), 10u);
  EXPECT_TRUE(finished);
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].sequence(), static_cast<int64_t>(i) + 1);
    EXPECT_EQ(events[i].job_id(), id);
  }
  EXPECT_NE(events.front().message().find("submitted: 6 layers"), std::string::npos);
  EXPECT_EQ(events.back().job_state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(events.back().tasks().succeeded(), 7);
  int layer_done = 0;
  for (const auto& e : events) {
    if (e.has_task() && e.task().state() == v1::TASK_STATE_SUCCEEDED &&
        e.task().kind() == v1::TASK_KIND_QUANTIZE) {
      ++layer_done;
      EXPECT_FALSE(e.task().layer().empty());
      EXPECT_GT(e.task().relative_error(), 0);
    }
  }
  EXPECT_EQ(layer_done, 6);
  auto resumed = jm->WatchEvents("", id, 3, 2, 0, &finished);
  ASSERT_TRUE(resumed.ok());
  ASSERT_EQ(resumed->size(), 2u);
  EXPECT_EQ((*resumed)[0].sequence(), 4);
  EXPECT_EQ((*resumed)[1].sequence(), 5);
  EXPECT_FALSE(finished);
  const auto start = std::chrono::steady_clock::now();
  auto after_last = jm->WatchEvents("", id, events.back().sequence(), 10, 5000, &finished);
  ASSERT_TRUE(after_last.ok());
  EXPECT_TRUE(after_last->empty());
  EXPECT_TRUE(finished);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));

  // A restart does not report the terminal job again.
  jm.reset();
  jm = Make();
  ASSERT_NE(jm, nullptr);
  jm->Tick();
  EXPECT_EQ(listener_.finished().size(), 1u);
}

TEST_F(JobManagerTest, AnAssemblyInterruptedBeforeItWasRecordedRunsAgain) {
  std::string id;
  {
    FaultyStateStore* faulty = nullptr;
    auto jm = Make(std::nullopt, &faulty);
    ASSERT_NE(jm, nullptr);
    // The transition that records the finished assembly never reaches the file.
    faulty->fail_if = [](const StateMutation& m) {
      for (const TaskRecord& t : m.tasks) {
        if (t.kind == v1::TASK_KIND_ASSEMBLE && t.state == v1::TASK_STATE_SUCCEEDED) return true;
      }
      return false;
    };
    v1::SubmitJobRequest r = Request("out", /*hessians=*/false);
    r.mutable_spec()->add_include(kLayer0);
    id = Submit(*jm, r).id();
    const std::string w = Register(*jm);
    while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t);
    jm->Tick();
    EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
    EXPECT_TRUE(Open(root_ + "/out")->Stat(kManifestName).ok());
    EXPECT_TRUE(StagingKeys("out").empty());
  }
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  jm->Tick();
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  auto events = Events(*jm, id);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().job_state(), v1::JOB_STATE_SUCCEEDED);
}

// Flips one bit near the end of `key` (in its tensor data) of the store at `uri`.
void FlipByte(ObjectStore& store, const std::string& key) {
  auto bytes = store.ReadAll(key);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  std::string b = *bytes;
  b[b.size() - 2] ^= 0x01;
  ASSERT_TRUE(store.Put(key, b).ok());
}

TEST_F(JobManagerTest, ACompletionWithAcquireNextLeasesTheWorkersNextTaskAndARetryReturnsIt) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  auto first = Acquire(*jm, w);
  ASSERT_TRUE(first.has_value());
  ASSERT_TRUE(RunLayer(*first).ok());
  v1::CompleteTaskRequest done = CompletionOf(w, *first);
  ASSERT_GT(done.output_bytes(), 0u);  // the staged layer's real size and digest
  done.set_acquire_next(true);

  v1::CompleteTaskResponse resp;
  ASSERT_TRUE(jm->CompleteTask(done, &resp).ok());
  ASSERT_TRUE(resp.has_next_task());
  const v1::Task next = resp.next_task();
  EXPECT_NE(next.id(), first->id());
  EXPECT_EQ(next.job_id(), id);
  EXPECT_EQ(next.kind(), v1::TASK_KIND_QUANTIZE);
  EXPECT_FALSE(next.lease_token().empty());
  EXPECT_FALSE(next.layer().module().empty());
  EXPECT_FALSE(next.staging_key().empty());
  // Leased to this worker: the job shows it running there, and the first task is done.
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.running_size(), 1);
  EXPECT_EQ(job.running(0).task_id(), next.id());
  EXPECT_EQ(job.running(0).worker_id(), w);
  EXPECT_EQ(job.tasks().succeeded(), 1);

  // The answer was lost and the worker retries: the same task, with the same lease.
  v1::CompleteTaskResponse again;
  ASSERT_TRUE(jm->CompleteTask(done, &again).ok());
  ASSERT_TRUE(again.has_next_task());
  EXPECT_EQ(again.next_task().id(), next.id());
  EXPECT_EQ(again.next_task().lease_token(), next.lease_token());
  EXPECT_EQ(Get(*jm, id).running_size(), 1);

  // The next task's lease is a real one: it completes; without acquire_next nothing more
  // is leased.
  ASSERT_TRUE(RunLayer(next).ok());
  ASSERT_TRUE(Complete(*jm, w, next).ok());
  job = Get(*jm, id);
  EXPECT_EQ(job.running_size(), 0);
  EXPECT_EQ(job.tasks().succeeded(), 2);

  // A completion asking for more on behalf of a worker that does not hold the lease (another
  // registered worker, or an unknown one) leases nothing to anyone.
  const std::string other = Register(*jm);
  for (const std::string& claimed : {other, std::string("w-unknown")}) {
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value());
    ASSERT_TRUE(RunLayer(*t).ok());
    v1::CompleteTaskRequest foreign = CompletionOf(claimed, *t);
    foreign.set_acquire_next(true);
    v1::CompleteTaskResponse none;
    ASSERT_TRUE(jm->CompleteTask(foreign, &none).ok());
    EXPECT_FALSE(none.has_next_task()) << claimed;
    EXPECT_EQ(Get(*jm, id).running_size(), 0) << claimed;
  }
}

TEST_F(JobManagerTest, StagedOutputsAreVerifiedAtCompletionAndAgainBeforeAssembly) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  auto out = Open(root_ + "/out");

  // 1. The staged object is not what the worker reports: refused, the attempt counted, the
  // task queued again (instead of waiting for its lease to expire).
  auto first = Acquire(*jm, w);
  ASSERT_TRUE(first.has_value());
  auto outcome = RunLayer(*first);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  v1::CompleteTaskRequest lie;
  lie.set_worker_id(w);
  lie.set_task_id(first->id());
  lie.set_lease_token(first->lease_token());
  auto digest = DigestObject(*out, first->staging_key());
  ASSERT_TRUE(digest.ok());
  lie.set_output_bytes(digest->size);
  lie.set_output_sha256("not-a-digest");  // refused before any I/O; nothing changes
  ExpectError(jm->CompleteTask(lie), absl::StatusCode::kInvalidArgument, {"output_sha256"});
  lie.set_output_sha256(std::string(64, '0'));
  ExpectError(jm->CompleteTask(lie), absl::StatusCode::kDataLoss,
              {first->staging_key(), "sha256", digest->sha256});
  clock_.AdvanceMs(60'000);  // past the retry backoff
  jm->Tick();
  auto again = Acquire(*jm, w);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->id(), first->id());
  EXPECT_EQ(again->attempt(), 1);
  // A staged byte flipped between writing and completing: the same.
  ASSERT_TRUE(RunLayer(*again).ok());
  auto good = DigestObject(*out, again->staging_key());
  ASSERT_TRUE(good.ok());
  FlipByte(*out, again->staging_key());
  v1::CompleteTaskRequest honest;
  honest.set_worker_id(w);
  honest.set_task_id(again->id());
  honest.set_lease_token(again->lease_token());
  honest.set_output_bytes(good->size);
  honest.set_output_sha256(good->sha256);
  ExpectError(jm->CompleteTask(honest), absl::StatusCode::kDataLoss, {again->staging_key()});
  clock_.AdvanceMs(60'000);
  jm->Tick();

  // 2. Every layer done; then one staged layer is flipped before the assembly reads it.
  while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t, 1000);
  ASSERT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  const std::vector<std::string> staged = StagingKeys("out");
  ASSERT_FALSE(staged.empty());
  const std::string victim = staged.back();
  FlipByte(*out, victim);
  jm->Tick();
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_QUANTIZING) << job.error().message();
  EXPECT_FALSE(out->Stat(kManifestName).ok());  // nothing was assembled
  EXPECT_EQ(out->List("")->size(), StagingKeys("out").size());
  bool told = false;
  for (const v1::JobEvent& e : Events(*jm, id)) {
    told |= e.message().find("changed since their tasks completed") != std::string::npos;
  }
  EXPECT_TRUE(told);

  // 3. The layer is quantized again (its attempt counted) and the job succeeds.
  clock_.AdvanceMs(60'000);
  jm->Tick();
  auto redo = Acquire(*jm, w);
  ASSERT_TRUE(redo.has_value());
  EXPECT_NE(victim.find(redo->id()), std::string::npos) << victim;
  RunAndComplete(*jm, w, *redo, 1000);
  EXPECT_FALSE(Acquire(*jm, w).has_value());
  jm->Tick();
  job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  auto manifest = nlohmann::json::parse(*out->ReadAll(kManifestName));
  bool found = false;
  for (auto& [module, l] : manifest["layers"].items()) {
    if (l["task_id"] != redo->id()) continue;
    found = true;
    EXPECT_EQ(l["attempt"], redo->attempt());
    EXPECT_GE(redo->attempt(), 1);
  }
  EXPECT_TRUE(found);
  EXPECT_TRUE(StagingKeys("out").empty());
}

// Records every key the assembly writes (Put, NewWriter) in the output store.
class WriteRecorder : public ForwardingStore {
 public:
  WriteRecorder(std::unique_ptr<ObjectStore> target, std::vector<std::string>* writes,
                std::mutex* mu)
      : ForwardingStore(target.get()), owned_(std::move(target)), writes_(writes), mu_(mu) {}
  absl::Status Put(std::string_view key, std::string_view data) override {
    Record(key);
    return ForwardingStore::Put(key, data);
  }
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    Record(key);
    return ForwardingStore::NewWriter(key);
  }

 private:
  void Record(std::string_view key) {
    std::lock_guard<std::mutex> l(*mu_);
    writes_->emplace_back(key);
  }
  std::unique_ptr<ObjectStore> owned_;
  std::vector<std::string>* writes_;
  std::mutex* mu_;
};

TEST_F(JobManagerTest, TheArtifactIsWrittenAsideAndPublishedByRenameManifestLast) {
  std::vector<std::string> writes;
  std::mutex mu;
  JobManagerOptions o = Options();
  const std::string out_uri = root_ + "/out";
  o.open_store = [&](std::string_view uri) -> absl::StatusOr<std::unique_ptr<ObjectStore>> {
    auto s = OpenObjectStore(uri);
    if (!s.ok() || uri != out_uri) return s;
    return std::unique_ptr<ObjectStore>(new WriteRecorder(std::move(*s), &writes, &mu));
  };
  auto jm = Make(o);
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t, 1000);
  ASSERT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  // What a killed earlier run left in the assembly's temp prefix: a file and a writer's temp.
  const std::string temp_dir = root_ + "/out/.qforge-staging/" + id + "/assembly";
  std::filesystem::create_directories(temp_dir);
  std::ofstream(temp_dir + "/model.safetensors") << "partial";
  std::ofstream(temp_dir + "/.model.safetensors.tmp-0123456789abcdef") << "partial";
  jm->Tick();
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  // Every byte of the artifact was written under the staging prefix, none in place; beside
  // it, the publication journal, once.
  std::lock_guard<std::mutex> l(mu);
  ASSERT_FALSE(writes.empty());
  int journals = 0;
  for (const std::string& k : writes) {
    if (k == ".qforge-staging/" + id + "/publish.json") {
      ++journals;
      continue;
    }
    EXPECT_EQ(k.rfind(".qforge-staging/" + id + "/assembly/", 0), 0u) << k;
  }
  EXPECT_EQ(journals, 1);
  // The output holds the artifact only: no staging, no temp file of any writer.
  for (const auto& e : std::filesystem::recursive_directory_iterator(root_ + "/out")) {
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
    EXPECT_EQ(e.path().string().find(".qforge-staging"), std::string::npos) << e.path();
  }
  EXPECT_TRUE(SafetensorsModel::Open(*Open(out_uri), "").ok());
  EXPECT_TRUE(Open(out_uri)->Stat(kManifestName).ok());
}

TEST_F(JobManagerTest, AFailedStateWriteLeavesNoTrace) {
  FaultyStateStore* faulty = nullptr;
  auto jm = Make(std::nullopt, &faulty);
  ASSERT_NE(jm, nullptr);
  std::atomic<int> failures{1};
  faulty->fail_if = [&](const StateMutation&) { return failures-- > 0; };
  ExpectError(jm->SubmitJob("", Request("out")).status(), absl::StatusCode::kUnavailable,
              {"injected"});
  EXPECT_TRUE(jm->ListJobs("", {})->jobs().empty());
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  failures = 1;
  v1::AcquireTaskRequest req;
  req.set_worker_id(w);
  EXPECT_EQ(jm->AcquireTask(req).status().code(), absl::StatusCode::kUnavailable);
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);  // the lease was not granted in memory either
  EXPECT_EQ(job.tasks().running(), 0);
  EXPECT_TRUE(Acquire(*jm, w).has_value());
}

// A watcher that keeps up is answered from the coordinator's memory, with every event exactly
// as the store holds it; once the job settles, and after a restart (nothing in memory), the
// same events come from the store.
TEST_F(JobManagerTest, AWatcherThatKeepsUpReadsTheEventsFromMemoryExactlyAsStored) {
  FaultyStateStore* store = nullptr;
  auto jm = Make(std::nullopt, &store);
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  std::vector<v1::JobEvent> watched;
  bool finished = false;
  auto watch = [&] {
    for (const v1::JobEvent& e :
         Events(*jm, id, watched.empty() ? 0 : watched.back().sequence(), &finished)) {
      watched.push_back(e);
    }
  };
  watch();
  while (auto t = Acquire(*jm, w)) {
    watch();
    RunAndComplete(*jm, w, *t, 1000);
    watch();
  }
  EXPECT_FALSE(finished);
  auto window = jm->WatchEvents("", id, 3, 2, 0, &finished);
  ASSERT_TRUE(window.ok()) << window.status();
  ASSERT_EQ(window->size(), 2u);
  EXPECT_EQ((*window)[0].sequence(), 4);
  EXPECT_EQ((*window)[1].sequence(), 5);
  EXPECT_FALSE(finished);
  // Sequences past the last (a hostile or confused watcher) get nothing, from neither place.
  auto beyond = jm->WatchEvents("", id, std::numeric_limits<int64_t>::max(), 10, 0, &finished);
  ASSERT_TRUE(beyond.ok()) << beyond.status();
  EXPECT_TRUE(beyond->empty());
  EXPECT_EQ(store->event_reads.load(), 0) << "a watcher that keeps up reads no events back";
  // The assembly ends the job and it settles: its events are then read from the store.
  jm->Tick();
  ASSERT_EQ(Get(*jm, id).state(), v1::JOB_STATE_SUCCEEDED);
  watch();
  EXPECT_TRUE(finished);
  EXPECT_EQ(store->event_reads.load(), 1);
  ASSERT_GT(watched.size(), 14u);  // submitted, quantizing, 6 × (leased, done), assembling, ...
  EXPECT_EQ(watched.back().job_state(), v1::JOB_STATE_SUCCEEDED);
  bool some_running = false;
  for (const v1::JobEvent& e : watched) some_running |= e.running_size() > 0;
  EXPECT_TRUE(some_running);

  auto stored = store->ReadEvents(id, 0, 1000);
  ASSERT_TRUE(stored.ok()) << stored.status();
  ASSERT_EQ(stored->size(), watched.size());
  for (size_t i = 0; i < watched.size(); ++i) {
    EXPECT_EQ(watched[i].sequence(), static_cast<int64_t>(i) + 1);
    EXPECT_EQ(watched[i].SerializeAsString(), (*stored)[i].SerializeAsString())
        << "event " << i + 1 << " differs from the stored one";
  }

  jm.reset();
  jm = Make(std::nullopt, &store);
  ASSERT_NE(jm, nullptr);
  auto replay = Events(*jm, id, 0, &finished);
  EXPECT_GT(store->event_reads.load(), 0);
  EXPECT_TRUE(finished);
  ASSERT_EQ(replay.size(), watched.size());
  for (size_t i = 0; i < watched.size(); ++i) {
    EXPECT_EQ(replay[i].SerializeAsString(), watched[i].SerializeAsString()) << i + 1;
  }
}

// With room for only the last event in memory, a watcher behind reads from the store and one
// at the last-but-one event from memory: the same events either way, in order, none skipped.
TEST_F(JobManagerTest, AWatcherBehindWhatMemoryHoldsReadsTheStoreAndMissesNothing) {
  JobManagerOptions options = Options();
  options.watch_memory_bytes_per_job = 1;
  FaultyStateStore* store = nullptr;
  auto jm = Make(options, &store);
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  for (int i = 0; i < 3; ++i) {
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value());
    RunAndComplete(*jm, w, *t, 1000);
  }
  bool finished = true;
  const std::vector<v1::JobEvent> all = Events(*jm, id, 0, &finished);
  EXPECT_FALSE(finished);
  EXPECT_EQ(store->event_reads.load(), 1);
  ASSERT_GE(all.size(), 8u);  // submitted, quantizing, 3 × (leased, done)
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(all[i].sequence(), static_cast<int64_t>(i) + 1);
  }
  const std::vector<v1::JobEvent> last = Events(*jm, id, all.size() - 1, &finished);
  EXPECT_EQ(store->event_reads.load(), 1) << "the last event is always in memory";
  ASSERT_EQ(last.size(), 1u);
  EXPECT_EQ(last[0].SerializeAsString(), all.back().SerializeAsString());
  const std::vector<v1::JobEvent> two = Events(*jm, id, all.size() - 2, &finished);
  EXPECT_EQ(store->event_reads.load(), 2);
  ASSERT_EQ(two.size(), 2u);
  EXPECT_EQ(two[1].SerializeAsString(), all.back().SerializeAsString());
}

TEST_F(JobManagerTest, WatchEventsLongPollsAndWakesOnNewEvents) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest one = Request("out");
  one.mutable_spec()->add_include(R"(layers\.0\.self_attn\.q_proj)");
  const std::string id = Submit(*jm, one).id();
  auto events = Events(*jm, id);
  ASSERT_EQ(events.size(), 1u);
  const int64_t last = events.back().sequence();

  // Nothing new: returns empty after the wait.
  auto start = std::chrono::steady_clock::now();
  bool finished = true;
  auto none = jm->WatchEvents("", id, last, 10, 100, &finished);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  EXPECT_FALSE(finished);
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(90));

  // A watcher blocked in WatchEvents wakes when a task is leased.
  std::vector<v1::JobEvent> woke;
  std::thread watcher([&] {
    auto e = jm->WatchEvents("", id, last, 10, 10'000, nullptr);
    if (e.ok()) woke = *e;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  start = std::chrono::steady_clock::now();
  const std::string w = Register(*jm);
  ASSERT_TRUE(Acquire(*jm, w).has_value());
  watcher.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  ASSERT_FALSE(woke.empty());
  EXPECT_EQ(woke[0].sequence(), last + 1);
  EXPECT_EQ(woke[0].job_state(), v1::JOB_STATE_QUANTIZING);

  // A long-polling AcquireTask wakes when a job is submitted.
  const std::string idle = Register(*jm);
  std::optional<v1::Task> got;
  std::thread poller([&] { got = Acquire(*jm, idle, 5000); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  Submit(*jm, Request("out2"));
  poller.join();
  EXPECT_TRUE(got.has_value());

  // Shutdown wakes waiters, and later calls are UNAVAILABLE.
  std::thread late([&] {
    auto e = jm->WatchEvents("", id, 1000, 10, 10'000, nullptr);
    EXPECT_FALSE(e.ok());
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  jm->Shutdown();
  late.join();
  EXPECT_EQ(jm->GetJob("", id).status().code(), absl::StatusCode::kUnavailable);
}

// A failed assembly that is not retried leaves nothing under `.qforge-staging/` of the user's
// output: not the staged layers, not a killed writer's temp file, not the directory itself.
TEST_F(JobManagerTest, AFailedAssemblyLeavesNoStaging) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t, 1000);
  ASSERT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  ASSERT_FALSE(StagingKeys("out").empty());
  // The source loses its config.json: the assembler refuses with INVALID_ARGUMENT (not retried).
  ASSERT_TRUE(Open(root_ + "/model")->Delete("config.json").ok());
  // A writer of this job killed before its Close left a temp file (LocalStore's naming).
  const std::string staging_dir = root_ + "/out/.qforge-staging/" + id;
  ASSERT_TRUE(std::filesystem::is_directory(staging_dir));
  std::ofstream(staging_dir + "/.stray.tmp-0123456789abcdef") << "partial";
  jm->Tick();
  jm->Tick();
  const v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_NE(job.error().message().find("config.json"), std::string::npos) << job.error().message();
  EXPECT_TRUE(StagingKeys("out").empty());
  EXPECT_FALSE(std::filesystem::exists(root_ + "/out/.qforge-staging"));
}

TEST_F(JobManagerTest, BackgroundTickAssemblesInItsOwnThread) {
  JobManagerOptions o = Options();
  o.background_tick = true;
  o.tick_interval_ms = 5;
  o.run_assembly_inline = false;
  auto jm = Make(o);
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->add_include(R"(layers\.1\.self_attn\.k_proj)");
  const std::string id = Submit(*jm, r).id();
  const std::string w = Register(*jm);
  auto t = Acquire(*jm, w, 1000);
  ASSERT_TRUE(t.has_value());
  RunAndComplete(*jm, w, *t);
  // Nobody calls Tick(): the background thread starts the assembly, which runs beside it.
  bool finished = false;
  std::vector<v1::JobEvent> seen;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!finished && std::chrono::steady_clock::now() < deadline) {
    auto e = jm->WatchEvents("", id, seen.empty() ? 0 : seen.back().sequence(), 100, 1000,
                             &finished);
    ASSERT_TRUE(e.ok()) << e.status();
    seen.insert(seen.end(), e->begin(), e->end());
  }
  ASSERT_TRUE(finished);
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  EXPECT_EQ(seen.back().job_state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(Open(root_ + "/out")->Stat(kManifestName).ok());
  EXPECT_TRUE(StagingKeys("out").empty());
}

// Issue 18 item 5 / defect 8: every request field has a cap, enums and fractions are checked,
// and what a worker reports about a failure is stored capped.
TEST_F(JobManagerTest, RequestsOutsideTheirLimitsAreRefusedNamingTheFieldAndTheCap) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::ListJobsRequest list;
  list.add_states(v1::JOB_STATE_QUEUED);
  list.add_states(static_cast<v1::JobState>(99));
  ExpectError(jm->ListJobs("", list).status(), absl::StatusCode::kInvalidArgument,
              {"states[1]", "99", "not a JobState"});
  list.clear_states();
  list.set_page_token(std::string(100'000, 'A'));
  ExpectError(jm->ListJobs("", list).status(), absl::StatusCode::kInvalidArgument,
              {"page_token", "100000 bytes", "512"});
  const std::string huge(1 << 20, 'j');
  ExpectError(jm->GetJob("", huge).status(), absl::StatusCode::kInvalidArgument,
              {"id: 1048576 bytes", "limit of 128"});
  ExpectError(jm->CancelJob("", huge).status(), absl::StatusCode::kInvalidArgument, {"id:"});

  v1::RegisterWorkerRequest reg;
  for (int i = 0; i < 100; ++i) reg.add_backends("cpu");
  ExpectError(jm->RegisterWorker(reg).status(), absl::StatusCode::kInvalidArgument,
              {"backends", "100 entries", "at most 8"});
  reg.clear_backends();
  reg.add_backends("cpu");
  reg.set_version(std::string(1000, 'v'));
  ExpectError(jm->RegisterWorker(reg).status(), absl::StatusCode::kInvalidArgument,
              {"version", "limit of 64"});
  reg.clear_version();
  reg.add_devices()->set_name(std::string(5000, 'd'));
  ExpectError(jm->RegisterWorker(reg).status(), absl::StatusCode::kInvalidArgument,
              {"devices[0].name"});

  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->add_include(kLayer0);
  const std::string id = Submit(*jm, r).id();
  const std::string w = Register(*jm);
  auto task = Acquire(*jm, w);
  ASSERT_TRUE(task.has_value());

  // Heartbeat progress: a fraction, never NaN or negative.
  for (double bad : {std::nan(""), -5.0, 1.5, HUGE_VAL}) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(w);
    hb.set_task_id(task->id());
    hb.set_lease_token(task->lease_token());
    hb.set_progress(bad);
    ExpectError(jm->Heartbeat(hb).status(), absl::StatusCode::kInvalidArgument,
                {"progress", "not a fraction within [0, 1]"});
  }
  v1::HeartbeatRequest hb;
  hb.set_worker_id(w);
  hb.set_task_id(task->id());
  hb.set_lease_token(task->lease_token());
  hb.set_progress(0.25);
  hb.set_phase(std::string(1000, 'p'));
  ExpectError(jm->Heartbeat(hb).status(), absl::StatusCode::kInvalidArgument, {"phase"});
  hb.set_phase("solve");
  ASSERT_TRUE(jm->Heartbeat(hb).ok());

  v1::CompleteTaskRequest complete;
  complete.set_worker_id(w);
  complete.set_task_id(task->id());
  complete.set_lease_token(task->lease_token());
  complete.mutable_metrics()->set_relative_error(std::nan(""));
  ExpectError(jm->CompleteTask(complete), absl::StatusCode::kInvalidArgument,
              {"metrics.relative_error", "not a finite number"});

  // FailTask: a code outside google.rpc.Code is refused; a 1 MiB message is stored capped.
  ExpectError(Fail(*jm, w, *task, static_cast<absl::StatusCode>(999), "boom", false),
              absl::StatusCode::kInvalidArgument, {"error.code", "999", "0..16"});
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_QUANTIZING);  // the refused call changed nothing
  std::string message(1 << 20, 'x');
  message.replace(4094, 3, "\xE2\x82\xAC");  // a 3-byte character across the cut (4096)
  ASSERT_TRUE(Fail(*jm, w, *task, absl::StatusCode::kInvalidArgument, message, false, "BAD_INPUT",
                   std::string(100'000, 's'))
                  .ok());
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_LT(job.error().message().size(), 4096u + 200u);
  EXPECT_NE(job.error().message().find("x [truncated, 1048576 bytes]"), std::string::npos)
      << "cut before the character, not inside it";
  EXPECT_LT(job.error().subject().size(), 512u + 40u);
  EXPECT_EQ(job.error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  // What is stored is what the events carry too.
  for (const v1::JobEvent& e : Events(*jm, id)) {
    EXPECT_LT(e.message().size(), 4096u + 200u);
    EXPECT_LT(e.task().error().message().size(), 4096u + 200u);
  }
}

TEST_F(JobManagerTest, TenantQuotasRefuseSubmitsWithResourceExhaustedNamingTheFlag) {
  JobManagerOptions o = Options();
  o.max_running_jobs_per_tenant = 2;
  auto jm = Make(o);
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("a1");
  r.mutable_spec()->add_include(kLayer0);  // 3 QUANTIZE + ASSEMBLE
  const std::string first = Submit(*jm, r, "alice").id();
  r.mutable_spec()->set_output_uri(root_ + "/a2");
  Submit(*jm, r, "alice");
  r.mutable_spec()->set_output_uri(root_ + "/a3");
  for (bool validate_only : {true, false}) {
    r.set_validate_only(validate_only);
    ExpectError(jm->SubmitJob("alice", r).status(), absl::StatusCode::kResourceExhausted,
                {"tenant 'alice' has 2 unfinished jobs", "limit is 2",
                 "--max-running-jobs-per-tenant"});
  }
  r.set_validate_only(false);
  // Another tenant has its own quota; a finished job frees a slot.
  EXPECT_FALSE(Submit(*jm, r, "bob").id().empty());
  ASSERT_TRUE(jm->CancelJob("alice", first).ok());
  r.mutable_spec()->set_output_uri(root_ + "/a4");
  EXPECT_FALSE(Submit(*jm, r, "alice").id().empty());

  o.max_running_jobs_per_tenant = 0;  // no limit
  o.max_queued_tasks_per_tenant = 6;
  auto jm2 = Make(o, nullptr, "state2.db");
  ASSERT_NE(jm2, nullptr);
  r.mutable_spec()->set_output_uri(root_ + "/b1");
  Submit(*jm2, r, "carol");  // 4 tasks
  r.mutable_spec()->set_output_uri(root_ + "/b2");
  ExpectError(jm2->SubmitJob("carol", r).status(), absl::StatusCode::kResourceExhausted,
              {"tenant 'carol' has 4 queued tasks and this job adds 4", "limit is 6",
               "--max-queued-tasks-per-tenant"});
  // Leased tasks no longer count as queued.
  const std::string w = Register(*jm2);
  ASSERT_TRUE(Acquire(*jm2, w).has_value());
  ASSERT_TRUE(Acquire(*jm2, w).has_value());
  EXPECT_TRUE(jm2->SubmitJob("carol", r).ok());
}

TEST_F(JobManagerTest, ListWorkersShowsATenantOnlyItsOwnTasks) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->add_include(kLayer0);
  const std::string id = Submit(*jm, r, "alice").id();
  const std::string w = Register(*jm);
  auto task = Acquire(*jm, w);
  ASSERT_TRUE(task.has_value());
  auto mine = jm->ListWorkers("alice");
  ASSERT_EQ(mine.size(), 1u);
  EXPECT_EQ(mine[0].state(), "busy");
  EXPECT_EQ(mine[0].current_task(), task->id());
  auto theirs = jm->ListWorkers("bob");
  ASSERT_EQ(theirs.size(), 1u);
  EXPECT_EQ(theirs[0].state(), "busy");
  EXPECT_EQ(theirs[0].current_task(), "");
  std::string dump;
  for (const v1::WorkerInfo& info : theirs) dump += info.DebugString();
  EXPECT_EQ(dump.find(id), std::string::npos) << dump;
}

// Issue 18 defect 7: concurrent submits of a model with a large header are all answered while
// the headers being parsed at once stay within the process's budget.
TEST_F(JobManagerTest, ConcurrentSubmitsOfAModelWithALargeHeaderStayWithinTheParseBudget) {
  {
    auto store = Open(root_ + "/bigmodel");
    std::vector<TensorSpec> specs;
    std::vector<std::string> names;
    for (const auto& [name, bytes] : source_) {
      auto src = SafetensorsModel::Open(*Open(root_ + "/model"), "");
      ASSERT_TRUE(src.ok());
      auto loc = src->Find(name);
      ASSERT_TRUE(loc.ok());
      specs.push_back({name, loc->info->dtype, loc->info->shape});
      names.push_back(name);
    }
    // A 3 MiB header: the JSON parse of each costs several times that.
    auto w = ShardedSafetensorsWriter::Create(*store, "", specs, uint64_t{1} << 40,
                                              {{"pad", std::string(3 << 20, 'p')}});
    ASSERT_TRUE(w.ok()) << w.status();
    for (const std::string& name : names) {
      ASSERT_TRUE((*w)->WriteTensorData(name, source_[name]).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    ASSERT_TRUE(store->Put("config.json", R"({"model_type": "llama", "hidden_size": 64})").ok());
  }
  struct RestoreLimits {
    ~RestoreLimits() { EXPECT_TRUE(SetSafetensorsHeaderLimits(SafetensorsHeaderLimits()).ok()); }
  } restore;  // the limits are process-wide
  SafetensorsHeaderLimits limits;
  limits.parse_budget_bytes = 4 << 20;  // one such header at a time
  ASSERT_TRUE(SetSafetensorsHeaderLimits(limits).ok());
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->set_model_uri(root_ + "/bigmodel");
  r.set_validate_only(true);
  std::vector<absl::StatusOr<v1::Job>> results(8, absl::UnknownError("not answered"));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < results.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = jm->SubmitJob("", r); });
  }
  for (std::thread& t : threads) t.join();
  for (const auto& res : results) {
    ASSERT_TRUE(res.ok()) << res.status();
    EXPECT_EQ(res->tasks().layers(), 6);
  }
  const std::shared_ptr<ByteBudget> budget = SafetensorsHeaderBudget();
  EXPECT_GT(budget->peak_in_use(), uint64_t{3} << 20);  // the headers went through it
  EXPECT_LE(budget->peak_in_use(), uint64_t{4} << 20);  // never two at once
  EXPECT_EQ(budget->in_use(), 0u);

  // A header longer than the process accepts is refused before it is read, naming the file.
  limits.max_header_bytes = 1 << 20;
  ASSERT_TRUE(SetSafetensorsHeaderLimits(limits).ok());
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors", "exceeds the limit of 1048576 bytes"});
}

// Issue 18 defect 8: a NaN in a tensor copied unquantized (a layernorm weight) fails the job at
// assembly, naming the tensor; no artifact is published.
TEST_F(JobManagerTest, ANonFiniteValueInACopiedTensorFailsTheJobNamingTheTensor) {
  {
    auto store = Open(root_ + "/nanmodel");
    auto src = SafetensorsModel::Open(*Open(root_ + "/model"), "");
    ASSERT_TRUE(src.ok());
    std::vector<TensorSpec> specs;
    for (const std::string& name : src->TensorNames()) {
      auto loc = src->Find(name);
      ASSERT_TRUE(loc.ok());
      specs.push_back({name, loc->info->dtype, loc->info->shape});
    }
    auto w = ShardedSafetensorsWriter::Create(*store, "", specs, 20000);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const TensorSpec& spec : specs) {
      std::string bytes = source_[spec.name];
      if (spec.name == "model.layers.1.input_layernorm.weight") {
        const uint16_t nan = 0x7E00;  // F16 NaN at element 5
        std::memcpy(&bytes[10], &nan, 2);
      }
      ASSERT_TRUE((*w)->WriteTensorData(spec.name, bytes).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    ASSERT_TRUE(store->Put("config.json", R"({"model_type": "llama", "hidden_size": 64})").ok());
  }
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.mutable_spec()->set_model_uri(root_ + "/nanmodel");
  r.mutable_spec()->add_include(kLayer0);
  const std::string id = Submit(*jm, r).id();
  const std::string w = Register(*jm);
  while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t, 1000);
  ASSERT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  jm->Tick();
  const v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  for (const char* part : {"tensor 'model.layers.1.input_layernorm.weight'", "copied unquantized",
                           "1 non-finite value", "element 5"}) {
    EXPECT_NE(job.error().message().find(part), std::string::npos) << job.error().message();
  }
  EXPECT_FALSE(Open(root_ + "/out")->Stat(kManifestName).ok());
}

// Issue 18 defect 8: every QUANTIZE task carries its shard as it was at submit.
TEST_F(JobManagerTest, TasksCarryTheirSourceShardPinnedAtSubmit) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  Submit(*jm, Request("out"));
  const std::string w = Register(*jm);
  int seen = 0;
  while (auto t = Acquire(*jm, w)) {
    auto info = Open(root_ + "/model")->Stat(t->layer().shard_key());
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(t->layer().shard_size(), info->size) << t->layer().module();
    EXPECT_FALSE(t->layer().shard_version().empty());
    EXPECT_EQ(t->layer().shard_version(), info->version) << t->layer().module();
    ++seen;
  }
  EXPECT_EQ(seen, 6);
}

TEST_F(JobManagerTest, WorkersRegisterAndAreReportedLost) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::RegisterWorkerRequest bad;
  ExpectError(jm->RegisterWorker(bad).status(), absl::StatusCode::kInvalidArgument, {"backends"});
  bad.add_backends("cpu");
  bad.set_worker_id("../x");
  ExpectError(jm->RegisterWorker(bad).status(), absl::StatusCode::kInvalidArgument, {"worker_id"});

  v1::RegisterWorkerRequest r;
  r.set_hostname("node-1");
  r.add_backends("cuda");
  r.set_version("1.2.3");
  auto* d = r.add_devices();
  d->set_name("NVIDIA H100");
  d->set_kind("cuda");
  auto resp = jm->RegisterWorker(r);
  ASSERT_TRUE(resp.ok());
  const std::string id = resp->worker_id();
  EXPECT_EQ(id.rfind("w-", 0), 0u);
  EXPECT_EQ(resp->lease_duration_ms(), kLeaseMs);
  EXPECT_EQ(resp->heartbeat_interval_ms(), 1000);
  r.set_worker_id(id);  // re-registration keeps the id
  EXPECT_EQ(jm->RegisterWorker(r)->worker_id(), id);
  EXPECT_EQ(Register(*jm, {"cpu"}, 0, "gpu-node-3"), "gpu-node-3");

  v1::AcquireTaskRequest unknown;
  unknown.set_worker_id("never-registered");
  EXPECT_EQ(jm->AcquireTask(unknown).status().code(), absl::StatusCode::kNotFound);

  auto workers = jm->ListWorkers("");
  ASSERT_EQ(workers.size(), 2u);
  const v1::WorkerInfo& info = workers[0].id() == id ? workers[0] : workers[1];
  EXPECT_EQ(info.hostname(), "node-1");
  EXPECT_EQ(info.state(), "idle");
  EXPECT_EQ(info.devices(0).name(), "NVIDIA H100");
  EXPECT_EQ(info.version(), "1.2.3");
  EXPECT_EQ(info.last_heartbeat_unix_ms(), clock_.NowMs());

  clock_.AdvanceMs(30'001);
  JobManagerStats stats = jm->Stats();
  EXPECT_EQ(stats.workers_by_state["lost"], 2);
  EXPECT_FALSE(Acquire(*jm, "gpu-node-3").has_value());  // any call counts as seen
  stats = jm->Stats();
  EXPECT_EQ(stats.workers_by_state["lost"], 1);
  EXPECT_EQ(stats.workers_by_state["idle"], 1);
}


// ---- Calibration: CALIBRATE shards → REDUCE → QUANTIZE, the Hessian cache ------------------

// A real (tiny) Llama decoder under root_/cmodel: hidden 64, 4 heads of 16 with 2 KV heads,
// intermediate 96, 2 layers, vocabulary 64; token data under root_/data.
class CalibrationJobTest : public JobManagerTest {
 protected:
  static constexpr int kHidden = 64, kInter = 96, kLayers = 2, kVocab = 64;
  static constexpr int kSamples = 8, kSeqLen = 16;

  void SetUp() override {
    JobManagerTest::SetUp();
    WriteDecoderModel(root_ + "/cmodel", "LlamaForCausalLM");
    WriteTokens(root_ + "/data", "tokens.safetensors", kSamples, kSeqLen, kVocab, 5);
  }

  static void WriteDecoderModel(const std::string& dir, const std::string& architecture) {
    auto store = Open(dir);
    quant::Rng rng(17);
    std::vector<std::pair<std::string, std::vector<int64_t>>> ts = {
        {"model.embed_tokens.weight", {kVocab, kHidden}}};
    for (int i = 0; i < kLayers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      ts.push_back({p + "input_layernorm.weight", {kHidden}});
      ts.push_back({p + "self_attn.q_proj.weight", {64, kHidden}});
      ts.push_back({p + "self_attn.k_proj.weight", {32, kHidden}});
      ts.push_back({p + "self_attn.v_proj.weight", {32, kHidden}});
      ts.push_back({p + "self_attn.o_proj.weight", {kHidden, 64}});
      ts.push_back({p + "post_attention_layernorm.weight", {kHidden}});
      ts.push_back({p + "mlp.gate_proj.weight", {kInter, kHidden}});
      ts.push_back({p + "mlp.up_proj.weight", {kInter, kHidden}});
      ts.push_back({p + "mlp.down_proj.weight", {kHidden, kInter}});
    }
    ts.push_back({"model.norm.weight", {kHidden}});
    ts.push_back({"lm_head.weight", {kVocab, kHidden}});
    std::vector<TensorSpec> specs;
    for (const auto& [name, shape] : ts) specs.push_back({name, DType::kF16, shape});
    auto w = ShardedSafetensorsWriter::Create(*store, "", specs, 40000);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const auto& [name, shape] : ts) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::vector<float> v(static_cast<size_t>(n));
      const bool norm = shape.size() == 1;
      for (float& x : v) {
        x = norm ? 1.0f + 0.05f * static_cast<float>(rng.Normal())
                 : 0.08f * static_cast<float>(rng.StudentT(4.0));
      }
      ASSERT_TRUE((*w)->WriteTensorData(name, F16Bytes(v)).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    nlohmann::json config = {{"architectures", {architecture}},
                             {"model_type", "llama"},
                             {"hidden_size", kHidden},
                             {"intermediate_size", kInter},
                             {"num_attention_heads", 4},
                             {"num_key_value_heads", 2},
                             {"num_hidden_layers", kLayers},
                             {"vocab_size", kVocab},
                             {"max_position_embeddings", 64},
                             {"rms_norm_eps", 1e-5},
                             {"rope_theta", 10000.0},
                             {"hidden_act", "silu"},
                             {"tie_word_embeddings", false}};
    ASSERT_TRUE(store->Put("config.json", config.dump()).ok());
  }

  // input_ids I32 [samples, seq_len], ids uniform in [0, vocab).
  static void WriteTokens(const std::string& dir, const std::string& key, int samples,
                          int seq_len, int vocab, uint64_t seed) {
    auto store = Open(dir);
    quant::Rng rng(seed);
    std::string bytes(static_cast<size_t>(samples) * seq_len * 4, '\0');
    for (int i = 0; i < samples * seq_len; ++i) {
      const int32_t id = static_cast<int32_t>(rng.Uniform() * vocab) % vocab;
      std::memcpy(&bytes[4 * static_cast<size_t>(i)], &id, 4);
    }
    auto w = SafetensorsWriter::Create(*store, key, {{"input_ids", DType::kI32, {samples, seq_len}}});
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->WriteTensorData("input_ids", bytes).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }

  JobManagerOptions CalOptions() {
    JobManagerOptions o = Options();
    o.hessian_cache_uri = root_ + "/cache";
    return o;
  }

  v1::SubmitJobRequest CalRequest(const std::string& out, int shard_samples = 3) {
    v1::SubmitJobRequest r;
    v1::JobSpec* s = r.mutable_spec();
    s->set_model_uri(root_ + "/cmodel");
    s->set_output_uri(root_ + "/" + out);
    s->mutable_gptq()->set_bits(4);
    s->mutable_gptq()->set_group_size(32);
    s->mutable_calibration()->set_dataset_uri(root_ + "/data/tokens.safetensors");
    s->mutable_calibration()->set_shard_samples(shard_samples);
    return r;
  }

  // What a worker does with a leased CALIBRATE task (the job floor's steps, CPU forward).
  absl::StatusOr<CalibrationShardOutcome> RunCalibrate(const v1::Task& task) {
    const v1::CalibrationWork& w = task.calibration();
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> model_store, OpenObjectStore(w.model_uri()));
    QF_ASSIGN_OR_RETURN(SafetensorsModel model, SafetensorsModel::Open(*model_store, ""));
    QF_ASSIGN_OR_RETURN(DecoderModelConfig config, ReadDecoderModelConfig(*model_store, ""));
    QF_ASSIGN_OR_RETURN(ObjectUri data_uri, SplitObjectUri(w.dataset_uri()));
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> data_store,
                        OpenObjectStore(data_uri.store_uri));
    CalibrationDataOptions o;
    o.max_samples = task.spec().calibration().samples();
    o.seq_len = task.spec().calibration().seq_len();
    QF_ASSIGN_OR_RETURN(CalibrationData data,
                        LoadCalibrationData(*data_store, data_uri.key, o, config.decoder,
                                            "spec.calibration.dataset_uri"));
    EXPECT_EQ(data.sha256, w.dataset_sha256());
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> out, OpenObjectStore(task.staging_uri()));
    std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
    CalibrationShardJob job;
    job.model_store = model_store.get();
    job.model = &model;
    job.model_config = &config;
    job.data = &data;
    job.sample_begin = w.sample_begin();
    job.sample_end = w.sample_end();
    job.forward = forward.get();
    job.out_store = out.get();
    job.staged_key = task.staging_key();
    return RunCalibrationShard(job);
  }

  // What a worker does with a leased REDUCE task.
  absl::StatusOr<ReduceOutcome> RunReduce(const v1::Task& task) {
    const v1::CalibrationWork& w = task.calibration();
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> in, OpenObjectStore(task.staging_uri()));
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> cache, OpenObjectStore(w.hessians_uri()));
    ReduceJob job;
    job.in_store = in.get();
    job.partial_keys.assign(w.partial_keys().begin(), w.partial_keys().end());
    job.out_store = cache.get();
    job.out_key = task.staging_key();
    return ReduceHessians(job);
  }

  // What a worker does with a leased EVALUATE task (the job floor's steps, CPU forward).
  absl::StatusOr<EvaluationShardOutcome> RunEvaluate(const v1::Task& task) {
    const v1::EvaluationWork& w = task.evaluation();
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> ref_store,
                        OpenObjectStore(w.reference_model_uri()));
    QF_ASSIGN_OR_RETURN(SafetensorsModel ref, SafetensorsModel::Open(*ref_store, ""));
    QF_ASSIGN_OR_RETURN(DecoderModelConfig ref_config, ReadDecoderModelConfig(*ref_store, ""));
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> cand_store,
                        OpenObjectStore(w.candidate_model_uri()));
    QF_ASSIGN_OR_RETURN(SafetensorsModel cand, SafetensorsModel::Open(*cand_store, ""));
    QF_ASSIGN_OR_RETURN(DecoderModelConfig cand_config, ReadDecoderModelConfig(*cand_store, ""));
    QF_ASSIGN_OR_RETURN(ModelQuantization quantization, ReadModelQuantization(*cand_store, ""));
    QF_ASSIGN_OR_RETURN(ObjectUri data_uri, SplitObjectUri(w.dataset_uri()));
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> data_store,
                        OpenObjectStore(data_uri.store_uri));
    CalibrationDataOptions o;
    o.max_samples = task.spec().evaluation().samples();
    o.seq_len = task.spec().evaluation().seq_len();
    QF_ASSIGN_OR_RETURN(CalibrationData data,
                        LoadCalibrationData(*data_store, data_uri.key, o, ref_config.decoder,
                                            "spec.evaluation.dataset_uri"));
    EXPECT_EQ(data.sha256, w.dataset_sha256());
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> out, OpenObjectStore(task.staging_uri()));
    std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
    EvaluationShardJob job;
    job.reference_store = ref_store.get();
    job.reference_model = &ref;
    job.candidate_store = cand_store.get();
    job.candidate_model = &cand;
    job.candidate_quantization = &quantization;
    job.reference_config = &ref_config;
    job.candidate_config = &cand_config;
    job.data = &data;
    job.sample_begin = w.sample_begin();
    job.sample_end = w.sample_end();
    job.forward = forward.get();
    job.out_store = out.get();
    job.staged_key = task.staging_key();
    return RunEvaluationShard(job);
  }

  // What a worker does with a leased EVAL_REDUCE task: the metrics staged for the
  // coordinator (QualityMetricsToJson with the job's gate).
  absl::StatusOr<QualityMetrics> RunEvalReduce(const v1::Task& task) {
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> staging,
                        OpenObjectStore(task.staging_uri()));
    QF_ASSIGN_OR_RETURN(JobConfig config, ConvertJobSpec(task.spec()));
    QF_ASSIGN_OR_RETURN(
        QualityMetrics metrics,
        ReduceEvaluation(*staging, std::vector<std::string>(task.evaluation().partial_keys().begin(),
                                                            task.evaluation().partial_keys().end())));
    QF_RETURN_IF_ERROR(staging->Put(
        task.staging_key(), QualityMetricsToJson(metrics, QualityGateOf(config.evaluation)).dump()));
    return metrics;
  }

  absl::Status CompleteWithTokens(JobManager& jm, const std::string& worker,
                                  const v1::Task& task, int64_t tokens) {
    v1::CompleteTaskRequest r;
    r.set_worker_id(worker);
    r.set_task_id(task.id());
    r.set_lease_token(task.lease_token());
    r.set_output_key(task.staging_key());
    const std::string store = task.kind() == v1::TASK_KIND_REDUCE
                                  ? task.calibration().hessians_uri()
                                  : task.staging_uri();
    r.set_output_sha256(std::string(64, 'a'));
    if (auto d = DigestObject(*Open(store), task.staging_key()); d.ok()) {
      r.set_output_bytes(d->size);
      r.set_output_sha256(d->sha256);
    }
    r.mutable_metrics()->set_tokens(tokens);
    r.mutable_metrics()->set_backend("cpu");
    return jm.CompleteTask(r);
  }

  // Acquire, run and complete tasks until none is leased (at most `max_tasks`); the kinds
  // of the tasks run, in order.
  std::vector<v1::TaskKind> Drain(JobManager& jm, const std::string& w, int max_tasks = 1000,
                                  int64_t task_ms = 1000) {
    std::vector<v1::TaskKind> kinds;
    while (static_cast<int>(kinds.size()) < max_tasks) {
      auto t = Acquire(jm, w);
      if (!t.has_value()) break;
      kinds.push_back(t->kind());
      clock_.AdvanceMs(task_ms);
      if (t->kind() == v1::TASK_KIND_CALIBRATE) {
        auto outcome = RunCalibrate(*t);
        EXPECT_TRUE(outcome.ok()) << outcome.status();
        if (!outcome.ok()) break;
        EXPECT_TRUE(CompleteWithTokens(jm, w, *t, outcome->tokens).ok());
      } else if (t->kind() == v1::TASK_KIND_REDUCE) {
        auto outcome = RunReduce(*t);
        EXPECT_TRUE(outcome.ok()) << outcome.status();
        if (!outcome.ok()) break;
        EXPECT_TRUE(CompleteWithTokens(jm, w, *t, outcome->tokens).ok());
      } else if (t->kind() == v1::TASK_KIND_EVALUATE) {
        auto outcome = RunEvaluate(*t);
        EXPECT_TRUE(outcome.ok()) << outcome.status();
        if (!outcome.ok()) break;
        EXPECT_TRUE(CompleteWithTokens(jm, w, *t, outcome->sums.predicted_tokens).ok());
      } else if (t->kind() == v1::TASK_KIND_EVAL_REDUCE) {
        auto metrics = RunEvalReduce(*t);
        EXPECT_TRUE(metrics.ok()) << metrics.status();
        if (!metrics.ok()) break;
        absl::Status s = CompleteWithTokens(jm, w, *t, metrics->tokens);
        EXPECT_TRUE(s.ok()) << s;
      } else {
        RunAndComplete(jm, w, *t);
      }
      if (HasFailure()) break;
    }
    return kinds;
  }

  // `n` tasks of `kind`.
  static std::vector<v1::TaskKind> Kinds(std::initializer_list<std::pair<v1::TaskKind, int>> runs) {
    std::vector<v1::TaskKind> out;
    for (const auto& [kind, n] : runs) out.insert(out.end(), n, kind);
    return out;
  }

  bool HasEvent(JobManager& jm, const std::string& id, const std::string& needle) {
    for (const v1::JobEvent& e : Events(jm, id)) {
      if (e.message().find(needle) != std::string::npos) return true;
    }
    return false;
  }
};

TEST_F(CalibrationJobTest, StagesRunInOrderAndTheSecondJobHitsTheCache) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  const int64_t t0 = clock_.NowMs();
  // 8 samples in shards of 3: [0, 3), [3, 6), [6, 8).
  v1::Job job = Submit(*jm, CalRequest("out"));
  const std::string id = job.id();
  ASSERT_FALSE(id.empty());
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.tasks().total(), 3 + 1 + 14 + 1);
  EXPECT_EQ(job.tasks().queued(), 3);
  EXPECT_EQ(job.tasks().pending(), 16);
  const v1::CalibrationInfo info = job.calibration();  // a copy: `job` is reassigned
  EXPECT_EQ(info.samples(), kSamples);
  EXPECT_EQ(info.seq_len(), kSeqLen);
  EXPECT_EQ(info.tokens(), kSamples * kSeqLen);
  EXPECT_EQ(info.shards(), 3);
  EXPECT_FALSE(info.cache_hit());
  EXPECT_EQ(info.dataset_sha256().size(), 64u);
  EXPECT_EQ(info.model_fingerprint().size(), 64u);
  EXPECT_EQ(info.hessians_uri().rfind(root_ + "/cache/", 0), 0u) << info.hessians_uri();
  EXPECT_EQ(job.progress(), 0);

  const std::string w = Register(*jm);
  // The three shards, in order; the REDUCE and the QUANTIZE tasks wait.
  std::vector<v1::Task> shards;
  for (int i = 0; i < 3; ++i) {
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value());
    EXPECT_EQ(t->kind(), v1::TASK_KIND_CALIBRATE);
    EXPECT_EQ(t->calibration().sample_begin(), 3 * i);
    EXPECT_EQ(t->calibration().sample_end(), std::min(3 * i + 3, kSamples));
    EXPECT_EQ(t->calibration().model_uri(), root_ + "/cmodel");
    EXPECT_EQ(t->calibration().dataset_sha256(), info.dataset_sha256());
    EXPECT_EQ(t->staging_uri(), root_ + "/out");
    EXPECT_EQ(t->staging_key(), ".qforge-staging/" + id + "/" + t->id() + ".0." +
                                    kCalibrationPartialName);
    shards.push_back(*t);
  }
  EXPECT_FALSE(Acquire(*jm, w).has_value()) << "nothing runs before the shards are done";
  job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_CALIBRATING);
  EXPECT_EQ(job.start_time_unix_ms(), t0);
  EXPECT_EQ(job.eta_seconds(), -1);
  EXPECT_EQ(job.progress(), 0);

  // Progress: shard 0 (3 of 8 samples) half done = 3/16.
  v1::HeartbeatRequest hb;
  hb.set_worker_id(w);
  hb.set_task_id(shards[0].id());
  hb.set_lease_token(shards[0].lease_token());
  hb.set_progress(0.5);
  ASSERT_TRUE(jm->Heartbeat(hb).ok());
  EXPECT_NEAR(Get(*jm, id).progress(), 3.0 / 16, 1e-12);

  int64_t tokens = 0;
  for (int i = 0; i < 3; ++i) {
    clock_.AdvanceMs(1000);
    auto outcome = RunCalibrate(shards[i]);
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    EXPECT_EQ(outcome->tokens, (shards[i].calibration().sample_end() -
                                shards[i].calibration().sample_begin()) * kSeqLen);
    tokens += outcome->tokens;
    ASSERT_TRUE(CompleteWithTokens(*jm, w, shards[i], outcome->tokens).ok());
    if (i == 0) {
      EXPECT_NEAR(Get(*jm, id).progress(), 3.0 / 8, 1e-12);
    }
  }
  job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_CALIBRATING);
  EXPECT_NEAR(job.progress(), 1.0, 1e-12);

  // The REDUCE: queued with the three partials; QUANTIZE still waits.
  auto reduce = Acquire(*jm, w);
  ASSERT_TRUE(reduce.has_value());
  EXPECT_EQ(reduce->kind(), v1::TASK_KIND_REDUCE);
  ASSERT_EQ(reduce->calibration().partial_keys_size(), 3);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(reduce->calibration().partial_keys(i), shards[i].staging_key());
  }
  EXPECT_EQ(reduce->calibration().hessians_uri(), root_ + "/cache");
  EXPECT_EQ(reduce->staging_key(), reduce->calibration().hessians_key());
  EXPECT_EQ(ChildUri(root_ + "/cache", reduce->staging_key()), info.hessians_uri());
  EXPECT_FALSE(Acquire(*jm, w).has_value()) << "QUANTIZE waits for the REDUCE";
  clock_.AdvanceMs(500);
  auto reduced = RunReduce(*reduce);
  ASSERT_TRUE(reduced.ok()) << reduced.status();
  EXPECT_EQ(reduced->tokens, tokens);
  ASSERT_TRUE(CompleteWithTokens(*jm, w, *reduce, reduced->tokens).ok());

  job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUANTIZING);
  EXPECT_EQ(job.tasks().queued(), 14);
  EXPECT_EQ(job.progress(), 0);
  EXPECT_EQ(job.calibration().tokens(), tokens);
  EXPECT_NEAR(job.calibration().seconds(), 3.5, 1e-9);  // first lease to REDUCE done
  EXPECT_TRUE(HasEvent(*jm, id, "calibration done: " + std::to_string(tokens) + " tokens in 3.5 s"));

  // QUANTIZE reads the cache entry; the progress counts layers.
  auto first = Acquire(*jm, w);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->kind(), v1::TASK_KIND_QUANTIZE);
  EXPECT_EQ(first->layer().hessians_uri(), info.hessians_uri());
  RunAndComplete(*jm, w, *first);
  EXPECT_NEAR(Get(*jm, id).progress(), 1.0 / 14, 1e-12);
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_QUANTIZE, 13}}));
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  jm->Tick();
  job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  EXPECT_EQ(job.progress(), 1);
  EXPECT_TRUE(StagingKeys("out").empty()) << "partials are staging objects too";

  // The manifest records the calibration.
  auto manifest = nlohmann::json::parse(*Open(root_ + "/out")->ReadAll(kManifestName));
  const nlohmann::json& cal = manifest["calibration"];
  EXPECT_EQ(cal["dataset_sha256"], info.dataset_sha256());
  EXPECT_EQ(cal["samples"], kSamples);
  EXPECT_EQ(cal["seq_len"], kSeqLen);
  EXPECT_EQ(cal["tokens"], tokens);
  EXPECT_EQ(cal["shards"], 3);
  EXPECT_EQ(cal["cache_hit"], false);
  EXPECT_EQ(cal["hessians_uri"], info.hessians_uri());
  EXPECT_EQ(cal["model_fingerprint"], info.model_fingerprint());
  EXPECT_DOUBLE_EQ(cal["seconds"].get<double>(), 3.5);

  // A second job on the same model and data: the cached Hessians, no calibration at all.
  v1::Job second = Submit(*jm, CalRequest("out2"));
  EXPECT_TRUE(second.calibration().cache_hit());
  EXPECT_EQ(second.calibration().shards(), 0);
  EXPECT_EQ(second.calibration().hessians_uri(), info.hessians_uri());
  EXPECT_EQ(second.tasks().total(), 14 + 1);
  EXPECT_EQ(second.tasks().queued(), 14);
  EXPECT_TRUE(HasEvent(*jm, second.id(), "calibration: cached Hessians found (" +
                                              reduce->calibration().hessians_key() +
                                              "), skipping calibration"));
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_QUANTIZE, 14}}));
  jm->Tick();
  EXPECT_EQ(Get(*jm, second.id()).state(), v1::JOB_STATE_SUCCEEDED);
  manifest = nlohmann::json::parse(*Open(root_ + "/out2")->ReadAll(kManifestName));
  EXPECT_EQ(manifest["calibration"]["cache_hit"], true);

  // no_cache recalibrates (and refreshes the same entry).
  v1::SubmitJobRequest fresh = CalRequest("out3", /*shard_samples=*/0);
  fresh.mutable_spec()->mutable_calibration()->set_no_cache(true);
  v1::Job third = Submit(*jm, fresh);
  EXPECT_FALSE(third.calibration().cache_hit());
  EXPECT_EQ(third.calibration().shards(), 1);  // one live worker: one shard of all samples
  EXPECT_EQ(third.tasks().total(), 1 + 1 + 14 + 1);
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_CALIBRATE, 1},
                                   {v1::TASK_KIND_REDUCE, 1},
                                   {v1::TASK_KIND_QUANTIZE, 14}}));
  jm->Tick();
  EXPECT_EQ(Get(*jm, third.id()).state(), v1::JOB_STATE_SUCCEEDED);
}

TEST_F(CalibrationJobTest, TheShardSizeFollowsTheWorkersAndTheirMemory) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  Register(*jm);
  Register(*jm);
  // Two live workers, no budgets: ceil(8 / 2) = 4 samples per shard.
  v1::Job job = Submit(*jm, CalRequest("out", /*shard_samples=*/0));
  EXPECT_EQ(job.calibration().shards(), 2);
  // A third worker whose budget fits one sample's task but not two.
  auto config = ParseDecoderModelConfig(R"({"architectures": ["LlamaForCausalLM"],
      "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
      "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
      "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu"})",
                                         "test");
  ASSERT_TRUE(config.ok()) << config.status();
  const uint64_t one =
      CalibrationTaskMemoryBytes(config->decoder, 1, kSeqLen, kDefaultSpillAboveBytes);
  const uint64_t two =
      CalibrationTaskMemoryBytes(config->decoder, 2, kSeqLen, kDefaultSpillAboveBytes);
  ASSERT_LT(one, two);
  Register(*jm, {"cpu"}, one);
  job = Submit(*jm, CalRequest("out2", 0));
  EXPECT_EQ(job.calibration().shards(), kSamples);
  // The spec's shard size wins.
  job = Submit(*jm, CalRequest("out3", 5));
  EXPECT_EQ(job.calibration().shards(), 2);
  EXPECT_EQ(ChooseShardSamples(8, 0, 3, nullptr), 3);
  EXPECT_EQ(ChooseShardSamples(8, 20, 3, nullptr), 8);
  EXPECT_EQ(ChooseShardSamples(100, 0, 1, [](int64_t n) { return n <= 7; }), 7);
  EXPECT_EQ(ChooseShardSamples(100, 0, 1, [](int64_t) { return false; }), 1);
}

TEST_F(CalibrationJobTest, ALostCalibrateLeaseIsRetriedAndAFailedShardFailsTheJob) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = CalRequest("out", 4);
  r.mutable_spec()->set_max_attempts(2);
  const std::string id = Submit(*jm, r).id();
  const std::string w = Register(*jm);
  auto t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  ASSERT_EQ(t->kind(), v1::TASK_KIND_CALIBRATE);
  // The worker dies: its lease expires, the shard waits out its backoff and runs again.
  clock_.AdvanceMs(kLeaseMs);
  jm->Tick();
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_CALIBRATING);
  EXPECT_EQ(job.tasks().retries(), 1);
  EXPECT_TRUE(HasEvent(*jm, id, "calibration shard 1/2 (samples [0, 4)) attempt 1 of 2 failed"));
  auto other = Acquire(*jm, w);  // shard 2 meanwhile
  ASSERT_TRUE(other.has_value());
  EXPECT_EQ(other->calibration().sample_begin(), 4);
  clock_.AdvanceMs(1000);
  auto again = Acquire(*jm, w);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->id(), t->id());
  EXPECT_EQ(again->attempt(), 1);
  EXPECT_EQ(again->staging_key(), ".qforge-staging/" + again->job_id() + "/" + again->id() +
                                     ".1." + kCalibrationPartialName);
  // The old attempt's result is fenced off.
  EXPECT_EQ(CompleteWithTokens(*jm, w, *t, 1).code(), absl::StatusCode::kFailedPrecondition);

  // A shard that cannot succeed fails the job, naming it.
  ASSERT_TRUE(Fail(*jm, w, *other, absl::StatusCode::kFailedPrecondition,
                   "the calibration data changed since the job was submitted", false,
                   "CALIBRATION_DATA_CHANGED")
                  .ok());
  job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().reason(), "CALIBRATION_FAILED");
  EXPECT_EQ(job.error().subject(), "calibration shard 2/2 (samples [4, 8))");
  EXPECT_NE(job.error().message().find("calibration shard 2/2"), std::string::npos)
      << job.error().message();
  EXPECT_NE(job.error().message().find("the calibration data changed"), std::string::npos);
  EXPECT_EQ(job.error().code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  auto hb = Beat(*jm, w, *again);
  ASSERT_TRUE(hb.ok());
  EXPECT_TRUE(hb->cancel());
}

TEST_F(CalibrationJobTest, ACoordinatorRestartDuringTheReduceKeepsGoing) {
  std::string id, w;
  v1::Task reduce;
  {
    auto jm = Make(CalOptions());
    ASSERT_NE(jm, nullptr);
    id = Submit(*jm, CalRequest("out", 4)).id();
    w = Register(*jm);
    EXPECT_EQ(Drain(*jm, w, 2), Kinds({{v1::TASK_KIND_CALIBRATE, 2}}));
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value());
    ASSERT_EQ(t->kind(), v1::TASK_KIND_REDUCE);
    reduce = *t;
    // The coordinator goes away while the worker reduces.
  }
  auto reduced = RunReduce(reduce);
  ASSERT_TRUE(reduced.ok()) << reduced.status();
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  v1::Job job = Get(*jm, id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_CALIBRATING);
  EXPECT_EQ(job.tasks().running(), 1);
  EXPECT_EQ(job.calibration().shards(), 2);
  EXPECT_FALSE(Acquire(*jm, w).has_value());
  // The lease survived (Task.calibration too): its holder completes it.
  ASSERT_TRUE(CompleteWithTokens(*jm, w, reduce, reduced->tokens).ok());
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_QUANTIZING);
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_QUANTIZE, 14}}));
  jm->Tick();
  job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  EXPECT_EQ(job.calibration().tokens(), kSamples * kSeqLen);

  // A restart with the REDUCE lease lost: it is leased again, with its partial keys.
  std::string id2;
  {
    auto jm2 = Make(CalOptions(), nullptr, "state2.db");
    ASSERT_NE(jm2, nullptr);
    v1::SubmitJobRequest r = CalRequest("out2", 4);
    r.mutable_spec()->mutable_calibration()->set_no_cache(true);
    id2 = Submit(*jm2, r).id();
    w = Register(*jm2);
    EXPECT_EQ(Drain(*jm2, w, 2), Kinds({{v1::TASK_KIND_CALIBRATE, 2}}));
    ASSERT_TRUE(Acquire(*jm2, w).has_value());
  }
  auto jm2 = Make(CalOptions(), nullptr, "state2.db");
  ASSERT_NE(jm2, nullptr);
  clock_.AdvanceMs(kLeaseMs);
  jm2->Tick();
  clock_.AdvanceMs(1000);
  auto t = Acquire(*jm2, w);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->kind(), v1::TASK_KIND_REDUCE);
  EXPECT_EQ(t->attempt(), 1);
  EXPECT_EQ(t->calibration().partial_keys_size(), 2);
  reduced = RunReduce(*t);
  ASSERT_TRUE(reduced.ok()) << reduced.status();
  ASSERT_TRUE(CompleteWithTokens(*jm2, w, *t, reduced->tokens).ok());
  EXPECT_EQ(Get(*jm2, id2).state(), v1::JOB_STATE_QUANTIZING);
}

TEST_F(CalibrationJobTest, BadCalibrationInputsAreRefusedAtSubmitNamingTheField) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  // An id outside the vocabulary: the sample and position are named.
  {
    auto store = Open(root_ + "/data");
    std::string bytes(2 * 4 * 4, '\0');
    const int32_t bad = kVocab + 3;
    std::memcpy(&bytes[(1 * 4 + 2) * 4], &bad, 4);
    auto w = SafetensorsWriter::Create(*store, "bad.safetensors",
                                       {{"input_ids", DType::kI32, {2, 4}}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->WriteTensorData("input_ids", bytes).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  v1::SubmitJobRequest r = CalRequest("out");
  r.mutable_spec()->mutable_calibration()->set_dataset_uri(root_ + "/data/bad.safetensors");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.calibration.dataset_uri", "sample 1", "position 2",
               std::to_string(kVocab + 3)});
  // Missing data.
  r.mutable_spec()->mutable_calibration()->set_dataset_uri(root_ + "/data/none.safetensors");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.calibration.dataset_uri"});
  // seq_len above max_position_embeddings (64).
  r = CalRequest("out");
  r.mutable_spec()->mutable_calibration()->set_seq_len(128);
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"max_position_embeddings"});
  // A selected layer that is not a decoder linear.
  r = CalRequest("out");
  r.mutable_spec()->add_include(R"(^lm_head\.weight$)");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.include", "lm_head"});
  // An architecture the forward pass does not know: the supported ones are named.
  WriteDecoderModel(root_ + "/gpt2", "GPT2LMHeadModel");
  r = CalRequest("out");
  r.mutable_spec()->set_model_uri(root_ + "/gpt2");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"GPT2LMHeadModel", "LlamaForCausalLM"});
  EXPECT_TRUE(jm->ListJobs("", {})->jobs().empty());

  // Without a Hessian cache, dataset calibration is refused.
  auto no_cache = Make(Options(), nullptr, "other.db");
  ASSERT_NE(no_cache, nullptr);
  ExpectError(no_cache->SubmitJob("", CalRequest("out")).status(),
              absl::StatusCode::kFailedPrecondition, {"--hessian-cache"});
}

// ---- Evaluation (job/evaluation.h): ASSEMBLE → EVALUATE × shards → EVAL_REDUCE → gate.

class EvaluationJobTest : public CalibrationJobTest {
 protected:
  static constexpr int kEvalSamples = 6;

  void SetUp() override {
    CalibrationJobTest::SetUp();
    // Held-out data: other tokens than the calibration data's.
    WriteTokens(root_ + "/data", "eval.safetensors", kEvalSamples, kSeqLen, kVocab, 9);
  }

  // A GPTQ job on the decoder model (identity Hessians unless `dataset_calibration`) that
  // evaluates on the held-out data in shards of 3 samples.
  v1::SubmitJobRequest EvalRequest(const std::string& out, bool dataset_calibration = false) {
    v1::SubmitJobRequest r = CalRequest(out);
    if (!dataset_calibration) {
      r.mutable_spec()->clear_calibration();
      r.mutable_spec()->mutable_calibration()->set_none(true);
    }
    v1::EvaluationSpec* e = r.mutable_spec()->mutable_evaluation();
    e->set_dataset_uri(root_ + "/data/eval.safetensors");
    e->set_shard_samples(3);
    return r;
  }

  v1::SubmitJobRequest EvalOnlyRequest(const std::string& model, const std::string& out = "") {
    v1::SubmitJobRequest r;
    v1::JobSpec* s = r.mutable_spec();
    s->set_model_uri(model);
    s->set_reference_model_uri(root_ + "/cmodel");
    if (!out.empty()) s->set_output_uri(root_ + "/" + out);
    s->mutable_evaluation()->set_dataset_uri(root_ + "/data/eval.safetensors");
    s->mutable_evaluation()->set_shard_samples(3);
    return r;
  }

  nlohmann::json Manifest(const std::string& out) {
    auto text = Open(root_ + "/" + out)->ReadAll(kManifestName);
    EXPECT_TRUE(text.ok()) << text.status();
    return text.ok() ? nlohmann::json::parse(*text) : nlohmann::json();
  }
};

TEST_F(EvaluationJobTest, TheArtifactIsEvaluatedAfterAssemblyAndAGateThatHoldsPasses) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = EvalRequest("out", /*dataset_calibration=*/true);
  r.mutable_spec()->mutable_evaluation()->set_max_ppl_increase_pct(1000);
  r.mutable_spec()->mutable_evaluation()->set_max_kl(100);
  v1::Job job = Submit(*jm, r);
  const std::string id = job.id();
  ASSERT_FALSE(id.empty());
  // 3 CALIBRATE, REDUCE, 14 QUANTIZE, ASSEMBLE, 2 EVALUATE, EVAL_REDUCE.
  EXPECT_EQ(job.tasks().total(), 3 + 1 + 14 + 1 + 2 + 1);
  EXPECT_EQ(job.tasks().queued(), 3);
  EXPECT_FALSE(job.has_quality());
  EXPECT_TRUE(HasEvent(*jm, id, "evaluation: 6 samples × 16 tokens of " + root_ +
                                    "/data/eval.safetensors in 2 shard(s), perplexity may rise "
                                    "1000 % at most, mean KL 100 nats at most"));

  const std::string w = Register(*jm);
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_CALIBRATE, 3},
                                  {v1::TASK_KIND_REDUCE, 1},
                                  {v1::TASK_KIND_QUANTIZE, 14}}))
      << "nothing evaluates before the artifact exists";
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_ASSEMBLING);
  jm->Tick();
  job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_EVALUATING) << job.error().message();
  EXPECT_EQ(job.manifest_uri(), ChildUri(root_ + "/out", kManifestName));
  ExpectError(jm->GetJobReport("", id).status(), absl::StatusCode::kFailedPrecondition,
              {"no evaluation results yet", "EVALUATING"});
  EXPECT_EQ(job.tasks().queued(), 2);
  EXPECT_EQ(job.progress(), 0);
  EXPECT_FALSE(Manifest("out").contains("quality")) << "written when the evaluation is reduced";

  std::vector<v1::Task> shards;
  for (int i = 0; i < 2; ++i) {
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value());
    EXPECT_EQ(t->kind(), v1::TASK_KIND_EVALUATE);
    EXPECT_EQ(t->evaluation().reference_model_uri(), root_ + "/cmodel");
    EXPECT_EQ(t->evaluation().candidate_model_uri(), root_ + "/out");
    EXPECT_EQ(t->evaluation().sample_begin(), 3 * i);
    EXPECT_EQ(t->evaluation().sample_end(), 3 * i + 3);
    EXPECT_EQ(t->evaluation().samples(), kEvalSamples);
    EXPECT_EQ(t->evaluation().dataset_sha256().size(), 64u);
    EXPECT_EQ(t->staging_uri(), root_ + "/out");
    EXPECT_EQ(t->staging_key(), ".qforge-staging/" + id + "/" + t->id() + ".0." +
                                    kEvaluationPartialName);
    shards.push_back(*t);
  }
  EXPECT_FALSE(Acquire(*jm, w).has_value()) << "the reduce waits for every shard";
  // Progress: shard 0 (3 of 6 samples) half done.
  v1::HeartbeatRequest hb;
  hb.set_worker_id(w);
  hb.set_task_id(shards[0].id());
  hb.set_lease_token(shards[0].lease_token());
  hb.set_progress(0.5);
  ASSERT_TRUE(jm->Heartbeat(hb).ok());
  EXPECT_NEAR(Get(*jm, id).progress(), 0.25, 1e-12);
  for (const v1::Task& t : shards) {
    clock_.AdvanceMs(1000);
    auto outcome = RunEvaluate(t);
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    ASSERT_TRUE(CompleteWithTokens(*jm, w, t, outcome->sums.predicted_tokens).ok());
  }
  EXPECT_NEAR(Get(*jm, id).progress(), 1.0, 1e-12);

  auto reduce = Acquire(*jm, w);
  ASSERT_TRUE(reduce.has_value());
  EXPECT_EQ(reduce->kind(), v1::TASK_KIND_EVAL_REDUCE);
  ASSERT_EQ(reduce->evaluation().partial_keys_size(), 2);
  EXPECT_EQ(reduce->evaluation().partial_keys(1), shards[1].staging_key());
  clock_.AdvanceMs(500);
  auto metrics = RunEvalReduce(*reduce);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  ASSERT_TRUE(CompleteWithTokens(*jm, w, *reduce, metrics->tokens).ok());

  job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  const v1::QualityReport& q = job.quality();
  EXPECT_EQ(q.samples(), kEvalSamples);
  EXPECT_EQ(q.tokens(), kEvalSamples * (kSeqLen - 1));
  EXPECT_DOUBLE_EQ(q.ppl_reference(), metrics->ppl_reference);
  EXPECT_DOUBLE_EQ(q.ppl_quantized(), metrics->ppl_candidate);
  EXPECT_DOUBLE_EQ(q.mean_kl(), metrics->mean_kl);
  EXPECT_GT(q.mean_kl(), 0) << "4-bit weights change the distributions";
  EXPECT_GT(q.top1_agreement(), 0);
  EXPECT_LE(q.top1_agreement(), 1);
  EXPECT_EQ(q.modules_size(), 14);
  EXPECT_TRUE(q.gate_enabled());
  EXPECT_TRUE(q.gate_passed());
  EXPECT_EQ(q.max_ppl_increase_pct(), 1000);
  EXPECT_EQ(q.max_kl(), 100);
  // 4-bit weights, one fp16 scale and a packed zero per 32 columns, g_idx: a little over 4.
  EXPECT_GT(q.bits_per_weight(), 4.0);
  EXPECT_LT(q.bits_per_weight(), 6.0);
  EXPECT_NEAR(q.seconds(), 2.5, 1e-9);  // first EVALUATE lease to EVAL_REDUCE done
  EXPECT_EQ(q.dataset_uri(), root_ + "/data/eval.safetensors");
  EXPECT_EQ(q.dataset_sha256(), shards[0].evaluation().dataset_sha256());
  EXPECT_TRUE(HasEvent(*jm, id, "quality gate passed"));
  {
    std::lock_guard<std::mutex> l(listener_.mu_);
    EXPECT_EQ(listener_.evaluations_, std::vector<std::string>{"passed"});
  }

  // The manifest carries the same figures, with what the service records beside them.
  const nlohmann::json manifest = Manifest("out");
  EXPECT_EQ(manifest["quality_gate"], "passed");
  EXPECT_EQ(manifest["quality"],
            QualityRecordJson(q, QualityGateOf(ConvertJobSpec(r.spec())->evaluation)));
  EXPECT_EQ(manifest["quality"]["dataset_sha256"], q.dataset_sha256());
  EXPECT_DOUBLE_EQ(manifest["quality"]["bits_per_weight"].get<double>(), q.bits_per_weight());
  EXPECT_DOUBLE_EQ(q.bits_per_weight(), ManifestBitsPerWeightOrZero(manifest));
  // report.html beside it, and the same page through GetJobReport.
  auto page = Open(root_ + "/out")->ReadAll(kQualityReportName);
  ASSERT_TRUE(page.ok()) << page.status();
  EXPECT_NE(page->find("<html"), std::string::npos);
  auto report = jm->GetJobReport("", id);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->uri(), ChildUri(root_ + "/out", kQualityReportName));
  EXPECT_EQ(report->html(), *page);
  EXPECT_EQ(jm->GetJobReport("other-tenant", id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(manifest["quality"]["gate"]["passed"], true);
  EXPECT_TRUE(manifest.contains("calibration"));
  jm->Tick();
  EXPECT_TRUE(StagingKeys("out").empty()) << "the shards' sums are staging objects";
}

TEST_F(EvaluationJobTest, AMissedGateFailsTheJobAndKeepsTheArtifactMarkedFailed) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = EvalRequest("out");
  r.mutable_spec()->mutable_evaluation()->set_max_kl(0);  // any change misses it
  const std::string id = Submit(*jm, r).id();
  const std::string w = Register(*jm);
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_QUANTIZE, 14}}));
  jm->Tick();
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_EVALUATE, 2}, {v1::TASK_KIND_EVAL_REDUCE, 1}}));
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().reason(), "QUALITY_GATE");
  EXPECT_EQ(job.error().code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(job.error().subject(), ChildUri(root_ + "/out", kManifestName));
  EXPECT_NE(job.error().message().find("mean KL"), std::string::npos) << job.error().message();
  EXPECT_NE(job.error().message().find("allowed 0"), std::string::npos) << job.error().message();
  EXPECT_TRUE(job.quality().gate_enabled());
  EXPECT_FALSE(job.quality().gate_passed());
  EXPECT_EQ(job.manifest_uri(), ChildUri(root_ + "/out", kManifestName));
  // The artifact stays, its manifest marking the gate failed, so a pipeline can inspect it.
  const nlohmann::json manifest = Manifest("out");
  EXPECT_EQ(manifest["quality_gate"], "failed");
  EXPECT_EQ(manifest["quality"]["gate"]["passed"], false);
  EXPECT_DOUBLE_EQ(manifest["quality"]["mean_kl"].get<double>(), job.quality().mean_kl());
  EXPECT_TRUE(Open(root_ + "/out")->Stat("config.json").ok());
  jm->Tick();
  EXPECT_TRUE(StagingKeys("out").empty());
  {
    std::lock_guard<std::mutex> l(listener_.mu_);
    EXPECT_EQ(listener_.evaluations_, std::vector<std::string>{"failed"});
  }
  // Without thresholds the gate is "none" and the job succeeds.
  v1::SubmitJobRequest plain = EvalRequest("out2");
  const std::string id2 = Submit(*jm, plain).id();
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_QUANTIZE, 14}}));
  jm->Tick();
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_EVALUATE, 2}, {v1::TASK_KIND_EVAL_REDUCE, 1}}));
  job = Get(*jm, id2);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  EXPECT_FALSE(job.quality().gate_enabled());
  EXPECT_EQ(Manifest("out2")["quality_gate"], "none");
}

TEST_F(EvaluationJobTest, AnEvaluationOnlyJobEvaluatesAGivenModel) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  const std::string w = Register(*jm);
  // An artifact to evaluate: a GPTQ job without evaluation.
  const std::string quantized = Submit(*jm, CalRequest("art", 4)).id();
  Drain(*jm, w);
  jm->Tick();
  ASSERT_EQ(Get(*jm, quantized).state(), v1::JOB_STATE_SUCCEEDED);
  const std::string before = *Open(root_ + "/art")->ReadAll(kManifestName);

  v1::Job job = Submit(*jm, EvalOnlyRequest(root_ + "/art"));
  const std::string id = job.id();
  EXPECT_EQ(job.spec().method(), v1::METHOD_UNSPECIFIED);
  EXPECT_EQ(job.state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(job.tasks().total(), 2 + 1) << "two EVALUATE shards and their reduce, no assembly";
  EXPECT_EQ(job.tasks().queued(), 2);
  EXPECT_TRUE(HasEvent(*jm, id, "submitted: evaluation of " + root_ + "/art against " + root_ +
                                    "/cmodel"));
  auto first = Acquire(*jm, w);
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->kind(), v1::TASK_KIND_EVALUATE);
  EXPECT_EQ(first->evaluation().candidate_model_uri(), root_ + "/art");
  // No output: the shards stage in the coordinator's cache store.
  EXPECT_EQ(first->staging_uri(), root_ + "/cache");
  EXPECT_EQ(Get(*jm, id).state(), v1::JOB_STATE_EVALUATING);
  auto outcome = RunEvaluate(*first);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  ASSERT_TRUE(CompleteWithTokens(*jm, w, *first, outcome->sums.predicted_tokens).ok());
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_EVALUATE, 1}, {v1::TASK_KIND_EVAL_REDUCE, 1}}));
  job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  EXPECT_TRUE(job.manifest_uri().empty());
  EXPECT_EQ(job.quality().modules_size(), 14);
  EXPECT_GT(job.quality().mean_kl(), 0);
  EXPECT_GT(job.quality().bits_per_weight(), 4.0) << "from the artifact's own manifest";
  EXPECT_EQ(*Open(root_ + "/art")->ReadAll(kManifestName), before)
      << "an evaluation-only job leaves the model it reads alone";
  jm->Tick();
  auto cache_staging = Open(root_ + "/cache")->List(".qforge-staging/");
  ASSERT_TRUE(cache_staging.ok());
  EXPECT_TRUE(cache_staging->empty());

  // The original against itself: identical distributions.
  job = Submit(*jm, EvalOnlyRequest(root_ + "/cmodel", "report"));
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_EVALUATE, 2}, {v1::TASK_KIND_EVAL_REDUCE, 1}}));
  job = Get(*jm, job.id());
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  // With an output the evaluation-only job writes its report there.
  auto page = Open(root_ + "/report")->ReadAll(kQualityReportName);
  ASSERT_TRUE(page.ok()) << page.status();
  auto report = jm->GetJobReport("", job.id());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->html(), *page);
  EXPECT_NE(report->html().find(root_ + "/cmodel"), std::string::npos);
  ExpectError(jm->GetJobReport("", quantized).status(), absl::StatusCode::kFailedPrecondition,
              {"without evaluation data", "--eval"});
  EXPECT_NEAR(job.quality().mean_kl(), 0, 1e-9);
  EXPECT_NEAR(job.quality().ppl_increase_pct(), 0, 1e-9);
  EXPECT_DOUBLE_EQ(job.quality().top1_agreement(), 1.0);
  EXPECT_EQ(job.quality().modules_size(), 0);
  EXPECT_EQ(job.quality().bits_per_weight(), 0) << "unknown for an unquantized model";

  // Refused: a method, a reference of another shape, no staging place.
  v1::SubmitJobRequest bad = EvalOnlyRequest(root_ + "/art");
  bad.mutable_spec()->set_method(v1::METHOD_GPTQ);
  ExpectError(jm->SubmitJob("", bad).status(), absl::StatusCode::kInvalidArgument,
              {"spec.method", "evaluation-only"});
  bad = EvalOnlyRequest(root_ + "/model");  // the non-decoder test model
  ExpectError(jm->SubmitJob("", bad).status(), absl::StatusCode::kInvalidArgument,
              {"spec.model_uri"});
  auto no_cache = Make(Options(), nullptr, "other.db");
  ASSERT_NE(no_cache, nullptr);
  ExpectError(no_cache->SubmitJob("", EvalOnlyRequest(root_ + "/art")).status(),
              absl::StatusCode::kFailedPrecondition, {"spec.output_uri", "--hessian-cache"});
}

TEST_F(EvaluationJobTest, EvaluationSurvivesARestartAndAFailedShardFailsTheJob) {
  std::string id, w;
  v1::Task shard;
  {
    auto jm = Make(CalOptions());
    ASSERT_NE(jm, nullptr);
    id = Submit(*jm, EvalRequest("out")).id();
    w = Register(*jm);
    Drain(*jm, w);
    jm->Tick();
    auto t = Acquire(*jm, w);
    ASSERT_TRUE(t.has_value());
    ASSERT_EQ(t->kind(), v1::TASK_KIND_EVALUATE);
    shard = *t;
    // The coordinator goes away while the worker evaluates.
  }
  auto outcome = RunEvaluate(shard);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  {
    auto jm = Make(CalOptions());
    ASSERT_NE(jm, nullptr);
    v1::Job job = Get(*jm, id);
    EXPECT_EQ(job.state(), v1::JOB_STATE_EVALUATING);
    EXPECT_EQ(job.tasks().running(), 1);
    // The lease survived (Task.evaluation too): its holder completes it.
    ASSERT_TRUE(CompleteWithTokens(*jm, w, shard, outcome->sums.predicted_tokens).ok());
    EXPECT_EQ(Drain(*jm, w, 1), Kinds({{v1::TASK_KIND_EVALUATE, 1}}));
    auto reduce = Acquire(*jm, w);
    ASSERT_TRUE(reduce.has_value());
    ASSERT_EQ(reduce->kind(), v1::TASK_KIND_EVAL_REDUCE);
    // Lost with the coordinator again: the lease expires and the reduce runs again.
  }
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  clock_.AdvanceMs(kLeaseMs);
  jm->Tick();
  clock_.AdvanceMs(1000);
  EXPECT_EQ(Drain(*jm, w), Kinds({{v1::TASK_KIND_EVAL_REDUCE, 1}}));
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error().message();
  EXPECT_EQ(job.tasks().retries(), 1);
  EXPECT_EQ(Manifest("out")["quality_gate"], "none");

  // A shard that cannot succeed fails the job, naming it.
  v1::SubmitJobRequest r = EvalRequest("out2");
  r.mutable_spec()->set_max_attempts(2);
  const std::string id2 = Submit(*jm, r).id();
  Drain(*jm, w);
  jm->Tick();
  auto t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  ASSERT_EQ(t->kind(), v1::TASK_KIND_EVALUATE);
  ASSERT_TRUE(Fail(*jm, w, *t, absl::StatusCode::kInvalidArgument,
                   "model.layers.0.mlp.down_proj.qweight: 3 bytes, expected 6144", false,
                   "MODEL_READ_FAILED")
                  .ok());
  job = Get(*jm, id2);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().reason(), "EVALUATION_FAILED");
  EXPECT_EQ(job.error().subject(), "evaluation shard 1/2 (samples [0, 3))");
  EXPECT_NE(job.error().message().find("down_proj.qweight"), std::string::npos)
      << job.error().message();
  EXPECT_FALSE(job.has_quality());

  // A malformed result of the reduce fails the job too (every byte is validated).
  const std::string id3 = Submit(*jm, EvalRequest("out3")).id();
  Drain(*jm, w);
  jm->Tick();
  EXPECT_EQ(Drain(*jm, w, 2), Kinds({{v1::TASK_KIND_EVALUATE, 2}}));
  auto bad = Acquire(*jm, w);
  ASSERT_TRUE(bad.has_value());
  ASSERT_EQ(bad->kind(), v1::TASK_KIND_EVAL_REDUCE);
  ASSERT_TRUE(Open(bad->staging_uri())
                  ->Put(bad->staging_key(), R"({"samples": 6, "tokens": 90, "ppl_reference": -1})")
                  .ok());
  ASSERT_TRUE(CompleteWithTokens(*jm, w, *bad, 90).ok());
  job = Get(*jm, id3);
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(job.error().reason(), "EVALUATION_FAILED");
  EXPECT_NE(job.error().message().find("ppl_reference"), std::string::npos)
      << job.error().message();
}

TEST_F(EvaluationJobTest, BadEvaluationInputsAreRefusedAtSubmitNamingTheField) {
  auto jm = Make(CalOptions());
  ASSERT_NE(jm, nullptr);
  // The calibration data itself: refused unless allowed.
  v1::SubmitJobRequest r = EvalRequest("out", /*dataset_calibration=*/true);
  r.mutable_spec()->mutable_evaluation()->set_dataset_uri(root_ + "/data/tokens.safetensors");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.evaluation.dataset_uri", "calibration data", "--eval-allow-calibration-data"});
  // The same bytes under another name are the same data.
  std::filesystem::copy_file(root_ + "/data/tokens.safetensors", root_ + "/data/copy.safetensors");
  r.mutable_spec()->mutable_evaluation()->set_dataset_uri(root_ + "/data/copy.safetensors");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.evaluation.dataset_uri", "sha256"});
  r.mutable_spec()->mutable_evaluation()->set_allow_calibration_data(true);
  r.set_validate_only(true);
  auto planned = jm->SubmitJob("", r);
  ASSERT_TRUE(planned.ok()) << planned.status();
  EXPECT_EQ(planned->tasks().total(), 3 + 1 + 14 + 1 + 3 + 1);  // 8 samples in shards of 3
  // Missing data, an id outside the vocabulary, seq_len above max_position_embeddings.
  r = EvalRequest("out");
  r.mutable_spec()->mutable_evaluation()->set_dataset_uri(root_ + "/data/none.safetensors");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.evaluation.dataset_uri"});
  r = EvalRequest("out");
  r.mutable_spec()->mutable_evaluation()->set_seq_len(128);
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"max_position_embeddings"});
  // A quantized layer the evaluation cannot read as a decoder linear.
  r = EvalRequest("out");
  r.mutable_spec()->add_include(R"(^lm_head\.weight$)");
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.include", "lm_head"});
  // A threshold that is not a number >= 0 (ConvertJobSpec).
  r = EvalRequest("out");
  r.mutable_spec()->mutable_evaluation()->set_max_ppl_increase_pct(-1);
  ExpectError(jm->SubmitJob("", r).status(), absl::StatusCode::kInvalidArgument,
              {"spec.evaluation.max_ppl_increase_pct"});
  EXPECT_TRUE(jm->ListJobs("", {})->jobs().empty());
}

// ---- Per-layer results, live progress, ETA, deletion and retention ---------------------------

TEST_F(JobManagerTest, ListLayersReportsResultsProgressAndPagesWhileRunningAndAfterSettling) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  auto first = Acquire(*jm, w);
  ASSERT_TRUE(first.has_value());
  RunAndComplete(*jm, w, *first, /*task_ms=*/1500);
  auto running = Acquire(*jm, w);
  ASSERT_TRUE(running.has_value());
  clock_.AdvanceMs(400);
  ASSERT_TRUE(Beat(*jm, w, *running, 0.25, "solve").ok());

  v1::ListLayersRequest req;
  req.set_id(id);
  auto all = jm->ListLayers("", req);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->total_layers(), 6);
  ASSERT_EQ(all->layers_size(), 6);
  EXPECT_TRUE(all->next_page_token().empty());
  std::map<std::string, v1::LayerResult> by_module;
  for (const v1::LayerResult& l : all->layers()) by_module[l.module()] = l;
  const v1::LayerResult& done = by_module.at(first->layer().module());
  EXPECT_EQ(done.state(), v1::TASK_STATE_SUCCEEDED);
  EXPECT_EQ(done.worker_id(), w);
  EXPECT_EQ(done.attempt(), 0);
  EXPECT_GT(done.relative_error(), 0);
  EXPECT_GT(done.proxy_loss(), 0);
  EXPECT_DOUBLE_EQ(done.seconds(), 1.5);
  EXPECT_EQ(done.backend(), "cpu");
  EXPECT_EQ(done.method(), v1::METHOD_GPTQ);
  EXPECT_EQ(done.gptq().bits(), 4);
  EXPECT_EQ(done.gptq().group_size(), 32);
  EXPECT_EQ(done.out_features(), first->layer().out_features());
  const v1::LayerResult& now = by_module.at(running->layer().module());
  EXPECT_EQ(now.state(), v1::TASK_STATE_RUNNING);
  EXPECT_DOUBLE_EQ(now.progress(), 0.25);
  EXPECT_EQ(now.phase(), "solve");
  EXPECT_EQ(now.relative_error(), 0);

  // The job shows the running task with its report and elapsed time.
  v1::Job job = Get(*jm, id);
  ASSERT_EQ(job.running_size(), 1);
  EXPECT_EQ(job.running(0).task_id(), running->id());
  EXPECT_EQ(job.running(0).module(), running->layer().module());
  EXPECT_EQ(job.running(0).worker_id(), w);
  EXPECT_DOUBLE_EQ(job.running(0).progress(), 0.25);
  EXPECT_EQ(job.running(0).phase(), "solve");
  EXPECT_DOUBLE_EQ(job.running(0).elapsed_seconds(), 0.4);
  EXPECT_EQ(job.running(0).subject(), "layer " + running->layer().module());

  // Pages of 4: the same layers in the same order.
  req.set_page_size(4);
  auto p1 = jm->ListLayers("", req);
  ASSERT_TRUE(p1.ok());
  ASSERT_EQ(p1->layers_size(), 4);
  ASSERT_FALSE(p1->next_page_token().empty());
  req.set_page_token(p1->next_page_token());
  auto p2 = jm->ListLayers("", req);
  ASSERT_TRUE(p2.ok());
  ASSERT_EQ(p2->layers_size(), 2);
  EXPECT_TRUE(p2->next_page_token().empty());
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ((i < 4 ? p1->layers(i) : p2->layers(i - 4)).module(), all->layers(i).module());
  }
  req.set_page_token("bm90IGEgdG9rZW4");
  ExpectError(jm->ListLayers("", req).status(), absl::StatusCode::kInvalidArgument,
              {"page_token"});
  // A token past the end (however far) is an empty last page.
  req.set_page_token(absl::WebSafeBase64Escape("layer:9223372036854775807"));
  auto past = jm->ListLayers("", req);
  ASSERT_TRUE(past.ok()) << past.status();
  EXPECT_EQ(past->layers_size(), 0);
  EXPECT_TRUE(past->next_page_token().empty());
  EXPECT_EQ(past->total_layers(), 6);
  req.clear_page_token();
  req.set_page_size(-1);
  ExpectError(jm->ListLayers("", req).status(), absl::StatusCode::kInvalidArgument, {"page_size"});
  req.set_page_size(0);
  ExpectError(jm->ListLayers("other-tenant", req).status(), absl::StatusCode::kNotFound, {id});

  // Finish, settle (the tasks leave memory): the same results come from the database, also
  // after a restart.
  RunAndComplete(*jm, w, *running, 600);
  while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t, 1000);
  jm->Tick();
  jm->Tick();
  ASSERT_EQ(Get(*jm, id).state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_TRUE(Get(*jm, id).running().empty());
  jm.reset();
  jm = Make();
  ASSERT_NE(jm, nullptr);
  auto settled = jm->ListLayers("", req);
  ASSERT_TRUE(settled.ok()) << settled.status();
  ASSERT_EQ(settled->layers_size(), 6);
  for (const v1::LayerResult& l : settled->layers()) {
    EXPECT_EQ(l.state(), v1::TASK_STATE_SUCCEEDED) << l.module();
    EXPECT_EQ(l.worker_id(), w);
  }
  EXPECT_DOUBLE_EQ(settled->layers(0).relative_error(), all->layers(0).relative_error());
}

TEST_F(JobManagerTest, ProgressEventsAreRateLimitedAndOnlyWhenSomethingMoved) {
  JobManagerOptions o = Options();
  o.progress_event_interval_ms = 2000;
  auto jm = Make(o);
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  auto t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  auto progress_events = [&] {
    std::vector<v1::JobEvent> out;
    for (const v1::JobEvent& e : Events(*jm, id)) {
      if (e.type() == v1::EVENT_TYPE_PROGRESS) out.push_back(e);
    }
    return out;
  };
  ASSERT_TRUE(Beat(*jm, w, *t, 0.1, "read").ok());
  ASSERT_EQ(progress_events().size(), 1u);
  for (int i = 0; i < 5; ++i) {  // within the interval: no more events, GetJob still moves
    clock_.AdvanceMs(300);
    ASSERT_TRUE(Beat(*jm, w, *t, 0.2 + 0.1 * i, "solve").ok());
  }
  EXPECT_EQ(progress_events().size(), 1u);
  EXPECT_DOUBLE_EQ(Get(*jm, id).running(0).progress(), 0.6);
  clock_.AdvanceMs(2000);
  ASSERT_TRUE(Beat(*jm, w, *t, 0.6, "solve").ok());
  auto events = progress_events();
  ASSERT_EQ(events.size(), 2u);
  ASSERT_EQ(events[1].running_size(), 1);
  EXPECT_EQ(events[1].running(0).task_id(), t->id());
  EXPECT_DOUBLE_EQ(events[1].running(0).progress(), 0.6);
  EXPECT_EQ(events[1].running(0).phase(), "solve");
  EXPECT_EQ(events[1].job_state(), v1::JOB_STATE_QUANTIZING);
  clock_.AdvanceMs(5000);  // nothing moved: no event however long it has been
  ASSERT_TRUE(Beat(*jm, w, *t, 0.6, "solve").ok());
  EXPECT_EQ(progress_events().size(), 2u);
  // Every event has a type; task events carry the running tasks too.
  for (const v1::JobEvent& e : Events(*jm, id)) {
    EXPECT_NE(e.type(), v1::EVENT_TYPE_UNSPECIFIED) << e.ShortDebugString();
    if (e.has_task()) EXPECT_EQ(e.type(), v1::EVENT_TYPE_TASK);
  }
}

TEST_F(JobManagerTest, EtaIsKnownFromTheFirstReportedProgressAndWeighsLayerSizes) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  auto t = Acquire(*jm, w);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(Get(*jm, id).eta_seconds(), -1);  // nothing measured
  clock_.AdvanceMs(1000);
  ASSERT_TRUE(Beat(*jm, w, *t, 0.02, "read").ok());
  EXPECT_EQ(Get(*jm, id).eta_seconds(), -1);  // too little done to extrapolate
  clock_.AdvanceMs(1000);
  ASSERT_TRUE(Beat(*jm, w, *t, 0.5, "solve").ok());
  // 2 s for half of this layer's weights; left: the other half plus every other layer.
  double total_weights = 0, this_weights = 0;
  v1::ListLayersRequest req;
  req.set_id(id);
  auto layers = jm->ListLayers("", req);
  ASSERT_TRUE(layers.ok()) << layers.status();
  for (const v1::LayerResult& l : layers->layers()) {
    const double n = static_cast<double>(l.out_features() * l.in_features());
    total_weights += n;
    if (l.module() == t->layer().module()) this_weights = n;
  }
  const double per_weight = 2.0 / (0.5 * this_weights);
  EXPECT_NEAR(Get(*jm, id).eta_seconds(), per_weight * (total_weights - 0.5 * this_weights),
              1e-6);
}

TEST_F(JobManagerTest, WorkersFromBeforeARestartAreUnknownThenLostUnlessTheyCall) {
  {
    auto jm = Make();
    ASSERT_NE(jm, nullptr);
    Register(*jm, {"cpu"}, 0, "gone");
    Register(*jm, {"cpu"}, 0, "back");
  }
  clock_.AdvanceMs(1000);
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  auto state_of = [&](const std::string& id) {
    for (const v1::WorkerInfo& w : jm->ListWorkers("")) {
      if (w.id() == id) return w.state();
    }
    return std::string("absent");
  };
  EXPECT_EQ(state_of("gone"), "unknown");
  EXPECT_EQ(state_of("back"), "unknown");
  EXPECT_EQ(jm->Stats().workers_by_state["unknown"], 2);
  clock_.AdvanceMs(500);
  EXPECT_FALSE(Acquire(*jm, "back").has_value());  // it polls the new coordinator
  EXPECT_EQ(state_of("back"), "idle");
  clock_.AdvanceMs(kLeaseMs);  // a live worker would have called by now
  EXPECT_EQ(state_of("gone"), "lost");
  EXPECT_FALSE(Acquire(*jm, "back").has_value());
  EXPECT_EQ(state_of("back"), "idle");
  EXPECT_EQ(jm->Stats().workers_by_state["lost"], 1);
}

TEST_F(JobManagerTest, DeleteJobRemovesAFinishedJobAndRefusesARunningOne) {
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  v1::SubmitJobRequest r = Request("out");
  r.set_request_id("req-1");
  const std::string id = Submit(*jm, r).id();
  ExpectError(jm->DeleteJob("", id), absl::StatusCode::kFailedPrecondition,
              {id, "QUEUED", "cancel it first"});
  ExpectError(jm->DeleteJob("other", id), absl::StatusCode::kNotFound, {id});
  const std::string w = Register(*jm);
  while (auto t = Acquire(*jm, w)) RunAndComplete(*jm, w, *t, 100);
  jm->Tick();
  jm->Tick();
  ASSERT_EQ(Get(*jm, id).state(), v1::JOB_STATE_SUCCEEDED);
  ASSERT_FALSE(Events(*jm, id).empty());
  ASSERT_TRUE(jm->DeleteJob("", id).ok());
  ExpectError(jm->GetJob("", id).status(), absl::StatusCode::kNotFound, {id});
  ExpectError(jm->DeleteJob("", id), absl::StatusCode::kNotFound, {id});
  EXPECT_TRUE(jm->ListJobs("", {})->jobs().empty());
  // The artifact stays; the request id is free again (a new job, not the deleted one).
  EXPECT_TRUE(std::filesystem::exists(root_ + "/out/" + kManifestName));
  r.mutable_spec()->set_output_uri(root_ + "/out2");
  EXPECT_NE(Submit(*jm, r).id(), id);
  // Gone from the database too: not back after a restart, no rows left.
  jm.reset();
  jm = Make();
  ASSERT_NE(jm, nullptr);
  EXPECT_EQ(jm->GetJob("", id).status().code(), absl::StatusCode::kNotFound);
  auto store = SqliteStateStore::Open(root_ + "/state.db");
  ASSERT_TRUE(store.ok());
  EXPECT_TRUE((*store)->ReadEvents(id, 0, 100)->empty());
  EXPECT_TRUE((*store)->ReadTasks(id)->empty());
}

TEST_F(JobManagerTest, RetentionDeletesJobsThatEndedLongAgoAndKeepsRecentAndRunningOnes) {
  JobManagerOptions o = Options();
  o.retain_jobs_ms = 3'600'000;
  auto jm = Make(o);
  ASSERT_NE(jm, nullptr);
  const std::string old_id = Submit(*jm, Request("old")).id();
  ASSERT_TRUE(jm->CancelJob("", old_id).ok());
  jm->Tick();
  ASSERT_EQ(Get(*jm, old_id).state(), v1::JOB_STATE_CANCELLED);
  clock_.AdvanceMs(3'000'000);
  const std::string recent_id = Submit(*jm, Request("recent")).id();
  ASSERT_TRUE(jm->CancelJob("", recent_id).ok());
  const std::string running_id = Submit(*jm, Request("running")).id();
  jm->Tick();
  clock_.AdvanceMs(700'000);  // old: 61 min ago; recent: 11 min ago
  jm->Tick();
  EXPECT_EQ(jm->GetJob("", old_id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Get(*jm, recent_id).state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(Get(*jm, running_id).state(), v1::JOB_STATE_QUEUED);
  jm.reset();
  jm = Make(o);
  ASSERT_NE(jm, nullptr);
  EXPECT_EQ(jm->GetJob("", old_id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(jm->ListJobs("", {})->jobs_size(), 2);
}

TEST_F(JobManagerTest, EtaIsExactAndSteadyWhenLayerTimeFollowsLayerSize) {
  // Layers of 2048, 4096 and 6144 weights finishing in turn, each taking 1 ms per 64
  // weights on one worker: the estimate is the time actually left after every completion
  // (a mean per layer would jump up after each small layer and down after each large one).
  auto jm = Make();
  ASSERT_NE(jm, nullptr);
  const std::string id = Submit(*jm, Request("out")).id();
  const std::string w = Register(*jm);
  v1::ListLayersRequest req;
  req.set_id(id);
  auto layers = jm->ListLayers("", req);
  ASSERT_TRUE(layers.ok());
  int64_t left_ms = 0;
  for (const v1::LayerResult& l : layers->layers()) left_ms += l.out_features() * l.in_features() / 64;
  int done = 0;
  while (auto t = Acquire(*jm, w)) {
    const int64_t ms = t->layer().out_features() * t->layer().in_features() / 64;
    RunAndComplete(*jm, w, *t, ms);
    left_ms -= ms;
    ++done;
    const v1::Job job = Get(*jm, id);
    if (job.state() != v1::JOB_STATE_QUANTIZING) break;
    EXPECT_NEAR(job.eta_seconds(), static_cast<double>(left_ms) / 1000.0, 1e-6)
        << "after " << done << " layers";
  }
  EXPECT_EQ(done, 6);
}

}  // namespace
}  // namespace qforge

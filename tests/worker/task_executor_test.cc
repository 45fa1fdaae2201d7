// TaskExecutor on a real LocalStore with a tiny model: a Task built by hand is fetched,
// solved and staged; the staged object's sha256 and size match its bytes; the tensors equal
// those of RunLayer called directly; error classification (missing Hessian, bad task,
// bad spec, NaN weights); store retries (UNAVAILABLE twice → success, three times → a
// retryable failure); cancellation leaves nothing staged and stops the solver; the solve's
// progress is reported between the read and the write; stores and Hessian files are cached.
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "common/forwarding_store.h"
#include "common/hessian_file.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "job/calibration.h"
#include "job/decoder_model.h"
#include "job/layer_runner.h"
#include "base/float16.h"
#include "quant/gptq.h"
#include "quant/gptq_layer_quantizer.h"
#include "quant/layer_quantizer.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"
#include "quant/vptq_layer_quantizer.h"
#include "worker/task_executor.h"

namespace qforge {
namespace {

namespace fs = std::filesystem;

constexpr char kDown[] = "model.layers.0.mlp.down_proj";    // F16 [64, 256], Hessian present
constexpr char kQ[] = "model.layers.0.self_attn.q_proj";    // BF16 [64, 128], no Hessian
constexpr char kNan[] = "model.layers.0.mlp.up_proj";       // F16 [64, 128] with NaNs

std::string F16Bytes(const std::vector<float>& v) {
  std::string out(v.size() * 2, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h = qforge::FloatToHalf(v[i]);
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

std::string Bf16Bytes(const std::vector<float>& v) {
  std::string out(v.size() * 2, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h = qforge::FloatToBFloat16(v[i]);
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

// Fails the first `failures` ReadRange (or NewWriter) calls with UNAVAILABLE. Owns its target.
class FlakyStore : public ForwardingStore {
 public:
  FlakyStore(std::unique_ptr<ObjectStore> owned, int read_failures, int writer_failures)
      : ForwardingStore(owned.get()),
        owned_(std::move(owned)),
        read_failures_(read_failures),
        writer_failures_(writer_failures) {}

  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override {
    ++reads_;
    if (read_failures_ > 0) {
      --read_failures_;
      return absl::UnavailableError("injected read failure");
    }
    absl::Status s = ForwardingStore::ReadRange(key, offset, length, out);
    if (after_read_) after_read_();
    return s;
  }
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    if (writer_failures_ > 0) {
      --writer_failures_;
      return absl::UnavailableError("injected writer failure");
    }
    return ForwardingStore::NewWriter(key);
  }

  int reads_ = 0;
  std::function<void()> after_read_;

 private:
  std::unique_ptr<ObjectStore> owned_;
  int read_failures_, writer_failures_;
};

// Wraps a solver (GPTQ or VPTQ) to watch the executor's progress callback: after each report
// it records the task's phase snapshot, and it keeps the status the wrapped solver returned.
// `before_first_report` (optional) runs before the first report reaches the executor.
template <typename Solver, typename Options, typename Result>
class ObservingSolver final : public Solver {
 public:
  ObservingSolver(std::unique_ptr<Solver> inner, const TaskControl* control)
      : inner_(std::move(inner)), control_(control) {}

  const char* backend() const override { return inner_->backend(); }
  qforge::StatusOr<Result> Quantize(const qforge::Matrix& w, const qforge::Matrix& h,
                                   const Options& options) override {
    Options watched = options;
    watched.progress = [this, &options](double fraction) {
      if (reports.empty() && before_first_report) before_first_report();
      const bool go_on = !options.progress || options.progress(fraction);
      reports.push_back(control_->Snapshot());
      return go_on;
    };
    auto r = inner_->Quantize(w, h, watched);
    status = r.status();
    return r;
  }

  std::function<void()> before_first_report;
  std::vector<std::pair<std::string, double>> reports;
  qforge::Status status;

 private:
  std::unique_ptr<Solver> inner_;
  const TaskControl* control_;
};
using ObservingGptq = ObservingSolver<quant::GptqSolver, quant::GptqOptions, quant::GptqResult>;
using ObservingVptq = ObservingSolver<quant::VptqSolver, quant::VptqOptions, quant::VptqResult>;

class TaskExecutorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qforge-executor-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    model_uri_ = root_ + "/model";
    out_uri_ = root_ + "/out";
    hessians_uri_ = root_ + "/hess/hessians.safetensors";
    auto m = OpenObjectStore(model_uri_);
    ASSERT_TRUE(m.ok()) << m.status();
    quant::Rng rng(3);
    auto values = [&](int64_t n) {
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = 0.05f * static_cast<float>(rng.StudentT(4.0));
      return v;
    };
    std::vector<TensorSpec> specs = {{std::string(kDown) + ".weight", DType::kF16, {64, 256}},
                                     {std::string(kNan) + ".weight", DType::kF16, {64, 128}},
                                     {std::string(kQ) + ".weight", DType::kBF16, {64, 128}}};
    auto w = SafetensorsWriter::Create(**m, "model.safetensors", specs);
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->WriteTensorData(specs[0].name, F16Bytes(values(64 * 256))).ok());
    std::vector<float> nan_weights = values(64 * 128);
    nan_weights[77] = std::nanf("");
    ASSERT_TRUE((*w)->WriteTensorData(specs[1].name, F16Bytes(nan_weights)).ok());
    ASSERT_TRUE((*w)->WriteTensorData(specs[2].name, Bf16Bytes(values(64 * 128))).ok());
    ASSERT_TRUE((*w)->Finish().ok());
    auto model = SafetensorsModel::Open(**m, "");
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::make_unique<SafetensorsModel>(*std::move(model));

    // Hessians for down_proj and up_proj only (q_proj is missing on purpose).
    auto h = OpenObjectStore(root_ + "/hess");
    ASSERT_TRUE(h.ok());
    hessian_ = quant::MakeSyntheticLayer(4, 256, 512, 17).hessian;
    up_hessian_ = quant::MakeSyntheticLayer(4, 128, 512, 19).hessian;
    ASSERT_TRUE(WriteHessianFile(**h, "hessians.safetensors",
                                 {{kDown, hessian_.data.data(), 256},
                                  {kNan, up_hessian_.data.data(), 128}},
                                 {}, 512)
                    .ok());
  }
  void TearDown() override { fs::remove_all(root_); }

  v1::Task MakeTask(const std::string& module, const std::string& id = "t-1") {
    auto loc = LocateTensor(*model_, module + ".weight");
    EXPECT_TRUE(loc.ok()) << loc.status();
    v1::Task t;
    t.set_id(id);
    t.set_job_id("job-1");
    t.set_kind(v1::TASK_KIND_QUANTIZE);
    t.set_attempt(0);
    t.set_lease_token("lease-1");
    v1::JobSpec* spec = t.mutable_spec();
    spec->set_model_uri(model_uri_);
    spec->set_output_uri(out_uri_);
    spec->set_method(v1::METHOD_GPTQ);
    spec->mutable_gptq()->set_bits(4);
    spec->mutable_gptq()->set_group_size(64);
    spec->mutable_gptq()->set_desc_act(true);
    spec->mutable_calibration()->set_hessians_uri(hessians_uri_);
    v1::LayerInput* l = t.mutable_layer();
    l->set_module(module);
    l->set_weight_tensor(module + ".weight");
    l->set_model_uri(model_uri_);
    l->set_shard_key(loc->key);
    l->set_byte_offset(loc->offset);
    l->set_byte_length(loc->length);
    l->set_dtype(DTypeName(loc->dtype));
    l->set_out_features(loc->shape[0]);
    l->set_in_features(loc->shape[1]);
    l->set_hessians_uri(hessians_uri_);
    t.set_staging_uri(out_uri_);
    t.set_staging_key(".qforge-staging/job-1/" + id + "/0/layer.safetensors");
    return t;
  }

  // Executor options that count store openings, wrap the store at `flaky_uri` and record
  // retry sleeps instead of sleeping.
  TaskExecutorOptions Options(const std::string& flaky_uri = "", int read_failures = 0,
                              int writer_failures = 0) {
    TaskExecutorOptions o;
    o.open_store = [this, flaky_uri, read_failures,
                    writer_failures](std::string_view uri) -> absl::StatusOr<std::unique_ptr<ObjectStore>> {
      ++opens_;
      auto base = OpenObjectStore(uri);
      if (!base.ok()) return base.status();
      if (std::string(uri) != flaky_uri) return std::move(*base);
      auto flaky = std::make_unique<FlakyStore>(std::move(*base), read_failures, writer_failures);
      flaky_ = flaky.get();
      return std::unique_ptr<ObjectStore>(std::move(flaky));
    };
    o.sleep = [this](int64_t ms) { sleeps_.push_back(ms); };
    return o;
  }

  // The CPU quantizers on the CPU solvers wrapped in ObservingSolvers watching `control`.
  quant::LayerQuantizerSet ObservedCpuQuantizers(const TaskControl* control) {
    quant::LayerQuantizerSet s;
    auto gptq = std::make_unique<ObservingGptq>(quant::NewCpuGptqSolver(), control);
    auto vptq = std::make_unique<ObservingVptq>(quant::NewCpuVptqSolver(), control);
    gptq_ = gptq.get();
    vptq_ = vptq.get();
    s.Add(quant::NewGptqLayerQuantizer(std::move(gptq)));
    s.Add(quant::NewVptqLayerQuantizer(std::move(vptq)));
    return s;
  }

  // A VPTQ task on down_proj [64, 256]: 2 lazy blocks, k-means of 256 entries.
  v1::Task MakeVptqTask(const std::string& id) {
    v1::Task task = MakeTask(kDown, id);
    v1::JobSpec* spec = task.mutable_spec();
    spec->clear_gptq();
    spec->set_method(v1::METHOD_VPTQ);
    spec->mutable_vptq()->set_vector_len(8);
    spec->mutable_vptq()->set_num_centroids(256);
    spec->mutable_vptq()->set_num_res_centroids(16);
    spec->mutable_vptq()->set_kmeans_iters(10);
    return task;
  }

  std::vector<std::string> FilesUnder(const std::string& dir) {
    std::vector<std::string> files;
    if (!fs::exists(dir)) return files;
    for (const auto& e : fs::recursive_directory_iterator(dir)) {
      if (e.is_regular_file()) files.push_back(e.path().string());
    }
    return files;
  }

  std::string root_, model_uri_, out_uri_, hessians_uri_;
  std::unique_ptr<SafetensorsModel> model_;
  qforge::Matrix hessian_, up_hessian_;
  int opens_ = 0;
  std::vector<int64_t> sleeps_;
  FlakyStore* flaky_ = nullptr;
  ObservingGptq* gptq_ = nullptr;  // owned by the executor of ObservedCpuQuantizers
  ObservingVptq* vptq_ = nullptr;
};

TEST_F(TaskExecutorTest, StagesTheLayerWithItsChecksumAndMetrics) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  TaskControl control;
  const v1::Task task = MakeTask(kDown);
  auto r = executor.Execute(task, &control);
  ASSERT_TRUE(r.ok()) << r.status();

  // The staged object is there, and its checksum and size are those of its bytes.
  EXPECT_EQ(r->output_key, task.staging_key());
  auto out = OpenObjectStore(out_uri_);
  ASSERT_TRUE(out.ok());
  auto bytes = (*out)->ReadAll(task.staging_key());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(r->output_bytes, bytes->size());
  EXPECT_EQ(r->output_sha256, Sha256Hex(*bytes));
  EXPECT_EQ(r->output_sha256.size(), 64u);

  // Metrics: bytes actually read (weight + Hessian tensor) and written, the solver's figures.
  const v1::TaskMetrics& m = r->metrics;
  EXPECT_EQ(m.bytes_read(), 64u * 256 * 2 + 256u * 256 * 4);
  EXPECT_EQ(m.bytes_written(), bytes->size());
  EXPECT_GT(m.solve_seconds(), 0);
  EXPECT_GT(m.read_seconds(), 0);
  EXPECT_GT(m.write_seconds(), 0);
  EXPECT_GT(m.proxy_loss(), 0);
  EXPECT_GT(m.weight_energy(), 0);
  EXPECT_GT(m.relative_error(), 0);
  EXPECT_LT(m.relative_error(), 0.05);  // 4-bit g64 on Student-t weights: a few 1e-3
  EXPECT_NEAR(m.relative_error(), m.output_error() / m.weight_energy(), 1e-12);
  EXPECT_DOUBLE_EQ(m.damp_percent_used(), 0.01);
  EXPECT_EQ(m.backend(), "cpu");
  EXPECT_EQ(control.Snapshot(), (std::pair<std::string, double>{"done", 1.0}));

  // The same tensors as the layer runner called directly with the same options.
  LayerJob job;
  job.module = kDown;
  auto model_store = OpenObjectStore(model_uri_);
  ASSERT_TRUE(model_store.ok());
  job.model_store = model_store->get();
  auto hstore = OpenObjectStore(root_ + "/hess");
  auto hfile = HessianFile::Open(**hstore, "hessians.safetensors");
  ASSERT_TRUE(hfile.ok());
  job.weight = *LocateTensor(*model_, std::string(kDown) + ".weight");
  job.hessian_store = hstore->get();
  job.hessians = &*hfile;
  quant::GptqLayerOptions options;
  options.solver.bits = 4;
  options.solver.group_size = 64;
  options.solver.act_order = true;
  job.options = options;
  job.out_store = out->get();
  job.staged_key = "direct/layer.safetensors";
  auto quantizer = quant::NewGptqLayerQuantizer(quant::NewCpuGptqSolver());
  auto direct = RunLayer(job, *quantizer);
  ASSERT_TRUE(direct.ok()) << direct.status();
  EXPECT_DOUBLE_EQ(direct->proxy_loss, m.proxy_loss());
  auto a = ReadSafetensorsHeader(**out, task.staging_key());
  auto b = ReadSafetensorsHeader(**out, "direct/layer.safetensors");
  ASSERT_TRUE(a.ok() && b.ok());
  for (const char* suffix : {"qweight", "qzeros", "scales", "g_idx"}) {
    const std::string name = StagedTensorName(kDown, suffix);
    const TensorInfo* ta = a->Find(name);
    const TensorInfo* tb = b->Find(name);
    ASSERT_NE(ta, nullptr) << name;
    ASSERT_NE(tb, nullptr) << name;
    auto ba = ReadTensorBytes(**out, task.staging_key(), *a, *ta);
    auto bb = ReadTensorBytes(**out, "direct/layer.safetensors", *b, *tb);
    ASSERT_TRUE(ba.ok() && bb.ok());
    EXPECT_TRUE(*ba == *bb) << name << " differs from the direct layer runner";
  }
}

TEST_F(TaskExecutorTest, VptqTaskStagesTheVptqTensorsAndConfig) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  v1::Task task = MakeTask(kDown, "t-vptq");
  v1::JobSpec* spec = task.mutable_spec();
  spec->clear_gptq();
  spec->set_method(v1::METHOD_VPTQ);
  spec->mutable_vptq()->set_vector_len(8);
  spec->mutable_vptq()->set_num_centroids(256);
  spec->mutable_vptq()->set_num_res_centroids(16);
  spec->mutable_vptq()->set_kmeans_iters(10);
  task.mutable_layer()->set_has_bias(true);
  TaskControl control;
  auto r = executor.Execute(task, &control);
  ASSERT_TRUE(r.ok()) << r.status();
  const v1::TaskMetrics& m = r->metrics;
  EXPECT_EQ(m.backend(), "cpu");
  EXPECT_GT(m.relative_error(), 0);
  EXPECT_LT(m.relative_error(), 0.2);
  EXPECT_GT(m.bits_per_weight(), 0);

  // The staged file holds the VPTQ tensors (fp16 codebooks, as the weight) and the layer's
  // config_for_layers entry, which records the bias the coordinator said the layer has.
  auto out = OpenObjectStore(out_uri_);
  ASSERT_TRUE(out.ok());
  auto header = ReadSafetensorsHeader(**out, task.staging_key());
  ASSERT_TRUE(header.ok()) << header.status();
  for (const char* suffix : {"centroids.weight", "res_centroids.weight", "indices", "perm",
                             "weight_scale", "weight_bias"}) {
    EXPECT_NE(header->Find(StagedTensorName(kDown, suffix)), nullptr) << suffix;
  }
  EXPECT_EQ(header->Find(StagedTensorName(kDown, "qweight")), nullptr);
  EXPECT_EQ(header->Find(StagedTensorName(kDown, "centroids.weight"))->dtype, DType::kF16);
  auto it = header->metadata().find("qforge.vptq_config");
  ASSERT_NE(it, header->metadata().end());
  nlohmann::json config = nlohmann::json::parse(it->second);
  EXPECT_EQ(config["vector_lens"], nlohmann::json::array({-1, 8}));
  EXPECT_EQ(config["num_centroids"], nlohmann::json::array({-1, 256}));
  EXPECT_EQ(config["num_res_centroids"], nlohmann::json::array({-1, 16}));
  EXPECT_EQ(config["in_features"], 256);
  EXPECT_EQ(config["out_features"], 64);
  EXPECT_EQ(config["bias"], true);

  // A spec outside the vptq kernels' limits is refused before any solving, naming the field.
  spec->mutable_vptq()->set_num_centroids(1000);
  task.set_staging_key(".qforge-staging/job-1/t-vptq/1/layer.safetensors");
  auto bad = executor.Execute(task, nullptr);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("spec.vptq.num_centroids"), std::string::npos)
      << bad.status();
  EXPECT_EQ(ToErrorInfo(bad.status()).reason(), "INVALID_SPEC");
}

TEST_F(TaskExecutorTest, IdentityHessianForCalibrationNone) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  v1::Task task = MakeTask(kQ);  // BF16, and no Hessian in the file: identity instead
  task.mutable_spec()->mutable_calibration()->set_none(true);
  task.mutable_layer()->clear_hessians_uri();
  auto r = executor.Execute(task, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->metrics.bytes_read(), 64u * 128 * 2);  // the weight only
  EXPECT_GT(r->metrics.relative_error(), 0);
}

TEST_F(TaskExecutorTest, MissingHessianIsNotRetryable) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  // The module has no Hessian in the file.
  auto r = executor.Execute(MakeTask(kQ), nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_FALSE(IsRetryableError(r.status().code()));
  v1::ErrorInfo e = ToErrorInfo(r.status());
  EXPECT_EQ(e.code(), static_cast<int>(absl::StatusCode::kNotFound));
  EXPECT_EQ(e.reason(), "HESSIAN_MISSING");
  EXPECT_EQ(e.subject(), kQ);
  EXPECT_NE(e.message().find(kQ), std::string::npos) << e.message();

  // The Hessian file itself is missing.
  v1::Task task = MakeTask(kDown);
  task.mutable_layer()->set_hessians_uri(root_ + "/hess/nope.safetensors");
  r = executor.Execute(task, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  e = ToErrorInfo(r.status());
  EXPECT_EQ(e.reason(), "HESSIAN_MISSING");
  EXPECT_NE(e.message().find("nope.safetensors"), std::string::npos) << e.message();
  EXPECT_NE(e.message().find(kDown), std::string::npos) << e.message();
  EXPECT_TRUE(FilesUnder(out_uri_).empty());
}

TEST_F(TaskExecutorTest, BadTasksAndSpecsAreInvalidArguments) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  struct Case {
    std::function<void(v1::Task&)> edit;
    absl::StatusCode code;
    std::string reason, needle;
  } cases[] = {
      {[](v1::Task& t) { t.mutable_layer()->set_byte_length(t.layer().byte_length() - 2); },
       absl::StatusCode::kInvalidArgument, "BAD_TASK", "byte_length"},
      {[](v1::Task& t) { t.mutable_layer()->set_dtype("I32"); }, absl::StatusCode::kInvalidArgument,
       "BAD_TASK", "dtype"},
      {[](v1::Task& t) { t.clear_staging_key(); }, absl::StatusCode::kInvalidArgument, "BAD_TASK",
       "staging_key"},
      {[](v1::Task& t) { t.mutable_spec()->mutable_gptq()->set_bits(5); },
       absl::StatusCode::kInvalidArgument, "INVALID_SPEC", "bits"},
      {[](v1::Task& t) { t.mutable_spec()->mutable_gptq()->set_group_size(100); },
       absl::StatusCode::kInvalidArgument, "INVALID_SPEC", "group"},
      {[](v1::Task& t) { t.set_kind(v1::TASK_KIND_ASSEMBLE); }, absl::StatusCode::kUnimplemented,
       "UNSUPPORTED_TASK", "ASSEMBLE"},
      // A CALIBRATE or REDUCE task without its calibration inputs.
      {[](v1::Task& t) { t.set_kind(v1::TASK_KIND_CALIBRATE); },
       absl::StatusCode::kInvalidArgument, "BAD_TASK", "calibration.model_uri is empty"},
      {[](v1::Task& t) { t.set_kind(v1::TASK_KIND_REDUCE); }, absl::StatusCode::kInvalidArgument,
       "BAD_TASK", "calibration.partial_keys is empty"},
      {[](v1::Task& t) { t.mutable_spec()->set_method(v1::METHOD_VPTQ); },
       absl::StatusCode::kInvalidArgument, "INVALID_SPEC", "spec.gptq: set, but the method is VPTQ"},
  };
  for (const Case& c : cases) {
    v1::Task task = MakeTask(kDown);
    c.edit(task);
    auto r = executor.Execute(task, nullptr);
    ASSERT_FALSE(r.ok()) << c.needle;
    EXPECT_EQ(r.status().code(), c.code) << r.status();
    EXPECT_FALSE(IsRetryableError(r.status().code())) << r.status();
    EXPECT_EQ(ToErrorInfo(r.status()).reason(), c.reason) << r.status();
    EXPECT_NE(r.status().message().find(c.needle), std::string::npos) << r.status();
  }
  EXPECT_TRUE(FilesUnder(out_uri_).empty());
}

TEST_F(TaskExecutorTest, NonFiniteWeightsFailNamingTheLayer) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  auto r = executor.Execute(MakeTask(kNan), nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_FALSE(IsRetryableError(r.status().code()));
  EXPECT_NE(r.status().message().find(kNan), std::string::npos) << r.status();
  EXPECT_TRUE(FilesUnder(out_uri_).empty());
}

// Issue 18 defect 8: the source shard is pinned at submit (size and version); a shard that
// changed since fails the task for good, naming the shard, before anything is read.
TEST_F(TaskExecutorTest, ASourceShardChangedSinceSubmitFailsTheTaskNotRetryable) {
  auto store = OpenObjectStore(model_uri_);
  ASSERT_TRUE(store.ok());
  v1::Task task = MakeTask(kDown);
  auto info = (*store)->Stat(task.layer().shard_key());
  ASSERT_TRUE(info.ok());
  ASSERT_FALSE(info->version.empty());  // file:// tells
  task.mutable_layer()->set_shard_size(info->size);
  task.mutable_layer()->set_shard_version(info->version);
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  ASSERT_TRUE(executor.Execute(task, nullptr).ok());

  // Rewritten with the very same bytes: still another version of the file.
  auto bytes = (*store)->ReadAll(task.layer().shard_key());
  ASSERT_TRUE(bytes.ok());
  ASSERT_TRUE((*store)->Put(task.layer().shard_key(), *bytes).ok());
  v1::Task again = task;
  again.set_staging_key(".qforge-staging/job-1/t-2/0/layer.safetensors");
  auto r = executor.Execute(again, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_FALSE(IsRetryableError(r.status().code()));
  const v1::ErrorInfo e = ToErrorInfo(r.status());
  EXPECT_EQ(e.reason(), "SOURCE_CHANGED");
  EXPECT_EQ(e.subject(), model_uri_ + "/model.safetensors");
  EXPECT_NE(e.message().find("changed after the job was submitted"), std::string::npos)
      << e.message();

  // A size that differs is reported as such.
  again.mutable_layer()->set_shard_size(info->size + 1);
  again.mutable_layer()->clear_shard_version();
  r = executor.Execute(again, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("size"), std::string::npos) << r.status();
  EXPECT_EQ(ToErrorInfo(r.status()).reason(), "SOURCE_CHANGED");
  EXPECT_EQ(FilesUnder(out_uri_ + "/.qforge-staging/job-1/t-2").size(), 0u);
}

TEST_F(TaskExecutorTest, UnavailableReadsAreRetriedWithBackoff) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options(model_uri_, /*read_failures=*/2));
  auto r = executor.Execute(MakeTask(kDown), nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(flaky_->reads_, 3);
  EXPECT_EQ(sleeps_, (std::vector<int64_t>{100, 200}));
  EXPECT_EQ(executor.store_retries(), 2u);
}

TEST_F(TaskExecutorTest, PersistentlyUnavailableReadsAreARetryableFailure) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options(model_uri_, /*read_failures=*/3));
  auto r = executor.Execute(MakeTask(kDown), nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_TRUE(IsRetryableError(r.status().code()));
  EXPECT_EQ(flaky_->reads_, 3);
  EXPECT_EQ(sleeps_, (std::vector<int64_t>{100, 200}));
  v1::ErrorInfo e = ToErrorInfo(r.status());
  EXPECT_EQ(e.reason(), "MODEL_READ_FAILED");
  EXPECT_NE(e.subject().find("model.safetensors"), std::string::npos) << e.subject();
  EXPECT_NE(e.message().find(kDown), std::string::npos) << e.message();
  EXPECT_TRUE(FilesUnder(out_uri_).empty());
}

TEST_F(TaskExecutorTest, UnavailableStagingIsARetryableFailure) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(),
                        Options(out_uri_, /*read_failures=*/0, /*writer_failures=*/3));
  auto r = executor.Execute(MakeTask(kDown), nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_TRUE(IsRetryableError(r.status().code()));
  EXPECT_EQ(ToErrorInfo(r.status()).reason(), "STAGING_WRITE_FAILED");
}

TEST_F(TaskExecutorTest, CancellationDuringTheSolveLeavesNothingStaged) {
  TaskControl control;
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options(model_uri_));
  // Cancel right after the weight is read: the solver stops at its first progress report,
  // and nothing is published.
  bool hooked = false;
  (void)executor.Execute(MakeTask(kQ, "warm"), nullptr);  // opens the stores (fails: no H)
  ASSERT_NE(flaky_, nullptr);
  flaky_->after_read_ = [&] {
    hooked = true;
    control.Cancel();
  };
  auto r = executor.Execute(MakeTask(kDown), &control);
  EXPECT_TRUE(hooked);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_FALSE(IsRetryableError(r.status().code()));
  EXPECT_TRUE(FilesUnder(out_uri_).empty());

  // Cancelled before it starts: no I/O at all.
  TaskControl early;
  early.Cancel();
  const int reads = flaky_->reads_;
  r = executor.Execute(MakeTask(kDown, "t-2"), &early);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_EQ(flaky_->reads_, reads);
}

// The solve moves the task's progress from 0.15 (inputs read) to 0.9 (write starts) with the
// solver's fraction, in phase "solve", for both methods.
TEST_F(TaskExecutorTest, SolveReportsProgressBetweenReadAndWrite) {
  TaskControl control;
  TaskExecutor executor(ObservedCpuQuantizers(&control), Options());
  ASSERT_TRUE(executor.Execute(MakeTask(kDown, "t-gptq"), &control).ok());
  ASSERT_TRUE(executor.Execute(MakeVptqTask("t-vptq"), &control).ok());
  EXPECT_EQ(control.Snapshot(), (std::pair<std::string, double>{"done", 1.0}));
  for (const auto* reports : {&gptq_->reports, &vptq_->reports}) {
    ASSERT_GE(reports->size(), 2u);  // at least the 2 lazy blocks of 128 columns
    int inside = 0;
    double last = 0.15;
    for (const auto& [phase, progress] : *reports) {
      EXPECT_EQ(phase, "solve");
      EXPECT_GE(progress, last);
      last = progress;
      inside += progress > 0.15 && progress < 0.9 - 1e-9;
    }
    EXPECT_GE(inside, 1) << "no report strictly inside the solve's span";
    EXPECT_DOUBLE_EQ(reports->back().second, 0.9);
  }
  EXPECT_GT(vptq_->reports.size(), gptq_->reports.size());  // k-means steps and 2 passes
}

// A cancellation that arrives from another thread (as the heartbeat's) while the solver runs
// stops the solver at its next report; the task ends CANCELLED with nothing staged.
TEST_F(TaskExecutorTest, CancellationFromAnotherThreadStopsTheSolver) {
  for (const std::string method : {"gptq", "vptq"}) {
    SCOPED_TRACE(method);
    TaskControl control;
    TaskExecutor executor(ObservedCpuQuantizers(&control), Options());
    auto* solver_reports = method == "gptq" ? &gptq_->reports : &vptq_->reports;
    std::promise<void> in_solve, cancelled;
    std::function<void()>& hold = method == "gptq" ? gptq_->before_first_report
                                                   : vptq_->before_first_report;
    hold = [&] {  // the solver waits at its first report until the cancel has happened
      in_solve.set_value();
      cancelled.get_future().wait();
    };
    std::string phase_seen;
    std::thread heartbeat([&] {
      in_solve.get_future().wait();
      phase_seen = control.Snapshot().first;
      control.Cancel();
      cancelled.set_value();
    });
    const v1::Task task = method == "gptq" ? MakeTask(kDown, "t-c") : MakeVptqTask("t-c");
    auto r = executor.Execute(task, &control);
    heartbeat.join();
    EXPECT_EQ(phase_seen, "solve");
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
    EXPECT_EQ(ToErrorInfo(r.status()).reason(), "CANCELLED");
    const qforge::Status& solved = method == "gptq" ? gptq_->status : vptq_->status;
    EXPECT_EQ(solved.code(), qforge::StatusCode::kCancelled) << solved.ToString();
    EXPECT_EQ(solver_reports->size(), 1u) << "the solver went on after the cancellation";
    EXPECT_TRUE(FilesUnder(out_uri_).empty());
  }
}

TEST_F(TaskExecutorTest, StoresAndHessianFilesAreCached) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  ASSERT_TRUE(executor.Execute(MakeTask(kDown, "t-1"), nullptr).ok());
  EXPECT_EQ(opens_, 3);  // model, Hessian directory, output
  ASSERT_TRUE(executor.Execute(MakeTask(kDown, "t-2"), nullptr).ok());
  EXPECT_EQ(opens_, 3);
}

TEST(RetryingStoreTest, OnlyUnavailableIsRetried) {
  auto base = OpenObjectStore(fs::temp_directory_path().string() + "/qforge-retry-test");
  ASSERT_TRUE(base.ok());
  std::vector<int64_t> sleeps;
  RetryingStore store(base->get(), StoreRetryPolicy{}, [&](int64_t ms) { sleeps.push_back(ms); });
  EXPECT_EQ(store.Stat("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(sleeps.empty());
  EXPECT_EQ(store.retries(), 0u);
  fs::remove_all(fs::temp_directory_path() / "qforge-retry-test");
}

TEST(ErrorClassificationTest, BadInputIsNotRetriedInfrastructureIs) {
  using C = absl::StatusCode;
  for (C c : {C::kInvalidArgument, C::kNotFound, C::kFailedPrecondition, C::kOutOfRange,
              C::kPermissionDenied, C::kUnimplemented, C::kCancelled, C::kAlreadyExists}) {
    EXPECT_FALSE(IsRetryableError(c)) << absl::StatusCodeToString(c);
  }
  for (C c : {C::kUnavailable, C::kResourceExhausted, C::kInternal, C::kDataLoss,
              C::kDeadlineExceeded, C::kAborted, C::kUnknown}) {
    EXPECT_TRUE(IsRetryableError(c)) << absl::StatusCodeToString(c);
  }
  v1::ErrorInfo e = ToErrorInfo(absl::DataLossError("torn"));
  EXPECT_EQ(e.reason(), "DATA_LOSS");
  EXPECT_EQ(e.message(), "torn");
  e = ToErrorInfo(WithReason(absl::NotFoundError("x"), "HESSIAN_MISSING", "m"));
  EXPECT_EQ(e.reason(), "HESSIAN_MISSING");
  EXPECT_EQ(e.subject(), "m");
}

TEST(DeviceTest, ParsesAndResolvesDevices) {
  EXPECT_EQ(ParseDeviceSpec("cpu")->ToString(), "cpu");
  EXPECT_EQ(ParseDeviceSpec("cuda")->ToString(), "cuda:0");
  EXPECT_EQ(ParseDeviceSpec("cuda:3")->ToString(), "cuda:3");
  for (const char* bad : {"", "gpu", "cuda:", "cuda:-1", "cuda:x", "CPU"}) {
    EXPECT_EQ(ParseDeviceSpec(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  std::string note;
  // Default without a GPU: cpu, saying why.
  auto d = ResolveDevice("", {}, &note);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->ToString(), "cpu");
  EXPECT_NE(note.find("no CUDA device"), std::string::npos) << note;
  // Default with a GPU: cuda:0 when this build has the CUDA backend, else cpu saying why.
  quant::CudaDeviceInfo gpu;
  gpu.index = 0;
  gpu.name = "NVIDIA H100 80GB HBM3";
  d = ResolveDevice("", {gpu}, &note);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->ToString(), quant::CudaCompiledIn() ? "cuda:0" : "cpu");
  if (d->ToString() == "cpu") {
    EXPECT_NE(note.find("no CUDA backend"), std::string::npos) << note;
  }
  // Explicit cpu.
  d = ResolveDevice("cpu", {gpu}, &note);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->backend(), "cpu");
  // Explicit CUDA without a CUDA solver (or without that GPU): a usage error.
  EXPECT_EQ(ResolveDevice("cuda:0", {}, &note).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ResolveDevice("cuda:1", {gpu}, &note).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The CPU always has both quantizers.
  auto cpu = NewQuantizersForDevice(DeviceSpec{});
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(std::string(cpu->backend()), "cpu");
  EXPECT_NE(cpu->Find("gptq"), nullptr);
  EXPECT_NE(cpu->Find("vptq"), nullptr);
  // CUDA: quantizers when a GPU is usable; otherwise an error naming the device, never a crash.
  auto cuda = NewQuantizersForDevice(DeviceSpec{DeviceSpec::Kind::kCuda, 0});
  if (cuda.ok()) {
    EXPECT_EQ(std::string(cuda->backend()), "cuda");
  } else {
    EXPECT_NE(cuda.status().message().find("cuda:0"), std::string::npos) << cuda.status();
  }
}


// ---- CALIBRATE and REDUCE -------------------------------------------------------------------

// A real tiny Llama (hidden 32, 2 heads of 16 with 1 KV head, intermediate 48, 2 layers,
// vocabulary 40) under root_/cmodel and token data [4, 8] under root_/data.
class CalibrationExecutorTest : public TaskExecutorTest {
 protected:
  void SetUp() override {
    TaskExecutorTest::SetUp();
    auto store = OpenObjectStore(root_ + "/cmodel");
    ASSERT_TRUE(store.ok());
    quant::Rng rng(23);
    std::vector<std::pair<std::string, std::vector<int64_t>>> ts = {
        {"model.embed_tokens.weight", {40, 32}}};
    for (int i = 0; i < 2; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      ts.push_back({p + "input_layernorm.weight", {32}});
      ts.push_back({p + "self_attn.q_proj.weight", {32, 32}});
      ts.push_back({p + "self_attn.k_proj.weight", {16, 32}});
      ts.push_back({p + "self_attn.v_proj.weight", {16, 32}});
      ts.push_back({p + "self_attn.o_proj.weight", {32, 32}});
      ts.push_back({p + "post_attention_layernorm.weight", {32}});
      ts.push_back({p + "mlp.gate_proj.weight", {48, 32}});
      ts.push_back({p + "mlp.up_proj.weight", {48, 32}});
      ts.push_back({p + "mlp.down_proj.weight", {32, 48}});
    }
    std::vector<TensorSpec> specs;
    for (const auto& [name, shape] : ts) specs.push_back({name, DType::kF16, shape});
    auto w = SafetensorsWriter::Create(**store, "model.safetensors", specs);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const auto& [name, shape] : ts) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) {
        x = shape.size() == 1 ? 1.0f + 0.05f * static_cast<float>(rng.Normal())
                              : 0.1f * static_cast<float>(rng.StudentT(4.0));
      }
      ASSERT_TRUE((*w)->WriteTensorData(name, F16Bytes(v)).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    const nlohmann::json config = {
        {"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 32},
        {"intermediate_size", 48},                {"num_attention_heads", 2},
        {"num_key_value_heads", 1},               {"num_hidden_layers", 2},
        {"vocab_size", 40},                       {"max_position_embeddings", 32},
        {"rms_norm_eps", 1e-5},                   {"hidden_act", "silu"},
        {"tie_word_embeddings", true}};
    ASSERT_TRUE((*store)->Put("config.json", config.dump()).ok());
    auto parsed = ParseDecoderModelConfig(config.dump(), "test");
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    decoder_ = parsed->decoder;

    auto data = OpenObjectStore(root_ + "/data");
    ASSERT_TRUE(data.ok());
    std::string ids(4 * 8 * 4, '\0');
    for (int i = 0; i < 32; ++i) {
      const int32_t id = (7 * i + 3) % 40;
      std::memcpy(&ids[4 * static_cast<size_t>(i)], &id, 4);
    }
    auto d = SafetensorsWriter::Create(**data, "tokens.safetensors",
                                       {{"input_ids", DType::kI32, {4, 8}}});
    ASSERT_TRUE(d.ok());
    ASSERT_TRUE((*d)->WriteTensorData("input_ids", ids).ok());
    ASSERT_TRUE((*d)->Finish().ok());
    data_sha256_ = Sha256Hex(*(*data)->ReadAll("tokens.safetensors"));
  }

  v1::Task CalibrateTask(const std::string& id, int64_t begin, int64_t end) {
    v1::Task t;
    t.set_id(id);
    t.set_job_id("job-1");
    t.set_kind(v1::TASK_KIND_CALIBRATE);
    t.set_lease_token("lease-1");
    v1::JobSpec* spec = t.mutable_spec();
    spec->set_model_uri(root_ + "/cmodel");
    spec->set_output_uri(out_uri_);
    spec->mutable_gptq()->set_bits(4);
    spec->mutable_calibration()->set_dataset_uri(root_ + "/data/tokens.safetensors");
    v1::CalibrationWork* w = t.mutable_calibration();
    w->set_model_uri(root_ + "/cmodel");
    w->set_dataset_uri(root_ + "/data/tokens.safetensors");
    w->set_dataset_sha256(data_sha256_);
    w->set_samples(4);
    w->set_seq_len(8);
    w->set_sample_begin(begin);
    w->set_sample_end(end);
    t.set_staging_uri(out_uri_);
    t.set_staging_key(".qforge-staging/job-1/" + id + "/0/" + kCalibrationPartialName);
    return t;
  }

  quant::DecoderConfig decoder_;
  std::string data_sha256_;
};

TEST_F(CalibrationExecutorTest, ShardsAndTheirReduceAreStagedWithChecksumsAndTokens) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  auto out = OpenObjectStore(out_uri_);
  ASSERT_TRUE(out.ok());
  std::vector<std::string> partials;
  for (const auto& [id, range] : std::vector<std::pair<std::string, std::pair<int, int>>>{
           {"c-0", {0, 3}}, {"c-1", {3, 4}}}) {
    TaskControl control;
    const v1::Task task = CalibrateTask(id, range.first, range.second);
    auto r = executor.Execute(task, &control);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->output_key, task.staging_key());
    auto bytes = (*out)->ReadAll(task.staging_key());
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ(r->output_bytes, bytes->size());
    EXPECT_EQ(r->output_sha256, Sha256Hex(*bytes));
    EXPECT_EQ(r->metrics.tokens(), (range.second - range.first) * 8);
    EXPECT_EQ(r->metrics.backend(), "cpu");
    EXPECT_GT(r->metrics.bytes_read(), 0u);
    EXPECT_EQ(r->metrics.bytes_written(), bytes->size());
    EXPECT_EQ(control.Snapshot(), (std::pair<std::string, double>{"done", 1.0}));
    partials.push_back(task.staging_key());
  }

  // REDUCE: the partials (staging store) into the cache entry.
  v1::Task reduce;
  reduce.set_id("reduce");
  reduce.set_job_id("job-1");
  reduce.set_kind(v1::TASK_KIND_REDUCE);
  reduce.set_lease_token("lease-2");
  *reduce.mutable_spec() = CalibrateTask("x", 0, 1).spec();
  v1::CalibrationWork* w = reduce.mutable_calibration();
  for (const std::string& k : partials) w->add_partial_keys(k);
  w->set_hessians_uri(root_ + "/cache");
  w->set_hessians_key("0123abcd/hessians.safetensors");
  reduce.set_staging_uri(out_uri_);
  reduce.set_staging_key(w->hessians_key());
  auto r = executor.Execute(reduce, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->metrics.tokens(), 32);
  auto cache = OpenObjectStore(root_ + "/cache");
  ASSERT_TRUE(cache.ok());
  auto bytes = (*cache)->ReadAll(w->hessians_key());
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(r->output_sha256, Sha256Hex(*bytes));
  EXPECT_EQ(r->output_bytes, bytes->size());
  EXPECT_TRUE(VerifyHessianCacheEntry(**cache, w->hessians_key(), decoder_, true).ok());
  // A QUANTIZE task reads it like any Hessian file (every tensor's sha256 verified).
  auto file = HessianFile::Open(**cache, w->hessians_key());
  ASSERT_TRUE(file.ok()) << file.status();
  auto h = file->Read(**cache, "model.layers.1.mlp.up_proj", 32);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_GT((*h)[0], 0.0f);

  // The staging key must be the entry's key.
  reduce.set_staging_key("elsewhere.safetensors");
  r = executor.Execute(reduce, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(ToErrorInfo(r.status()).reason(), "BAD_TASK");
}

TEST_F(CalibrationExecutorTest, ChangedDataOrABadRangeFailsWithoutStaging) {
  TaskExecutor executor(quant::NewCpuLayerQuantizers(), Options());
  v1::Task task = CalibrateTask("c-0", 0, 2);
  task.mutable_calibration()->set_dataset_sha256(std::string(64, '0'));
  auto r = executor.Execute(task, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_FALSE(IsRetryableError(r.status().code()));
  EXPECT_EQ(ToErrorInfo(r.status()).reason(), "CALIBRATION_DATA_CHANGED");
  EXPECT_NE(r.status().message().find("the calibration data changed since the job was submitted"),
            std::string::npos)
      << r.status();
  EXPECT_NE(r.status().message().find("c-0"), std::string::npos) << r.status();

  task = CalibrateTask("c-1", 2, 9);
  r = executor.Execute(task, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(ToErrorInfo(r.status()).reason(), "BAD_TASK") << r.status();
  EXPECT_NE(r.status().message().find("beyond the data's 4 samples"), std::string::npos)
      << r.status();

  // Cancelled before it starts: CANCELLED, nothing staged.
  TaskControl control;
  control.Cancel();
  r = executor.Execute(CalibrateTask("c-2", 0, 2), &control);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled) << r.status();
  EXPECT_TRUE(FilesUnder(out_uri_).empty());
}

}  // namespace
}  // namespace qforge

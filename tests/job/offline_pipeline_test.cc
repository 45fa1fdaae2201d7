// The offline pipeline end to end on a small model in a real directory: planner → layer
// runner (ranged reads, solver, packing, staging) → assembler (HF GPTQ directory, manifest).
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/forwarding_store.h"
#include "common/hessian_file.h"
#include "common/object_digest.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "common/uri.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "job/assembler.h"
#include "job/layer_selection.h"
#include "job/layer_runner.h"
#include "base/float16.h"
#include "quant/gptq.h"
#include "quant/gptq_pack.h"
#include "quant/layer_quantizer.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"
#include "quant/vptq_pack.h"

namespace qforge {
namespace {

std::string F16Bytes(const std::vector<float>& v) {
  std::string out(v.size() * 2, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h = qforge::FloatToHalf(v[i]);
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

template <typename T>
std::vector<T> AsVector(const std::string& bytes) {
  std::vector<T> v(bytes.size() / sizeof(T));
  std::memcpy(v.data(), bytes.data(), v.size() * sizeof(T));
  return v;
}

class OfflinePipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qforge-pipeline-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    auto m = OpenObjectStore(root_ + "/model");
    ASSERT_TRUE(m.ok()) << m.status();
    model_store_ = std::move(*m);
    auto o = OpenObjectStore(root_ + "/out");
    ASSERT_TRUE(o.ok()) << o.status();
    out_store_ = std::move(*o);
    WriteModel();
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  // Two decoder layers with q/k (in 64) and down (in 96) projections, plus norms and
  // embeddings that must be copied unchanged; sharded in two files.
  void WriteModel() {
    quant::Rng rng(7);
    struct T {
      std::string name;
      std::vector<int64_t> shape;
    };
    std::vector<T> ts = {{"model.embed_tokens.weight", {32, 64}}};
    for (int i = 0; i < 2; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      ts.push_back({p + "input_layernorm.weight", {64}});
      ts.push_back({p + "self_attn.q_proj.weight", {64, 64}});
      ts.push_back({p + "self_attn.k_proj.weight", {32, 64}});
      ts.push_back({p + "mlp.down_proj.weight", {64, 96}});
    }
    ts.push_back({"lm_head.weight", {32, 64}});
    std::vector<TensorSpec> specs;
    for (const T& t : ts) specs.push_back({t.name, DType::kF16, t.shape});
    auto w = ShardedSafetensorsWriter::Create(*model_store_, "", specs, 20000);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const T& t : ts) {
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = 0.05f * static_cast<float>(rng.StudentT(4.0));
      source_[t.name] = F16Bytes(v);
      ASSERT_TRUE((*w)->WriteTensorData(t.name, source_[t.name]).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    ASSERT_GT((*w)->shard_keys().size(), 1u);
    ASSERT_TRUE(model_store_->Put("config.json", R"({"model_type": "llama", "hidden_size": 64})").ok());
    ASSERT_TRUE(model_store_->Put("tokenizer_config.json", R"({"bos_token": "<s>"})").ok());

    // Hessians: q_proj's shared by k_proj through an alias.
    for (int i = 0; i < 2; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      hs_.push_back(quant::MakeSyntheticLayer(8, 64, 256, 11 + i).hessian);
      hs_.push_back(quant::MakeSyntheticLayer(8, 96, 256, 21 + i).hessian);
      entries_.push_back({p + "self_attn.q_proj", nullptr, 64});
      entries_.push_back({p + "mlp.down_proj", nullptr, 96});
      aliases_[p + "self_attn.k_proj"] = p + "self_attn.q_proj";
    }
    for (size_t i = 0; i < entries_.size(); ++i) entries_[i].data = hs_[i].data.data();
    ASSERT_TRUE(WriteHessianFile(*model_store_, "hessians.safetensors", entries_, aliases_, 256).ok());
  }

  std::string root_;
  std::unique_ptr<ObjectStore> model_store_, out_store_;
  std::map<std::string, std::string> source_;
  std::vector<qforge::Matrix> hs_;
  std::vector<HessianEntry> entries_;
  std::map<std::string, std::string> aliases_;
};

TEST_F(OfflinePipelineTest, PlannerSelectsDecoderProjections) {
  auto model = SafetensorsModel::Open(*model_store_, "");
  ASSERT_TRUE(model.ok()) << model.status();
  auto layers = SelectLayers(*model, LayerSelection{});
  ASSERT_TRUE(layers.ok()) << layers.status();
  std::vector<std::string> names;
  for (const auto& l : *layers) names.push_back(l.module);
  EXPECT_EQ(names, (std::vector<std::string>{
                       "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.k_proj",
                       "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                       "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"}));
  EXPECT_EQ((*layers)[0].in_features, 96);
  EXPECT_EQ((*layers)[0].out_features, 64);

  LayerSelection only_attn;
  only_attn.exclude = {R"(mlp\.)", R"(layers\.1\.)"};
  layers = SelectLayers(*model, only_attn);
  ASSERT_TRUE(layers.ok());
  EXPECT_EQ(layers->size(), 2u);

  LayerSelection bad;
  bad.include = {"(unclosed"};
  auto s = SelectLayers(*model, bad).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("(unclosed"), std::string::npos) << s;

  LayerSelection norms;  // 1-D tensors cannot be quantized: the error names the tensor.
  norms.include = {"input_layernorm"};
  s = SelectLayers(*model, norms).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("model.layers.0.input_layernorm.weight"), std::string::npos) << s;

  LayerSelection none;
  none.include = {"nothing-matches"};
  EXPECT_EQ(SelectLayers(*model, none).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(OfflinePipelineTest, HessianFileAliasesAndErrors) {
  auto hf = HessianFile::Open(*model_store_, "hessians.safetensors");
  ASSERT_TRUE(hf.ok()) << hf.status();
  EXPECT_EQ(hf->n_samples(), 256);
  EXPECT_EQ(hf->num_modules(), 6u);
  auto k = hf->Read(*model_store_, "model.layers.1.self_attn.k_proj", 64);
  ASSERT_TRUE(k.ok()) << k.status();
  EXPECT_EQ(*k, hs_[2].data);  // the alias reads layer 1's q_proj Hessian
  auto missing = hf->Find("model.layers.0.mlp.up_proj").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("model.layers.0.mlp.up_proj"), std::string::npos);
  auto wrong = hf->Read(*model_store_, "model.layers.0.mlp.down_proj", 64).status();
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.message().find("in_features = 64"), std::string::npos) << wrong;

  // An alias to a tensor that is not in the file is refused at open.
  std::map<std::string, std::string> bad_alias = {{"a", "missing"}};
  ASSERT_TRUE(WriteHessianFile(*model_store_, "bad.safetensors", {entries_[0]}, bad_alias, -1).ok());
  auto s = HessianFile::Open(*model_store_, "bad.safetensors").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'missing'"), std::string::npos) << s;
}

TEST_F(OfflinePipelineTest, QuantizesAndAssemblesAHfGptqDirectory) {
  auto model = SafetensorsModel::Open(*model_store_, "");
  ASSERT_TRUE(model.ok()) << model.status();
  auto hf = HessianFile::Open(*model_store_, "hessians.safetensors");
  ASSERT_TRUE(hf.ok());
  auto layers = SelectLayers(*model, LayerSelection{});
  ASSERT_TRUE(layers.ok());
  auto solver = quant::NewCpuGptqSolver();
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  quant::GptqOptions options;
  options.bits = 4;
  options.group_size = 32;
  options.act_order = true;
  std::vector<StagedLayer> staged;
  std::map<std::string, quant::GptqResult> direct;  // the solver called directly, for parity
  for (const PlannedLayer& l : *layers) {
    LayerJob job;
    job.module = l.module;
    job.model_store = model_store_.get();
    job.weight = *LocateTensor(*model, l.weight);
    job.hessian_store = model_store_.get();
    job.hessians = &*hf;
    job.options = quant::GptqLayerOptions{options};
    job.out_store = out_store_.get();
    job.staged_key = ".qforge-staging/job/" + l.module + "/0/layer.safetensors";
    auto outcome = RunLayer(job, *quantizers.Find("gptq"));
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    EXPECT_GT(outcome->weight_energy, 0);
    EXPECT_GT(outcome->relative_error, 0);
    EXPECT_LT(outcome->relative_error, 0.05) << l.module;
    staged.push_back({l.module, job.staged_key, {{"attempt", 0}}});

    qforge::Matrix w(l.out_features, l.in_features);
    auto wf = model->ReadF32(*model_store_, l.weight);
    ASSERT_TRUE(wf.ok());
    w.data = *wf;
    qforge::Matrix h(l.in_features, l.in_features);
    h.data = *hf->Read(*model_store_, l.module, l.in_features);
    auto r = solver->Quantize(w, h, options);
    ASSERT_TRUE(r.ok());
    direct[l.module] = *r;
  }

  AssembleRequest req;
  req.model_store = model_store_.get();
  req.model = &*model;
  req.model_uri = root_ + "/model";
  req.staging_store = out_store_.get();
  req.layers = staged;
  req.output_store = out_store_.get();
  req.config.bits = 4;
  req.config.group_size = 32;
  req.config.desc_act = true;
  req.qforge_version = "test";
  req.max_shard_bytes = 8000;  // several output shards
  auto assembled = AssembleArtifact(req);
  ASSERT_TRUE(assembled.ok()) << assembled.status();
  EXPECT_EQ(assembled->tensors_quantized, 6);
  EXPECT_EQ(assembled->tensors_copied, 4);  // embeddings, 2 norms, lm_head
  EXPECT_EQ(assembled->files_written.back(), kManifestName);

  // config.json keeps the source fields and gains quantization_config.
  auto config = nlohmann::json::parse(*out_store_->ReadAll("config.json"));
  EXPECT_EQ(config["model_type"], "llama");
  EXPECT_EQ(config["quantization_config"]["quant_method"], "gptq");
  EXPECT_EQ(config["quantization_config"]["bits"], 4);
  EXPECT_EQ(config["quantization_config"]["desc_act"], true);
  EXPECT_EQ(config["quantization_config"]["checkpoint_format"], "gptq");
  auto qconfig = nlohmann::json::parse(*out_store_->ReadAll("quantize_config.json"));
  EXPECT_EQ(qconfig, config["quantization_config"]);
  EXPECT_TRUE(out_store_->Stat("tokenizer_config.json").ok());
  EXPECT_FALSE(out_store_->Stat("hessians.safetensors").ok());

  auto out_model = SafetensorsModel::Open(*out_store_, "");
  ASSERT_TRUE(out_model.ok()) << out_model.status();
  EXPECT_GT(out_model->shard_keys().size(), 1u);
  for (const auto& [name, bytes] : source_) {
    const bool quantized = name.find("_proj.weight") != std::string::npos;
    auto loc = out_model->Find(name);
    EXPECT_EQ(loc.ok(), !quantized) << name;
    if (quantized) continue;
    auto copied = ReadTensorBytes(*out_store_, loc->key, *loc->header, *loc->info);
    ASSERT_TRUE(copied.ok());
    EXPECT_EQ(*copied, bytes) << name << " must be copied byte for byte";
  }
  // Each quantized layer dequantizes from the HF tensors exactly as the solver's result does.
  for (const auto& [module, r] : direct) {
    quant::GptqPackedLayer packed;
    packed.bits = 4;
    packed.out_features = r.out_features;
    packed.in_features = r.in_features;
    packed.num_groups = r.num_groups;
    auto read = [&](const char* suffix) {
      auto loc = out_model->Find(module + "." + suffix);
      EXPECT_TRUE(loc.ok()) << module << "." << suffix;
      return *ReadTensorBytes(*out_store_, loc->key, *loc->header, *loc->info);
    };
    packed.qweight = AsVector<int32_t>(read("qweight"));
    packed.qzeros = AsVector<int32_t>(read("qzeros"));
    packed.scales = AsVector<uint16_t>(read("scales"));
    packed.g_idx = AsVector<int32_t>(read("g_idx"));
    EXPECT_EQ(packed.g_idx, r.g_idx);
    auto deq = quant::DequantizeGptqPacked(packed);
    ASSERT_TRUE(deq.ok()) << deq.status().ToString();
    const qforge::Matrix expect = quant::DequantizeGptqF16Scales(r);
    ASSERT_EQ(deq->size(), expect.data.size());
    for (size_t i = 0; i < deq->size(); ++i) {
      ASSERT_FLOAT_EQ((*deq)[i], expect.data[i]) << module << " element " << i;
    }
  }

  // The manifest names every tensor with its file and checksum, and every layer's figures.
  auto manifest = nlohmann::json::parse(*out_store_->ReadAll(kManifestName));
  EXPECT_EQ(manifest["tensors"].size(), 6u * 4 + 4);
  for (auto& [name, t] : manifest["tensors"].items()) {
    EXPECT_EQ(t["sha256"].get<std::string>().size(), 64u) << name;
    EXPECT_TRUE(out_model->Find(name).ok()) << name;
  }
  ASSERT_EQ(manifest["layers"].size(), 6u);
  const auto& l0 = manifest["layers"]["model.layers.0.mlp.down_proj"];
  EXPECT_NEAR(l0["relative_error_f32"].get<double>(),
              direct["model.layers.0.mlp.down_proj"].output_error /
                  direct["model.layers.0.mlp.down_proj"].weight_energy,
              1e-9);
  EXPECT_EQ(l0["attempt"], 0);
  EXPECT_EQ(manifest["source"]["shards"].size(), model->shard_keys().size());
}

TEST_F(OfflinePipelineTest, MissingHessianAndCorruptShardNameTheCulprit) {
  auto model = SafetensorsModel::Open(*model_store_, "");
  ASSERT_TRUE(model.ok());
  auto hf = HessianFile::Open(*model_store_, "hessians.safetensors");
  ASSERT_TRUE(hf.ok());
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  quant::LayerQuantizer& gptq = *quantizers.Find("gptq");
  LayerJob job;
  job.options = quant::GptqLayerOptions{};
  job.model_store = model_store_.get();
  // A tensor the model lacks: NOT_FOUND naming it.
  auto missing = LocateTensor(*model, "model.layers.0.mlp.gate_proj.weight").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("model.layers.0.mlp.gate_proj.weight"), std::string::npos)
      << missing;
  job.module = "model.layers.0.mlp.down_proj";
  job.weight = *LocateTensor(*model, "model.layers.0.mlp.down_proj.weight");
  job.hessian_store = model_store_.get();
  job.hessians = &*hf;
  job.out_store = out_store_.get();
  job.staged_key = "staged.safetensors";
  job.module = "model.layers.0.mlp.up_proj";  // no Hessian for it: NOT_FOUND naming the module
  auto s = RunLayer(job, gptq).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("model.layers.0.mlp.up_proj"), std::string::npos) << s;

  // Identity Hessian (no calibration) works without a Hessian file.
  job.module = "model.layers.0.self_attn.q_proj";
  job.weight = *LocateTensor(*model, "model.layers.0.self_attn.q_proj.weight");
  job.hessian_store = nullptr;
  job.hessians = nullptr;
  std::get<quant::GptqLayerOptions>(job.options).solver.group_size = 32;
  auto ok = RunLayer(job, gptq);
  ASSERT_TRUE(ok.ok()) << ok.status();

  // Truncate the shard holding layer 1's down_proj: opening the model or reading the layer
  // fails with an error naming the file, never a crash.
  auto loc = model->Find("model.layers.1.mlp.down_proj.weight");
  ASSERT_TRUE(loc.ok());
  std::filesystem::resize_file(root_ + "/model/" + loc->key,
                               loc->header->data_offset() + loc->info->data_begin + 10);
  auto reopened = SafetensorsModel::Open(*model_store_, "");
  absl::Status err = reopened.status();
  if (reopened.ok()) {
    job.module = "model.layers.1.mlp.down_proj";
    job.weight = *LocateTensor(*reopened, "model.layers.1.mlp.down_proj.weight");
    err = RunLayer(job, gptq).status();
  }
  ASSERT_FALSE(err.ok());
  EXPECT_NE(err.message().find(loc->key), std::string::npos) << err;
}

TEST_F(OfflinePipelineTest, VptqLayersAssembleIntoAVptqDirectory) {
  auto model = SafetensorsModel::Open(*model_store_, "");
  ASSERT_TRUE(model.ok()) << model.status();
  auto hf = HessianFile::Open(*model_store_, "hessians.safetensors");
  ASSERT_TRUE(hf.ok());
  LayerSelection attn;
  attn.include = {R"(self_attn\.q_proj\.weight$)"};
  auto layers = SelectLayers(*model, attn);
  ASSERT_TRUE(layers.ok());
  ASSERT_EQ(layers->size(), 2u);
  auto solver = quant::NewCpuVptqSolver();
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  quant::VptqOptions options;
  options.vector_len = 4;
  options.num_centroids = 256;  // 8 index bits (the vptq kernels take 4, 8, 10, 12..16)
  options.num_res_centroids = 4;
  options.kmeans_iterations = 20;
  std::vector<StagedLayer> staged;
  std::map<std::string, quant::VptqResult> direct;
  for (const PlannedLayer& l : *layers) {
    LayerJob job;
    job.module = l.module;
    job.model_store = model_store_.get();
    job.weight = *LocateTensor(*model, l.weight);
    job.hessian_store = model_store_.get();
    job.hessians = &*hf;
    job.options = quant::VptqLayerOptions{options};
    job.out_store = out_store_.get();
    job.staged_key = ".qforge-staging/vq/" + l.module + "/0/layer.safetensors";
    auto outcome = RunLayer(job, *quantizers.Find("vptq"));
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    EXPECT_GT(outcome->bits_per_weight, 0);
    staged.push_back({l.module, job.staged_key, {}});

    // The same layer solved directly, with the model dtype's rounding the runner applies.
    qforge::Matrix w(l.out_features, l.in_features);
    w.data = *model->ReadF32(*model_store_, l.weight);
    qforge::Matrix h(l.in_features, l.in_features);
    h.data = *hf->Read(*model_store_, l.module, l.in_features);
    quant::VptqOptions o = options;
    o.param_dtype = quant::VptqParamDtype::kFloat16;  // the test model is F16
    auto r = solver->Quantize(w, h, o);
    ASSERT_TRUE(r.ok());
    EXPECT_NEAR(outcome->relative_error_f32, r->output_error / r->weight_energy, 1e-12);
    direct[l.module] = *std::move(r);
  }
  AssembleRequest req;
  req.method = ArtifactMethod::kVptq;
  req.model_store = model_store_.get();
  req.model = &*model;
  req.staging_store = out_store_.get();
  req.layers = staged;
  req.output_store = out_store_.get();
  auto assembled = AssembleArtifact(req);
  ASSERT_TRUE(assembled.ok()) << assembled.status();
  EXPECT_FALSE(out_store_->Stat("quantize_config.json").ok());

  auto config = nlohmann::json::parse(*out_store_->ReadAll("config.json"));
  const auto& q = config["quantization_config"];
  EXPECT_EQ(q["quant_method"], "vptq");
  ASSERT_EQ(q["config_for_layers"].size(), 2u);
  for (const auto& [module, r] : direct) {
    const auto& c = q["config_for_layers"][module];
    EXPECT_EQ(c["vector_lens"], nlohmann::json({-1, 4}));
    EXPECT_EQ(c["num_centroids"], nlohmann::json({-1, 256}));
    EXPECT_EQ(c["num_res_centroids"], nlohmann::json({-1, 4}));
    EXPECT_EQ(c["in_features"], 64);
    EXPECT_EQ(c["is_indice_packed"], true);
    EXPECT_FALSE(c.contains("enable_proxy_error"));
    EXPECT_FALSE(c.contains("norm_dim"));

    // Decoding the assembled tensors with the published formula gives the solver's weights.
    auto out_model = SafetensorsModel::Open(*out_store_, "");
    ASSERT_TRUE(out_model.ok());
    EXPECT_FALSE(out_model->Find(module + ".weight").ok());
    quant::VptqLayerTensors t;
    t.config = quant::VptqConfigFromResult(r, false);
    for (const std::string& name : out_model->TensorNames()) {
      if (name.rfind(module + ".", 0) != 0) continue;
      auto loc = out_model->Find(name);
      std::string bytes = *ReadTensorBytes(*out_store_, loc->key, *loc->header, *loc->info);
      t.tensors.push_back({name.substr(module.size() + 1), DTypeName(loc->info->dtype),
                           loc->info->shape, std::vector<uint8_t>(bytes.begin(), bytes.end())});
    }
    ASSERT_NE(t.Find("indices"), nullptr);
    ASSERT_NE(t.Find("res_centroids.weight"), nullptr);
    auto decoded = quant::DequantizeVptqLayer(t);
    ASSERT_TRUE(decoded.ok()) << decoded.status().ToString();
    ASSERT_EQ(decoded->data.size(), r.dequantized.data.size());
    for (size_t i = 0; i < decoded->data.size(); ++i) {
      ASSERT_EQ(decoded->data[i], r.dequantized.data[i]) << module << " element " << i;
    }
  }
  auto manifest = nlohmann::json::parse(*out_store_->ReadAll(kManifestName));
  EXPECT_EQ(manifest["format"], "vptq");
  EXPECT_EQ(manifest["layers"].size(), 2u);
}

// Records where every byte is written and what is renamed, and checks at the manifest's
// rename that every other file of the artifact is already in place.
class PublishRecorder : public ForwardingStore {
 public:
  using ForwardingStore::ForwardingStore;
  absl::Status Put(std::string_view key, std::string_view data) override {
    writes.emplace_back(key);
    return ForwardingStore::Put(key, data);
  }
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    writes.emplace_back(key);
    return ForwardingStore::NewWriter(key);
  }
  absl::Status Rename(std::string_view from, std::string_view to) override {
    if (to == kManifestName) {
      for (const std::string& r : renamed) {
        if (!target()->Stat(r).ok()) missing_at_manifest.push_back(r);
      }
    } else if (target()->Stat(kManifestName).ok()) {
      manifest_before_files = true;
    }
    renamed.emplace_back(to);
    return ForwardingStore::Rename(from, to);
  }
  std::vector<std::string> writes, renamed, missing_at_manifest;
  bool manifest_before_files = false;
};

TEST_F(OfflinePipelineTest, StagedLayersAreVerifiedAndTheArtifactPublishedByRename) {
  auto model = SafetensorsModel::Open(*model_store_, "");
  ASSERT_TRUE(model.ok()) << model.status();
  auto hf = HessianFile::Open(*model_store_, "hessians.safetensors");
  ASSERT_TRUE(hf.ok());
  auto layers = SelectLayers(*model, LayerSelection{});
  ASSERT_TRUE(layers.ok());
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  quant::GptqOptions options;
  options.bits = 4;
  options.group_size = 32;
  std::vector<StagedLayer> staged;
  for (const PlannedLayer& l : *layers) {
    LayerJob job;
    job.module = l.module;
    job.model_store = model_store_.get();
    job.weight = *LocateTensor(*model, l.weight);
    job.hessian_store = model_store_.get();
    job.hessians = &*hf;
    job.options = quant::GptqLayerOptions{options};
    job.out_store = out_store_.get();
    job.staged_key = ".qforge-staging/job/" + l.module + "/0/layer.safetensors";
    ASSERT_TRUE(RunLayer(job, *quantizers.Find("gptq")).ok());
    // What the worker reports with CompleteTask.
    auto digest = DigestObject(*out_store_, job.staged_key);
    ASSERT_TRUE(digest.ok()) << digest.status();
    StagedLayer layer{l.module, job.staged_key, {{"attempt", 0}}};
    layer.staged_sha256 = digest->sha256;
    layer.staged_bytes = digest->size;
    staged.push_back(layer);
  }
  ASSERT_GE(staged.size(), 2u);

  PublishRecorder recorder(out_store_.get());
  AssembleRequest req;
  req.model_store = model_store_.get();
  req.model = &*model;
  req.model_uri = root_ + "/model";
  req.staging_store = out_store_.get();
  req.layers = staged;
  req.output_store = &recorder;
  req.temp_dir = ".qforge-staging/job/assembly";
  req.qforge_version = "test";
  req.max_shard_bytes = 8000;  // several output shards
  req.copy_chunk_bytes = 1000;
  const auto final_files = [&] {
    std::set<std::string> out;
    const std::vector<ObjectInfo> all = *out_store_->List("");
    for (const ObjectInfo& o : all) {
      if (o.key.rfind(".qforge-staging/", 0) != 0) out.insert(o.key);
    }
    return out;
  };

  // 1. One byte of a staged layer flipped after its task completed: nothing is assembled,
  // and the layer is named so the caller can recompute it.
  const std::string victim = staged[1].staged_key;
  const std::string original = *out_store_->ReadAll(victim);
  std::string flipped = original;
  flipped[flipped.size() - 3] ^= 0x10;  // in the tensor data (g_idx is last)
  ASSERT_TRUE(out_store_->Put(victim, flipped).ok());
  std::vector<std::string> corrupt;
  auto bad = AssembleArtifact(req, &corrupt);
  EXPECT_TRUE(absl::IsDataLoss(bad.status())) << bad.status();
  EXPECT_NE(bad.status().message().find(staged[1].module), absl::string_view::npos);
  EXPECT_EQ(corrupt, std::vector<std::string>{staged[1].module});
  EXPECT_TRUE(recorder.writes.empty());
  EXPECT_TRUE(final_files().empty());
  // A staged object that is gone, or truncated, is named the same way.
  ASSERT_TRUE(out_store_->Put(victim, original.substr(0, 100)).ok());
  corrupt.clear();
  std::vector<StagedLayer> moved = staged;
  moved[0].staged_key = ".qforge-staging/job/nowhere/layer.safetensors";
  req.layers = moved;
  bad = AssembleArtifact(req, &corrupt);
  EXPECT_TRUE(absl::IsDataLoss(bad.status())) << bad.status();
  EXPECT_EQ(corrupt, (std::vector<std::string>{staged[0].module, staged[1].module}));
  req.layers = staged;

  // 2. Restored: assembled under the temp prefix, then published file by file, manifest last.
  ASSERT_TRUE(out_store_->Put(victim, original).ok());
  corrupt.clear();
  auto assembled = AssembleArtifact(req, &corrupt);
  ASSERT_TRUE(assembled.ok()) << assembled.status();
  EXPECT_TRUE(corrupt.empty());
  for (const std::string& w : recorder.writes) {
    EXPECT_EQ(w.rfind(".qforge-staging/job/assembly/", 0), 0u) << w << " was written in place";
  }
  ASSERT_FALSE(recorder.renamed.empty());
  EXPECT_EQ(recorder.renamed.back(), kManifestName);
  EXPECT_TRUE(recorder.missing_at_manifest.empty());
  EXPECT_FALSE(recorder.manifest_before_files);
  EXPECT_EQ(recorder.renamed, assembled->files_written);
  EXPECT_EQ(final_files(),
            std::set<std::string>(assembled->files_written.begin(), assembled->files_written.end()));
  EXPECT_TRUE(out_store_->List(".qforge-staging/job/assembly/")->empty());
  auto out_model = SafetensorsModel::Open(*out_store_, "");
  ASSERT_TRUE(out_model.ok()) << out_model.status();
  EXPECT_GT(out_model->shard_keys().size(), 1u);

  // The same artifact as one written in place (the manifest aside: it has a timestamp).
  req.output_store = out_store_.get();
  req.temp_dir.clear();
  req.output_dir = "inplace";
  auto inplace = AssembleArtifact(req);
  ASSERT_TRUE(inplace.ok()) << inplace.status();
  ASSERT_EQ(inplace->files_written.size(), assembled->files_written.size());
  for (const std::string& f : assembled->files_written) {
    if (f == kManifestName) continue;
    EXPECT_EQ(*out_store_->ReadAll(f), *out_store_->ReadAll("inplace/" + f)) << f;
  }
  auto m1 = nlohmann::json::parse(*out_store_->ReadAll(kManifestName));
  auto m2 = nlohmann::json::parse(*out_store_->ReadAll(std::string("inplace/") + kManifestName));
  EXPECT_EQ(m1["tensors"], m2["tensors"]);

  // A temp_dir needs a store with rename.
  class NoRename : public ForwardingStore {
   public:
    using ForwardingStore::ForwardingStore;
    bool SupportsRename() const override { return false; }
  } no_rename(out_store_.get());
  req.output_store = &no_rename;
  req.temp_dir = ".qforge-staging/job/assembly";
  req.output_dir.clear();
  EXPECT_TRUE(absl::IsInvalidArgument(AssembleArtifact(req).status()));

  // A store without rename but with server-side copy (as S3): written under the temp prefix,
  // published by copy after a journal, manifest last; a publication cut short removes what
  // it published, and RemoveUnpublished what a killed one left.
  class CopyOnly : public ForwardingStore {
   public:
    using ForwardingStore::ForwardingStore;
    bool SupportsRename() const override { return false; }
    bool SupportsCopy() const override { return true; }
    absl::Status Copy(std::string_view from, std::string_view to) override {
      if (++copies == fail_copy) return absl::UnavailableError("injected: endpoint down");
      auto bytes = target()->ReadAll(from);
      if (!bytes.ok()) return bytes.status();
      copied.emplace_back(to);
      return target()->Put(to, *bytes);
    }
    absl::Status Delete(std::string_view key) override {
      if (deletes_fail) return absl::UnavailableError("injected: endpoint down");
      return ForwardingStore::Delete(key);
    }
    int copies = 0, fail_copy = -1;
    bool deletes_fail = false;
    std::vector<std::string> copied;
  } copy_only(out_store_.get());
  ASSERT_TRUE(out_store_->DeletePrefix(".qforge-staging/job/assembly/").ok());
  for (const std::string& f : assembled->files_written) ASSERT_TRUE(out_store_->Delete(f).ok());
  ASSERT_TRUE(out_store_->DeletePrefix("inplace/").ok());
  ASSERT_TRUE(final_files().empty());
  req.output_store = &copy_only;
  req.publish_journal = ".qforge-staging/job/publish.json";
  req.spec["job_id"] = "job";
  // 1. The third copy fails: the two published files are deleted again.
  copy_only.fail_copy = 3;
  auto cut = AssembleArtifact(req);
  EXPECT_TRUE(absl::IsUnavailable(cut.status())) << cut.status();
  EXPECT_EQ(copy_only.copied.size(), 2u);
  EXPECT_TRUE(final_files().empty());
  // 2. Killed mid-publication (nothing can be deleted): files without the manifest remain,
  // until RemoveUnpublished (a restart, or the failed job's cleanup) removes them per journal.
  copy_only.copies = 0;
  copy_only.deletes_fail = true;
  cut = AssembleArtifact(req);
  EXPECT_FALSE(cut.ok());
  EXPECT_EQ(final_files().size(), 2u);
  copy_only.deletes_fail = false;
  ASSERT_TRUE(RemoveUnpublished(copy_only, req.publish_journal, kManifestName, "job").ok());
  EXPECT_TRUE(final_files().empty());
  EXPECT_EQ(out_store_->Stat(req.publish_journal).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(RemoveUnpublished(copy_only, req.publish_journal, kManifestName, "job").ok())
      << "no journal: nothing to do";
  // 3. Uncut: every file copied into place, the manifest last; nothing written in place.
  copy_only.fail_copy = -1;
  copy_only.copied.clear();
  auto by_copy = AssembleArtifact(req);
  ASSERT_TRUE(by_copy.ok()) << by_copy.status();
  EXPECT_EQ(copy_only.copied, by_copy->files_written);
  EXPECT_EQ(copy_only.copied.back(), kManifestName);
  EXPECT_EQ(final_files(),
            std::set<std::string>(by_copy->files_written.begin(), by_copy->files_written.end()));
  for (const std::string& f : by_copy->files_written) {
    if (f == kManifestName) continue;
    EXPECT_EQ(*out_store_->ReadAll(f), *out_store_->ReadAll(
                                           ".qforge-staging/job/assembly/" + f)) << f;
  }
  // The journal of a finished publication (this job's manifest is there) removes nothing.
  ASSERT_TRUE(RemoveUnpublished(copy_only, req.publish_journal, kManifestName, "job").ok());
  EXPECT_EQ(final_files().size(), by_copy->files_written.size());
}

TEST(UriTest, SplitsObjectUris) {
  auto u = SplitObjectUri("file:///data/h/hessians.safetensors");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->store_uri, "file:///data/h");
  EXPECT_EQ(u->key, "hessians.safetensors");
  u = SplitObjectUri("rel.safetensors");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->store_uri, ".");
  u = SplitObjectUri("/top.safetensors");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->store_uri, "/");
  EXPECT_EQ(SplitObjectUri("").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitObjectUri("file:///data/").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SplitObjectUri("gs://b/k").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge

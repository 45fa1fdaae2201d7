// Calibration on the job floor: config.json parsing (job/decoder_model.h), token data
// (job/calibration_data.h), and the CALIBRATE shard runner, REDUCE and the Hessian cache
// (job/calibration.h), on small generated Llama-family models.
//
// Numeric check: the Hessians of RunCalibrationShard + ReduceHessians against a float64
// pipeline written here (embedding rows in double, then tests/quant/decoder_ref.h's
// float64 decoder layer, layer after layer, H = (2/n)·S), on the values the model files
// hold. Bounds (relative Frobenius, per Hessian, through several float32 layers):
//   kHessianBound   pipeline vs float64 reference;
//   kShardBound     3 shards reduced vs 1 shard (only the float32 rounding of the partials and
//                   the float64 weighting differ).
#include "job/calibration.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/float16.h"
#include "common/hessian_file.h"
#include "common/mem_store.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "gtest/gtest.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "nlohmann/json.hpp"
#include "quant/decoder.h"
#include "tests/job/tiny_model.h"
#include "tests/quant/decoder_ref.h"

namespace qforge {
namespace {

using Json = nlohmann::json;
using quant::DecoderInput;
using quant::testing::RefDecoderLayer;
using quant::testing::RefHessianSums;
using quant::testing::RelFrobenius;
using job_testing::ConfigJson;
using job_testing::Encode;
using job_testing::ExpectedConfig;
using job_testing::MakeModel;
using job_testing::ModelSpec;
using job_testing::Open;
using job_testing::Opened;
using job_testing::RandomIds;
using job_testing::RoundTo;
using job_testing::TinyModel;
using job_testing::WriteTokenFile;

// gmock is not among the test dependencies: a plain substring predicate.
::testing::AssertionResult Contains(std::string_view haystack, std::string_view needle) {
  if (haystack.find(needle) != std::string_view::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "'" << haystack << "' does not contain '" << needle << "'";
}

constexpr double kHessianBound = 5e-6;
constexpr double kShardBound = 1e-6;
constexpr DecoderInput kInputs[] = {DecoderInput::kQkv, DecoderInput::kO, DecoderInput::kGateUp,
                                    DecoderInput::kDown};
constexpr char kField[] = "spec.calibration.dataset_uri";

// The float64 pipeline: embedding rows, every layer of decoder_ref.h, H = (2/n)·S per input
// ([layer · 4 + input]).
std::vector<std::vector<double>> ReferenceHessians(const TinyModel& m, const CalibrationData& d) {
  const quant::DecoderConfig& c = m.config;
  const int64_t H = c.hidden_size, T = d.samples * d.seq_len;
  std::vector<double> x(static_cast<size_t>(T * H));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < H; ++i) x[t * H + i] = m.embed[d.ids[t] * H + i];
  }
  std::vector<std::vector<double>> out;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    RefHessianSums sums;
    sums.Reset(c);
    RefDecoderLayer(c, m.layers[l], d.samples, d.seq_len, d.mask.empty() ? nullptr : d.mask.data(),
                    x, &sums);
    EXPECT_EQ(sums.tokens, d.tokens);
    for (int i = 0; i < quant::kNumDecoderInputs; ++i) {
      std::vector<double> h = sums.sums[i];
      for (double& v : h) v *= 2.0 / static_cast<double>(sums.tokens);
      out.push_back(std::move(h));
    }
  }
  return out;
}

struct ShardRun {
  uint64_t spill_above = kDefaultSpillAboveBytes;
  std::string spill_dir;
  std::function<bool(double)> progress;
};

// Runs the shards [ranges] into `out` under `prefix` and returns the partial keys.
std::vector<std::string> RunShards(TinyModel& m, const Opened& o, const CalibrationData& d,
                                   ObjectStore& out, const std::string& prefix,
                                   const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                   const ShardRun& run = {}) {
  std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
  std::vector<std::string> keys;
  for (size_t s = 0; s < ranges.size(); ++s) {
    CalibrationShardJob job;
    job.model_store = m.store.get();
    job.model = &o.model;
    job.model_config = &o.config;
    job.data = &d;
    job.sample_begin = ranges[s].first;
    job.sample_end = ranges[s].second;
    job.forward = forward.get();
    job.progress = run.progress;
    job.out_store = &out;
    job.staged_key = prefix + "/shard-" + std::to_string(s) + "/" + kCalibrationPartialName;
    job.spill_dir = run.spill_dir;
    job.spill_above_bytes = run.spill_above;
    auto outcome = RunCalibrationShard(job);
    EXPECT_TRUE(outcome.ok()) << outcome.status();
    if (!outcome.ok()) return {};
    EXPECT_EQ(outcome->samples, ranges[s].second - ranges[s].first);
    EXPECT_EQ(outcome->layers, m.config.num_hidden_layers);
    EXPECT_EQ(outcome->spilled, run.spill_above == 0);
    keys.push_back(job.staged_key);
  }
  return keys;
}

absl::StatusOr<ReduceOutcome> Reduce(ObjectStore& store, const std::vector<std::string>& keys,
                                     const std::string& out_key) {
  ReduceJob job;
  job.in_store = &store;
  job.partial_keys = keys;
  job.out_store = &store;
  job.out_key = out_key;
  return ReduceHessians(job);
}

CalibrationData LoadData(ObjectStore& store, const std::string& key, const quant::DecoderConfig& c,
                         int64_t samples = 0, int64_t seq_len = 0) {
  CalibrationDataOptions opt;
  opt.max_samples = samples;
  opt.seq_len = seq_len;
  auto d = LoadCalibrationData(store, key, opt, c, kField);
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *std::move(d) : CalibrationData();
}

// ---------------------------------------------------------------------------------------
// config.json

TEST(DecoderModelConfigTest, ParsesEachArchitecture) {
  ModelSpec llama;
  llama.attention_bias = true;
  llama.mlp_bias = true;
  llama.rope_scaling = {{"rope_type", "llama3"},
                        {"factor", 8.0},
                        {"low_freq_factor", 1.0},
                        {"high_freq_factor", 4.0},
                        {"original_max_position_embeddings", 64}};
  ModelSpec mistral;
  mistral.arch = "MistralForCausalLM";
  mistral.attention_bias = true;  // Mistral's modeling has no biases whatever the config says
  ModelSpec qwen2;
  qwen2.arch = "Qwen2ForCausalLM";
  ModelSpec qwen3;
  qwen3.arch = "Qwen3ForCausalLM";
  qwen3.head_dim = 16;  // ≠ hidden / heads
  qwen3.tie = true;
  for (const ModelSpec& s : {llama, mistral, qwen2, qwen3}) {
    SCOPED_TRACE(s.arch);
    auto parsed = ParseDecoderModelConfig(ConfigJson(s).dump(), "config.json");
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    const quant::DecoderConfig e = ExpectedConfig(s), &c = parsed->decoder;
    EXPECT_EQ(parsed->architecture, s.arch);
    EXPECT_EQ(parsed->sliding_window, 0);
    EXPECT_EQ(c.hidden_size, e.hidden_size);
    EXPECT_EQ(c.num_attention_heads, e.num_attention_heads);
    EXPECT_EQ(c.num_key_value_heads, e.num_key_value_heads);
    EXPECT_EQ(c.head_dim, e.head_dim);
    EXPECT_EQ(c.intermediate_size, e.intermediate_size);
    EXPECT_EQ(c.num_hidden_layers, e.num_hidden_layers);
    EXPECT_EQ(c.vocab_size, e.vocab_size);
    EXPECT_EQ(c.max_position_embeddings, e.max_position_embeddings);
    EXPECT_EQ(c.rms_norm_eps, e.rms_norm_eps);
    EXPECT_EQ(c.rope_theta, e.rope_theta);
    EXPECT_EQ(c.has_llama3_rope_scaling, e.has_llama3_rope_scaling);
    EXPECT_EQ(c.llama3_rope_scaling.factor, e.llama3_rope_scaling.factor);
    EXPECT_EQ(c.llama3_rope_scaling.original_max_position_embeddings,
              e.llama3_rope_scaling.original_max_position_embeddings);
    EXPECT_EQ(c.attention_bias, e.attention_bias);
    EXPECT_EQ(c.o_proj_bias, e.o_proj_bias);
    EXPECT_EQ(c.mlp_bias, e.mlp_bias);
    EXPECT_EQ(c.qk_norm, e.qk_norm);
    EXPECT_EQ(c.tie_word_embeddings, e.tie_word_embeddings);
  }
}

TEST(DecoderModelConfigTest, DefaultsAndModelTypeFallback) {
  // No architectures: model_type; no num_key_value_heads (MHA), head_dim, rope_theta,
  // rms_norm_eps, hidden_act or rope_scaling: the transformers defaults.
  auto c = ParseDecoderModelConfig(
      R"({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 8,
          "intermediate_size": 96, "num_hidden_layers": 3, "vocab_size": 100,
          "max_position_embeddings": 512, "sliding_window": 4096})",
      "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, "MistralForCausalLM");
  EXPECT_EQ(c->sliding_window, 4096);
  EXPECT_EQ(c->decoder.num_key_value_heads, 8);
  EXPECT_EQ(c->decoder.head_dim, 8);
  EXPECT_EQ(c->decoder.rope_theta, 10000.0);
  EXPECT_EQ(c->decoder.rms_norm_eps, 1e-6);
  EXPECT_FALSE(c->decoder.has_llama3_rope_scaling);
  // rope_type "default" is no scaling; Qwen2's sliding_window counts only when used.
  c = ParseDecoderModelConfig(
      R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 8,
          "num_key_value_heads": 2, "intermediate_size": 96, "num_hidden_layers": 3,
          "vocab_size": 100, "max_position_embeddings": 512, "rope_scaling": {"rope_type": "default"},
          "use_sliding_window": false, "sliding_window": 128})",
      "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->decoder.has_llama3_rope_scaling);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_TRUE(c->decoder.attention_bias);
  EXPECT_FALSE(c->decoder.o_proj_bias);
}

TEST(DecoderModelConfigTest, ErrorsNameTheField) {
  Json base = ConfigJson(ModelSpec());
  auto error = [&](const std::function<void(Json&)>& edit) {
    Json j = base;
    edit(j);
    auto c = ParseDecoderModelConfig(j.dump(), "spec.model_uri: config.json");
    EXPECT_FALSE(c.ok());
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string m(c.status().message());
    EXPECT_EQ(m.rfind("spec.model_uri: config.json", 0), 0u) << m;
    return m;
  };
  std::string m = error([](Json& j) { j["architectures"] = {"GPT2LMHeadModel"}; });
  EXPECT_TRUE(Contains(m, "GPT2LMHeadModel"));
  EXPECT_TRUE(Contains(m, SupportedCalibrationArchitectures()));
  for (const char* a :
       {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}) {
    EXPECT_TRUE(Contains(m, a));
  }
  m = error([](Json& j) {
    j.erase("architectures");
    j["model_type"] = "gemma";
  });
  EXPECT_TRUE(Contains(m, "gemma"));
  m = error([](Json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}}; });
  EXPECT_TRUE(Contains(m, "rope_scaling"));
  EXPECT_TRUE(Contains(m, "linear"));
  m = error([](Json& j) { j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}}; });
  EXPECT_TRUE(Contains(m, "yarn"));
  m = error([](Json& j) { j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}}; });
  EXPECT_TRUE(Contains(m, "low_freq_factor"));
  m = error([](Json& j) { j["rope_scaling"] = "llama3"; });
  EXPECT_TRUE(Contains(m, "rope_scaling"));
  m = error([](Json& j) { j["hidden_act"] = "gelu"; });
  EXPECT_TRUE(Contains(m, "hidden_act"));
  EXPECT_TRUE(Contains(m, "gelu"));
  m = error([](Json& j) { j.erase("hidden_size"); });
  EXPECT_TRUE(Contains(m, "hidden_size is missing"));
  m = error([](Json& j) { j["intermediate_size"] = "4096"; });
  EXPECT_TRUE(Contains(m, "intermediate_size"));
  m = error([](Json& j) { j["vocab_size"] = 10.5; });
  EXPECT_TRUE(Contains(m, "vocab_size"));
  m = error([](Json& j) { j["num_key_value_heads"] = 3; });
  EXPECT_TRUE(Contains(m, "num_key_value_heads"));
  m = error([](Json& j) {
    j["hidden_size"] = 50;  // not a multiple of 4 heads, no head_dim
  });
  EXPECT_TRUE(Contains(m, "head_dim"));
  auto bad = ParseDecoderModelConfig("{\"hidden_size\": 4", "cfg.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(bad.status().message()), "malformed JSON"));
  bad = ParseDecoderModelConfig("[1, 2]", "cfg.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  MemStore empty;
  EXPECT_EQ(ReadDecoderModelConfig(empty, "").status().code(), absl::StatusCode::kNotFound);
}

TEST(DecoderModelTest, ModuleInputsAndTensorNames) {
  auto q = DecoderModuleInput("model.layers.12.self_attn.k_proj");
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->layer, 12);
  EXPECT_EQ(q->input, DecoderInput::kQkv);
  EXPECT_EQ(DecoderModuleInput("model.layers.0.self_attn.o_proj")->input, DecoderInput::kO);
  EXPECT_EQ(DecoderModuleInput("model.layers.3.mlp.up_proj")->input, DecoderInput::kGateUp);
  EXPECT_EQ(DecoderModuleInput("model.layers.3.mlp.down_proj")->input, DecoderInput::kDown);
  for (const char* bad : {"lm_head", "model.layers.x.mlp.up_proj", "model.layers.01.mlp.up_proj",
                          "model.layers.1.mlp.up_proj.weight", "model.layers..mlp.up_proj",
                          "model.layers.1.self_attn.q_norm"}) {
    EXPECT_FALSE(DecoderModuleInput(bad).has_value()) << bad;
  }
  EXPECT_EQ(DecoderInputTensorName(2, DecoderInput::kQkv), "model.layers.2.self_attn.q_proj");
  EXPECT_EQ(DecoderInputTensorName(2, DecoderInput::kGateUp), "model.layers.2.mlp.gate_proj");
  EXPECT_EQ(DecoderInputModules(2, DecoderInput::kQkv),
            (std::vector<std::string>{"model.layers.2.self_attn.q_proj",
                                      "model.layers.2.self_attn.k_proj",
                                      "model.layers.2.self_attn.v_proj"}));
  EXPECT_EQ(DecoderInputModules(0, DecoderInput::kDown),
            std::vector<std::string>{"model.layers.0.mlp.down_proj"});
  // Every module maps back to the input whose modules list it.
  for (DecoderInput in : kInputs) {
    for (const std::string& module : DecoderInputModules(5, in)) {
      auto mi = DecoderModuleInput(module);
      ASSERT_TRUE(mi.has_value()) << module;
      EXPECT_EQ(mi->layer, 5);
      EXPECT_EQ(mi->input, in);
    }
  }
}

TEST(DecoderModelTest, ReadsLayerWeightsAndEmbeddingRows) {
  ModelSpec s;
  s.arch = "Qwen2ForCausalLM";
  s.dtype = DType::kBF16;
  s.max_shard_bytes = 6000;  // several shards
  auto m = MakeModel(s);
  Opened o = Open(*m);
  ASSERT_GT(o.model.shard_keys().size(), 1u);
  auto w = ReadDecoderLayerWeights(*m->store, o.model, o.config.decoder, 1);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->q_proj, m->layers[1].q_proj);
  EXPECT_EQ(w->k_bias, m->layers[1].k_bias);
  EXPECT_EQ(w->down_proj, m->layers[1].down_proj);
  EXPECT_TRUE(w->o_bias.empty());
  EXPECT_EQ(ReadDecoderLayerWeights(*m->store, o.model, o.config.decoder, 2).status().code(),
            absl::StatusCode::kInvalidArgument);

  const int32_t ids[] = {5, 63, 0, 5, 17, 16, 18};
  const int64_t H = s.hidden;
  std::vector<float> out(7 * H, -1.0f);
  ASSERT_TRUE(EmbedTokens(*m->store, o.model, o.config.decoder, ids, 7, out.data()).ok());
  for (int t = 0; t < 7; ++t) {
    for (int64_t i = 0; i < H; ++i) ASSERT_EQ(out[t * H + i], m->embed[ids[t] * H + i]) << t;
  }
  const int32_t bad[] = {3, 64};
  auto st = EmbedTokens(*m->store, o.model, o.config.decoder, bad, 2, out.data());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(st.message()), "64"));

  // A config that does not match the tensors, a missing tensor, a bias the config lacks.
  quant::DecoderConfig wrong = o.config.decoder;
  wrong.intermediate_size = 80;
  st = ReadDecoderLayerWeights(*m->store, o.model, wrong, 0).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(st.message()), "model.layers.0.mlp.gate_proj.weight"));
  quant::DecoderConfig no_bias = o.config.decoder;
  no_bias.attention_bias = false;
  st = ReadDecoderLayerWeights(*m->store, o.model, no_bias, 0).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(st.message()), "model.layers.0.self_attn.q_proj.bias"));
  quant::DecoderConfig with_norm = o.config.decoder;
  with_norm.qk_norm = true;
  st = ReadDecoderLayerWeights(*m->store, o.model, with_norm, 0).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(std::string(st.message()), "model.layers.0.self_attn.q_norm.weight"));
  quant::DecoderConfig wrong_vocab = o.config.decoder;
  wrong_vocab.vocab_size = 65;
  EXPECT_EQ(EmbedTokens(*m->store, o.model, wrong_vocab, ids, 7, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DecoderModelTest, EmbeddingReadsOnlyTheRowsItNeeds) {
  // A large F32 table (4096 rows × 48): two far-apart ids read two small ranges, not the table.
  ModelSpec s;
  s.vocab = 4096;
  s.layers = 1;
  auto m = MakeModel(s);
  Opened o = Open(*m);
  class CountingStore : public ObjectStore {
   public:
    explicit CountingStore(ObjectStore& base) : base_(base) {}
    std::string uri() const override { return base_.uri(); }
    absl::StatusOr<ObjectInfo> Stat(std::string_view k) override { return base_.Stat(k); }
    absl::Status ReadRange(std::string_view k, uint64_t off, uint64_t len,
                           std::string* out) override {
      bytes += len;
      return base_.ReadRange(k, off, len, out);
    }
    absl::Status Put(std::string_view k, std::string_view d) override { return base_.Put(k, d); }
    absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view k) override {
      return base_.NewWriter(k);
    }
    absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view p) override {
      return base_.List(p);
    }
    absl::Status Delete(std::string_view k) override { return base_.Delete(k); }
    absl::Status DeletePrefix(std::string_view p) override { return base_.DeletePrefix(p); }
    uint64_t bytes = 0;

   private:
    ObjectStore& base_;
  } counting(*m->store);
  const int32_t ids[] = {4000, 7, 4000};
  std::vector<float> out(3 * s.hidden);
  ASSERT_TRUE(EmbedTokens(counting, o.model, o.config.decoder, ids, 3, out.data()).ok());
  EXPECT_EQ(counting.bytes, 2u * s.hidden * 4);
  for (int64_t i = 0; i < s.hidden; ++i) {
    EXPECT_EQ(out[i], m->embed[4000 * s.hidden + i]);
    EXPECT_EQ(out[s.hidden + i], m->embed[7 * s.hidden + i]);
    EXPECT_EQ(out[2 * s.hidden + i], m->embed[4000 * s.hidden + i]);
  }
}

// ---------------------------------------------------------------------------------------
// Token data

class CalibrationDataTest : public ::testing::Test {
 protected:
  CalibrationDataTest() { config_ = ExpectedConfig(ModelSpec()); }  // vocab 64, max_pos 256

  absl::StatusOr<CalibrationData> Load(const std::string& key, int64_t samples = 0,
                                       int64_t seq_len = 0) {
    CalibrationDataOptions opt;
    opt.max_samples = samples;
    opt.seq_len = seq_len;
    return LoadCalibrationData(store_, key, opt, config_, kField);
  }
  // The error of loading `key`: INVALID_ARGUMENT starting with the field.
  std::string Error(const std::string& key, int64_t samples = 0, int64_t seq_len = 0) {
    auto d = Load(key, samples, seq_len);
    EXPECT_FALSE(d.ok());
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << d.status();
    const std::string m(d.status().message());
    EXPECT_EQ(m.rfind(kField, 0), 0u) << m;
    return m;
  }

  MemStore store_;
  quant::DecoderConfig config_;
};

TEST_F(CalibrationDataTest, SafetensorsI32AndI64) {
  const std::vector<int64_t> ids = RandomIds(4 * 10, 64, 3);
  for (DType dt : {DType::kI32, DType::kI64}) {
    SCOPED_TRACE(DTypeName(dt));
    WriteTokenFile(store_, "ids.safetensors", ids, 4, 10, dt);
    auto d = Load("ids.safetensors");
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->samples, 4);
    EXPECT_EQ(d->seq_len, 10);
    EXPECT_EQ(d->tokens, 40);
    EXPECT_FALSE(d->packed);
    EXPECT_TRUE(d->mask.empty());
    EXPECT_EQ(std::vector<int64_t>(d->ids.begin(), d->ids.end()), ids);
    const std::string bytes = *store_.ReadAll("ids.safetensors");
    EXPECT_EQ(d->sha256, Sha256Hex(bytes));
    EXPECT_EQ(d->file_bytes, bytes.size());
    const quant::TokenBatch b = d->Batch(1, 3);
    EXPECT_EQ(b.samples, 2);
    EXPECT_EQ(b.seq_len, 10);
    EXPECT_EQ(b.mask, nullptr);
    // The first N samples; truncation to L.
    d = Load("ids.safetensors", 2, 6);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->samples, 2);
    EXPECT_EQ(d->seq_len, 6);
    EXPECT_FALSE(d->packed);
    for (int r = 0; r < 2; ++r) {
      for (int j = 0; j < 6; ++j) EXPECT_EQ(d->ids[r * 6 + j], ids[r * 10 + j]);
    }
    d = Load("ids.safetensors", 100);  // more than there are: all
    ASSERT_TRUE(d.ok());
    EXPECT_EQ(d->samples, 4);
  }
}

TEST_F(CalibrationDataTest, AttentionMask) {
  std::vector<int64_t> ids = RandomIds(3 * 6, 64, 4);
  // Right padding in row 1, left padding in row 2; a padding id outside the vocabulary is
  // never used.
  std::vector<uint8_t> mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1};
  ids[1 * 6 + 5] = -100;
  for (DType mdt : {DType::kBool, DType::kI64, DType::kU8}) {
    WriteTokenFile(store_, "m.safetensors", ids, 3, 6, DType::kI64, mask, mdt);
    auto d = Load("m.safetensors");
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->mask, mask);
    EXPECT_EQ(d->tokens, 14);
    EXPECT_EQ(d->ids[1 * 6 + 5], 0);
    EXPECT_EQ(d->Batch(1, 3).mask, d->mask.data() + 6);
  }
  // An all-ones mask is dropped; a mask value 2 and a row without real tokens are refused.
  WriteTokenFile(store_, "ones.safetensors", ids, 3, 6, DType::kI64, std::vector<uint8_t>(18, 1),
                 DType::kI64);
  ids[1 * 6 + 5] = 1;
  WriteTokenFile(store_, "ones.safetensors", ids, 3, 6, DType::kI64, std::vector<uint8_t>(18, 1),
                 DType::kI64);
  auto d = Load("ones.safetensors");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->mask.empty());
  std::vector<uint8_t> two = mask;
  two[7] = 2;
  WriteTokenFile(store_, "two.safetensors", ids, 3, 6, DType::kI64, two, DType::kU8);
  std::string m = Error("two.safetensors");
  EXPECT_TRUE(Contains(m, "sample 1, position 1"));
  EXPECT_TRUE(Contains(m, "attention_mask"));
  std::vector<uint8_t> none = mask;
  std::fill(none.begin() + 12, none.end(), 0);
  WriteTokenFile(store_, "none.safetensors", ids, 3, 6, DType::kI64, none, DType::kU8);
  m = Error("none.safetensors");
  EXPECT_TRUE(Contains(m, "sample 2"));
  EXPECT_TRUE(Contains(m, "no real token"));
}

TEST_F(CalibrationDataTest, JsonLinesEqualRowsTruncateAndPack) {
  ASSERT_TRUE(store_
                  .Put("d.jsonl",
                       "{\"input_ids\": [1, 2, 3, 4, 5]}\n"
                       "\n"
                       "{\"input_ids\": [6, 7, 8, 9, 10], \"attention_mask\": [1, 1, 1, 0, 0]}\r\n"
                       "{\"input_ids\": [11, 12, 13, 14, 15], \"text\": \"ignored\"}\n")
                  .ok());
  auto d = Load("d.jsonl");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->samples, 3);
  EXPECT_EQ(d->seq_len, 5);
  EXPECT_EQ(d->tokens, 13);
  EXPECT_EQ(d->mask, (std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1}));
  EXPECT_EQ(d->sha256, Sha256Hex(*store_.ReadAll("d.jsonl")));
  // Truncate (every row has at least 3 positions).
  d = Load("d.jsonl", 0, 3);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_FALSE(d->packed);
  EXPECT_EQ(d->ids, (std::vector<int32_t>{1, 2, 3, 6, 7, 8, 11, 12, 13}));
  EXPECT_TRUE(d->mask.empty());
  // Pack: the real tokens 1..8, 11..15 in rows of 6; the tail of 1 is dropped.
  d = Load("d.jsonl", 0, 6);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->packed);
  EXPECT_EQ(d->samples, 2);
  EXPECT_EQ(d->ids, (std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14}));
  EXPECT_TRUE(d->mask.empty());
  EXPECT_EQ(d->tokens, 12);
  d = Load("d.jsonl", 1, 6);  // the first packed sample only
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->samples, 1);
  EXPECT_EQ(d->ids, (std::vector<int32_t>{1, 2, 3, 4, 5, 6}));
  // Ragged rows pack too.
  ASSERT_TRUE(
      store_.Put("r.jsonl", "{\"input_ids\": [1, 2]}\n{\"input_ids\": [3, 4, 5, 6, 7]}\n").ok());
  d = Load("r.jsonl", 0, 3);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->packed);
  EXPECT_EQ(d->ids, (std::vector<int32_t>{1, 2, 3, 4, 5, 6}));
  // Safetensors rows shorter than L pack their real tokens.
  WriteTokenFile(store_, "p.safetensors", {1, 2, 3, 4, 5, 6}, 2, 3, DType::kI32, {1, 1, 0, 1, 1, 1},
                 DType::kU8);
  d = Load("p.safetensors", 0, 4);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE(d->packed);
  EXPECT_EQ(d->ids, (std::vector<int32_t>{1, 2, 4, 5}));
}

TEST_F(CalibrationDataTest, Errors) {
  // An id outside the vocabulary names the sample and the position.
  std::vector<int64_t> ids = RandomIds(3 * 8, 64, 5);
  ids[1 * 8 + 3] = 64;
  WriteTokenFile(store_, "vocab.safetensors", ids, 3, 8, DType::kI64);
  std::string m = Error("vocab.safetensors");
  EXPECT_TRUE(Contains(m, "sample 1, position 3: id 64 is outside the vocabulary (vocab_size 64)"));
  // ... checked on the rows taken only.
  EXPECT_TRUE(Load("vocab.safetensors", 1).ok());
  ids[1 * 8 + 3] = -1;
  WriteTokenFile(store_, "neg.safetensors", ids, 3, 8, DType::kI32);
  EXPECT_TRUE(Contains(Error("neg.safetensors"), "sample 1, position 3: id -1"));
  ASSERT_TRUE(
      store_.Put("vocab.jsonl", "{\"input_ids\": [1, 2]}\n\n{\"input_ids\": [3, 99]}\n").ok());
  EXPECT_TRUE(Contains(Error("vocab.jsonl"), "sample 1 (line 3), position 1: id 99"));
  EXPECT_TRUE(Contains(Error("vocab.jsonl", 0, 3), "sample 1 (line 3), position 1: id 99"));

  // Ragged rows name the first differing row and both lengths, and how to pack them.
  ASSERT_TRUE(
      store_
          .Put("ragged.jsonl",
               "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2]}\n")
          .ok());
  m = Error("ragged.jsonl");
  EXPECT_TRUE(Contains(m, "ragged rows"));
  EXPECT_TRUE(Contains(m, "sample 2 (line 3) has 2 tokens"));
  EXPECT_TRUE(Contains(m, "has 3"));
  EXPECT_TRUE(Contains(m, "--calib-seq-len"));

  // Empty data.
  WriteTokenFile(store_, "zero.safetensors", {}, 0, 8, DType::kI64);
  EXPECT_TRUE(Contains(Error("zero.safetensors"), "empty data"));
  WriteTokenFile(store_, "zerolen.safetensors", {}, 3, 0, DType::kI64);
  EXPECT_TRUE(Contains(Error("zerolen.safetensors"), "empty data"));
  ASSERT_TRUE(store_.Put("empty.jsonl", "\n  \n").ok());
  EXPECT_TRUE(Contains(Error("empty.jsonl"), "empty data"));
  ASSERT_TRUE(store_.Put("emptyrow.jsonl", "{\"input_ids\": []}\n").ok());
  EXPECT_TRUE(Contains(Error("emptyrow.jsonl"), "empty data"));
  m = Error("ragged.jsonl", 0, 9);  // 8 tokens cannot fill one row of 9
  EXPECT_TRUE(Contains(m, "empty data"));
  EXPECT_TRUE(Contains(m, "8 real tokens"));

  // seq_len above max_position_embeddings (256): asked for, or the data's own.
  EXPECT_TRUE(Contains(Error("ragged.jsonl", 0, 257), "max_position_embeddings 256"));
  WriteTokenFile(store_, "long.safetensors", RandomIds(300, 64, 6), 1, 300, DType::kI32);
  EXPECT_TRUE(Contains(Error("long.safetensors"), "max_position_embeddings 256"));
  EXPECT_TRUE(Load("long.safetensors", 0, 256).ok());

  // Malformed JSON Lines name the line.
  ASSERT_TRUE(store_.Put("bad.jsonl", "{\"input_ids\": [1]}\n\n{\"input_ids\": [1,}\n").ok());
  m = Error("bad.jsonl");
  EXPECT_TRUE(Contains(m, "line 3: malformed JSON"));
  ASSERT_TRUE(store_.Put("noids.jsonl", "{\"input_ids\": [1]}\n{\"ids\": [1]}\n").ok());
  EXPECT_TRUE(Contains(Error("noids.jsonl"), "line 2: has no \"input_ids\""));
  ASSERT_TRUE(store_.Put("float.jsonl", "{\"input_ids\": [1, 2.5]}\n").ok());
  EXPECT_TRUE(Contains(Error("float.jsonl"), "line 1: input_ids[1] is 2.5"));
  ASSERT_TRUE(store_.Put("arr.jsonl", "{\"input_ids\": [1]}\n[1, 2]\n").ok());
  EXPECT_TRUE(Contains(Error("arr.jsonl"), "line 2: is a JSON array"));
  ASSERT_TRUE(store_.Put("mask.jsonl", "{\"input_ids\": [1, 2], \"attention_mask\": [1]}\n").ok());
  EXPECT_TRUE(Contains(Error("mask.jsonl"), "line 1: attention_mask has 1 values"));
  ASSERT_TRUE(
      store_.Put("mask2.jsonl", "{\"input_ids\": [1, 2], \"attention_mask\": [1, 3]}\n").ok());
  EXPECT_TRUE(Contains(Error("mask2.jsonl"), "line 1: attention_mask[1] is 3"));

  // Neither format; safetensors without input_ids, or of the wrong dtype or rank.
  ASSERT_TRUE(store_.Put("text.txt", "hello world\n").ok());
  EXPECT_TRUE(Contains(Error("text.txt"), "neither safetensors"));
  {
    auto w =
        SafetensorsWriter::Create(store_, "f32.safetensors", {{"input_ids", DType::kF32, {2, 2}}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->WriteTensorData("input_ids", std::string(16, '\0')).ok());
    ASSERT_TRUE((*w)->Finish().ok());
    EXPECT_TRUE(Contains(Error("f32.safetensors"), "input_ids is F32 [2, 2]"));
    w = SafetensorsWriter::Create(store_, "rank1.safetensors", {{"input_ids", DType::kI32, {4}}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->WriteTensorData("input_ids", std::string(16, '\0')).ok());
    ASSERT_TRUE((*w)->Finish().ok());
    EXPECT_TRUE(Contains(Error("rank1.safetensors"), "input_ids is I32 [4]"));
    w = SafetensorsWriter::Create(store_, "other.safetensors", {{"tokens", DType::kI32, {1, 4}}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->WriteTensorData("tokens", std::string(16, '\0')).ok());
    ASSERT_TRUE((*w)->Finish().ok());
    EXPECT_TRUE(Contains(Error("other.safetensors"), "without an \"input_ids\""));
  }
  EXPECT_TRUE(Contains(Error("ragged.jsonl", -1), "must not be negative"));
  auto missing = Load("nope.safetensors");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(std::string(missing.status().message()).rfind(kField, 0), 0u);
}

// ---------------------------------------------------------------------------------------
// CALIBRATE + REDUCE against the float64 pipeline

struct Variant {
  std::string name;
  ModelSpec spec;
  int64_t samples = 3, seq_len = 24;
  bool padding = false;  // attention_mask with padded positions
};

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

class CalibrationVsReferenceTest : public ::testing::TestWithParam<Variant> {};

TEST_P(CalibrationVsReferenceTest, HessiansMatchFloat64Pipeline) {
  const Variant& v = GetParam();
  auto m = MakeModel(v.spec);
  Opened o = Open(*m);
  MemStore data_store("data"), out("out");
  const int64_t S = v.samples, L = v.seq_len;
  std::vector<uint8_t> mask;
  if (v.padding) {
    mask.assign(static_cast<size_t>(S * L), 1);
    for (int64_t j = L - 5; j < L; ++j) mask[1 * L + j] = 0;  // right padding
    for (int64_t j = 0; j < 4; ++j) mask[2 * L + j] = 0;      // left padding
  }
  WriteTokenFile(data_store, "calib.safetensors", RandomIds(S * L, v.spec.vocab, 11), S, L,
                 DType::kI64, mask, DType::kI64);
  CalibrationData d = LoadData(data_store, "calib.safetensors", o.config.decoder);
  ASSERT_EQ(d.samples, S);
  ASSERT_EQ(d.mask.empty(), !v.padding);

  std::vector<std::string> partials = RunShards(*m, o, d, out, "job", {{0, S}});
  ASSERT_EQ(partials.size(), 1u);
  auto reduced = Reduce(out, partials, "hessians.safetensors");
  ASSERT_TRUE(reduced.ok()) << reduced.status();
  EXPECT_EQ(reduced->samples, S);
  EXPECT_EQ(reduced->tokens, d.tokens);
  EXPECT_EQ(reduced->tensors, 4 * v.spec.layers);

  // One shard: the reduced tensors are the partial's, bit for bit.
  auto partial = HessianFile::Open(out, partials[0]);
  auto file = HessianFile::Open(out, "hessians.safetensors");
  ASSERT_TRUE(partial.ok()) << partial.status();
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->n_samples(), S);
  EXPECT_EQ(file->n_tokens(), d.tokens);
  EXPECT_EQ(partial->n_tokens(), d.tokens);
  EXPECT_EQ(file->num_modules(), static_cast<size_t>(7 * v.spec.layers));

  const std::vector<std::vector<double>> ref = ReferenceHessians(*m, d);
  double worst = 0;
  for (int64_t l = 0; l < v.spec.layers; ++l) {
    for (int i = 0; i < quant::kNumDecoderInputs; ++i) {
      const DecoderInput in = kInputs[i];
      const int64_t dim = quant::DecoderInputDim(m->config, in);
      auto from_partial = partial->Read(out, DecoderInputTensorName(l, in), dim);
      ASSERT_TRUE(from_partial.ok());
      for (const std::string& module : DecoderInputModules(l, in)) {
        auto h = file->Read(out, module, dim);
        ASSERT_TRUE(h.ok()) << h.status();
        EXPECT_EQ(*h, *from_partial) << module;
        const double err = RelFrobenius(*h, ref[l * 4 + i]);
        EXPECT_LE(err, kHessianBound) << module;
        worst = std::max(worst, err);
      }
    }
  }
  std::printf("[ %s ] worst relative Frobenius error of the Hessians: %.3g (bound %.1g)\n",
              v.name.c_str(), worst, kHessianBound);
  EXPECT_TRUE(VerifyHessianCacheEntry(out, "hessians.safetensors", o.config.decoder, true).ok());
}

ModelSpec Spec(const std::function<void(ModelSpec&)>& edit) {
  ModelSpec s;
  edit(s);
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Architectures, CalibrationVsReferenceTest,
    ::testing::Values(Variant{"LlamaGqa", Spec([](ModelSpec& s) { s.layers = 3; })},
                      Variant{"LlamaOddSizes", Spec([](ModelSpec& s) {
                                s.hidden = 36;
                                s.heads = 3;
                                s.kv_heads = 1;
                                s.intermediate = 50;
                                s.vocab = 37;
                              }),
                              2, 17},
                      Variant{"Qwen2BiasesPadded", Spec([](ModelSpec& s) {
                                s.arch = "Qwen2ForCausalLM";
                                s.dtype = DType::kBF16;
                              }),
                              3, 24, true},
                      Variant{"Qwen3QkNormTied", Spec([](ModelSpec& s) {
                                s.arch = "Qwen3ForCausalLM";
                                s.hidden = 32;
                                s.heads = 4;
                                s.kv_heads = 2;
                                s.head_dim = 16;
                                s.tie = true;
                                s.dtype = DType::kF16;
                              })},
                      Variant{"Llama3RopeScalingBiases", Spec([](ModelSpec& s) {
                                s.rope_scaling = {{"rope_type", "llama3"},
                                                  {"factor", 8.0},
                                                  {"low_freq_factor", 1.0},
                                                  {"high_freq_factor", 4.0},
                                                  {"original_max_position_embeddings", 64}};
                                s.theta = 500000.0;
                                s.head_dim = 16;
                                s.hidden = 40;
                                s.heads = 4;
                                s.kv_heads = 4;
                                s.attention_bias = true;
                                s.mlp_bias = true;
                                s.max_shard_bytes = 20000;
                              }),
                              2, 40},
                      Variant{"Mistral",
                              Spec([](ModelSpec& s) { s.arch = "MistralForCausalLM"; })}),
    [](const ::testing::TestParamInfo<Variant>& info) { return info.param.name; });

// ---------------------------------------------------------------------------------------
// Shards, spill, progress, cancel

class CalibrationShardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ModelSpec s;
    s.layers = 2;
    m_ = MakeModel(s);
    o_ = std::make_unique<Opened>(Open(*m_));
    std::vector<uint8_t> mask(static_cast<size_t>(7 * 16), 1);
    for (int j = 10; j < 16; ++j) mask[4 * 16 + j] = 0;
    WriteTokenFile(data_store_, "c.safetensors", RandomIds(7 * 16, 64, 21), 7, 16, DType::kI32,
                   mask, DType::kBool);
    d_ = LoadData(data_store_, "c.safetensors", o_->config.decoder);
    char tmpl[] = "/tmp/qforge-calibration-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    tmp_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(tmp_); }

  CalibrationShardJob Job(quant::DecoderForward* forward, int64_t begin, int64_t end,
                          const std::string& key) {
    CalibrationShardJob job;
    job.model_store = m_->store.get();
    job.model = &o_->model;
    job.model_config = &o_->config;
    job.data = &d_;
    job.sample_begin = begin;
    job.sample_end = end;
    job.forward = forward;
    job.out_store = &out_;
    job.staged_key = key;
    return job;
  }

  std::unique_ptr<TinyModel> m_;
  std::unique_ptr<Opened> o_;
  MemStore data_store_{"data"}, out_{"out"};
  CalibrationData d_;
  std::string tmp_;
};

TEST_F(CalibrationShardTest, ThreeShardsReduceToOneShard) {
  std::vector<std::string> one = RunShards(*m_, *o_, d_, out_, "one", {{0, 7}});
  std::vector<std::string> three = RunShards(*m_, *o_, d_, out_, "three", {{0, 2}, {2, 5}, {5, 7}});
  ASSERT_EQ(three.size(), 3u);
  ASSERT_TRUE(Reduce(out_, one, "one.safetensors").ok());
  auto r3 = Reduce(out_, three, "three.safetensors");
  ASSERT_TRUE(r3.ok()) << r3.status();
  EXPECT_EQ(r3->samples, 7);
  EXPECT_EQ(r3->tokens, 7 * 16 - 6);
  // The order of the partial keys does not change a byte.
  std::vector<std::string> reversed(three.rbegin(), three.rend());
  ASSERT_TRUE(Reduce(out_, reversed, "reversed.safetensors").ok());
  EXPECT_EQ(*out_.ReadAll("reversed.safetensors"), *out_.ReadAll("three.safetensors"));

  auto f1 = HessianFile::Open(out_, "one.safetensors");
  auto f3 = HessianFile::Open(out_, "three.safetensors");
  ASSERT_TRUE(f1.ok() && f3.ok());
  EXPECT_EQ(f3->n_samples(), 7);
  EXPECT_EQ(f3->n_tokens(), f1->n_tokens());
  double worst = 0;
  for (int64_t l = 0; l < 2; ++l) {
    for (DecoderInput in : kInputs) {
      const int64_t dim = quant::DecoderInputDim(m_->config, in);
      const std::string name = DecoderInputTensorName(l, in);
      auto h1 = f1->Read(out_, name, dim);
      auto h3 = f3->Read(out_, name, dim);
      ASSERT_TRUE(h1.ok() && h3.ok());
      const double err = RelFrobenius(*h3, *h1);
      EXPECT_LE(err, kShardBound) << name;
      worst = std::max(worst, err);
    }
  }
  std::printf("3 shards vs 1: worst relative Frobenius difference %.3g (bound %.1g)\n", worst,
              kShardBound);
}

TEST_F(CalibrationShardTest, SpilledHiddenStatesGiveTheSameBytes) {
  ShardRun spill;
  spill.spill_above = 0;
  spill.spill_dir = tmp_;
  std::vector<std::string> mem = RunShards(*m_, *o_, d_, out_, "mem", {{1, 6}});
  std::vector<std::string> disk = RunShards(*m_, *o_, d_, out_, "disk", {{1, 6}}, spill);
  ASSERT_EQ(disk.size(), 1u);
  EXPECT_EQ(*out_.ReadAll(mem[0]), *out_.ReadAll(disk[0]));
  // The spill file is unlinked at once: nothing stays behind.
  EXPECT_TRUE(std::filesystem::is_empty(tmp_));
  // A spill directory that does not exist is an error naming it.
  spill.spill_dir = tmp_ + "/missing";
  std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
  CalibrationShardJob job = Job(forward.get(), 0, 2, "x/p.safetensors");
  job.spill_dir = spill.spill_dir;
  job.spill_above_bytes = 0;
  auto st = RunCalibrationShard(job).status();
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(Contains(std::string(st.message()), spill.spill_dir));
}

TEST_F(CalibrationShardTest, ProgressReachesOneAndCancelLeavesNothing) {
  std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
  std::vector<double> seen;
  CalibrationShardJob job = Job(forward.get(), 0, 7, "p/partial.safetensors");
  job.progress = [&](double f) {
    seen.push_back(f);
    return true;
  };
  auto outcome = RunCalibrationShard(job);
  ASSERT_TRUE(outcome.ok()) << outcome.status();
  EXPECT_EQ(outcome->tokens, 7 * 16 - 6);
  EXPECT_GT(outcome->bytes_written, 0u);
  EXPECT_EQ(outcome->bytes_written, out_.Stat("p/partial.safetensors")->size);
  ASSERT_FALSE(seen.empty());
  EXPECT_TRUE(std::is_sorted(seen.begin(), seen.end()));
  EXPECT_EQ(seen.back(), 1.0);
  EXPECT_TRUE(std::count(seen.begin(), seen.end(), 0.5) >= 1);  // after layer 0 of 2

  job.staged_key = "c/partial.safetensors";
  job.progress = [](double f) { return f < 0.5; };
  auto cancelled = RunCalibrationShard(job);
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(out_.Stat("c/partial.safetensors").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(CalibrationShardTest, ShardErrors) {
  std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
  for (auto [b, e] : std::vector<std::pair<int64_t, int64_t>>{{3, 3}, {-1, 2}, {5, 8}, {4, 2}}) {
    auto st = RunCalibrationShard(Job(forward.get(), b, e, "e.safetensors")).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << b << " " << e;
  }
  CalibrationShardJob job = Job(forward.get(), 0, 1, "e.safetensors");
  job.forward = nullptr;
  EXPECT_EQ(RunCalibrationShard(job).status().code(), absl::StatusCode::kInvalidArgument);
  // A sliding window shorter than seq_len (16).
  DecoderModelConfig windowed = o_->config;
  windowed.sliding_window = 8;
  job = Job(forward.get(), 0, 1, "e.safetensors");
  job.model_config = &windowed;
  auto st = RunCalibrationShard(job).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(st.message()), "sliding window"));
  // A model missing a layer tensor: the error names it, nothing is published.
  ASSERT_TRUE(m_->store
                  ->Put("config.json", ConfigJson([] {
                                         ModelSpec s;
                                         s.layers = 3;
                                         return s;
                                       }())
                                           .dump())
                  .ok());
  DecoderModelConfig three = o_->config;
  three.decoder.num_hidden_layers = 3;
  job = Job(forward.get(), 0, 2, "e.safetensors");
  job.model_config = &three;
  st = RunCalibrationShard(job).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Contains(std::string(st.message()), "model.layers.2."));
  EXPECT_EQ(out_.Stat("e.safetensors").status().code(), absl::StatusCode::kNotFound);
}

// ---------------------------------------------------------------------------------------
// REDUCE errors

// A partial-like Hessian file with the given tensors (dim each) and metadata.
void WritePartial(ObjectStore& store, const std::string& key,
                  const std::vector<std::pair<std::string, int64_t>>& tensors,
                  std::map<std::string, std::string> metadata) {
  std::vector<TensorSpec> specs;
  for (const auto& [name, dim] : tensors) specs.push_back({name, DType::kF32, {dim, dim}});
  auto w = SafetensorsWriter::Create(store, key, specs, std::move(metadata));
  ASSERT_TRUE(w.ok()) << w.status();
  for (const auto& [name, dim] : tensors) {
    std::vector<float> v(static_cast<size_t>(dim * dim), 1.0f);
    ASSERT_TRUE((*w)->WriteTensorData(
                        name, std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4))
                    .ok());
  }
  ASSERT_TRUE((*w)->Finish().ok());
}

TEST(ReduceHessiansTest, InconsistentPartialsAreRefusedByName) {
  MemStore s;
  const std::map<std::string, std::string> md = {{"n_samples", "2"}, {"n_tokens", "30"}};
  WritePartial(s, "a", {{"x", 4}, {"y", 3}}, md);
  WritePartial(s, "b_shape", {{"x", 4}, {"y", 5}}, md);
  WritePartial(s, "c_names", {{"x", 4}, {"z", 3}}, md);
  WritePartial(s, "d_count", {{"x", 4}}, md);
  auto alias = md;
  alias["alias.w"] = "x";
  WritePartial(s, "e_alias", {{"x", 4}, {"y", 3}}, alias);
  WritePartial(s, "f_no_tokens", {{"x", 4}, {"y", 3}}, {{"n_samples", "2"}});
  WritePartial(s, "g_ok", {{"x", 4}, {"y", 3}}, {{"n_samples", "1"}, {"n_tokens", "10"}});
  WritePartial(s, "i_bad_tokens", {{"x", 4}, {"y", 3}}, {{"n_samples", "1"}, {"n_tokens", "ten"}});
  for (const char* other :
       {"b_shape", "c_names", "d_count", "e_alias", "f_no_tokens", "i_bad_tokens"}) {
    auto r = Reduce(s, {"a", other}, "out");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << other;
    EXPECT_TRUE(Contains(std::string(r.status().message()), other));
  }
  EXPECT_EQ(Reduce(s, {}, "out").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Reduce(s, {"a", "a"}, "out").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Reduce(s, {"a", "missing"}, "out").status().code(), absl::StatusCode::kNotFound);
  // A truncated partial.
  std::string bytes = *s.ReadAll("g_ok");
  ASSERT_TRUE(s.Put("h_truncated", bytes.substr(0, bytes.size() - 7)).ok());
  EXPECT_EQ(Reduce(s, {"a", "h_truncated"}, "out").status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.Stat("out").status().code(), absl::StatusCode::kNotFound);
  // Weighted by tokens: (30·1 + 10·1)/40 = 1 everywhere; n_samples 3, n_tokens 40.
  auto r = Reduce(s, {"g_ok", "a"}, "out");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->samples, 3);
  EXPECT_EQ(r->tokens, 40);
  auto f = HessianFile::Open(s, "out");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f->Read(s, "y", 3), std::vector<float>(9, 1.0f));
}

// ---------------------------------------------------------------------------------------
// The Hessian cache

TEST(HessianCacheTest, KeyFingerprintAndVerification) {
  const std::string fp(64, 'a'), data(64, 'b');
  const std::string key = HessianCacheEntryKey(fp, data, 128, 2048);
  EXPECT_EQ(key, HessianCacheEntryKey(fp, data, 128, 2048));
  ASSERT_EQ(key.size(), 64u + 1 + std::string(kHessianCacheFileName).size());
  EXPECT_EQ(key.substr(64), std::string("/") + kHessianCacheFileName);
  EXPECT_EQ(key.find_first_not_of("0123456789abcdef"), 64u);
  EXPECT_NE(key, HessianCacheEntryKey(std::string(64, 'c'), data, 128, 2048));
  EXPECT_NE(key, HessianCacheEntryKey(fp, std::string(64, 'c'), 128, 2048));
  EXPECT_NE(key, HessianCacheEntryKey(fp, data, 127, 2048));
  EXPECT_NE(key, HessianCacheEntryKey(fp, data, 128, 2047));
  EXPECT_TRUE(ValidateObjectKey(key).ok());

  ModelSpec s;
  s.max_shard_bytes = 8000;
  auto m = MakeModel(s);
  Opened o = Open(*m);
  ASSERT_GT(o.model.shard_keys().size(), 1u);
  auto fingerprint = ModelFingerprint(*m->store, o.model);
  ASSERT_TRUE(fingerprint.ok()) << fingerprint.status();
  std::string listing;
  for (const std::string& shard : o.model.shard_keys()) {
    listing += shard + "\n" + Sha256Hex(*m->store->ReadAll(shard)) + "\n";
  }
  EXPECT_EQ(*fingerprint, Sha256Hex(listing));
  // One byte of one shard changes it.
  const std::string shard = o.model.shard_keys().back();
  std::string bytes = *m->store->ReadAll(shard);
  bytes[bytes.size() - 1] ^= 1;
  ASSERT_TRUE(m->store->Put(shard, bytes).ok());
  EXPECT_NE(*ModelFingerprint(*m->store, o.model), *fingerprint);
  bytes[bytes.size() - 1] ^= 1;
  ASSERT_TRUE(m->store->Put(shard, bytes).ok());

  // A reduced file is a complete entry; a flipped tensor byte, a missing module or another
  // model's shapes are not.
  MemStore cache("cache"), data_store("data");
  WriteTokenFile(data_store, "c.safetensors", RandomIds(2 * 8, 64, 9), 2, 8, DType::kI64);
  CalibrationData d = LoadData(data_store, "c.safetensors", o.config.decoder);
  std::vector<std::string> partials = RunShards(*m, o, d, cache, "staging", {{0, 2}});
  ASSERT_TRUE(Reduce(cache, partials, key).ok());
  const quant::DecoderConfig& c = o.config.decoder;
  EXPECT_TRUE(VerifyHessianCacheEntry(cache, key, c, true).ok());
  EXPECT_EQ(VerifyHessianCacheEntry(cache, "0/hessians.safetensors", c, false).code(),
            absl::StatusCode::kNotFound);
  // A partial has no sha256s: not a cache entry.
  EXPECT_EQ(VerifyHessianCacheEntry(cache, partials[0], c, false).code(),
            absl::StatusCode::kDataLoss);
  quant::DecoderConfig more = c;
  more.num_hidden_layers = 3;
  auto st = VerifyHessianCacheEntry(cache, key, more, false);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(std::string(st.message()), "model.layers.2.self_attn.q_proj"));
  quant::DecoderConfig wider = c;
  wider.intermediate_size = 80;
  st = VerifyHessianCacheEntry(cache, key, wider, false);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(std::string(st.message()), "down_proj"));

  std::string entry = *cache.ReadAll(key);
  auto header = ReadSafetensorsHeader(cache, key);
  ASSERT_TRUE(header.ok());
  const TensorInfo* t = header->Find("model.layers.1.mlp.gate_proj");
  ASSERT_NE(t, nullptr);
  entry[header->data_offset() + t->data_begin + 17] ^= 0x10;
  ASSERT_TRUE(cache.Put(key, entry).ok());
  EXPECT_TRUE(VerifyHessianCacheEntry(cache, key, c, false).ok());  // shapes only
  st = VerifyHessianCacheEntry(cache, key, c, true);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(std::string(st.message()), "model.layers.1.mlp.gate_proj"));
  ASSERT_TRUE(cache.Put(key, entry.substr(0, entry.size() / 2)).ok());
  EXPECT_EQ(VerifyHessianCacheEntry(cache, key, c, false).code(), absl::StatusCode::kDataLoss);
}

TEST(CalibrationMemoryTest, CountsWeightsSumsHiddenStatesUpToTheSpillLimit) {
  quant::DecoderConfig c = ExpectedConfig(ModelSpec());
  c.hidden_size = 4096;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 32;
  c.head_dim = 128;
  c.intermediate_size = 11008;
  const uint64_t unlimited = ~uint64_t{0};
  const uint64_t m1 = CalibrationTaskMemoryBytes(c, 16, 2048, unlimited);
  const uint64_t m2 = CalibrationTaskMemoryBytes(c, 32, 2048, unlimited);
  const uint64_t hidden16 = uint64_t{16} * 2048 * 4096 * 4;
  EXPECT_GE(m2 - m1, hidden16);  // 16 more samples' hidden states
  const uint64_t weights = uint64_t{4} * (4 * 4096ull * 4096 + 3 * 11008ull * 4096);
  EXPECT_GT(m1, hidden16 + weights + 8ull * 11008 * 11008);
  // Above the spill limit the hidden states are not counted beyond it.
  const uint64_t capped = CalibrationTaskMemoryBytes(c, 32, 2048, uint64_t{512} << 20);
  EXPECT_LT(capped, m2);
  EXPECT_EQ(m2 - capped, 2 * hidden16 - (uint64_t{512} << 20));
}

}  // namespace
}  // namespace qforge

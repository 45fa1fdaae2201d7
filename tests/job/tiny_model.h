// Small generated Llama-family models for the tests of job/ (calibration, evaluation): their
// files (config.json and safetensors shards, in a MemStore) and the values those files hold,
// token files, and a model opened as a task opens it. Header-only; gtest assertions inside
// report a broken generator at the call site. Thread-safety: plain functions.
#ifndef QFORGE_TESTS_JOB_TINY_MODEL_H_
#define QFORGE_TESTS_JOB_TINY_MODEL_H_

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "base/float16.h"
#include "common/mem_store.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "job/decoder_model.h"
#include "nlohmann/json.hpp"
#include "quant/decoder.h"
#include "tests/quant/decoder_ref.h"

namespace qforge::job_testing {

using Json = nlohmann::json;

struct ModelSpec {
  std::string arch = "LlamaForCausalLM";
  int64_t hidden = 48, heads = 4, kv_heads = 2, head_dim = 0;  // head_dim 0: not in config.json
  int64_t intermediate = 72, layers = 2, vocab = 64, max_pos = 256;
  double eps = 1e-5, theta = 10000.0;
  Json rope_scaling = nullptr;
  bool attention_bias = false, mlp_bias = false, tie = false;
  DType dtype = DType::kF32;
  uint64_t seed = 1;
  uint64_t max_shard_bytes = uint64_t{1} << 30;
  bool random_final_norm = false;  // model.norm.weight 1 + N(0, 0.2²) instead of ones
};

// What the architecture's modeling file builds, stated independently of decoder_model.cc.
inline quant::DecoderConfig ExpectedConfig(const ModelSpec& s) {
  quant::DecoderConfig c;
  c.hidden_size = s.hidden;
  c.num_attention_heads = s.heads;
  c.num_key_value_heads = s.kv_heads;
  c.head_dim = s.head_dim ? s.head_dim : s.hidden / s.heads;
  c.intermediate_size = s.intermediate;
  c.num_hidden_layers = s.layers;
  c.vocab_size = s.vocab;
  c.max_position_embeddings = s.max_pos;
  c.rms_norm_eps = s.eps;
  c.rope_theta = s.theta;
  if (!s.rope_scaling.is_null()) {
    c.has_llama3_rope_scaling = true;
    c.llama3_rope_scaling.factor = s.rope_scaling["factor"].get<double>();
    c.llama3_rope_scaling.low_freq_factor = s.rope_scaling["low_freq_factor"].get<double>();
    c.llama3_rope_scaling.high_freq_factor = s.rope_scaling["high_freq_factor"].get<double>();
    c.llama3_rope_scaling.original_max_position_embeddings =
        s.rope_scaling["original_max_position_embeddings"].get<int64_t>();
  }
  c.tie_word_embeddings = s.tie;
  if (s.arch == "LlamaForCausalLM") {
    c.attention_bias = c.o_proj_bias = s.attention_bias;
    c.mlp_bias = s.mlp_bias;
  } else if (s.arch == "Qwen2ForCausalLM") {
    c.attention_bias = true;
  } else if (s.arch == "Qwen3ForCausalLM") {
    c.attention_bias = c.o_proj_bias = s.attention_bias;
    c.qk_norm = true;
  }
  return c;
}

inline Json ConfigJson(const ModelSpec& s) {
  static const std::map<std::string, std::string> kModelType = {{"LlamaForCausalLM", "llama"},
                                                                {"MistralForCausalLM", "mistral"},
                                                                {"Qwen2ForCausalLM", "qwen2"},
                                                                {"Qwen3ForCausalLM", "qwen3"}};
  Json j = {{"architectures", {s.arch}},
            {"model_type", kModelType.at(s.arch)},
            {"hidden_size", s.hidden},
            {"num_attention_heads", s.heads},
            {"num_key_value_heads", s.kv_heads},
            {"intermediate_size", s.intermediate},
            {"num_hidden_layers", s.layers},
            {"vocab_size", s.vocab},
            {"max_position_embeddings", s.max_pos},
            {"rms_norm_eps", s.eps},
            {"rope_theta", s.theta},
            {"rope_scaling", s.rope_scaling},
            {"hidden_act", "silu"},
            {"tie_word_embeddings", s.tie},
            {"attention_bias", s.attention_bias},
            {"torch_dtype", "bfloat16"}};
  if (s.arch == "LlamaForCausalLM") j["mlp_bias"] = s.mlp_bias;
  if (s.arch == "MistralForCausalLM") j["sliding_window"] = nullptr;
  if (s.head_dim) j["head_dim"] = s.head_dim;
  return j;
}

inline float RoundTo(DType d, float x) {
  if (d == DType::kBF16) return BFloat16ToFloat(FloatToBFloat16(x));
  if (d == DType::kF16) return HalfToFloat(FloatToHalf(x));
  return x;
}

inline std::string Encode(DType d, const std::vector<float>& v) {
  const size_t es = DTypeSize(d);
  std::string out(v.size() * es, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    if (d == DType::kF32) {
      std::memcpy(&out[4 * i], &v[i], 4);
    } else {
      const uint16_t h = d == DType::kBF16 ? FloatToBFloat16(v[i]) : FloatToHalf(v[i]);
      std::memcpy(&out[2 * i], &h, 2);
    }
  }
  return out;
}

// A generated model: its files in `store`, and the values they hold (rounded to the dtype).
struct TinyModel {
  ModelSpec spec;
  quant::DecoderConfig config;  // ExpectedConfig(spec)
  std::vector<float> embed;     // [vocab, hidden]
  std::vector<quant::DecoderLayerWeights> layers;
  std::vector<float> norm;      // model.norm.weight [hidden]
  std::vector<float> lm_head;   // [vocab, hidden] (the embedding when tied)
  std::unique_ptr<MemStore> store = std::make_unique<MemStore>("model");
};

inline std::unique_ptr<TinyModel> MakeModel(const ModelSpec& s) {
  auto m = std::make_unique<TinyModel>();
  m->spec = s;
  m->config = ExpectedConfig(s);
  const quant::DecoderConfig& c = m->config;
  const int64_t H = c.hidden_size, QO = c.q_out(), KV = c.kv_out(), I = c.intermediate_size;
  std::mt19937_64 rng(s.seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  m->embed.resize(static_cast<size_t>(s.vocab * H));
  for (float& x : m->embed) x = RoundTo(s.dtype, n01(rng));

  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };
  std::vector<Tensor> tensors;
  tensors.push_back({"model.embed_tokens.weight", {s.vocab, H}, m->embed});
  for (int64_t l = 0; l < s.layers; ++l) {
    quant::DecoderLayerWeights w = quant::testing::RandomDecoderWeights(c, s.seed * 100 + l);
    for (auto* v :
         {&w.input_layernorm, &w.q_proj, &w.k_proj, &w.v_proj, &w.q_bias, &w.k_bias, &w.v_bias,
          &w.q_norm, &w.k_norm, &w.o_proj, &w.o_bias, &w.post_attention_layernorm, &w.gate_proj,
          &w.up_proj, &w.gate_bias, &w.up_bias, &w.down_proj, &w.down_bias}) {
      for (float& x : *v) x = RoundTo(s.dtype, x);
    }
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto add = [&](const std::string& name, std::vector<int64_t> shape,
                   const std::vector<float>& v) {
      if (!v.empty()) tensors.push_back({p + name, std::move(shape), v});
    };
    add("input_layernorm.weight", {H}, w.input_layernorm);
    add("self_attn.q_proj.weight", {QO, H}, w.q_proj);
    add("self_attn.k_proj.weight", {KV, H}, w.k_proj);
    add("self_attn.v_proj.weight", {KV, H}, w.v_proj);
    add("self_attn.q_proj.bias", {QO}, w.q_bias);
    add("self_attn.k_proj.bias", {KV}, w.k_bias);
    add("self_attn.v_proj.bias", {KV}, w.v_bias);
    add("self_attn.q_norm.weight", {c.head_dim}, w.q_norm);
    add("self_attn.k_norm.weight", {c.head_dim}, w.k_norm);
    add("self_attn.o_proj.weight", {H, QO}, w.o_proj);
    add("self_attn.o_proj.bias", {H}, w.o_bias);
    add("post_attention_layernorm.weight", {H}, w.post_attention_layernorm);
    add("mlp.gate_proj.weight", {I, H}, w.gate_proj);
    add("mlp.up_proj.weight", {I, H}, w.up_proj);
    add("mlp.gate_proj.bias", {I}, w.gate_bias);
    add("mlp.up_proj.bias", {I}, w.up_bias);
    add("mlp.down_proj.weight", {H, I}, w.down_proj);
    add("mlp.down_proj.bias", {H}, w.down_bias);
    m->layers.push_back(std::move(w));
  }
  m->norm.assign(static_cast<size_t>(H), 1.0f);
  if (s.random_final_norm) {
    for (float& x : m->norm) x = RoundTo(s.dtype, 1.0f + 0.2f * n01(rng));
  }
  tensors.push_back({"model.norm.weight", {H}, m->norm});
  m->lm_head = m->embed;
  if (!s.tie) {
    std::vector<float> head(static_cast<size_t>(s.vocab * H));
    for (float& x : head) x = RoundTo(s.dtype, 0.1f * n01(rng));
    tensors.push_back({"lm_head.weight", {s.vocab, H}, head});
    m->lm_head = head;
  }
  std::vector<TensorSpec> specs;
  for (const Tensor& t : tensors) specs.push_back({t.name, s.dtype, t.shape});
  auto writer = ShardedSafetensorsWriter::Create(*m->store, "", specs, s.max_shard_bytes);
  EXPECT_TRUE(writer.ok()) << writer.status();
  for (const Tensor& t : tensors) {
    EXPECT_TRUE((*writer)->WriteTensorData(t.name, Encode(s.dtype, t.values)).ok());
  }
  EXPECT_TRUE((*writer)->Finish().ok());
  EXPECT_TRUE(m->store->Put("config.json", ConfigJson(s).dump(2)).ok());
  return m;
}

// Token data: input_ids [samples, seq_len] as `dtype` (I32/I64), optional attention_mask.
inline void WriteTokenFile(ObjectStore& store, const std::string& key, const std::vector<int64_t>& ids,
                    int64_t samples, int64_t seq_len, DType dtype,
                    const std::vector<uint8_t>& mask = {}, DType mask_dtype = DType::kBool) {
  std::vector<TensorSpec> specs = {{"input_ids", dtype, {samples, seq_len}}};
  if (!mask.empty()) specs.push_back({"attention_mask", mask_dtype, {samples, seq_len}});
  auto w = SafetensorsWriter::Create(store, key, specs);
  ASSERT_TRUE(w.ok()) << w.status();
  std::string bytes;
  for (int64_t id : ids) {
    if (dtype == DType::kI32) {
      const int32_t v = static_cast<int32_t>(id);
      bytes.append(reinterpret_cast<const char*>(&v), 4);
    } else {
      bytes.append(reinterpret_cast<const char*>(&id), 8);
    }
  }
  ASSERT_TRUE((*w)->WriteTensorData("input_ids", bytes).ok());
  if (!mask.empty()) {
    std::string mb;
    for (uint8_t m : mask) {
      const int64_t v = m;
      mb.append(reinterpret_cast<const char*>(&v), DTypeSize(mask_dtype));
    }
    ASSERT_TRUE((*w)->WriteTensorData("attention_mask", mb).ok());
  }
  ASSERT_TRUE((*w)->Finish().ok());
}

inline std::vector<int64_t> RandomIds(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (int64_t& id : ids) id = static_cast<int64_t>(rng() % static_cast<uint64_t>(vocab));
  return ids;
}

// A model opened as a CALIBRATE task opens it.
struct Opened {
  SafetensorsModel model;
  DecoderModelConfig config;
};

inline Opened Open(TinyModel& m) {
  auto model = SafetensorsModel::Open(*m.store, "");
  EXPECT_TRUE(model.ok()) << model.status();
  auto config = ReadDecoderModelConfig(*m.store, "");
  EXPECT_TRUE(config.ok()) << config.status();
  return {*std::move(model), *std::move(config)};
}

}  // namespace qforge::job_testing

#endif  // QFORGE_TESTS_JOB_TINY_MODEL_H_

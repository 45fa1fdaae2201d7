#include "job/evaluation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/status_bridge.h"
#include "job/assembler.h"
#include "job/hidden_states.h"
#include "job/layer_dequantizer.h"
#include "quant/decoder_head.h"
#include "quant/linalg.h"

namespace qforge {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

constexpr quant::DecoderInput kInputs[] = {quant::DecoderInput::kQkv, quant::DecoderInput::kO,
                                           quant::DecoderInput::kGateUp,
                                           quant::DecoderInput::kDown};

// Rows of ΔW per float32 GEMM block of the module error (bounds the [rows, in] product).
constexpr int64_t kErrorRowBlock = 256;

// A linear module of a layer: its full name, the Hessian input it reads, and where its weight
// lives in quant::DecoderLayerWeights.
struct LinearModule {
  std::string name;
  quant::DecoderInput input;
  int64_t out_features = 0, in_features = 0;
  std::vector<float> quant::DecoderLayerWeights::*weight = nullptr;
};

std::vector<float> quant::DecoderLayerWeights::*WeightOf(std::string_view module) {
  using W = quant::DecoderLayerWeights;
  static const std::pair<const char*, std::vector<float> W::*> kFields[] = {
      {".self_attn.q_proj", &W::q_proj},  {".self_attn.k_proj", &W::k_proj},
      {".self_attn.v_proj", &W::v_proj},  {".self_attn.o_proj", &W::o_proj},
      {".mlp.gate_proj", &W::gate_proj},  {".mlp.up_proj", &W::up_proj},
      {".mlp.down_proj", &W::down_proj}};
  for (const auto& [suffix, field] : kFields) {
    const std::string_view s(suffix);
    if (module.size() >= s.size() && module.substr(module.size() - s.size()) == s) return field;
  }
  return nullptr;
}

// The layer's seven linear modules in the order q, k, v, o, gate, up, down.
std::vector<LinearModule> LayerModules(const quant::DecoderConfig& c, int64_t layer) {
  std::vector<LinearModule> out;
  for (quant::DecoderInput in : kInputs) {
    for (const std::string& m : DecoderInputModules(layer, in)) {
      LinearModule lm;
      lm.name = m;
      lm.input = in;
      lm.in_features = quant::DecoderInputDim(c, in);
      lm.weight = WeightOf(m);
      if (m.find("q_proj") != std::string::npos) {
        lm.out_features = c.q_out();
      } else if (m.find("k_proj") != std::string::npos || m.find("v_proj") != std::string::npos) {
        lm.out_features = c.kv_out();
      } else if (m.find("o_proj") != std::string::npos || m.find("down_proj") != std::string::npos) {
        lm.out_features = c.hidden_size;
      } else {
        lm.out_features = c.intermediate_size;
      }
      out.push_back(std::move(lm));
    }
  }
  return out;
}

// The one shard holding every tensor "<module>.*" of a quantized module (the decoders read a
// module from one safetensors object). NOT_FOUND / INVALID_ARGUMENT naming the module.
absl::StatusOr<SafetensorsModel::Location> QuantizedModuleShard(const SafetensorsModel& model,
                                                                const std::string& module,
                                                                std::string_view first_tensor) {
  const std::string first = Cat(module, ".", first_tensor);
  absl::StatusOr<SafetensorsModel::Location> loc = model.Find(first);
  if (!loc.ok()) {
    return absl::Status(loc.status().code(),
                        Cat("module '", module, "' has neither '", module,
                            ".weight' nor its quantized tensor: ", loc.status().message()));
  }
  const std::string prefix = module + ".";
  for (const std::string& name : model.TensorNames()) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    QF_ASSIGN_OR_RETURN(SafetensorsModel::Location other, model.Find(name));
    if (other.key != loc->key) {
      return absl::InvalidArgumentError(
          Cat("module '", module, "': tensor '", name, "' is in ", other.key, " but '", first,
              "' is in ", loc->key, "; the decoder reads one module from one shard (rewrite the "
              "model with the module's tensors in one shard)"));
    }
  }
  return loc;
}

std::string ConfigMismatch(const DecoderModelConfig& r, const DecoderModelConfig& c) {
  const quant::DecoderConfig &a = r.decoder, &b = c.decoder;
  auto num = [](auto x) { return Cat(x); };
  const std::pair<const char*, std::pair<std::string, std::string>> fields[] = {
      {"architectures", {r.architecture, c.architecture}},
      {"hidden_size", {num(a.hidden_size), num(b.hidden_size)}},
      {"num_attention_heads", {num(a.num_attention_heads), num(b.num_attention_heads)}},
      {"num_key_value_heads", {num(a.num_key_value_heads), num(b.num_key_value_heads)}},
      {"head_dim", {num(a.head_dim), num(b.head_dim)}},
      {"intermediate_size", {num(a.intermediate_size), num(b.intermediate_size)}},
      {"num_hidden_layers", {num(a.num_hidden_layers), num(b.num_hidden_layers)}},
      {"vocab_size", {num(a.vocab_size), num(b.vocab_size)}},
      {"max_position_embeddings",
       {num(a.max_position_embeddings), num(b.max_position_embeddings)}},
      {"rms_norm_eps", {num(a.rms_norm_eps), num(b.rms_norm_eps)}},
      {"rope_theta", {num(a.rope_theta), num(b.rope_theta)}},
      {"rope_scaling", {num(a.has_llama3_rope_scaling) + num(a.llama3_rope_scaling.factor) +
                            num(a.llama3_rope_scaling.low_freq_factor) +
                            num(a.llama3_rope_scaling.high_freq_factor) +
                            num(a.llama3_rope_scaling.original_max_position_embeddings),
                        num(b.has_llama3_rope_scaling) + num(b.llama3_rope_scaling.factor) +
                            num(b.llama3_rope_scaling.low_freq_factor) +
                            num(b.llama3_rope_scaling.high_freq_factor) +
                            num(b.llama3_rope_scaling.original_max_position_embeddings)}},
      {"attention_bias", {num(a.attention_bias), num(b.attention_bias)}},
      {"o_proj bias (attention_bias)", {num(a.o_proj_bias), num(b.o_proj_bias)}},
      {"mlp_bias", {num(a.mlp_bias), num(b.mlp_bias)}},
      {"qk_norm (architecture)", {num(a.qk_norm), num(b.qk_norm)}},
      {"sliding_window", {num(r.sliding_window), num(c.sliding_window)}},
  };
  for (const auto& [field, values] : fields) {
    if (values.first != values.second) {
      return Cat(field, " is ", values.first, " in the reference but ", values.second,
                 " in the candidate");
    }
  }
  return "";
}

// One model's head as float32: model.norm.weight [hidden] and lm_head.weight (or
// model.embed_tokens.weight when tied) [vocab, hidden].
struct HeadTensors {
  std::vector<float> norm, lm_head;
};

absl::StatusOr<std::vector<float>> ReadShaped(ObjectStore& store, const SafetensorsModel& model,
                                              const std::string& name,
                                              const std::vector<int64_t>& shape,
                                              std::string_view which) {
  absl::StatusOr<SafetensorsModel::Location> loc = model.Find(name);
  if (!loc.ok()) {
    return absl::Status(loc.status().code(), Cat("the ", which, " model's head: ",
                                                 loc.status().message()));
  }
  if (loc->info->shape != shape) {
    std::string got, want;
    for (int64_t d : loc->info->shape) absl::StrAppend(&got, got.empty() ? "" : ", ", d);
    for (int64_t d : shape) absl::StrAppend(&want, want.empty() ? "" : ", ", d);
    return absl::InvalidArgumentError(Cat("the ", which, " model's tensor '", name, "' in ",
                                          loc->key, " is [", got, "], config.json implies [",
                                          want, "]"));
  }
  return ReadTensorAsF32(store, loc->key, *loc->header, *loc->info);
}

absl::StatusOr<HeadTensors> ReadHead(ObjectStore& store, const SafetensorsModel& model,
                                     const quant::DecoderConfig& c, std::string_view which) {
  HeadTensors h;
  QF_ASSIGN_OR_RETURN(h.norm, ReadShaped(store, model, "model.norm.weight", {c.hidden_size}, which));
  std::string head = "lm_head.weight";
  if (c.tie_word_embeddings && !model.Find(head).ok()) head = "model.embed_tokens.weight";
  QF_ASSIGN_OR_RETURN(h.lm_head,
                      ReadShaped(store, model, head, {c.vocab_size, c.hidden_size}, which));
  return h;
}

// Σ_o ΔW_o S ΔW_oᵀ and Σ_o W_o S W_oᵀ for W, Ŵ [out, in] and S [in, in] (float64, symmetric):
// S rounded to float32 once, (ΔW S) and (W S) by float32 GEMMs in row blocks, the traces
// accumulated in float64 in row order.
void ModuleErrorTraces(const std::vector<float>& w, const std::vector<float>& w_hat,
                       int64_t out, int64_t in, const std::vector<double>& s,
                       double* output_error, double* reference_energy) {
  std::vector<float> s32(s.size());
  for (size_t i = 0; i < s.size(); ++i) s32[i] = static_cast<float>(s[i]);
  const int64_t block = std::min(out, kErrorRowBlock);
  std::vector<float> dw(static_cast<size_t>(block * in)), y(static_cast<size_t>(block * in));
  std::vector<double> rows_err(static_cast<size_t>(block)), rows_energy(static_cast<size_t>(block));
  double err = 0, energy = 0;
  for (int64_t r0 = 0; r0 < out; r0 += block) {
    const int64_t m = std::min(block, out - r0);
    const float* wr = w.data() + r0 * in;
    const float* hr = w_hat.data() + r0 * in;
    for (int64_t i = 0; i < m * in; ++i) dw[i] = hr[i] - wr[i];
    quant::Gemm(false, false, m, in, in, 1.0f, dw.data(), in, s32.data(), in, 0.0f, y.data(), in);
    quant::ParallelFor(m, 1, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        double e = 0;
        for (int64_t i = 0; i < in; ++i) e += static_cast<double>(dw[r * in + i]) * y[r * in + i];
        rows_err[r] = e;
      }
    });
    quant::Gemm(false, false, m, in, in, 1.0f, wr, in, s32.data(), in, 0.0f, y.data(), in);
    quant::ParallelFor(m, 1, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        double e = 0;
        for (int64_t i = 0; i < in; ++i) e += static_cast<double>(wr[r * in + i]) * y[r * in + i];
        rows_energy[r] = e;
      }
    });
    for (int64_t r = 0; r < m; ++r) {
      err += rows_err[r];
      energy += rows_energy[r];
    }
  }
  // A PSD form: rounding can only make a tiny value negative.
  *output_error = std::max(err, 0.0);
  *reference_energy = std::max(energy, 0.0);
}

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

std::string Shortest(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.4g", v);
  return buf;
}

absl::Status ForwardError(const quant::DecoderForward& forward, std::string_view which,
                          int64_t layer, const Status& st) {
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(st.code())),
                      Cat("evaluation forward pass (", forward.backend(), ") of the ", which,
                          " model, layer ", layer, ": ", st.message()));
}

}  // namespace

std::string ModelQuantization::Describe() const {
  switch (method) {
    case Method::kGptq:
      return Cat("gptq ", gptq_bits, "-bit",
                 gptq_format == quant::GptqCheckpointFormat::kV2 ? " (gptq_v2)" : "");
    case Method::kVptq:
      return "vptq";
    case Method::kNone:
      break;
  }
  return "none";
}

absl::StatusOr<ModelQuantization> ReadModelQuantization(ObjectStore& store,
                                                        std::string_view model_dir) {
  const std::string key = Cat(model_dir, "config.json");
  absl::StatusOr<std::string> text = store.ReadAll(key);
  if (!text.ok()) {
    return absl::Status(text.status().code(), Cat("model config ", key, " in ", store.uri(), ": ",
                                                  text.status().message()));
  }
  const std::string source = Cat(store.uri(), "/", key);
  const Json config = Json::parse(*text, nullptr, false);
  if (!config.is_object()) {
    return absl::InvalidArgumentError(Cat(source, ": not a JSON object"));
  }
  ModelQuantization q;
  auto it = config.find("quantization_config");
  if (it == config.end() || it->is_null()) return q;
  const Json& qc = *it;
  if (!qc.is_object()) {
    return absl::InvalidArgumentError(Cat(source, ": quantization_config is not an object"));
  }
  auto m = qc.find("quant_method");
  if (m == qc.end() || !m->is_string()) {
    return absl::InvalidArgumentError(
        Cat(source, ": quantization_config.quant_method is missing or not a string (supported: "
                    "gptq, vptq)"));
  }
  const std::string method = m->get<std::string>();
  if (method == "gptq") {
    q.method = ModelQuantization::Method::kGptq;
    auto b = qc.find("bits");
    if (b == qc.end() || !b->is_number_integer()) {
      return absl::InvalidArgumentError(
          Cat(source, ": quantization_config.bits is missing or not an integer"));
    }
    const int64_t bits = b->get<int64_t>();
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
      return absl::InvalidArgumentError(Cat(source, ": quantization_config.bits is ", bits,
                                            "; the GPTQ loaders decode 2, 3, 4 or 8 bits"));
    }
    q.gptq_bits = static_cast<int>(bits);
    auto f = qc.find("checkpoint_format");
    if (f != qc.end() && !f->is_null()) {
      if (!f->is_string()) {
        return absl::InvalidArgumentError(
            Cat(source, ": quantization_config.checkpoint_format is not a string"));
      }
      StatusOr<quant::GptqCheckpointFormat> parsed =
          quant::ParseCheckpointFormat(f->get<std::string>());
      if (!parsed.ok()) {
        return absl::InvalidArgumentError(
            Cat(source, ": quantization_config.checkpoint_format is '", f->get<std::string>(),
                "'; supported: gptq, gptq_v2"));
      }
      q.gptq_format = *parsed;
    }
    return q;
  }
  if (method == "vptq") {
    q.method = ModelQuantization::Method::kVptq;
    auto layers = qc.find("config_for_layers");
    if (layers == qc.end() || !layers->is_object()) {
      return absl::InvalidArgumentError(
          Cat(source, ": quantization_config.config_for_layers is missing or not an object of "
                      "module name → layer config"));
    }
    for (const auto& [module, entry] : layers->items()) {
      absl::StatusOr<quant::VptqLayerConfig> parsed = VptqLayerConfigFromJson(entry);
      if (!parsed.ok()) {
        return absl::InvalidArgumentError(Cat(source, ": quantization_config.config_for_layers[\"",
                                              module, "\"]: ", parsed.status().message()));
      }
    }
    q.vptq_config_for_layers = *layers;
    return q;
  }
  return absl::InvalidArgumentError(Cat(source, ": quantization_config.quant_method '", method,
                                        "' is not supported (supported: gptq, vptq)"));
}

absl::StatusOr<quant::DecoderLayerWeights> ReadLoaderLayerWeights(
    ObjectStore& store, const SafetensorsModel& model, const ModelQuantization& quantization,
    const quant::DecoderConfig& c, int64_t layer, std::vector<std::string>* quantized_modules) {
  if (layer < 0 || layer >= c.num_hidden_layers) {
    return absl::InvalidArgumentError(
        Cat("decoder layer ", layer, " is outside [0, ", c.num_hidden_layers, ")"));
  }
  const std::vector<LinearModule> modules = LayerModules(c, layer);
  std::vector<const LinearModule*> quantized;
  std::vector<std::string> quantized_names;
  for (const LinearModule& m : modules) {
    if (model.Find(m.name + ".weight").ok()) continue;
    quantized.push_back(&m);
    quantized_names.push_back(m.name);
  }
  QF_ASSIGN_OR_RETURN(quant::DecoderLayerWeights w,
                      ReadDecoderLayerTensors(store, model, c, layer, quantized_names));
  for (const LinearModule* m : quantized) {
    absl::StatusOr<Matrix> decoded;
    switch (quantization.method) {
      case ModelQuantization::Method::kNone:
        return absl::InvalidArgumentError(
            Cat("module '", m->name, "' has no tensor '", m->name,
                ".weight' and config.json has no quantization_config to decode it by"));
      case ModelQuantization::Method::kGptq: {
        QF_ASSIGN_OR_RETURN(SafetensorsModel::Location loc,
                            QuantizedModuleShard(model, m->name, "qweight"));
        const int64_t rows = loc.info->shape.empty() ? 0 : loc.info->shape[0];
        if (rows * 32 != static_cast<int64_t>(quantization.gptq_bits) * m->in_features) {
          return absl::InvalidArgumentError(
              Cat(loc.key, ": tensor '", m->name, ".qweight' has ", rows, " rows, but ",
                  quantization.gptq_bits, "-bit codes of ", m->in_features,
                  " inputs need ", quantization.gptq_bits * m->in_features / 32,
                  " (quantization_config.bits disagrees with the tensors)"));
        }
        decoded = DequantizeGptqModule({&store, loc.key, loc.header, m->name}, m->out_features,
                                       m->in_features, quantization.gptq_format);
        break;
      }
      case ModelQuantization::Method::kVptq: {
        auto entry = quantization.vptq_config_for_layers.find(m->name);
        if (entry == quantization.vptq_config_for_layers.end()) {
          return absl::InvalidArgumentError(
              Cat("module '", m->name, "' has no tensor '", m->name,
                  ".weight' and no entry in quantization_config.config_for_layers"));
        }
        QF_ASSIGN_OR_RETURN(SafetensorsModel::Location loc,
                            QuantizedModuleShard(model, m->name, "indices"));
        decoded = DequantizeVptqModule({&store, loc.key, loc.header, m->name}, *entry);
        break;
      }
    }
    if (!decoded.ok()) {
      return absl::Status(decoded.status().code(),
                          Cat("decoding module '", m->name, "' (", quantization.Describe(),
                              "): ", decoded.status().message()));
    }
    if (decoded->rows != m->out_features || decoded->cols != m->in_features) {
      return absl::InvalidArgumentError(Cat("module '", m->name, "' decodes to [", decoded->rows,
                                            ", ", decoded->cols, "], config.json implies [",
                                            m->out_features, ", ", m->in_features, "]"));
    }
    for (float v : decoded->data) {
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            Cat("module '", m->name, "' decodes to non-finite weights (its scales or codebooks "
                                     "are corrupt)"));
      }
    }
    w.*(m->weight) = std::move(decoded->data);
  }
  Status valid = quant::ValidateDecoderLayerWeights(c, w);
  if (!valid.ok()) {
    return absl::InvalidArgumentError(Cat("model.layers.", layer, ".: ", valid.message()));
  }
  if (quantized_modules != nullptr) *quantized_modules = std::move(quantized_names);
  return w;
}

absl::Status EvaluationSums::Add(const EvaluationSums& other) {
  const bool empty = samples == 0 && predicted_tokens == 0 && modules.empty();
  if (empty) {
    modules = other.modules;
  } else {
    if (modules.size() != other.modules.size()) {
      return absl::InvalidArgumentError(Cat("evaluation sums: ", modules.size(), " vs ",
                                            other.modules.size(),
                                            " quantized modules; the shards evaluated different "
                                            "models"));
    }
    std::map<std::string_view, const ModuleErrorSums*> by_name;
    for (const ModuleErrorSums& m : other.modules) by_name[m.module] = &m;
    for (const ModuleErrorSums& m : modules) {
      auto it = by_name.find(m.module);
      if (it == by_name.end() || it->second->layer != m.layer) {
        return absl::InvalidArgumentError(Cat("evaluation sums: module '", m.module,
                                              "' is missing from the other shard's; the shards "
                                              "evaluated different models"));
      }
    }
    for (ModuleErrorSums& m : modules) {
      const ModuleErrorSums& o = *by_name[m.module];
      m.output_error += o.output_error;
      m.reference_energy += o.reference_energy;
    }
  }
  samples += other.samples;
  predicted_tokens += other.predicted_tokens;
  nll_reference += other.nll_reference;
  nll_candidate += other.nll_candidate;
  kl += other.kl;
  top1_agree += other.top1_agree;
  return absl::OkStatus();
}

std::string EvaluationSumsToJson(const EvaluationSums& s) {
  Json modules = Json::array();
  for (const ModuleErrorSums& m : s.modules) {
    modules.push_back({{"module", m.module},
                       {"layer", m.layer},
                       {"output_error", m.output_error},
                       {"reference_energy", m.reference_energy}});
  }
  const Json j = {{"samples", s.samples},
                  {"predicted_tokens", s.predicted_tokens},
                  {"nll_reference", s.nll_reference},
                  {"nll_candidate", s.nll_candidate},
                  {"kl", s.kl},
                  {"top1_agree", s.top1_agree},
                  {"modules", modules}};
  return j.dump(2) + "\n";  // nlohmann prints doubles with 17 significant digits
}

absl::StatusOr<EvaluationSums> EvaluationSumsFromJson(std::string_view json,
                                                      std::string_view source) {
  const Json j = Json::parse(json, nullptr, false);
  if (!j.is_object()) {
    return absl::InvalidArgumentError(Cat(source, ": not a JSON object (evaluation sums)"));
  }
  auto integer = [&](const Json& o, const char* key, std::string_view where,
                     int64_t* out) -> absl::Status {
    auto it = o.find(key);
    if (it == o.end() || !it->is_number_integer() || it->get<int64_t>() < 0) {
      return absl::InvalidArgumentError(
          Cat(source, ": ", where, key, " is missing or not a non-negative integer"));
    }
    *out = it->get<int64_t>();
    return absl::OkStatus();
  };
  auto real = [&](const Json& o, const char* key, std::string_view where,
                  double* out) -> absl::Status {
    auto it = o.find(key);
    if (it == o.end() || !it->is_number() || !std::isfinite(it->get<double>()) ||
        it->get<double>() < 0) {
      return absl::InvalidArgumentError(
          Cat(source, ": ", where, key, " is missing or not a finite non-negative number"));
    }
    *out = it->get<double>();
    return absl::OkStatus();
  };
  EvaluationSums s;
  QF_RETURN_IF_ERROR(integer(j, "samples", "", &s.samples));
  QF_RETURN_IF_ERROR(integer(j, "predicted_tokens", "", &s.predicted_tokens));
  QF_RETURN_IF_ERROR(real(j, "nll_reference", "", &s.nll_reference));
  QF_RETURN_IF_ERROR(real(j, "nll_candidate", "", &s.nll_candidate));
  // KL is ≥ 0 in exact arithmetic; a shard's float64 sum may round a hair below.
  auto kl = j.find("kl");
  if (kl == j.end() || !kl->is_number() || !std::isfinite(kl->get<double>())) {
    return absl::InvalidArgumentError(Cat(source, ": kl is missing or not a finite number"));
  }
  s.kl = kl->get<double>();
  if (s.kl < -1e-9 * std::max<double>(1, static_cast<double>(s.predicted_tokens))) {
    return absl::InvalidArgumentError(Cat(source, ": kl is ", s.kl, ", a KL divergence is >= 0"));
  }
  QF_RETURN_IF_ERROR(integer(j, "top1_agree", "", &s.top1_agree));
  if (s.top1_agree > s.predicted_tokens) {
    return absl::InvalidArgumentError(Cat(source, ": top1_agree ", s.top1_agree,
                                          " is above predicted_tokens ", s.predicted_tokens));
  }
  auto modules = j.find("modules");
  if (modules == j.end() || !modules->is_array()) {
    return absl::InvalidArgumentError(Cat(source, ": modules is missing or not an array"));
  }
  std::set<std::string> seen;
  for (size_t i = 0; i < modules->size(); ++i) {
    const Json& e = (*modules)[i];
    const std::string where = Cat("modules[", i, "].");
    if (!e.is_object()) return absl::InvalidArgumentError(Cat(source, ": ", where, " not an object"));
    ModuleErrorSums m;
    auto name = e.find("module");
    if (name == e.end() || !name->is_string() || name->get<std::string>().empty()) {
      return absl::InvalidArgumentError(Cat(source, ": ", where, "module is missing or empty"));
    }
    m.module = name->get<std::string>();
    if (!seen.insert(m.module).second) {
      return absl::InvalidArgumentError(Cat(source, ": ", where, "module '", m.module,
                                            "' is listed twice"));
    }
    QF_RETURN_IF_ERROR(integer(e, "layer", where, &m.layer));
    QF_RETURN_IF_ERROR(real(e, "output_error", where, &m.output_error));
    QF_RETURN_IF_ERROR(real(e, "reference_energy", where, &m.reference_energy));
    s.modules.push_back(std::move(m));
  }
  return s;
}

absl::StatusOr<EvaluationShardOutcome> RunEvaluationShard(const EvaluationShardJob& job) {
  if (job.reference_store == nullptr || job.reference_model == nullptr ||
      job.candidate_store == nullptr || job.candidate_model == nullptr ||
      job.candidate_quantization == nullptr || job.reference_config == nullptr ||
      job.candidate_config == nullptr || job.data == nullptr || job.forward == nullptr ||
      job.out_store == nullptr || job.staged_key.empty()) {
    return absl::InvalidArgumentError(
        "evaluation shard: both models (store, model, config), the candidate's quantization, "
        "data, forward pass, output store and staged key are all required");
  }
  const std::string mismatch = ConfigMismatch(*job.reference_config, *job.candidate_config);
  if (!mismatch.empty()) {
    return absl::InvalidArgumentError(
        Cat("evaluation shard: the models' config.json differ: ", mismatch,
            "; the candidate must be a quantization of the reference"));
  }
  QF_RETURN_IF_ERROR(CheckForwardShard("evaluation shard", *job.reference_config, *job.data,
                                       job.sample_begin, job.sample_end, "--eval-seq-len"));
  const quant::DecoderConfig& c = job.reference_config->decoder;
  const CalibrationData& d = *job.data;
  const int64_t L = d.seq_len, ns = job.sample_end - job.sample_begin, T = ns * L;
  const int32_t* ids = d.ids.data() + job.sample_begin * L;
  const uint8_t* mask = d.mask.empty() ? nullptr : d.mask.data() + job.sample_begin * L;
  if (mask != nullptr && std::count(mask, mask + T, uint8_t{1}) == 0) {
    return absl::InvalidArgumentError(Cat("evaluation shard: samples [", job.sample_begin, ", ",
                                          job.sample_end, ") hold no real token"));
  }

  EvaluationShardOutcome out;
  const uint64_t values = static_cast<uint64_t>(T) * static_cast<uint64_t>(c.hidden_size);
  QF_ASSIGN_OR_RETURN(std::unique_ptr<HiddenStates> ref_hidden,
                      HiddenStates::Create(values, job.spill_above_bytes, job.spill_dir));
  QF_ASSIGN_OR_RETURN(std::unique_ptr<HiddenStates> cand_hidden,
                      HiddenStates::Create(values, job.spill_above_bytes, job.spill_dir));
  out.spilled = ref_hidden->spilled() || cand_hidden->spilled();

  auto t0 = Clock::now();
  QF_RETURN_IF_ERROR(EmbedTokens(*job.reference_store, *job.reference_model, c, ids, T,
                                 ref_hidden->data()));
  QF_RETURN_IF_ERROR(EmbedTokens(*job.candidate_store, *job.candidate_model, c, ids, T,
                                 cand_hidden->data()));
  out.read_seconds += SecondsSince(t0);

  const quant::TokenBatch batch = d.Batch(job.sample_begin, job.sample_end);
  const double units = static_cast<double>(c.num_hidden_layers) + 1.0;  // layers + the head
  auto report = [&job, units](double done) {
    return !job.progress || job.progress(std::min(done, units) / units);
  };
  EvaluationSums& sums = out.sums;
  sums.samples = ns;
  quant::LayerHessianSums hessians;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    t0 = Clock::now();
    QF_ASSIGN_OR_RETURN(quant::DecoderLayerWeights ref_w,
                        ReadDecoderLayerWeights(*job.reference_store, *job.reference_model, c,
                                                layer));
    std::vector<std::string> quantized;
    QF_ASSIGN_OR_RETURN(quant::DecoderLayerWeights cand_w,
                        ReadLoaderLayerWeights(*job.candidate_store, *job.candidate_model,
                                               *job.candidate_quantization, c, layer, &quantized));
    out.read_seconds += SecondsSince(t0);

    // The reference's forward accumulates the inputs the quantized modules read.
    t0 = Clock::now();
    const std::vector<LinearModule> modules = LayerModules(c, layer);
    std::vector<const LinearModule*> measured;
    for (int i = 0; i < quant::kNumDecoderInputs; ++i) hessians.wanted[i] = false;
    for (const LinearModule& m : modules) {
      if (std::find(quantized.begin(), quantized.end(), m.name) == quantized.end()) continue;
      measured.push_back(&m);
      hessians.wanted[static_cast<int>(m.input)] = true;
    }
    hessians.Reset(c);
    const double base = static_cast<double>(layer);
    std::function<bool(double)> half;
    if (job.progress) {
      half = [&report, base](double f) { return report(base + 0.5 * std::min(f, 1.0)); };
    }
    Status st = job.forward->ForwardLayer(c, ref_w, batch, ref_hidden->data(),
                                          measured.empty() ? nullptr : &hessians, half);
    if (!st.ok()) return ForwardError(*job.forward, "reference", layer, st);
    out.forward_seconds += SecondsSince(t0);

    t0 = Clock::now();
    for (const LinearModule* m : measured) {
      ModuleErrorSums e;
      e.module = m->name;
      e.layer = layer;
      ModuleErrorTraces(ref_w.*(m->weight), cand_w.*(m->weight), m->out_features,
                        m->in_features, hessians.sums[static_cast<int>(m->input)],
                        &e.output_error, &e.reference_energy);
      sums.modules.push_back(std::move(e));
    }
    ref_w = quant::DecoderLayerWeights();
    out.head_seconds += SecondsSince(t0);

    t0 = Clock::now();
    if (job.progress) {
      half = [&report, base](double f) { return report(base + 0.5 + 0.5 * std::min(f, 1.0)); };
    }
    st = job.forward->ForwardLayer(c, cand_w, batch, cand_hidden->data(), nullptr, half);
    if (!st.ok()) return ForwardError(*job.forward, "candidate", layer, st);
    out.forward_seconds += SecondsSince(t0);
    if (!report(base + 1.0)) {
      return absl::CancelledError(
          Cat("evaluation shard cancelled after layer ", layer, " of ", c.num_hidden_layers));
    }
  }

  t0 = Clock::now();
  QF_ASSIGN_OR_RETURN(HeadTensors ref_head,
                      ReadHead(*job.reference_store, *job.reference_model, c, "reference"));
  QF_ASSIGN_OR_RETURN(HeadTensors cand_head,
                      ReadHead(*job.candidate_store, *job.candidate_model, c, "candidate"));
  out.read_seconds += SecondsSince(t0);
  t0 = Clock::now();
  quant::HeadComparisonSums head;
  QF_RETURN_IF_ERROR(ToAbslStatus(quant::CompareDecoderHeads(
      c, {ref_head.norm.data(), ref_head.lm_head.data()},
      {cand_head.norm.data(), cand_head.lm_head.data()}, ref_hidden->data(), cand_hidden->data(),
      ids, mask, ns, L, &head)));
  out.head_seconds += SecondsSince(t0);
  sums.predicted_tokens = head.predicted_tokens;
  sums.nll_reference = head.nll_reference;
  sums.nll_candidate = head.nll_candidate;
  sums.kl = head.kl;
  sums.top1_agree = head.top1_agree;
  if (sums.predicted_tokens == 0) {
    return absl::InvalidArgumentError(
        Cat("evaluation shard: samples [", job.sample_begin, ", ", job.sample_end,
            ") have no position whose token and next token are both real; use longer samples"));
  }
  if (!report(units)) return absl::CancelledError("evaluation shard cancelled after the head");
  QF_RETURN_IF_ERROR(job.out_store->Put(job.staged_key, EvaluationSumsToJson(sums)));
  return out;
}

QualityMetrics MetricsFromSums(const EvaluationSums& s) {
  QualityMetrics m;
  m.samples = s.samples;
  m.tokens = s.predicted_tokens;
  m.modules = s.modules;
  if (s.predicted_tokens <= 0) return m;
  const double n = static_cast<double>(s.predicted_tokens);
  m.ppl_reference = std::exp(s.nll_reference / n);
  m.ppl_candidate = std::exp(s.nll_candidate / n);
  // exp(a − b) − 1 exactly 0 when the two sums are equal (a candidate identical to its original).
  m.ppl_increase_pct = std::expm1((s.nll_candidate - s.nll_reference) / n) * 100.0;
  m.mean_kl = s.kl / n;
  m.top1_agreement = static_cast<double>(s.top1_agree) / n;
  return m;
}

absl::StatusOr<QualityMetrics> ReduceEvaluation(ObjectStore& store,
                                                const std::vector<std::string>& partial_keys) {
  if (partial_keys.empty()) {
    return absl::InvalidArgumentError("evaluation reduce: no partial sums to reduce");
  }
  // Sorted, so the float64 sums do not depend on the order given.
  std::vector<std::string> keys = partial_keys;
  std::sort(keys.begin(), keys.end());
  for (size_t i = 1; i < keys.size(); ++i) {
    if (keys[i] == keys[i - 1]) {
      return absl::InvalidArgumentError(
          Cat("evaluation reduce: partial '", keys[i], "' is listed twice"));
    }
  }
  EvaluationSums total;
  for (const std::string& key : keys) {
    absl::StatusOr<std::string> text = store.ReadAll(key);
    if (!text.ok()) {
      return absl::Status(text.status().code(), Cat("evaluation reduce: partial ", key, " in ",
                                                    store.uri(), ": ", text.status().message()));
    }
    QF_ASSIGN_OR_RETURN(EvaluationSums s,
                        EvaluationSumsFromJson(*text, Cat("evaluation partial ", key)));
    absl::Status added = total.Add(s);
    if (!added.ok()) {
      return absl::InvalidArgumentError(Cat("evaluation reduce: partial ", key, ": ",
                                            added.message()));
    }
  }
  if (total.predicted_tokens <= 0) {
    return absl::InvalidArgumentError("evaluation reduce: the partials predicted no token");
  }
  return MetricsFromSums(total);
}

absl::Status CheckQualityGate(const QualityMetrics& m, const QualityGate& gate) {
  if (!gate.enabled()) return absl::OkStatus();
  if ((gate.max_ppl_increase_pct && !std::isfinite(*gate.max_ppl_increase_pct)) ||
      (gate.max_kl && (!std::isfinite(*gate.max_kl) || *gate.max_kl < 0))) {
    return absl::InvalidArgumentError(
        "quality gate: max_ppl_increase_pct must be finite and max_kl finite and >= 0");
  }
  if (m.tokens <= 0) {
    return absl::FailedPreconditionError("quality gate: the evaluation predicted no token");
  }
  std::vector<std::string> missed;
  if (gate.max_ppl_increase_pct && !(m.ppl_increase_pct <= *gate.max_ppl_increase_pct)) {
    missed.push_back(Cat("perplexity rose ", Fixed(m.ppl_increase_pct, 2), " % (",
                         Shortest(m.ppl_reference), " → ", Shortest(m.ppl_candidate),
                         "), allowed ", Fixed(*gate.max_ppl_increase_pct, 2), " %"));
  }
  if (gate.max_kl && !(m.mean_kl <= *gate.max_kl)) {
    missed.push_back(Cat("mean KL ", Shortest(m.mean_kl), " nats, allowed ",
                         Shortest(*gate.max_kl)));
  }
  if (missed.empty()) return absl::OkStatus();
  std::string msg = "quality gate: ";
  for (size_t i = 0; i < missed.size(); ++i) absl::StrAppend(&msg, i ? "; " : "", missed[i]);
  return absl::FailedPreconditionError(msg);
}

nlohmann::json QualityMetricsToJson(const QualityMetrics& m, const QualityGate& gate) {
  Json modules = Json::array();
  for (const ModuleErrorSums& e : m.modules) {
    modules.push_back(
        {{"module", e.module}, {"layer", e.layer}, {"relative_error", e.relative_error()}});
  }
  Json j = {{"samples", m.samples},
            {"tokens", m.tokens},
            {"ppl_reference", m.ppl_reference},
            {"ppl_candidate", m.ppl_candidate},
            {"ppl_increase_pct", m.ppl_increase_pct},
            {"mean_kl", m.mean_kl},
            {"top1_agreement", m.top1_agreement},
            {"modules", modules}};
  if (m.bits_per_weight > 0) j["bits_per_weight"] = m.bits_per_weight;
  if (gate.enabled()) {
    Json g = {{"passed", CheckQualityGate(m, gate).ok()}};
    if (gate.max_ppl_increase_pct) g["max_ppl_increase_pct"] = *gate.max_ppl_increase_pct;
    if (gate.max_kl) g["max_kl"] = *gate.max_kl;
    j["gate"] = std::move(g);
  }
  return j;
}

absl::StatusOr<double> QuantizedBitsPerWeight(const SafetensorsModel& candidate,
                                              const quant::DecoderConfig& c,
                                              const std::vector<ModuleErrorSums>& modules) {
  if (modules.empty()) return 0.0;
  std::map<std::string, int64_t> weights;  // module → out · in
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    for (const LinearModule& m : LayerModules(c, layer)) {
      weights[m.name] = m.out_features * m.in_features;
    }
  }
  std::map<std::string, uint64_t> bytes;
  for (const ModuleErrorSums& m : modules) {
    if (weights.count(m.module) == 0) {
      return absl::InvalidArgumentError(
          Cat("bits per weight: '", m.module, "' is not a decoder linear module of the model"));
    }
    bytes[m.module] = 0;
  }
  for (const std::string& name : candidate.TensorNames()) {
    const size_t dot = name.rfind('.');
    if (dot == std::string::npos || name.compare(dot, std::string::npos, ".bias") == 0) continue;
    auto it = bytes.find(name.substr(0, dot));
    if (it == bytes.end()) continue;
    QF_ASSIGN_OR_RETURN(SafetensorsModel::Location loc, candidate.Find(name));
    it->second += loc.info->num_bytes();
  }
  double bits = 0, count = 0;
  for (const auto& [module, b] : bytes) {
    bits += 8.0 * static_cast<double>(b);
    count += static_cast<double>(weights[module]);
  }
  return bits / count;
}

absl::Status RecordQualityInManifest(ObjectStore& store, std::string_view dir,
                                     const QualityMetrics& metrics, const QualityGate& gate) {
  const std::string key = Cat(dir, kManifestName);
  absl::StatusOr<std::string> text = store.ReadAll(key);
  if (!text.ok()) {
    return absl::Status(text.status().code(), Cat("the artifact's manifest ", key, " in ",
                                                  store.uri(), ": ", text.status().message()));
  }
  Json manifest = Json::parse(*text, nullptr, false);
  if (!manifest.is_object()) {
    return absl::InvalidArgumentError(
        Cat("the artifact's manifest ", key, " in ", store.uri(), " is not a JSON object"));
  }
  manifest["quality"] = QualityMetricsToJson(metrics, gate);
  if (gate.enabled()) {
    manifest["quality_gate"] = CheckQualityGate(metrics, gate).ok() ? "passed" : "failed";
  } else {
    manifest.erase("quality_gate");
  }
  std::string out = manifest.dump(2);
  out.push_back('\n');
  return store.Put(key, out);  // ObjectStore::Put replaces atomically
}

uint64_t EvaluationTaskMemoryBytes(const quant::DecoderConfig& c, int64_t samples,
                                   int64_t seq_len, uint64_t spill_above_bytes) {
  const uint64_t H = static_cast<uint64_t>(std::max<int64_t>(c.hidden_size, 0));
  const uint64_t QO = static_cast<uint64_t>(std::max<int64_t>(c.q_out(), 0));
  const uint64_t I = static_cast<uint64_t>(std::max<int64_t>(c.intermediate_size, 0));
  const uint64_t V = static_cast<uint64_t>(std::max<int64_t>(c.vocab_size, 0));
  const uint64_t T = static_cast<uint64_t>(std::max<int64_t>(samples, 0)) *
                     static_cast<uint64_t>(std::max<int64_t>(seq_len, 0));
  // The calibration task's memory (one layer's weights, the float64 sums, one hidden-state
  // buffer, the forward's activations, ids) ...
  const uint64_t calibration = CalibrationTaskMemoryBytes(c, samples, seq_len, spill_above_bytes);
  // ... plus the candidate's layer and its decode scratch (the largest module's float32 weight
  // and its packed tensors, at most as large again), the second hidden-state buffer, the
  // module error's float32 S and two [256, in] GEMM blocks, and the head: both models' norm
  // and LM head and a chunk of both models' logits.
  const uint64_t D = std::max({H, QO, I});
  const uint64_t largest = std::max({QO * H, H * QO, I * H, H * I});
  const uint64_t candidate_layer = DecoderLayerWeightBytes(c) + 2 * 4 * largest;
  const uint64_t hidden = std::min<uint64_t>(4 * T * H, spill_above_bytes);
  const uint64_t error = 4 * D * D + 2 * 4 * 256 * D;
  const uint64_t head = 2 * 4 * (V * H + H) +
                        quant::DecoderHeadScratchBytes(c, static_cast<int64_t>(T), 0);
  return calibration + candidate_layer + hidden + error + head;
}

}  // namespace qforge

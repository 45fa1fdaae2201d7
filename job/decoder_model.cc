#include "job/decoder_model.h"

#include <algorithm>
#include <cmath>
#include <future>
#include <numeric>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/json_error.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/status_bridge.h"
#include "nlohmann/json.hpp"

namespace qforge {
namespace {

using Json = nlohmann::json;

enum class Arch { kLlama, kMistral, kQwen2, kQwen3 };

struct ArchName {
  const char* architecture;
  const char* model_type;
  Arch arch;
};
constexpr ArchName kArchitectures[] = {
    {"LlamaForCausalLM", "llama", Arch::kLlama},
    {"MistralForCausalLM", "mistral", Arch::kMistral},
    {"Qwen2ForCausalLM", "qwen2", Arch::kQwen2},
    {"Qwen3ForCausalLM", "qwen3", Arch::kQwen3},
};

// Largest embedding read in one ranged request (rows coalesced up to this many bytes).
constexpr uint64_t kMaxEmbeddingReadBytes = uint64_t{64} << 20;
// Adjacent needed rows closer than this many bytes are read in one request (the gap is read
// and thrown away rather than paying for another request).
constexpr uint64_t kEmbeddingGapBytes = uint64_t{256} << 10;

std::string JsonType(const Json& v) { return v.type_name(); }

// Reads integer field `name` of `j` into *out. Absent or null: *out untouched unless
// `required`. Errors name the field and what it holds.
absl::Status GetInt(const Json& j, const char* name, bool required, std::string_view source,
                    int64_t* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(
        Cat(source, ": ", name, " is missing; a Llama-family config.json states it (an integer)"));
  }
  if (it->is_number_unsigned()) {
    const uint64_t v = it->get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) {
      return absl::InvalidArgumentError(
          Cat(source, ": ", name, " is ", v, ", too large for a size"));
    }
    *out = static_cast<int64_t>(v);
    return absl::OkStatus();
  }
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return absl::OkStatus();
  }
  if (it->is_number_float()) {
    const double d = it->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) {
      *out = static_cast<int64_t>(d);
      return absl::OkStatus();
    }
  }
  return absl::InvalidArgumentError(
      Cat(source, ": ", name, " is ", it->dump(), " (", JsonType(*it), "), expected an integer"));
}

absl::Status GetDouble(const Json& j, const char* name, std::string_view source, double* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) {
    return absl::InvalidArgumentError(
        Cat(source, ": ", name, " is ", it->dump(), " (", JsonType(*it), "), expected a number"));
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status GetBool(const Json& j, const char* name, std::string_view source, bool* out) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(Cat(source, ": ", name, " is ", it->dump(), " (",
                                          JsonType(*it), "), expected true or false"));
  }
  *out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ParseRopeScaling(const Json& j, std::string_view source, quant::DecoderConfig* c) {
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  const std::string where = Cat(source, ": rope_scaling");
  if (!it->is_object()) {
    return absl::InvalidArgumentError(
        Cat(where, " is ", it->dump(), "; expected null or an object"));
  }
  const Json& rs = *it;
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    auto t = rs.find(key);
    if (t != rs.end() && t->is_string()) {
      type = t->get<std::string>();
      break;
    }
  }
  if (type == "default") return absl::OkStatus();  // transformers: no scaling
  if (type != "llama3") {
    return absl::InvalidArgumentError(
        Cat(where, " has type '", type.empty() ? "(none)" : type,
            "'; only null or {\"rope_type\": \"llama3\", ...} (Llama 3.1+) is supported for "
            "calibration (linear, dynamic, yarn, longrope and others are not)"));
  }
  quant::Llama3RopeScaling s;
  struct Field {
    const char* name;
    double* value;
  };
  double original = static_cast<double>(s.original_max_position_embeddings);
  for (const Field& f : {Field{"factor", &s.factor}, Field{"low_freq_factor", &s.low_freq_factor},
                         Field{"high_freq_factor", &s.high_freq_factor},
                         Field{"original_max_position_embeddings", &original}}) {
    auto v = rs.find(f.name);
    if (v == rs.end() || !v->is_number()) {
      return absl::InvalidArgumentError(Cat(
          where, ".", f.name, " is ", v == rs.end() ? "missing" : v->dump(),
          "; a llama3 rope_scaling needs the number factor, low_freq_factor, high_freq_factor and "
          "original_max_position_embeddings"));
    }
    *f.value = v->get<double>();
  }
  if (!(original >= 1) || original != std::floor(original) || original > 1e12) {
    return absl::InvalidArgumentError(Cat(where, ".original_max_position_embeddings is ", original,
                                          "; expected a positive integer"));
  }
  s.original_max_position_embeddings = static_cast<int64_t>(original);
  c->has_llama3_rope_scaling = true;
  c->llama3_rope_scaling = s;
  return absl::OkStatus();
}

std::string LayerPrefix(int64_t layer) { return Cat("model.layers.", layer, "."); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  return Cat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

const char* SupportedCalibrationArchitectures() {
  return "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM";
}

absl::StatusOr<DecoderModelConfig> ParseDecoderModelConfig(std::string_view config_json,
                                                           std::string_view source) {
  Json j;
  try {
    j = Json::parse(config_json.begin(), config_json.end());
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        Cat(source, ": malformed JSON (", JsonErrorWithoutInput(e),
            "); config.json must be a JSON object"));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        Cat(source, ": is a JSON ", JsonType(j), ", expected an object"));
  }

  // The architecture: "architectures"[0], else "model_type".
  DecoderModelConfig out;
  const ArchName* arch = nullptr;
  std::string named;
  auto archs = j.find("architectures");
  if (archs != j.end() && !archs->is_null()) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      return absl::InvalidArgumentError(Cat(source, ": architectures is ", archs->dump(),
                                            "; expected a list of class names such as [\"",
                                            kArchitectures[0].architecture, "\"]"));
    }
    named = (*archs)[0].get<std::string>();
    for (const ArchName& a : kArchitectures) {
      if (named == a.architecture) arch = &a;
    }
  } else {
    auto mt = j.find("model_type");
    if (mt == j.end() || !mt->is_string()) {
      return absl::InvalidArgumentError(
          Cat(source,
              ": neither architectures nor model_type says which model this is; supported "
              "for calibration: ",
              SupportedCalibrationArchitectures()));
    }
    named = mt->get<std::string>();
    for (const ArchName& a : kArchitectures) {
      if (named == a.model_type) arch = &a;
    }
  }
  if (arch == nullptr) {
    return absl::InvalidArgumentError(
        Cat(source, ": architecture '", named,
            "' is not supported for calibration; supported: ", SupportedCalibrationArchitectures(),
            " (bring Hessians with --hessians, or quantize data-free with --calibration none)"));
  }
  out.architecture = arch->architecture;

  std::string act = "silu";
  auto ha = j.find("hidden_act");
  if (ha != j.end() && !ha->is_null()) {
    if (!ha->is_string()) {
      return absl::InvalidArgumentError(
          Cat(source, ": hidden_act is ", ha->dump(), ", expected a string"));
    }
    act = ha->get<std::string>();
  }
  if (act != "silu") {
    return absl::InvalidArgumentError(
        Cat(source, ": hidden_act is '", act,
            "'; the calibration forward pass implements the SwiGLU MLP "
            "of ",
            out.architecture, " with silu only"));
  }

  quant::DecoderConfig& c = out.decoder;
  QF_RETURN_IF_ERROR(GetInt(j, "hidden_size", true, source, &c.hidden_size));
  QF_RETURN_IF_ERROR(GetInt(j, "num_attention_heads", true, source, &c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  QF_RETURN_IF_ERROR(GetInt(j, "num_key_value_heads", false, source, &c.num_key_value_heads));
  QF_RETURN_IF_ERROR(GetInt(j, "intermediate_size", true, source, &c.intermediate_size));
  QF_RETURN_IF_ERROR(GetInt(j, "num_hidden_layers", true, source, &c.num_hidden_layers));
  QF_RETURN_IF_ERROR(GetInt(j, "vocab_size", true, source, &c.vocab_size));
  QF_RETURN_IF_ERROR(
      GetInt(j, "max_position_embeddings", true, source, &c.max_position_embeddings));
  c.head_dim = 0;
  QF_RETURN_IF_ERROR(GetInt(j, "head_dim", false, source, &c.head_dim));
  if (c.head_dim == 0) {
    if (c.num_attention_heads <= 0 || c.hidden_size % c.num_attention_heads != 0) {
      return absl::InvalidArgumentError(
          Cat(source, ": head_dim is not given and hidden_size ", c.hidden_size,
              " is not a multiple of num_attention_heads ", c.num_attention_heads,
              "; set head_dim in config.json"));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  c.rms_norm_eps = 1e-6;
  QF_RETURN_IF_ERROR(GetDouble(j, "rms_norm_eps", source, &c.rms_norm_eps));
  c.rope_theta = 10000.0;
  QF_RETURN_IF_ERROR(GetDouble(j, "rope_theta", source, &c.rope_theta));
  QF_RETURN_IF_ERROR(ParseRopeScaling(j, source, &c));
  QF_RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", source, &c.tie_word_embeddings));

  // Biases and norms, as each architecture's modeling file builds its linears.
  bool attention_bias = false, mlp_bias = false;
  QF_RETURN_IF_ERROR(GetBool(j, "attention_bias", source, &attention_bias));
  QF_RETURN_IF_ERROR(GetBool(j, "mlp_bias", source, &mlp_bias));
  switch (arch->arch) {
    case Arch::kLlama:  // q/k/v/o bias = attention_bias; gate/up/down bias = mlp_bias
      c.attention_bias = c.o_proj_bias = attention_bias;
      c.mlp_bias = mlp_bias;
      break;
    case Arch::kMistral:  // no biases
      break;
    case Arch::kQwen2:  // q/k/v always biased, o_proj never
      c.attention_bias = true;
      break;
    case Arch::kQwen3:  // q/k/v/o bias = attention_bias; per-head q/k RMSNorm
      c.attention_bias = c.o_proj_bias = attention_bias;
      c.qk_norm = true;
      break;
  }

  // Sliding-window attention: Mistral's sliding_window; Qwen2/3's only with use_sliding_window.
  bool use_sliding = arch->arch == Arch::kMistral;
  if (arch->arch == Arch::kQwen2 || arch->arch == Arch::kQwen3) {
    QF_RETURN_IF_ERROR(GetBool(j, "use_sliding_window", source, &use_sliding));
  }
  if (use_sliding) {
    QF_RETURN_IF_ERROR(GetInt(j, "sliding_window", false, source, &out.sliding_window));
    if (out.sliding_window < 0) {
      return absl::InvalidArgumentError(
          Cat(source, ": sliding_window is ", out.sliding_window, ", expected null or positive"));
    }
  }

  Status valid = quant::ValidateDecoderConfig(c);
  if (!valid.ok()) {
    return absl::InvalidArgumentError(Cat(source, ": ", valid.message()));
  }
  return out;
}

absl::StatusOr<DecoderModelConfig> ReadDecoderModelConfig(ObjectStore& store,
                                                          std::string_view model_dir) {
  const std::string key = Cat(model_dir, "config.json");
  absl::StatusOr<std::string> text = store.ReadAll(key);
  if (!text.ok()) {
    return absl::Status(
        text.status().code(),
        Cat("model config ", key, " in ", store.uri(), ": ", text.status().message(),
            absl::IsNotFound(text.status()) ? " (calibration needs the model's config.json)" : ""));
  }
  return ParseDecoderModelConfig(*text, Cat(store.uri(), "/", key));
}

absl::StatusOr<quant::DecoderLayerWeights> ReadDecoderLayerWeights(ObjectStore& store,
                                                                   const SafetensorsModel& model,
                                                                   const quant::DecoderConfig& c,
                                                                   int64_t layer) {
  return ReadDecoderLayerTensors(store, model, c, layer, {});
}

absl::StatusOr<quant::DecoderLayerWeights> ReadDecoderLayerTensors(
    ObjectStore& store, const SafetensorsModel& model, const quant::DecoderConfig& c,
    int64_t layer, const std::vector<std::string>& skip_modules) {
  if (layer < 0 || layer >= c.num_hidden_layers) {
    return absl::InvalidArgumentError(
        Cat("decoder layer ", layer, " is outside [0, ", c.num_hidden_layers, ")"));
  }
  const std::string p = LayerPrefix(layer);
  const int64_t H = c.hidden_size, QO = c.q_out(), KV = c.kv_out(), I = c.intermediate_size;
  quant::DecoderLayerWeights w;
  struct Wanted {
    std::string name;
    std::vector<int64_t> shape;
    bool present;  // what the config says
    std::vector<float>* out;
  };
  const std::vector<Wanted> wanted = {
      {p + "input_layernorm.weight", {H}, true, &w.input_layernorm},
      {p + "self_attn.q_proj.weight", {QO, H}, true, &w.q_proj},
      {p + "self_attn.k_proj.weight", {KV, H}, true, &w.k_proj},
      {p + "self_attn.v_proj.weight", {KV, H}, true, &w.v_proj},
      {p + "self_attn.q_proj.bias", {QO}, c.attention_bias, &w.q_bias},
      {p + "self_attn.k_proj.bias", {KV}, c.attention_bias, &w.k_bias},
      {p + "self_attn.v_proj.bias", {KV}, c.attention_bias, &w.v_bias},
      {p + "self_attn.q_norm.weight", {c.head_dim}, c.qk_norm, &w.q_norm},
      {p + "self_attn.k_norm.weight", {c.head_dim}, c.qk_norm, &w.k_norm},
      {p + "self_attn.o_proj.weight", {H, QO}, true, &w.o_proj},
      {p + "self_attn.o_proj.bias", {H}, c.o_proj_bias, &w.o_bias},
      {p + "post_attention_layernorm.weight", {H}, true, &w.post_attention_layernorm},
      {p + "mlp.gate_proj.weight", {I, H}, true, &w.gate_proj},
      {p + "mlp.up_proj.weight", {I, H}, true, &w.up_proj},
      {p + "mlp.gate_proj.bias", {I}, c.mlp_bias, &w.gate_bias},
      {p + "mlp.up_proj.bias", {I}, c.mlp_bias, &w.up_bias},
      {p + "mlp.down_proj.weight", {H, I}, true, &w.down_proj},
      {p + "mlp.down_proj.bias", {H}, c.mlp_bias, &w.down_bias},
  };
  // Locate and check every tensor first, then read them (in parallel: each is one ranged read).
  std::vector<std::pair<const Wanted*, SafetensorsModel::Location>> reads;
  for (const Wanted& t : wanted) {
    if (std::find_if(skip_modules.begin(), skip_modules.end(), [&t](const std::string& m) {
          return t.name == m + ".weight";
        }) != skip_modules.end()) {
      continue;
    }
    absl::StatusOr<SafetensorsModel::Location> loc = model.Find(t.name);
    if (!t.present) {
      if (loc.ok()) {
        return absl::InvalidArgumentError(
            Cat("model tensor '", t.name, "' exists but config.json says the layer has none (",
                "attention_bias / mlp_bias / architecture); the forward pass would ignore it: fix "
                "config.json"));
      }
      continue;
    }
    if (!loc.ok()) {
      return absl::Status(loc.status().code(),
                          Cat(loc.status().message(), " (needed by the ",
                              "calibration forward pass of layer ", layer, ")"));
    }
    if (loc->info->shape != t.shape) {
      return absl::InvalidArgumentError(Cat("model tensor '", t.name, "' in ", loc->key, " is ",
                                            ShapeString(loc->info->shape),
                                            ", but config.json implies ", ShapeString(t.shape),
                                            " (check hidden_size, heads, head_dim, "
                                            "intermediate_size)"));
    }
    reads.emplace_back(&t, *loc);
  }
  std::vector<std::future<absl::StatusOr<std::vector<float>>>> futures;
  futures.reserve(reads.size());
  for (const auto& [t, loc] : reads) {
    futures.push_back(std::async(std::launch::async, [&store, loc = loc]() {
      return ReadTensorAsF32(store, loc.key, *loc.header, *loc.info);
    }));
  }
  absl::Status first_error;
  for (size_t i = 0; i < futures.size(); ++i) {
    absl::StatusOr<std::vector<float>> v = futures[i].get();
    if (!v.ok()) {
      if (first_error.ok()) first_error = v.status();
      continue;
    }
    *reads[i].first->out = *std::move(v);
  }
  QF_RETURN_IF_ERROR(first_error);
  if (!skip_modules.empty()) return w;
  Status valid = quant::ValidateDecoderLayerWeights(c, w);
  if (!valid.ok()) {
    return absl::InvalidArgumentError(Cat(p, ": ", valid.message()));
  }
  return w;
}

uint64_t DecoderLayerWeightBytes(const quant::DecoderConfig& c) {
  const uint64_t H = static_cast<uint64_t>(std::max<int64_t>(c.hidden_size, 0));
  const uint64_t QO = static_cast<uint64_t>(std::max<int64_t>(c.q_out(), 0));
  const uint64_t KV = static_cast<uint64_t>(std::max<int64_t>(c.kv_out(), 0));
  const uint64_t I = static_cast<uint64_t>(std::max<int64_t>(c.intermediate_size, 0));
  const uint64_t D = static_cast<uint64_t>(std::max<int64_t>(c.head_dim, 0));
  return 4 * (QO * H + 2 * KV * H + H * QO + 3 * I * H + 4 * H + 2 * QO + 2 * KV + 3 * I + 2 * D);
}

absl::Status EmbedTokens(ObjectStore& store, const SafetensorsModel& model,
                         const quant::DecoderConfig& c, const int32_t* ids, int64_t n, float* out) {
  static constexpr char kTable[] = "model.embed_tokens.weight";
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(Cat("token ", i, ": id ", ids[i],
                                            " is outside the vocabulary (vocab_size ", c.vocab_size,
                                            ")"));
    }
  }
  QF_ASSIGN_OR_RETURN(SafetensorsModel::Location loc, model.Find(kTable));
  const TensorInfo& t = *loc.info;
  const int64_t H = c.hidden_size;
  if (t.shape.size() != 2 || t.shape[0] != c.vocab_size || t.shape[1] != H) {
    return absl::InvalidArgumentError(
        Cat("model tensor '", kTable, "' in ", loc.key, " is ", ShapeString(t.shape),
            ", but config.json implies [vocab_size ", c.vocab_size, ", hidden_size ", H, "]"));
  }
  if (n <= 0) return absl::OkStatus();
  const uint64_t row_bytes = static_cast<uint64_t>(H) * DTypeSize(t.dtype);
  const std::string what = Cat("tensor '", kTable, "' of ", loc.key);

  // Positions sorted by id: each needed row is read once, runs of near rows in one request.
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [ids](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  const uint64_t max_rows = std::max<uint64_t>(1, kMaxEmbeddingReadBytes / row_bytes);
  const uint64_t gap_rows = kEmbeddingGapBytes / row_bytes;
  std::string raw;
  size_t i = 0;
  while (i < order.size()) {
    // Rows [first, last] of this request; order[i, j) are the positions it serves.
    const int64_t first = ids[order[i]];
    int64_t last = first;
    size_t j = i;
    while (j < order.size()) {
      const int64_t id = ids[order[j]];
      if (id != last && (static_cast<uint64_t>(id - last - 1) > gap_rows ||
                         static_cast<uint64_t>(id - first + 1) > max_rows)) {
        break;
      }
      last = id;
      ++j;
    }
    const uint64_t offset =
        loc.header->data_offset() + t.data_begin + static_cast<uint64_t>(first) * row_bytes;
    QF_RETURN_IF_ERROR(store.ReadRange(loc.key, offset,
                                       static_cast<uint64_t>(last - first + 1) * row_bytes, &raw));
    int64_t decoded_id = -1;
    std::vector<float> row;
    for (size_t k = i; k < j; ++k) {
      const int64_t id = ids[order[k]];
      if (id != decoded_id) {
        QF_ASSIGN_OR_RETURN(row, DecodeToF32(t.dtype,
                                             std::string_view(raw).substr(
                                                 static_cast<size_t>((id - first) * row_bytes),
                                                 static_cast<size_t>(row_bytes)),
                                             what));
        decoded_id = id;
      }
      std::copy(row.begin(), row.end(), out + order[k] * H);
    }
    i = j;
  }
  return absl::OkStatus();
}

std::optional<ModuleInput> DecoderModuleInput(std::string_view module) {
  constexpr std::string_view kPrefix = "model.layers.";
  if (module.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  module.remove_prefix(kPrefix.size());
  const size_t dot = module.find('.');
  if (dot == std::string_view::npos || dot == 0 || dot > 9) return std::nullopt;
  const std::string_view digits = module.substr(0, dot);
  if (digits.size() > 1 && digits[0] == '0') return std::nullopt;
  int64_t layer = 0;
  for (char ch : digits) {
    if (ch < '0' || ch > '9') return std::nullopt;
    layer = layer * 10 + (ch - '0');
  }
  const std::string_view rest = module.substr(dot + 1);
  static constexpr std::pair<std::string_view, quant::DecoderInput> kModules[] = {
      {"self_attn.q_proj", quant::DecoderInput::kQkv},
      {"self_attn.k_proj", quant::DecoderInput::kQkv},
      {"self_attn.v_proj", quant::DecoderInput::kQkv},
      {"self_attn.o_proj", quant::DecoderInput::kO},
      {"mlp.gate_proj", quant::DecoderInput::kGateUp},
      {"mlp.up_proj", quant::DecoderInput::kGateUp},
      {"mlp.down_proj", quant::DecoderInput::kDown},
  };
  for (const auto& [name, input] : kModules) {
    if (rest == name) return ModuleInput{layer, input};
  }
  return std::nullopt;
}

std::string DecoderInputTensorName(int64_t layer, quant::DecoderInput input) {
  return DecoderInputModules(layer, input).front();
}

std::vector<std::string> DecoderInputModules(int64_t layer, quant::DecoderInput input) {
  const std::string p = LayerPrefix(layer);
  switch (input) {
    case quant::DecoderInput::kQkv:
      return {p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"};
    case quant::DecoderInput::kO:
      return {p + "self_attn.o_proj"};
    case quant::DecoderInput::kGateUp:
      return {p + "mlp.gate_proj", p + "mlp.up_proj"};
    case quant::DecoderInput::kDown:
    default:
      return {p + "mlp.down_proj"};
  }
}

}  // namespace qforge

// The backend-independent parts of decoder.h: config and weight validation, the RoPE inverse
// frequencies, the layer inputs' names and sizes, and LayerHessianSums::Reset. The CPU forward
// pass is in decoder_cpu.cc.
#include "quant/decoder.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>

namespace qforge::quant {
namespace {

std::string Num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

Status PositiveSize(const char* field, int64_t v) {
  if (v > 0) return OkStatus();
  return InvalidArgumentError(std::string("decoder config: ") + field + " is " +
                              std::to_string(v) + ", must be positive (check config.json)");
}

Status FinitePositive(const char* field, double v) {
  if (std::isfinite(v) && v > 0) return OkStatus();
  return InvalidArgumentError(std::string("decoder config: ") + field + " is " + Num(v) +
                              ", must be finite and positive (check config.json)");
}

// `w` must have exactly `expected` values when `present`, and none otherwise.
Status CheckWeight(const char* name, const std::vector<float>& w, bool present, int64_t rows,
                   int64_t cols, const char* absent_reason) {
  if (!present) {
    if (w.empty()) return OkStatus();
    return InvalidArgumentError(std::string("layer weights: ") + name + " has " +
                                std::to_string(w.size()) + " values, but the config has " +
                                absent_reason + ": expected none (set the config flag or drop " +
                                "the tensor)");
  }
  const int64_t expected = rows * cols;
  if (static_cast<int64_t>(w.size()) == expected) return OkStatus();
  std::string shape = cols == 1 ? std::to_string(rows)
                                : std::to_string(rows) + " × " + std::to_string(cols);
  if (w.empty()) {
    return InvalidArgumentError(std::string("layer weights: ") + name +
                                " is missing, expected " + std::to_string(expected) +
                                " values (= " + shape + ")");
  }
  return InvalidArgumentError(std::string("layer weights: ") + name + " has " +
                              std::to_string(w.size()) + " values, expected " +
                              std::to_string(expected) + " (= " + shape + ")");
}

}  // namespace

Status ValidateDecoderConfig(const DecoderConfig& c) {
  QF_RETURN_IF_ERROR(PositiveSize("hidden_size", c.hidden_size));
  QF_RETURN_IF_ERROR(PositiveSize("num_attention_heads", c.num_attention_heads));
  QF_RETURN_IF_ERROR(PositiveSize("num_key_value_heads", c.num_key_value_heads));
  QF_RETURN_IF_ERROR(PositiveSize("head_dim", c.head_dim));
  QF_RETURN_IF_ERROR(PositiveSize("intermediate_size", c.intermediate_size));
  QF_RETURN_IF_ERROR(PositiveSize("num_hidden_layers", c.num_hidden_layers));
  QF_RETURN_IF_ERROR(PositiveSize("vocab_size", c.vocab_size));
  QF_RETURN_IF_ERROR(PositiveSize("max_position_embeddings", c.max_position_embeddings));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return InvalidArgumentError("decoder config: num_key_value_heads: " +
                                std::to_string(c.num_key_value_heads) +
                                " does not divide num_attention_heads " +
                                std::to_string(c.num_attention_heads) + " (check config.json)");
  }
  if (c.head_dim % 2 != 0) {
    return InvalidArgumentError("decoder config: head_dim is " + std::to_string(c.head_dim) +
                                ", must be even for rotary embeddings (check config.json)");
  }
  // Sizes whose products index float buffers: refuse what cannot be a real model.
  constexpr int64_t kMaxDim = int64_t{1} << 24;
  const int64_t dims[] = {c.hidden_size, c.intermediate_size, c.q_out(), c.kv_out()};
  const char* names[] = {"hidden_size", "intermediate_size",
                         "num_attention_heads × head_dim", "num_key_value_heads × head_dim"};
  for (int i = 0; i < 4; ++i) {
    if (dims[i] > kMaxDim) {
      return InvalidArgumentError(std::string("decoder config: ") + names[i] + " is " +
                                  std::to_string(dims[i]) + ", above the supported " +
                                  std::to_string(kMaxDim) + " (check config.json)");
    }
  }
  QF_RETURN_IF_ERROR(FinitePositive("rms_norm_eps", c.rms_norm_eps));
  QF_RETURN_IF_ERROR(FinitePositive("rope_theta", c.rope_theta));
  if (c.has_llama3_rope_scaling) {
    const Llama3RopeScaling& s = c.llama3_rope_scaling;
    QF_RETURN_IF_ERROR(FinitePositive("rope_scaling.factor", s.factor));
    QF_RETURN_IF_ERROR(FinitePositive("rope_scaling.low_freq_factor", s.low_freq_factor));
    QF_RETURN_IF_ERROR(FinitePositive("rope_scaling.high_freq_factor", s.high_freq_factor));
    if (!(s.high_freq_factor > s.low_freq_factor)) {
      return InvalidArgumentError("decoder config: rope_scaling.high_freq_factor " +
                                  Num(s.high_freq_factor) +
                                  " must be greater than rope_scaling.low_freq_factor " +
                                  Num(s.low_freq_factor) + " (check config.json)");
    }
    if (s.original_max_position_embeddings <= 0) {
      return InvalidArgumentError(
          "decoder config: rope_scaling.original_max_position_embeddings is " +
          std::to_string(s.original_max_position_embeddings) +
          ", must be positive (check config.json)");
    }
  }
  return OkStatus();
}

std::vector<float> RopeInvFreq(const DecoderConfig& config) {
  const int64_t half = config.head_dim / 2;
  std::vector<float> out(static_cast<size_t>(std::max<int64_t>(half, 0)));
  const double pi = std::acos(-1.0);
  for (int64_t i = 0; i < half; ++i) {
    double f = 1.0 / std::pow(config.rope_theta,
                              static_cast<double>(2 * i) / static_cast<double>(config.head_dim));
    if (config.has_llama3_rope_scaling) {
      const Llama3RopeScaling& s = config.llama3_rope_scaling;
      const double old_len = static_cast<double>(s.original_max_position_embeddings);
      const double low_freq_wavelen = old_len / s.low_freq_factor;
      const double high_freq_wavelen = old_len / s.high_freq_factor;
      const double wavelen = 2.0 * pi / f;
      if (wavelen > low_freq_wavelen) {
        f = f / s.factor;
      } else if (!(wavelen < high_freq_wavelen)) {
        const double smooth =
            (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1.0 - smooth) * f / s.factor + smooth * f;
      }
    }
    out[static_cast<size_t>(i)] = static_cast<float>(f);
  }
  return out;
}

Status ValidateDecoderLayerWeights(const DecoderConfig& c, const DecoderLayerWeights& w) {
  QF_RETURN_IF_ERROR(ValidateDecoderConfig(c));
  const int64_t h = c.hidden_size, q = c.q_out(), kv = c.kv_out(), im = c.intermediate_size;
  QF_RETURN_IF_ERROR(CheckWeight("input_layernorm", w.input_layernorm, true, h, 1, ""));
  QF_RETURN_IF_ERROR(CheckWeight("q_proj", w.q_proj, true, q, h, ""));
  QF_RETURN_IF_ERROR(CheckWeight("k_proj", w.k_proj, true, kv, h, ""));
  QF_RETURN_IF_ERROR(CheckWeight("v_proj", w.v_proj, true, kv, h, ""));
  const char* no_attn_bias = "no attention_bias";
  QF_RETURN_IF_ERROR(CheckWeight("q_bias", w.q_bias, c.attention_bias, q, 1, no_attn_bias));
  QF_RETURN_IF_ERROR(CheckWeight("k_bias", w.k_bias, c.attention_bias, kv, 1, no_attn_bias));
  QF_RETURN_IF_ERROR(CheckWeight("v_bias", w.v_bias, c.attention_bias, kv, 1, no_attn_bias));
  const char* no_qk_norm = "no qk_norm";
  QF_RETURN_IF_ERROR(CheckWeight("q_norm", w.q_norm, c.qk_norm, c.head_dim, 1, no_qk_norm));
  QF_RETURN_IF_ERROR(CheckWeight("k_norm", w.k_norm, c.qk_norm, c.head_dim, 1, no_qk_norm));
  QF_RETURN_IF_ERROR(CheckWeight("o_proj", w.o_proj, true, h, q, ""));
  QF_RETURN_IF_ERROR(CheckWeight("o_bias", w.o_bias, c.o_proj_bias, h, 1, "no o_proj_bias"));
  QF_RETURN_IF_ERROR(
      CheckWeight("post_attention_layernorm", w.post_attention_layernorm, true, h, 1, ""));
  QF_RETURN_IF_ERROR(CheckWeight("gate_proj", w.gate_proj, true, im, h, ""));
  QF_RETURN_IF_ERROR(CheckWeight("up_proj", w.up_proj, true, im, h, ""));
  const char* no_mlp_bias = "no mlp_bias";
  QF_RETURN_IF_ERROR(CheckWeight("gate_bias", w.gate_bias, c.mlp_bias, im, 1, no_mlp_bias));
  QF_RETURN_IF_ERROR(CheckWeight("up_bias", w.up_bias, c.mlp_bias, im, 1, no_mlp_bias));
  QF_RETURN_IF_ERROR(CheckWeight("down_proj", w.down_proj, true, h, im, ""));
  QF_RETURN_IF_ERROR(CheckWeight("down_bias", w.down_bias, c.mlp_bias, h, 1, no_mlp_bias));
  return OkStatus();
}

Status ValidateTokenBatch(const DecoderConfig& c, const TokenBatch& batch,
                          const float* hidden) {
  if (batch.samples <= 0) {
    return InvalidArgumentError("token batch: samples is " + std::to_string(batch.samples) +
                                ", must be positive");
  }
  if (batch.seq_len <= 0) {
    return InvalidArgumentError("token batch: seq_len is " + std::to_string(batch.seq_len) +
                                ", must be positive");
  }
  if (batch.seq_len > c.max_position_embeddings) {
    return InvalidArgumentError("token batch: seq_len " + std::to_string(batch.seq_len) +
                                " is above the model's max_position_embeddings " +
                                std::to_string(c.max_position_embeddings) +
                                " (use a shorter calibration seq_len)");
  }
  if (hidden == nullptr) return InvalidArgumentError("hidden states: null pointer");
  if (batch.mask != nullptr) {
    const int64_t n = batch.samples * batch.seq_len;
    for (int64_t t = 0; t < n; ++t) {
      if (batch.mask[t] > 1) {
        return InvalidArgumentError(
            "token batch: attention mask of sample " + std::to_string(t / batch.seq_len) +
            " at position " + std::to_string(t % batch.seq_len) + " is " +
            std::to_string(batch.mask[t]) + ", must be 0 (padding) or 1 (token)");
      }
    }
  }
  return OkStatus();
}

Status ValidateHessianSums(const DecoderConfig& c, const LayerHessianSums& sums) {
  for (int i = 0; i < kNumDecoderInputs; ++i) {
    if (!sums.wanted[i]) continue;
    const int64_t d = DecoderInputDim(c, static_cast<DecoderInput>(i));
    if (static_cast<int64_t>(sums.sums[i].size()) != d * d) {
      return InvalidArgumentError(std::string("Hessian sums: ") +
                                  DecoderInputName(static_cast<DecoderInput>(i)) + " has " +
                                  std::to_string(sums.sums[i].size()) + " values, expected " +
                                  std::to_string(d * d) + " (= " + std::to_string(d) + "²): " +
                                  "call Reset(config) for this model first");
    }
  }
  if (sums.tokens < 0) {
    return InvalidArgumentError("Hessian sums: tokens is " + std::to_string(sums.tokens) +
                                ", must be >= 0: call Reset(config) first");
  }
  return OkStatus();
}

const char* DecoderInputName(DecoderInput input) {
  switch (input) {
    case DecoderInput::kQkv:
      return "qkv";
    case DecoderInput::kO:
      return "o";
    case DecoderInput::kGateUp:
      return "gate_up";
    case DecoderInput::kDown:
      return "down";
  }
  return "unknown";
}

int64_t DecoderInputDim(const DecoderConfig& config, DecoderInput input) {
  switch (input) {
    case DecoderInput::kQkv:
    case DecoderInput::kGateUp:
      return config.hidden_size;
    case DecoderInput::kO:
      return config.q_out();
    case DecoderInput::kDown:
      return config.intermediate_size;
  }
  return 0;
}

void LayerHessianSums::Reset(const DecoderConfig& config) {
  for (int i = 0; i < kNumDecoderInputs; ++i) {
    std::vector<double>().swap(sums[i]);
    if (wanted[i]) {
      const int64_t d = DecoderInputDim(config, static_cast<DecoderInput>(i));
      sums[i].assign(static_cast<size_t>(d * d), 0.0);
    }
  }
  tokens = 0;
}

}  // namespace qforge::quant

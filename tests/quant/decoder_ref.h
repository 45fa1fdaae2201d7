// For tests of quant/decoder.h: small random Llama-family layers and a straightforward float64
// implementation of the decoder layer and its Hessian sums, written from the math of
// decoder.h's header comment (loops, no blocking, no BLAS). Header-only so the CPU and CUDA
// suites share it. Thread-safety: plain functions.
#ifndef QFORGE_TESTS_QUANT_DECODER_REF_H_
#define QFORGE_TESTS_QUANT_DECODER_REF_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "quant/decoder.h"

namespace qforge::quant::testing {

// A config of the given shapes with everything else at Llama defaults.
inline DecoderConfig SmallDecoderConfig(int64_t hidden, int64_t heads, int64_t kv_heads,
                                        int64_t head_dim, int64_t intermediate,
                                        int64_t max_positions = 4096) {
  DecoderConfig c;
  c.hidden_size = hidden;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  c.intermediate_size = intermediate;
  c.num_hidden_layers = 1;
  c.vocab_size = 1000;
  c.max_position_embeddings = max_positions;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  return c;
}

// Random non-zero weights for `c`: projections N(0, 1/in) (q/k scaled by 1.5 so attention is
// not uniform), norms 1 + N(0, 0.2²), biases N(0, 0.2²); only what `c` says the layer has.
inline DecoderLayerWeights RandomDecoderWeights(const DecoderConfig& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto fill = [&](int64_t count, float scale, float offset) {
    std::vector<float> v(static_cast<size_t>(count));
    for (float& x : v) x = offset + scale * n01(rng);
    return v;
  };
  const int64_t h = c.hidden_size, q = c.q_out(), kv = c.kv_out(), im = c.intermediate_size;
  const float sh = 1.0f / std::sqrt(static_cast<float>(h));
  DecoderLayerWeights w;
  w.input_layernorm = fill(h, 0.2f, 1.0f);
  w.q_proj = fill(q * h, 1.5f * sh, 0.0f);
  w.k_proj = fill(kv * h, 1.5f * sh, 0.0f);
  w.v_proj = fill(kv * h, sh, 0.0f);
  if (c.attention_bias) {
    w.q_bias = fill(q, 0.2f, 0.0f);
    w.k_bias = fill(kv, 0.2f, 0.0f);
    w.v_bias = fill(kv, 0.2f, 0.0f);
  }
  if (c.qk_norm) {
    w.q_norm = fill(c.head_dim, 0.2f, 1.0f);
    w.k_norm = fill(c.head_dim, 0.2f, 1.0f);
  }
  w.o_proj = fill(h * q, 1.0f / std::sqrt(static_cast<float>(q)), 0.0f);
  if (c.o_proj_bias) w.o_bias = fill(h, 0.2f, 0.0f);
  w.post_attention_layernorm = fill(h, 0.2f, 1.0f);
  w.gate_proj = fill(im * h, sh, 0.0f);
  w.up_proj = fill(im * h, sh, 0.0f);
  if (c.mlp_bias) {
    w.gate_bias = fill(im, 0.2f, 0.0f);
    w.up_bias = fill(im, 0.2f, 0.0f);
    w.down_bias = fill(h, 0.2f, 0.0f);
  }
  w.down_proj = fill(h * im, 1.0f / std::sqrt(static_cast<float>(im)), 0.0f);
  return w;
}

// N(0, 1) hidden states [count].
inline std::vector<float> RandomHidden(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = n01(rng);
  return v;
}

// The float64 Hessian sums of the reference (full [dim, dim] each) and the tokens summed.
struct RefHessianSums {
  std::vector<double> sums[kNumDecoderInputs];
  int64_t tokens = 0;

  void Reset(const DecoderConfig& c) {
    for (int i = 0; i < kNumDecoderInputs; ++i) {
      const int64_t d = DecoderInputDim(c, static_cast<DecoderInput>(i));
      sums[i].assign(static_cast<size_t>(d * d), 0.0);
    }
    tokens = 0;
  }
};

// The layer of decoder.h in float64, in place on x [samples · seq_len, hidden]; adds into
// *sums (Reset for c) when not null. RoPE uses RopeInvFreq's floats (checked separately), the
// angles, cosines and sines in double.
inline void RefDecoderLayer(const DecoderConfig& c, const DecoderLayerWeights& w,
                            int64_t samples, int64_t seq_len, const uint8_t* mask,
                            std::vector<double>& x, RefHessianSums* sums) {
  const int64_t H = c.hidden_size, QO = c.q_out(), KV = c.kv_out(), I = c.intermediate_size;
  const int64_t d = c.head_dim, half = d / 2, L = seq_len;
  const int64_t group = c.num_attention_heads / c.num_key_value_heads;
  const std::vector<float> inv_freq = RopeInvFreq(c);
  auto rms = [&](const double* in, int64_t n, const std::vector<float>& wt, double* out) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += in[i] * in[i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + c.rms_norm_eps);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(wt[i]) * in[i] * inv;
  };
  auto linear = [](const double* in, int64_t n_in, const std::vector<float>& wt, int64_t n_out,
                   const std::vector<float>& bias, double* out) {
    for (int64_t o = 0; o < n_out; ++o) {
      double s = bias.empty() ? 0.0 : static_cast<double>(bias[o]);
      for (int64_t i = 0; i < n_in; ++i) s += static_cast<double>(wt[o * n_in + i]) * in[i];
      out[o] = s;
    }
  };
  auto outer = [&](DecoderInput which, const double* v) {
    if (sums == nullptr) return;
    const int64_t n = DecoderInputDim(c, which);
    std::vector<double>& s = sums->sums[static_cast<int>(which)];
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) s[i * n + j] += v[i] * v[j];
    }
  };
  auto rope = [&](double* v, int64_t p) {
    for (int64_t i = 0; i < half; ++i) {
      const double th = static_cast<double>(inv_freq[i]) * static_cast<double>(p);
      const double x0 = v[i], x1 = v[i + half];
      v[i] = x0 * std::cos(th) - x1 * std::sin(th);
      v[i + half] = x1 * std::cos(th) + x0 * std::sin(th);
    }
  };
  std::vector<double> a(H), q(L * QO), k(L * KV), v(L * KV), o(QO), b(H), g(I), u(I), tmp(H);
  std::vector<double> scores(L);
  for (int64_t s = 0; s < samples; ++s) {
    double* xs = x.data() + s * L * H;
    const uint8_t* ms = mask ? mask + s * L : nullptr;
    auto real = [&](int64_t t) { return ms == nullptr || ms[t] != 0; };
    for (int64_t t = 0; t < L; ++t) {
      rms(xs + t * H, H, w.input_layernorm, a.data());
      if (real(t)) outer(DecoderInput::kQkv, a.data());
      linear(a.data(), H, w.q_proj, QO, w.q_bias, q.data() + t * QO);
      linear(a.data(), H, w.k_proj, KV, w.k_bias, k.data() + t * KV);
      linear(a.data(), H, w.v_proj, KV, w.v_bias, v.data() + t * KV);
      for (int64_t h = 0; h < c.num_attention_heads; ++h) {
        double* qh = q.data() + t * QO + h * d;
        if (c.qk_norm) rms(qh, d, w.q_norm, qh);
        rope(qh, t);
      }
      for (int64_t h = 0; h < c.num_key_value_heads; ++h) {
        double* kh = k.data() + t * KV + h * d;
        if (c.qk_norm) rms(kh, d, w.k_norm, kh);
        rope(kh, t);
      }
    }
    // Attention, o_proj and the MLP, token by token (row t of x only depends on keys <= t).
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t h = 0; h < c.num_attention_heads; ++h) {
        const int64_t kvh = h / group;
        const double* qh = q.data() + t * QO + h * d;
        double mx = -INFINITY;
        for (int64_t j = 0; j <= t; ++j) {
          if (!real(j)) continue;
          double dot = 0;
          for (int64_t i = 0; i < d; ++i) dot += qh[i] * k[j * KV + kvh * d + i];
          scores[j] = dot / std::sqrt(static_cast<double>(d));
          mx = std::max(mx, scores[j]);
        }
        double* oh = o.data() + h * d;
        for (int64_t i = 0; i < d; ++i) oh[i] = 0;
        if (mx == -INFINITY) continue;
        double z = 0;
        for (int64_t j = 0; j <= t; ++j) {
          if (real(j)) z += std::exp(scores[j] - mx);
        }
        for (int64_t j = 0; j <= t; ++j) {
          if (!real(j)) continue;
          const double p = std::exp(scores[j] - mx) / z;
          for (int64_t i = 0; i < d; ++i) oh[i] += p * v[j * KV + kvh * d + i];
        }
      }
      if (real(t)) outer(DecoderInput::kO, o.data());
      double* xt = xs + t * H;
      linear(o.data(), QO, w.o_proj, H, w.o_bias, tmp.data());
      for (int64_t i = 0; i < H; ++i) xt[i] += tmp[i];
      rms(xt, H, w.post_attention_layernorm, b.data());
      if (real(t)) outer(DecoderInput::kGateUp, b.data());
      linear(b.data(), H, w.gate_proj, I, w.gate_bias, g.data());
      linear(b.data(), H, w.up_proj, I, w.up_bias, u.data());
      for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      if (real(t)) outer(DecoderInput::kDown, g.data());
      linear(g.data(), I, w.down_proj, H, w.down_bias, tmp.data());
      for (int64_t i = 0; i < H; ++i) xt[i] += tmp[i];
      if (real(t) && sums != nullptr) ++sums->tokens;
    }
  }
}

// ‖a − b‖_F / ‖b‖_F.
template <typename A, typename B>
double RelFrobenius(const std::vector<A>& a, const std::vector<B>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double diff = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += diff * diff;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  if (a.size() != b.size()) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace qforge::quant::testing

#endif  // QFORGE_TESTS_QUANT_DECODER_REF_H_

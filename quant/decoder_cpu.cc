// NewCpuDecoderForward (decoder.h): the decoder layer's forward pass and Hessian sums on the
// CPU.
//
// Work order. The batch is processed in chunks of whole samples of about kHessianBlockTokens
// tokens (one sample when seq_len is larger). Per chunk: input RMSNorm, the q/k/v GEMMs
// (quant::Gemm: OpenBLAS when built with it), biases, q/k norms, RoPE; attention per
// (sample, head) in a ParallelFor, in blocks of kQueryBlock queries (scores and P·V by Gemm,
// which is single-threaded inside a ParallelFor body), softmax row by row; o_proj added into
// `hidden` (Gemm with beta 1); then the MLP in row blocks of at most kMlpRows tokens. Memory
// beyond `hidden` and the sums: the chunk's a, q, k, v, o ([tokens, hidden or q_out/kv_out]),
// the MLP block's gate/up ([kMlpRows, intermediate] ×2), and one Gram panel
// ([dim, kGramPanel]); for 7B proportions about 0.6 GB, whatever the sample count.
//
// Hessian sums. After an input has been used, its rows of unmasked tokens are compacted in
// place and XᵀX is computed by Gemm in float32 (beta 0) in blocks of at most
// kHessianBlockTokens rows, one column panel of the lower triangle at a time; each panel is
// added into the float64 sum. Only the lower triangles are accumulated during the call; the
// upper ones are mirrored once at its end.
//
// RoPE angles: θ = inv_freq[i] · p in double from RopeInvFreq's floats, cos/sin in double,
// rounded to float (so positions in the thousands lose nothing to a float product).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "quant/decoder.h"
#include "quant/linalg.h"

namespace qforge::quant {
namespace {

constexpr int64_t kChunkTokens = kHessianBlockTokens;  // tokens per chunk of samples (≥ 1 sample)
constexpr int64_t kMlpRows = 2048;                      // tokens per MLP row block
constexpr int64_t kQueryBlock = 64;                     // queries per attention score block
constexpr int64_t kGramPanel = 512;                     // columns per Gram panel

// Rows per ParallelFor chunk of an elementwise pass over rows of `width` floats.
int64_t RowGrain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// out[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps) over `rows` rows of `dim` values at
// stride `ld` (in and out may be the same).
void RmsNormRows(const float* x, int64_t rows, int64_t dim, int64_t ld, const float* w,
                 float eps, float* out) {
  ParallelFor(rows, RowGrain(dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * ld;
      float* yr = out + r * ld;
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float var = static_cast<float>(ss / static_cast<double>(dim));
      const float inv = 1.0f / std::sqrt(var + eps);
      for (int64_t i = 0; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
  });
}

// y[r, :] += bias over `rows` rows of `dim` values.
void AddBias(float* y, int64_t rows, int64_t dim, const std::vector<float>& bias) {
  if (bias.empty()) return;
  ParallelFor(rows, RowGrain(dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* yr = y + r * dim;
      for (int64_t i = 0; i < dim; ++i) yr[i] += bias[i];
    }
  });
}

// y = x · Wᵀ (+ bias): x [rows, in], W [out, in], y [rows, out].
void Linear(const float* x, int64_t rows, int64_t in, const std::vector<float>& w, int64_t out,
            const std::vector<float>& bias, float* y) {
  Gemm(false, true, rows, out, in, 1.0f, x, in, w.data(), in, 0.0f, y, out);
  AddBias(y, rows, out, bias);
}

// Per-head RMSNorm (q_norm / k_norm) and RoPE, in place on x [rows, heads·d]; row r is at
// position r % seq_len. cos_t/sin_t: [seq_len, d/2].
void NormAndRope(float* x, int64_t rows, int64_t heads, int64_t d, int64_t seq_len,
                 const std::vector<float>& norm, float eps, const std::vector<float>& cos_t,
                 const std::vector<float>& sin_t) {
  const int64_t half = d / 2, width = heads * d;
  if (!norm.empty()) RmsNormRows(x, rows * heads, d, d, norm.data(), eps, x);
  ParallelFor(rows, RowGrain(width), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cos_t.data() + (r % seq_len) * half;
      const float* s = sin_t.data() + (r % seq_len) * half;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + r * width + h * d;
        for (int64_t i = 0; i < half; ++i) {
          const float x0 = v[i], x1 = v[i + half];
          v[i] = x0 * c[i] - x1 * s[i];
          v[i + half] = x1 * c[i] + x0 * s[i];
        }
      }
    }
  });
}

// Causal attention of `samples` samples of seq_len tokens: q [T, heads·d], k/v [T, kv·d],
// o [T, heads·d]; keys with mask 0 are never attended, a query without keys gets 0.
void Attention(const DecoderConfig& c, const float* q, const float* k, const float* v,
               const uint8_t* mask, int64_t samples, int64_t seq_len, float* o) {
  const int64_t heads = c.num_attention_heads, d = c.head_dim;
  const int64_t group = heads / c.num_key_value_heads;
  const int64_t q_ld = c.q_out(), kv_ld = c.kv_out(), L = seq_len;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  ParallelFor(samples * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(static_cast<size_t>(std::min(kQueryBlock, L) * L));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t s = task / heads, h = task % heads, kvh = h / group;
      const float* qs = q + s * L * q_ld + h * d;
      const float* ks = k + s * L * kv_ld + kvh * d;
      const float* vs = v + s * L * kv_ld + kvh * d;
      const uint8_t* ms = mask ? mask + s * L : nullptr;
      float* os = o + s * L * q_ld + h * d;
      for (int64_t i0 = 0; i0 < L; i0 += kQueryBlock) {
        const int64_t i1 = std::min(L, i0 + kQueryBlock), nq = i1 - i0, nk = i1;
        // Scores of queries i0..i1-1 against keys 0..i1-1 (the causal bound of the block).
        Gemm(false, true, nq, nk, d, scale, qs + i0 * q_ld, q_ld, ks, kv_ld, 0.0f, p.data(), nk);
        for (int64_t r = 0; r < nq; ++r) {
          float* row = p.data() + r * nk;
          const int64_t last = i0 + r;  // keys 0..last are causal
          float mx = -INFINITY;
          for (int64_t j = 0; j <= last; ++j) {
            if (ms == nullptr || ms[j]) mx = std::max(mx, row[j]);
          }
          if (mx == -INFINITY) {  // no attendable key: o = 0
            std::fill(row, row + nk, 0.0f);
            continue;
          }
          double sum = 0;
          for (int64_t j = 0; j <= last; ++j) {
            const float e = (ms == nullptr || ms[j]) ? std::exp(row[j] - mx) : 0.0f;
            row[j] = e;
            sum += e;
          }
          const float inv = static_cast<float>(1.0 / sum);
          for (int64_t j = 0; j <= last; ++j) row[j] *= inv;
          std::fill(row + last + 1, row + nk, 0.0f);
        }
        Gemm(false, false, nq, d, nk, 1.0f, p.data(), nk, vs, kv_ld, 0.0f, os + i0 * q_ld, q_ld);
      }
    }
  });
}

// Moves the rows of x [rows, dim] whose mask is 1 to the front, in order; returns their
// count (all rows for a null mask).
int64_t CompactRows(float* x, int64_t rows, int64_t dim, const uint8_t* mask) {
  if (mask == nullptr) return rows;
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!mask[r]) continue;
    if (n != r) std::memmove(x + n * dim, x + r * dim, static_cast<size_t>(dim) * sizeof(float));
    ++n;
  }
  return n;
}

// Lower triangle of sum [dim, dim] (float64) += xᵀx, x [rows, dim]: float32 Gemm blocks of
// at most kHessianBlockTokens rows, one column panel at a time, each added in float64.
void AddGramLower(const float* x, int64_t rows, int64_t dim, double* sum,
                  std::vector<float>& tile) {
  const int64_t panel = std::min(kGramPanel, dim);
  if (tile.size() < static_cast<size_t>(dim * panel)) tile.resize(static_cast<size_t>(dim * panel));
  for (int64_t r0 = 0; r0 < rows; r0 += kHessianBlockTokens) {
    const int64_t n = std::min(kHessianBlockTokens, rows - r0);
    const float* xb = x + r0 * dim;
    for (int64_t j0 = 0; j0 < dim; j0 += panel) {
      const int64_t w = std::min(panel, dim - j0), h = dim - j0;
      // tile [h, w] = X[:, j0:]ᵀ X[:, j0:j0+w]: rows j0.. of the panel's columns.
      Gemm(true, false, h, w, n, 1.0f, xb + j0, dim, xb + j0, dim, 0.0f, tile.data(), w);
      ParallelFor(h, RowGrain(w), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const float* t = tile.data() + i * w;
          double* s = sum + (j0 + i) * dim + j0;
          const int64_t cols = std::min(w, i + 1);  // lower triangle only
          for (int64_t j = 0; j < cols; ++j) s[j] += t[j];
        }
      });
    }
  }
}

void MirrorLower(double* s, int64_t dim) {
  ParallelFor(dim, RowGrain(dim), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = i + 1; j < dim; ++j) s[i * dim + j] = s[j * dim + i];
    }
  });
}

class CpuDecoderForward final : public DecoderForward {
 public:
  const char* backend() const override { return "cpu"; }

  Status ForwardLayer(const DecoderConfig& config, const DecoderLayerWeights& weights,
                      const TokenBatch& batch, float* hidden, LayerHessianSums* sums,
                      const std::function<bool(double)>& progress) override;

 private:
  // Scratch reused across calls (one call at a time).
  std::vector<float> a_, q_, k_, v_, o_, b_, g_, u_, tile_, cos_, sin_;
};

Status CpuDecoderForward::ForwardLayer(const DecoderConfig& c, const DecoderLayerWeights& w,
                                       const TokenBatch& batch, float* hidden,
                                       LayerHessianSums* sums,
                                       const std::function<bool(double)>& progress) {
  QF_RETURN_IF_ERROR(ValidateDecoderLayerWeights(c, w));
  QF_RETURN_IF_ERROR(ValidateTokenBatch(c, batch, hidden));
  if (sums != nullptr) QF_RETURN_IF_ERROR(ValidateHessianSums(c, *sums));

  const int64_t H = c.hidden_size, QO = c.q_out(), KV = c.kv_out(), I = c.intermediate_size;
  const int64_t L = batch.seq_len, d = c.head_dim, half = d / 2;
  const float eps = static_cast<float>(c.rms_norm_eps);
  auto want = [&](DecoderInput in) { return sums != nullptr && sums->wanted[static_cast<int>(in)]; };
  auto sum_of = [&](DecoderInput in) { return sums->sums[static_cast<int>(in)].data(); };

  // RoPE tables [L, d/2].
  const std::vector<float> inv_freq = RopeInvFreq(c);
  cos_.resize(static_cast<size_t>(L * half));
  sin_.resize(static_cast<size_t>(L * half));
  for (int64_t p = 0; p < L; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double theta = static_cast<double>(inv_freq[i]) * static_cast<double>(p);
      cos_[p * half + i] = static_cast<float>(std::cos(theta));
      sin_[p * half + i] = static_cast<float>(std::sin(theta));
    }
  }

  const int64_t chunk = std::max<int64_t>(1, kChunkTokens / L);
  for (int64_t s0 = 0; s0 < batch.samples; s0 += chunk) {
    const int64_t ns = std::min(chunk, batch.samples - s0), T = ns * L;
    float* x = hidden + s0 * L * H;
    const uint8_t* mask = batch.mask ? batch.mask + s0 * L : nullptr;

    // Attention block.
    a_.resize(static_cast<size_t>(T * H));
    q_.resize(static_cast<size_t>(T * QO));
    k_.resize(static_cast<size_t>(T * KV));
    v_.resize(static_cast<size_t>(T * KV));
    o_.resize(static_cast<size_t>(T * QO));
    RmsNormRows(x, T, H, H, w.input_layernorm.data(), eps, a_.data());
    Linear(a_.data(), T, H, w.q_proj, QO, w.q_bias, q_.data());
    Linear(a_.data(), T, H, w.k_proj, KV, w.k_bias, k_.data());
    Linear(a_.data(), T, H, w.v_proj, KV, w.v_bias, v_.data());
    if (want(DecoderInput::kQkv)) {
      AddGramLower(a_.data(), CompactRows(a_.data(), T, H, mask), H, sum_of(DecoderInput::kQkv),
                   tile_);
    }
    NormAndRope(q_.data(), T, c.num_attention_heads, d, L, w.q_norm, eps, cos_, sin_);
    NormAndRope(k_.data(), T, c.num_key_value_heads, d, L, w.k_norm, eps, cos_, sin_);
    Attention(c, q_.data(), k_.data(), v_.data(), mask, ns, L, o_.data());
    Gemm(false, true, T, H, QO, 1.0f, o_.data(), QO, w.o_proj.data(), QO, 1.0f, x, H);
    AddBias(x, T, H, w.o_bias);
    if (want(DecoderInput::kO)) {
      AddGramLower(o_.data(), CompactRows(o_.data(), T, QO, mask), QO, sum_of(DecoderInput::kO),
                   tile_);
    }

    // MLP, in row blocks.
    for (int64_t r0 = 0; r0 < T; r0 += kMlpRows) {
      const int64_t rows = std::min(kMlpRows, T - r0);
      float* xr = x + r0 * H;
      const uint8_t* mr = mask ? mask + r0 : nullptr;
      b_.resize(static_cast<size_t>(rows * H));
      g_.resize(static_cast<size_t>(rows * I));
      u_.resize(static_cast<size_t>(rows * I));
      RmsNormRows(xr, rows, H, H, w.post_attention_layernorm.data(), eps, b_.data());
      Linear(b_.data(), rows, H, w.gate_proj, I, w.gate_bias, g_.data());
      Linear(b_.data(), rows, H, w.up_proj, I, w.up_bias, u_.data());
      if (want(DecoderInput::kGateUp)) {
        AddGramLower(b_.data(), CompactRows(b_.data(), rows, H, mr), H,
                     sum_of(DecoderInput::kGateUp), tile_);
      }
      ParallelFor(rows, RowGrain(I), [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0 * I; i < i1 * I; ++i) {
          const float gv = g_[i];
          g_[i] = gv / (1.0f + std::exp(-gv)) * u_[i];
        }
      });
      Gemm(false, true, rows, H, I, 1.0f, g_.data(), I, w.down_proj.data(), I, 1.0f, xr, H);
      AddBias(xr, rows, H, w.down_bias);
      if (want(DecoderInput::kDown)) {
        AddGramLower(g_.data(), CompactRows(g_.data(), rows, I, mr), I,
                     sum_of(DecoderInput::kDown), tile_);
      }
    }

    if (sums != nullptr) {
      int64_t real = T;
      if (mask != nullptr) real = std::count(mask, mask + T, uint8_t{1});
      sums->tokens += real;
    }
    if (progress && !progress(static_cast<double>(s0 + ns) / static_cast<double>(batch.samples))) {
      return CancelledError("decoder forward cancelled after " + std::to_string(s0 + ns) +
                            " of " + std::to_string(batch.samples) +
                            " samples (hidden states and Hessian sums are incomplete)");
    }
  }

  if (sums != nullptr) {
    for (int i = 0; i < kNumDecoderInputs; ++i) {
      if (sums->wanted[i]) {
        MirrorLower(sums->sums[i].data(), DecoderInputDim(c, static_cast<DecoderInput>(i)));
      }
    }
  }
  return OkStatus();
}

}  // namespace

std::unique_ptr<DecoderForward> NewCpuDecoderForward() {
  return std::make_unique<CpuDecoderForward>();
}

}  // namespace qforge::quant

#include "quant/decoder_head.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "quant/linalg.h"

namespace qforge::quant {
namespace {

std::string Where(int64_t index, int64_t seq_len) {
  return "sample " + std::to_string(index / seq_len) + ", position " +
         std::to_string(index % seq_len);
}

// out[r, :] = w ⊙ x[rows[r], :] / sqrt(mean(x[rows[r], :]²) + eps) (decoder.h's RMSNorm).
void NormRows(const float* x, const int64_t* rows, int64_t n, int64_t dim, const float* w,
              float eps, float* out) {
  ParallelFor(n, std::max<int64_t>(1, 8192 / std::max<int64_t>(dim, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + rows[r] * dim;
      float* yr = out + r * dim;
      double ss = 0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float var = static_cast<float>(ss / static_cast<double>(dim));
      const float inv = 1.0f / std::sqrt(var + eps);
      for (int64_t i = 0; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
  });
}

// log Σ exp(l[v]) in double, max-shifted; *argmax = the lowest index of the largest logit.
// False when a logit is not finite.
bool LogSumExp(const float* l, int64_t n, double* lse, int64_t* argmax) {
  int64_t best = 0;
  for (int64_t v = 0; v < n; ++v) {
    if (!std::isfinite(l[v])) return false;
    if (l[v] > l[best]) best = v;
  }
  const double m = l[best];
  double s = 0;
  for (int64_t v = 0; v < n; ++v) s += std::exp(static_cast<double>(l[v]) - m);
  *lse = m + std::log(s);
  *argmax = best;
  return true;
}

struct PositionValues {
  double nll_r = 0, nll_c = 0, kl = 0;
  bool agree = false;
  int bad = 0;  // 1: reference logits not finite, 2: candidate's
};

}  // namespace

int64_t DefaultHeadChunkTokens(int64_t vocab_size) {
  const uint64_t per_token = 8 * static_cast<uint64_t>(std::max<int64_t>(vocab_size, 1));
  return std::max<int64_t>(1, static_cast<int64_t>(kHeadLogitsBudgetBytes / per_token));
}

uint64_t DecoderHeadScratchBytes(const DecoderConfig& c, int64_t tokens, int64_t chunk_tokens) {
  if (chunk_tokens <= 0) chunk_tokens = DefaultHeadChunkTokens(c.vocab_size);
  const uint64_t chunk = static_cast<uint64_t>(std::min(std::max<int64_t>(tokens, 0), chunk_tokens));
  const uint64_t V = static_cast<uint64_t>(std::max<int64_t>(c.vocab_size, 0));
  const uint64_t H = static_cast<uint64_t>(std::max<int64_t>(c.hidden_size, 0));
  return chunk * (2 * 4 * V + 2 * 4 * H + sizeof(PositionValues)) +
         8 * static_cast<uint64_t>(std::max<int64_t>(tokens, 0));
}

Status CompareDecoderHeads(const DecoderConfig& c, const DecoderHeadWeights& reference,
                           const DecoderHeadWeights& candidate, const float* reference_hidden,
                           const float* candidate_hidden, const int32_t* ids, const uint8_t* mask,
                           int64_t samples, int64_t seq_len, HeadComparisonSums* sums,
                           int64_t chunk_tokens) {
  if (reference.norm == nullptr || reference.lm_head == nullptr || candidate.norm == nullptr ||
      candidate.lm_head == nullptr || reference_hidden == nullptr ||
      candidate_hidden == nullptr || ids == nullptr || sums == nullptr) {
    return InvalidArgumentError(
        "decoder head: both models' norm and lm_head, both hidden states, the ids and the sums "
        "are required");
  }
  if (c.hidden_size <= 0 || c.vocab_size <= 0 || samples <= 0 || seq_len <= 0) {
    return InvalidArgumentError("decoder head: hidden_size " + std::to_string(c.hidden_size) +
                                ", vocab_size " + std::to_string(c.vocab_size) + ", samples " +
                                std::to_string(samples) + " and seq_len " +
                                std::to_string(seq_len) + " must all be positive");
  }
  const int64_t T = samples * seq_len, H = c.hidden_size, V = c.vocab_size;
  // The predicted positions, in order.
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < T; ++i) {
    if (mask != nullptr && mask[i] > 1) {
      return InvalidArgumentError("decoder head: attention mask of " + Where(i, seq_len) +
                                  " is " + std::to_string(mask[i]) + ", expected 0 or 1");
    }
  }
  for (int64_t s = 0; s < samples; ++s) {
    for (int64_t t = 0; t + 1 < seq_len; ++t) {
      const int64_t i = s * seq_len + t;
      if (mask != nullptr && (mask[i] == 0 || mask[i + 1] == 0)) continue;
      if (ids[i + 1] < 0 || ids[i + 1] >= V) {
        return InvalidArgumentError("decoder head: the target id at " + Where(i + 1, seq_len) +
                                    " is " + std::to_string(ids[i + 1]) +
                                    ", outside the vocabulary (vocab_size " + std::to_string(V) +
                                    ")");
      }
      rows.push_back(i);
    }
  }
  if (chunk_tokens <= 0) chunk_tokens = DefaultHeadChunkTokens(V);
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t C = std::min<int64_t>(chunk_tokens, std::max<int64_t>(n, 1));
  std::vector<float> xr(static_cast<size_t>(C * H)), xc(static_cast<size_t>(C * H));
  std::vector<float> lr(static_cast<size_t>(C * V)), lc(static_cast<size_t>(C * V));
  std::vector<PositionValues> values(static_cast<size_t>(C));
  const float eps = static_cast<float>(c.rms_norm_eps);
  HeadComparisonSums add;
  for (int64_t begin = 0; begin < n; begin += C) {
    const int64_t m = std::min(C, n - begin);
    const int64_t* chunk = rows.data() + begin;
    NormRows(reference_hidden, chunk, m, H, reference.norm, eps, xr.data());
    NormRows(candidate_hidden, chunk, m, H, candidate.norm, eps, xc.data());
    Gemm(false, true, m, V, H, 1.0f, xr.data(), H, reference.lm_head, H, 0.0f, lr.data(), V);
    Gemm(false, true, m, V, H, 1.0f, xc.data(), H, candidate.lm_head, H, 0.0f, lc.data(), V);
    ParallelFor(m, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* a = lr.data() + r * V;
        const float* b = lc.data() + r * V;
        PositionValues& pv = values[r];
        pv = PositionValues();
        double lse_a = 0, lse_b = 0;
        int64_t top_a = 0, top_b = 0;
        if (!LogSumExp(a, V, &lse_a, &top_a)) {
          pv.bad = 1;
          continue;
        }
        if (!LogSumExp(b, V, &lse_b, &top_b)) {
          pv.bad = 2;
          continue;
        }
        const int32_t y = ids[chunk[r] + 1];
        pv.nll_r = lse_a - static_cast<double>(a[y]);
        pv.nll_c = lse_b - static_cast<double>(b[y]);
        double kl = 0;
        for (int64_t v = 0; v < V; ++v) {
          const double log_p = static_cast<double>(a[v]) - lse_a;
          const double log_q = static_cast<double>(b[v]) - lse_b;
          kl += std::exp(log_p) * (log_p - log_q);
        }
        pv.kl = kl;
        pv.agree = top_a == top_b;
      }
    });
    for (int64_t r = 0; r < m; ++r) {
      const PositionValues& pv = values[r];
      if (pv.bad != 0) {
        return InvalidArgumentError(std::string("decoder head: the ") +
                                    (pv.bad == 1 ? "reference" : "candidate") +
                                    " model's logits at " + Where(chunk[r], seq_len) +
                                    " are not finite (its weights or hidden states overflow)");
      }
      add.nll_reference += pv.nll_r;
      add.nll_candidate += pv.nll_c;
      add.kl += pv.kl;
      add.top1_agree += pv.agree ? 1 : 0;
      add.predicted_tokens += 1;
    }
  }
  sums->nll_reference += add.nll_reference;
  sums->nll_candidate += add.nll_candidate;
  sums->kl += add.kl;
  sums->top1_agree += add.top1_agree;
  sums->predicted_tokens += add.predicted_tokens;
  return OkStatus();
}

}  // namespace qforge::quant

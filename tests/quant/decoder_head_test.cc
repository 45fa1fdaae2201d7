// The decoder head comparison (quant/decoder_head.h) against a float64 implementation written
// here from the header's formulas: RMSNorm, logits and log-softmax in double.
// Bounds: the sums (NLL of both models, KL) within kSumBound relative of the float64 values
// (float32 norm and GEMM of 64..96 terms on N(0,1)-scale inputs); top-1 agreement and the
// predicted count exactly (the test checks that no position has a near-tie, top-2 margin
// above kTieMargin, so float32 rounding cannot flip an argmax).
#include "quant/decoder_head.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "quant/decoder.h"

namespace qforge::quant {
namespace {

constexpr double kSumBound = 1e-5;
constexpr double kTieMargin = 1e-3;

::testing::AssertionResult Contains(const std::string& haystack, const std::string& needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << haystack << "' does not contain '" << needle
                                       << "'";
}

std::vector<float> Normal(int64_t n, float mean, float sd, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(mean, sd);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

struct Case {
  DecoderConfig config;
  int64_t samples = 3, seq_len = 11;
  std::vector<float> norm_r, head_r, norm_c, head_c, hidden_r, hidden_c;
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
};

Case MakeCase(int64_t hidden, int64_t vocab, float head_scale, uint64_t seed) {
  Case k;
  k.config.hidden_size = hidden;
  k.config.vocab_size = vocab;
  k.config.rms_norm_eps = 1e-5;
  const int64_t T = k.samples * k.seq_len;
  k.norm_r = Normal(hidden, 1.0f, 0.2f, seed + 1);
  k.norm_c = Normal(hidden, 1.0f, 0.2f, seed + 2);
  k.head_r = Normal(vocab * hidden, 0.0f, head_scale, seed + 3);
  k.head_c = k.head_r;
  const std::vector<float> noise = Normal(vocab * hidden, 0.0f, 0.3f * head_scale, seed + 4);
  for (size_t i = 0; i < noise.size(); ++i) k.head_c[i] += noise[i];
  k.hidden_r = Normal(T * hidden, 0.0f, 1.0f, seed + 5);
  k.hidden_c = k.hidden_r;
  const std::vector<float> hn = Normal(T * hidden, 0.0f, 0.2f, seed + 6);
  for (size_t i = 0; i < hn.size(); ++i) k.hidden_c[i] += hn[i];
  std::mt19937_64 rng(seed + 7);
  k.ids.resize(static_cast<size_t>(T));
  for (int32_t& id : k.ids) id = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  // Sample 0 all real; sample 1 padded at its end; sample 2 with a hole in the middle.
  k.mask.assign(static_cast<size_t>(T), 1);
  for (int64_t t = 8; t < k.seq_len; ++t) k.mask[k.seq_len + t] = 0;
  k.mask[2 * k.seq_len + 4] = 0;
  return k;
}

struct RefSums {
  double nll_r = 0, nll_c = 0, kl = 0;
  int64_t agree = 0, predicted = 0;
  double min_margin = std::numeric_limits<double>::infinity();
};

// The float64 head: y = norm ⊙ x / sqrt(mean(x²) + eps), logits = lm_head · y, log-softmax.
std::vector<double> RefLogits(const Case& k, const std::vector<float>& norm,
                              const std::vector<float>& head, const std::vector<float>& hidden,
                              int64_t row, double* margin) {
  const int64_t H = k.config.hidden_size, V = k.config.vocab_size;
  double ss = 0;
  for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(hidden[row * H + i]) * hidden[row * H + i];
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(H) + k.config.rms_norm_eps);
  std::vector<double> y(static_cast<size_t>(H)), l(static_cast<size_t>(V));
  for (int64_t i = 0; i < H; ++i) y[i] = static_cast<double>(norm[i]) * hidden[row * H + i] * inv;
  for (int64_t v = 0; v < V; ++v) {
    double s = 0;
    for (int64_t i = 0; i < H; ++i) s += static_cast<double>(head[v * H + i]) * y[i];
    l[v] = s;
  }
  std::vector<double> sorted = l;
  std::sort(sorted.rbegin(), sorted.rend());
  *margin = std::min(*margin, sorted[0] - sorted[1]);
  const double m = sorted[0];
  double z = 0;
  for (double x : l) z += std::exp(x - m);
  const double lse = m + std::log(z);
  for (double& x : l) x -= lse;
  return l;
}

RefSums Reference(const Case& k) {
  RefSums r;
  const int64_t V = k.config.vocab_size;
  for (int64_t s = 0; s < k.samples; ++s) {
    for (int64_t t = 0; t + 1 < k.seq_len; ++t) {
      const int64_t i = s * k.seq_len + t;
      if (!k.mask[i] || !k.mask[i + 1]) continue;
      const std::vector<double> lp = RefLogits(k, k.norm_r, k.head_r, k.hidden_r, i, &r.min_margin);
      const std::vector<double> lq = RefLogits(k, k.norm_c, k.head_c, k.hidden_c, i, &r.min_margin);
      const int32_t y = k.ids[i + 1];
      r.nll_r -= lp[y];
      r.nll_c -= lq[y];
      for (int64_t v = 0; v < V; ++v) r.kl += std::exp(lp[v]) * (lp[v] - lq[v]);
      const int64_t ap = std::max_element(lp.begin(), lp.end()) - lp.begin();
      const int64_t aq = std::max_element(lq.begin(), lq.end()) - lq.begin();
      r.agree += ap == aq;
      r.predicted += 1;
    }
  }
  return r;
}

Status RunHead(const Case& k, HeadComparisonSums* out, int64_t chunk = 0) {
  return CompareDecoderHeads(k.config, {k.norm_r.data(), k.head_r.data()},
                             {k.norm_c.data(), k.head_c.data()}, k.hidden_r.data(),
                             k.hidden_c.data(), k.ids.data(), k.mask.data(), k.samples, k.seq_len,
                             out, chunk);
}

double Rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

TEST(DecoderHeadTest, MatchesFloat64ReferenceWithMaskAndChunks) {
  for (int64_t chunk : {int64_t{0}, int64_t{1}, int64_t{5}}) {
    SCOPED_TRACE("chunk " + std::to_string(chunk));
    const Case k = MakeCase(64, 96, 0.2f, 11);
    const RefSums r = Reference(k);
    ASSERT_GT(r.min_margin, kTieMargin);
    ASSERT_GT(r.kl, 0.05);  // the two heads differ: a real KL to compare
    HeadComparisonSums s;
    ASSERT_TRUE(RunHead(k, &s, chunk).ok());
    // 10 + 7 + 8 positions: sample 1 predicts t = 0..6, sample 2 loses t = 3 and 4.
    EXPECT_EQ(s.predicted_tokens, 25);
    EXPECT_EQ(s.predicted_tokens, r.predicted);
    EXPECT_LT(Rel(s.nll_reference, r.nll_r), kSumBound);
    EXPECT_LT(Rel(s.nll_candidate, r.nll_c), kSumBound);
    EXPECT_LT(Rel(s.kl, r.kl), kSumBound);
    EXPECT_EQ(s.top1_agree, r.agree);
    EXPECT_LT(s.top1_agree, s.predicted_tokens);  // the candidate's head disagrees somewhere
  }
}

TEST(DecoderHeadTest, StableForLargeLogitsAndAdditive) {
  // Logits of magnitude ~1000: a naive exp would overflow.
  const Case k = MakeCase(48, 80, 150.0f, 23);
  const RefSums r = Reference(k);
  ASSERT_GT(r.min_margin, kTieMargin);
  HeadComparisonSums s;
  ASSERT_TRUE(RunHead(k, &s).ok());
  EXPECT_TRUE(std::isfinite(s.kl));
  EXPECT_LT(Rel(s.nll_reference, r.nll_r), kSumBound);
  EXPECT_LT(Rel(s.nll_candidate, r.nll_c), kSumBound);
  EXPECT_LT(Rel(s.kl, r.kl), kSumBound);
  // A second call adds.
  HeadComparisonSums twice = s;
  ASSERT_TRUE(RunHead(k, &twice).ok());
  EXPECT_EQ(twice.predicted_tokens, 2 * s.predicted_tokens);
  EXPECT_DOUBLE_EQ(twice.nll_reference, 2 * s.nll_reference);
}

TEST(DecoderHeadTest, IdenticalModelsGiveZeroKlAndFullAgreement) {
  Case k = MakeCase(64, 96, 0.2f, 5);
  k.norm_c = k.norm_r;
  k.head_c = k.head_r;
  k.hidden_c = k.hidden_r;
  HeadComparisonSums s;
  ASSERT_TRUE(RunHead(k, &s).ok());
  EXPECT_EQ(s.kl, 0.0);
  EXPECT_EQ(s.nll_candidate, s.nll_reference);
  EXPECT_EQ(s.top1_agree, s.predicted_tokens);
  const RefSums r = Reference(k);
  EXPECT_LT(Rel(s.nll_reference, r.nll_r), kSumBound);
}

TEST(DecoderHeadTest, ErrorsNameWhatIsWrong) {
  Case k = MakeCase(16, 8, 0.2f, 3);
  HeadComparisonSums s;
  k.ids[k.seq_len + 5] = 8;  // sample 1, position 5: a target of position 4
  Status st = RunHead(k, &s);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "sample 1, position 5"));
  EXPECT_TRUE(Contains(st.message(), "vocab_size 8"));

  k = MakeCase(16, 8, 0.2f, 3);
  k.mask[2] = 2;
  st = RunHead(k, &s);
  EXPECT_TRUE(Contains(st.message(), "attention mask of sample 0, position 2 is 2"));

  k = MakeCase(16, 8, 0.2f, 3);
  k.hidden_c[16 * 3] = std::numeric_limits<float>::infinity();
  st = RunHead(k, &s);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "candidate model's logits at sample 0, position 3"));

  k = MakeCase(16, 8, 0.2f, 3);
  EXPECT_EQ(CompareDecoderHeads(k.config, {nullptr, k.head_r.data()},
                                {k.norm_c.data(), k.head_c.data()}, k.hidden_r.data(),
                                k.hidden_c.data(), k.ids.data(), nullptr, 1, 4, &s)
                .code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge::quant

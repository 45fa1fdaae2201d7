// The CPU decoder forward pass (quant/decoder.h) against the float64 layer of decoder_ref.h on
// small random Llama-family layers: plain MHA, GQA, odd sizes, Qwen2 q/k/v biases, Qwen3 q/k
// norms with head_dim != hidden / heads, Llama-3 rope scaling, Llama attention/MLP biases,
// right and left padding, several layers in sequence, batches split over calls, more tokens
// than one Hessian block; RopeInvFreq against its float64 formula; the validation errors and
// cancellation.
//
// Bounds (relative Frobenius against float64):
//   kHiddenBound  the layer's output hidden states;
//   kDeltaBound   the layer's update (output − input), which the residual does not dilute;
//   kSumBound     each of the four Hessian sums (float32 GEMM blocks of at most
//                 kHessianBlockTokens tokens added in float64: the bound does not depend on
//                 the number of blocks).
#include "quant/decoder.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "quant/linalg_internal.h"
#include "tests/quant/decoder_ref.h"

namespace qforge::quant {
namespace {

using testing::RandomDecoderWeights;
using testing::RandomHidden;
using testing::RefDecoderLayer;
using testing::RefHessianSums;
using testing::RelFrobenius;
using testing::SmallDecoderConfig;

constexpr double kHiddenBound = 5e-6;
constexpr double kDeltaBound = 1e-5;
constexpr double kSumBound = 5e-6;

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

std::vector<double> Delta(const std::vector<double>& out, const std::vector<float>& in) {
  std::vector<double> d(out.size());
  for (size_t i = 0; i < out.size(); ++i) d[i] = out[i] - static_cast<double>(in[i]);
  return d;
}

// Runs `layers` one after another on the CPU over random hidden states; each layer is checked
// against the reference run from the same input: hidden states, update, the four Hessian
// sums (exactly symmetric) and the token count.
void ExpectMatchesReference(const DecoderConfig& c, const std::vector<DecoderLayerWeights>& layers,
                            int64_t samples, int64_t seq_len, const std::vector<uint8_t>& mask,
                            uint64_t seed) {
  const uint8_t* m = mask.empty() ? nullptr : mask.data();
  std::vector<float> hidden = RandomHidden(samples * seq_len * c.hidden_size, seed);
  std::vector<double> ref = ToDouble(hidden);
  auto fwd = NewCpuDecoderForward();
  ASSERT_STREQ(fwd->backend(), "cpu");
  int64_t expected_tokens = samples * seq_len;
  if (m != nullptr) expected_tokens = std::count(mask.begin(), mask.end(), uint8_t{1});
  for (size_t l = 0; l < layers.size(); ++l) {
    SCOPED_TRACE("layer " + std::to_string(l));
    const std::vector<float> before = hidden;
    LayerHessianSums sums;
    sums.Reset(c);
    RefHessianSums ref_sums;
    ref_sums.Reset(c);
    // The reference runs from the CPU's input, so each layer's bound holds on its own.
    ref = ToDouble(hidden);
    ASSERT_TRUE(fwd->ForwardLayer(c, layers[l], {samples, seq_len, m}, hidden.data(), &sums).ok());
    RefDecoderLayer(c, layers[l], samples, seq_len, m, ref, &ref_sums);
    for (float v : hidden) ASSERT_TRUE(std::isfinite(v));
    EXPECT_LE(RelFrobenius(hidden, ref), kHiddenBound);
    EXPECT_LE(RelFrobenius(Delta(ToDouble(hidden), before), Delta(ref, before)), kDeltaBound);
    EXPECT_EQ(sums.tokens, expected_tokens);
    EXPECT_EQ(ref_sums.tokens, expected_tokens);
    for (int i = 0; i < kNumDecoderInputs; ++i) {
      SCOPED_TRACE(DecoderInputName(static_cast<DecoderInput>(i)));
      EXPECT_LE(RelFrobenius(sums.sums[i], ref_sums.sums[i]), kSumBound);
      // Exactly symmetric.
      const int64_t d = DecoderInputDim(c, static_cast<DecoderInput>(i));
      for (int64_t r = 0; r < d; ++r) {
        for (int64_t k = 0; k < r; ++k) ASSERT_EQ(sums.sums[i][r * d + k], sums.sums[i][k * d + r]);
      }
    }
  }
}

void ExpectMatchesReference(const DecoderConfig& c, int64_t samples, int64_t seq_len,
                            const std::vector<uint8_t>& mask = {}, uint64_t seed = 1) {
  ExpectMatchesReference(c, {RandomDecoderWeights(c, seed + 100)}, samples, seq_len, mask, seed);
}

TEST(DecoderForwardTest, LlamaMhaMatchesReference) {
  ExpectMatchesReference(SmallDecoderConfig(64, 4, 4, 16, 128), 3, 33);
}

TEST(DecoderForwardTest, GqaMatchesReference) {
  ExpectMatchesReference(SmallDecoderConfig(64, 8, 2, 8, 96), 2, 40);
}

TEST(DecoderForwardTest, OddSizesMatchReference) {
  // hidden 40, 4 heads of 10, 2 KV heads, intermediate 72, seq_len 7.
  ExpectMatchesReference(SmallDecoderConfig(40, 4, 2, 10, 72), 5, 7);
}

TEST(DecoderForwardTest, PortableLinalgMatchesReference) {
  internal::SetForcePortableLinalg(true);
  ExpectMatchesReference(SmallDecoderConfig(64, 8, 2, 8, 96), 2, 40);
  internal::SetForcePortableLinalg(false);
}

TEST(DecoderForwardTest, Qwen2BiasesMatchReference) {
  DecoderConfig c = SmallDecoderConfig(48, 6, 2, 8, 80);
  c.attention_bias = true;  // q/k/v biases, no o_proj bias
  c.rope_theta = 1000000.0;
  c.rms_norm_eps = 1e-6;
  ExpectMatchesReference(c, 2, 29);
}

TEST(DecoderForwardTest, Qwen3QkNormMatchesReference) {
  DecoderConfig c = SmallDecoderConfig(32, 4, 2, 12, 64);  // head_dim 12 != 32 / 4
  c.qk_norm = true;
  c.rms_norm_eps = 1e-6;
  ASSERT_EQ(c.q_out(), 48);
  ExpectMatchesReference(c, 2, 31);
}

TEST(DecoderForwardTest, LlamaAttentionAndMlpBiasMatchReference) {
  DecoderConfig c = SmallDecoderConfig(48, 4, 2, 12, 72);
  c.attention_bias = true;
  c.o_proj_bias = true;
  c.mlp_bias = true;
  ExpectMatchesReference(c, 2, 19);
}

TEST(DecoderForwardTest, Llama3RopeScalingMatchesReference) {
  DecoderConfig c = SmallDecoderConfig(64, 4, 2, 16, 96, 512);
  c.rope_theta = 500000.0;
  c.has_llama3_rope_scaling = true;
  c.llama3_rope_scaling = {8.0, 1.0, 4.0, 64};
  ExpectMatchesReference(c, 1, 300);
}

TEST(DecoderForwardTest, RightPaddingMatchesReference) {
  const int64_t samples = 3, L = 20;
  std::vector<uint8_t> mask(samples * L, 1);
  for (int64_t t = 12; t < L; ++t) mask[0 * L + t] = 0;  // sample 0: 12 tokens
  for (int64_t t = 1; t < L; ++t) mask[2 * L + t] = 0;   // sample 2: 1 token
  ExpectMatchesReference(SmallDecoderConfig(40, 4, 2, 10, 72), samples, L, mask);
}

TEST(DecoderForwardTest, LeftPaddingAndEmptySampleMatchReference) {
  // Left-padded queries have no attendable key (o = 0, never NaN); sample 1 is all padding.
  const int64_t samples = 3, L = 16;
  std::vector<uint8_t> mask(samples * L, 1);
  for (int64_t t = 0; t < 5; ++t) mask[0 * L + t] = 0;
  for (int64_t t = 0; t < L; ++t) mask[1 * L + t] = 0;
  for (int64_t t = 0; t < L; t += 3) mask[2 * L + t] = 0;  // holes
  ExpectMatchesReference(SmallDecoderConfig(40, 4, 2, 10, 72), samples, L, mask);
}

TEST(DecoderForwardTest, PaddingNeverEntersTheSums) {
  // The same batch with different values at the padded positions: the sums and the real
  // tokens' outputs do not change (masked keys are never attended, masked rows never summed).
  const DecoderConfig c = SmallDecoderConfig(40, 4, 2, 10, 72);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 7);
  const int64_t samples = 2, L = 12, H = c.hidden_size;
  std::vector<uint8_t> mask(samples * L, 1);
  for (int64_t t = 0; t < 4; ++t) mask[t] = 0;          // left padding
  for (int64_t t = 9; t < L; ++t) mask[L + t] = 0;      // right padding
  std::vector<float> h1 = RandomHidden(samples * L * H, 8), h2 = h1;
  const std::vector<float> noise = RandomHidden(samples * L * H, 9);
  for (int64_t t = 0; t < samples * L; ++t) {
    if (!mask[t]) {
      for (int64_t i = 0; i < H; ++i) h2[t * H + i] = 100.0f * noise[t * H + i];
    }
  }
  auto fwd = NewCpuDecoderForward();
  LayerHessianSums s1, s2;
  s1.Reset(c);
  s2.Reset(c);
  ASSERT_TRUE(fwd->ForwardLayer(c, w, {samples, L, mask.data()}, h1.data(), &s1).ok());
  ASSERT_TRUE(fwd->ForwardLayer(c, w, {samples, L, mask.data()}, h2.data(), &s2).ok());
  EXPECT_EQ(s1.tokens, (12 - 4) + 9);
  EXPECT_EQ(s2.tokens, s1.tokens);
  for (int i = 0; i < kNumDecoderInputs; ++i) EXPECT_LE(RelFrobenius(s2.sums[i], s1.sums[i]), 1e-6);
  for (int64_t t = 0; t < samples * L; ++t) {
    if (!mask[t]) continue;
    for (int64_t i = 0; i < H; ++i) ASSERT_NEAR(h2[t * H + i], h1[t * H + i], 1e-5f) << t;
  }
}

TEST(DecoderForwardTest, SeveralLayersInSequenceMatchReference) {
  DecoderConfig c = SmallDecoderConfig(48, 6, 3, 8, 80);
  c.num_hidden_layers = 3;
  std::vector<DecoderLayerWeights> layers;
  for (uint64_t l = 0; l < 3; ++l) layers.push_back(RandomDecoderWeights(c, 40 + l));
  std::vector<uint8_t> mask(2 * 17, 1);
  mask[2 * 17 - 1] = mask[2 * 17 - 2] = 0;
  ExpectMatchesReference(c, layers, 2, 17, mask, 3);

  // The whole stack from one input against the reference stack end to end.
  std::vector<float> hidden = RandomHidden(2 * 17 * c.hidden_size, 4);
  std::vector<double> ref = ToDouble(hidden);
  auto fwd = NewCpuDecoderForward();
  for (const auto& w : layers) {
    ASSERT_TRUE(fwd->ForwardLayer(c, w, {2, 17, mask.data()}, hidden.data(), nullptr).ok());
    RefDecoderLayer(c, w, 2, 17, mask.data(), ref, nullptr);
  }
  EXPECT_LE(RelFrobenius(hidden, ref), 3 * kHiddenBound);
}

TEST(DecoderForwardTest, SplitBatchSumsEqualOneCall) {
  const DecoderConfig c = SmallDecoderConfig(40, 4, 2, 10, 72);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 11);
  const int64_t samples = 6, L = 9, H = c.hidden_size;
  std::vector<uint8_t> mask(samples * L, 1);
  mask[L - 1] = mask[4 * L] = mask[4 * L + 1] = 0;
  const std::vector<float> input = RandomHidden(samples * L * H, 12);
  auto fwd = NewCpuDecoderForward();

  std::vector<float> one = input;
  LayerHessianSums s_one;
  s_one.Reset(c);
  ASSERT_TRUE(fwd->ForwardLayer(c, w, {samples, L, mask.data()}, one.data(), &s_one).ok());

  std::vector<float> two = input;
  LayerHessianSums s_two;
  s_two.Reset(c);
  ASSERT_TRUE(fwd->ForwardLayer(c, w, {2, L, mask.data()}, two.data(), &s_two).ok());
  ASSERT_TRUE(fwd->ForwardLayer(c, w, {4, L, mask.data() + 2 * L}, two.data() + 2 * L * H,
                                &s_two)
                  .ok());
  EXPECT_EQ(s_one.tokens, samples * L - 3);
  EXPECT_EQ(s_two.tokens, s_one.tokens);
  for (int i = 0; i < kNumDecoderInputs; ++i) {
    EXPECT_LE(RelFrobenius(s_two.sums[i], s_one.sums[i]), kSumBound);
  }
  EXPECT_LE(RelFrobenius(two, one), kHiddenBound);
}

TEST(DecoderForwardTest, LongSequenceSpanningHessianBlocksMatchesReference) {
  // One sample of 6000 tokens: the Hessian sums take two float32 blocks (4096 + 1904).
  const int64_t L = 6000;
  ASSERT_GT(L, kHessianBlockTokens);
  ExpectMatchesReference(SmallDecoderConfig(16, 2, 1, 8, 24, 8192), 1, L);
}

TEST(DecoderForwardTest, ManySamplesSpanningHessianBlocksMatchReference) {
  // 160 samples × 64 tokens = 10240 tokens: three blocks, the bound as for one.
  const int64_t samples = 160, L = 64;
  ASSERT_GT(samples * L, 2 * kHessianBlockTokens);
  std::vector<uint8_t> mask(samples * L, 1);
  for (int64_t s = 0; s < samples; s += 7) mask[s * L + L - 1] = 0;
  ExpectMatchesReference(SmallDecoderConfig(16, 2, 2, 8, 24), samples, L, mask, 5);
}

TEST(DecoderForwardTest, UnwantedSumsStayEmpty) {
  const DecoderConfig c = SmallDecoderConfig(40, 4, 2, 10, 72);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 13);
  LayerHessianSums sums;
  sums.wanted[static_cast<int>(DecoderInput::kO)] = false;
  sums.wanted[static_cast<int>(DecoderInput::kDown)] = false;
  sums.Reset(c);
  EXPECT_TRUE(sums.sums[static_cast<int>(DecoderInput::kO)].empty());
  std::vector<float> hidden = RandomHidden(2 * 5 * c.hidden_size, 14);
  std::vector<double> ref = ToDouble(hidden);
  RefHessianSums ref_sums;
  ref_sums.Reset(c);
  ASSERT_TRUE(NewCpuDecoderForward()->ForwardLayer(c, w, {2, 5}, hidden.data(), &sums).ok());
  RefDecoderLayer(c, w, 2, 5, nullptr, ref, &ref_sums);
  EXPECT_TRUE(sums.sums[static_cast<int>(DecoderInput::kO)].empty());
  EXPECT_TRUE(sums.sums[static_cast<int>(DecoderInput::kDown)].empty());
  EXPECT_LE(RelFrobenius(sums.sums[0], ref_sums.sums[0]), kSumBound);
  EXPECT_LE(RelFrobenius(sums.sums[2], ref_sums.sums[2]), kSumBound);
  EXPECT_EQ(sums.tokens, 10);
}

TEST(DecoderForwardTest, ProgressReportsSamplesDoneAndCancels) {
  const DecoderConfig c = SmallDecoderConfig(16, 2, 1, 8, 24, 4096);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 15);
  // seq_len 2048: two samples per chunk of kHessianBlockTokens tokens, 5 samples -> 3 calls.
  const int64_t samples = 5, L = 2048;
  std::vector<float> hidden = RandomHidden(samples * L * c.hidden_size, 16);
  auto fwd = NewCpuDecoderForward();
  std::vector<double> seen;
  ASSERT_TRUE(fwd->ForwardLayer(c, w, {samples, L}, hidden.data(), nullptr, [&](double f) {
                   seen.push_back(f);
                   return true;
                 }).ok());
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_DOUBLE_EQ(seen[0], 2.0 / 5);
  EXPECT_DOUBLE_EQ(seen[1], 4.0 / 5);
  EXPECT_DOUBLE_EQ(seen[2], 1.0);

  int calls = 0;
  LayerHessianSums sums;
  sums.Reset(c);
  const Status st = fwd->ForwardLayer(c, w, {samples, L}, hidden.data(), &sums, [&](double) {
    ++calls;
    return false;
  });
  EXPECT_EQ(st.code(), StatusCode::kCancelled);
  EXPECT_NE(st.message().find("cancelled"), std::string::npos) << st.message();
  EXPECT_EQ(calls, 1);
}

// ---- RopeInvFreq ----------------------------------------------------------------------

TEST(RopeInvFreqTest, PlainMatchesFormula) {
  DecoderConfig c = SmallDecoderConfig(128, 1, 1, 128, 64);
  c.rope_theta = 500000.0;
  const std::vector<float> f = RopeInvFreq(c);
  ASSERT_EQ(f.size(), 64u);
  for (int i = 0; i < 64; ++i) {
    const double expected = 1.0 / std::pow(500000.0, 2.0 * i / 128.0);
    EXPECT_NEAR(f[i], expected, 1e-7 * expected) << i;
  }
}

TEST(RopeInvFreqTest, Llama3ScalingMatchesFormulaInAllThreeBands) {
  // Llama-3.1 8B's values: head_dim 128, theta 500000, factor 8, low 1, high 4, original
  // 8192: wavelengths from 2π to ~2.6e6 cover the kept (< 2048), the interpolated
  // [2048, 8192] and the divided (> 8192) bands.
  DecoderConfig c = SmallDecoderConfig(4096, 32, 8, 128, 14336, 131072);
  c.rope_theta = 500000.0;
  c.has_llama3_rope_scaling = true;
  c.llama3_rope_scaling = {8.0, 1.0, 4.0, 8192};
  const std::vector<float> f = RopeInvFreq(c);
  ASSERT_EQ(f.size(), 64u);
  const double pi = std::acos(-1.0);
  int kept = 0, smoothed = 0, divided = 0;
  for (int i = 0; i < 64; ++i) {
    const double base = 1.0 / std::pow(500000.0, 2.0 * i / 128.0);
    const double wavelen = 2 * pi / base;
    double expected;
    if (wavelen < 8192.0 / 4.0) {
      expected = base;
      ++kept;
    } else if (wavelen > 8192.0 / 1.0) {
      expected = base / 8.0;
      ++divided;
    } else {
      const double smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
      expected = (1 - smooth) * base / 8.0 + smooth * base;
      ++smoothed;
    }
    EXPECT_NEAR(f[i], expected, 1e-7 * expected) << i;
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(smoothed, 0);
  EXPECT_GT(divided, 0);
  // Known endpoints: the first frequency is kept (1), the last divided by the factor.
  EXPECT_FLOAT_EQ(f[0], 1.0f);
  EXPECT_NEAR(f[63], 1.0 / std::pow(500000.0, 126.0 / 128.0) / 8.0, 1e-13);
}

// ---- Validation -----------------------------------------------------------------------

TEST(DecoderConfigTest, AcceptsSmallConfigs) {
  EXPECT_TRUE(ValidateDecoderConfig(SmallDecoderConfig(40, 4, 2, 10, 72)).ok());
}

TEST(DecoderConfigTest, NamesTheBadField) {
  const DecoderConfig ok = SmallDecoderConfig(64, 8, 2, 8, 96);
  struct Case {
    const char* field;
    void (*mutate)(DecoderConfig&);
  };
  const Case cases[] = {
      {"hidden_size", [](DecoderConfig& c) { c.hidden_size = 0; }},
      {"num_attention_heads", [](DecoderConfig& c) { c.num_attention_heads = -1; }},
      {"num_key_value_heads", [](DecoderConfig& c) { c.num_key_value_heads = 0; }},
      {"head_dim", [](DecoderConfig& c) { c.head_dim = 0; }},
      {"intermediate_size", [](DecoderConfig& c) { c.intermediate_size = 0; }},
      {"num_hidden_layers", [](DecoderConfig& c) { c.num_hidden_layers = 0; }},
      {"vocab_size", [](DecoderConfig& c) { c.vocab_size = 0; }},
      {"max_position_embeddings", [](DecoderConfig& c) { c.max_position_embeddings = 0; }},
      {"num_key_value_heads: 3 does not divide num_attention_heads 8",
       [](DecoderConfig& c) { c.num_key_value_heads = 3; }},
      {"head_dim is 9", [](DecoderConfig& c) { c.head_dim = 9; }},
      {"rms_norm_eps", [](DecoderConfig& c) { c.rms_norm_eps = NAN; }},
      {"rms_norm_eps", [](DecoderConfig& c) { c.rms_norm_eps = 0; }},
      {"rope_theta", [](DecoderConfig& c) { c.rope_theta = -1; }},
      {"rope_theta", [](DecoderConfig& c) { c.rope_theta = INFINITY; }},
      {"rope_scaling.factor",
       [](DecoderConfig& c) {
         c.has_llama3_rope_scaling = true;
         c.llama3_rope_scaling.factor = 0;
       }},
      {"rope_scaling.low_freq_factor",
       [](DecoderConfig& c) {
         c.has_llama3_rope_scaling = true;
         c.llama3_rope_scaling.low_freq_factor = -1;
       }},
      {"rope_scaling.high_freq_factor 1 must be greater than rope_scaling.low_freq_factor 1",
       [](DecoderConfig& c) {
         c.has_llama3_rope_scaling = true;
         c.llama3_rope_scaling.high_freq_factor = 1;
       }},
      {"rope_scaling.original_max_position_embeddings",
       [](DecoderConfig& c) {
         c.has_llama3_rope_scaling = true;
         c.llama3_rope_scaling.original_max_position_embeddings = 0;
       }},
  };
  for (const Case& k : cases) {
    DecoderConfig c = ok;
    k.mutate(c);
    const Status st = ValidateDecoderConfig(c);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << k.field;
    EXPECT_NE(st.message().find(k.field), std::string::npos) << st.message();
  }
  // Invalid scaling is ignored when the config has none.
  DecoderConfig c = ok;
  c.llama3_rope_scaling.factor = 0;
  EXPECT_TRUE(ValidateDecoderConfig(c).ok());
}

TEST(DecoderWeightsTest, NamesTheBadWeight) {
  DecoderConfig c = SmallDecoderConfig(64, 8, 2, 8, 96);  // kv_out 16
  const DecoderLayerWeights ok = RandomDecoderWeights(c, 17);
  EXPECT_TRUE(ValidateDecoderLayerWeights(c, ok).ok());

  DecoderLayerWeights w = ok;
  w.k_proj.resize(1000);
  EXPECT_EQ(ValidateDecoderLayerWeights(c, w).message(),
            "layer weights: k_proj has 1000 values, expected 1024 (= 16 × 64)");
  w = ok;
  w.down_proj.clear();
  EXPECT_NE(ValidateDecoderLayerWeights(c, w).message().find("down_proj is missing"),
            std::string::npos);
  w = ok;
  w.post_attention_layernorm.pop_back();
  EXPECT_NE(ValidateDecoderLayerWeights(c, w).message().find("post_attention_layernorm"),
            std::string::npos);
  w = ok;
  w.q_bias.assign(64, 0.0f);  // the config has no attention_bias
  EXPECT_NE(ValidateDecoderLayerWeights(c, w).message().find("q_bias has 64 values, but the "
                                                             "config has no attention_bias"),
            std::string::npos);

  c.qk_norm = true;  // Qwen3 without its norms
  EXPECT_NE(ValidateDecoderLayerWeights(c, ok).message().find("q_norm is missing"),
            std::string::npos);
  c.qk_norm = false;
  c.mlp_bias = true;
  EXPECT_NE(ValidateDecoderLayerWeights(c, ok).message().find("gate_bias is missing"),
            std::string::npos);
  c.mlp_bias = false;
  c.o_proj_bias = true;
  EXPECT_NE(ValidateDecoderLayerWeights(c, ok).message().find("o_bias is missing"),
            std::string::npos);
  c.o_proj_bias = false;
  c.hidden_size = 0;  // the config is checked first
  EXPECT_NE(ValidateDecoderLayerWeights(c, ok).message().find("hidden_size"), std::string::npos);
}

TEST(DecoderInputsTest, NamesAndDims) {
  DecoderConfig c = SmallDecoderConfig(32, 4, 2, 12, 64);
  EXPECT_STREQ(DecoderInputName(DecoderInput::kQkv), "qkv");
  EXPECT_STREQ(DecoderInputName(DecoderInput::kO), "o");
  EXPECT_STREQ(DecoderInputName(DecoderInput::kGateUp), "gate_up");
  EXPECT_STREQ(DecoderInputName(DecoderInput::kDown), "down");
  EXPECT_EQ(DecoderInputDim(c, DecoderInput::kQkv), 32);
  EXPECT_EQ(DecoderInputDim(c, DecoderInput::kO), 48);
  EXPECT_EQ(DecoderInputDim(c, DecoderInput::kGateUp), 32);
  EXPECT_EQ(DecoderInputDim(c, DecoderInput::kDown), 64);
  LayerHessianSums s;
  s.tokens = 9;
  s.wanted[1] = false;
  s.Reset(c);
  EXPECT_EQ(s.tokens, 0);
  EXPECT_EQ(s.sums[0].size(), 32u * 32u);
  EXPECT_TRUE(s.sums[1].empty());
  EXPECT_EQ(s.sums[3].size(), 64u * 64u);
}

TEST(DecoderForwardTest, RejectsBadCalls) {
  const DecoderConfig c = SmallDecoderConfig(16, 2, 1, 8, 24, 32);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 18);
  std::vector<float> hidden = RandomHidden(2 * 64 * c.hidden_size, 19);
  auto fwd = NewCpuDecoderForward();
  auto expect = [&](const Status& st, const std::string& part) {
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << part;
    EXPECT_NE(st.message().find(part), std::string::npos) << st.message();
  };
  expect(fwd->ForwardLayer(c, w, {1, 33}, hidden.data(), nullptr),
         "seq_len 33 is above the model's max_position_embeddings 32");
  expect(fwd->ForwardLayer(c, w, {0, 8}, hidden.data(), nullptr), "samples is 0");
  expect(fwd->ForwardLayer(c, w, {2, 0}, hidden.data(), nullptr), "seq_len is 0");
  expect(fwd->ForwardLayer(c, w, {2, 8}, nullptr, nullptr), "hidden states");
  std::vector<uint8_t> mask(16, 1);
  mask[11] = 2;
  expect(fwd->ForwardLayer(c, w, {2, 8, mask.data()}, hidden.data(), nullptr),
         "attention mask of sample 1 at position 3 is 2");
  DecoderConfig bad = c;
  bad.num_key_value_heads = 3;
  expect(fwd->ForwardLayer(bad, w, {2, 8}, hidden.data(), nullptr), "num_key_value_heads");
  DecoderLayerWeights bad_w = w;
  bad_w.v_proj.pop_back();
  expect(fwd->ForwardLayer(c, bad_w, {2, 8}, hidden.data(), nullptr), "v_proj");
  LayerHessianSums not_reset;
  expect(fwd->ForwardLayer(c, w, {2, 8}, hidden.data(), &not_reset), "Reset(config)");
  LayerHessianSums other;  // Reset for another model
  other.Reset(SmallDecoderConfig(16, 2, 1, 8, 32));
  expect(fwd->ForwardLayer(c, w, {2, 8}, hidden.data(), &other), "down has 1024 values");
}

}  // namespace
}  // namespace qforge::quant

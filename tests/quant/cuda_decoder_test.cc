// The CUDA decoder forward pass (NewCudaDecoderForward, quant/cuda/backends.h) against the CPU
// one (NewCpuDecoderForward) and the float64 layer of decoder_ref.h, on the same small random
// Llama-family layers: plain MHA, GQA, odd sizes, Qwen2 q/k/v biases, Qwen3 q/k norms with
// head_dim != hidden / heads, Llama attention/MLP biases, Llama-3 rope scaling, right/left
// padding with an all-padding sample, several micro-batches, a sequence longer than one
// Hessian block (several query blocks, MLP row blocks and Gram blocks); sums accumulated over
// calls, unwanted sums, determinism, progress and cancellation, the validation errors, and the
// device memory against CudaDecoderForwardMemoryBytes. The GPU cases skip without a device
// (and run on the CPU emulator, tests/cuda_emu); the estimate's properties are checked
// everywhere.
//
// Bounds (relative Frobenius), as backends.h states them:
//   kHiddenBound  the output hidden states, and the layer's update (output − input), against
//                 the CPU and against float64;
//   kSumBound     each Hessian sum, against the CPU and against float64.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "quant/cuda/backends.h"
#include "quant/decoder.h"
#include "tests/quant/decoder_ref.h"

#ifdef QFORGE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace qforge::quant {
namespace {

using testing::RandomDecoderWeights;
using testing::RandomHidden;
using testing::RefDecoderLayer;
using testing::RefHessianSums;
using testing::RelFrobenius;
using testing::SmallDecoderConfig;

constexpr double kHiddenBound = 1e-4;
constexpr double kSumBound = 1e-5;
// What the estimate adds for cuBLAS's own workspace (decoder_memory.cc).
constexpr uint64_t kLibrarySlackBytes = uint64_t{64} << 20;

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

template <typename T>
std::vector<double> Delta(const std::vector<T>& out, const std::vector<float>& in) {
  std::vector<double> d(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    d[i] = static_cast<double>(out[i]) - static_cast<double>(in[i]);
  }
  return d;
}

::testing::AssertionResult ExactlySymmetric(const std::vector<double>& s, int64_t dim) {
  for (int64_t r = 0; r < dim; ++r) {
    for (int64_t k = 0; k < r; ++k) {
      if (s[r * dim + k] != s[k * dim + r]) {
        return ::testing::AssertionFailure() << "[" << r << "][" << k << "] " << s[r * dim + k]
                                             << " != [" << k << "][" << r << "] " << s[k * dim + r];
      }
    }
  }
  return ::testing::AssertionSuccess();
}

class CudaDecoderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ctx = CreateGpuContext();
    if (!ctx.ok()) GTEST_SKIP() << "no usable GPU: " << ctx.status().ToString();
    ctx_ = *ctx;
    auto fwd = NewCudaDecoderForward(ctx_);
    ASSERT_TRUE(fwd.ok()) << fwd.status().ToString();
    gpu_ = std::move(*fwd);
    cpu_ = NewCpuDecoderForward();
  }

  // One layer on the GPU, the CPU and in float64 from the same input, with all four sums:
  // hidden states, update and sums within the bounds, sums exactly symmetric, token counts.
  // `with_reference` false skips the float64 layer (for the larger cases).
  void ExpectMatches(const DecoderConfig& c, const DecoderLayerWeights& w, int64_t samples,
                     int64_t L, const std::vector<uint8_t>& mask, uint64_t seed,
                     bool with_reference = true) {
    const uint8_t* m = mask.empty() ? nullptr : mask.data();
    const std::vector<float> input = RandomHidden(samples * L * c.hidden_size, seed);
    std::vector<float> gpu = input, cpu = input;
    LayerHessianSums gs, cs;
    gs.Reset(c);
    cs.Reset(c);
    const Status st = gpu_->ForwardLayer(c, w, {samples, L, m}, gpu.data(), &gs);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_TRUE(cpu_->ForwardLayer(c, w, {samples, L, m}, cpu.data(), &cs).ok());
    for (float v : gpu) ASSERT_TRUE(std::isfinite(v));
    EXPECT_LE(RelFrobenius(gpu, cpu), kHiddenBound);
    EXPECT_LE(RelFrobenius(Delta(gpu, input), Delta(cpu, input)), kHiddenBound);
    int64_t tokens = samples * L;
    if (m != nullptr) tokens = std::count(mask.begin(), mask.end(), uint8_t{1});
    EXPECT_EQ(gs.tokens, tokens);
    EXPECT_EQ(cs.tokens, tokens);
    for (int i = 0; i < kNumDecoderInputs; ++i) {
      SCOPED_TRACE(DecoderInputName(static_cast<DecoderInput>(i)));
      EXPECT_LE(RelFrobenius(gs.sums[i], cs.sums[i]), kSumBound);
      EXPECT_TRUE(ExactlySymmetric(gs.sums[i], DecoderInputDim(c, static_cast<DecoderInput>(i))));
    }
    if (!with_reference) return;
    std::vector<double> ref = ToDouble(input);
    RefHessianSums rs;
    rs.Reset(c);
    RefDecoderLayer(c, w, samples, L, m, ref, &rs);
    EXPECT_LE(RelFrobenius(gpu, ref), kHiddenBound);
    EXPECT_LE(RelFrobenius(Delta(gpu, input), Delta(ref, input)), kHiddenBound);
    EXPECT_EQ(rs.tokens, tokens);
    for (int i = 0; i < kNumDecoderInputs; ++i) {
      SCOPED_TRACE(DecoderInputName(static_cast<DecoderInput>(i)));
      EXPECT_LE(RelFrobenius(gs.sums[i], rs.sums[i]), kSumBound);
    }
  }
  void ExpectMatches(const DecoderConfig& c, int64_t samples, int64_t L,
                     const std::vector<uint8_t>& mask = {}, uint64_t seed = 1) {
    ExpectMatches(c, RandomDecoderWeights(c, seed + 100), samples, L, mask, seed);
  }

  std::shared_ptr<GpuContext> ctx_;
  std::unique_ptr<DecoderForward> gpu_;
  std::unique_ptr<DecoderForward> cpu_;
};

TEST_F(CudaDecoderTest, BackendAndNullContext) {
  EXPECT_STREQ(gpu_->backend(), "cuda");
  auto none = NewCudaDecoderForward(nullptr);
  EXPECT_EQ(none.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(CudaDecoderTest, LlamaMhaMatchesCpu) {
  ExpectMatches(SmallDecoderConfig(64, 4, 4, 16, 128), 3, 33);
}

TEST_F(CudaDecoderTest, GqaMatchesCpu) {
  ExpectMatches(SmallDecoderConfig(64, 8, 2, 8, 96), 2, 40);
}

TEST_F(CudaDecoderTest, OddSizesMatchCpu) {
  // hidden 40, 4 heads of 10, 2 KV heads, intermediate 72, seq_len 7.
  ExpectMatches(SmallDecoderConfig(40, 4, 2, 10, 72), 5, 7);
}

TEST_F(CudaDecoderTest, Qwen2BiasesMatchCpu) {
  DecoderConfig c = SmallDecoderConfig(48, 6, 2, 8, 80);
  c.attention_bias = true;
  c.rope_theta = 1000000.0;
  c.rms_norm_eps = 1e-6;
  ExpectMatches(c, 2, 29);
}

TEST_F(CudaDecoderTest, Qwen3QkNormMatchesCpu) {
  DecoderConfig c = SmallDecoderConfig(32, 4, 2, 12, 64);  // head_dim 12 != 32 / 4
  c.qk_norm = true;
  c.rms_norm_eps = 1e-6;
  ExpectMatches(c, 2, 31);
}

TEST_F(CudaDecoderTest, LlamaAttentionAndMlpBiasMatchCpu) {
  DecoderConfig c = SmallDecoderConfig(48, 4, 2, 12, 72);
  c.attention_bias = true;
  c.o_proj_bias = true;
  c.mlp_bias = true;
  ExpectMatches(c, 2, 19);
}

TEST_F(CudaDecoderTest, Llama3RopeScalingMatchesCpu) {
  DecoderConfig c = SmallDecoderConfig(32, 2, 1, 16, 48, 512);
  c.rope_theta = 500000.0;
  c.has_llama3_rope_scaling = true;
  c.llama3_rope_scaling = {8.0, 1.0, 4.0, 64};
  ExpectMatches(c, 1, 300);
}

TEST_F(CudaDecoderTest, PaddingMatchesCpu) {
  // Sample 0 right-padded, sample 1 left-padded (its first queries have no attendable key:
  // o = 0, never NaN), sample 2 all padding, sample 3 with holes.
  const int64_t samples = 4, L = 16;
  std::vector<uint8_t> mask(samples * L, 1);
  for (int64_t t = 10; t < L; ++t) mask[0 * L + t] = 0;
  for (int64_t t = 0; t < 5; ++t) mask[1 * L + t] = 0;
  for (int64_t t = 0; t < L; ++t) mask[2 * L + t] = 0;
  for (int64_t t = 0; t < L; t += 3) mask[3 * L + t] = 0;
  ExpectMatches(SmallDecoderConfig(40, 4, 2, 10, 72), samples, L, mask);
}

TEST_F(CudaDecoderTest, SeveralMicroBatchesWithPaddingMatchCpu) {
  // 70 samples of 64 tokens: micro-batches of 64 and 6 samples (4096 + 384 tokens), the
  // first a full Hessian block of rows gathered around the padding.
  const int64_t samples = 70, L = 64;
  ASSERT_GT(samples * L, kHessianBlockTokens);
  std::vector<uint8_t> mask(samples * L, 1);
  for (int64_t s = 0; s < samples; s += 7) mask[s * L + L - 1] = 0;
  for (int64_t t = 0; t < 9; ++t) mask[3 * L + t] = 0;
  for (int64_t t = 0; t < L; ++t) mask[66 * L + t] = 0;
  ExpectMatches(SmallDecoderConfig(16, 2, 2, 8, 24), samples, L, mask, 5);
}

TEST_F(CudaDecoderTest, LongSequenceSpanningHessianBlocksMatchesCpu) {
  // One sample of 4500 tokens: two MLP row blocks (4096 + 404), attention in three query
  // blocks (2 heads × 4500 keys per query row), and two Gram blocks: of rows in place without
  // padding, of gathered rows (some in the second MLP block) with it.
  const int64_t L = 4500;
  const DecoderConfig c = SmallDecoderConfig(16, 2, 1, 8, 24, 8192);
  ASSERT_GT(L, kHessianBlockTokens);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 7);
  ExpectMatches(c, w, 1, L, {}, 6, /*with_reference=*/false);
  std::vector<uint8_t> mask(L, 1);
  for (int64_t t = 0; t < L; t += 97) mask[t] = 0;
  for (int64_t t = L - 50; t < L; ++t) mask[t] = 0;
  ASSERT_GT(std::count(mask.begin(), mask.end(), uint8_t{1}), kHessianBlockTokens);
  ExpectMatches(c, w, 1, L, mask, 9, /*with_reference=*/false);
}

TEST_F(CudaDecoderTest, WideIntermediateSpansGramPanelsMatchesCpu) {
  // intermediate 1100: the down_proj input's sum takes two Gram column panels (1024 + 76).
  const DecoderConfig c = SmallDecoderConfig(16, 2, 1, 8, 1100);
  std::vector<uint8_t> mask(2 * 9, 1);
  mask[3] = mask[17] = 0;
  ExpectMatches(c, 2, 9, mask, 8);
}

TEST_F(CudaDecoderTest, SumsAccumulateOverCalls) {
  // The batch in two calls into the same sums equals one call (the second call adds).
  const DecoderConfig c = SmallDecoderConfig(40, 4, 2, 10, 72);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 11);
  const int64_t samples = 6, L = 9, H = c.hidden_size;
  std::vector<uint8_t> mask(samples * L, 1);
  mask[L - 1] = mask[4 * L] = mask[4 * L + 1] = 0;
  const std::vector<float> input = RandomHidden(samples * L * H, 12);
  std::vector<float> one = input, two = input;
  LayerHessianSums s_one, s_two;
  s_one.Reset(c);
  s_two.Reset(c);
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {samples, L, mask.data()}, one.data(), &s_one).ok());
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {2, L, mask.data()}, two.data(), &s_two).ok());
  ASSERT_TRUE(
      gpu_->ForwardLayer(c, w, {4, L, mask.data() + 2 * L}, two.data() + 2 * L * H, &s_two).ok());
  EXPECT_EQ(s_one.tokens, samples * L - 3);
  EXPECT_EQ(s_two.tokens, s_one.tokens);
  for (int i = 0; i < kNumDecoderInputs; ++i) {
    EXPECT_LE(RelFrobenius(s_two.sums[i], s_one.sums[i]), kSumBound);
    EXPECT_TRUE(ExactlySymmetric(s_two.sums[i], DecoderInputDim(c, static_cast<DecoderInput>(i))));
  }
  EXPECT_LE(RelFrobenius(two, one), kHiddenBound);
}

TEST_F(CudaDecoderTest, UnwantedSumsStayEmptyAndNullSumsRun) {
  const DecoderConfig c = SmallDecoderConfig(40, 4, 2, 10, 72);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 13);
  const std::vector<float> input = RandomHidden(2 * 5 * c.hidden_size, 14);
  LayerHessianSums gs, cs;
  for (LayerHessianSums* s : {&gs, &cs}) {
    s->wanted[static_cast<int>(DecoderInput::kO)] = false;
    s->wanted[static_cast<int>(DecoderInput::kDown)] = false;
    s->Reset(c);
  }
  std::vector<float> gpu = input, cpu = input, bare = input;
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {2, 5}, gpu.data(), &gs).ok());
  ASSERT_TRUE(cpu_->ForwardLayer(c, w, {2, 5}, cpu.data(), &cs).ok());
  EXPECT_TRUE(gs.sums[static_cast<int>(DecoderInput::kO)].empty());
  EXPECT_TRUE(gs.sums[static_cast<int>(DecoderInput::kDown)].empty());
  EXPECT_LE(RelFrobenius(gs.sums[0], cs.sums[0]), kSumBound);
  EXPECT_LE(RelFrobenius(gs.sums[2], cs.sums[2]), kSumBound);
  EXPECT_EQ(gs.tokens, 10);
  // Without sums: the same hidden states.
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {2, 5}, bare.data(), nullptr).ok());
  EXPECT_EQ(bare, gpu);
}

TEST_F(CudaDecoderTest, Deterministic) {
  const DecoderConfig c = SmallDecoderConfig(48, 6, 3, 8, 80);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 21);
  const std::vector<float> input = RandomHidden(3 * 11 * c.hidden_size, 22);
  std::vector<uint8_t> mask(3 * 11, 1);
  mask[0] = mask[25] = 0;
  std::vector<float> h1 = input, h2 = input;
  LayerHessianSums s1, s2;
  s1.Reset(c);
  s2.Reset(c);
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {3, 11, mask.data()}, h1.data(), &s1).ok());
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {3, 11, mask.data()}, h2.data(), &s2).ok());
  EXPECT_EQ(h1, h2);
  for (int i = 0; i < kNumDecoderInputs; ++i) EXPECT_EQ(s1.sums[i], s2.sums[i]);
}

TEST_F(CudaDecoderTest, ProgressReportsSamplesDoneAndCancels) {
  // seq_len 1400: two samples per micro-batch, 3 samples -> reports 2/3 and 1.
  const DecoderConfig c = SmallDecoderConfig(16, 2, 1, 8, 24, 2048);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 15);
  const int64_t samples = 3, L = 1400;
  const std::vector<float> input = RandomHidden(samples * L * c.hidden_size, 16);
  std::vector<float> hidden = input;
  std::vector<double> seen;
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {samples, L}, hidden.data(), nullptr,
                                 [&](double f) {
                                   seen.push_back(f);
                                   return true;
                                 })
                  .ok());
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_DOUBLE_EQ(seen[0], 2.0 / 3);
  EXPECT_DOUBLE_EQ(seen[1], 1.0);

  // Cancelled at the first report: CANCELLED, no further report, the sums not touched.
  int calls = 0;
  LayerHessianSums sums;
  sums.Reset(c);
  hidden = input;
  const Status st = gpu_->ForwardLayer(c, w, {samples, L}, hidden.data(), &sums, [&](double) {
    ++calls;
    return false;
  });
  EXPECT_EQ(st.code(), StatusCode::kCancelled);
  EXPECT_NE(st.message().find("cancelled after 2 of 3 samples"), std::string::npos) << st.message();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(sums.tokens, 0);
  for (int i = 0; i < kNumDecoderInputs; ++i) {
    EXPECT_TRUE(
        std::all_of(sums.sums[i].begin(), sums.sums[i].end(), [](double v) { return v == 0.0; }));
  }
  // The forward pass is usable again after a cancellation.
  hidden = input;
  ASSERT_TRUE(gpu_->ForwardLayer(c, w, {1, 64}, hidden.data(), &sums).ok());
  EXPECT_EQ(sums.tokens, 64);
}

TEST_F(CudaDecoderTest, RejectsBadCallsAsTheCpuDoes) {
  const DecoderConfig c = SmallDecoderConfig(16, 2, 1, 8, 24, 32);
  const DecoderLayerWeights w = RandomDecoderWeights(c, 18);
  std::vector<float> hidden = RandomHidden(2 * 64 * c.hidden_size, 19);
  auto expect = [&](const TokenBatch& b, float* h, LayerHessianSums* s, const DecoderConfig& cc,
                    const DecoderLayerWeights& ww, const std::string& part) {
    const Status gst = gpu_->ForwardLayer(cc, ww, b, h, s);
    const Status cst = cpu_->ForwardLayer(cc, ww, b, h, s);
    EXPECT_EQ(gst.code(), StatusCode::kInvalidArgument) << part;
    EXPECT_NE(gst.message().find(part), std::string::npos) << gst.message();
    EXPECT_EQ(gst.message(), cst.message());
  };
  expect({1, 33}, hidden.data(), nullptr, c, w,
         "seq_len 33 is above the model's max_position_embeddings 32");
  expect({0, 8}, hidden.data(), nullptr, c, w, "samples is 0");
  expect({2, 0}, hidden.data(), nullptr, c, w, "seq_len is 0");
  expect({2, 8}, nullptr, nullptr, c, w, "hidden states");
  std::vector<uint8_t> mask(16, 1);
  mask[11] = 2;
  expect({2, 8, mask.data()}, hidden.data(), nullptr, c, w,
         "attention mask of sample 1 at position 3 is 2");
  DecoderConfig bad = c;
  bad.num_key_value_heads = 3;
  expect({2, 8}, hidden.data(), nullptr, bad, w, "num_key_value_heads");
  DecoderLayerWeights bad_w = w;
  bad_w.v_proj.pop_back();
  expect({2, 8}, hidden.data(), nullptr, c, bad_w, "v_proj");
  LayerHessianSums not_reset;
  expect({2, 8}, hidden.data(), &not_reset, c, w, "Reset(config)");
}

// ---- Device memory --------------------------------------------------------------------

TEST(CudaDecoderMemoryEstimateTest, GrowsWithTheBatchUpToOneMicroBatch) {
  const DecoderConfig c = SmallDecoderConfig(4096, 32, 8, 128, 14336, 8192);
  uint64_t previous = 0;
  for (int64_t samples : {1, 2, 3, 4, 8, 64}) {
    const uint64_t b = CudaDecoderForwardMemoryBytes(c, samples, 1024);
    EXPECT_GE(b, previous) << samples;
    previous = b;
  }
  // 4 samples of 1024 tokens fill a micro-batch: more samples cost nothing more.
  EXPECT_GT(CudaDecoderForwardMemoryBytes(c, 4, 1024), CudaDecoderForwardMemoryBytes(c, 3, 1024));
  EXPECT_EQ(CudaDecoderForwardMemoryBytes(c, 4, 1024),
            CudaDecoderForwardMemoryBytes(c, 1000, 1024));
  // Longer samples never cost less at the same sample count.
  previous = 0;
  for (int64_t L : {1, 16, 512, 2048, 4096, 8192}) {
    const uint64_t b = CudaDecoderForwardMemoryBytes(c, 1, L);
    EXPECT_GE(b, previous) << L;
    previous = b;
  }
  // The weights (float32) and the four float64 sums of a 7B layer are a floor; 7B at 2048
  // tokens stays within a few GiB of it.
  const uint64_t weights = 4ull * (2 * 4096 + 4096 * 4096 * 2 + 1024 * 4096 * 2 + 3 * 14336 * 4096);
  const uint64_t sums = 8ull * (3 * 4096 * 4096 + 14336ull * 14336);
  const uint64_t b7 = CudaDecoderForwardMemoryBytes(c, 2, 2048);
  EXPECT_GT(b7, weights + sums);
  EXPECT_LT(b7, weights + sums + (uint64_t{3} << 30));
  // Biases and q/k norms count.
  DecoderConfig qwen = c;
  qwen.attention_bias = true;
  qwen.qk_norm = true;
  EXPECT_GT(CudaDecoderForwardMemoryBytes(qwen, 2, 2048), b7);
}

TEST_F(CudaDecoderTest, PoolHighWaterStaysUnderTheEstimate) {
#ifdef QFORGE_HAVE_CUDA
  cudaMemPool_t pool;
  ASSERT_EQ(cudaDeviceGetDefaultMemPool(&pool, GpuContextDevice(ctx_.get())), cudaSuccess);
  struct Case {
    std::string name;
    DecoderConfig config;
    int64_t samples, L;
  };
  DecoderConfig qwen = SmallDecoderConfig(48, 6, 2, 8, 80);
  qwen.attention_bias = true;
  qwen.qk_norm = true;
  const Case cases[] = {
      {"gqa_two_micro_batches", SmallDecoderConfig(32, 4, 2, 8, 64, 4096), 2, 2100},
      {"qwen_short", qwen, 5, 20},
      {"wide_mlp", SmallDecoderConfig(32, 2, 1, 16, 640, 4096), 2, 100},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const DecoderConfig& c = k.config;
    const DecoderLayerWeights w = RandomDecoderWeights(c, 31);
    std::vector<float> hidden = RandomHidden(k.samples * k.L * c.hidden_size, 32);
    std::vector<uint8_t> mask(k.samples * k.L, 1);
    mask[0] = 0;
    LayerHessianSums sums;
    sums.Reset(c);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    uint64_t high = 0;  // writing 0 resets the mark
    ASSERT_EQ(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), cudaSuccess);
    uint64_t before = 0;
    ASSERT_EQ(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &before), cudaSuccess);
    const Status st = gpu_->ForwardLayer(c, w, {k.samples, k.L, mask.data()}, hidden.data(), &sums);
    ASSERT_TRUE(st.ok()) << st.ToString();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), cudaSuccess);
    ASSERT_GE(high, before);
    const uint64_t used = high - before;
    const uint64_t estimate = CudaDecoderForwardMemoryBytes(c, k.samples, k.L);
    EXPECT_GT(used, 0u);
    EXPECT_LE(used, estimate);
    // Tight: without the library slack, within 1.5x of what the call held at once.
    EXPECT_LE(estimate - kLibrarySlackBytes, used + used / 2);
    std::printf("%s: pool high-water %.3f MiB, estimate %.3f MiB (%.3f without slack)\n",
                k.name.c_str(), used / 1048576.0, estimate / 1048576.0,
                (estimate - kLibrarySlackBytes) / 1048576.0);
  }
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}

}  // namespace
}  // namespace qforge::quant

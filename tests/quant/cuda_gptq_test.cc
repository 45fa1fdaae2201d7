// The CUDA GPTQ backend against the CPU solver (gptq.cc, the reference it must match) on the
// same seeded synthetic layers: codes, group parameters, proxy loss, output error, damping,
// errors, determinism, progress reports and cancellation (quant/progress.h), and its
// memory estimate against what it allocates. The GPU cases
// skip without a device; the estimate's own properties are checked everywhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tests/quant/cached_layers.h"
#include "tests/quant/progress_recorder.h"
#include "quant/cuda/backends.h"
#include "quant/gptq.h"
#include "quant/synthetic.h"

#ifdef QFORGE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace qforge::quant {
namespace {

// Tolerances of the GPU path against the CPU path. Both are float32 sweeps over the same
// factor, but cuSOLVER and cuBLAS round differently from the CPU's LAPACK/BLAS, so a value
// within float rounding of a grid midpoint may take the other code and change its row's
// later feedback (the same bounds as the CPU solver against its float64 oracle).
constexpr double kMinCodeAgreement = 0.999;
constexpr double kMinCodeAgreement8Bit = 0.995;  // 16x finer grid relative to float rounding
constexpr double kLossRelTol = 1e-3;
constexpr double kMetricRelTol = 1e-3;
// Group params (equal zero, scale within kScaleRelTol): a flipped code changes its row's
// later group fits, so this is looser than the code agreement.
constexpr double kMinParamAgreement = 0.99;
constexpr double kScaleRelTol = 1e-4;

double Agreement(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size() || a.empty()) return 0;
  size_t same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
  return static_cast<double>(same) / static_cast<double>(a.size());
}

double RelDiff(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-300); }

class CudaGptqTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ctx = CreateGpuContext();
    if (!ctx.ok()) GTEST_SKIP() << "no usable GPU: " << ctx.status().ToString();
    ctx_ = *ctx;
    auto solver = NewCudaGptqSolver(ctx_);
    ASSERT_TRUE(solver.ok()) << solver.status().ToString();
    gpu_ = std::move(*solver);
    cpu_ = NewCpuGptqSolver();
  }

  // Both solvers on (w, h, o); both must succeed and agree within the tolerances.
  void ExpectMatchesCpu(const Matrix& w, const Matrix& h, const GptqOptions& o,
                        const std::string& what, double min_agreement = kMinCodeAgreement) {
    auto cpu = cpu_->Quantize(w, h, o);
    ASSERT_TRUE(cpu.ok()) << what << ": " << cpu.status().ToString();
    auto gpu = gpu_->Quantize(w, h, o);
    ASSERT_TRUE(gpu.ok()) << what << ": " << gpu.status().ToString();
    const GptqResult& c = *cpu;
    const GptqResult& g = *gpu;
    EXPECT_EQ(g.out_features, c.out_features) << what;
    EXPECT_EQ(g.in_features, c.in_features) << what;
    EXPECT_EQ(g.bits, c.bits) << what;
    EXPECT_EQ(g.group_size, c.group_size) << what;
    EXPECT_EQ(g.num_groups, c.num_groups) << what;
    EXPECT_EQ(g.g_idx, c.g_idx) << what;
    EXPECT_EQ(g.perm, c.perm) << what;
    EXPECT_EQ(g.cholesky_attempts, c.cholesky_attempts) << what;
    EXPECT_DOUBLE_EQ(g.damp_percent_used, c.damp_percent_used) << what;
    EXPECT_GE(Agreement(g.codes, c.codes), min_agreement) << what;
    EXPECT_LE(RelDiff(g.proxy_loss, c.proxy_loss), kLossRelTol)
        << what << ": " << g.proxy_loss << " vs " << c.proxy_loss;
    if (o.compute_output_error) {
      EXPECT_LE(RelDiff(g.output_error, c.output_error), kMetricRelTol)
          << what << ": " << g.output_error << " vs " << c.output_error;
      EXPECT_LE(RelDiff(g.weight_energy, c.weight_energy), kMetricRelTol)
          << what << ": " << g.weight_energy << " vs " << c.weight_energy;
    }
    ASSERT_EQ(g.scales.size(), c.scales.size()) << what;
    ASSERT_EQ(g.zeros.size(), c.zeros.size()) << what;
    size_t close = 0;
    for (size_t i = 0; i < c.scales.size(); ++i) {
      close += g.zeros[i] == c.zeros[i] && RelDiff(g.scales[i], c.scales[i]) <= kScaleRelTol;
    }
    EXPECT_GE(static_cast<double>(close) / static_cast<double>(c.scales.size()), kMinParamAgreement)
        << what;
    for (uint8_t code : g.codes) ASSERT_LE(code, MaxQ(o.bits)) << what;
    EXPECT_GT(g.seconds, 0) << what;
    EXPECT_LE(g.prepare_seconds + g.sweep_seconds + g.metrics_seconds, g.seconds * 1.0001 + 1e-6)
        << what;
  }

  std::shared_ptr<GpuContext> ctx_;
  std::unique_ptr<GptqSolver> gpu_;
  std::unique_ptr<GptqSolver> cpu_;
};

struct Case {
  const char* name;
  int64_t out, in;
  int bits;
  int group_size;
  bool sym = true;
  bool act_order = false;
  bool static_groups = false;
  bool mse = false;
  bool stale_group_params = false;
  bool reference_compat = false;
  int block_size = 128;
};

GptqOptions OptionsOf(const Case& c) {
  GptqOptions o;
  o.bits = c.bits;
  o.group_size = c.group_size;
  o.sym = c.sym;
  o.act_order = c.act_order;
  o.static_groups = c.static_groups;
  o.mse = c.mse;
  o.stale_group_params = c.stale_group_params;
  o.reference_compat = c.reference_compat;
  o.block_size = c.block_size;
  return o;
}

// Shapes off multiples of 128 (partial last blocks, partial groups), both orders, sym/asym,
// 2/3/4/8 bits, group 128 / per channel / groups that start inside a block (the feedback
// correction of fresh fits), static groups, stale fits, MSE, and blocks larger than 128 (U in
// global memory; then the row segments too).
const Case kCases[] = {
    {"96x200 4b g128", 96, 200, 4, 128},
    {"96x200 4b g128 act", 96, 200, 4, 128, true, true},
    {"96x200 3b g128 asym act", 96, 200, 3, 128, false, true},
    {"257x384 4b g128 asym act", 257, 384, 4, 128, false, true},
    {"257x384 3b per-channel", 257, 384, 3, -1},
    {"257x384 3b per-channel asym act", 257, 384, 3, -1, false, true},
    {"257x384 4b g96 act", 257, 384, 4, 96, true, true},
    {"257x384 2b g64 asym", 257, 384, 2, 64, false},
    {"257x384 8b g128 act", 257, 384, 8, 128, true, true},
    {"257x384 4b g96 stale act", 257, 384, 4, 96, true, true, false, false, true},
    {"257x384 4b g32 reference_compat", 257, 384, 4, 32, true, false, false, false, false, true},
    {"257x384 4b g128 mse act", 257, 384, 4, 128, true, true, false, true},
    {"257x384 3b per-channel mse asym", 257, 384, 3, -1, false, false, false, true},
    {"257x384 4b g96 mse stale", 257, 384, 4, 96, true, false, false, true, true},
    {"257x384 4b g64 block512 stale act", 257, 384, 4, 64, true, true, false, false, true, false,
     512},
    {"512x1000 4b g128 act", 512, 1000, 4, 128, true, true},
    {"512x1000 4b g128 static act", 512, 1000, 4, 128, true, true, true},
    {"512x1000 3b g128 static asym", 512, 1000, 3, 128, false, false, true},
    {"512x1000 4b g128 static mse act", 512, 1000, 4, 128, true, true, true, true},
    {"512x1000 3b g200 act", 512, 1000, 3, 200, true, true},
    {"512x1000 4b g-1 act", 512, 1000, 4, -1, true, true},
};

TEST_F(CudaGptqTest, MatchesCpuSolver) {
  for (const Case& c : kCases) {
    const SyntheticLayer& layer = Layer(c.out, c.in, 2 * c.in, 7);
    ExpectMatchesCpu(layer.weight, layer.hessian, OptionsOf(c), c.name,
                     c.bits == 8 ? kMinCodeAgreement8Bit : kMinCodeAgreement);
  }
}

// A block of 3700 columns with stale fits: neither U's block nor the warps' row segments and
// stale copies (8 x 3700 x 8 bytes) fit in shared memory, so the sweep works in global memory.
TEST_F(CudaGptqTest, HugeBlocksRunInGlobalMemory) {
  const SyntheticLayer& layer = Layer(64, 3700, 512, 11);
  GptqOptions o;
  o.block_size = 4096;
  o.stale_group_params = true;
  o.act_order = true;
  ExpectMatchesCpu(layer.weight, layer.hessian, o, "64x3700 block 4096 stale act");
}

TEST_F(CudaGptqTest, DeadColumnsMatchCpu) {
  SyntheticLayer layer = Layer(96, 200, 400, 3);
  for (int64_t c : {0, 17, 128, 199}) {
    for (int64_t i = 0; i < layer.hessian.rows; ++i) {
      layer.hessian(c, i) = 0.0f;
      layer.hessian(i, c) = 0.0f;
    }
  }
  for (bool act : {false, true}) {
    GptqOptions o;
    o.act_order = act;
    ExpectMatchesCpu(layer.weight, layer.hessian, o, act ? "dead act" : "dead");
  }
}

// H = I - 1.025 v vᵀ (unit v) has one eigenvalue -0.025 and mean diagonal 1 - 1.025/n:
// damping 0.01 and 0.02 leave it indefinite, 0.03 makes it positive definite (margin 0.005,
// far above float rounding), so both paths need three attempts.
Matrix IndefiniteHessian(int64_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> v(static_cast<size_t>(n));
  double norm = 0;
  for (double& x : v) {
    x = rng.Normal();
    norm += x * x;
  }
  norm = std::sqrt(norm);
  Matrix h(n, n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      h(i, j) = static_cast<float>((i == j ? 1.0 : 0.0) - 1.025 * v[i] * v[j] / (norm * norm));
    }
  }
  return h;
}

TEST_F(CudaGptqTest, DampingIncreaseMatchesCpu) {
  const Matrix& w = Layer(96, 200, 400, 5).weight;
  const Matrix h = IndefiniteHessian(200, 9);
  GptqOptions o;
  auto cpu = cpu_->Quantize(w, h, o);
  auto gpu = gpu_->Quantize(w, h, o);
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  EXPECT_EQ(cpu->cholesky_attempts, 3);
  EXPECT_EQ(gpu->cholesky_attempts, cpu->cholesky_attempts);
  EXPECT_DOUBLE_EQ(gpu->damp_percent_used, cpu->damp_percent_used);

  o.max_damp_percent = 0.02;
  auto cpu_fail = cpu_->Quantize(w, h, o);
  auto gpu_fail = gpu_->Quantize(w, h, o);
  EXPECT_EQ(cpu_fail.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(gpu_fail.status().code(), StatusCode::kFailedPrecondition)
      << gpu_fail.status().ToString();
  EXPECT_NE(gpu_fail.status().message().find("damp_percent=0.02"), std::string::npos)
      << gpu_fail.status().message();
}

TEST_F(CudaGptqTest, BadInputsAreInvalidArgumentLikeCpu) {
  const SyntheticLayer& layer = Layer(96, 200, 400, 1);
  auto expect_same_error = [&](const Matrix& w, const Matrix& h, const GptqOptions& o,
                               const char* what) {
    auto cpu = cpu_->Quantize(w, h, o);
    auto gpu = gpu_->Quantize(w, h, o);
    EXPECT_EQ(gpu.status().code(), StatusCode::kInvalidArgument) << what;
    EXPECT_EQ(gpu.status(), cpu.status()) << what;
  };
  Matrix w = layer.weight;
  w(5, 7) = std::numeric_limits<float>::quiet_NaN();
  expect_same_error(w, layer.hessian, GptqOptions(), "NaN in W");
  Matrix h = layer.hessian;
  h(3, 4) = std::numeric_limits<float>::infinity();
  expect_same_error(layer.weight, h, GptqOptions(), "inf in H");
  h = layer.hessian;
  h(2, 2) = -1.0f;
  expect_same_error(layer.weight, h, GptqOptions(), "negative diagonal");
  expect_same_error(layer.weight, Matrix(199, 199), GptqOptions(), "H shape");
  GptqOptions bad;
  bad.bits = 5;
  expect_same_error(layer.weight, layer.hessian, bad, "bits");
  bad = GptqOptions();
  bad.block_size = 0;
  expect_same_error(layer.weight, layer.hessian, bad, "block_size");
}

TEST_F(CudaGptqTest, IsDeterministicAndSkipsMetricsWhenAsked) {
  const SyntheticLayer& layer = Layer(257, 384, 768, 2);
  GptqOptions o;
  o.act_order = true;
  o.group_size = 96;
  EXPECT_STREQ(gpu_->backend(), "cuda");
  auto a = gpu_->Quantize(layer.weight, layer.hessian, o);
  auto b = gpu_->Quantize(layer.weight, layer.hessian, o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->codes, b->codes);
  EXPECT_EQ(a->scales, b->scales);
  EXPECT_EQ(a->proxy_loss, b->proxy_loss);
  EXPECT_EQ(a->output_error, b->output_error);
  o.compute_output_error = false;
  auto c = gpu_->Quantize(layer.weight, layer.hessian, o);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->codes, a->codes);
  EXPECT_EQ(c->output_error, 0);
  EXPECT_EQ(c->weight_energy, 0);
  EXPECT_EQ(c->metrics_seconds, 0);
}

// Progress: the CPU solver's reports (the end of each of the 5 blocks of 64 of 300 columns);
// a false answer stops the sweep with CANCELLED after that block, the callback is not called
// again, and the context stays usable.
TEST_F(CudaGptqTest, ReportsTheCpuProgressAndStopsWhenAsked) {
  const SyntheticLayer& layer = Layer(96, 300, 600, 31);
  GptqOptions o;
  o.group_size = 32;
  o.block_size = 64;
  o.act_order = true;
  ProgressRecorder on_cpu, on_gpu;
  GptqOptions cpu_options = o, gpu_options = o;
  cpu_options.progress = on_cpu.Callback();
  gpu_options.progress = on_gpu.Callback();
  ASSERT_TRUE(cpu_->Quantize(layer.weight, layer.hessian, cpu_options).ok());
  auto reported = gpu_->Quantize(layer.weight, layer.hessian, gpu_options);
  ASSERT_TRUE(reported.ok()) << reported.status().ToString();
  EXPECT_TRUE(IsCompleteProgress(on_gpu.calls()));
  EXPECT_EQ(on_gpu.calls().size(), 5u);
  EXPECT_EQ(on_gpu.calls(), on_cpu.calls());
  for (size_t stop_at : {1, 3, 5}) {
    ProgressRecorder stopping(stop_at);
    GptqOptions s = o;
    s.progress = stopping.Callback();
    auto r = gpu_->Quantize(layer.weight, layer.hessian, s);
    EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << stop_at;
    EXPECT_EQ(r.status().message(),
              "solve cancelled after column block " + std::to_string(stop_at) + " of 5");
    EXPECT_EQ(stopping.calls().size(), stop_at) << "called again after answering false";
  }
  auto again = gpu_->Quantize(layer.weight, layer.hessian, o);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->codes, reported->codes);
  EXPECT_EQ(again->proxy_loss, reported->proxy_loss);
}

#ifdef QFORGE_HAVE_CUDA
// The stream-ordered pool's high-water mark during Quantize stays under the estimate (the
// library-internal workspaces outside the pool are what the estimate's slack is for).
TEST_F(CudaGptqTest, AllocatesWithinTheEstimate) {
  cudaMemPool_t pool;
  ASSERT_EQ(cudaDeviceGetDefaultMemPool(&pool, GpuContextDevice(ctx_.get())), cudaSuccess);
  struct Shape {
    int64_t out, in;
    bool mse, stale;
    int block_size;
  };
  for (const Shape& s : {Shape{1024, 2048, false, false, 128}, Shape{512, 1000, true, true, 128},
                         Shape{64, 3700, false, true, 4096}}) {
    const SyntheticLayer& layer = Layer(s.out, s.in, 512, 13);
    GptqOptions o;
    o.mse = s.mse;
    o.stale_group_params = s.stale;
    o.block_size = s.block_size;
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    uint64_t high = 0;  // the attribute is a cuuint64_t
    ASSERT_EQ(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), cudaSuccess);
    auto r = gpu_->Quantize(layer.weight, layer.hessian, o);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), cudaSuccess);
    const uint64_t estimate = CudaGptqMemoryBytes(s.out, s.in, o);
    EXPECT_GT(high, 0u);
    EXPECT_LE(high, estimate) << s.out << "x" << s.in;
    std::printf("%lldx%lld: pool high-water %.1f MiB, estimate %.1f MiB\n",
                static_cast<long long>(s.out), static_cast<long long>(s.in), high / 1048576.0,
                estimate / 1048576.0);
  }
}
#endif

// ----- Without a GPU -----

TEST(CudaGptqFactoryTest, NullContextIsRejected) {
  auto s = NewCudaGptqSolver(nullptr);
  EXPECT_FALSE(s.ok());
}

TEST(CudaGptqMemoryTest, MonotoneInShapeAndAboveTheInputs) {
  std::vector<GptqOptions> configs(6);
  configs[1].act_order = true;
  configs[2].mse = true;
  configs[3].static_groups = true;
  configs[4].group_size = -1;
  configs[4].reference_compat = true;
  configs[5].block_size = 4096;
  configs[5].stale_group_params = true;
  const int64_t sizes[] = {1, 7, 96, 128, 200, 257, 1000, 4096, 11008, 28672};
  for (const GptqOptions& o : configs) {
    for (int64_t out : sizes) {
      for (int64_t in : sizes) {
        const uint64_t est = CudaGptqMemoryBytes(out, in, o);
        const uint64_t inputs =
            4 * static_cast<uint64_t>(out) * in + 4 * static_cast<uint64_t>(in) * in;
        EXPECT_GT(est, inputs) << out << "x" << in;
        EXPECT_GE(CudaGptqMemoryBytes(out + 1, in, o), est) << out << "x" << in;
        EXPECT_GE(CudaGptqMemoryBytes(out, in + 1, o), est) << out << "x" << in;
        EXPECT_GE(CudaGptqMemoryBytes(2 * out, in, o), est) << out << "x" << in;
        EXPECT_GE(CudaGptqMemoryBytes(out, 2 * in, o), est) << out << "x" << in;
      }
    }
  }
  // The options that allocate more never lower the estimate.
  GptqOptions plain, mse, stale;
  mse.mse = true;
  stale.stale_group_params = true;
  EXPECT_GE(CudaGptqMemoryBytes(4096, 4096, mse), CudaGptqMemoryBytes(4096, 4096, plain));
  EXPECT_GE(CudaGptqMemoryBytes(4096, 4096, stale), CudaGptqMemoryBytes(4096, 4096, plain));
}

}  // namespace
}  // namespace qforge::quant

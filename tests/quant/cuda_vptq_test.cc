// The CUDA VPTQ backend against the CPU one (quant/cuda/backends.h): the nearest-
// centroid search on random data, k-means with the CUDA search injected, and the whole solver
// on synthetic layers, each built on the same seeded data for both backends (faiss style);
// progress reports and cancellation (quant/progress.h) of the device k-means and the
// solver. Without a GPU every test that needs one is skipped with the reason; the memory
// estimate is checked everywhere.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "tests/quant/progress_recorder.h"
#include "quant/cuda/backends.h"
#include "quant/kmeans.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"
#include "quant/vptq_pack.h"

namespace qforge::quant {
namespace {

// Named tolerances.
// A returned centroid may differ from the float64 arg-min only by the float32 error of the
// distance expansion ‖x‖² − 2x·c + ‖c‖², relative to the size of its terms.
constexpr double kTieRelative = 1e-5;
// k-means inertia, CUDA search vs CPU search, same seed and init.
constexpr double kKMeansInertiaRelative = 1e-3;
// Solver output error (and proxy loss), CUDA vs CPU, same seed.
constexpr double kOutputErrorRelative = 0.02;
// tr(W H Wᵀ): both in float64 over the same float32 inputs, different summation orders.
constexpr double kEnergyRelative = 1e-6;

std::vector<float> RandomNormal(int64_t count, uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = static_cast<float>(scale * rng.Normal());
  return v;
}

double SqDist64(const float* a, const float* b, int d) {
  double s = 0;
  for (int t = 0; t < d; ++t) {
    const double e = static_cast<double>(a[t]) - b[t];
    s += e * e;
  }
  return s;
}

double Norm2(const float* a, int d) {
  double s = 0;
  for (int t = 0; t < d; ++t) s += static_cast<double>(a[t]) * a[t];
  return s;
}

class CudaVptqTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto ctx = CreateGpuContext();
    if (!ctx.ok()) GTEST_SKIP() << "no usable GPU: " << ctx.status().ToString();
    ctx_ = *ctx;
  }
  std::shared_ptr<GpuContext> ctx_;
};

// ---- The search ---------------------------------------------------------------------------

struct SearchShape {
  int d;
  int64_t n, k;
};

// Shapes: k not a multiple of any tile, n not a multiple of the 512-point block; small n with
// large k takes the split path (several blocks per point range, then the merge); d = 5 takes
// the generic (runtime-d) kernel.
TEST_F(CudaVptqTest, SearchMatchesCpuSearch) {
  auto gpu = NewCudaNearestCentroidSearch(ctx_);
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  auto cpu = NewCpuNearestCentroidSearch();
  const std::vector<SearchShape> shapes = {{2, 3001, 4099},  {6, 3001, 1000}, {8, 5003, 4099},
                                           {12, 777, 2049},  {16, 3001, 999}, {8, 37, 65537},
                                           {16, 1, 4099},    {5, 1234, 1501}, {8, 1000, 1}};
  for (const SearchShape& s : shapes) {
    SCOPED_TRACE("d=" + std::to_string(s.d) + " n=" + std::to_string(s.n) + " k=" + std::to_string(s.k));
    const std::vector<float> x = RandomNormal(s.n * s.d, 100 + s.d);
    const std::vector<float> c = RandomNormal(s.k * s.d, 200 + s.d);
    std::vector<int32_t> gi(static_cast<size_t>(s.n)), ci(static_cast<size_t>(s.n));
    std::vector<float> gd(static_cast<size_t>(s.n)), g2(static_cast<size_t>(s.n));
    std::vector<float> cd(static_cast<size_t>(s.n)), c2(static_cast<size_t>(s.n));
    ASSERT_TRUE((*gpu)->AssignTop2(x.data(), s.n, c.data(), s.k, s.d, gi.data(), gd.data(), g2.data()).ok());
    ASSERT_TRUE(cpu->AssignTop2(x.data(), s.n, c.data(), s.k, s.d, ci.data(), cd.data(), c2.data()).ok());
    std::vector<int32_t> gi1(static_cast<size_t>(s.n));
    ASSERT_TRUE((*gpu)->Assign(x.data(), s.n, c.data(), s.k, s.d, gi1.data(), nullptr).ok());
    EXPECT_EQ(gi1, gi) << "Assign and AssignTop2 disagree";
    int64_t differ = 0;
    for (int64_t i = 0; i < s.n; ++i) {
      const size_t si = static_cast<size_t>(i);
      const float* xi = x.data() + i * s.d;
      ASSERT_GE(gi[si], 0);
      ASSERT_LT(gi[si], s.k);
      double best = std::numeric_limits<double>::infinity();
      int64_t arg = 0;
      for (int64_t j = 0; j < s.k; ++j) {
        const double dj = SqDist64(xi, c.data() + j * s.d, s.d);
        if (dj < best) {
          best = dj;
          arg = j;
        }
      }
      const double scale = Norm2(xi, s.d) + Norm2(c.data() + arg * s.d, s.d);
      const double chosen = SqDist64(xi, c.data() + static_cast<int64_t>(gi[si]) * s.d, s.d);
      ASSERT_LE(chosen - best, kTieRelative * scale) << "point " << i;
      EXPECT_NEAR(gd[si], cd[si], kTieRelative * scale) << "point " << i;
      if (s.k > 1) {
        EXPECT_NEAR(g2[si], c2[si], kTieRelative * scale) << "point " << i;
      } else {
        EXPECT_EQ(g2[si], std::numeric_limits<float>::infinity());
      }
      differ += gi[si] != ci[si];
    }
    EXPECT_LE(differ, s.n / 100 + 1) << "assignments differing from the CPU search";
  }
}

TEST_F(CudaVptqTest, SearchRejectsBadArguments) {
  auto gpu = NewCudaNearestCentroidSearch(ctx_);
  ASSERT_TRUE(gpu.ok());
  std::vector<float> x(8, 0.0f), c(8, 0.0f);
  std::vector<int32_t> idx(4);
  EXPECT_TRUE((*gpu)->Assign(x.data(), 0, c.data(), 1, 2, idx.data(), nullptr).ok());
  EXPECT_EQ((*gpu)->Assign(x.data(), 4, c.data(), 0, 2, idx.data(), nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*gpu)->Assign(x.data(), 4, c.data(), 1, 0, idx.data(), nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*gpu)->Assign(nullptr, 4, c.data(), 1, 2, idx.data(), nullptr).code(), StatusCode::kInvalidArgument);
  std::vector<float> d(4);
  EXPECT_EQ((*gpu)->AssignTop2(x.data(), 4, c.data(), 1, 2, idx.data(), d.data(), nullptr).code(),
            StatusCode::kInvalidArgument);
}

// KMeans() (kmeans.h, with pruning through AssignTop2) with the CUDA search injected.
TEST_F(CudaVptqTest, KMeansWithCudaSearchMatchesCpuSearch) {
  auto gpu = NewCudaNearestCentroidSearch(ctx_);
  ASSERT_TRUE(gpu.ok());
  for (const int d : {4, 8}) {
    SCOPED_TRACE("d=" + std::to_string(d));
    const int64_t n = 20000;
    const std::vector<float> x = RandomNormal(n * d, 7 + d);
    Rng rng(11);
    std::vector<float> w(static_cast<size_t>(n));
    for (float& wi : w) wi = static_cast<float>(0.1 + rng.Uniform());
    KMeansOptions o;
    o.num_centroids = 256;
    o.max_iterations = 30;
    o.seed = 3;
    auto on_gpu = KMeans(x.data(), n, d, w.data(), o, gpu->get());
    auto on_cpu = KMeans(x.data(), n, d, w.data(), o, nullptr);
    ASSERT_TRUE(on_gpu.ok()) << on_gpu.status().ToString();
    ASSERT_TRUE(on_cpu.ok()) << on_cpu.status().ToString();
    EXPECT_NEAR(on_gpu->inertia, on_cpu->inertia, kKMeansInertiaRelative * on_cpu->inertia);
  }
}

// The device k-means (Lloyd on the GPU, pruning, repairs) against KMeans() on the CPU with
// the same options. Both take the same decisions from bit-identical float32 distances except
// on ties, so the iteration count and the inertia agree; the pruning must save searches.
TEST_F(CudaVptqTest, DeviceKMeansMatchesCpuKMeans) {
  struct Case {
    std::string name;
    int64_t n, k;
    int d;
    bool prune, weighted;
    KMeansInit init;
  };
  const std::vector<Case> cases = {
      {"d8_pruned", 30000, 512, 8, true, true, KMeansInit::kKMeansPlusPlus},
      {"d8_plain", 30000, 512, 8, false, true, KMeansInit::kKMeansPlusPlus},
      {"d5_generic_kernel", 9000, 300, 5, true, false, KMeansInit::kKMeansPlusPlus},
      // Many centroids per point from a random start: empty clusters are repaired.
      {"d4_repairs", 3000, 1000, 4, true, true, KMeansInit::kRandom},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::vector<float> x = RandomNormal(c.n * c.d, 21 + c.d, 2.0);
    for (int64_t i = 0; i < c.n; i += 7) x[static_cast<size_t>(i * c.d)] += 5.0f;  // uneven density
    Rng rng(5);
    std::vector<float> w(static_cast<size_t>(c.n));
    for (size_t i = 0; i < w.size(); ++i) w[i] = i % 13 == 0 ? 0.0f : static_cast<float>(0.1 + rng.Uniform());
    KMeansOptions o;
    o.num_centroids = c.k;
    o.max_iterations = 25;
    o.seed = 9;
    o.prune = c.prune;
    o.init = c.init;
    const float* weights = c.weighted ? w.data() : nullptr;
    auto on_cpu = KMeans(x.data(), c.n, c.d, weights, o, nullptr);
    auto on_gpu = CudaKMeans(ctx_, x.data(), c.n, c.d, weights, o);
    ASSERT_TRUE(on_cpu.ok()) << on_cpu.status().ToString();
    ASSERT_TRUE(on_gpu.ok()) << on_gpu.status().ToString();
    ASSERT_EQ(on_gpu->centroids.size(), on_cpu->centroids.size());
    EXPECT_NEAR(on_gpu->inertia, on_cpu->inertia, kKMeansInertiaRelative * on_cpu->inertia);
    EXPECT_NEAR(on_gpu->iterations, on_cpu->iterations, 2);
    if (on_gpu->iterations < o.max_iterations) {
      EXPECT_TRUE(on_gpu->converged);
    }
    if (c.init == KMeansInit::kRandom) {
      EXPECT_GT(on_gpu->empty_clusters_repaired, 0);
    }
    const int64_t unpruned = (on_gpu->iterations + 1) * c.n;
    if (c.prune) {
      EXPECT_LT(on_gpu->searched_points, unpruned);
    } else {
      EXPECT_EQ(on_gpu->searched_points, unpruned);
    }
  }
  // The CPU's input checks and messages.
  std::vector<float> bad = RandomNormal(400, 3);
  bad[37] = std::numeric_limits<float>::quiet_NaN();
  KMeansOptions o;
  o.num_centroids = 8;
  auto nan = CudaKMeans(ctx_, bad.data(), 100, 4, nullptr, o);
  ASSERT_FALSE(nan.ok());
  EXPECT_EQ(nan.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(nan.status().message().find("point 9 coordinate 1 is not finite"), std::string::npos)
      << nan.status().ToString();
}

// The device k-means reports as KMeans() does: after the initial assignment and each Lloyd
// step, (s + 1) / (max_iterations + 1), then 1; a false answer stops it with CANCELLED.
TEST_F(CudaVptqTest, DeviceKMeansReportsProgressAndStopsWhenAsked) {
  const std::vector<float> x = RandomNormal(4096 * 4, 41);
  KMeansOptions o;
  o.num_centroids = 64;
  o.max_iterations = 12;
  o.tol = 0;
  o.seed = 5;
  ProgressRecorder rec;
  KMeansOptions reported = o;
  reported.progress = rec.Callback();
  auto r = CudaKMeans(ctx_, x.data(), 4096, 4, nullptr, reported);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(IsCompleteProgress(rec.calls()));
  ASSERT_GE(r->iterations, 3);
  ASSERT_EQ(rec.calls().size(), static_cast<size_t>(r->iterations) + 1);
  for (int s = 0; s < r->iterations; ++s) {
    EXPECT_EQ(rec.calls()[static_cast<size_t>(s)], (s + 1) / 13.0);
  }
  ProgressRecorder stopping(3);
  KMeansOptions stopped = o;
  stopped.progress = stopping.Callback();
  auto c = CudaKMeans(ctx_, x.data(), 4096, 4, nullptr, stopped);
  EXPECT_EQ(c.status().code(), StatusCode::kCancelled);
  EXPECT_EQ(c.status().message(), "k-means cancelled after Lloyd step 2 of at most 12");
  EXPECT_EQ(stopping.calls().size(), 3u);
}

// ---- The solver ---------------------------------------------------------------------------

struct SolverCase {
  std::string name;
  int64_t out, in;
  VptqOptions options;
  bool packable = false;  // the configuration is within the checkpoint limits
};

std::vector<SolverCase> SolverCases() {
  std::vector<SolverCase> cases;
  {
    // out % v != 0, in % 128 != 0, residual, outliers, 2 groups: (200 − 8)/2 = 96 columns.
    SolverCase c{"residual_outliers_groups", 250, 200, {}, true};
    c.options.vector_len = 4;
    c.options.num_centroids = 256;
    c.options.num_res_centroids = 16;
    c.options.outlier_size = 8;
    c.options.outlier_vector_len = 4;
    c.options.outlier_num_centroids = 32;
    c.options.group_num = 2;
    cases.push_back(c);
  }
  {
    // Several lazy blocks (in = 320: blocks 128, 128, 64), v = 8, no residual.
    SolverCase c{"v8_three_blocks", 512, 320, {}, true};
    c.options.vector_len = 8;
    c.options.num_centroids = 256;
    cases.push_back(c);
  }
  {
    // v = 6 with a partial last vector (300 % 6 = 0, so 302), phase errors, bfloat16 params.
    SolverCase c{"v6_tail_phase_errors", 302, 160, {}, true};
    c.options.vector_len = 6;
    c.options.num_centroids = 256;
    c.options.num_res_centroids = 4;
    c.options.report_phase_errors = true;
    c.options.param_dtype = VptqParamDtype::kBFloat16;
    c.options.block_size = 48;
    cases.push_back(c);
  }
  {
    // Random init with many centroids per point: empty clusters get repaired.
    SolverCase c{"random_init_empty_clusters", 64, 96, {}, true};
    c.options.vector_len = 4;
    c.options.num_centroids = 1024;
    c.options.kmeans_init = KMeansInit::kRandom;
    c.options.param_dtype = VptqParamDtype::kFloat32;
    cases.push_back(c);
  }
  {
    // Reference Hessian space, no normalisation-consistent feedback, no act-order.
    SolverCase c{"reference_space_no_perm", 128, 136, {}, false};
    c.options.vector_len = 4;
    c.options.num_centroids = 100;
    c.options.hessian_space = HessianSpace::kReference;
    c.options.enable_perm = false;
    cases.push_back(c);
  }
  {
    // Plain VQ: unweighted k-means, no feedback, no normalisation.
    SolverCase c{"plain_vq", 96, 64, {}, false};
    c.options.vector_len = 2;
    c.options.num_centroids = 64;
    c.options.hessian_weighted_kmeans = false;
    c.options.error_feedback = false;
    c.options.enable_norm = false;
    cases.push_back(c);
  }
  return cases;
}

TEST_F(CudaVptqTest, SolverMatchesCpu) {
  auto gpu = NewCudaVptqSolver(ctx_);
  ASSERT_TRUE(gpu.ok()) << gpu.status().ToString();
  EXPECT_STREQ((*gpu)->backend(), "cuda");
  auto cpu = NewCpuVptqSolver();
  uint64_t seed = 40;
  for (const SolverCase& c : SolverCases()) {
    SCOPED_TRACE(c.name);
    SyntheticLayer l = MakeSyntheticLayer(c.out, c.in, 4 * c.in, ++seed);
    // Two dead columns (zero Hessian row and column).
    for (int64_t dead : {int64_t{1}, c.in - 3}) {
      for (int64_t i = 0; i < c.in; ++i) {
        l.hessian(dead, i) = 0;
        l.hessian(i, dead) = 0;
      }
    }
    auto g = (*gpu)->Quantize(l.weight, l.hessian, c.options);
    auto r = cpu->Quantize(l.weight, l.hessian, c.options);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    // Shapes, transformations and the factorisation: exactly the CPU's.
    EXPECT_EQ(g->num_vector_rows, r->num_vector_rows);
    EXPECT_EQ(g->group_size, r->group_size);
    EXPECT_EQ(g->perm, r->perm);
    EXPECT_EQ(g->weight_scale, r->weight_scale);
    EXPECT_EQ(g->weight_bias, r->weight_bias);
    EXPECT_EQ(g->dead_columns, r->dead_columns);
    EXPECT_EQ(g->damp_percent_used, r->damp_percent_used);
    EXPECT_EQ(g->cholesky_attempts, r->cholesky_attempts);
    ASSERT_EQ(g->indices.size(), r->indices.size());
    ASSERT_EQ(g->res_indices.size(), r->res_indices.size());
    ASSERT_EQ(g->outlier_indices.size(), r->outlier_indices.size());
    ASSERT_EQ(g->centroids.size(), r->centroids.size());
    ASSERT_EQ(g->res_centroids.size(), r->res_centroids.size());
    EXPECT_EQ(g->outlier_centroids.size(), r->outlier_centroids.size());
    // The losses.
    EXPECT_NEAR(g->weight_energy, r->weight_energy, kEnergyRelative * r->weight_energy);
    EXPECT_NEAR(g->output_error, r->output_error, kOutputErrorRelative * r->output_error)
        << "relative: cuda " << g->output_error / g->weight_energy << " cpu "
        << r->output_error / r->weight_energy;
    EXPECT_NEAR(g->proxy_loss, r->proxy_loss, kOutputErrorRelative * r->proxy_loss);
    if (c.options.report_phase_errors) {
      EXPECT_NEAR(g->kmeans_output_error, r->kmeans_output_error, kOutputErrorRelative * r->kmeans_output_error);
      EXPECT_NEAR(g->first_pass_output_error, r->first_pass_output_error,
                  kOutputErrorRelative * r->first_pass_output_error);
    } else {
      EXPECT_EQ(g->kmeans_output_error, -1);
      EXPECT_EQ(g->first_pass_output_error, -1);
    }
    // The weights follow from the arrays. Dead columns are zeroed before quantisation; with
    // the normalisation their scale is 0, so they stay zero (without it they take the
    // nearest centroid of the zero vector, on the CPU path as well).
    auto again = DequantizeVptqResult(*g);
    ASSERT_TRUE(again.ok()) << again.status().ToString();
    EXPECT_EQ(again->data, g->dequantized.data);
    if (c.options.enable_norm) {
      for (int32_t dead : g->dead_columns) {
        for (int64_t row = 0; row < c.out; ++row) ASSERT_EQ(g->dequantized(row, dead), 0.0f);
      }
    }
    EXPECT_GT(g->timings.total_seconds, 0);
    if (c.packable) {
      auto packed = PackVptqLayer(*g, VptqModelDtype::kFloat16);
      EXPECT_TRUE(packed.ok()) << packed.status().ToString();
    }
  }
}

TEST_F(CudaVptqTest, RejectsNonFiniteInput) {
  auto gpu = NewCudaVptqSolver(ctx_);
  ASSERT_TRUE(gpu.ok());
  const SyntheticLayer l = MakeSyntheticLayer(32, 16, 64, 9);
  VptqOptions o;
  o.vector_len = 4;
  o.num_centroids = 16;
  Matrix w = l.weight;
  w(3, 5) = std::numeric_limits<float>::quiet_NaN();
  auto bad_w = (*gpu)->Quantize(w, l.hessian, o);
  EXPECT_EQ(bad_w.status().code(), StatusCode::kInvalidArgument) << bad_w.status().ToString();
  Matrix h = l.hessian;
  h(2, 7) = std::numeric_limits<float>::infinity();
  auto bad_h = (*gpu)->Quantize(l.weight, h, o);
  EXPECT_EQ(bad_h.status().code(), StatusCode::kInvalidArgument) << bad_h.status().ToString();
  o.vector_len = 0;
  EXPECT_EQ((*gpu)->Quantize(l.weight, l.hessian, o).status().code(), StatusCode::kInvalidArgument);
}

// Every stage (outlier codebook, two groups, residual codebooks, the k-means-only pass): the
// CPU solver's weights. Without Lloyd steps every k-means reports only its end, so the whole
// sequence is the CPU's; with them, the last pass's reports are. A false answer stops the
// solve at that call with CANCELLED, and the context stays usable.
TEST_F(CudaVptqTest, ReportsTheCpuProgressAndStopsWhenAsked) {
  auto gpu = NewCudaVptqSolver(ctx_);
  ASSERT_TRUE(gpu.ok());
  auto cpu = NewCpuVptqSolver();
  const SyntheticLayer l = MakeSyntheticLayer(61, 112, 448, 43);
  VptqOptions o = EveryStageVptq();
  for (const int iterations : {0, 6}) {
    SCOPED_TRACE("kmeans_iterations=" + std::to_string(iterations));
    o.kmeans_iterations = iterations;
    ProgressRecorder on_cpu, on_gpu;
    VptqOptions cpu_options = o, gpu_options = o;
    cpu_options.progress = on_cpu.Callback();
    gpu_options.progress = on_gpu.Callback();
    ASSERT_TRUE(cpu->Quantize(l.weight, l.hessian, cpu_options).ok());
    auto g = (*gpu)->Quantize(l.weight, l.hessian, gpu_options);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_TRUE(IsCompleteProgress(on_gpu.calls()));
    const std::vector<double>& c = on_cpu.calls();
    const std::vector<double>& d = on_gpu.calls();
    if (iterations == 0) {
      EXPECT_EQ(d, c);
    } else {
      ASSERT_GE(d.size(), 4u);
      EXPECT_TRUE(std::equal(d.end() - 4, d.end(), c.end() - 4)) << "second pass reports";
    }
    // Every call when the sequence is fixed; with Lloyd steps (float64 atomics: the step
    // count may vary from run to run) the first three, which every run makes.
    const size_t stops = iterations == 0 ? d.size() : 3;
    for (size_t stop_at = 1; stop_at <= stops; ++stop_at) {
      ProgressRecorder stopping(stop_at);
      VptqOptions s = o;
      s.progress = stopping.Callback();
      auto r = (*gpu)->Quantize(l.weight, l.hessian, s);
      ASSERT_EQ(r.status().code(), StatusCode::kCancelled) << "stop at call " << stop_at;
      EXPECT_EQ(r.status().message().rfind("solve cancelled", 0), 0u) << r.status().message();
      ASSERT_EQ(stopping.calls().size(), stop_at) << "called again after answering false";
    }
  }
  EXPECT_TRUE((*gpu)->Quantize(l.weight, l.hessian, o).ok());
}

// An indefinite Hessian with no damping allowed: FAILED_PRECONDITION, as on the CPU.
TEST_F(CudaVptqTest, IndefiniteHessianFailsPrecondition) {
  auto gpu = NewCudaVptqSolver(ctx_);
  ASSERT_TRUE(gpu.ok());
  const int64_t in = 4;
  Matrix h(in, in, 2.0f);
  for (int64_t i = 0; i < in; ++i) h(i, i) = 1.0f;
  const Matrix w = MakeSyntheticLayer(8, in, 16, 10).weight;
  VptqOptions o;
  o.vector_len = 2;
  o.num_centroids = 2;
  o.damp_percent = 0;
  o.damp_auto_increment = 0;
  auto g = (*gpu)->Quantize(w, h, o);
  auto r = NewCpuVptqSolver()->Quantize(w, h, o);
  EXPECT_EQ(g.status().code(), StatusCode::kFailedPrecondition) << g.status().ToString();
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
}

// ---- Memory estimate (no GPU needed) ------------------------------------------------------

TEST(CudaVptqMemoryTest, GrowsWithCodebookAndShapeAndExceedsInputs) {
  VptqOptions o;
  o.vector_len = 8;
  o.num_centroids = 4096;
  const uint64_t base = CudaVptqMemoryBytes(4096, 4096, o);
  const uint64_t inputs = 4ull * 4096 * 4096 + 4ull * 4096 * 4096;  // W and H in float32
  EXPECT_GT(base, inputs);
  VptqOptions big_k = o;
  big_k.num_centroids = 65536;
  EXPECT_GT(CudaVptqMemoryBytes(4096, 4096, big_k), base);
  VptqOptions residual = big_k;
  residual.num_res_centroids = 256;
  EXPECT_GT(CudaVptqMemoryBytes(4096, 4096, residual), CudaVptqMemoryBytes(4096, 4096, big_k));
  EXPECT_GT(CudaVptqMemoryBytes(14336, 4096, o), base);
  EXPECT_GT(CudaVptqMemoryBytes(4096, 14336, o), CudaVptqMemoryBytes(14336, 4096, o))
      << "the [in, in] Hessian and its factors dominate for wide layers";
  const uint64_t down = CudaVptqMemoryBytes(4096, 14336, o);
  EXPECT_GT(down, 4ull * 4096 * 14336 + 4ull * 14336 * 14336);
  VptqOptions phase = o;
  phase.report_phase_errors = true;
  EXPECT_GE(CudaVptqMemoryBytes(4096, 4096, phase), base);
}

}  // namespace
}  // namespace qforge::quant

// Progress reporting and cooperative cancellation (quant/progress.h) of the CPU
// solvers: GPTQ, KMeans() and VPTQ report nondecreasing fractions that end at 1.0, at the
// points and with the weights their headers document; a false answer stops them at once with
// CANCELLED naming where; and a callback never changes a result.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "tests/quant/progress_recorder.h"
#include "quant/gptq.h"
#include "quant/kmeans.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"

namespace qforge::quant {
namespace {

// ---- GPTQ ---------------------------------------------------------------------------------

// 300 columns in blocks of 64: five blocks, the last one partial.
GptqOptions FiveBlockGptq() {
  GptqOptions o;
  o.bits = 4;
  o.group_size = 32;
  o.block_size = 64;
  o.act_order = true;
  return o;
}

TEST(GptqProgressTest, ReportsTheEndOfEveryBlock) {
  const SyntheticLayer l = MakeSyntheticLayer(48, 300, 600, 1);
  ProgressRecorder rec;
  GptqOptions o = FiveBlockGptq();
  o.progress = rec.Callback();
  auto r = NewCpuGptqSolver()->Quantize(l.weight, l.hessian, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(IsCompleteProgress(rec.calls()));
  const std::vector<double> expected = {64 / 300.0, 128 / 300.0, 192 / 300.0, 256 / 300.0, 1.0};
  EXPECT_EQ(rec.calls(), expected);
}

TEST(GptqProgressTest, CallbackDoesNotChangeTheResult) {
  const SyntheticLayer l = MakeSyntheticLayer(48, 300, 600, 2);
  auto solver = NewCpuGptqSolver();
  auto plain = solver->Quantize(l.weight, l.hessian, FiveBlockGptq());
  ProgressRecorder rec;
  GptqOptions o = FiveBlockGptq();
  o.progress = rec.Callback();
  auto reported = solver->Quantize(l.weight, l.hessian, o);
  ASSERT_TRUE(plain.ok() && reported.ok());
  EXPECT_EQ(reported->codes, plain->codes);
  EXPECT_EQ(reported->scales, plain->scales);
  EXPECT_EQ(reported->zeros, plain->zeros);
  EXPECT_EQ(reported->perm, plain->perm);
  EXPECT_EQ(reported->proxy_loss, plain->proxy_loss);
  EXPECT_EQ(reported->output_error, plain->output_error);
}

TEST(GptqProgressTest, FalseStopsWithCancelledAfterThatBlock) {
  const SyntheticLayer l = MakeSyntheticLayer(48, 300, 600, 3);
  auto solver = NewCpuGptqSolver();
  for (size_t stop_at : {1, 3, 5}) {
    ProgressRecorder rec(stop_at);
    GptqOptions o = FiveBlockGptq();
    o.progress = rec.Callback();
    auto r = solver->Quantize(l.weight, l.hessian, o);
    EXPECT_EQ(r.status().code(), StatusCode::kCancelled) << stop_at;
    EXPECT_EQ(r.status().message(),
              "solve cancelled after column block " + std::to_string(stop_at) + " of 5");
    EXPECT_EQ(rec.calls().size(), stop_at) << "called again after answering false";
  }
}

// ---- k-means ------------------------------------------------------------------------------

std::vector<float> RandomNormal(int64_t count, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = static_cast<float>(rng.Normal());
  return v;
}

// tol 0: only a fixed point stops the run before max_iterations.
KMeansOptions TwelveStepKMeans() {
  KMeansOptions o;
  o.num_centroids = 64;
  o.max_iterations = 12;
  o.tol = 0;
  o.seed = 5;
  return o;
}

TEST(KMeansProgressTest, ReportsEveryAssignmentThenOne) {
  const std::vector<float> x = RandomNormal(4096 * 4, 7);
  ProgressRecorder rec;
  KMeansOptions o = TwelveStepKMeans();
  o.progress = rec.Callback();
  auto r = KMeans(x.data(), 4096, 4, nullptr, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(IsCompleteProgress(rec.calls()));
  ASSERT_GE(r->iterations, 3);
  // After the initial assignment and each Lloyd step but the last: (s + 1) / 13; then 1.
  ASSERT_EQ(rec.calls().size(), static_cast<size_t>(r->iterations) + 1);
  for (int s = 0; s < r->iterations; ++s) {
    EXPECT_EQ(rec.calls()[static_cast<size_t>(s)], (s + 1) / 13.0);
  }
}

TEST(KMeansProgressTest, FalseStopsWithCancelledAfterThatStep) {
  const std::vector<float> x = RandomNormal(4096 * 4, 8);
  ProgressRecorder rec(3);
  KMeansOptions o = TwelveStepKMeans();
  o.progress = rec.Callback();
  auto r = KMeans(x.data(), 4096, 4, nullptr, o);
  EXPECT_EQ(r.status().code(), StatusCode::kCancelled);
  EXPECT_EQ(r.status().message(), "k-means cancelled after Lloyd step 2 of at most 12");
  EXPECT_EQ(rec.calls().size(), 3u);
}

TEST(KMeansProgressTest, RunsWithoutLloydStepsReportOnlyTheEnd) {
  const std::vector<float> x = RandomNormal(4096 * 4, 9);
  {
    ProgressRecorder rec;
    KMeansOptions o = TwelveStepKMeans();  // 10 points, 64 centroids: every point a centroid
    o.progress = rec.Callback();
    ASSERT_TRUE(KMeans(x.data(), 10, 4, nullptr, o).ok());
    EXPECT_EQ(rec.calls(), std::vector<double>{1.0});
  }
  {
    ProgressRecorder rec;
    KMeansOptions o = TwelveStepKMeans();
    o.max_iterations = 0;
    o.progress = rec.Callback();
    ASSERT_TRUE(KMeans(x.data(), 4096, 4, nullptr, o).ok());
    EXPECT_EQ(rec.calls(), std::vector<double>{1.0});
  }
  {
    ProgressRecorder rec(1);  // the one report answers false
    KMeansOptions o = TwelveStepKMeans();
    o.progress = rec.Callback();
    EXPECT_EQ(KMeans(x.data(), 10, 4, nullptr, o).status().code(), StatusCode::kCancelled);
  }
}

// A k-means++ initialisation of 2500 centres checks for a cancel after centres 1024 and 2048
// (fraction 0: the initialisation is not counted) before the first assignment.
TEST(KMeansProgressTest, KMeansPlusPlusInitialisationCanBeCancelled) {
  const std::vector<float> x = RandomNormal(6000 * 2, 11);
  KMeansOptions o;
  o.num_centroids = 2500;
  o.max_iterations = 1;
  o.init = KMeansInit::kKMeansPlusPlus;
  {
    ProgressRecorder rec;
    o.progress = rec.Callback();
    ASSERT_TRUE(KMeans(x.data(), 6000, 2, nullptr, o).ok());
    EXPECT_TRUE(IsCompleteProgress(rec.calls()));
    EXPECT_EQ(rec.calls(), (std::vector<double>{0.0, 0.0, 0.5, 1.0}));
  }
  for (size_t stop : {1, 2}) {
    ProgressRecorder rec(stop);
    o.progress = rec.Callback();
    auto r = KMeans(x.data(), 6000, 2, nullptr, o);
    EXPECT_EQ(r.status().code(), StatusCode::kCancelled);
    EXPECT_EQ(r.status().message(),
              "k-means cancelled during the k-means++ initialisation after " +
                  std::to_string(1024 * stop) + " of 2500 centres");
    EXPECT_EQ(rec.calls().size(), stop);
  }
}

TEST(KMeansProgressTest, CallbackDoesNotChangeTheResult) {
  const std::vector<float> x = RandomNormal(4096 * 4, 10);
  auto plain = KMeans(x.data(), 4096, 4, nullptr, TwelveStepKMeans());
  ProgressRecorder rec;
  KMeansOptions o = TwelveStepKMeans();
  o.progress = rec.Callback();
  auto reported = KMeans(x.data(), 4096, 4, nullptr, o);
  ASSERT_TRUE(plain.ok() && reported.ok());
  EXPECT_EQ(reported->centroids, plain->centroids);
  EXPECT_EQ(reported->assignment, plain->assignment);
  EXPECT_EQ(reported->inertia_history, plain->inertia_history);
}

// ---- VPTQ ---------------------------------------------------------------------------------

// EveryStageVptq() (progress_recorder.h) on 61 rows (partial last vectors) and 112 columns
// (4 blocks of 32).
constexpr int64_t kRows = 61, kColumns = 112;

// The stage boundaries of EveryStageVptq() as fractions, from the weighting documented in
// vptq_layout.h (VptqProgress), recomputed here: k-means n·k·(iterations + 1) with n the full
// vectors of its columns; a pass Σ over columns of vectors·entries.
std::vector<double> EveryStageBoundaries() {
  const double steps = 6 + 1;
  const double outlier_kmeans = 16.0 * (kRows / 4) * 16 * steps;  // 15 vectors per column
  const double group_kmeans = 48.0 * (kRows / 8) * 32 * steps;    // 7 vectors per column
  const double residual_kmeans = 48.0 * (kRows / 8) * 8 * steps;
  const double outlier_rows = 16, rows = 8;  // ceil(61 / 4), ceil(61 / 8)
  auto pass = [&](int64_t columns, bool residual) {
    const int64_t outliers = std::min<int64_t>(columns, 16);
    return outliers * outlier_rows * 16 + (columns - outliers) * rows * (residual ? 32 + 8 : 32);
  };
  const std::vector<int64_t> block_ends = {32, 64, 96, kColumns};
  std::vector<double> ends = {outlier_kmeans, outlier_kmeans + group_kmeans,
                              outlier_kmeans + 2 * group_kmeans};
  for (bool residual : {false, false, true}) {  // k-means-only pass, first pass, second pass
    if (residual) {
      const double residuals = ends.back();
      ends.push_back(residuals + residual_kmeans);
      ends.push_back(residuals + 2 * residual_kmeans);
    }
    const double begin = ends.back();
    for (int64_t j : block_ends) ends.push_back(begin + pass(j, residual));
  }
  const double total = ends.back();
  for (double& e : ends) e /= total;
  return ends;
}

bool Contains(const std::vector<double>& calls, double fraction) {
  return std::any_of(calls.begin(), calls.end(),
                     [&](double c) { return std::fabs(c - fraction) <= 1e-12; });
}

TEST(VptqProgressTest, ReportsEveryStageWithTheDocumentedWeights) {
  const SyntheticLayer l = MakeSyntheticLayer(kRows, kColumns, 448, 11);
  ProgressRecorder rec;
  VptqOptions o = EveryStageVptq();
  o.progress = rec.Callback();
  auto r = NewCpuVptqSolver()->Quantize(l.weight, l.hessian, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(IsCompleteProgress(rec.calls()));
  const std::vector<double> boundaries = EveryStageBoundaries();
  ASSERT_EQ(boundaries.size(), 3u + 4 + 4 + 2 + 4);
  EXPECT_EQ(boundaries.back(), 1.0);
  for (size_t b = 0; b < boundaries.size(); ++b) {
    EXPECT_TRUE(Contains(rec.calls(), boundaries[b])) << "stage boundary " << b << " = " << boundaries[b];
  }
  // Five k-means (one call each at least) and three passes of four blocks.
  EXPECT_GE(rec.calls().size(), 5u + 12);
}

TEST(VptqProgressTest, ReportsCompleteSequencesWithoutOptionalStages) {
  const SyntheticLayer l = MakeSyntheticLayer(kRows, kColumns, 448, 12);
  VptqOptions plain;
  plain.vector_len = 8;
  plain.num_centroids = 32;
  plain.kmeans_iterations = 0;  // k-means: the initial assignment only
  VptqOptions one_block = plain;
  one_block.block_size = 1000;
  one_block.kmeans_iterations = 4;
  for (const VptqOptions& base : {plain, one_block}) {
    ProgressRecorder rec;
    VptqOptions o = base;
    o.progress = rec.Callback();
    auto r = NewCpuVptqSolver()->Quantize(l.weight, l.hessian, o);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_TRUE(IsCompleteProgress(rec.calls()));
  }
}

TEST(VptqProgressTest, FalseAtAnyCallStopsThereWithCancelled) {
  const SyntheticLayer l = MakeSyntheticLayer(kRows, kColumns, 448, 13);
  auto solver = NewCpuVptqSolver();
  ProgressRecorder full;
  VptqOptions o = EveryStageVptq();
  o.progress = full.Callback();
  ASSERT_TRUE(solver->Quantize(l.weight, l.hessian, o).ok());
  const std::vector<double>& calls = full.calls();
  const std::vector<double> boundaries = EveryStageBoundaries();
  const size_t first_pass_block = static_cast<size_t>(
      std::find(calls.begin(), calls.end(), boundaries[7]) - calls.begin()) + 1;
  ASSERT_LE(first_pass_block, calls.size());
  for (size_t stop_at = 1; stop_at <= calls.size(); ++stop_at) {
    ProgressRecorder rec(stop_at);
    o.progress = rec.Callback();
    auto r = solver->Quantize(l.weight, l.hessian, o);
    ASSERT_EQ(r.status().code(), StatusCode::kCancelled) << "stop at call " << stop_at;
    EXPECT_EQ(r.status().message().rfind("solve cancelled", 0), 0u) << r.status().message();
    ASSERT_EQ(rec.calls().size(), stop_at) << "called again after answering false";
    EXPECT_TRUE(std::equal(rec.calls().begin(), rec.calls().end(), calls.begin()));
    if (stop_at == 1) {
      EXPECT_EQ(r.status().message(),
                "solve cancelled during outlier codebook k-means (k-means cancelled after Lloyd "
                "step 0 of at most 6)");
    } else if (stop_at == first_pass_block) {
      EXPECT_EQ(r.status().message(), "solve cancelled after column block 1 of 4 of the first pass");
    } else if (stop_at == calls.size()) {
      EXPECT_EQ(r.status().message(), "solve cancelled after column block 4 of 4 of the second pass");
    }
  }
}

TEST(VptqProgressTest, CallbackDoesNotChangeTheResult) {
  const SyntheticLayer l = MakeSyntheticLayer(kRows, kColumns, 448, 14);
  auto solver = NewCpuVptqSolver();
  auto plain = solver->Quantize(l.weight, l.hessian, EveryStageVptq());
  ProgressRecorder rec;
  VptqOptions o = EveryStageVptq();
  o.progress = rec.Callback();
  auto reported = solver->Quantize(l.weight, l.hessian, o);
  ASSERT_TRUE(plain.ok() && reported.ok());
  EXPECT_EQ(reported->centroids, plain->centroids);
  EXPECT_EQ(reported->res_centroids, plain->res_centroids);
  EXPECT_EQ(reported->outlier_centroids, plain->outlier_centroids);
  EXPECT_EQ(reported->indices, plain->indices);
  EXPECT_EQ(reported->res_indices, plain->res_indices);
  EXPECT_EQ(reported->outlier_indices, plain->outlier_indices);
  EXPECT_EQ(reported->dequantized.data, plain->dequantized.data);
  EXPECT_EQ(reported->output_error, plain->output_error);
}

}  // namespace
}  // namespace qforge::quant

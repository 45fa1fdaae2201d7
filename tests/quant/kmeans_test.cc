// Tests of quant/kmeans.h against the float64 oracle (quant/reference/kmeans_ref.h).
#include "quant/kmeans.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "quant/reference/kmeans_ref.h"
#include "quant/synthetic.h"

namespace qforge::quant {
namespace {

std::vector<float> RandomNormal(int64_t count, uint64_t seed, double scale = 1.0, double shift = 0.0) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = static_cast<float>(shift + scale * rng.Normal());
  return v;
}

std::vector<float> RandomWeights(int64_t count, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(count));
  for (float& x : v) x = static_cast<float>(0.1 + 3.0 * rng.Uniform());
  return v;
}

double Norm2(const float* a, int d) {
  double s = 0;
  for (int t = 0; t < d; ++t) s += static_cast<double>(a[t]) * a[t];
  return s;
}

// ---- The search ---------------------------------------------------------------------------

struct SearchCase {
  CpuSearchKernel kernel;
  bool force_parallel;
  CpuSearchIsa isa = CpuSearchIsa::kBest;
};

class SearchTest : public ::testing::TestWithParam<SearchCase> {
 protected:
  std::unique_ptr<NearestCentroidSearch> Make() const {
    CpuSearchOptions o;
    o.kernel = GetParam().kernel;
    o.max_isa = GetParam().isa;
    o.point_tile = 64;
    o.centroid_tile = 256;  // several tiles even for small k
    if (GetParam().force_parallel) o.min_parallel_pairs = 1;
    return NewCpuNearestCentroidSearch(o);
  }
};

// Every point's index must be the float64 arg-min, except where the float64 distance of the
// returned centroid is within the documented float32 expansion error of the best one
// (|Δ| <= 1e-5·(‖x‖² + ‖c‖² + 1), a near tie); distances match within the same bound.
TEST_P(SearchTest, MatchesFloat64BruteForce) {
  auto search = Make();
  uint64_t seed = 1;
  for (int d : {1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 40}) {
    for (int64_t k : {1, 7, 16, 100, 1000}) {
      for (int64_t n : {1, 5, 333}) {
        SCOPED_TRACE("d=" + std::to_string(d) + " k=" + std::to_string(k) + " n=" + std::to_string(n));
        const auto x = RandomNormal(n * d, seed++, 1.5, 0.3);
        const auto c = RandomNormal(k * d, seed++, 1.5);
        std::vector<int32_t> idx(static_cast<size_t>(n)), ridx(static_cast<size_t>(n));
        std::vector<float> dist(static_cast<size_t>(n)), second(static_cast<size_t>(n));
        std::vector<double> rdist(static_cast<size_t>(n)), rsecond(static_cast<size_t>(n));
        ASSERT_TRUE(search->AssignTop2(x.data(), n, c.data(), k, d, idx.data(), dist.data(), second.data()).ok());
        reference::NearestCentroidRef(x.data(), n, c.data(), k, d, ridx.data(), rdist.data(), rsecond.data());
        std::vector<int32_t> idx_only(static_cast<size_t>(n));
        ASSERT_TRUE(search->Assign(x.data(), n, c.data(), k, d, idx_only.data(), nullptr).ok());
        for (int64_t i = 0; i < n; ++i) {
          const size_t s = static_cast<size_t>(i);
          double cmax = 0;
          for (int64_t j = 0; j < k; ++j) cmax = std::max(cmax, Norm2(c.data() + j * d, d));
          const double tol = 1e-5 * (Norm2(x.data() + i * d, d) + cmax + 1);
          EXPECT_EQ(idx[s], idx_only[s]);
          if (idx[s] != ridx[s]) {
            double mine = 0;
            for (int t = 0; t < d; ++t) {
              const double e = static_cast<double>(x[s * d + t]) - c[static_cast<size_t>(idx[s]) * d + t];
              mine += e * e;
            }
            EXPECT_LE(mine - rdist[s], tol) << "point " << i << " got " << idx[s] << " want " << ridx[s];
          }
          EXPECT_NEAR(dist[s], rdist[s], tol) << "point " << i;
          if (k == 1) {
            EXPECT_EQ(second[s], std::numeric_limits<float>::infinity());
          } else {
            EXPECT_NEAR(second[s], rsecond[s], tol) << "point " << i;
          }
        }
      }
    }
  }
}

// Exact ties resolve to the lowest index in every tile/lane/thread split.
TEST_P(SearchTest, TiesGoToTheLowestIndex) {
  auto search = Make();
  const int d = 8;
  const int64_t k = 700, n = 300;
  std::vector<float> c(static_cast<size_t>(k * d), 5.0f);  // all centroids equal...
  for (int64_t j = 0; j < k; ++j) c[static_cast<size_t>(j * d)] = (j % 100 == 37) ? 0.0f : 5.0f;  // ...but 37, 137, ...
  std::vector<float> x(static_cast<size_t>(n * d), 0.0f);
  std::vector<int32_t> idx(static_cast<size_t>(n));
  std::vector<float> dist(static_cast<size_t>(n)), second(static_cast<size_t>(n));
  ASSERT_TRUE(search->AssignTop2(x.data(), n, c.data(), k, d, idx.data(), dist.data(), second.data()).ok());
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_EQ(idx[static_cast<size_t>(i)], 37);
    EXPECT_FLOAT_EQ(second[static_cast<size_t>(i)], dist[static_cast<size_t>(i)]);  // 137 ties
  }
}

TEST_P(SearchTest, RejectsBadArguments) {
  auto search = Make();
  float x[4] = {0, 0, 0, 0}, c[4] = {1, 1, 1, 1};
  int32_t idx[2];
  float dist[2];
  EXPECT_EQ(search->Assign(x, 2, c, 0, 2, idx, dist).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(search->Assign(x, 2, c, 2, 0, idx, dist).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(search->Assign(x, -1, c, 2, 2, idx, dist).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(search->Assign(nullptr, 2, c, 2, 2, idx, dist).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(search->AssignTop2(x, 2, c, 2, 2, idx, dist, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(search->Assign(x, 0, c, 2, 2, idx, dist).ok());
}

INSTANTIATE_TEST_SUITE_P(Kernels, SearchTest,
                         ::testing::Values(SearchCase{CpuSearchKernel::kDirect, false},
                                           SearchCase{CpuSearchKernel::kDirect, true},
                                           SearchCase{CpuSearchKernel::kGemm, false},
                                           SearchCase{CpuSearchKernel::kGemm, true},
                                           SearchCase{CpuSearchKernel::kAuto, true},
                                           SearchCase{CpuSearchKernel::kDirect, true, CpuSearchIsa::kAvx2},
                                           SearchCase{CpuSearchKernel::kDirect, false, CpuSearchIsa::kScalar}),
                         [](const ::testing::TestParamInfo<SearchCase>& i) {
                           std::string name = i.param.kernel == CpuSearchKernel::kDirect ? "Direct"
                                              : i.param.kernel == CpuSearchKernel::kGemm ? "Gemm"
                                                                                         : "Auto";
                           name += i.param.isa == CpuSearchIsa::kAvx2     ? "Avx2"
                                   : i.param.isa == CpuSearchIsa::kScalar ? "Scalar"
                                                                          : "";
                           return name + (i.param.force_parallel ? "Parallel" : "Serial");
                         });

// ---- k-means --------------------------------------------------------------------------------

// Same initial centroids → the same Lloyd trajectory as the float64 oracle: identical
// assignments, iteration counts and repairs; centroids within 1e-4 absolute (data of scale
// ~2, float32 means), inertia within 1e-5 relative.
TEST(KMeansTest, MatchesFloat64ReferenceFromTheSameInit) {
  int trial = 0;
  for (int d : {3, 8}) {
    for (KMeansInit init : {KMeansInit::kRandom, KMeansInit::kKMeansPlusPlus}) {
      for (bool weighted : {false, true}) {
        for (bool prune : {false, true}) {
          SCOPED_TRACE("trial " + std::to_string(trial));
          const int64_t n = 1500, k = 29;
          const auto x = RandomNormal(n * d, 100 + trial, 2.0, 0.5);
          const auto w = RandomWeights(n, 200 + trial);
          KMeansOptions o;
          o.num_centroids = k;
          o.max_iterations = 40;
          o.tol = 1e-7;
          o.seed = static_cast<uint64_t>(trial);
          o.init = init;
          o.prune = prune;
          const float* wp = weighted ? w.data() : nullptr;
          auto c0 = KMeansInitialCentroids(x.data(), n, d, wp, o);
          ASSERT_TRUE(c0.ok()) << c0.status().ToString();
          auto r = KMeans(x.data(), n, d, wp, o, nullptr, c0->data());
          ASSERT_TRUE(r.ok()) << r.status().ToString();
          const auto ref = reference::KMeansRef(x.data(), n, d, wp, c0->data(), k, o.max_iterations, o.tol);
          EXPECT_EQ(r->assignment, ref.assignment);
          EXPECT_EQ(r->iterations, ref.iterations);
          EXPECT_EQ(r->converged, ref.converged);
          EXPECT_EQ(r->empty_clusters_repaired, ref.empty_clusters_repaired);
          for (size_t i = 0; i < ref.centroids.size(); ++i) EXPECT_NEAR(r->centroids[i], ref.centroids[i], 1e-4);
          EXPECT_NEAR(r->inertia, ref.inertia, 1e-5 * ref.inertia);
          // The seeded init inside KMeans is the one KMeansInitialCentroids reports.
          auto r2 = KMeans(x.data(), n, d, wp, o);
          ASSERT_TRUE(r2.ok());
          EXPECT_EQ(r2->assignment, r->assignment);
          ++trial;
        }
      }
    }
  }
}

TEST(KMeansTest, PruningGivesTheSameResultWithFewerSearches) {
  const int d = 8;
  const int64_t n = 20000, k = 200;
  const auto x = RandomNormal(n * d, 7);
  const auto w = RandomWeights(n, 8);
  KMeansOptions o;
  o.num_centroids = k;
  o.max_iterations = 30;
  o.tol = 0;
  o.prune = false;
  auto plain = KMeans(x.data(), n, d, w.data(), o);
  o.prune = true;
  auto pruned = KMeans(x.data(), n, d, w.data(), o);
  ASSERT_TRUE(plain.ok() && pruned.ok());
  EXPECT_EQ(plain->assignment, pruned->assignment);
  EXPECT_EQ(plain->iterations, pruned->iterations);
  EXPECT_EQ(plain->centroids, pruned->centroids);
  EXPECT_EQ(plain->searched_points, n * (plain->iterations + 1));
  EXPECT_LT(pruned->searched_points, plain->searched_points * 3 / 4);
}

// Sample weights: the centroid is the weighted mean, so a heavier point pulls it.
TEST(KMeansTest, HeavierPointsPullCentroids) {
  // Two 1-D clusters around 0 and 10; in the first, the point at 1.0 weighs 7.
  const std::vector<float> x = {0.0f, 0.5f, 1.0f, 10.0f, 10.5f, 11.0f};
  const std::vector<float> w = {1, 1, 7, 1, 1, 1};
  std::vector<float> init = {0.0f, 10.0f};
  KMeansOptions o;
  o.num_centroids = 2;
  auto unweighted = KMeans(x.data(), 6, 1, nullptr, o, nullptr, init.data());
  auto weighted = KMeans(x.data(), 6, 1, w.data(), o, nullptr, init.data());
  ASSERT_TRUE(unweighted.ok() && weighted.ok());
  EXPECT_NEAR(unweighted->centroids[0], 0.5, 1e-6);
  EXPECT_NEAR(weighted->centroids[0], (0.0 + 0.5 + 7.0) / 9.0, 1e-6);
  EXPECT_NEAR(weighted->centroids[1], 10.5, 1e-6);
  // Inertia is weighted: Σ w (x − c)².
  const double c0 = 7.5 / 9.0;
  const double want = c0 * c0 + (0.5 - c0) * (0.5 - c0) + 7 * (1 - c0) * (1 - c0) + 0.25 + 0 + 0.25;
  EXPECT_NEAR(weighted->inertia, want, 1e-5);
  // Zero-weight points are assigned but do not move centroids.
  const std::vector<float> w0 = {1, 1, 0, 1, 1, 1};
  auto zero = KMeans(x.data(), 6, 1, w0.data(), o, nullptr, init.data());
  ASSERT_TRUE(zero.ok());
  EXPECT_NEAR(zero->centroids[0], 0.25, 1e-6);
  EXPECT_EQ(zero->assignment[2], 0);
}

// Weighted k-means on 2-D data: the weighted solution has a lower weighted inertia than the
// unweighted one (which ignores the weights), and its centroids sit closer to heavy points.
TEST(KMeansTest, WeightedObjectiveBeatsUnweightedCentroids) {
  const int d = 2;
  const int64_t n = 4000, k = 16;
  const auto x = RandomNormal(n * d, 31);
  std::vector<float> w(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) w[static_cast<size_t>(i)] = x[static_cast<size_t>(i * d)] > 1.0f ? 50.0f : 1.0f;
  KMeansOptions o;
  o.num_centroids = k;
  auto weighted = KMeans(x.data(), n, d, w.data(), o);
  auto plain = KMeans(x.data(), n, d, nullptr, o);
  ASSERT_TRUE(weighted.ok() && plain.ok());
  auto weighted_inertia = [&](const std::vector<float>& c) {
    std::vector<int32_t> idx(static_cast<size_t>(n));
    std::vector<double> dist(static_cast<size_t>(n));
    reference::NearestCentroidRef(x.data(), n, c.data(), k, d, idx.data(), dist.data(), nullptr);
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += w[static_cast<size_t>(i)] * dist[static_cast<size_t>(i)];
    return s;
  };
  EXPECT_LT(weighted_inertia(weighted->centroids), 0.9 * weighted_inertia(plain->centroids));
  int heavy_side_weighted = 0, heavy_side_plain = 0;
  for (int64_t j = 0; j < k; ++j) {
    heavy_side_weighted += weighted->centroids[static_cast<size_t>(j * d)] > 1.0f;
    heavy_side_plain += plain->centroids[static_cast<size_t>(j * d)] > 1.0f;
  }
  EXPECT_GT(heavy_side_weighted, heavy_side_plain);
}

// Empty cluster: the far-away initial centroid gets no point; the repair moves it to the point
// with the largest w·dist (5.0, distance² 24.01 to its centroid 0.1), and the donor cluster's
// centroid is recomputed without that point.
TEST(KMeansTest, RepairsEmptyClusters) {
  const std::vector<float> x = {0.0f, 0.1f, 0.2f, 5.0f};
  std::vector<float> init = {0.1f, 100.0f};
  KMeansOptions o;
  o.num_centroids = 2;
  o.max_iterations = 1;
  auto r = KMeans(x.data(), 4, 1, nullptr, o, nullptr, init.data());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->empty_clusters_repaired, 1);
  EXPECT_NEAR(r->centroids[0], 0.1, 1e-6);
  EXPECT_NEAR(r->centroids[1], 5.0, 1e-6);
  EXPECT_EQ(r->assignment, (std::vector<int32_t>{0, 0, 0, 1}));
  const auto ref = reference::KMeansRef(x.data(), 4, 1, nullptr, init.data(), 2, 1, o.tol);
  EXPECT_EQ(ref.empty_clusters_repaired, 1);
  EXPECT_NEAR(ref.centroids[1], 5.0, 1e-12);

  // Many duplicate initial centroids on larger data: every cluster ends non-empty and the
  // result equals the oracle's.
  const int d = 4;
  const int64_t n = 3000, k = 50;
  const auto xs = RandomNormal(n * d, 77);
  const auto ws = RandomWeights(n, 78);
  std::vector<float> dup(static_cast<size_t>(k * d));
  for (int64_t j = 0; j < k; ++j) {
    for (int t = 0; t < d; ++t) dup[static_cast<size_t>(j * d + t)] = xs[static_cast<size_t>((j % 5) * d + t)];
  }
  KMeansOptions o2;
  o2.num_centroids = k;
  o2.max_iterations = 20;
  auto r2 = KMeans(xs.data(), n, d, ws.data(), o2, nullptr, dup.data());
  ASSERT_TRUE(r2.ok());
  EXPECT_GE(r2->empty_clusters_repaired, 45);
  std::vector<int> members(static_cast<size_t>(k), 0);
  for (int32_t a : r2->assignment) ++members[static_cast<size_t>(a)];
  for (int64_t j = 0; j < k; ++j) EXPECT_GT(members[static_cast<size_t>(j)], 0) << "cluster " << j;
  const auto ref2 = reference::KMeansRef(xs.data(), n, d, ws.data(), dup.data(), k, 20, o2.tol);
  EXPECT_EQ(r2->assignment, ref2.assignment);
  EXPECT_EQ(r2->empty_clusters_repaired, ref2.empty_clusters_repaired);
}

TEST(KMeansTest, StopsOnMaxIterationsAndTolerance) {
  const int d = 8;
  const int64_t n = 5000, k = 64;
  const auto x = RandomNormal(n * d, 5);
  KMeansOptions o;
  o.num_centroids = k;
  o.tol = 0;
  o.max_iterations = 0;
  auto r0 = KMeans(x.data(), n, d, nullptr, o);
  ASSERT_TRUE(r0.ok());
  EXPECT_EQ(r0->iterations, 0);
  EXPECT_FALSE(r0->converged);
  EXPECT_EQ(r0->inertia_history.size(), 1u);
  o.max_iterations = 3;
  auto r3 = KMeans(x.data(), n, d, nullptr, o);
  ASSERT_TRUE(r3.ok());
  EXPECT_EQ(r3->iterations, 3);
  EXPECT_FALSE(r3->converged);
  ASSERT_EQ(r3->inertia_history.size(), 4u);
  for (size_t i = 1; i < r3->inertia_history.size(); ++i) {
    EXPECT_LE(r3->inertia_history[i], r3->inertia_history[i - 1] * (1 + 1e-6));
  }
  EXPECT_DOUBLE_EQ(r3->inertia, r3->inertia_history.back());
  // A loose tolerance stops early, on the first step that gains less than tol.
  o.max_iterations = 100;
  o.tol = 0.01;
  auto rt = KMeans(x.data(), n, d, nullptr, o);
  ASSERT_TRUE(rt.ok());
  EXPECT_TRUE(rt->converged);
  EXPECT_LT(rt->iterations, 100);
  const auto& h = rt->inertia_history;
  EXPECT_LE(h[h.size() - 2] - h.back(), 0.01 * h[h.size() - 2]);
  for (size_t i = 1; i + 1 < h.size(); ++i) EXPECT_GT(h[i - 1] - h[i], 0.01 * h[i - 1]);
}

TEST(KMeansTest, DeterministicForASeed) {
  const int d = 6;
  const int64_t n = 3000, k = 40;
  const auto x = RandomNormal(n * d, 9);
  KMeansOptions o;
  o.num_centroids = k;
  o.seed = 3;
  auto a = KMeans(x.data(), n, d, nullptr, o);
  auto b = KMeans(x.data(), n, d, nullptr, o);
  o.seed = 4;
  auto c = KMeans(x.data(), n, d, nullptr, o);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->centroids, b->centroids);
  EXPECT_NE(a->centroids, c->centroids);
}

// k-means++ spreads the initial centroids over well-separated clusters; random init often
// puts two in one cluster and misses another, which few Lloyd steps cannot fix.
TEST(KMeansTest, KMeansPlusPlusBeatsRandomInitOnSeparatedClusters) {
  const int d = 4;
  const int64_t clusters = 25, per = 200, n = clusters * per;
  std::vector<float> x(static_cast<size_t>(n * d));
  Rng rng(11);
  for (int64_t cl = 0; cl < clusters; ++cl) {
    std::vector<double> centre(d);
    for (double& c : centre) c = 40.0 * rng.Uniform();
    for (int64_t i = 0; i < per; ++i) {
      for (int t = 0; t < d; ++t) x[static_cast<size_t>((cl * per + i) * d + t)] = static_cast<float>(centre[t] + 0.3 * rng.Normal());
    }
  }
  double pp = 0, rnd = 0;
  for (uint64_t seed = 0; seed < 5; ++seed) {
    KMeansOptions o;
    o.num_centroids = clusters;
    o.max_iterations = 5;
    o.seed = seed;
    o.init = KMeansInit::kKMeansPlusPlus;
    auto a = KMeans(x.data(), n, d, nullptr, o);
    o.init = KMeansInit::kRandom;
    auto b = KMeans(x.data(), n, d, nullptr, o);
    ASSERT_TRUE(a.ok() && b.ok());
    pp += a->inertia;
    rnd += b->inertia;
  }
  EXPECT_LT(pp, 0.8 * rnd) << "k-means++ " << pp << " random " << rnd;
}

TEST(KMeansTest, FewerPointsThanCentroids) {
  const std::vector<float> x = {1, 2, 3, 4, 5, 6};  // 3 points of d = 2
  KMeansOptions o;
  o.num_centroids = 5;
  auto r = KMeans(x.data(), 3, 2, nullptr, o);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->inertia, 0);
  ASSERT_EQ(r->centroids.size(), 10u);
  EXPECT_EQ(std::vector<float>(r->centroids.begin(), r->centroids.begin() + 6), x);
  EXPECT_EQ(r->assignment, (std::vector<int32_t>{0, 1, 2}));
}

TEST(KMeansTest, RejectsInvalidInput) {
  std::vector<float> x = {0, 1, 2, 3};
  std::vector<float> w = {1, 1, 1, 1};
  KMeansOptions o;
  o.num_centroids = 2;
  EXPECT_EQ(KMeans(x.data(), 0, 1, nullptr, o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(KMeans(x.data(), 4, 0, nullptr, o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(KMeans(nullptr, 4, 1, nullptr, o).status().code(), StatusCode::kInvalidArgument);
  o.num_centroids = 0;
  EXPECT_EQ(KMeans(x.data(), 4, 1, nullptr, o).status().code(), StatusCode::kInvalidArgument);
  o.num_centroids = 2;
  o.max_iterations = -1;
  EXPECT_EQ(KMeans(x.data(), 4, 1, nullptr, o).status().code(), StatusCode::kInvalidArgument);
  o.max_iterations = 10;
  o.tol = -1;
  EXPECT_EQ(KMeans(x.data(), 4, 1, nullptr, o).status().code(), StatusCode::kInvalidArgument);
  o.tol = 1e-5;
  x[2] = std::numeric_limits<float>::quiet_NaN();
  auto nan = KMeans(x.data(), 4, 1, nullptr, o);
  EXPECT_EQ(nan.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(nan.status().message().find("point 2"), std::string::npos) << nan.status().message();
  x[2] = 2;
  w[1] = -1;
  EXPECT_EQ(KMeans(x.data(), 4, 1, w.data(), o).status().code(), StatusCode::kInvalidArgument);
  std::fill(w.begin(), w.end(), 0.0f);
  EXPECT_EQ(KMeans(x.data(), 4, 1, w.data(), o).status().code(), StatusCode::kInvalidArgument);
  std::vector<float> bad_init = {0, std::numeric_limits<float>::infinity()};
  EXPECT_EQ(KMeans(x.data(), 4, 1, nullptr, o, nullptr, bad_init.data()).status().code(),
            StatusCode::kInvalidArgument);
}

// A search without the second nearest (as a new backend might start): KMeans falls back to
// plain Lloyd and gives the same result.
class AssignOnlySearch final : public NearestCentroidSearch {
 public:
  const char* name() const override { return "assign-only"; }

 protected:
  Status Search(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
                float* dist, float*) override {
    ++calls;
    return inner->Assign(x, n, c, k, d, idx, dist);
  }

 public:
  std::unique_ptr<NearestCentroidSearch> inner = NewCpuNearestCentroidSearch();
  int calls = 0;
};

TEST(KMeansTest, InjectedSearchWithoutTop2) {
  const int d = 8;
  const int64_t n = 2000, k = 30;
  const auto x = RandomNormal(n * d, 21);
  KMeansOptions o;
  o.num_centroids = k;
  AssignOnlySearch search;
  auto a = KMeans(x.data(), n, d, nullptr, o, &search);
  auto b = KMeans(x.data(), n, d, nullptr, o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->assignment, b->assignment);
  EXPECT_EQ(search.calls, a->iterations + 1);
  float dummy = 0;
  int32_t idx = 0;
  EXPECT_EQ(search.AssignTop2(&dummy, 1, &dummy, 1, 1, &idx, &dummy, &dummy).code(),
            StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace qforge::quant

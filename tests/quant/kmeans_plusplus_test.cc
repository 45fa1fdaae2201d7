// DrawKMeansPlusPlus (kmeans.h): the seeded choices a device replays must be exactly those
// KMeans()'s own k-means++ makes. Checked by replaying the whole initialisation on the host
// from the draws alone (a plain sequential version of the algorithm: D² in float, chunk sums
// and the draw in float64) and comparing the chosen centroids with KMeansInitialCentroids.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "quant/kmeans.h"
#include "quant/synthetic.h"

namespace qforge::quant {
namespace {

constexpr int64_t kChunk = 4096;  // KMeansPlusPlusIndices's chunk

// Indices into `draws.sample` chosen by the k-means++ loop driven by `draws`.
std::vector<int64_t> Replay(const std::vector<float>& x, int d, const KMeansPlusPlusDraws& draws,
                            int64_t k) {
  const int64_t m = static_cast<int64_t>(draws.sample.size());
  std::vector<float> dmin(static_cast<size_t>(m), std::numeric_limits<float>::infinity());
  std::vector<int64_t> chosen = {draws.first};
  for (int64_t j = 1; j < k; ++j) {
    const float* c = x.data() + draws.sample[static_cast<size_t>(chosen.back())] * d;
    std::vector<double> chunk_sum(static_cast<size_t>((m + kChunk - 1) / kChunk), 0.0);
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x.data() + draws.sample[static_cast<size_t>(i)] * d;
      float s = 0;
      for (int t = 0; t < d; ++t) s += (xi[t] - c[t]) * (xi[t] - c[t]);
      dmin[static_cast<size_t>(i)] = std::min(dmin[static_cast<size_t>(i)], s);
      chunk_sum[static_cast<size_t>(i / kChunk)] +=
          static_cast<double>(draws.weights[static_cast<size_t>(i)]) * dmin[static_cast<size_t>(i)];
    }
    double total = 0;
    for (double cs : chunk_sum) total += cs;
    double r = draws.uniforms[static_cast<size_t>(j - 1)] * total;
    size_t ch = 0;
    while (ch + 1 < chunk_sum.size() && r >= chunk_sum[ch]) r -= chunk_sum[ch++];
    int64_t pick = -1;
    for (int64_t i = static_cast<int64_t>(ch) * kChunk; i < std::min(m, static_cast<int64_t>(ch + 1) * kChunk); ++i) {
      const double v = static_cast<double>(draws.weights[static_cast<size_t>(i)]) * dmin[static_cast<size_t>(i)];
      r -= v;
      if (r < 0 && v > 0) {
        pick = i;
        break;
      }
    }
    EXPECT_GE(pick, 0) << "step " << j << " fell off its chunk";
    chosen.push_back(std::max<int64_t>(pick, 0));
  }
  return chosen;
}

TEST(KMeansPlusPlusDrawsTest, ReplayingTheDrawsGivesKMeansInitialCentroids) {
  struct Case {
    int64_t n, k, max_samples;
    int d;
    bool weighted;
  };
  // Whole set in one chunk; several chunks; a subsample (n > max_samples).
  for (const Case& c : {Case{3000, 40, 262144, 8, true}, Case{9000, 25, 262144, 4, false},
                        Case{20000, 30, 6000, 6, true}}) {
    SCOPED_TRACE("n=" + std::to_string(c.n) + " k=" + std::to_string(c.k));
    Rng rng(c.n);
    std::vector<float> x(static_cast<size_t>(c.n * c.d)), w(static_cast<size_t>(c.n));
    for (float& v : x) v = static_cast<float>(rng.Normal());
    for (float& v : w) v = static_cast<float>(rng.Uniform() < 0.1 ? 0.0 : 0.5 + rng.Uniform());
    KMeansOptions o;
    o.num_centroids = c.k;
    o.init_max_samples = c.max_samples;
    o.seed = 17;
    const float* weights = c.weighted ? w.data() : nullptr;
    const KMeansPlusPlusDraws draws = DrawKMeansPlusPlus(weights, c.n, o);

    const int64_t m = std::min(c.n, c.max_samples);
    ASSERT_EQ(static_cast<int64_t>(draws.sample.size()), m);
    EXPECT_TRUE(std::is_sorted(draws.sample.begin(), draws.sample.end()));
    EXPECT_TRUE(std::adjacent_find(draws.sample.begin(), draws.sample.end()) == draws.sample.end());
    ASSERT_EQ(draws.weights.size(), draws.sample.size());
    for (size_t i = 0; i < draws.sample.size(); ++i) {
      EXPECT_EQ(draws.weights[i], c.weighted ? w[static_cast<size_t>(draws.sample[i])] : 1.0f);
    }
    ASSERT_EQ(static_cast<int64_t>(draws.uniforms.size()), c.k - 1);
    ASSERT_GE(draws.first, 0);
    EXPECT_GT(draws.weights[static_cast<size_t>(draws.first)], 0.0f);

    auto expected = KMeansInitialCentroids(x.data(), c.n, c.d, weights, o);
    ASSERT_TRUE(expected.ok()) << expected.status().ToString();
    const std::vector<int64_t> chosen = Replay(x, c.d, draws, c.k);
    for (int64_t j = 0; j < c.k; ++j) {
      const float* got = x.data() + draws.sample[static_cast<size_t>(chosen[static_cast<size_t>(j)])] * c.d;
      for (int t = 0; t < c.d; ++t) {
        ASSERT_EQ(got[t], (*expected)[static_cast<size_t>(j * c.d + t)]) << "centroid " << j;
      }
    }
  }
}

}  // namespace
}  // namespace qforge::quant

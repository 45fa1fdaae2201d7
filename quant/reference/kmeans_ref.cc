// Float64 k-means oracle; see kmeans_ref.h.
#include "quant/reference/kmeans_ref.h"

#include <algorithm>
#include <limits>
#include <utility>

namespace qforge::quant::reference {
namespace {

double SqDistD(const double* a, const float* b, int d) {
  double s = 0;
  for (int t = 0; t < d; ++t) {
    const double e = a[t] - static_cast<double>(b[t]);
    s += e * e;
  }
  return s;
}

}  // namespace

void NearestCentroidRef(const float* x, int64_t n, const float* c, int64_t k, int d,
                        int32_t* idx, double* dist, double* second) {
  std::vector<double> xi(static_cast<size_t>(d));
  for (int64_t i = 0; i < n; ++i) {
    for (int t = 0; t < d; ++t) xi[static_cast<size_t>(t)] = x[i * d + t];
    double best = std::numeric_limits<double>::infinity();
    double next = best;
    int32_t arg = 0;
    for (int64_t j = 0; j < k; ++j) {
      const double v = SqDistD(xi.data(), c + j * d, d);
      if (v < best) {
        next = best;
        best = v;
        arg = static_cast<int32_t>(j);
      } else if (v < next) {
        next = v;
      }
    }
    idx[i] = arg;
    if (dist != nullptr) dist[i] = best;
    if (second != nullptr) second[i] = next;
  }
}

KMeansRefResult KMeansRef(const float* x, int64_t n, int d, const float* weights,
                          const float* initial, int64_t k, int max_iterations, double tol) {
  KMeansRefResult r;
  std::vector<double> c(initial, initial + k * d);
  std::vector<double> w(static_cast<size_t>(n), 1.0);
  if (weights != nullptr) std::copy(weights, weights + n, w.begin());
  std::vector<int32_t> a(static_cast<size_t>(n));
  std::vector<double> dist(static_cast<size_t>(n));

  auto assign = [&]() {
    for (int64_t i = 0; i < n; ++i) {
      double best = std::numeric_limits<double>::infinity();
      int32_t arg = 0;
      for (int64_t j = 0; j < k; ++j) {
        double s = 0;
        for (int t = 0; t < d; ++t) {
          const double e = static_cast<double>(x[i * d + t]) - c[static_cast<size_t>(j * d + t)];
          s += e * e;
        }
        if (s < best) {
          best = s;
          arg = static_cast<int32_t>(j);
        }
      }
      a[static_cast<size_t>(i)] = arg;
      dist[static_cast<size_t>(i)] = best;
    }
  };
  auto inertia_now = [&]() {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += w[static_cast<size_t>(i)] * dist[static_cast<size_t>(i)];
    return s;
  };

  assign();
  double inertia = inertia_now();
  r.inertia_history.push_back(inertia);
  for (int it = 0; it < max_iterations; ++it) {
    std::vector<double> sums(static_cast<size_t>(k * d), 0.0), wsum(static_cast<size_t>(k), 0.0);
    std::vector<int64_t> npos(static_cast<size_t>(k), 0);
    for (int64_t i = 0; i < n; ++i) {
      if (w[static_cast<size_t>(i)] <= 0) continue;
      const int64_t j = a[static_cast<size_t>(i)];
      for (int t = 0; t < d; ++t) sums[static_cast<size_t>(j * d + t)] += w[static_cast<size_t>(i)] * x[i * d + t];
      wsum[static_cast<size_t>(j)] += w[static_cast<size_t>(i)];
      ++npos[static_cast<size_t>(j)];
    }
    bool repaired = false;
    std::vector<char> taken(static_cast<size_t>(n), 0);
    for (int64_t j = 0; j < k; ++j) {
      if (wsum[static_cast<size_t>(j)] > 0) {
        for (int t = 0; t < d; ++t) c[static_cast<size_t>(j * d + t)] = sums[static_cast<size_t>(j * d + t)] / wsum[static_cast<size_t>(j)];
      }
    }
    for (int64_t j = 0; j < k; ++j) {
      if (wsum[static_cast<size_t>(j)] > 0) continue;
      // Empty: the eligible point with the largest w·dist (lowest index on ties).
      int64_t chosen = -1;
      double best = -1;
      for (int64_t i = 0; i < n; ++i) {
        const size_t s = static_cast<size_t>(i);
        if (taken[s] || w[s] <= 0 || dist[s] <= 0 || npos[static_cast<size_t>(a[s])] < 2) continue;
        const double score = w[s] * dist[s];
        if (score > best) {
          best = score;
          chosen = i;
        }
      }
      if (chosen < 0) continue;
      const size_t s = static_cast<size_t>(chosen);
      const int64_t old = a[s];
      for (int t = 0; t < d; ++t) sums[static_cast<size_t>(old * d + t)] -= w[s] * x[chosen * d + t];
      wsum[static_cast<size_t>(old)] -= w[s];
      --npos[static_cast<size_t>(old)];
      for (int t = 0; t < d; ++t) {
        c[static_cast<size_t>(old * d + t)] = sums[static_cast<size_t>(old * d + t)] / wsum[static_cast<size_t>(old)];
        c[static_cast<size_t>(j * d + t)] = x[chosen * d + t];
      }
      wsum[static_cast<size_t>(j)] = w[s];
      npos[static_cast<size_t>(j)] = 1;
      a[s] = static_cast<int32_t>(j);
      dist[s] = 0;
      taken[s] = 1;
      ++r.empty_clusters_repaired;
      repaired = true;
    }
    const std::vector<int32_t> before = a;
    assign();
    const double next = inertia_now();
    r.inertia_history.push_back(next);
    r.iterations = it + 1;
    const bool changed = repaired || before != a;
    const double prev = inertia;
    inertia = next;
    if (!changed || (tol > 0 && prev - next <= tol * prev) || next == 0) {
      r.converged = true;
      break;
    }
  }
  r.inertia = inertia;
  r.assignment = std::move(a);
  r.centroids = std::move(c);
  return r;
}

}  // namespace qforge::quant::reference

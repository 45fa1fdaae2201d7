// Slow, obviously-correct float64 oracles for quant/kmeans.h, used only by tests.
//
// KMeansRef follows exactly the rules KMeans() documents (Lloyd with sample weights, ties to
// the lowest centroid index, the same empty-cluster repair, the same stopping tests), but
// every distance and mean is computed in float64 by brute force, with no centering, pruning or
// tiling. Starting both from the same centroids must give the same result up to float32
// rounding. Thread-safety: pure functions.
#ifndef QFORGE_QUANT_REFERENCE_KMEANS_REF_H_
#define QFORGE_QUANT_REFERENCE_KMEANS_REF_H_

#include <cstdint>
#include <vector>

namespace qforge::quant::reference {

// Brute-force nearest centroid: for x [n, d] and c [k, d], idx[i] = argmin_j ‖x_i − c_j‖²
// in float64 (lowest j on ties), dist[i] the float64 squared distance, and second[i] the
// second smallest squared distance (+inf when k == 1). `second` may be null.
void NearestCentroidRef(const float* x, int64_t n, const float* c, int64_t k, int d,
                        int32_t* idx, double* dist, double* second);

struct KMeansRefResult {
  std::vector<double> centroids;    // [k, d]
  std::vector<int32_t> assignment;  // [n]
  double inertia = 0;
  std::vector<double> inertia_history;
  int iterations = 0;
  bool converged = false;
  int64_t empty_clusters_repaired = 0;
};

// Weighted Lloyd from `initial` [k, d]; weights null = all 1. Inputs are assumed valid.
KMeansRefResult KMeansRef(const float* x, int64_t n, int d, const float* weights,
                          const float* initial, int64_t k, int max_iterations, double tol);

}  // namespace qforge::quant::reference

#endif  // QFORGE_QUANT_REFERENCE_KMEANS_REF_H_

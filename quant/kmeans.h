// Weighted k-means (Lloyd) for VPTQ codebooks, written once with the heavy step injected.
//
// The algorithm (initialisation, Lloyd updates with sample weights, empty-cluster repair,
// bound-based pruning, stopping) lives in KMeans(). The one heavy primitive, "for each point,
// the nearest centroid", is the NearestCentroidSearch interface: the CPU implementation here,
// a CUDA one later (faiss style: swapping the search makes it GPU k-means). The same search is
// what the VPTQ column sweep uses to quantize each column's vectors.
//
// Thread-safety: KMeans() and the free functions are reentrant. A NearestCentroidSearch
// instance is not required to be thread-safe (the CPU one is: it holds no mutable state); it
// may use several threads internally.
#ifndef QFORGE_QUANT_KMEANS_H_
#define QFORGE_QUANT_KMEANS_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "quant/progress.h"
#include "base/status.h"

namespace qforge::quant {

// ---- The injected primitive ---------------------------------------------------------------

// Exhaustive nearest-centroid search under the (unweighted) squared Euclidean distance.
class NearestCentroidSearch {
 public:
  virtual ~NearestCentroidSearch() = default;

  // Short name for logs and benchmarks ("cpu-direct-avx512", ...).
  virtual const char* name() const = 0;

  // x: [n, d] points, c: [k, d] centroids, both row-major float32 (not aliased with outputs).
  // For every point i writes idx[i] = argmin_j ‖x_i − c_j‖² (the lowest j on exact ties) and,
  // when `dist` is not null, dist[i] = that squared distance. Distances are evaluated as
  // ‖x‖² − 2x·c + ‖c‖² in float32 (clamped at 0), so they carry an absolute error of about
  // 1e-6·(‖x‖² + ‖c‖²), and two centroids closer than that may be ranked either way.
  // n == 0 is a no-op. INVALID_ARGUMENT: n < 0, k < 1, k > 2^31 − 1, d < 1, null x/c/idx
  // (checked here for every backend), or a backend's own limit.
  Status Assign(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
                float* dist);

  // Optional: as Assign, and also second_dist[i] = the squared distance to the second
  // nearest centroid (+infinity when k == 1). KMeans uses it for exact bound-based pruning
  // (Hamerly) when SupportsSecondNearest() is true, and plain Lloyd otherwise, so a new
  // backend only has to implement Search for one nearest centroid. UNIMPLEMENTED when
  // SupportsSecondNearest() is false; INVALID_ARGUMENT as Assign, or null dist/second_dist.
  virtual bool SupportsSecondNearest() const { return false; }
  Status AssignTop2(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
                    float* dist, float* second_dist);

 protected:
  // The backend's search, called by Assign (second_dist null) and AssignTop2 (dist and
  // second_dist not null; only when SupportsSecondNearest()) after their argument checks.
  virtual Status Search(const float* x, int64_t n, const float* c, int64_t k, int d,
                        int32_t* idx, float* dist, float* second_dist) = 0;
};

// How the CPU search evaluates distance tiles.
enum class CpuSearchKernel {
  // kDirect when the CPU has AVX2/AVX-512 and d <= 32, else kGemm.
  kAuto,
  // Fused register-blocked kernel: for a block of 4 points and 16 (AVX-512) or 8 (AVX2)
  // centroids stored transposed, ‖c‖² − 2x·c is accumulated with FMAs and the running
  // arg-min kept in registers; nothing is written per (point, centroid) pair. Measured on
  // this project's 2-core AMD EPYC (AVX-512), d = 8, n = k = 65536, both cores: 18 G
  // pairs/s, against 2 G pairs/s for kGemm (OpenBLAS tiles + fused arg-min pass); a single
  // core reaches ~90 % of the FMA peak. Scalar (still fused) without AVX2.
  kDirect,
  // −2·X·Cᵀ for a [tile_points, tile_centroids] tile through linalg.h Gemm, then a fused
  // pass adding ‖c‖² and taking the arg-min per row; the tile lives in a per-thread buffer,
  // never the whole [n, k] matrix. Better for large d.
  kGemm,
};

// The widest instruction set the direct kernel may use (it never uses one the CPU lacks).
enum class CpuSearchIsa { kBest, kAvx2, kScalar };

struct CpuSearchOptions {
  CpuSearchKernel kernel = CpuSearchKernel::kAuto;
  // Caps the instruction set (tests exercise every kernel on one machine).
  CpuSearchIsa max_isa = CpuSearchIsa::kBest;
  // Points per work item; each work item scans centroids tile by tile.
  int64_t point_tile = 256;
  // Centroids per tile (a tile of 4096 × d=8 floats is 128 KiB and stays in L2).
  int64_t centroid_tile = 4096;
  // Up to NumThreads() threads; calls with fewer than `min_parallel_pairs` (n·k) pairs run
  // on the calling thread (thread start-up would cost more than it saves).
  bool multithreaded = true;
  int64_t min_parallel_pairs = int64_t{1} << 21;
};

// The CPU search. Stateless and thread-safe; implements AssignTop2.
std::unique_ptr<NearestCentroidSearch> NewCpuNearestCentroidSearch(
    const CpuSearchOptions& options = {});

// ---- k-means ------------------------------------------------------------------------------

enum class KMeansInit {
  // Weighted k-means++ (D²·w sampling), on a uniform subsample of at most
  // `init_max_samples` points. Cost O(k · m · d), sequential in k.
  kKMeansPlusPlus,
  // The VPTQ reference's choice (cuML init="random"): k distinct points drawn uniformly.
  // O(k).
  kRandom,
};

struct KMeansOptions {
  // Number of centroids k (>= 1). When n <= k every point becomes a centroid (exact; the
  // remaining k − n centroids repeat points cyclically) and no iteration runs.
  int64_t num_centroids = 256;
  // Maximum number of Lloyd update steps (>= 0). The VPTQ reference uses 100.
  int max_iterations = 100;
  // Stops when an update lowers the weighted inertia by no more than tol · (previous
  // inertia), or when no assignment changed. 0 disables the relative test. Reference: 1e-5.
  double tol = 1e-5;
  // Seeds the initialisation and the k-means++ subsample; equal seeds give equal results.
  uint64_t seed = 0;
  // Default kKMeansPlusPlus, chosen by measured loss: on VPTQ-like data (min-max normalised
  // Student-t columns, d = 8, per-column log-normal weights; 2 cores) the final weighted
  // inertia is lower than with random init by 0.15 % at k = 256 (n = 131072, 100 its),
  // 2.3 % at k = 4096 (n = 131072, converged) and 10 % at k = 65536 (n = 524288, 20 its),
  // i.e. the gain grows with k — the VPTQ configurations use k = 4096..65536. Cost: 0.25 s at
  // k = 4096 and 10 s at k = 65536 with the default subsample (memory-bound, one thread),
  // about one Lloyd iteration on 2M points. kRandom remains for comparison with the
  // reference.
  KMeansInit init = KMeansInit::kKMeansPlusPlus;
  // k-means++ runs on a uniform subsample of at most this many points (0 = all points).
  int64_t init_max_samples = 262144;
  // Exact pruning of the assignment step, when the search supports AssignTop2. Each point
  // keeps a lower bound on its distance to every other centroid. (1) Hamerly: the bound
  // shrinks by the largest centroid drift; a point whose exact distance to its own centroid
  // stays below it keeps its centroid without a search. (2) A centroid whose members did not
  // change does not move (most of them after the first iterations), and the bound still
  // holds for those; the remaining points search only the moved centroids, and fall back to
  // a full search when neither their own nor the best moved centroid is within the bound.
  // Same result as plain Lloyd up to floating-point ties. Measured (n = 131072, d = 8,
  // k = 4096, 56 iterations to convergence): 12.2 full-search equivalents per point instead
  // of 57. Off only for benchmarking.
  bool prune = true;
  // Subtract the weighted mean before clustering (k-means is translation invariant); keeps
  // the float32 distance expansion accurate for data far from the origin.
  bool center = true;
  // Progress and cancellation (progress.h), empty by default. The work is counted in
  // assignments, at most max_iterations + 1 (the initial one and one per Lloyd step): after
  // the assignment of step s the fraction is (s + 1) / (max_iterations + 1), and a run that
  // stops (converged, fixed point, n <= k, max_iterations reached) reports 1.0 last. The
  // initialisation is not counted: a k-means++ initialisation on the CPU only calls it with
  // 0.0 after every 1024 centres, so that a cancel stops it too (CANCELLED "k-means
  // cancelled during the k-means++ initialisation after j of k centres"). Returning false
  // after an assignment stops with CANCELLED "k-means cancelled after Lloyd step s of at
  // most T". The result does not depend on it.
  SolveProgress progress;
};

struct KMeansResult {
  int64_t num_centroids = 0;
  int dim = 0;
  std::vector<float> centroids;     // [k, d] row-major
  std::vector<int32_t> assignment;  // [n] nearest centroid of each point (for `centroids`)
  // Σ w_i ‖x_i − c_assignment[i]‖² (float64 sum of exactly recomputed distances; w = 1 when
  // no weights were given), for the returned centroids.
  double inertia = 0;
  std::vector<double> inertia_history;  // inertia after the initial assignment and each step
  int iterations = 0;                   // Lloyd update steps performed
  bool converged = false;               // stopped by tol or a fixed point, not max_iterations
  int64_t empty_clusters_repaired = 0;  // over all iterations
  // Point searches in full-search equivalents (a search of m of the k centroids counts
  // m/k): (iterations + 1)·n without pruning.
  int64_t searched_points = 0;
  double init_seconds = 0, assign_seconds = 0, update_seconds = 0;
};

// Weighted k-means of the n points x [n, d] with sample weights w [n] (null = all 1).
//
// Lloyd: assign each point to its nearest centroid (unweighted Euclidean, through `search`),
// move each centroid to the weighted mean of its points, repeat. Empty clusters (no points,
// or total weight 0) are repaired after each update, in increasing cluster index: each takes
// the point with the largest w_i·‖x_i − c_old(i)‖² (distances of the assignment just made;
// ties to the lower point index) among points with positive weight and distance whose
// cluster keeps at least one other positive-weight point and that no other repair took this
// step; the centroid is set to that point, which leaves its old cluster (whose centroid is
// recomputed without it). With no such point the centroid stays where it was.
//
// `initial_centroids` [k, d] (optional) replaces the seeded initialisation. `search` may be
// null (the CPU search is used); it is not owned.
// INVALID_ARGUMENT: n < 1, d < 1, k < 1, non-finite x or initial centroids, negative or
// non-finite weights, all weights zero, options out of range; errors of the search are
// returned as they are.
StatusOr<KMeansResult> KMeans(const float* x, int64_t n, int d, const float* weights,
                              const KMeansOptions& options,
                              NearestCentroidSearch* search = nullptr,
                              const float* initial_centroids = nullptr);

// The seeded initialisation KMeans() performs (options.init, seed, init_max_samples), on the
// points as given (no centering): returns [k, d] centroids. Requires n > k. Same errors as
// KMeans().
StatusOr<std::vector<float>> KMeansInitialCentroids(const float* x, int64_t n, int d,
                                                    const float* weights,
                                                    const KMeansOptions& options);

// ---- Pieces of KMeans() shared with the device k-means (cuda/kmeans_cuda.cu) ----------------
// A backend that runs the Lloyd iterations elsewhere calls these so that its checks, centering,
// repairs and progress reports are KMeans()'s own.

// KMeans()'s progress report (KMeansOptions::progress) after `lloyd_steps` Lloyd steps:
// `finished` false after an assignment from which the run goes on (the fraction
// (lloyd_steps + 1) / (max_iterations + 1); skipped when that is 1.0, since the run then
// stops), true once the run has stopped (1.0). OK when progress is empty or returns true;
// CANCELLED "k-means cancelled after Lloyd step s of at most T" when it returns false.
Status ReportKMeansProgress(const KMeansOptions& options, int lloyd_steps, bool finished);

// KMeans()'s checks of the points, weights (may be null) and options, with its messages
// (INVALID_ARGUMENT naming the point, coordinate, weight or option).
Status ValidateKMeansInputs(const float* x, int64_t n, int d, const float* weights,
                            const KMeansOptions& options);

// The translation KMeans() subtracts before clustering: the weighted mean of the points
// (float64 sums, w = 1 when `weights` is null, rounded to float32) when `center`, else zeros.
// Requires validated inputs (a positive weight when weights are given).
std::vector<float> KMeansCenteringOffset(const float* x, int64_t n, int d, const float* weights,
                                         bool center);

// What a Lloyd update leaves per cluster j: the weighted coordinate sums, the total weight
// and the number of members with positive weight.
struct KMeansClusterSums {
  std::vector<double> sums;   // [k, d] Σ w_i · x_i over members with w_i > 0
  std::vector<double> wsum;   // [k]
  std::vector<int64_t> npos;  // [k]
};

// The empty-cluster repair of KMeans() (the rule is in KMeans()'s comment), applied after an
// update. `empties` lists the clusters without weight in increasing order; xc [n, d] are the
// points as clustered (centred), w [n] their weights (not null); a [n] and dist [n] the last
// assignment and its exact squared distances; `sums` and c [k, d] the update just made.
// For each repair: the chosen point joins the empty cluster (a = j, dist = 0), its old
// cluster's sums and centroid are recomputed without it, the empty cluster's centroid
// becomes the point. Appends each moved point's index to `moved_points` (may be null).
// Returns the number of repairs (clusters with no eligible point keep their centroid).
int64_t RepairEmptyClusters(const std::vector<int64_t>& empties, const float* xc, int64_t n,
                            int d, const float* w, int32_t* a, float* dist,
                            KMeansClusterSums& sums, float* c,
                            std::vector<int64_t>* moved_points);

// The seeded random choices of KMeans()'s k-means++ initialisation (KMeansInit::
// kKMeansPlusPlus, n > k), for a backend that runs its D² updates elsewhere: the subsample,
// its sampling weights, the first centre, and the uniform each later step j (1 <= j < k)
// scales by the total w·D² to draw with. Step j then takes the first subsample point i of
// its chunk (4096 points) whose running sum of w·D² exceeds the rest of uniforms[j − 1]·total
// (KMeansPlusPlusIndices in kmeans.cc). The replay holds while every step's total is
// positive; a step whose total is 0 (every remaining point is on a centre) draws differently
// on the CPU, and a backend must then use KMeansInitialCentroids instead.
struct KMeansPlusPlusDraws {
  std::vector<int64_t> sample;   // [m] ascending indices into [0, n)
  std::vector<float> weights;    // [m] sampling weights (all 1 when none is positive)
  int64_t first = 0;             // the first centre, an index into `sample`
  std::vector<double> uniforms;  // [k − 1] in [0, 1)
};
KMeansPlusPlusDraws DrawKMeansPlusPlus(const float* weights, int64_t n,
                                       const KMeansOptions& options);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_KMEANS_H_

// The CPU VPTQ solver. See vptq.h for the algorithm and the decisions.
#include "quant/vptq.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "quant/gptq.h"
#include "quant/hessian.h"
#include "quant/linalg.h"
#include "quant/vptq_layout.h"

namespace qforge::quant {
namespace {

using Clock = std::chrono::steady_clock;

int CeilLog2(int64_t k) {
  int b = 0;
  while ((int64_t{1} << b) < k) ++b;
  return b;
}

// One codebook with what the column sweep needs: the centroids [k, v] and, when the output
// dimension is not a multiple of v, the same centroids cut to the real rows of the last
// vector ([k, tail]) for the masked assignment of that vector.
struct Codebook {
  int v = 0;
  int64_t k = 0;
  std::vector<float> c;     // [k, v]
  int tail = 0;             // rows of the last, partial vector (0: none)
  std::vector<float> ctail;  // [k, tail]
  int kmeans_iterations = 0;

  void BuildTail(int64_t out_features) {
    tail = static_cast<int>(out_features % v);
    ctail.clear();
    if (tail == 0) return;
    ctail.resize(static_cast<size_t>(k * tail));
    for (int64_t j = 0; j < k; ++j) {
      std::memcpy(ctail.data() + j * tail, c.data() + j * v, sizeof(float) * static_cast<size_t>(tail));
    }
  }
};

class CpuVptqSolver final : public VptqSolver {
 public:
  explicit CpuVptqSolver(NearestCentroidSearch* search) : search_(search) {
    if (search_ == nullptr) {
      owned_ = NewCpuNearestCentroidSearch();
      search_ = owned_.get();
    }
  }
  const char* backend() const override { return "cpu"; }
  StatusOr<VptqResult> Quantize(const Matrix& w, const Matrix& h, const VptqOptions& o) override;

 private:
  NearestCentroidSearch* search_;
  std::unique_ptr<NearestCentroidSearch> owned_;
};

// State shared by the passes of one Quantize call: the geometry and the codebooks.
struct Layer : VptqGeometry {
  explicit Layer(const VptqGeometry& geometry) : VptqGeometry(geometry) {}

  std::vector<Codebook> main;      // [G]
  std::vector<Codebook> residual;  // [G] or empty
  Codebook outlier;
  const Matrix* U = nullptr;       // [N, N] upper factor of H⁻¹ (permuted), null: no feedback
};

struct PassOutput {
  Matrix q;     // [N, Mpad] quantised normalised weights, transposed (row = permuted column)
  Matrix qerr;  // [N, Mpad] w − q at quantisation time (only when requested)
  std::vector<int32_t> indices, res_indices, outlier_indices;
  double proxy_loss = 0;
};

// Nearest entry of `cb` for the vectors of one column (x [Mpad], first M rows real): full
// vectors through the search, the partial last one by the distance over its real rows.
Status AssignColumn(NearestCentroidSearch* search, const Codebook& cb, const float* x, int64_t M,
                    int32_t* idx) {
  const int64_t full = M / cb.v;
  if (full > 0) QF_RETURN_IF_ERROR(search->Assign(x, full, cb.c.data(), cb.k, cb.v, idx, nullptr));
  if (cb.tail > 0) {
    QF_RETURN_IF_ERROR(search->Assign(x + full * cb.v, 1, cb.ctail.data(), cb.k, cb.tail,
                                      idx + full, nullptr));
  }
  return OkStatus();
}

// The channel-independent second-order pass (or, without U, plain nearest-centroid VQ),
// reporting the end of each lazy block as `stage`.
StatusOr<PassOutput> RunPass(NearestCentroidSearch* search, const Layer& L, const Matrix& wt0,
                             bool use_residual, bool want_qerr, int block_size,
                             VptqProgress& progress, VptqStage stage) {
  const int64_t N = L.N, M = L.M, Mpad = L.Mpad;
  PassOutput out;
  Matrix work = wt0;
  out.q = Matrix(N, Mpad);
  if (want_qerr) out.qerr = Matrix(N, Mpad);
  out.indices.assign(static_cast<size_t>(L.G * L.R * L.S), 0);
  if (use_residual) out.res_indices.assign(out.indices.size(), 0);
  if (L.O > 0) out.outlier_indices.assign(static_cast<size_t>(L.R0 * L.O), 0);

  const int64_t max_rows = std::max(L.R, L.R0);
  std::vector<int32_t> idx(static_cast<size_t>(max_rows)), ridx(static_cast<size_t>(max_rows));
  std::vector<float> rem(static_cast<size_t>(Mpad));
  std::vector<float> err(static_cast<size_t>(Mpad));
  const Matrix* U = L.U;
  for (int64_t i = 0; i < N; i += block_size) {
    const int64_t j = std::min(N, i + block_size);
    Matrix eblock(j - i, Mpad);
    for (int64_t p = i; p < j; ++p) {
      const VptqColumnPart part = L.Part(p);
      const Codebook& cb = part.outlier ? L.outlier : L.main[static_cast<size_t>(part.group)];
      const int64_t rows = part.outlier ? L.R0 : L.R;
      float* wcol = work.row(p);
      float* qcol = out.q.row(p);
      QF_RETURN_IF_ERROR(AssignColumn(search, cb, wcol, M, idx.data()));
      const bool res = use_residual && !part.outlier;
      for (int64_t r = 0; r < rows; ++r) {
        const float* c = cb.c.data() + static_cast<int64_t>(idx[static_cast<size_t>(r)]) * cb.v;
        for (int t = 0; t < cb.v; ++t) {
          const int64_t row = r * cb.v + t;
          if (row < M) qcol[row] = c[t];
        }
      }
      if (res) {
        const Codebook& rb = L.residual[static_cast<size_t>(part.group)];
        for (int64_t row = 0; row < Mpad; ++row) rem[static_cast<size_t>(row)] = row < M ? wcol[row] - qcol[row] : 0.0f;
        QF_RETURN_IF_ERROR(AssignColumn(search, rb, rem.data(), M, ridx.data()));
        for (int64_t r = 0; r < rows; ++r) {
          const float* c = rb.c.data() + static_cast<int64_t>(ridx[static_cast<size_t>(r)]) * rb.v;
          for (int t = 0; t < rb.v; ++t) {
            const int64_t row = r * rb.v + t;
            if (row < M) qcol[row] += c[t];
          }
        }
      }
      // Codes in the checkpoint layout.
      if (part.outlier) {
        for (int64_t r = 0; r < rows; ++r) out.outlier_indices[static_cast<size_t>(r * L.O + part.pos)] = idx[static_cast<size_t>(r)];
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          const size_t at = static_cast<size_t>((part.group * L.R + r) * L.S + part.pos);
          out.indices[at] = idx[static_cast<size_t>(r)];
          if (res) out.res_indices[at] = ridx[static_cast<size_t>(r)];
        }
      }
      // Error and feedback. Padding rows carry no error.
      const float d = U != nullptr ? (*U)(p, p) : 1.0f;
      double loss = 0;
      for (int64_t row = 0; row < Mpad; ++row) {
        const float e = row < M ? wcol[row] - qcol[row] : 0.0f;
        if (row >= M) qcol[row] = 0;
        if (want_qerr) out.qerr(p, row) = e;
        err[static_cast<size_t>(row)] = e / d;
        loss += static_cast<double>(err[static_cast<size_t>(row)]) * err[static_cast<size_t>(row)];
      }
      out.proxy_loss += loss / 2;
      if (U == nullptr) continue;
      std::memcpy(eblock.row(p - i), err.data(), sizeof(float) * static_cast<size_t>(Mpad));
      const float* urow = U->row(p);
      auto update = [&](int64_t a, int64_t b) {
        for (int64_t q = a; q < b; ++q) {
          const float u = urow[q];
          float* dst = work.row(q);
          for (int64_t row = 0; row < M; ++row) dst[row] -= u * err[static_cast<size_t>(row)];
        }
      };
      const int64_t rest = j - p - 1;
      if (rest > 0) {
        if (rest * M >= (int64_t{1} << 20)) {
          ParallelFor(rest, 1, [&](int64_t a, int64_t b) { update(p + 1 + a, p + 1 + b); });
        } else {
          update(p + 1, j);
        }
      }
    }
    // Lazy update of the later columns: W[j:] −= U[i:j, j:]ᵀ · E.
    if (U != nullptr && j < N) {
      Gemm(true, false, N - j, Mpad, j - i, -1.0f, U->row(i) + j, N, eblock.data.data(), Mpad,
           1.0f, work.row(j), Mpad);
    }
    QF_RETURN_IF_ERROR(progress.PassColumns(stage, j));
  }
  return out;
}

// [out, in] weights from a pass's transposed, permuted, normalised quantised values.
Matrix Denormalize(const Matrix& q, const std::vector<int32_t>& perm, const std::vector<float>& scale,
                   const std::vector<float>& bias, int64_t M) {
  const int64_t N = q.rows;
  Matrix w(M, N);
  for (int64_t p = 0; p < N; ++p) {
    const int64_t n = perm[static_cast<size_t>(p)];
    const float s = scale[static_cast<size_t>(n)], b = bias[static_cast<size_t>(n)];
    const float* src = q.row(p);
    for (int64_t r = 0; r < M; ++r) w(r, n) = src[r] * s + b;
  }
  return w;
}

// k-means over the full vectors of columns [c0, c1) of `src` ([N, Mpad] transposed), each
// vector weighted by colw[column]; the partial last vectors are left out unless there is no
// full vector at all. Reports to `progress` (VptqProgress::KMeans).
StatusOr<Codebook> TrainCodebook(NearestCentroidSearch* search, const Matrix& src, int64_t c0,
                                 int64_t c1, int v, int64_t k, int64_t M,
                                 const std::vector<float>& colw, const VptqOptions& o,
                                 uint64_t seed, const std::string& what, SolveProgress progress) {
  const int64_t rows = KMeansVectorsPerColumn(M, v);
  const int64_t n = (c1 - c0) * rows;
  std::vector<float> data(static_cast<size_t>(n * v));
  std::vector<float> weights(static_cast<size_t>(n));
  bool any_weight = false;
  for (int64_t c = c0; c < c1; ++c) {
    const float* col = src.row(c);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = (c - c0) * rows + r;
      std::memcpy(data.data() + at * v, col + r * v, sizeof(float) * static_cast<size_t>(v));
      weights[static_cast<size_t>(at)] = colw[static_cast<size_t>(c)];
      any_weight = any_weight || colw[static_cast<size_t>(c)] > 0;
    }
  }
  auto km = KMeans(data.data(), n, v, any_weight ? weights.data() : nullptr,
                   VptqKMeansOptions(o, k, seed, std::move(progress)), search);
  if (!km.ok()) return CodebookKMeansError(km.status(), what);
  Codebook cb;
  cb.v = v;
  cb.k = k;
  cb.c = std::move(km->centroids);
  cb.kmeans_iterations = km->iterations;
  for (float& x : cb.c) x = RoundVptqParam(x, o.param_dtype);
  cb.BuildTail(M);
  return cb;
}

StatusOr<VptqResult> CpuVptqSolver::Quantize(const Matrix& w, const Matrix& h,
                                            const VptqOptions& o) {
  const auto t_total = Clock::now();
  QF_RETURN_IF_ERROR(CheckVptqInputs(w, h, o));

  Layer L(MakeVptqGeometry(w.rows, w.cols, o));
  const int64_t M = L.M, N = L.N, Mpad = L.Mpad;
  VptqResult res = MakeVptqResultHeader(L, o);
  VptqProgress progress(L, o);

  // ---- Dead columns, normalisation, Hessian of the normalised problem, permutation.
  auto t = Clock::now();
  Matrix wz = w;
  res.dead_columns = FindDeadColumns(h);
  for (int32_t c : res.dead_columns) {
    for (int64_t r = 0; r < M; ++r) wz(r, c) = 0;
  }
  res.weight_scale.assign(static_cast<size_t>(N), 1.0f);
  res.weight_bias.assign(static_cast<size_t>(N), 0.0f);
  if (o.enable_norm) {
    for (int64_t c = 0; c < N; ++c) {
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
      for (int64_t r = 0; r < M; ++r) {
        mn = std::min(mn, wz(r, c));
        mx = std::max(mx, wz(r, c));
      }
      const VptqColumnNorm norm = ColumnNormFromRange(mn, mx, o.param_dtype);
      res.weight_scale[static_cast<size_t>(c)] = norm.scale;
      res.weight_bias[static_cast<size_t>(c)] = norm.bias;
      for (int64_t r = 0; r < M; ++r) {
        wz(r, c) = norm.scale > 0 ? (wz(r, c) - norm.bias) / norm.scale : 0.0f;
      }
    }
  }
  const bool scaled = UsesScaledHessian(o);
  const Matrix hs = scaled ? ScaleHessian(h, res.weight_scale) : Matrix();
  const Matrix& hf = scaled ? hs : h;
  QF_ASSIGN_OR_RETURN(PreparedHessian prep, PrepareHessian(hf, VptqHessianOptions(o)));
  res.perm = prep.perm;
  res.damp_percent_used = prep.damp_percent_used;
  res.cholesky_attempts = prep.cholesky_attempts;
  for (int32_t c : prep.dead_columns) {  // dead in the normalised problem (e.g. scale 0)
    for (int64_t r = 0; r < M; ++r) wz(r, c) = 0;
  }
  // Transposed, permuted working copy: wt0[p, r] = Wn[r, perm[p]].
  Matrix wt0(N, Mpad);
  for (int64_t p = 0; p < N; ++p) {
    const int64_t c = res.perm[static_cast<size_t>(p)];
    float* dst = wt0.row(p);
    for (int64_t r = 0; r < M; ++r) dst[r] = wz(r, c);
  }
  wz = Matrix();
  const std::vector<float> colw = KMeansColumnWeights(
      NormalizedHessianDiagonal(h, res.weight_scale, scaled), res.perm, o.hessian_weighted_kmeans);
  L.U = o.error_feedback ? &prep.hinv_upper : nullptr;
  res.timings.hessian_seconds = ElapsedSeconds(t);

  // ---- Codebooks.
  t = Clock::now();
  if (L.O > 0) {
    QF_ASSIGN_OR_RETURN(L.outlier, TrainCodebook(search_, wt0, 0, L.O, L.v0, o.outlier_num_centroids,
                                                 M, colw, o, o.kmeans_seed + static_cast<uint64_t>(L.G),
                                                 "outlier codebook k-means",
                                                 progress.KMeans(VptqStage::kOutlierKMeans, 0)));
    res.kmeans_iterations_max = std::max(res.kmeans_iterations_max, L.outlier.kmeans_iterations);
  }
  for (int g = 0; g < L.G; ++g) {
    const int64_t c0 = L.GroupBegin(g);
    QF_ASSIGN_OR_RETURN(Codebook cb, TrainCodebook(search_, wt0, c0, c0 + L.S, L.v, o.num_centroids, M,
                                                   colw, o, o.kmeans_seed + static_cast<uint64_t>(g),
                                                   "group " + std::to_string(g) +
                                                       " codebook k-means",
                                                   progress.KMeans(VptqStage::kGroupKMeans, g)));
    res.kmeans_iterations_max = std::max(res.kmeans_iterations_max, cb.kmeans_iterations);
    L.main.push_back(std::move(cb));
  }
  res.timings.kmeans_seconds = ElapsedSeconds(t);

  double metrics = 0;
  auto error_of = [&](const Matrix& q) {
    const auto tm = Clock::now();
    const double e = OutputError(w, Denormalize(q, res.perm, res.weight_scale, res.weight_bias, M), h);
    metrics += ElapsedSeconds(tm);
    return e;
  };
  if (o.report_phase_errors) {
    const Layer plain = [&] {
      Layer p = L;
      p.U = nullptr;
      return p;
    }();
    QF_ASSIGN_OR_RETURN(PassOutput km_only, RunPass(search_, plain, wt0, false, false, o.block_size,
                                                    progress, VptqStage::kPhaseErrorPass));
    res.kmeans_output_error = error_of(km_only.q);
  }

  // ---- First pass.
  t = Clock::now();
  const bool residual = o.num_res_centroids > 0;
  QF_ASSIGN_OR_RETURN(PassOutput pass, RunPass(search_, L, wt0, false, residual, o.block_size,
                                               progress, VptqStage::kFirstPass));
  res.timings.first_pass_seconds = ElapsedSeconds(t);

  if (residual) {
    if (o.report_phase_errors) res.first_pass_output_error = error_of(pass.q);
    // ---- Residual codebooks on the error the first pass left, then the second pass from
    // the original weights with every codebook frozen.
    t = Clock::now();
    for (int g = 0; g < L.G; ++g) {
      const int64_t c0 = L.GroupBegin(g);
      QF_ASSIGN_OR_RETURN(Codebook rb, TrainCodebook(search_, pass.qerr, c0, c0 + L.S, L.v,
                                                     o.num_res_centroids, M, colw, o,
                                                     o.kmeans_seed + 1000 + static_cast<uint64_t>(g),
                                                     "group " + std::to_string(g) +
                                                         " residual k-means",
                                                     progress.KMeans(VptqStage::kResidualKMeans,
                                                                     g)));
      res.kmeans_iterations_max = std::max(res.kmeans_iterations_max, rb.kmeans_iterations);
      L.residual.push_back(std::move(rb));
    }
    res.timings.residual_kmeans_seconds = ElapsedSeconds(t);
    t = Clock::now();
    pass = PassOutput();
    QF_ASSIGN_OR_RETURN(pass, RunPass(search_, L, wt0, true, false, o.block_size, progress,
                                      VptqStage::kSecondPass));
    res.timings.second_pass_seconds = ElapsedSeconds(t);
  }

  // ---- Result in the checkpoint layout.
  for (const Codebook& cb : L.main) res.centroids.push_back(cb.c);
  for (const Codebook& cb : L.residual) res.res_centroids.push_back(cb.c);
  if (L.O > 0) res.outlier_centroids = L.outlier.c;
  res.indices = std::move(pass.indices);
  res.res_indices = std::move(pass.res_indices);
  res.outlier_indices = std::move(pass.outlier_indices);
  res.proxy_loss = pass.proxy_loss;

  const auto tm = Clock::now();
  QF_ASSIGN_OR_RETURN(res.dequantized, DequantizeVptqResult(res));
  res.output_error = OutputError(w, res.dequantized, h);
  res.weight_energy = WeightEnergy(w, h);
  metrics += ElapsedSeconds(tm);
  if (o.report_phase_errors && !residual) res.first_pass_output_error = res.output_error;
  res.timings.metrics_seconds = metrics;
  res.timings.total_seconds = ElapsedSeconds(t_total);
  return res;
}

}  // namespace

Status ValidateVptqOptions(const VptqOptions& o, int64_t out_features, int64_t in_features) {
  auto bad = [](const std::string& m) { return InvalidArgumentError("VPTQ options: " + m); };
  constexpr int64_t kMaxK = std::numeric_limits<int32_t>::max();
  if (out_features < 1 || in_features < 1) {
    return bad("layer shape [" + std::to_string(out_features) + ", " + std::to_string(in_features) +
               "] must have out_features >= 1 and in_features >= 1");
  }
  if (o.vector_len < 1) return bad("vector_len = " + std::to_string(o.vector_len) + " < 1");
  if (o.num_centroids < 1 || o.num_centroids > kMaxK) {
    return bad("num_centroids = " + std::to_string(o.num_centroids) + " outside [1, 2^31 - 1]");
  }
  if (o.num_res_centroids < 0 || o.num_res_centroids > kMaxK) {
    return bad("num_res_centroids = " + std::to_string(o.num_res_centroids) +
               " outside [0, 2^31 - 1] (0 = no residual)");
  }
  if (o.group_num < 1) return bad("group_num = " + std::to_string(o.group_num) + " < 1");
  if (o.outlier_size < 0 || o.outlier_size > in_features - o.group_num) {
    return bad("outlier_size = " + std::to_string(o.outlier_size) + " must be in [0, in_features - group_num] = [0, " +
               std::to_string(in_features - o.group_num) + "]");
  }
  if ((in_features - o.outlier_size) % o.group_num != 0) {
    return bad("in_features - outlier_size = " + std::to_string(in_features - o.outlier_size) +
               " is not divisible by group_num = " + std::to_string(o.group_num));
  }
  if (o.outlier_size > 0) {
    if (o.outlier_vector_len < 1) {
      return bad("outlier_vector_len = " + std::to_string(o.outlier_vector_len) + " < 1");
    }
    if (o.outlier_num_centroids < 1 || o.outlier_num_centroids > kMaxK) {
      return bad("outlier_num_centroids = " + std::to_string(o.outlier_num_centroids) +
                 " outside [1, 2^31 - 1]");
    }
  }
  if (o.kmeans_iterations < 0) return bad("kmeans_iterations < 0");
  if (!(o.kmeans_tol >= 0) || !std::isfinite(o.kmeans_tol)) return bad("kmeans_tol must be finite and >= 0");
  if (o.kmeans_init_max_samples < 0) return bad("kmeans_init_max_samples < 0");
  if (!(o.damp_percent >= 0) || !std::isfinite(o.damp_percent)) return bad("damp_percent must be finite and >= 0");
  if (!(o.damp_auto_increment >= 0) || !std::isfinite(o.damp_auto_increment)) {
    return bad("damp_auto_increment must be finite and >= 0");
  }
  if (!(o.max_damp_percent >= 0) || !std::isfinite(o.max_damp_percent)) {
    return bad("max_damp_percent must be finite and >= 0");
  }
  if (o.block_size < 1) return bad("block_size = " + std::to_string(o.block_size) + " < 1");
  return OkStatus();
}

std::unique_ptr<VptqSolver> NewCpuVptqSolver(NearestCentroidSearch* search) {
  return std::make_unique<CpuVptqSolver>(search);
}

StatusOr<Matrix> DequantizeVptqResult(const VptqResult& r) {
  const int64_t M = r.out_features, N = r.in_features;
  const int64_t G = r.group_num, S = r.group_size, O = r.outlier_size;
  const int64_t v = r.vector_len, v0 = r.outlier_vector_len;
  const int64_t k = r.num_centroids, kr = r.num_res_centroids, k0 = r.outlier_num_centroids;
  auto bad = [](const std::string& m) { return InvalidArgumentError("VPTQ result: " + m); };
  if (M < 1 || N < 1 || G < 1 || v < 1 || O < 0 || O + G * S != N) return bad("inconsistent shape");
  const int64_t R = VptqVectorRows(M, v);
  if (r.num_vector_rows != R) return bad("num_vector_rows != ceil(out / vector_len)");
  if (static_cast<int64_t>(r.centroids.size()) != G) return bad("centroids has " + std::to_string(r.centroids.size()) + " groups");
  for (const auto& c : r.centroids) {
    if (static_cast<int64_t>(c.size()) != k * v) return bad("a codebook does not hold k * v values");
  }
  if (kr > 0) {
    if (static_cast<int64_t>(r.res_centroids.size()) != G) return bad("res_centroids group count");
    for (const auto& c : r.res_centroids) {
      if (static_cast<int64_t>(c.size()) != kr * v) return bad("a residual codebook does not hold kr * v values");
    }
    if (r.res_indices.size() != static_cast<size_t>(G * R * S)) return bad("res_indices size");
  }
  if (r.indices.size() != static_cast<size_t>(G * R * S)) return bad("indices size");
  int64_t R0 = 0;
  if (O > 0) {
    if (v0 < 1 || k0 < 1) return bad("outlier vector length / centroids");
    R0 = VptqVectorRows(M, v0);
    if (static_cast<int64_t>(r.outlier_centroids.size()) != k0 * v0) return bad("outlier_centroids size");
    if (r.outlier_indices.size() != static_cast<size_t>(R0 * O)) return bad("outlier_indices size");
  }
  if (r.perm.size() != static_cast<size_t>(N) || r.weight_scale.size() != static_cast<size_t>(N) ||
      r.weight_bias.size() != static_cast<size_t>(N)) {
    return bad("perm / weight_scale / weight_bias must hold in_features values");
  }
  std::vector<int32_t> inv(static_cast<size_t>(N), -1);
  for (int64_t p = 0; p < N; ++p) {
    const int32_t c = r.perm[static_cast<size_t>(p)];
    if (c < 0 || c >= N || inv[static_cast<size_t>(c)] >= 0) return bad("perm is not a permutation");
    inv[static_cast<size_t>(c)] = static_cast<int32_t>(p);
  }
  // Wp [M, N] in permuted order.
  Matrix wp(M, N);
  for (int64_t g = 0; g < G; ++g) {
    const std::vector<float>& C = r.centroids[static_cast<size_t>(g)];
    for (int64_t rr = 0; rr < R; ++rr) {
      for (int64_t c = 0; c < S; ++c) {
        const size_t at = static_cast<size_t>((g * R + rr) * S + c);
        const int64_t i = r.indices[at];
        if (i < 0 || i >= k) return bad("index out of range at group " + std::to_string(g));
        int64_t j = 0;
        if (kr > 0) {
          j = r.res_indices[at];
          if (j < 0 || j >= kr) return bad("residual index out of range at group " + std::to_string(g));
        }
        for (int64_t t = 0; t < v; ++t) {
          const int64_t row = rr * v + t;
          if (row >= M) break;
          float val = C[static_cast<size_t>(i * v + t)];
          if (kr > 0) val += r.res_centroids[static_cast<size_t>(g)][static_cast<size_t>(j * v + t)];
          wp(row, O + g * S + c) = val;
        }
      }
    }
  }
  for (int64_t rr = 0; rr < R0; ++rr) {
    for (int64_t c = 0; c < O; ++c) {
      const int64_t i = r.outlier_indices[static_cast<size_t>(rr * O + c)];
      if (i < 0 || i >= k0) return bad("outlier index out of range");
      for (int64_t t = 0; t < v0; ++t) {
        const int64_t row = rr * v0 + t;
        if (row >= M) break;
        wp(row, c) = r.outlier_centroids[static_cast<size_t>(i * v0 + t)];
      }
    }
  }
  Matrix out(M, N);
  for (int64_t row = 0; row < M; ++row) {
    const float* src = wp.row(row);
    float* dst = out.row(row);
    for (int64_t n = 0; n < N; ++n) {
      dst[n] = src[inv[static_cast<size_t>(n)]] * r.weight_scale[static_cast<size_t>(n)] +
               r.weight_bias[static_cast<size_t>(n)];
    }
  }
  return out;
}

double VptqBitsPerWeight(const VptqResult& r) {
  const double M = static_cast<double>(r.out_features), N = static_cast<double>(r.in_features);
  if (M <= 0 || N <= 0) return 0;
  const int ib = CeilLog2(std::max<int64_t>(1, r.num_centroids));
  const int rb = r.num_res_centroids > 0 ? CeilLog2(r.num_res_centroids) : 0;
  const double words = static_cast<double>(r.group_num) * static_cast<double>(r.num_vector_rows) *
                       std::ceil(static_cast<double>(r.group_size) * (ib + rb) / 32.0);
  double bits = 32.0 * words;
  bits += 16.0 * static_cast<double>(r.num_outlier_vector_rows) * static_cast<double>(r.outlier_size);
  bits += 16.0 * static_cast<double>(r.group_num) * static_cast<double>(r.vector_len) *
          static_cast<double>(r.num_centroids + std::max<int64_t>(0, r.num_res_centroids));
  bits += 16.0 * static_cast<double>(r.outlier_vector_len) * static_cast<double>(r.outlier_num_centroids);
  // weight_scale, weight_bias and perm are stored for every layer (quant/vptq_pack.h
  // VptqConfigFromResult), identity tensors when the solve used no norm / no perm.
  bits += 3 * 16.0 * N;
  return bits / (M * N);
}

}  // namespace qforge::quant

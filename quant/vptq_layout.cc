// Host-side pieces shared by the VPTQ backends. See vptq_layout.h.
#include "quant/vptq_layout.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "base/float16.h"

namespace qforge::quant {

Status CheckMatrixFinite(const Matrix& m, const char* what) {
  for (int64_t i = 0; i < m.size(); ++i) {
    if (!std::isfinite(m.data[static_cast<size_t>(i)])) {
      return InvalidArgumentError(std::string(what) + " entry (" + std::to_string(i / m.cols) + ", " +
                                  std::to_string(i % m.cols) + ") is not finite");
    }
  }
  return OkStatus();
}

Status CheckVptqInputs(const Matrix& w, const Matrix& h, const VptqOptions& o) {
  QF_RETURN_IF_ERROR(ValidateVptqOptions(o, w.rows, w.cols));
  if (static_cast<int64_t>(w.data.size()) != w.rows * w.cols) {
    return InvalidArgumentError("weight storage does not match its shape");
  }
  if (h.rows != w.cols || h.cols != w.cols || static_cast<int64_t>(h.data.size()) != h.rows * h.cols) {
    return InvalidArgumentError("Hessian must be [" + std::to_string(w.cols) + ", " +
                                std::to_string(w.cols) + "] for a weight of " +
                                std::to_string(w.cols) + " input features, got [" +
                                std::to_string(h.rows) + ", " + std::to_string(h.cols) + "]");
  }
  return CheckMatrixFinite(w, "weight");
}

int64_t VptqVectorRows(int64_t out_features, int64_t vector_len) {
  return (out_features + vector_len - 1) / vector_len;
}

VptqColumnPart VptqGeometry::Part(int64_t p) const {
  VptqColumnPart part;
  if (p < O) {
    part.outlier = true;
    part.pos = p;
  } else {
    part.group = static_cast<int>((p - O) / S);
    part.pos = (p - O) % S;
  }
  return part;
}

VptqGeometry MakeVptqGeometry(int64_t out_features, int64_t in_features, const VptqOptions& o) {
  VptqGeometry g;
  g.M = out_features;
  g.N = in_features;
  g.O = o.outlier_size;
  g.G = o.group_num;
  g.S = (g.N - g.O) / g.G;
  g.v = o.vector_len;
  g.v0 = g.O > 0 ? o.outlier_vector_len : 0;
  g.R = VptqVectorRows(g.M, g.v);
  g.R0 = g.O > 0 ? VptqVectorRows(g.M, g.v0) : 0;
  g.Mpad = std::max(g.R * g.v, g.R0 * g.v0);
  return g;
}

VptqResult MakeVptqResultHeader(const VptqGeometry& g, const VptqOptions& o) {
  VptqResult res;
  res.out_features = g.M;
  res.in_features = g.N;
  res.vector_len = g.v;
  res.num_centroids = o.num_centroids;
  res.num_res_centroids = o.num_res_centroids;
  res.outlier_size = g.O;
  res.outlier_vector_len = g.v0;
  res.outlier_num_centroids = g.O > 0 ? o.outlier_num_centroids : 0;
  res.group_num = g.G;
  res.group_size = g.S;
  res.enable_norm = o.enable_norm;
  res.enable_perm = o.enable_perm;
  res.param_dtype = o.param_dtype;
  res.num_vector_rows = g.R;
  res.num_outlier_vector_rows = g.R0;
  return res;
}

float RoundVptqParam(float x, VptqParamDtype dtype) {
  switch (dtype) {
    case VptqParamDtype::kFloat16:
      return HalfToFloat(FloatToHalf(x));
    case VptqParamDtype::kBFloat16:
      return BFloat16ToFloat(FloatToBFloat16(x));
    case VptqParamDtype::kFloat32:
      break;
  }
  return x;
}

std::vector<int32_t> FindDeadColumns(const Matrix& h) {
  std::vector<int32_t> dead;
  for (int64_t c = 0; c < h.rows; ++c) {
    if (h(c, c) == 0.0f) dead.push_back(static_cast<int32_t>(c));
  }
  return dead;
}

VptqColumnNorm ColumnNormFromRange(float mn, float mx, VptqParamDtype dtype) {
  const float s = RoundVptqParam(mx - mn, dtype);
  VptqColumnNorm norm;
  norm.scale = std::isfinite(s) ? s : 0.0f;
  norm.bias = RoundVptqParam(mn, dtype);
  return norm;
}

bool UsesScaledHessian(const VptqOptions& o) {
  return o.enable_norm && o.hessian_space == HessianSpace::kScaled;
}

HessianOptions VptqHessianOptions(const VptqOptions& o) {
  HessianOptions ho;
  ho.damp_percent = o.damp_percent;
  ho.damp_auto_increment = o.damp_auto_increment;
  ho.max_damp_percent = o.max_damp_percent;
  ho.act_order = o.enable_perm;
  return ho;
}

Matrix ScaleHessian(const Matrix& h, const std::vector<float>& scale) {
  Matrix hs = h;
  for (int64_t a = 0; a < hs.rows; ++a) {
    const float sa = scale[static_cast<size_t>(a)];
    float* row = hs.row(a);
    for (int64_t b = 0; b < hs.cols; ++b) row[b] *= sa * scale[static_cast<size_t>(b)];
  }
  return hs;
}

std::vector<float> NormalizedHessianDiagonal(const Matrix& h, const std::vector<float>& scale,
                                             bool scaled) {
  std::vector<float> diag(static_cast<size_t>(h.rows));
  for (int64_t c = 0; c < h.rows; ++c) {
    const size_t ci = static_cast<size_t>(c);
    diag[ci] = scaled ? h(c, c) * (scale[ci] * scale[ci]) : h(c, c);
  }
  return diag;
}

std::vector<float> KMeansColumnWeights(const std::vector<float>& hf_diag,
                                       const std::vector<int32_t>& perm, bool hessian_weighted) {
  std::vector<float> colw(perm.size(), 1.0f);
  if (!hessian_weighted) return colw;
  for (size_t p = 0; p < perm.size(); ++p) {
    colw[p] = std::max(0.0f, hf_diag[static_cast<size_t>(perm[p])]);
  }
  return colw;
}

int64_t KMeansVectorsPerColumn(int64_t out_features, int vector_len) {
  const int64_t full = out_features / vector_len;
  return full > 0 ? full : 1;  // out < v: the one padded vector per column
}

KMeansOptions VptqKMeansOptions(const VptqOptions& o, int64_t k, uint64_t seed,
                                SolveProgress progress) {
  KMeansOptions ko;
  ko.num_centroids = k;
  ko.max_iterations = o.kmeans_iterations;
  ko.tol = o.kmeans_tol;
  ko.seed = seed;
  ko.init = o.kmeans_init;
  ko.init_max_samples = o.kmeans_init_max_samples;
  ko.progress = std::move(progress);
  return ko;
}

Status CodebookKMeansError(const Status& s, const std::string& what) {
  if (s.code() == StatusCode::kCancelled) {
    return CancelledError("solve cancelled during " + what + " (" + s.message() + ")");
  }
  return Status(s.code(), what + ": " + s.message());
}

VptqProgress::VptqProgress(const VptqGeometry& g, const VptqOptions& o)
    : report_(o.progress),
      columns_(g.N),
      outliers_(g.O),
      block_size_(std::min<int64_t>(o.block_size, g.N)),
      groups_(g.G),
      phase_errors_(o.report_phase_errors),
      residual_(o.num_res_centroids > 0) {
  const double assignments = static_cast<double>(o.kmeans_iterations) + 1.0;
  auto kmeans = [&](int64_t columns, int v, int64_t k) {
    return static_cast<double>(columns * KMeansVectorsPerColumn(g.M, v)) *
           static_cast<double>(k) * assignments;
  };
  if (g.O > 0) {
    outlier_kmeans_ = kmeans(g.O, g.v0, o.outlier_num_centroids);
    outlier_column_ = static_cast<double>(g.R0) * static_cast<double>(o.outlier_num_centroids);
  }
  group_kmeans_ = kmeans(g.S, g.v, o.num_centroids);
  group_column_ = static_cast<double>(g.R) * static_cast<double>(o.num_centroids);
  if (residual_) {
    residual_kmeans_ = kmeans(g.S, g.v, o.num_res_centroids);
    residual_column_ = static_cast<double>(g.R) * static_cast<double>(o.num_res_centroids);
  }
  const VptqStage last = residual_ ? VptqStage::kSecondPass : VptqStage::kFirstPass;
  total_ = Begin(last, 0) + PassWork(last, columns_);
}

double VptqProgress::Begin(VptqStage stage, int group) const {
  const double codebooks = outlier_kmeans_ + groups_ * group_kmeans_;
  const double first =
      codebooks + (phase_errors_ ? PassWork(VptqStage::kPhaseErrorPass, columns_) : 0.0);
  const double residuals = first + PassWork(VptqStage::kFirstPass, columns_);
  switch (stage) {
    case VptqStage::kOutlierKMeans:
      return 0;
    case VptqStage::kGroupKMeans:
      return outlier_kmeans_ + group * group_kmeans_;
    case VptqStage::kPhaseErrorPass:
      return codebooks;
    case VptqStage::kFirstPass:
      return first;
    case VptqStage::kResidualKMeans:
      return residuals + group * residual_kmeans_;
    case VptqStage::kSecondPass:
      return residuals + groups_ * residual_kmeans_;
  }
  return total_;
}

double VptqProgress::PassWork(VptqStage stage, int64_t columns) const {
  const int64_t outlier_columns = std::min(columns, outliers_);
  const double group_column =
      group_column_ + (stage == VptqStage::kSecondPass ? residual_column_ : 0.0);
  return static_cast<double>(outlier_columns) * outlier_column_ +
         static_cast<double>(columns - outlier_columns) * group_column;
}

bool VptqProgress::Report(double done) {
  if (stopped_) return false;
  last_ = std::max(last_, std::min(1.0, done / total_));
  if (report_(last_)) return true;
  stopped_ = true;
  return false;
}

SolveProgress VptqProgress::KMeans(VptqStage stage, int group) {
  if (!report_) return {};
  const double begin = Begin(stage, group);
  const double span = stage == VptqStage::kOutlierKMeans ? outlier_kmeans_
                      : stage == VptqStage::kGroupKMeans ? group_kmeans_
                                                         : residual_kmeans_;
  return [this, begin, span](double fraction) { return Report(begin + fraction * span); };
}

Status VptqProgress::PassColumns(VptqStage stage, int64_t columns_done) {
  if (!report_) return OkStatus();
  const VptqStage last = residual_ ? VptqStage::kSecondPass : VptqStage::kFirstPass;
  const bool end = stage == last && columns_done == columns_;
  if (Report(end ? total_ : Begin(stage, 0) + PassWork(stage, columns_done))) return OkStatus();
  const char* pass = stage == VptqStage::kPhaseErrorPass ? "k-means-only pass"
                     : stage == VptqStage::kFirstPass    ? "first pass"
                                                         : "second pass";
  return CancelledError("solve cancelled after column block " +
                        std::to_string((columns_done + block_size_ - 1) / block_size_) + " of " +
                        std::to_string((columns_ + block_size_ - 1) / block_size_) + " of the " +
                        pass);
}

double ElapsedSeconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace qforge::quant

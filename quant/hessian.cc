// Hessian preparation (dead columns, act-order, damping with automatic increase, upper
// Cholesky factor of the inverse) and the running-mean accumulator. See hessian.h.
//
// The factor U of (P H Pᵀ + λI)⁻¹ = Uᵀ U is computed without forming the inverse: with J the
// exchange matrix and M = P H Pᵀ + λI, the lower Cholesky factor R of J M J gives
// M = (J R J)(J R J)ᵀ with J R J upper triangular, hence M⁻¹ = (J R⁻¹ J)ᵀ (J R⁻¹ J) and
// U = J R⁻¹ J (the unique upper factor with a positive diagonal). One Cholesky and one
// triangular inverse (≈ 2n³/3 flops) instead of the reference's Cholesky, inverse and second
// Cholesky (≈ 4n³/3), and no explicitly formed inverse to lose accuracy in.
// clang-format off
#include <cstddef>  // base/matrix.h uses ::size_t without including it
#include "quant/hessian.h"
// clang-format on

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>

#include "quant/linalg.h"
#include "quant/linalg_internal.h"

namespace qforge::quant {
namespace {

std::string FormatDouble(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// One factorization attempt on the reversed, damped matrix; on success `work` holds R⁻¹.
Status FactorReversed(std::vector<float>& work, int64_t n) {
  QF_RETURN_IF_ERROR(CholeskyLower(work.data(), n));
  QF_RETURN_IF_ERROR(internal::TriangularInverseLower(work.data(), n));
  for (int64_t i = 0; i < n; ++i) {
    const float* row = work.data() + i * n;
    for (int64_t j = 0; j <= i; ++j) {
      if (!std::isfinite(row[j])) {
        return FailedPreconditionError("inverse factor is not finite (row " +
                                       std::to_string(n - 1 - i) + ")");
      }
    }
  }
  return OkStatus();
}

Status NegativeDiagonalError(int64_t i, float value) {
  return InvalidArgumentError("Hessian diagonal entry " + std::to_string(i) + " is negative (" +
                              FormatDouble(value) + ")");
}

Status CheckHessianSize(int64_t n) {
  if (n <= 0) return InvalidArgumentError("Hessian is empty");
  if (n > INT32_MAX) return InvalidArgumentError("Hessian is too large");
  return OkStatus();
}

}  // namespace

Status ValidateHessianOptions(const HessianOptions& o) {
  if (!std::isfinite(o.damp_percent) || o.damp_percent < 0) {
    return InvalidArgumentError("damp_percent must be finite and >= 0, got " +
                                FormatDouble(o.damp_percent));
  }
  if (!std::isfinite(o.damp_auto_increment) || o.damp_auto_increment < 0) {
    return InvalidArgumentError("damp_auto_increment must be finite and >= 0, got " +
                                FormatDouble(o.damp_auto_increment));
  }
  if (!std::isfinite(o.max_damp_percent) || o.max_damp_percent < 0) {
    return InvalidArgumentError("max_damp_percent must be finite and >= 0, got " +
                                FormatDouble(o.max_damp_percent));
  }
  return OkStatus();
}

Status CheckHessian(const Matrix& h) {
  if (h.rows != h.cols) {
    return InvalidArgumentError("Hessian must be square, got [" + std::to_string(h.rows) + ", " +
                                std::to_string(h.cols) + "]");
  }
  const int64_t n = h.rows;
  if (n <= 0) return InvalidArgumentError("Hessian is empty");
  if (static_cast<int64_t>(h.data.size()) != n * n) {
    return InvalidArgumentError("Hessian storage holds " + std::to_string(h.data.size()) +
                                " values, expected " + std::to_string(n * n));
  }
  QF_RETURN_IF_ERROR(CheckHessianSize(n));
  for (int64_t i = 0; i < n; ++i) {
    const float* row = h.row(i);
    for (int64_t j = 0; j < n; ++j) {
      if (!std::isfinite(row[j])) {
        return InvalidArgumentError("Hessian entry (" + std::to_string(i) + ", " +
                                    std::to_string(j) + ") is not finite");
      }
    }
    if (row[i] < 0) return NegativeDiagonalError(i, row[i]);
  }
  return OkStatus();
}

std::vector<float> HessianDiagonal(const Matrix& h) {
  std::vector<float> diagonal(static_cast<size_t>(h.rows));
  for (int64_t i = 0; i < h.rows; ++i) diagonal[i] = h(i, i);
  return diagonal;
}

StatusOr<HessianLayout> MakeHessianLayout(std::vector<float> diagonal, bool act_order) {
  const int64_t n = static_cast<int64_t>(diagonal.size());
  QF_RETURN_IF_ERROR(CheckHessianSize(n));
  for (int64_t i = 0; i < n; ++i) {
    if (diagonal[i] < 0) return NegativeDiagonalError(i, diagonal[i]);
  }
  HessianLayout out;
  out.n = n;
  // Dead columns: diag 0 becomes 1 (the solver zeroes the weight columns).
  for (int64_t i = 0; i < n; ++i) {
    if (diagonal[i] == 0.0f) {
      out.dead_columns.push_back(static_cast<int32_t>(i));
      diagonal[i] = 1.0f;
    }
  }
  out.perm.resize(static_cast<size_t>(n));
  std::iota(out.perm.begin(), out.perm.end(), 0);
  if (act_order) {
    // Descending diag(H); ties keep the original order.
    std::stable_sort(out.perm.begin(), out.perm.end(),
                     [&](int32_t a, int32_t b) { return diagonal[a] > diagonal[b]; });
  }
  double mean = 0;
  for (float d : diagonal) mean += d;
  out.mean_diagonal = mean / static_cast<double>(n);
  out.diagonal = std::move(diagonal);
  return out;
}

StatusOr<DampingOutcome> FactorWithDamping(const HessianOptions& options, double mean_diagonal,
                                           const std::function<Status(float)>& attempt) {
  DampingOutcome outcome;
  Status last;
  double damp = options.damp_percent;
  for (int k = 0;; ++k) {
    if (k > 0) {
      if (options.damp_auto_increment <= 0) break;
      const double next = options.damp_percent + k * options.damp_auto_increment;
      if (next > options.max_damp_percent * (1 + 1e-9) + 1e-12) break;
      damp = next;
    }
    outcome.cholesky_attempts = k + 1;
    last = attempt(static_cast<float>(damp * mean_diagonal));
    if (last.ok()) {
      outcome.damp_percent_used = damp;
      return outcome;
    }
    if (last.code() != StatusCode::kFailedPrecondition) return last;
  }
  return FailedPreconditionError(
      "Hessian is not positive definite even with damp_percent=" + FormatDouble(damp) + " after " +
      std::to_string(outcome.cholesky_attempts) + " attempt(s) (max_damp_percent=" +
      FormatDouble(options.max_damp_percent) + "): " + last.message());
}

StatusOr<PreparedHessian> PrepareHessian(const Matrix& h, const HessianOptions& options) {
  QF_RETURN_IF_ERROR(ValidateHessianOptions(options));
  QF_RETURN_IF_ERROR(CheckHessian(h));
  QF_ASSIGN_OR_RETURN(HessianLayout layout,
                      MakeHessianLayout(HessianDiagonal(h), options.act_order));
  const int64_t n = layout.n;
  const std::vector<int32_t>& perm = layout.perm;

  // work = J P sym(H) Pᵀ J + λI in float: work[a][b] = sym(H)[perm[n-1-a]][perm[n-1-b]],
  // rebuilt for every attempt (cheaper in memory than keeping a pristine copy).
  std::vector<float> work(static_cast<size_t>(n * n));
  auto fill = [&](float add) {
    // Gather rows: work[a][b] = h(pa, pb) with pa = perm[n-1-a] (row access only) ...
    ParallelFor(n, 16, [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        const float* hrow = h.row(perm[n - 1 - a]);
        float* dst = work.data() + a * n;
        for (int64_t b = 0; b < n; ++b) dst[b] = hrow[perm[n - 1 - b]];
      }
    });
    // ... then symmetrize in place, (W + Wᵀ)/2 tile by tile, and set the diagonal.
    constexpr int64_t kTile = 64;
    const int64_t tiles = (n + kTile - 1) / kTile;
    ParallelFor(tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int64_t a0 = ti * kTile, a1 = std::min(n, a0 + kTile);
        for (int64_t b0 = 0; b0 <= a0; b0 += kTile) {
          const int64_t b1 = std::min(n, b0 + kTile);
          for (int64_t a = a0; a < a1; ++a) {
            float* ra = work.data() + a * n;
            for (int64_t b = b0; b < std::min(b1, a); ++b) {
              float* ab = ra + b;
              float* ba = work.data() + b * n + a;
              const float v = 0.5f * (*ab + *ba);
              *ab = v;
              *ba = v;
            }
          }
        }
      }
    });
    for (int64_t a = 0; a < n; ++a) work[a * n + a] = layout.diagonal[perm[n - 1 - a]] + add;
  };
  QF_ASSIGN_OR_RETURN(const DampingOutcome outcome,
                      FactorWithDamping(options, layout.mean_diagonal, [&](float add) {
                        fill(add);
                        return FactorReversed(work, n);
                      }));
  PreparedHessian out;
  out.n = n;
  out.perm = std::move(layout.perm);
  out.dead_columns = std::move(layout.dead_columns);
  out.damp_percent_used = outcome.damp_percent_used;
  out.cholesky_attempts = outcome.cholesky_attempts;
  // U[k][l] = R⁻¹[n-1-k][n-1-l]: a 180° rotation, i.e. reversing the flat array.
  std::reverse(work.begin(), work.end());
  out.hinv_upper.rows = n;
  out.hinv_upper.cols = n;
  out.hinv_upper.data = std::move(work);
  return out;
}

HessianAccumulator::HessianAccumulator(int64_t in_features)
    : in_features_(std::max<int64_t>(in_features, 0)), h_(in_features_, in_features_) {}

Status HessianAccumulator::Add(const float* x, int64_t batch) {
  if (batch < 0) return InvalidArgumentError("batch must be >= 0, got " + std::to_string(batch));
  if (batch == 0) return OkStatus();
  if (in_features_ <= 0) return InvalidArgumentError("accumulator has no input features");
  if (x == nullptr) return InvalidArgumentError("activations pointer is null");
  const int64_t in = in_features_;
  for (int64_t r = 0; r < batch; ++r) {
    for (int64_t c = 0; c < in; ++c) {
      if (!std::isfinite(x[r * in + c])) {
        return InvalidArgumentError("activation (row " + std::to_string(r) + ", column " +
                                    std::to_string(c) + ") is not finite");
      }
    }
  }
  // H = n/(n+b) H + 2/(n+b) XᵀX, in slices of rows to bound the double copy of X.
  constexpr int64_t kSlice = 512;
  std::vector<double> xd(static_cast<size_t>(std::min(batch, kSlice) * in));
  for (int64_t r0 = 0; r0 < batch; r0 += kSlice) {
    const int64_t b = std::min(kSlice, batch - r0);
    for (int64_t i = 0; i < b * in; ++i) xd[i] = x[r0 * in + i];
    const int64_t n_new = n_ + b;
    const double beta = static_cast<double>(n_) / static_cast<double>(n_new);
    const double alpha = 2.0 / static_cast<double>(n_new);
    internal::SyrkLowerD(/*trans=*/true, in, b, alpha, xd.data(), in, beta, h_.data.data(), in);
    n_ = n_new;
  }
  internal::MirrorLowerToUpperD(h_.data.data(), in);
  return OkStatus();
}

Matrix HessianAccumulator::HessianF32() const {
  Matrix out(h_.rows, h_.cols);
  for (size_t i = 0; i < h_.data.size(); ++i) out.data[i] = static_cast<float>(h_.data[i]);
  return out;
}

}  // namespace qforge::quant

// Unblocked float64 GPTQ oracle: plain loops, written for obviousness, not speed.
#include "quant/reference/gptq_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

namespace qforge::quant::reference {
namespace {

using Dense = std::vector<std::vector<double>>;

Dense Zeros(int64_t r, int64_t c) {
  return Dense(static_cast<size_t>(r), std::vector<double>(static_cast<size_t>(c), 0.0));
}

// A = L Lᵀ; false when a pivot is not positive.
bool CholeskyLowerRef(const Dense& a, Dense& l) {
  const int64_t n = static_cast<int64_t>(a.size());
  l = Zeros(n, n);
  for (int64_t j = 0; j < n; ++j) {
    double s = a[j][j];
    for (int64_t k = 0; k < j; ++k) s -= l[j][k] * l[j][k];
    if (!(s > 0) || !std::isfinite(s)) return false;
    l[j][j] = std::sqrt(s);
    for (int64_t i = j + 1; i < n; ++i) {
      double t = a[i][j];
      for (int64_t k = 0; k < j; ++k) t -= l[i][k] * l[j][k];
      l[i][j] = t / l[j][j];
    }
  }
  return true;
}

// A⁻¹ from the lower Cholesky factor: L⁻ᵀ L⁻¹.
Dense CholeskyInverseRef(const Dense& l) {
  const int64_t n = static_cast<int64_t>(l.size());
  Dense x = Zeros(n, n);  // L⁻¹
  for (int64_t j = 0; j < n; ++j) {
    x[j][j] = 1.0 / l[j][j];
    for (int64_t i = j + 1; i < n; ++i) {
      double s = 0;
      for (int64_t k = j; k < i; ++k) s += l[i][k] * x[k][j];
      x[i][j] = -s / l[i][i];
    }
  }
  Dense inv = Zeros(n, n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t k = i; k < n; ++k) s += x[k][i] * x[k][j];
      inv[i][j] = s;
      inv[j][i] = s;
    }
  }
  return inv;
}

RefParams ParamsForRange(double xmin, double xmax, const GptqOptions& o) {
  const int maxq = (1 << o.bits) - 1;
  RefParams p;
  p.scale = (xmax - xmin) / maxq;
  if (o.sym) {
    p.zero = (maxq + 1) / 2;
    // The documented tie rule of quantizer.h: the negative extreme takes code 0.
    if (xmin < 0) p.scale *= 1.0 - 1.0 / 1048576.0;
    return p;
  }
  p.zero = static_cast<int>(std::clamp(std::nearbyint(-xmin / p.scale), 0.0, double(maxq)));
  if (o.v1_zero_compat && p.zero < 1) {
    p.zero = 1;
    p.scale = xmax / (maxq - 1);
  }
  return p;
}

}  // namespace

int RefQuantize(double x, const RefParams& p, int bits) {
  const int maxq = (1 << bits) - 1;
  const double q = std::nearbyint(x / p.scale) + p.zero;
  return static_cast<int>(std::clamp(q, 0.0, double(maxq)));
}

RefParams RefFindParams(const std::vector<double>& x, const GptqOptions& o) {
  double xmin = 0, xmax = 0;  // the range always includes 0
  for (double v : x) {
    xmin = std::min(xmin, v);
    xmax = std::max(xmax, v);
  }
  if (o.sym) {
    xmax = std::max(-xmin, xmax);
    // The reference keeps xmin = 0 for an all-positive group (compat quirk).
    if (xmin < 0 || !o.reference_compat) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  RefParams best = ParamsForRange(xmin, xmax, o);
  if (!o.mse) return best;
  const int sym_zero = best.zero;
  double best_err = std::numeric_limits<double>::infinity();
  for (int i = 0; i < static_cast<int>(0.8 * 100); ++i) {
    const double shrink = 1.0 - i / 100.0;
    RefParams c = ParamsForRange(shrink * xmin, shrink * xmax, o);
    if (o.sym) c.zero = sym_zero;
    double err = 0;
    for (double v : x) {
      const double q = c.scale * (RefQuantize(v, c, o.bits) - c.zero);
      err += std::pow(std::fabs(q - v), 2.4);
    }
    if (err < best_err) {
      best_err = err;
      best = c;
    }
  }
  return best;
}

StatusOr<GptqRefResult> GptqReference(const Matrix& w, const Matrix& h, const GptqOptions& o) {
  QF_RETURN_IF_ERROR(ValidateGptqOptions(o, w.rows, w.cols));
  const int64_t out = w.rows, n = w.cols;
  if (h.rows != n || h.cols != n) return InvalidArgumentError("Hessian shape does not match W");
  for (float v : w.data) {
    if (!std::isfinite(v)) return InvalidArgumentError("W is not finite");
  }
  for (float v : h.data) {
    if (!std::isfinite(v)) return InvalidArgumentError("Hessian is not finite");
  }

  // Symmetric H and W in double; dead columns.
  Dense hs = Zeros(n, n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) hs[i][j] = 0.5 * (double(h(i, j)) + double(h(j, i)));
  }
  Dense hd = hs;
  Dense wd = Zeros(out, n);
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t j = 0; j < n; ++j) wd[r][j] = w(r, j);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (hd[j][j] == 0) {
      hd[j][j] = 1;
      for (int64_t r = 0; r < out; ++r) wd[r][j] = 0;
    }
  }

  GptqRefResult res;
  const int64_t gs = o.group_size == -1 ? n : o.group_size;
  res.num_groups = (n + gs - 1) / gs;
  res.perm.resize(static_cast<size_t>(n));
  std::iota(res.perm.begin(), res.perm.end(), 0);
  if (o.act_order) {
    std::stable_sort(res.perm.begin(), res.perm.end(),
                     [&](int32_t a, int32_t b) { return hd[a][a] > hd[b][b]; });
  }
  const std::vector<int32_t>& perm = res.perm;

  res.scales.assign(static_cast<size_t>(res.num_groups * out), 0.0);
  res.zeros.assign(static_cast<size_t>(res.num_groups * out), 0);
  res.g_idx.assign(static_cast<size_t>(n), 0);
  for (int64_t k = 0; k < n; ++k) {
    res.g_idx[perm[k]] = static_cast<int32_t>(o.static_groups ? perm[k] / gs : k / gs);
  }
  if (o.static_groups) {
    // From the original W (dead columns zeroed), groups in original column order.
    for (int64_t g = 0; g < res.num_groups; ++g) {
      for (int64_t r = 0; r < out; ++r) {
        std::vector<double> x;
        for (int64_t j = g * gs; j < std::min(n, (g + 1) * gs); ++j) x.push_back(wd[r][j]);
        const RefParams p = RefFindParams(x, o);
        res.scales[g * out + r] = p.scale;
        res.zeros[g * out + r] = p.zero;
      }
    }
  }

  // Permute.
  Dense hp = Zeros(n, n), wp = Zeros(out, n);
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) hp[a][b] = hd[perm[a]][perm[b]];
  }
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t k = 0; k < n; ++k) wp[r][k] = wd[r][perm[k]];
  }

  // Damping with automatic increase; U = upper Cholesky factor of (H + damp I)⁻¹.
  double mean = 0;
  for (int64_t i = 0; i < n; ++i) mean += hp[i][i];
  mean /= n;
  const double max_damp = std::max(o.max_damp_percent, o.damp_percent);
  Dense u;
  bool ok = false;
  for (int attempt = 0; !ok; ++attempt) {
    const double damp = o.damp_percent + attempt * o.damp_auto_increment;
    if (attempt > 0 && (o.damp_auto_increment <= 0 || damp > max_damp * (1 + 1e-9) + 1e-12)) {
      return FailedPreconditionError("Hessian is not positive definite (reference)");
    }
    res.cholesky_attempts = attempt + 1;
    Dense m = hp;
    for (int64_t i = 0; i < n; ++i) m[i][i] += damp * mean;
    Dense l;
    if (!CholeskyLowerRef(m, l)) continue;
    const Dense inv = CholeskyInverseRef(l);
    Dense l2;
    if (!CholeskyLowerRef(inv, l2)) continue;
    u = Zeros(n, n);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = i; j < n; ++j) u[i][j] = l2[j][i];
    }
    res.damp_percent_used = damp;
    ok = true;
  }

  // Unblocked sweep.
  res.codes.assign(static_cast<size_t>(out * n), 0);
  res.dequant = MatrixD(out, n);
  Dense snapshot;
  double loss = 0;
  for (int64_t k = 0; k < n; ++k) {
    const bool stale = o.reference_compat || o.stale_group_params;
    if (stale && k % o.block_size == 0) snapshot = wp;  // the reference's global W
    const int64_t g = res.g_idx[perm[k]];
    if (!o.static_groups && k % gs == 0) {
      const Dense& src = stale ? snapshot : wp;
      for (int64_t r = 0; r < out; ++r) {
        std::vector<double> x(src[r].begin() + k, src[r].begin() + std::min(n, k + gs));
        const RefParams p = RefFindParams(x, o);
        res.scales[g * out + r] = p.scale;
        res.zeros[g * out + r] = p.zero;
      }
    }
    const double d = u[k][k];
    for (int64_t r = 0; r < out; ++r) {
      const RefParams p{res.scales[g * out + r], res.zeros[g * out + r]};
      const double x = wp[r][k];
      const int code = RefQuantize(x, p, o.bits);
      const double q = p.scale * (code - p.zero);
      const double err = (x - q) / d;
      res.codes[r * n + perm[k]] = static_cast<uint8_t>(code);
      res.dequant(r, perm[k]) = q;
      loss += err * err;
      for (int64_t j = k + 1; j < n; ++j) wp[r][j] -= err * u[k][j];
    }
  }
  res.proxy_loss = loss / 2;

  // tr(ΔW H ΔWᵀ) with the original (symmetrized) H.
  double oe = 0;
  std::vector<double> dw(static_cast<size_t>(n));
  for (int64_t r = 0; r < out; ++r) {
    for (int64_t j = 0; j < n; ++j) dw[j] = double(w(r, j)) - res.dequant(r, j);
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += hs[i][j] * dw[j];
      oe += dw[i] * s;
    }
  }
  res.output_error = oe;
  return res;
}

}  // namespace qforge::quant::reference

#include "quant/quantizer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "quant/multiversion.h"

namespace qforge::quant {
namespace {

// The MSE objective (CandidateError of quantizer_math.h) in an x86-64-v3 and a baseline
// clone: the eight partial sums vectorize, and the v3 clone contracts products into FMAs.
QF_MULTIVERSION float SearchObjective(const float* x, int64_t n, float scale, float zero,
                                      float maxq, float norm) {
  return CandidateError(x, n, scale, zero, maxq, norm);
}

}  // namespace

Status ValidateQuantizerOptions(const QuantizerOptions& o) {
  if (o.bits != 2 && o.bits != 3 && o.bits != 4 && o.bits != 8) {
    return InvalidArgumentError("bits must be 2, 3, 4 or 8, got " + std::to_string(o.bits));
  }
  if (!std::isfinite(o.mse_norm) || o.mse_norm <= 0) {
    return InvalidArgumentError("mse_norm must be finite and > 0");
  }
  if (o.mse_grid < 1) {
    return InvalidArgumentError("mse_grid must be >= 1, got " + std::to_string(o.mse_grid));
  }
  if (!(o.mse_max_shrink > 0 && o.mse_max_shrink <= 1)) {
    return InvalidArgumentError("mse_max_shrink must be in (0, 1]");
  }
  return OkStatus();
}

QuantizerSpec MakeQuantizerSpec(const QuantizerOptions& options) {
  QuantizerSpec q;
  q.maxq = MaxQ(options.bits);
  q.sym = options.sym;
  q.sym_keep_positive_xmin = options.sym_keep_positive_xmin;
  q.asym_zero_at_least_one = options.asym_zero_at_least_one;
  q.mse = options.mse;
  q.mse_norm = options.mse_norm;
  q.mse_grid = options.mse_grid;
  q.mse_candidates =
      static_cast<int>(static_cast<double>(options.mse_max_shrink) * options.mse_grid);
  return q;
}

QuantParams ParamsFromRange(float xmin, float xmax, const QuantizerOptions& options) {
  const QuantizerSpec q = MakeQuantizerSpec(options);
  const QuantRange r = AdjustRange(xmin, xmax, q);
  return ParamsForRange(r.xmin, r.xmax, q);
}

QuantParams FindQuantParams(const float* x, int64_t n, int64_t stride,
                            const QuantizerOptions& options) {
  const QuantizerSpec q = MakeQuantizerSpec(options);
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (n <= 0) lo = hi = 0;
  const QuantRange r = AdjustRange(lo, hi, q);
  const QuantParams minmax = ParamsForRange(r.xmin, r.xmax, q);
  if (!q.mse || n <= 0) return minmax;

  thread_local std::vector<float> buf;
  const float* v = x;
  if (stride != 1) {
    buf.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = x[i * stride];
    v = buf.data();
  }
  // The first candidate with the lowest objective (strictly below all earlier ones).
  QuantParams best = minmax;
  float best_err = std::numeric_limits<float>::infinity();
  for (int i = 0; i < q.mse_candidates; ++i) {
    const QuantParams c = MseCandidate(i, r, minmax, q);
    const float err = SearchObjective(v, n, c.scale, static_cast<float>(c.zero),
                                      static_cast<float>(q.maxq), q.mse_norm);
    if (err < best_err) {
      best_err = err;
      best = c;
    }
  }
  return best;
}

double QuantizationErrorNorm(const float* x, int64_t n, int64_t stride, const QuantParams& p,
                             int maxq, double norm) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    s += std::pow(std::fabs(static_cast<double>(QuantizeValue(v, p, maxq)) - v), norm);
  }
  return s;
}

}  // namespace qforge::quant

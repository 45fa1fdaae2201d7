#include "quant/quantizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define QF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define QF_MULTIVERSION
#endif

namespace qforge::quant {
namespace {

struct Range {
  float xmin;
  float xmax;
};

// The reference's range adjustments: include 0, symmetric widening, all-zero guard.
Range AdjustRange(float xmin, float xmax, const QuantizerOptions& o) {
  xmin = std::min(xmin, 0.0f);
  xmax = std::max(xmax, 0.0f);
  if (o.sym) {
    xmax = std::max(-xmin, xmax);
    if (xmin < 0 || !o.sym_keep_positive_xmin) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  return {xmin, xmax};
}

QuantParams ParamsForRange(float xmin, float xmax, int maxq, const QuantizerOptions& o) {
  QuantParams p;
  p.scale = (xmax - xmin) / static_cast<float>(maxq);
  if (o.sym) {
    p.zero = (maxq + 1) / 2;
    // xmin / scale = -maxq/2 is an exact tie; see kSymScaleNudge.
    if (xmin < 0) p.scale *= kSymScaleNudge;
    return p;
  }
  const float z = std::nearbyint(-xmin / p.scale);
  p.zero = static_cast<int32_t>(std::clamp(z, 0.0f, static_cast<float>(maxq)));
  if (o.asym_zero_at_least_one && p.zero < 1) {
    // Refit with zero = 1: the grid [-scale, (maxq-1) scale] still covers [xmin, xmax].
    p.zero = 1;
    p.scale = xmax / static_cast<float>(maxq - 1);
  }
  return p;
}

// Fast |a|^norm for a >= 0, relative error about 1e-6 (log2 by the atanh series on
// [sqrt(1/2), sqrt(2)), exp2 by a degree-7 polynomial on [-1/2, 1/2]). Branch-free so the
// search loop vectorizes.
inline float FastPow(float a, float norm) {
  uint32_t bits;
  std::memcpy(&bits, &a, sizeof(bits));
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xFFu) - 127);
  const uint32_t mbits = (bits & 0x7FFFFFu) | 0x3F800000u;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float ln_m =
      2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  float y = norm * (e + ln_m * 1.44269504f);
  y = std::max(y, -125.0f);
  y = std::min(y, 126.0f);
  const float k = std::floor(y + 0.5f);
  const float f = (y - k) * 0.693147181f;
  const float p =
      1.0f +
      f * (1.0f + f * (0.5f + f * (1.0f / 6 +
                                   f * (1.0f / 24 +
                                        f * (1.0f / 120 + f * (1.0f / 720 + f * (1.0f / 5040)))))));
  const uint32_t sbits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float s;
  std::memcpy(&s, &sbits, sizeof(s));
  const float r = p * s;
  return a > 0.0f ? r : 0.0f;
}

// Σ |dequant(q(x)) - x|^norm for one candidate grid, over contiguous values.
QF_MULTIVERSION float CandidateError(const float* x, int64_t n, float scale, float zero, float maxq,
                                     float norm) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: (v + kMagic) - kMagic rounds half-even
  constexpr float kLimit = 4194304.0f;   // 2^22: beyond it every code clamps anyway
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      float v = x[i + l] / scale;
      v = std::min(std::max(v, -kLimit), kLimit);
      const float r = (v + kMagic) - kMagic;
      const float q = std::min(std::max(r + zero, 0.0f), maxq);
      const float d = std::fabs(scale * (q - zero) - x[i + l]);
      acc[l] += FastPow(d, norm);
    }
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) {
    float v = x[i] / scale;
    v = std::min(std::max(v, -kLimit), kLimit);
    const float r = (v + kMagic) - kMagic;
    const float q = std::min(std::max(r + zero, 0.0f), maxq);
    s += FastPow(std::fabs(scale * (q - zero) - x[i]), norm);
  }
  return s;
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

QuantParams ParamsFromRange(float xmin, float xmax, const QuantizerOptions& options) {
  const Range r = AdjustRange(xmin, xmax, options);
  return ParamsForRange(r.xmin, r.xmax, MaxQ(options.bits), options);
}

QuantParams FindQuantParams(const float* x, int64_t n, int64_t stride,
                            const QuantizerOptions& options) {
  const int maxq = MaxQ(options.bits);
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i * stride];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (n <= 0) lo = hi = 0;
  const Range r = AdjustRange(lo, hi, options);
  QuantParams best = ParamsForRange(r.xmin, r.xmax, maxq, options);
  if (!options.mse || n <= 0) return best;

  thread_local std::vector<float> buf;
  const float* v = x;
  if (stride != 1) {
    buf.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = x[i * stride];
    v = buf.data();
  }
  const int candidates =
      static_cast<int>(static_cast<double>(options.mse_max_shrink) * options.mse_grid);
  float best_err = std::numeric_limits<float>::infinity();
  for (int i = 0; i < candidates; ++i) {
    const float p = static_cast<float>(1.0 - static_cast<double>(i) / options.mse_grid);
    QuantParams c = ParamsForRange(p * r.xmin, p * r.xmax, maxq, options);
    if (options.sym) c.zero = best.zero;
    const float err = CandidateError(v, n, c.scale, static_cast<float>(c.zero),
                                     static_cast<float>(maxq), options.mse_norm);
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

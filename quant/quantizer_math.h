// The scalar arithmetic of the min-max grid quantizer (quantizer.h describes the grid), defined
// once for the CPU solver (quantizer.cc, gptq.cc) and the CUDA GPTQ kernels (gptq_cuda.cu via
// cuda/gptq_kernels.cuh): the range adjustments, the grid parameters of a range, quantize /
// dequantize, the MSE search's candidates and objective. Both sides evaluate the same
// expressions in float, so group parameters and codes agree bit for bit; host_device.h says
// which operations that takes (UnfusedMul for the products the CPU rounds on their own).
//
// The loops over a group's values stay with the callers: FindQuantParams (quantizer.cc) walks
// them on one thread, the kernels spread the min/max and the candidate search over a warp.
//
// Thread-safety: pure functions.
#ifndef QFORGE_QUANT_QUANTIZER_MATH_H_
#define QFORGE_QUANT_QUANTIZER_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "quant/host_device.h"

namespace qforge::quant {

// See "Ties" in quantizer.h. Exactly representable in float.
constexpr float kSymScaleNudge = 1.0f - 1.0f / 1048576.0f;
static_assert(1.0f - kSymScaleNudge == 1.0f / 1048576.0f, "the nudge must be exact");

// Largest code, 2^bits - 1.
QF_HOST_DEVICE constexpr int MaxQ(int bits) { return (1 << bits) - 1; }
static_assert(MaxQ(8) <= UINT8_MAX, "codes are stored as uint8_t");

// The parameters of one row of one group.
struct QuantParams {
  float scale = 1.0f;  // > 0 and finite for finite inputs
  int32_t zero = 0;    // integer zero point in [0, maxq]
};
// Kernels read and write them in device arrays and pass them by value.
static_assert(std::is_trivially_copyable_v<QuantParams> && sizeof(QuantParams) == 8,
              "QuantParams is a plain pair of 32-bit values");

// QuantizerOptions (quantizer.h) resolved to what the arithmetic reads; MakeQuantizerSpec
// builds it. Trivially copyable, so a kernel takes it by value.
struct QuantizerSpec {
  int maxq = 15;  // 2^bits - 1
  bool sym = true;
  bool sym_keep_positive_xmin = false;
  bool asym_zero_at_least_one = false;
  bool mse = false;
  float mse_norm = 2.4f;
  int mse_grid = 100;
  int mse_candidates = 80;  // (int)(mse_max_shrink * mse_grid), computed in double
};
static_assert(std::is_trivially_copyable_v<QuantizerSpec>, "a kernel argument");

// A value range [xmin, xmax].
struct QuantRange {
  float xmin;
  float xmax;
};

// The reference's range adjustments of [xmin, xmax] (the group's min and max): include 0,
// widen symmetrically under sym (keeping xmin = 0 for an all-positive group with
// sym_keep_positive_xmin), and [-1, 1] for an all-zero group. NaN inputs follow std::min/max.
QF_HOST_DEVICE QuantRange AdjustRange(float xmin, float xmax, const QuantizerSpec& q) {
  xmin = std::min(xmin, 0.0f);
  xmax = std::max(xmax, 0.0f);
  if (q.sym) {
    xmax = std::max(-xmin, xmax);
    if (xmin < 0 || !q.sym_keep_positive_xmin) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  return {xmin, xmax};
}

// The min-max grid of an adjusted range (xmin <= 0 <= xmax, xmin < xmax): scale =
// (xmax - xmin) / maxq; sym: zero = 2^(bits-1) and the scale nudged when xmin < 0; asym: zero
// = round(-xmin / scale) clamped to [0, maxq], refitted to zero 1 under asym_zero_at_least_one.
QF_HOST_DEVICE QuantParams ParamsForRange(float xmin, float xmax, const QuantizerSpec& q) {
  QuantParams p;
  p.scale = (xmax - xmin) / static_cast<float>(q.maxq);
  if (q.sym) {
    p.zero = (q.maxq + 1) / 2;
    // xmin / scale = -maxq/2 is an exact tie; see kSymScaleNudge.
    if (xmin < 0) p.scale = UnfusedMul(p.scale, kSymScaleNudge);
    return p;
  }
  const float z = nearbyintf(-xmin / p.scale);
  p.zero = static_cast<int32_t>(std::clamp(z, 0.0f, static_cast<float>(q.maxq)));
  if (q.asym_zero_at_least_one && p.zero < 1) {
    // Refit with zero = 1: the grid [-scale, (maxq-1) scale] still covers [xmin, xmax].
    p.zero = 1;
    p.scale = xmax / static_cast<float>(q.maxq - 1);
  }
  return p;
}

// The code of x on the grid, clamp(round_half_even(x / scale) + zero, 0, maxq); NaN gives 0.
QF_HOST_DEVICE int QuantizeToCode(float x, const QuantParams& p, int maxq) {
  const float v = nearbyintf(x / p.scale) + static_cast<float>(p.zero);
  if (!(v > 0.0f)) return 0;  // also maps NaN to 0
  if (v > static_cast<float>(maxq)) return maxq;
  return static_cast<int>(v);
}

// scale * (code - zero).
QF_HOST_DEVICE float DequantizeCode(int code, const QuantParams& p) {
  return UnfusedMul(p.scale, static_cast<float>(code - p.zero));
}

// The dequantized value of x on the grid.
QF_HOST_DEVICE float QuantizeValue(float x, const QuantParams& p, int maxq) {
  return DequantizeCode(QuantizeToCode(x, p, maxq), p);
}

// Fast a^norm for a >= 0 (0 for a <= 0), relative error about 1e-6: log2 by the atanh series
// on [sqrt(1/2), sqrt(2)), exp2 by a degree-7 polynomial on [-1/2, 1/2]. Branch-free so the
// CPU's search loop vectorizes.
QF_HOST_DEVICE float FastPow(float a, float norm) {
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
  const float k = floorf(y + 0.5f);
  const float f = (y - k) * 0.693147181f;
  const float p =
      1.0f +
      f * (1.0f + f * (0.5f + f * (1.0f / 6 +
                                   f * (1.0f / 24 +
                                        f * (1.0f / 120 + f * (1.0f / 720 + f * (1.0f / 5040)))))));
  const uint32_t sbits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float s;
  std::memcpy(&s, &sbits, sizeof(s));
  const float r = UnfusedMul(p, s);
  return a > 0.0f ? r : 0.0f;
}

// The MSE search's objective for one candidate grid: Σ |dequant(q(x_i)) - x_i|^norm over the
// contiguous values x[0, n), in eight interleaved partial sums combined in a fixed order, then
// the tail. The codes are rounded by adding and subtracting 1.5·2^23 (round half to even)
// after clamping x / scale to ±2^22, beyond which every code clamps anyway.
QF_HOST_DEVICE float CandidateError(const float* x, int64_t n, float scale, float zero, float maxq,
                                    float norm) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: (v + kMagic) - kMagic rounds half-even
  constexpr float kLimit = 4194304.0f;   // 2^22
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int l = 0; l < 8; ++l) {
      float v = x[i + l] / scale;
      v = std::min(std::max(v, -kLimit), kLimit);
      const float r = (v + kMagic) - kMagic;
      const float q = std::min(std::max(r + zero, 0.0f), maxq);
      const float d = fabsf(scale * (q - zero) - x[i + l]);
      acc[l] += FastPow(d, norm);
    }
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) {
    float v = x[i] / scale;
    v = std::min(std::max(v, -kLimit), kLimit);
    const float r = (v + kMagic) - kMagic;
    const float q = std::min(std::max(r + zero, 0.0f), maxq);
    s += FastPow(fabsf(scale * (q - zero) - x[i]), norm);
  }
  return s;
}

// Candidate i (0 <= i < q.mse_candidates) of the MSE search: the adjusted range shrunk by
// p = 1 - i / mse_grid, with the min-max grid's zero under sym.
QF_HOST_DEVICE QuantParams MseCandidate(int i, const QuantRange& range, const QuantParams& minmax,
                                        const QuantizerSpec& q) {
  const float p = static_cast<float>(1.0 - static_cast<double>(i) / q.mse_grid);
  QuantParams c = ParamsForRange(UnfusedMul(p, range.xmin), UnfusedMul(p, range.xmax), q);
  if (q.sym) c.zero = minmax.zero;
  return c;
}

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_QUANTIZER_MATH_H_

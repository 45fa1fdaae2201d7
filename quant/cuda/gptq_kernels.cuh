// The min-max grid quantizer of quant/quantizer.{h,cc} as device functions, for the
// CUDA GPTQ backend (gptq_cuda.cu). Include only from .cu files.
//
// Every function mirrors its CPU counterpart operation for operation, so that the group
// parameters (and hence the codes) agree bit for bit wherever the CPU evaluates the same
// expressions in float: std::min/std::max keep their NaN behaviour ((b < a) ? b : a), the
// products that the CPU (compiled without FMA) rounds separately use __fmul_rn so nvcc
// cannot contract them, and the MSE objective keeps the CPU's eight interleaved partial sums
// and its order of combining them. Division and rintf are IEEE (no --use_fast_math).
// FindQuantParams is split into a warp-collective part (gptq_cuda.cu: the min/max reduction
// and the candidate search spread over the lanes) and the scalar pieces below.
//
// Thread-safety: pure device functions.
#ifndef QFORGE_QUANT_CUDA_GPTQ_KERNELS_CUH_
#define QFORGE_QUANT_CUDA_GPTQ_KERNELS_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "quant/quantizer.h"

namespace qforge::quant::gpu {

// QuantizerOptions in the form the kernels take it (by value, as a kernel argument).
struct DeviceQuantizer {
  int maxq = 15;  // 2^bits - 1
  bool sym = true;
  bool sym_keep_positive_xmin = false;
  bool asym_zero_at_least_one = false;
  bool mse = false;
  float mse_norm = 2.4f;
  int mse_grid = 100;
  int mse_candidates = 80;  // (int)(mse_max_shrink * mse_grid), computed on the host as the CPU
};

inline DeviceQuantizer MakeDeviceQuantizer(const QuantizerOptions& o) {
  DeviceQuantizer q;
  q.maxq = MaxQ(o.bits);
  q.sym = o.sym;
  q.sym_keep_positive_xmin = o.sym_keep_positive_xmin;
  q.asym_zero_at_least_one = o.asym_zero_at_least_one;
  q.mse = o.mse;
  q.mse_norm = o.mse_norm;
  q.mse_grid = o.mse_grid;
  q.mse_candidates = static_cast<int>(static_cast<double>(o.mse_max_shrink) * o.mse_grid);
  return q;
}

struct DeviceParams {
  float scale;
  int32_t zero;
};

struct DeviceRange {
  float xmin;
  float xmax;
};

// std::min / std::max, NaN behaviour included.
__device__ __forceinline__ float StdMin(float a, float b) { return (b < a) ? b : a; }
__device__ __forceinline__ float StdMax(float a, float b) { return (a < b) ? b : a; }

// quantizer.cc AdjustRange.
__device__ __forceinline__ DeviceRange AdjustRange(float xmin, float xmax,
                                                   const DeviceQuantizer& q) {
  xmin = StdMin(xmin, 0.0f);
  xmax = StdMax(xmax, 0.0f);
  if (q.sym) {
    xmax = StdMax(-xmin, xmax);
    if (xmin < 0 || !q.sym_keep_positive_xmin) xmin = -xmax;
  }
  if (xmin == 0 && xmax == 0) {
    xmin = -1;
    xmax = 1;
  }
  return {xmin, xmax};
}

// quantizer.cc ParamsForRange.
__device__ __forceinline__ DeviceParams ParamsForRange(float xmin, float xmax,
                                                       const DeviceQuantizer& q) {
  DeviceParams p;
  p.scale = (xmax - xmin) / static_cast<float>(q.maxq);
  if (q.sym) {
    p.zero = (q.maxq + 1) / 2;
    if (xmin < 0) p.scale = __fmul_rn(p.scale, kSymScaleNudge);
    return p;
  }
  const float z = rintf(-xmin / p.scale);
  const float hi = static_cast<float>(q.maxq);
  p.zero = static_cast<int32_t>(z < 0.0f ? 0.0f : (hi < z ? hi : z));  // std::clamp
  if (q.asym_zero_at_least_one && p.zero < 1) {
    p.zero = 1;
    p.scale = xmax / static_cast<float>(q.maxq - 1);
  }
  return p;
}

// quantizer.h QuantizeToCode.
__device__ __forceinline__ int QuantizeToCode(float x, DeviceParams p, int maxq) {
  const float v = rintf(x / p.scale) + static_cast<float>(p.zero);
  if (!(v > 0.0f)) return 0;
  if (v > static_cast<float>(maxq)) return maxq;
  return static_cast<int>(v);
}

// quantizer.h DequantizeCode, the product rounded on its own (as FillMetrics, which converts
// it to double, sees it).
__device__ __forceinline__ float DequantizeCode(int code, DeviceParams p) {
  return __fmul_rn(p.scale, static_cast<float>(code - p.zero));
}

// x - DequantizeCode(code, p) with one rounding: what the CPU sweep computes, whose x86-64-v3
// clone (target_clones in gptq.cc, chosen on every AVX2 host) contracts it into an FMA.
__device__ __forceinline__ float QuantizationResidual(float x, int code, DeviceParams p) {
  return fmaf(-p.scale, static_cast<float>(code - p.zero), x);
}

// quantizer.cc FastPow: |a|^norm for a >= 0, relative error about 1e-6.
__device__ __forceinline__ float FastPow(float a, float norm) {
  const uint32_t bits = __float_as_uint(a);
  float e = static_cast<float>(static_cast<int32_t>((bits >> 23) & 0xFFu) - 127);
  float m = __uint_as_float((bits & 0x7FFFFFu) | 0x3F800000u);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  const float t = (m - 1.0f) / (m + 1.0f);
  const float t2 = t * t;
  const float ln_m =
      2.0f * t * (1.0f + t2 * (1.0f / 3 + t2 * (1.0f / 5 + t2 * (1.0f / 7 + t2 * (1.0f / 9)))));
  float y = norm * (e + ln_m * 1.44269504f);
  y = StdMax(y, -125.0f);
  y = StdMin(y, 126.0f);
  const float k = floorf(y + 0.5f);
  const float f = (y - k) * 0.693147181f;
  const float p =
      1.0f +
      f * (1.0f + f * (0.5f + f * (1.0f / 6 +
                                   f * (1.0f / 24 +
                                        f * (1.0f / 120 + f * (1.0f / 720 + f * (1.0f / 5040)))))));
  const float s = __uint_as_float(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  const float r = __fmul_rn(p, s);
  return a > 0.0f ? r : 0.0f;
}

// quantizer.cc CandidateError: Σ |dequant(q(x)) - x|^norm over x[0, n), eight interleaved
// partial sums combined as the CPU combines them, then the tail.
__device__ __forceinline__ float CandidateError(const float* x, int64_t n, float scale, float zero,
                                                float maxq, float norm) {
  constexpr float kMagic = 12582912.0f;
  constexpr float kLimit = 4194304.0f;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma unroll
    for (int l = 0; l < 8; ++l) {
      float v = x[i + l] / scale;
      v = StdMin(StdMax(v, -kLimit), kLimit);
      const float r = __fsub_rn(__fadd_rn(v, kMagic), kMagic);
      const float q = StdMin(StdMax(r + zero, 0.0f), maxq);
      const float d = fabsf(scale * (q - zero) - x[i + l]);
      acc[l] += FastPow(d, norm);
    }
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) {
    float v = x[i] / scale;
    v = StdMin(StdMax(v, -kLimit), kLimit);
    const float r = __fsub_rn(__fadd_rn(v, kMagic), kMagic);
    const float q = StdMin(StdMax(r + zero, 0.0f), maxq);
    s += FastPow(fabsf(scale * (q - zero) - x[i]), norm);
  }
  return s;
}

// The candidate grid i of the MSE search (quantizer.cc FindQuantParams): the range shrunk
// by p = 1 - i/grid, with the min-max grid's zero under sym.
__device__ __forceinline__ DeviceParams MseCandidate(int i, DeviceRange r, DeviceParams minmax,
                                                     const DeviceQuantizer& q) {
  const float p = static_cast<float>(1.0 - static_cast<double>(i) / q.mse_grid);
  DeviceParams c = ParamsForRange(__fmul_rn(p, r.xmin), __fmul_rn(p, r.xmax), q);
  if (q.sym) c.zero = minmax.zero;
  return c;
}

}  // namespace qforge::quant::gpu

#endif  // QFORGE_QUANT_CUDA_GPTQ_KERNELS_CUH_

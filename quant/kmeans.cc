// Weighted k-means and the CPU nearest-centroid search. See kmeans.h for the contracts.
#include "quant/kmeans.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>

#include "quant/linalg.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QF_KMEANS_X86 1
#include <immintrin.h>
#define QF_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define QF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define QF_KMEANS_X86 0
#endif

namespace qforge::quant {

namespace {

// The argument checks of Assign / AssignTop2 (INVALID_ARGUMENT: n < 0, k outside
// [1, 2^31 − 1], d < 1, null x/c/idx when n > 0).
Status CheckSearchArgs(const float* x, int64_t n, const float* c, int64_t k, int d,
                       const int32_t* idx) {
  if (n < 0) return InvalidArgumentError("nearest-centroid search: n = " + std::to_string(n) + " < 0");
  if (k < 1 || k > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError("nearest-centroid search: k = " + std::to_string(k) +
                                " outside [1, 2^31 - 1]");
  }
  if (d < 1) return InvalidArgumentError("nearest-centroid search: d = " + std::to_string(d) + " < 1");
  if (n > 0 && (x == nullptr || c == nullptr || idx == nullptr)) {
    return InvalidArgumentError("nearest-centroid search: null x, c or idx");
  }
  return OkStatus();
}

}  // namespace

Status NearestCentroidSearch::Assign(const float* x, int64_t n, const float* c, int64_t k, int d,
                                     int32_t* idx, float* dist) {
  QF_RETURN_IF_ERROR(CheckSearchArgs(x, n, c, k, d, idx));
  return Search(x, n, c, k, d, idx, dist, nullptr);
}

Status NearestCentroidSearch::AssignTop2(const float* x, int64_t n, const float* c, int64_t k,
                                         int d, int32_t* idx, float* dist, float* second_dist) {
  if (!SupportsSecondNearest()) {
    return UnimplementedError(std::string("nearest-centroid search '") + name() +
                              "' does not implement AssignTop2");
  }
  QF_RETURN_IF_ERROR(CheckSearchArgs(x, n, c, k, d, idx));
  if (n > 0 && (dist == nullptr || second_dist == nullptr)) {
    return InvalidArgumentError("AssignTop2: null dist or second_dist");
  }
  return Search(x, n, c, k, d, idx, dist, second_dist);
}

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// ---- Random numbers (SplitMix64-seeded xoshiro256**; reproducible across platforms) -------

class KMeansRng {
 public:
  explicit KMeansRng(uint64_t seed) {
    uint64_t z = seed;
    for (uint64_t& s : s_) {
      z += 0x9E3779B97F4A7C15ull;
      uint64_t t = z;
      t = (t ^ (t >> 30)) * 0xBF58476D1CE4E5B9ull;
      t = (t ^ (t >> 27)) * 0x94D049BB133111EBull;
      s = t ^ (t >> 31);
    }
  }
  uint64_t Next() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }  // [0, 1)
  // Uniform integer in [0, bound), bound >= 1 (Lemire's nearly-divisionless method).
  uint64_t Below(uint64_t bound) {
    __uint128_t m = static_cast<__uint128_t>(Next()) * bound;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        m = static_cast<__uint128_t>(Next()) * bound;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// ---- The CPU search -------------------------------------------------------------------------

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa DetectIsa() {
#if QF_KMEANS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

constexpr int kPointBlock = 4;  // points per register block in the direct kernels

// Centroids in the layout the direct kernels read: blocks of L centroids, each block
// [d][L] holding −2·c transposed, and ‖c‖² per centroid (+inf for padding centroids, which
// therefore never win).
struct PackedCentroids {
  int lanes = 0;
  int64_t blocks = 0;
  std::vector<float> neg2c;  // [blocks][d][lanes]
  std::vector<float> norms;  // [blocks * lanes]
};

PackedCentroids PackCentroids(const float* c, int64_t k, int d, int lanes) {
  PackedCentroids p;
  p.lanes = lanes;
  p.blocks = (k + lanes - 1) / lanes;
  p.neg2c.assign(static_cast<size_t>(p.blocks * d * lanes), 0.0f);
  p.norms.assign(static_cast<size_t>(p.blocks * lanes), kInf);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t b = j / lanes;
    const int l = static_cast<int>(j % lanes);
    const float* cj = c + j * d;
    float norm = 0;
    for (int t = 0; t < d; ++t) {
      p.neg2c[static_cast<size_t>((b * d + t) * lanes + l)] = -2.0f * cj[t];
      norm += cj[t] * cj[t];
    }
    p.norms[static_cast<size_t>(j)] = norm;
  }
  return p;
}

// Running best of one point: value of ‖c‖² − 2x·c (not yet + ‖x‖²), its index, and the
// second best value.
struct Best {
  float v1 = kInf;
  float v2 = kInf;
  int32_t i1 = 0;
};

// Merges a candidate range result into `b` (ranges must be merged in increasing centroid
// order so that exact ties keep the lowest index).
inline void MergeBest(Best& b, const Best& o) {
  if (o.v1 < b.v1) {
    b.v2 = std::min(b.v1, o.v2);
    b.v1 = o.v1;
    b.i1 = o.i1;
  } else {
    b.v2 = std::min(b.v2, o.v1);
  }
}

// Reduces L lanes of (v1, i1, v2) to one Best: minimum v1 (lowest index on ties); the second
// is the minimum of every other lane's v1 and every lane's v2.
inline Best ReduceLanes(const float* v1, const int32_t* i1, const float* v2, int lanes) {
  Best b;
  int win = -1;
  for (int l = 0; l < lanes; ++l) {
    if (v1[l] < b.v1 || (v1[l] == b.v1 && win >= 0 && i1[l] < b.i1)) {
      b.v1 = v1[l];
      b.i1 = i1[l];
      win = l;
    }
  }
  for (int l = 0; l < lanes; ++l) {
    b.v2 = std::min(b.v2, v2[l]);
    if (l != win) b.v2 = std::min(b.v2, v1[l]);
  }
  return b;
}

// Scalar direct kernel: points xb [kPointBlock][d] (padded), centroid blocks [b0, b1).
template <int D>
void ScanScalar(const float* xb, int d_runtime, const PackedCentroids& pc, int64_t b0,
                int64_t b1, bool top2, Best* out) {
  const int d = D > 0 ? D : d_runtime;
  const int lanes = pc.lanes;
  for (int p = 0; p < kPointBlock; ++p) {
    const float* x = xb + p * d;
    Best best;
    for (int64_t b = b0; b < b1; ++b) {
      const float* cb = pc.neg2c.data() + b * d * lanes;
      const float* nb = pc.norms.data() + b * lanes;
      float acc[16];
      for (int l = 0; l < lanes; ++l) acc[l] = nb[l];
      for (int t = 0; t < d; ++t) {
        const float xt = x[t];
        const float* ct = cb + t * lanes;
        for (int l = 0; l < lanes; ++l) acc[l] += xt * ct[l];
      }
      for (int l = 0; l < lanes; ++l) {
        const float a = acc[l];
        if (a < best.v1) {
          best.v2 = best.v1;
          best.v1 = a;
          best.i1 = static_cast<int32_t>(b * lanes + l);
        } else if (top2 && a < best.v2) {
          best.v2 = a;
        }
      }
    }
    out[p] = best;
  }
}

#if QF_KMEANS_X86
template <int D, bool kTop2>
QF_TARGET_AVX512 void ScanAvx512(const float* xb, int d_runtime, const PackedCentroids& pc,
                                 int64_t b0, int64_t b1, Best* out) {
  const int d = D > 0 ? D : d_runtime;
  __m512 v1[kPointBlock], v2[kPointBlock];
  __m512i i1[kPointBlock];
  for (int p = 0; p < kPointBlock; ++p) {
    v1[p] = _mm512_set1_ps(kInf);
    v2[p] = _mm512_set1_ps(kInf);
    i1[p] = _mm512_setzero_si512();
  }
  __m512i cur = _mm512_add_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(b0 * 16)));
  const __m512i step = _mm512_set1_epi32(16);
  const float* neg2c = pc.neg2c.data();
  const float* norms = pc.norms.data();
  for (int64_t b = b0; b < b1; ++b) {
    const float* cb = neg2c + b * d * 16;
    const __m512 nrm = _mm512_loadu_ps(norms + b * 16);
#pragma GCC unroll 4
    for (int p = 0; p < kPointBlock; ++p) {
      const float* x = xb + p * d;
      __m512 a = nrm;
#pragma GCC unroll 16
      for (int t = 0; t < d; ++t) {
        a = _mm512_fmadd_ps(_mm512_set1_ps(x[t]), _mm512_loadu_ps(cb + t * 16), a);
      }
      if (kTop2) v2[p] = _mm512_mask_min_ps(v2[p], 0xFFFF, v2[p], _mm512_mask_max_ps(a, 0xFFFF, a, v1[p]));
      const __mmask16 m = _mm512_cmp_ps_mask(a, v1[p], _CMP_LT_OQ);
      v1[p] = _mm512_mask_mov_ps(v1[p], m, a);
      i1[p] = _mm512_mask_mov_epi32(i1[p], m, cur);
    }
    cur = _mm512_add_epi32(cur, step);
  }
  for (int p = 0; p < kPointBlock; ++p) {
    alignas(64) float fv1[16], fv2[16];
    alignas(64) int32_t fi1[16];
    _mm512_store_ps(fv1, v1[p]);
    _mm512_store_ps(fv2, v2[p]);
    _mm512_store_si512(reinterpret_cast<__m512i*>(fi1), i1[p]);
    out[p] = ReduceLanes(fv1, fi1, fv2, 16);
  }
}

template <int D, bool kTop2>
QF_TARGET_AVX2 void ScanAvx2(const float* xb, int d_runtime, const PackedCentroids& pc,
                             int64_t b0, int64_t b1, Best* out) {
  const int d = D > 0 ? D : d_runtime;
  __m256 v1[kPointBlock], v2[kPointBlock];
  __m256i i1[kPointBlock];
  for (int p = 0; p < kPointBlock; ++p) {
    v1[p] = _mm256_set1_ps(kInf);
    v2[p] = _mm256_set1_ps(kInf);
    i1[p] = _mm256_setzero_si256();
  }
  __m256i cur = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                 _mm256_set1_epi32(static_cast<int32_t>(b0 * 8)));
  const __m256i step = _mm256_set1_epi32(8);
  const float* neg2c = pc.neg2c.data();
  const float* norms = pc.norms.data();
  for (int64_t b = b0; b < b1; ++b) {
    const float* cb = neg2c + b * d * 8;
    const __m256 nrm = _mm256_loadu_ps(norms + b * 8);
#pragma GCC unroll 4
    for (int p = 0; p < kPointBlock; ++p) {
      const float* x = xb + p * d;
      __m256 a = nrm;
#pragma GCC unroll 16
      for (int t = 0; t < d; ++t) {
        a = _mm256_fmadd_ps(_mm256_set1_ps(x[t]), _mm256_loadu_ps(cb + t * 8), a);
      }
      if (kTop2) v2[p] = _mm256_min_ps(v2[p], _mm256_max_ps(a, v1[p]));
      const __m256 m = _mm256_cmp_ps(a, v1[p], _CMP_LT_OQ);
      v1[p] = _mm256_blendv_ps(v1[p], a, m);
      i1[p] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i1[p]),
                                                   _mm256_castsi256_ps(cur), m));
    }
    cur = _mm256_add_epi32(cur, step);
  }
  for (int p = 0; p < kPointBlock; ++p) {
    alignas(32) float fv1[8], fv2[8];
    alignas(32) int32_t fi1[8];
    _mm256_store_ps(fv1, v1[p]);
    _mm256_store_ps(fv2, v2[p]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(fi1), i1[p]);
    out[p] = ReduceLanes(fv1, fi1, fv2, 8);
  }
}
#endif  // QF_KMEANS_X86

using ScanFn = void (*)(const float* xb, int d, const PackedCentroids& pc, int64_t b0,
                        int64_t b1, bool top2, Best* out);

template <int D>
void ScanScalarFn(const float* xb, int d, const PackedCentroids& pc, int64_t b0, int64_t b1,
                  bool top2, Best* out) {
  ScanScalar<D>(xb, d, pc, b0, b1, top2, out);
}
#if QF_KMEANS_X86
template <int D>
void ScanAvx512Fn(const float* xb, int d, const PackedCentroids& pc, int64_t b0, int64_t b1,
                  bool top2, Best* out) {
  if (top2) {
    ScanAvx512<D, true>(xb, d, pc, b0, b1, out);
  } else {
    ScanAvx512<D, false>(xb, d, pc, b0, b1, out);
  }
}
template <int D>
void ScanAvx2Fn(const float* xb, int d, const PackedCentroids& pc, int64_t b0, int64_t b1,
                bool top2, Best* out) {
  if (top2) {
    ScanAvx2<D, true>(xb, d, pc, b0, b1, out);
  } else {
    ScanAvx2<D, false>(xb, d, pc, b0, b1, out);
  }
}
#endif

// Picks the kernel specialised for d (the VPTQ vector lengths and a few more), or the
// runtime-d version.
ScanFn SelectScan(Isa isa, int d) {
#define QF_SCAN_CASES(FN)    \
  switch (d) {               \
    case 1:                  \
      return FN<1>;          \
    case 2:                  \
      return FN<2>;          \
    case 3:                  \
      return FN<3>;          \
    case 4:                  \
      return FN<4>;          \
    case 6:                  \
      return FN<6>;          \
    case 8:                  \
      return FN<8>;          \
    case 10:                 \
      return FN<10>;         \
    case 12:                 \
      return FN<12>;         \
    case 16:                 \
      return FN<16>;         \
    default:                 \
      return FN<0>;          \
  }
#if QF_KMEANS_X86
  if (isa == Isa::kAvx512) QF_SCAN_CASES(ScanAvx512Fn)
  if (isa == Isa::kAvx2) QF_SCAN_CASES(ScanAvx2Fn)
#endif
  QF_SCAN_CASES(ScanScalarFn)
#undef QF_SCAN_CASES
}


class CpuNearestCentroidSearch final : public NearestCentroidSearch {
 public:
  explicit CpuNearestCentroidSearch(const CpuSearchOptions& options)
      : options_(options), isa_(DetectIsa()) {
    if (options_.max_isa == CpuSearchIsa::kScalar) isa_ = Isa::kScalar;
    if (options_.max_isa == CpuSearchIsa::kAvx2 && isa_ == Isa::kAvx512) isa_ = Isa::kAvx2;
    options_.point_tile = std::max<int64_t>(kPointBlock, options_.point_tile);
    options_.centroid_tile = std::max<int64_t>(16, options_.centroid_tile);
    name_ = std::string("cpu-");
    switch (options_.kernel) {
      case CpuSearchKernel::kGemm:
        name_ += "gemm";
        break;
      case CpuSearchKernel::kDirect:
        name_ += std::string("direct-") + IsaName(isa_);
        break;
      case CpuSearchKernel::kAuto:
        name_ += std::string("auto-") + IsaName(isa_);
        break;
    }
  }

  const char* name() const override { return name_.c_str(); }
  bool SupportsSecondNearest() const override { return true; }

 protected:
  Status Search(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
                float* dist, float* second_dist) override {
    return Run(x, n, c, k, d, idx, dist, second_dist);
  }

 private:
  bool UseGemm(int d) const {
    switch (options_.kernel) {
      case CpuSearchKernel::kGemm:
        return true;
      case CpuSearchKernel::kDirect:
        return false;
      case CpuSearchKernel::kAuto:
        return isa_ == Isa::kScalar || d > 32;
    }
    return false;
  }

  // Writes the outputs of points [i0, i1) from their Best values.
  static void Finish(const float* x, int64_t i0, int64_t i1, int d, const Best* best,
                     int32_t* idx, float* dist, float* second) {
    for (int64_t i = i0; i < i1; ++i) {
      const Best& b = best[i - i0];
      idx[i] = b.i1;
      if (dist != nullptr || second != nullptr) {
        const float* xi = x + i * d;
        float xn = 0;
        for (int t = 0; t < d; ++t) xn += xi[t] * xi[t];
        if (dist != nullptr) dist[i] = std::max(0.0f, xn + b.v1);
        if (second != nullptr) second[i] = b.v2 == kInf ? kInf : std::max(0.0f, xn + b.v2);
      }
    }
  }

  // Direct kernel over points [i0, i1) and centroid blocks [b0, b1); writes best[i - i0].
  void DirectRange(ScanFn scan, const float* x, int64_t i0, int64_t i1, int d,
                   const PackedCentroids& pc, int64_t b0, int64_t b1, bool top2,
                   Best* best) const {
    const int64_t tile_blocks = std::max<int64_t>(1, options_.centroid_tile / pc.lanes);
    std::vector<float> xb(static_cast<size_t>(kPointBlock * d), 0.0f);
    Best part[kPointBlock];
    for (int64_t i = i0; i < i1; ++i) best[i - i0] = Best();
    // Tile over centroids (outer) so a tile stays in cache while the points stream past.
    for (int64_t tb = b0; tb < b1; tb += tile_blocks) {
      const int64_t te = std::min(b1, tb + tile_blocks);
      for (int64_t p0 = i0; p0 < i1; p0 += kPointBlock) {
        const int64_t np = std::min<int64_t>(kPointBlock, i1 - p0);
        const float* xp = x + p0 * d;
        if (np < kPointBlock) {
          std::fill(xb.begin(), xb.end(), 0.0f);
          std::memcpy(xb.data(), xp, sizeof(float) * static_cast<size_t>(np * d));
          xp = xb.data();
        }
        scan(xp, d, pc, tb, te, top2, part);
        for (int64_t p = 0; p < np; ++p) MergeBest(best[p0 + p - i0], part[p]);
      }
    }
  }

  // GEMM kernel over points [i0, i1) and centroids [j0, j1).
  void GemmRange(const float* x, int64_t i0, int64_t i1, int d, const float* c,
                 const float* norms, int64_t j0, int64_t j1, bool top2, Best* best) const {
    const int64_t tn = std::min<int64_t>(options_.point_tile, i1 - i0);
    const int64_t tk = std::min<int64_t>(options_.centroid_tile, j1 - j0);
    std::vector<float> tile(static_cast<size_t>(std::max<int64_t>(1, tn * tk)));
    for (int64_t i = i0; i < i1; ++i) best[i - i0] = Best();
    for (int64_t a0 = i0; a0 < i1; a0 += tn) {
      const int64_t mn = std::min(tn, i1 - a0);
      for (int64_t c0 = j0; c0 < j1; c0 += tk) {
        const int64_t mk = std::min(tk, j1 - c0);
        Gemm(false, true, mn, mk, d, -2.0f, x + a0 * d, d, c + c0 * d, d, 0.0f, tile.data(), mk);
        for (int64_t r = 0; r < mn; ++r) {
          const float* g = tile.data() + r * mk;
          const float* nn = norms + c0;
          Best b;
          for (int64_t j = 0; j < mk; ++j) {
            const float v = g[j] + nn[j];
            if (v < b.v1) {
              b.v2 = b.v1;
              b.v1 = v;
              b.i1 = static_cast<int32_t>(c0 + j);
            } else if (top2 && v < b.v2) {
              b.v2 = v;
            }
          }
          MergeBest(best[a0 + r - i0], b);
        }
      }
    }
  }

  Status Run(const float* x, int64_t n, const float* c, int64_t k, int d, int32_t* idx,
             float* dist, float* second) const {
    if (n == 0) return OkStatus();
    const bool top2 = second != nullptr;
    const bool gemm = UseGemm(d);
    PackedCentroids pc;
    std::vector<float> norms;
    ScanFn scan = nullptr;
    int64_t units = 0;  // centroid blocks (direct) or centroids (gemm)
    if (gemm) {
      norms.resize(static_cast<size_t>(k));
      for (int64_t j = 0; j < k; ++j) {
        float s = 0;
        for (int t = 0; t < d; ++t) s += c[j * d + t] * c[j * d + t];
        norms[static_cast<size_t>(j)] = s;
      }
      units = k;
    } else {
      const int lanes = isa_ == Isa::kAvx512 ? 16 : 8;
      pc = PackCentroids(c, k, d, lanes);
      scan = SelectScan(isa_, d);
      units = pc.blocks;
    }
    auto range = [&](int64_t i0, int64_t i1, int64_t u0, int64_t u1, Best* best) {
      if (gemm) {
        GemmRange(x, i0, i1, d, c, norms.data(), u0, u1, top2, best);
      } else {
        DirectRange(scan, x, i0, i1, d, pc, u0, u1, top2, best);
      }
    };

    const int threads = options_.multithreaded ? NumThreads() : 1;
    const bool parallel = threads > 1 && n * k >= options_.min_parallel_pairs;
    const int64_t tile = options_.point_tile;
    if (!parallel || n >= 2 * threads * tile) {
      // Split the points: each work item owns [i0, i1) and all centroids.
      auto work = [&](int64_t chunk_begin, int64_t chunk_end) {
        std::vector<Best> best(static_cast<size_t>(tile));
        for (int64_t ch = chunk_begin; ch < chunk_end; ++ch) {
          const int64_t i0 = ch * tile;
          const int64_t i1 = std::min(n, i0 + tile);
          range(i0, i1, 0, units, best.data());
          Finish(x, i0, i1, d, best.data(), idx, dist, second);
        }
      };
      const int64_t chunks = (n + tile - 1) / tile;
      if (parallel) {
        ParallelFor(chunks, 1, work);
      } else {
        work(0, chunks);
      }
      return OkStatus();
    }
    // Few points, many centroids: split the centroids into one range per thread, then merge
    // the per-range winners in range order (lowest index on exact ties).
    const int64_t parts = std::min<int64_t>(threads, units);
    std::vector<std::vector<Best>> partial(static_cast<size_t>(parts),
                                           std::vector<Best>(static_cast<size_t>(n)));
    ParallelFor(parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t u0 = units * p / parts;
        const int64_t u1 = units * (p + 1) / parts;
        range(0, n, u0, u1, partial[static_cast<size_t>(p)].data());
      }
    });
    std::vector<Best> best = std::move(partial[0]);
    for (int64_t p = 1; p < parts; ++p) {
      for (int64_t i = 0; i < n; ++i) MergeBest(best[static_cast<size_t>(i)], partial[static_cast<size_t>(p)][static_cast<size_t>(i)]);
    }
    Finish(x, 0, n, d, best.data(), idx, dist, second);
    return OkStatus();
  }

  CpuSearchOptions options_;
  Isa isa_;
  std::string name_;
};

// ---- k-means helpers ----------------------------------------------------------------------

inline float SqDist(const float* a, const float* b, int d) {
  float s = 0;
  for (int t = 0; t < d; ++t) {
    const float e = a[t] - b[t];
    s += e * e;
  }
  return s;
}

// Distinct indices drawn uniformly from [0, n) (partial Fisher-Yates), in draw order.
std::vector<int64_t> SampleDistinct(int64_t n, int64_t m, KMeansRng& rng) {
  std::vector<int64_t> pool(static_cast<size_t>(n));
  std::iota(pool.begin(), pool.end(), 0);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng.Below(static_cast<uint64_t>(n - i)));
    std::swap(pool[static_cast<size_t>(i)], pool[static_cast<size_t>(j)]);
  }
  pool.resize(static_cast<size_t>(m));
  return pool;
}

// min-update of D² against one new centroid c over points stored transposed (xs [d][m], m a
// multiple of 16, padding points with weight 0); returns Σ w·D² over [i0, i1) (multiples of
// 16).
double UpdateMinDistScalar(const float* xs, int64_t m, int d, const float* c, const float* w,
                           float* dmin, int64_t i0, int64_t i1) {
  double total = 0;
  float tmp[16];
  for (int64_t a = i0; a < i1; a += 16) {
    for (int i = 0; i < 16; ++i) tmp[i] = 0;
    for (int t = 0; t < d; ++t) {
      const float ct = c[t];
      const float* xt = xs + t * m + a;
      for (int i = 0; i < 16; ++i) {
        const float diff = xt[i] - ct;
        tmp[i] += diff * diff;
      }
    }
    for (int i = 0; i < 16; ++i) {
      const float v = std::min(dmin[a + i], tmp[i]);
      dmin[a + i] = v;
      total += static_cast<double>(v) * w[a + i];
    }
  }
  return total;
}

#if QF_KMEANS_X86
QF_TARGET_AVX512 double UpdateMinDistAvx512(const float* xs, int64_t m, int d, const float* c,
                                            const float* w, float* dmin, int64_t i0,
                                            int64_t i1) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t a = i0; a < i1; a += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (int t = 0; t < d; ++t) {
      const __m512 diff = _mm512_sub_ps(_mm512_loadu_ps(xs + t * m + a), _mm512_set1_ps(c[t]));
      acc = _mm512_fmadd_ps(diff, diff, acc);
    }
    const __m512 old = _mm512_loadu_ps(dmin + a);
    const __m512 v = _mm512_mask_min_ps(old, 0xFFFF, old, acc);
    _mm512_storeu_ps(dmin + a, v);
    sum = _mm512_fmadd_ps(v, _mm512_loadu_ps(w + a), sum);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  double total = 0;
  for (float f : lanes) total += f;
  return total;
}
#endif

using UpdateFn = double (*)(const float*, int64_t, int, const float*, const float*, float*,
                            int64_t, int64_t);

UpdateFn SelectUpdate() {
#if QF_KMEANS_X86
  if (DetectIsa() == Isa::kAvx512) return UpdateMinDistAvx512;
#endif
  return UpdateMinDistScalar;
}

// The subsample, its weights and the first centre of the weighted k-means++ (the draws
// before the D² loop), from `rng`.
struct PlusPlusStart {
  std::vector<int64_t> sample;  // ascending indices into [0, n)
  std::vector<float> ws;        // [m] weights (all 1 when none is positive)
  double wsum = 0;
  int64_t first = 0;            // index into sample
};

PlusPlusStart StartKMeansPlusPlus(int64_t n, const float* w, int64_t k, int64_t max_samples,
                                  KMeansRng& rng) {
  PlusPlusStart st;
  if (max_samples > 0 && n > max_samples && max_samples >= k) {
    st.sample = SampleDistinct(n, max_samples, rng);
    std::sort(st.sample.begin(), st.sample.end());
  } else {
    st.sample.resize(static_cast<size_t>(n));
    std::iota(st.sample.begin(), st.sample.end(), 0);
  }
  const int64_t m = static_cast<int64_t>(st.sample.size());
  st.ws.resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    st.ws[static_cast<size_t>(i)] = w != nullptr ? w[st.sample[static_cast<size_t>(i)]] : 1.0f;
    st.wsum += st.ws[static_cast<size_t>(i)];
  }
  if (st.wsum <= 0) {  // the subsample drew only zero-weight points: fall back to uniform
    std::fill(st.ws.begin(), st.ws.end(), 1.0f);
    st.wsum = static_cast<double>(m);
  }
  // First centre: probability ∝ w.
  double r = rng.Uniform() * st.wsum;
  st.first = -1;
  for (int64_t i = 0; i < m && st.first < 0; ++i) {
    r -= static_cast<double>(st.ws[static_cast<size_t>(i)]);
    if (r < 0) st.first = i;
  }
  for (int64_t i = m - 1; i >= 0 && st.first < 0; --i) {  // rounding: last positive entry
    if (st.ws[static_cast<size_t>(i)] > 0) st.first = i;
  }
  if (st.first < 0) st.first = 0;
  return st;
}

// Centres chosen between cancellation checks of the k-means++ initialisation (~0.1 s at
// m = 262144, d = 8 on one core).
constexpr int64_t kPlusPlusCentresPerCheck = 1024;

// Weighted k-means++ (D²·w sampling) on a uniform subsample; returns indices into [0, n).
// Calls `progress` (when set) with 0.0 after every kPlusPlusCentresPerCheck centres: false
// stops with CANCELLED.
StatusOr<std::vector<int64_t>> KMeansPlusPlusIndices(const float* x, int64_t n, int d,
                                                     const float* w, int64_t k,
                                                     int64_t max_samples, KMeansRng& rng,
                                                     const SolveProgress& progress) {
  PlusPlusStart st = StartKMeansPlusPlus(n, w, k, max_samples, rng);
  const std::vector<int64_t>& sample = st.sample;
  const int64_t m = static_cast<int64_t>(sample.size());
  const int64_t mp = (m + 15) / 16 * 16;  // padded with zero-weight points
  std::vector<float> xs(static_cast<size_t>(mp * d), 0.0f);  // [d][mp]
  std::vector<float> ws(static_cast<size_t>(mp), 0.0f);
  for (int64_t i = 0; i < m; ++i) {
    const int64_t src = sample[static_cast<size_t>(i)];
    for (int t = 0; t < d; ++t) xs[static_cast<size_t>(t * mp + i)] = x[src * d + t];
    ws[static_cast<size_t>(i)] = st.ws[static_cast<size_t>(i)];
  }
  // Chunked prefix sums of w·D² so a draw costs O(chunks + chunk).
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (mp + kChunk - 1) / kChunk;
  std::vector<double> chunk_sum(static_cast<size_t>(chunks), 0.0);
  std::vector<float> dmin(static_cast<size_t>(mp), kInf);
  for (int64_t i = m; i < mp; ++i) dmin[static_cast<size_t>(i)] = 0;
  std::vector<char> taken(static_cast<size_t>(m), 0);
  std::vector<int64_t> chosen;
  chosen.reserve(static_cast<size_t>(k));
  const UpdateFn update = SelectUpdate();
  std::vector<float> cbuf(static_cast<size_t>(d));

  const int64_t first = st.first;
  // Each step is short (memory-bound, ~0.1 ms for m = 262144, d = 8): starting threads per
  // step costs more than it saves (measured 16.7 s vs 9.9 s single-threaded for k = 65536),
  // so only very large subsamples are split.
  const bool parallel = m * d >= (int64_t{1} << 24) && NumThreads() > 1;
  for (int64_t j = 0; j < k; ++j) {
    int64_t pick = first;
    if (j > 0) {
      double total = 0;
      for (double s : chunk_sum) total += s;
      if (total <= 0) {
        // Every remaining point coincides with a centre: any untaken point (duplicates).
        pick = -1;
        for (int64_t tries = 0; tries < 64 && pick < 0; ++tries) {
          const int64_t cand = static_cast<int64_t>(rng.Below(static_cast<uint64_t>(m)));
          if (!taken[static_cast<size_t>(cand)]) pick = cand;
        }
        if (pick < 0) pick = static_cast<int64_t>(rng.Below(static_cast<uint64_t>(m)));
      } else {
        double r = rng.Uniform() * total;
        int64_t ch = 0;
        while (ch < chunks - 1 && r >= chunk_sum[static_cast<size_t>(ch)]) {
          r -= chunk_sum[static_cast<size_t>(ch)];
          ++ch;
        }
        const int64_t a = ch * kChunk, e = std::min(mp, a + kChunk);
        pick = -1;
        int64_t last_positive = -1;
        for (int64_t i = a; i < e; ++i) {
          const double v = static_cast<double>(ws[static_cast<size_t>(i)]) * dmin[static_cast<size_t>(i)];
          if (v > 0) last_positive = i;
          r -= v;
          if (r < 0 && v > 0) {
            pick = i;
            break;
          }
        }
        if (pick < 0) pick = last_positive >= 0 ? last_positive : a;
      }
    }
    taken[static_cast<size_t>(pick)] = 1;
    chosen.push_back(sample[static_cast<size_t>(pick)]);
    if (j + 1 == k) break;
    if (progress && (j + 1) % kPlusPlusCentresPerCheck == 0 && !progress(0.0)) {
      return CancelledError("k-means cancelled during the k-means++ initialisation after " +
                            std::to_string(j + 1) + " of " + std::to_string(k) + " centres");
    }
    for (int t = 0; t < d; ++t) cbuf[static_cast<size_t>(t)] = xs[static_cast<size_t>(t * mp + pick)];
    auto run = [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const int64_t a = ch * kChunk, e = std::min(mp, a + kChunk);
        chunk_sum[static_cast<size_t>(ch)] =
            update(xs.data(), mp, d, cbuf.data(), ws.data(), dmin.data(), a, e);
      }
    };
    if (parallel) {
      ParallelFor(chunks, 1, run);
    } else {
      run(0, chunks);
    }
  }
  return chosen;
}

StatusOr<std::vector<int64_t>> InitialIndices(const float* x, int64_t n, int d, const float* w,
                                              const KMeansOptions& o) {
  const int64_t k = o.num_centroids;
  std::vector<int64_t> idx;
  if (n <= k) {
    idx.resize(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) idx[static_cast<size_t>(j)] = j % n;
    return idx;
  }
  KMeansRng rng(o.seed);
  switch (o.init) {
    case KMeansInit::kRandom:
      return SampleDistinct(n, k, rng);
    case KMeansInit::kKMeansPlusPlus:
      return KMeansPlusPlusIndices(x, n, d, w, k, o.init_max_samples, rng, o.progress);
  }
  return InvalidArgumentError("k-means: unknown init");
}

}  // namespace

Status ValidateKMeansInputs(const float* x, int64_t n, int d, const float* w,
                            const KMeansOptions& o) {
  if (x == nullptr) return InvalidArgumentError("k-means: null points");
  if (n < 1) return InvalidArgumentError("k-means: n = " + std::to_string(n) + " points; need >= 1");
  if (d < 1) return InvalidArgumentError("k-means: dimension d = " + std::to_string(d) + " < 1");
  if (o.num_centroids < 1 || o.num_centroids > std::numeric_limits<int32_t>::max()) {
    return InvalidArgumentError("k-means: num_centroids = " + std::to_string(o.num_centroids) +
                                " outside [1, 2^31 - 1]");
  }
  if (o.max_iterations < 0) {
    return InvalidArgumentError("k-means: max_iterations = " + std::to_string(o.max_iterations) + " < 0");
  }
  if (!(o.tol >= 0) || !std::isfinite(o.tol)) {
    return InvalidArgumentError("k-means: tol must be finite and >= 0");
  }
  if (o.init_max_samples < 0) return InvalidArgumentError("k-means: init_max_samples < 0");
  const int64_t total = n * d;
  for (int64_t i = 0; i < total; ++i) {
    if (!std::isfinite(x[i])) {
      return InvalidArgumentError("k-means: point " + std::to_string(i / d) + " coordinate " +
                                  std::to_string(i % d) + " is not finite");
    }
  }
  if (w != nullptr) {
    bool any = false;
    for (int64_t i = 0; i < n; ++i) {
      if (!(w[i] >= 0) || !std::isfinite(w[i])) {
        return InvalidArgumentError("k-means: weight " + std::to_string(i) +
                                    " is negative or not finite");
      }
      any = any || w[i] > 0;
    }
    if (!any) return InvalidArgumentError("k-means: all sample weights are zero");
  }
  return OkStatus();
}

std::vector<float> KMeansCenteringOffset(const float* x, int64_t n, int d, const float* weights,
                                         bool center) {
  std::vector<double> mean(static_cast<size_t>(d), 0.0);
  if (center) {
    double wsum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float wi = weights != nullptr ? weights[i] : 1.0f;
      wsum += wi;
      for (int t = 0; t < d; ++t) mean[static_cast<size_t>(t)] += static_cast<double>(wi) * x[i * d + t];
    }
    for (double& m : mean) m /= wsum;
  }
  return std::vector<float>(mean.begin(), mean.end());
}

int64_t RepairEmptyClusters(const std::vector<int64_t>& empties, const float* xc, int64_t n,
                            int d, const float* w, int32_t* a, float* dist,
                            KMeansClusterSums& cs, float* c,
                            std::vector<int64_t>* moved_points) {
  std::vector<std::pair<double, int64_t>> cands;
  for (int64_t i = 0; i < n; ++i) {
    if (w[i] > 0 && dist[i] > 0 && cs.npos[static_cast<size_t>(a[i])] >= 2) {
      cands.emplace_back(static_cast<double>(w[i]) * dist[i], i);
    }
  }
  auto better = [](const std::pair<double, int64_t>& p, const std::pair<double, int64_t>& q) {
    return p.first > q.first || (p.first == q.first && p.second < q.second);
  };
  // Sort lazily: a window large enough for the usual case, the rest only when it runs out.
  size_t window = std::min(cands.size(), empties.size() * 4 + 256);
  std::partial_sort(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(window), cands.end(),
                    better);
  size_t pos = 0;
  int64_t repaired = 0;
  for (const int64_t j : empties) {
    int64_t chosen = -1;
    while (chosen < 0) {
      if (pos == window) {
        if (window == cands.size()) break;
        std::sort(cands.begin() + static_cast<std::ptrdiff_t>(window), cands.end(), better);
        window = cands.size();
        continue;
      }
      const int64_t i = cands[pos++].second;
      if (cs.npos[static_cast<size_t>(a[i])] >= 2 && dist[i] > 0) chosen = i;
    }
    if (chosen < 0) continue;  // nothing to move: the centroid stays
    const int64_t old = a[chosen];
    const float* xi = xc + chosen * d;
    const float wi = w[chosen];
    for (int t = 0; t < d; ++t) cs.sums[static_cast<size_t>(old * d + t)] -= static_cast<double>(wi) * xi[t];
    cs.wsum[static_cast<size_t>(old)] -= wi;
    --cs.npos[static_cast<size_t>(old)];
    for (int t = 0; t < d; ++t) {
      c[old * d + t] = static_cast<float>(cs.sums[static_cast<size_t>(old * d + t)] / cs.wsum[static_cast<size_t>(old)]);
      c[j * d + t] = xi[t];
    }
    cs.wsum[static_cast<size_t>(j)] = wi;
    cs.npos[static_cast<size_t>(j)] = 1;
    a[chosen] = static_cast<int32_t>(j);
    dist[chosen] = 0;
    if (moved_points != nullptr) moved_points->push_back(chosen);
    ++repaired;
  }
  return repaired;
}

std::unique_ptr<NearestCentroidSearch> NewCpuNearestCentroidSearch(const CpuSearchOptions& options) {
  return std::make_unique<CpuNearestCentroidSearch>(options);
}

StatusOr<std::vector<float>> KMeansInitialCentroids(const float* x, int64_t n, int d,
                                                    const float* weights,
                                                    const KMeansOptions& options) {
  QF_RETURN_IF_ERROR(ValidateKMeansInputs(x, n, d, weights, options));
  QF_ASSIGN_OR_RETURN(std::vector<int64_t> idx, InitialIndices(x, n, d, weights, options));
  std::vector<float> c(idx.size() * static_cast<size_t>(d));
  for (size_t j = 0; j < idx.size(); ++j) {
    std::memcpy(c.data() + j * d, x + idx[j] * d, sizeof(float) * static_cast<size_t>(d));
  }
  return c;
}

KMeansPlusPlusDraws DrawKMeansPlusPlus(const float* weights, int64_t n,
                                       const KMeansOptions& options) {
  KMeansRng rng(options.seed);  // as InitialIndices
  PlusPlusStart st = StartKMeansPlusPlus(n, weights, options.num_centroids,
                                         options.init_max_samples, rng);
  KMeansPlusPlusDraws draws;
  draws.sample = std::move(st.sample);
  draws.weights = std::move(st.ws);
  draws.first = st.first;
  draws.uniforms.resize(static_cast<size_t>(std::max<int64_t>(options.num_centroids - 1, 0)));
  for (double& u : draws.uniforms) u = rng.Uniform();
  return draws;
}

Status ReportKMeansProgress(const KMeansOptions& options, int lloyd_steps, bool finished) {
  if (!options.progress) return OkStatus();
  const double assignments = static_cast<double>(options.max_iterations) + 1.0;
  const double fraction = finished ? 1.0 : (lloyd_steps + 1.0) / assignments;
  if (!finished && fraction >= 1.0) return OkStatus();  // the run stops: the final call says 1.0
  if (options.progress(fraction)) return OkStatus();
  return CancelledError("k-means cancelled after Lloyd step " + std::to_string(lloyd_steps) +
                        " of at most " + std::to_string(options.max_iterations));
}

StatusOr<KMeansResult> KMeans(const float* x, int64_t n, int d, const float* weights,
                              const KMeansOptions& options, NearestCentroidSearch* search,
                              const float* initial_centroids) {
  QF_RETURN_IF_ERROR(ValidateKMeansInputs(x, n, d, weights, options));
  const int64_t k = options.num_centroids;
  const size_t nd = static_cast<size_t>(n) * static_cast<size_t>(d);
  const size_t kd = static_cast<size_t>(k) * static_cast<size_t>(d);
  if (initial_centroids != nullptr) {
    for (size_t i = 0; i < kd; ++i) {
      if (!std::isfinite(initial_centroids[i])) {
        return InvalidArgumentError("k-means: initial centroid " + std::to_string(i / d) +
                                    " is not finite");
      }
    }
  }
  std::unique_ptr<NearestCentroidSearch> owned;
  if (search == nullptr) {
    owned = NewCpuNearestCentroidSearch();
    search = owned.get();
  }

  KMeansResult res;
  res.num_centroids = k;
  res.dim = d;
  auto t_init = std::chrono::steady_clock::now();

  // Weights (1 when absent) and the weighted mean used for centering.
  std::vector<float> w(static_cast<size_t>(n), 1.0f);
  if (weights != nullptr) std::copy(weights, weights + n, w.begin());
  const std::vector<float> meanf = KMeansCenteringOffset(x, n, d, weights, options.center);
  std::vector<float> xc(nd);
  for (int64_t i = 0; i < n; ++i) {
    for (int t = 0; t < d; ++t) xc[static_cast<size_t>(i * d + t)] = x[i * d + t] - meanf[static_cast<size_t>(t)];
  }

  // Initial centroids (chosen on the uncentred points so that KMeansInitialCentroids agrees).
  std::vector<float> c(kd);
  if (initial_centroids != nullptr) {
    for (size_t i = 0; i < kd; ++i) c[i] = initial_centroids[i] - meanf[i % static_cast<size_t>(d)];
  } else {
    QF_ASSIGN_OR_RETURN(std::vector<int64_t> idx, InitialIndices(x, n, d, weights, options));
    for (int64_t j = 0; j < k; ++j) {
      std::memcpy(c.data() + j * d, xc.data() + idx[static_cast<size_t>(j)] * d, sizeof(float) * static_cast<size_t>(d));
    }
  }
  res.init_seconds = Seconds(t_init);

  auto finish = [&](std::vector<float>& cent) {
    for (size_t i = 0; i < kd; ++i) cent[i] += meanf[i % static_cast<size_t>(d)];
    res.centroids = std::move(cent);
  };

  std::vector<int32_t> a(static_cast<size_t>(n), 0);
  std::vector<float> dist(static_cast<size_t>(n), 0.0f);   // exact ‖x − c_a‖²
  if (n <= k && initial_centroids == nullptr) {
    for (int64_t i = 0; i < n; ++i) a[static_cast<size_t>(i)] = static_cast<int32_t>(i);
    res.assignment = std::move(a);
    res.inertia = 0;
    res.inertia_history = {0.0};
    res.converged = true;
    QF_RETURN_IF_ERROR(ReportKMeansProgress(options, 0, true));
    finish(c);
    return res;
  }

  const bool prune = options.prune && search->SupportsSecondNearest();
  const int threads = NumThreads();
  auto par = [&](int64_t count, const std::function<void(int64_t, int64_t)>& fn) {
    if (threads > 1 && count >= 65536) {
      ParallelFor(count, 16384, fn);
    } else {
      fn(0, count);
    }
  };
  // Hamerly bounds (in distance, not squared): upper = exact distance to the own centroid,
  // lower = a lower bound on the distance to every other centroid.
  std::vector<float> lower(prune ? static_cast<size_t>(n) : 0, 0.0f);
  std::vector<float> xnorm2(prune ? static_cast<size_t>(n) : 0, 0.0f);
  if (prune) {
    for (int64_t i = 0; i < n; ++i) {
      float s = 0;
      for (int t = 0; t < d; ++t) s += xc[static_cast<size_t>(i * d + t)] * xc[static_cast<size_t>(i * d + t)];
      xnorm2[static_cast<size_t>(i)] = s;
    }
  }
  std::vector<float> cnorm_max_buf;
  auto max_centroid_norm2 = [&]() {
    float mx = 0;
    for (int64_t j = 0; j < k; ++j) {
      float s = 0;
      for (int t = 0; t < d; ++t) s += c[static_cast<size_t>(j * d + t)] * c[static_cast<size_t>(j * d + t)];
      mx = std::max(mx, s);
    }
    return mx;
  };
  // Margin for the float32 expansion error of a squared distance.
  const float eps_rel = 4.0f * static_cast<float>(d + 2) * std::numeric_limits<float>::epsilon();

  // Buffers for the points given to the search.
  std::vector<int64_t> cand;
  std::vector<float> cand_x;
  std::vector<int32_t> cand_idx;
  std::vector<float> cand_d1, cand_d2;

  auto full_assign = [&]() -> Status {
    auto t = std::chrono::steady_clock::now();
    res.searched_points += n;
    if (prune) {
      cand_d2.resize(static_cast<size_t>(n));
      QF_RETURN_IF_ERROR(search->AssignTop2(xc.data(), n, c.data(), k, d, a.data(), dist.data(), cand_d2.data()));
      const float cmax = max_centroid_norm2();
      par(n, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const size_t s = static_cast<size_t>(i);
          dist[s] = SqDist(xc.data() + i * d, c.data() + static_cast<int64_t>(a[s]) * d, d);
          const float margin = eps_rel * (xnorm2[s] + cmax);
          lower[s] = std::sqrt(std::max(0.0f, cand_d2[s] - margin));
        }
      });
    } else {
      QF_RETURN_IF_ERROR(search->Assign(xc.data(), n, c.data(), k, d, a.data(), nullptr));
      par(n, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          dist[static_cast<size_t>(i)] = SqDist(xc.data() + i * d, c.data() + static_cast<int64_t>(a[static_cast<size_t>(i)]) * d, d);
        }
      });
    }
    res.assign_seconds += Seconds(t);
    return OkStatus();
  };

  auto weighted_inertia = [&]() {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(w[static_cast<size_t>(i)]) * dist[static_cast<size_t>(i)];
    return s;
  };

  QF_RETURN_IF_ERROR(full_assign());
  double inertia = weighted_inertia();
  res.inertia_history.push_back(inertia);
  QF_RETURN_IF_ERROR(ReportKMeansProgress(options, 0, false));

  KMeansClusterSums cs;
  cs.sums.resize(kd);
  cs.wsum.resize(static_cast<size_t>(k));
  cs.npos.resize(static_cast<size_t>(k));
  std::vector<float> c_old(kd);
  std::vector<float> drift(static_cast<size_t>(k));
  std::vector<int32_t> a_old(static_cast<size_t>(n));
  std::vector<int64_t> repaired_points;

  for (int it = 0; it < options.max_iterations; ++it) {
    auto t_upd = std::chrono::steady_clock::now();
    // ---- Update: weighted means.
    std::fill(cs.sums.begin(), cs.sums.end(), 0.0);
    std::fill(cs.wsum.begin(), cs.wsum.end(), 0.0);
    std::fill(cs.npos.begin(), cs.npos.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const float wi = w[static_cast<size_t>(i)];
      if (wi <= 0) continue;
      const int64_t j = a[static_cast<size_t>(i)];
      double* sj = cs.sums.data() + j * d;
      const float* xi = xc.data() + i * d;
      for (int t = 0; t < d; ++t) sj[t] += static_cast<double>(wi) * xi[t];
      cs.wsum[static_cast<size_t>(j)] += wi;
      ++cs.npos[static_cast<size_t>(j)];
    }
    c_old = c;
    std::vector<int64_t> empties;
    for (int64_t j = 0; j < k; ++j) {
      if (cs.wsum[static_cast<size_t>(j)] > 0) {
        for (int t = 0; t < d; ++t) c[static_cast<size_t>(j * d + t)] = static_cast<float>(cs.sums[static_cast<size_t>(j * d + t)] / cs.wsum[static_cast<size_t>(j)]);
      } else {
        empties.push_back(j);
      }
    }
    // ---- Empty-cluster repair (see kmeans.h for the rule).
    bool repaired_any = false;
    if (!empties.empty()) {
      repaired_points.clear();
      const int64_t repaired = RepairEmptyClusters(empties, xc.data(), n, d, w.data(), a.data(),
                                                   dist.data(), cs, c.data(), &repaired_points);
      res.empty_clusters_repaired += repaired;
      repaired_any = repaired > 0;
      if (prune) {
        for (const int64_t i : repaired_points) lower[static_cast<size_t>(i)] = 0;  // forces a search
      }
    }
    res.update_seconds += Seconds(t_upd);

    // ---- Assignment against the new centroids.
    a_old = a;
    if (!prune) {
      QF_RETURN_IF_ERROR(full_assign());
    } else {
      auto t = std::chrono::steady_clock::now();
      float max1 = 0, max2 = 0;
      int64_t arg1 = -1;
      for (int64_t j = 0; j < k; ++j) {
        const float dj = std::sqrt(SqDist(c.data() + j * d, c_old.data() + j * d, d));
        drift[static_cast<size_t>(j)] = dj;
        if (dj > max1) {
          max2 = max1;
          max1 = dj;
          arg1 = j;
        } else if (dj > max2) {
          max2 = dj;
        }
      }
      const float cmax = max_centroid_norm2();
      // Step 1 (Hamerly): exact distance to the own centroid; the lower bound on every other
      // centroid shrinks by the largest drift of any other centroid. A point still below its
      // bound keeps its centroid without a search.
      std::vector<char> need(static_cast<size_t>(n), 0);
      par(n, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const size_t s = static_cast<size_t>(i);
          const int64_t own = a[s];
          const float bound = lower[s] - ((own == arg1) ? max2 : max1);
          const float d2 = SqDist(xc.data() + i * d, c.data() + own * d, d);
          dist[s] = d2;
          if (std::sqrt(d2) <= bound) {
            lower[s] = bound;
          } else {
            need[s] = 1;  // lower[s] keeps the bound for the unmoved centroids
          }
        }
      });
      cand.clear();
      for (int64_t i = 0; i < n; ++i) {
        if (need[static_cast<size_t>(i)]) cand.push_back(i);
      }
      // Step 2: most centroids do not move in later iterations (their members did not
      // change), and the old bound still holds for every unmoved centroid. So search the
      // moved centroids only; a point whose nearest candidate (own or moved) is within its
      // bound is settled exactly, the others fall back to a full search (step 3).
      std::vector<int32_t> moved;
      for (int64_t j = 0; j < k; ++j) {
        if (drift[static_cast<size_t>(j)] > 0) moved.push_back(static_cast<int32_t>(j));
      }
      const int64_t km = static_cast<int64_t>(moved.size());
      auto gather = [&](const std::vector<int64_t>& pts) {
        const int64_t np = static_cast<int64_t>(pts.size());
        cand_x.resize(static_cast<size_t>(np * d));
        cand_idx.resize(static_cast<size_t>(np));
        cand_d1.resize(static_cast<size_t>(np));
        cand_d2.resize(static_cast<size_t>(np));
        for (int64_t q = 0; q < np; ++q) {
          std::memcpy(cand_x.data() + q * d, xc.data() + pts[static_cast<size_t>(q)] * d, sizeof(float) * static_cast<size_t>(d));
        }
      };
      std::vector<int64_t> full;
      if (km > 0 && km * 10 < k * 9 && !cand.empty()) {
        std::vector<float> cm(static_cast<size_t>(km * d));
        for (int64_t q = 0; q < km; ++q) {
          std::memcpy(cm.data() + q * d, c.data() + static_cast<int64_t>(moved[static_cast<size_t>(q)]) * d, sizeof(float) * static_cast<size_t>(d));
        }
        const int64_t nc = static_cast<int64_t>(cand.size());
        gather(cand);
        QF_RETURN_IF_ERROR(search->AssignTop2(cand_x.data(), nc, cm.data(), km, d, cand_idx.data(),
                                              cand_d1.data(), cand_d2.data()));
        res.searched_points += (nc * km + k - 1) / k;  // in full-search equivalents
        std::vector<char> fallback(static_cast<size_t>(nc), 0);
        par(nc, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            const size_t s = static_cast<size_t>(cand[static_cast<size_t>(q)]);
            const float margin = eps_rel * (xnorm2[s] + cmax);
            const int64_t j1 = moved[static_cast<size_t>(cand_idx[static_cast<size_t>(q)])];
            const float e1sq = SqDist(xc.data() + static_cast<int64_t>(s) * d, c.data() + j1 * d, d);
            const float e1 = std::sqrt(e1sq);
            const float b1 = std::sqrt(std::max(0.0f, cand_d1[static_cast<size_t>(q)] - margin));
            const float b2 = std::sqrt(std::max(0.0f, cand_d2[static_cast<size_t>(q)] - margin));
            const float u = std::sqrt(dist[s]);
            const float l = lower[s];  // holds for every unmoved centroid other than the own
            const bool own_moved = drift[static_cast<size_t>(a[s])] > 0;
            if (!own_moved && u <= l && u <= e1) {
              lower[s] = std::min(l, b1);  // keep
            } else if (e1 <= l && (own_moved || e1 < u)) {
              if (!own_moved) {
                lower[s] = std::min(std::min(l, u), b2);
              } else {
                lower[s] = std::min(l, b2);
              }
              a[s] = static_cast<int32_t>(j1);
              dist[s] = e1sq;
            } else {
              fallback[static_cast<size_t>(q)] = 1;
            }
          }
        });
        for (int64_t q = 0; q < nc; ++q) {
          if (fallback[static_cast<size_t>(q)]) full.push_back(cand[static_cast<size_t>(q)]);
        }
      } else {
        full = cand;
      }
      // Step 3: full search for the rest.
      const int64_t nf = static_cast<int64_t>(full.size());
      if (nf > 0) {
        gather(full);
        QF_RETURN_IF_ERROR(search->AssignTop2(cand_x.data(), nf, c.data(), k, d, cand_idx.data(),
                                              cand_d1.data(), cand_d2.data()));
        res.searched_points += nf;
        par(nf, [&](int64_t q0, int64_t q1) {
          for (int64_t q = q0; q < q1; ++q) {
            const size_t s = static_cast<size_t>(full[static_cast<size_t>(q)]);
            const int32_t j = cand_idx[static_cast<size_t>(q)];
            a[s] = j;
            dist[s] = SqDist(xc.data() + static_cast<int64_t>(s) * d, c.data() + static_cast<int64_t>(j) * d, d);
            const float margin = eps_rel * (xnorm2[s] + cmax);
            lower[s] = std::sqrt(std::max(0.0f, cand_d2[static_cast<size_t>(q)] - margin));
          }
        });
      }
      res.assign_seconds += Seconds(t);
    }
    const double new_inertia = weighted_inertia();
    res.inertia_history.push_back(new_inertia);
    res.iterations = it + 1;
    bool changed = repaired_any;
    if (!changed) {
      for (int64_t i = 0; i < n && !changed; ++i) changed = a[static_cast<size_t>(i)] != a_old[static_cast<size_t>(i)];
    }
    const double prev = inertia;
    inertia = new_inertia;
    if (!changed || (options.tol > 0 && prev - new_inertia <= options.tol * prev) || new_inertia == 0) {
      res.converged = true;
      break;
    }
    QF_RETURN_IF_ERROR(ReportKMeansProgress(options, it + 1, false));
  }
  QF_RETURN_IF_ERROR(ReportKMeansProgress(options, res.iterations, true));
  res.inertia = inertia;
  res.assignment = std::move(a);
  finish(c);
  return res;
}

}  // namespace qforge::quant

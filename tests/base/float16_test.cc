// Exhaustive checks of base/float16.h against independent, slow references:
// every binary16 and bfloat16 value round-trips; float32 -> half/bfloat16 rounds to the
// nearest representable value with ties to even, checked at every midpoint between
// adjacent values, one float32 ulp either side of it, and on a dense sample of all float32
// bit patterns.
#include "base/float16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace qforge::quant {
namespace {

// binary16 value from its fields, computed with ldexp (independent of the bit tricks).
double HalfValueRef(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int exp = (h >> 10) & 0x1F;
  const int mant = h & 0x3FF;
  if (exp == 0x1F) {
    return mant ? std::numeric_limits<double>::quiet_NaN()
                : sign * std::numeric_limits<double>::infinity();
  }
  if (exp == 0) return sign * std::ldexp(mant, -24);
  return sign * std::ldexp(1024 + mant, exp - 25);
}

// All finite non-negative binary16 values in increasing order (index == bit pattern).
std::vector<double> NonNegativeHalves() {
  std::vector<double> v;
  for (uint32_t h = 0; h < 0x7C00; ++h) v.push_back(HalfValueRef(static_cast<uint16_t>(h)));
  return v;
}

// Nearest binary16 to `x` (round to nearest, ties to even, overflow to infinity), by
// searching the table of values. Returns bits.
uint16_t NearestHalfRef(float x, const std::vector<double>& halves) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(x));
  // Values at or above 65520 (the midpoint between 65504 and the next step 65536) overflow.
  if (a >= 65520.0) return sign | 0x7C00;
  size_t hi =
      static_cast<size_t>(std::lower_bound(halves.begin(), halves.end(), a) - halves.begin());
  if (hi < halves.size() && halves[hi] == a) return sign | static_cast<uint16_t>(hi);
  const size_t lo = hi - 1;                                          // a > 0 here, so hi >= 1
  if (hi == halves.size()) return sign | static_cast<uint16_t>(lo);  // 65504 < a < 65520
  const double dlo = a - halves[lo], dhi = halves[hi] - a;
  if (dlo < dhi) return sign | static_cast<uint16_t>(lo);
  if (dhi < dlo) return sign | static_cast<uint16_t>(hi);
  return sign | static_cast<uint16_t>((lo & 1) ? hi : lo);  // tie: even mantissa
}

// Nearest bfloat16 (ties to even) by comparing distances in double.
uint16_t NearestBFloat16Ref(float x) {
  const uint32_t bits = FloatBits(x);
  const uint32_t lo_bits = bits & 0xFFFF0000u;
  const uint32_t hi_bits = lo_bits + 0x10000u;  // next magnitude (may be infinity)
  const double a = std::fabs(static_cast<double>(x));
  const double lo = std::fabs(static_cast<double>(BitsToFloat(lo_bits)));
  double hi = std::fabs(static_cast<double>(BitsToFloat(hi_bits)));
  // Rounding past FLT_MAX's bfloat16 (0x7F7F) behaves as if the next step existed.
  if (std::isinf(hi)) hi = std::ldexp(1.0, 128);
  const double dlo = a - lo, dhi = hi - a;
  if (dlo < dhi) return static_cast<uint16_t>(lo_bits >> 16);
  if (dhi < dlo) return static_cast<uint16_t>(hi_bits >> 16);
  return static_cast<uint16_t>(((lo_bits >> 16) & 1) ? hi_bits >> 16 : lo_bits >> 16);
}

TEST(Float16Test, EveryHalfRoundTripsAndMatchesItsValue) {
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f = HalfToFloat(bits);
    const double ref = HalfValueRef(bits);
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      const uint16_t back = FloatToHalf(f);
      ASSERT_EQ(back & 0x7C00, 0x7C00) << std::hex << h;  // still NaN
      ASSERT_NE(back & 0x3FF, 0) << std::hex << h;
      ASSERT_EQ(back & 0x8000, bits & 0x8000) << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), ref) << std::hex << h;
    ASSERT_EQ(std::signbit(f), (bits & 0x8000) != 0) << std::hex << h;  // -0 stays -0
    ASSERT_EQ(FloatToHalf(f), bits) << std::hex << h;
  }
}

TEST(Float16Test, MidpointsRoundToEvenAndNeighboursToNearest) {
  const std::vector<double> halves = NonNegativeHalves();
  for (uint32_t lo = 0; lo + 1 < halves.size(); ++lo) {
    // The midpoint of two adjacent halves needs 12 significant bits: exact in float32.
    const float mid = static_cast<float>((halves[lo] + halves[lo + 1]) / 2);
    ASSERT_EQ(static_cast<double>(mid), (halves[lo] + halves[lo + 1]) / 2);
    const uint16_t even = static_cast<uint16_t>((lo & 1) ? lo + 1 : lo);
    ASSERT_EQ(FloatToHalf(mid), even) << "midpoint above " << std::hex << lo;
    ASSERT_EQ(FloatToHalf(-mid), 0x8000 | even) << std::hex << lo;
    ASSERT_EQ(FloatToHalf(std::nextafter(mid, 0.0f)), lo) << std::hex << lo;
    ASSERT_EQ(FloatToHalf(std::nextafter(mid, 1e9f)), lo + 1) << std::hex << lo;
  }
}

TEST(Float16Test, OverflowAndUnderflowBoundaries) {
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7BFF);
  EXPECT_EQ(FloatToHalf(std::nextafter(65520.0f, 0.0f)), 0x7BFF);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7C00);  // halfway to 65536: ties to even = infinity
  EXPECT_EQ(FloatToHalf(-65520.0f), 0xFC00);
  EXPECT_EQ(FloatToHalf(1e10f), 0x7C00);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);  // halfway to it: even (zero)
  EXPECT_EQ(FloatToHalf(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(FloatToHalf(std::ldexp(3.0f, -26)), 0x0001);  // 0.75 of the smallest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 subnormal steps: tie to even
  EXPECT_EQ(FloatToHalf(std::ldexp(5.0f, -25)), 0x0002);  // 2.5 steps: tie to even
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(std::numeric_limits<float>::denorm_min()), 0x0000);
}

TEST(Float16Test, SampledFloatsMatchNearestReference) {
  // Every 61st float32 bit pattern (70 million values, all exponents and low-bit patterns).
  const std::vector<double> halves = NonNegativeHalves();
  uint64_t checked = 0;
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 61) {
    const float f = BitsToFloat(static_cast<uint32_t>(u));
    if (std::isnan(f)) continue;
    const uint16_t got = FloatToHalf(f);
    const uint16_t want = NearestHalfRef(f, halves);
    if (got != want) {
      FAIL() << "float bits 0x" << std::hex << u << ": got 0x" << got << ", want 0x" << want;
    }
    ++checked;
  }
  EXPECT_GT(checked, 60000000u);
}

TEST(BFloat16Test, EveryBFloat16RoundTrips) {
  for (uint32_t b = 0; b <= 0xFFFF; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const float f = BFloat16ToFloat(bits);
    ASSERT_EQ(FloatBits(f), b << 16);
    if (std::isnan(f)) {
      const uint16_t back = FloatToBFloat16(f);
      ASSERT_TRUE(std::isnan(BFloat16ToFloat(back))) << std::hex << b;
      ASSERT_EQ(back & 0x8000, bits & 0x8000);
      continue;
    }
    ASSERT_EQ(FloatToBFloat16(f), bits) << std::hex << b;
  }
}

TEST(BFloat16Test, RoundsToNearestEven) {
  // Midpoints of every adjacent pair of positive finite bfloat16 values, and their neighbours.
  for (uint32_t b = 0; b < 0x7F7F; ++b) {
    const float mid = BitsToFloat((b << 16) | 0x8000u);
    const uint16_t even = static_cast<uint16_t>((b & 1) ? b + 1 : b);
    ASSERT_EQ(FloatToBFloat16(mid), even) << std::hex << b;
    ASSERT_EQ(FloatToBFloat16(-mid), 0x8000 | even) << std::hex << b;
    ASSERT_EQ(FloatToBFloat16(BitsToFloat((b << 16) | 0x7FFFu)), b) << std::hex << b;
    ASSERT_EQ(FloatToBFloat16(BitsToFloat((b << 16) | 0x8001u)), b + 1) << std::hex << b;
  }
  EXPECT_EQ(FloatToBFloat16(std::numeric_limits<float>::max()), 0x7F80);  // ties up to inf
  EXPECT_EQ(FloatToBFloat16(BitsToFloat(0x7F7F7FFFu)), 0x7F7F);
  EXPECT_EQ(FloatToBFloat16(3.14159265f), 0x4049);
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 997) {
    const float f = BitsToFloat(static_cast<uint32_t>(u));
    if (std::isnan(f) || std::isinf(f)) continue;
    const uint16_t got = FloatToBFloat16(f), want = NearestBFloat16Ref(f);
    if (got != want)
      FAIL() << "float bits 0x" << std::hex << u << ": got " << got << " want " << want;
  }
}

TEST(Float16Test, RoundToHalfIsIdempotent) {
  for (float x : {0.1f, -3.3f, 1000.7f, 6.1e-5f, 70000.0f}) {
    const float r = RoundToHalf(x);
    EXPECT_EQ(RoundToHalf(r), r) << x;
  }
  EXPECT_TRUE(std::isinf(RoundToHalf(70000.0f)));
  EXPECT_NEAR(RoundToHalf(0.1f), 0.0999755859375f, 0.0f);
}

}  // namespace
}  // namespace qforge::quant

// Tests of the GPTQ checkpoint packer (quant/gptq_pack.h): hand-written bit-layout
// vectors, an independent transcription of the reference packer loop (AutoGPTQ
// QuantLinear.pack, with its i/row/j bookkeeping), round trips, layer packing against a float64
// dequantisation, the v1 zero wrap-around trap and argument validation.
#include "quant/gptq_pack.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "base/float16.h"

namespace qforge::quant {
namespace {

// gmock is not part of the core-only test dependencies: a plain substring predicate.
::testing::AssertionResult HasSubstr(const std::string& haystack, const std::string& needle) {
  if (haystack.find(needle) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "\"" << haystack << "\" does not contain \"" << needle << "\"";
}

constexpr int kAllBits[] = {2, 3, 4, 8};

uint32_t U(int32_t v) { return static_cast<uint32_t>(v); }

std::vector<uint32_t> AsUnsigned(const std::vector<int32_t>& v) {
  std::vector<uint32_t> u(v.size());
  for (size_t k = 0; k < v.size(); ++k) u[k] = U(v[k]);
  return u;
}

std::vector<uint8_t> RandomCodes(int64_t n, int bits, std::mt19937& rng) {
  std::uniform_int_distribution<int> d(0, (1 << bits) - 1);
  std::vector<uint8_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<uint8_t>(d(rng));
  return v;
}

std::vector<int32_t> RandomFields(int64_t n, int lo, int hi, std::mt19937& rng) {
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

// ---- Literal transcription of the reference packer ---------------------------------------------
// AutoGPTQ's QuantLinear.pack walks the packed rows with counters i (source row), row (packed
// row) and j, on numpy uint32 arrays; for bits == 3 it writes the straddling values 10 and 21 with
// explicit `<< 30`, `>> 2 & 1`, `<< 31`, `>> 1 & 3`. `src(j, n)` is source value j of lane n (as
// uint32: a −1 wraps to 0xFFFFFFFF exactly as `astype(np.uint32)` does), `dst(row, n)` the packed
// word. `packed_rows` = n_values / 32 * bits. Written independently of gptq_pack.cc.
void ReferencePack(int bits, int64_t packed_rows, int64_t lanes,
                   const std::function<uint32_t(int64_t, int64_t)>& src,
                   const std::function<uint32_t&(int64_t, int64_t)>& dst) {
  int64_t i = 0;
  int64_t row = 0;
  while (row < packed_rows) {
    if (bits == 2 || bits == 4 || bits == 8) {
      for (int64_t j = i; j < i + (32 / bits); ++j) {
        for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= src(j, n) << (bits * (j - i));
      }
      i += 32 / bits;
      row += 1;
    } else if (bits == 3) {
      for (int64_t j = i; j < i + 10; ++j) {
        for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= src(j, n) << (3 * (j - i));
      }
      i += 10;
      for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= src(i, n) << 30;
      row += 1;
      for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= (src(i, n) >> 2) & 1;
      i += 1;
      for (int64_t j = i; j < i + 10; ++j) {
        for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= src(j, n) << (3 * (j - i) + 1);
      }
      i += 10;
      for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= src(i, n) << 31;
      row += 1;
      for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= (src(i, n) >> 1) & 0x3;
      i += 1;
      for (int64_t j = i; j < i + 10; ++j) {
        for (int64_t n = 0; n < lanes; ++n) dst(row, n) |= src(j, n) << (3 * (j - i) + 2);
      }
      i += 10;
      row += 1;
    } else {
      ADD_FAILURE() << "reference packer: bits " << bits;
      return;
    }
  }
}

// qweight as the reference builds it: intweight [rows, cols] packed along rows.
std::vector<uint32_t> ReferencePackRows(const std::vector<int32_t>& intweight, int64_t rows,
                                        int64_t cols, int bits) {
  std::vector<uint32_t> q(static_cast<size_t>(rows / 32 * bits * cols), 0);
  ReferencePack(
      bits, rows / 32 * bits, cols,
      [&](int64_t j, int64_t n) { return U(intweight[static_cast<size_t>(j * cols + n)]); },
      [&](int64_t r, int64_t n) -> uint32_t& { return q[static_cast<size_t>(r * cols + n)]; });
  return q;
}

// qzeros as the reference builds it: zeros [rows, cols] packed along columns (qzeros[:, col]).
std::vector<uint32_t> ReferencePackColumns(const std::vector<int32_t>& zeros, int64_t rows,
                                           int64_t cols, int bits) {
  const int64_t pc = cols / 32 * bits;
  std::vector<uint32_t> q(static_cast<size_t>(rows * pc), 0);
  ReferencePack(
      bits, pc, rows,
      [&](int64_t j, int64_t n) { return U(zeros[static_cast<size_t>(n * cols + j)]); },
      [&](int64_t c, int64_t n) -> uint32_t& { return q[static_cast<size_t>(n * pc + c)]; });
  return q;
}

// ---- Hand-written layout vectors ----------------------------------------------------------------

TEST(GptqPackLayoutTest, FourBitCodesZeroToFifteen) {
  std::vector<uint8_t> codes(32);
  for (int j = 0; j < 32; ++j) codes[j] = static_cast<uint8_t>(j & 15);
  auto packed = PackRows(codes.data(), 32, 1, 4);
  ASSERT_TRUE(packed.ok()) << packed.status().ToString();
  EXPECT_EQ(AsUnsigned(*packed),
            (std::vector<uint32_t>{0x76543210u, 0xFEDCBA98u, 0x76543210u, 0xFEDCBA98u}));

  // Along columns: one row of 8 values is one word.
  std::vector<int32_t> row = {0, 1, 2, 3, 4, 5, 6, 7};
  auto cols = PackColumns(row.data(), 1, 8, 4);
  ASSERT_TRUE(cols.ok()) << cols.status().ToString();
  EXPECT_EQ(AsUnsigned(*cols), (std::vector<uint32_t>{0x76543210u}));
}

TEST(GptqPackLayoutTest, FourBitTwoColumnsAreIndependent) {
  // codes [32, 2]: column 0 = j & 15, column 1 = 15 - (j & 15).
  std::vector<uint8_t> codes(64);
  for (int j = 0; j < 32; ++j) {
    codes[j * 2] = static_cast<uint8_t>(j & 15);
    codes[j * 2 + 1] = static_cast<uint8_t>(15 - (j & 15));
  }
  auto packed = PackRows(codes.data(), 32, 2, 4);
  ASSERT_TRUE(packed.ok());
  // Layout [4, 2]: word r of column c at r * 2 + c.
  EXPECT_EQ(AsUnsigned(*packed),
            (std::vector<uint32_t>{0x76543210u, 0x89ABCDEFu, 0xFEDCBA98u, 0x01234567u, 0x76543210u,
                                   0x89ABCDEFu, 0xFEDCBA98u, 0x01234567u}));
}

TEST(GptqPackLayoutTest, TwoBit) {
  std::vector<uint8_t> codes(32);
  for (int j = 0; j < 32; ++j) codes[j] = static_cast<uint8_t>(j & 3);
  auto packed = PackRows(codes.data(), 32, 1, 2);
  ASSERT_TRUE(packed.ok());
  // 0 | 1 << 2 | 2 << 4 | 3 << 6 = 0xE4 per byte.
  EXPECT_EQ(AsUnsigned(*packed), (std::vector<uint32_t>{0xE4E4E4E4u, 0xE4E4E4E4u}));

  std::vector<uint8_t> sparse(32, 0);
  sparse[0] = 3;
  sparse[15] = 1;  // last field of word 0: bits 30-31
  sparse[16] = 2;  // first field of word 1
  auto packed2 = PackRows(sparse.data(), 32, 1, 2);
  ASSERT_TRUE(packed2.ok());
  EXPECT_EQ(AsUnsigned(*packed2), (std::vector<uint32_t>{0x40000003u, 0x00000002u}));
}

TEST(GptqPackLayoutTest, EightBit) {
  std::vector<uint8_t> codes(32);
  for (int j = 0; j < 32; ++j) codes[j] = static_cast<uint8_t>(j);
  auto packed = PackRows(codes.data(), 32, 1, 8);
  ASSERT_TRUE(packed.ok());
  EXPECT_EQ(AsUnsigned(*packed),
            (std::vector<uint32_t>{0x03020100u, 0x07060504u, 0x0B0A0908u, 0x0F0E0D0Cu, 0x13121110u,
                                   0x17161514u, 0x1B1A1918u, 0x1F1E1D1Cu}));
  std::vector<int32_t> row = {0x01, 0x23, 0x45, 0x67, 0xFF, 0xFF, 0xFF, 0xFF};
  auto cols = PackColumns(row.data(), 1, 8, 8);
  ASSERT_TRUE(cols.ok());
  EXPECT_EQ(AsUnsigned(*cols), (std::vector<uint32_t>{0x67452301u, 0xFFFFFFFFu}));
  EXPECT_EQ((*cols)[1], -1);  // stored as int32
}

TEST(GptqPackLayoutTest, ThreeBitHandComputedWithStraddlingValues) {
  // Value j occupies stream bits 3j..3j+2: value 10 = bits 30..32 (word 0 bits 30-31, word 1
  // bit 0), value 21 = bits 63..65 (word 1 bit 31, word 2 bits 0-1).
  std::vector<uint8_t> codes(32, 0);
  codes[0] = 5;   // word 0 bits 0-2            -> 0x00000005
  codes[1] = 3;   // word 0 bits 3-5            -> 0x00000018
  codes[9] = 7;   // word 0 bits 27-29          -> 0x38000000
  codes[10] = 6;  // 0b110: low bits 10 -> word 0 bits 30-31 = 0x80000000; top bit -> word 1 bit 0
  codes[11] = 1;  // word 1 bits 1-3            -> 0x00000002
  codes[20] = 2;  // word 1 bits 28-30          -> 0x20000000
  codes[21] = 5;  // 0b101: bit 0 -> word 1 bit 31 = 0x80000000; bits 1-2 (0b10) -> word 2 = 0x2
  codes[22] = 7;  // word 2 bits 2-4            -> 0x0000001C
  codes[31] = 4;  // word 2 bits 29-31          -> 0x80000000
  // word 0 = 0x5 + 0x18 + 0x38000000 + 0x80000000
  // word 1 = 0x1 + 0x2 + 0x20000000 + 0x80000000
  // word 2 = 0x2 + 0x1C + 0x80000000
  const std::vector<uint32_t> expected = {0xB800001Du, 0xA0000003u, 0x8000001Eu};
  auto packed = PackRows(codes.data(), 32, 1, 3);
  ASSERT_TRUE(packed.ok());
  EXPECT_EQ(AsUnsigned(*packed), expected);

  // The same stream along a row (qzeros layout).
  std::vector<int32_t> row(codes.begin(), codes.end());
  auto cols = PackColumns(row.data(), 1, 32, 3);
  ASSERT_TRUE(cols.ok());
  EXPECT_EQ(AsUnsigned(*cols), expected);

  auto unpacked = UnpackRows(packed->data(), 32, 1, 3);
  ASSERT_TRUE(unpacked.ok());
  EXPECT_EQ(*unpacked, codes);
}

TEST(GptqPackLayoutTest, ThreeBitSingleStraddlingValues) {
  struct Case {
    int index;
    uint8_t value;
    uint32_t w0, w1, w2;
  };
  const Case cases[] = {
      {10, 1, 0x40000000u, 0, 0},  // bit 0 of value 10 = stream bit 30
      {10, 2, 0x80000000u, 0, 0},  // stream bit 31
      {10, 4, 0, 0x00000001u, 0},  // stream bit 32 = word 1 bit 0
      {21, 1, 0, 0x80000000u, 0},  // stream bit 63
      {21, 2, 0, 0, 0x00000001u},  // stream bit 64
      {21, 4, 0, 0, 0x00000002u},  // stream bit 65
      {31, 7, 0, 0, 0xE0000000u},  // last value: word 2 bits 29-31
      {7, 7, 0x00E00000u, 0, 0},   // word 0 bits 21-23
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> codes(32, 0);
    codes[c.index] = c.value;
    auto packed = PackRows(codes.data(), 32, 1, 3);
    ASSERT_TRUE(packed.ok());
    EXPECT_EQ(AsUnsigned(*packed), (std::vector<uint32_t>{c.w0, c.w1, c.w2}))
        << "value " << int(c.value) << " at index " << c.index;
  }
  std::vector<uint8_t> sevens(32, 7);
  auto packed = PackRows(sevens.data(), 32, 1, 3);
  ASSERT_TRUE(packed.ok());
  EXPECT_EQ(*packed, (std::vector<int32_t>{-1, -1, -1}));
}

TEST(GptqPackLayoutTest, SymmetricV1QzerosConstants) {
  struct Case {
    int bits;
    std::vector<uint32_t> v1_words;  // one block of 32 output columns
    std::vector<uint32_t> v2_words;
  };
  const std::vector<Case> cases = {
      {4,
       {0x77777777u, 0x77777777u, 0x77777777u, 0x77777777u},
       {0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u}},
      {8, std::vector<uint32_t>(8, 0x7F7F7F7Fu), std::vector<uint32_t>(8, 0x80808080u)},
      {2, {0x55555555u, 0x55555555u}, {0xAAAAAAAAu, 0xAAAAAAAAu}},
      // Stored 3 = 0b011 (v1) / 4 = 0b100 (v2) repeated over 96 bits, lowest bits first.
      {3, {0xDB6DB6DBu, 0xB6DB6DB6u, 0x6DB6DB6Du}, {0x24924924u, 0x49249249u, 0x92492492u}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("bits " + std::to_string(c.bits));
    const int64_t out = 32, in = 32;
    std::vector<uint8_t> codes(out * in, 1);
    std::vector<float> scales(out, 0.5f);
    std::vector<int32_t> zeros(out, 1 << (c.bits - 1));
    std::vector<int32_t> g_idx(in, 0);
    for (auto format : {GptqCheckpointFormat::kV1, GptqCheckpointFormat::kV2}) {
      auto layer = PackGptqLayer(codes.data(), scales.data(), zeros.data(), g_idx.data(), c.bits,
                                 out, in, 1, format);
      ASSERT_TRUE(layer.ok()) << layer.status().ToString();
      EXPECT_EQ(AsUnsigned(layer->qzeros),
                format == GptqCheckpointFormat::kV1 ? c.v1_words : c.v2_words);
    }
    for (int w = 0; w < c.bits; ++w) {
      EXPECT_EQ(GptqUniformBlockWord(GptqSymmetricStoredZero(c.bits, true), c.bits, w),
                c.v1_words[w]);
      EXPECT_EQ(GptqUniformBlockWord(GptqSymmetricStoredZero(c.bits, false), c.bits, w),
                c.v2_words[w]);
    }
  }
}

// ---- Cross-check against the reference loop on random data
// ---------------------------------------

TEST(GptqPackReferenceTest, RowsAndColumnsMatchReferenceLoop) {
  std::mt19937 rng(1234);
  for (int bits : kAllBits) {
    for (int64_t rows : {32, 96, 256}) {
      for (int64_t cols : {1, 5, 64}) {
        SCOPED_TRACE("bits " + std::to_string(bits) + " rows " + std::to_string(rows) + " cols " +
                     std::to_string(cols));
        auto codes = RandomCodes(rows * cols, bits, rng);
        std::vector<int32_t> as_int(codes.begin(), codes.end());
        auto packed = PackRows(codes.data(), rows, cols, bits);
        ASSERT_TRUE(packed.ok());
        EXPECT_EQ(AsUnsigned(*packed), ReferencePackRows(as_int, rows, cols, bits));
      }
    }
    // Along columns (the reference's qzeros loop): cols a multiple of 32 for the reference.
    for (int64_t rows : {1, 3, 17}) {
      for (int64_t cols : {32, 64, 320}) {
        auto values = RandomFields(rows * cols, 0, (1 << bits) - 1, rng);
        auto packed = PackColumns(values.data(), rows, cols, bits);
        ASSERT_TRUE(packed.ok());
        EXPECT_EQ(AsUnsigned(*packed), ReferencePackColumns(values, rows, cols, bits))
            << "bits " << bits << " rows " << rows << " cols " << cols;
      }
    }
  }
}

TEST(GptqPackReferenceTest, LayerMatchesReferenceLoop) {
  // The reference packs intweight = codesᵀ [in, out] along rows and (zeros − 1) along columns.
  std::mt19937 rng(99);
  for (int bits : kAllBits) {
    const int64_t out = 64, in = 128, groups = 4;
    auto codes = RandomCodes(out * in, bits, rng);
    auto zeros = RandomFields(groups * out, 1, (1 << bits) - 1, rng);
    std::vector<float> scales(groups * out, 0.01f);
    std::vector<int32_t> g_idx(in);
    for (int64_t i = 0; i < in; ++i) g_idx[i] = static_cast<int32_t>(i / 32);
    auto layer = PackGptqLayer(codes.data(), scales.data(), zeros.data(), g_idx.data(), bits, out,
                               in, groups, GptqCheckpointFormat::kV1);
    ASSERT_TRUE(layer.ok()) << layer.status().ToString();
    std::vector<int32_t> intweight(in * out);
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t i = 0; i < in; ++i) intweight[i * out + o] = codes[o * in + i];
    }
    std::vector<int32_t> zm1(zeros);
    for (auto& z : zm1) z -= 1;
    EXPECT_EQ(AsUnsigned(layer->qweight), ReferencePackRows(intweight, in, out, bits))
        << "bits " << bits;
    EXPECT_EQ(AsUnsigned(layer->qzeros), ReferencePackColumns(zm1, groups, out, bits))
        << "bits " << bits;
  }
}

// ---- Round trips ------------------------------------------------------------------------------

TEST(GptqPackRoundTripTest, Rows) {
  std::mt19937 rng(7);
  for (int bits : kAllBits) {
    for (int64_t rows : {0, 32, 64, 160, 1024}) {
      for (int64_t cols : {1, 3, 8, 129}) {
        auto codes = RandomCodes(rows * cols, bits, rng);
        auto packed = PackRows(codes.data(), rows, cols, bits);
        ASSERT_TRUE(packed.ok()) << packed.status().ToString();
        ASSERT_EQ(static_cast<int64_t>(packed->size()), rows * bits / 32 * cols);
        auto back = UnpackRows(packed->data(), rows, cols, bits);
        ASSERT_TRUE(back.ok());
        EXPECT_EQ(*back, codes) << "bits " << bits << " rows " << rows << " cols " << cols;
      }
    }
  }
}

TEST(GptqPackRoundTripTest, Columns) {
  std::mt19937 rng(8);
  for (int bits : kAllBits) {
    const int64_t granule = bits == 3 ? 32 : 32 / bits;
    for (int64_t rows : {1, 2, 33}) {
      for (int64_t cols : {granule, 3 * granule, int64_t{32}, int64_t{96}, int64_t{4096}}) {
        auto values = RandomFields(rows * cols, 0, (1 << bits) - 1, rng);
        auto packed = PackColumns(values.data(), rows, cols, bits);
        ASSERT_TRUE(packed.ok()) << packed.status().ToString();
        ASSERT_EQ(static_cast<int64_t>(packed->size()), rows * cols * bits / 32);
        auto back = UnpackColumns(packed->data(), rows, cols, bits);
        ASSERT_TRUE(back.ok());
        EXPECT_EQ(*back, values) << "bits " << bits << " rows " << rows << " cols " << cols;
      }
    }
  }
}

TEST(GptqPackRoundTripTest, UnpackAcceptsEveryBitPattern) {
  // Any int32 pattern is a valid packed word; unpack → pack reproduces it exactly.
  std::mt19937 rng(9);
  for (int bits : kAllBits) {
    const int64_t rows = 64, cols = 7;
    std::vector<int32_t> words(rows * bits / 32 * cols);
    for (auto& w : words) w = static_cast<int32_t>(rng());
    auto codes = UnpackRows(words.data(), rows, cols, bits);
    ASSERT_TRUE(codes.ok());
    auto again = PackRows(codes->data(), rows, cols, bits);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*again, words) << "bits " << bits;
    auto fields = UnpackColumns(words.data(), cols, rows, bits);
    ASSERT_TRUE(fields.ok());
    auto again2 = PackColumns(fields->data(), cols, rows, bits);
    ASSERT_TRUE(again2.ok());
    EXPECT_EQ(*again2, words) << "bits " << bits;
  }
}

// ---- Layer packing ----------------------------------------------------------------------------

struct LayerInputs {
  int64_t out, in, groups;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> zeros;
  std::vector<int32_t> g_idx;
};

// Random non-zero scales of both signs spanning several binades, zeros in [1, 2^bits), and an
// act-order style g_idx (groups of equal size in a random column order).
LayerInputs RandomLayer(int bits, int64_t out, int64_t in, int64_t groups, std::mt19937& rng) {
  LayerInputs l{out, in, groups, RandomCodes(out * in, bits, rng), {}, {}, {}};
  std::uniform_real_distribution<double> log_mag(std::log(1e-4), std::log(2.0));
  std::bernoulli_distribution neg(0.1);
  l.scales.resize(groups * out);
  for (auto& s : l.scales) {
    s = static_cast<float>(std::exp(log_mag(rng)) * (neg(rng) ? -1 : 1));
  }
  l.zeros = RandomFields(groups * out, 1, (1 << bits) - 1, rng);
  l.g_idx.resize(in);
  for (int64_t i = 0; i < in; ++i) l.g_idx[i] = static_cast<int32_t>(i * groups / in);
  std::shuffle(l.g_idx.begin(), l.g_idx.end(), rng);
  return l;
}

StatusOr<GptqPackedLayer> Pack(const LayerInputs& l, int bits, GptqCheckpointFormat format) {
  return PackGptqLayer(l.codes.data(), l.scales.data(), l.zeros.data(), l.g_idx.data(), bits, l.out,
                       l.in, l.groups, format);
}

TEST(GptqPackLayerTest, DequantizeMatchesFloat64Reference) {
  // Reference: W[o, i] = double(fp16(scale[g, o])) · (code[o, i] − zero[g, o]) in float64,
  // g = g_idx[i]. Bound: |W − ref| ≤ 2^-24 · |ref| (one float32 rounding at most; in fact the
  // product of an 11-bit significand and a ≤ 9-bit integer is exact in float32).
  std::mt19937 rng(2024);
  const double kRelTol = std::ldexp(1.0, -24);
  for (int bits : kAllBits) {
    for (auto format : {GptqCheckpointFormat::kV1, GptqCheckpointFormat::kV2}) {
      const int64_t out = 96, in = 256, groups = 4;
      LayerInputs l = RandomLayer(bits, out, in, groups, rng);
      auto packed = Pack(l, bits, format);
      ASSERT_TRUE(packed.ok()) << packed.status().ToString();
      EXPECT_EQ(packed->bits, bits);
      EXPECT_EQ(packed->format, format);
      EXPECT_EQ(static_cast<int64_t>(packed->qweight.size()), in * bits / 32 * out);
      EXPECT_EQ(static_cast<int64_t>(packed->qzeros.size()), groups * out * bits / 32);
      auto w = DequantizeGptqPacked(*packed);
      ASSERT_TRUE(w.ok()) << w.status().ToString();
      ASSERT_EQ(static_cast<int64_t>(w->size()), out * in);
      int64_t nonzero = 0;
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t i = 0; i < in; ++i) {
          const int64_t gz = l.g_idx[i] * out + o;
          const double s = static_cast<double>(RoundToHalf(l.scales[gz]));
          const double ref = s * (static_cast<double>(l.codes[o * in + i]) - l.zeros[gz]);
          const double got = (*w)[o * in + i];
          nonzero += ref != 0.0;
          ASSERT_LE(std::fabs(got - ref), kRelTol * std::fabs(ref))
              << "bits " << bits << " format " << CheckpointFormatName(format) << " o " << o
              << " i " << i;
        }
      }
      EXPECT_GT(nonzero, out * in / 2);  // the check was not vacuous
    }
  }
}

TEST(GptqPackLayerTest, UnpackRecoversSolverOutput) {
  std::mt19937 rng(5);
  for (int bits : kAllBits) {
    for (auto format : {GptqCheckpointFormat::kV1, GptqCheckpointFormat::kV2}) {
      LayerInputs l = RandomLayer(bits, 64, 96, 3, rng);
      auto packed = Pack(l, bits, format);
      ASSERT_TRUE(packed.ok());
      auto u = UnpackGptqLayer(*packed);
      ASSERT_TRUE(u.ok()) << u.status().ToString();
      EXPECT_EQ(u->codes, l.codes);
      EXPECT_EQ(u->zeros, l.zeros);
      EXPECT_EQ(u->g_idx, l.g_idx);
      ASSERT_EQ(u->scales.size(), l.scales.size());
      for (size_t k = 0; k < l.scales.size(); ++k) {
        EXPECT_EQ(u->scales[k], RoundToHalf(l.scales[k]));
        EXPECT_EQ(packed->scales[k], FloatToHalf(l.scales[k]));
      }
    }
  }
}

TEST(GptqPackLayerTest, V1StoresZeroMinusOneV2StoresZero) {
  std::mt19937 rng(11);
  for (int bits : kAllBits) {
    LayerInputs l = RandomLayer(bits, 32, 64, 2, rng);
    auto v1 = Pack(l, bits, GptqCheckpointFormat::kV1);
    auto v2 = Pack(l, bits, GptqCheckpointFormat::kV2);
    ASSERT_TRUE(v1.ok() && v2.ok());
    EXPECT_EQ(v1->qweight, v2->qweight);
    EXPECT_EQ(v1->scales, v2->scales);
    auto f1 = UnpackColumns(v1->qzeros.data(), 2, 32, bits);
    auto f2 = UnpackColumns(v2->qzeros.data(), 2, 32, bits);
    ASSERT_TRUE(f1.ok() && f2.ok());
    for (size_t k = 0; k < l.zeros.size(); ++k) {
      EXPECT_EQ((*f1)[k], l.zeros[k] - 1);
      EXPECT_EQ((*f2)[k], l.zeros[k]);
    }
    auto w1 = DequantizeGptqPacked(*v1);
    auto w2 = DequantizeGptqPacked(*v2);
    ASSERT_TRUE(w1.ok() && w2.ok());
    EXPECT_EQ(*w1, *w2);
  }
}

TEST(GptqPackLayerTest, V1RefusesZeroOfZeroV2AcceptsIt) {
  std::mt19937 rng(12);
  LayerInputs l = RandomLayer(4, 32, 64, 2, rng);
  l.zeros[1 * 32 + 5] = 0;  // group 1, output column 5
  auto v1 = Pack(l, 4, GptqCheckpointFormat::kV1);
  ASSERT_FALSE(v1.ok());
  EXPECT_EQ(v1.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(v1.status().message(), "group 1, out 5"));
  EXPECT_TRUE(HasSubstr(v1.status().message(), "gptq_v2"));
  auto v2 = Pack(l, 4, GptqCheckpointFormat::kV2);
  ASSERT_TRUE(v2.ok()) << v2.status().ToString();
  auto u = UnpackGptqLayer(*v2);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->zeros[1 * 32 + 5], 0);
}

// The trap: a packer that writes v1 zero − 1 = −1 without refusing it (the reference does
// `(zeros - 1).astype(uint32)` and ORs it in) sets every higher bit of that word. Our unpacker
// must show what a v1 loader then sees: the field reads 2^bits − 1, i.e. zero 2^bits, and the
// higher fields of the same word are corrupted too.
TEST(GptqPackLayerTest, V1ZeroWrapAroundIsVisibleToUnpacker) {
  {
    const int bits = 4;
    std::vector<int32_t> zeros = {3, 5, 0, 2, 9, 1, 4, 6};  // one group, 8 outputs
    zeros.resize(32, 8);
    std::vector<int32_t> zm1(zeros);
    for (auto& z : zm1) z -= 1;
    auto words = ReferencePackColumns(zm1, 1, 32, bits);
    EXPECT_EQ(words[0], 0xFFFFFF42u);  // fields 0,1 intact; −1 << 8 floods fields 2..7

    GptqPackedLayer p;
    p.bits = bits;
    p.out_features = 32;
    p.in_features = 32;
    p.num_groups = 1;
    p.format = GptqCheckpointFormat::kV1;
    p.qweight.assign(32 * bits / 32 * 32, 0);  // all codes 0
    p.qzeros.assign(words.begin(), words.end());
    p.scales.assign(32, FloatToHalf(1.0f));
    p.g_idx.assign(32, 0);
    auto u = UnpackGptqLayer(p);
    ASSERT_TRUE(u.ok()) << u.status().ToString();
    EXPECT_EQ(u->zeros[0], 3);
    EXPECT_EQ(u->zeros[1], 5);
    for (int o = 2; o < 8; ++o) EXPECT_EQ(u->zeros[o], 16) << "o " << o;  // not 0, 2, 9, ...
    for (int o = 8; o < 32; ++o) EXPECT_EQ(u->zeros[o], 8);
    auto w = DequantizeGptqPacked(p);
    ASSERT_TRUE(w.ok());
    EXPECT_EQ((*w)[2 * 32 + 0], -16.0f);  // a loader dequantises code 0 as −16 · scale
    EXPECT_EQ((*w)[0], -3.0f);
  }
  {
    // 3 bits, zero 0 at the straddling output 10: the reference's `<< 30` and `>> 2 & 1` clip
    // the −1 to that field, which then reads 7 (zero 8); zero 0 at output 5 floods fields 6..9
    // and the low two bits of field 10.
    const int bits = 3;
    std::vector<int32_t> zeros(32, 4);
    zeros[10] = 0;
    std::vector<int32_t> zm1(zeros);
    for (auto& z : zm1) z -= 1;
    auto words = ReferencePackColumns(zm1, 1, 32, bits);
    auto fields = UnpackColumns(reinterpret_cast<const int32_t*>(words.data()), 1, 32, bits);
    ASSERT_TRUE(fields.ok());
    for (int o = 0; o < 32; ++o) EXPECT_EQ((*fields)[o], o == 10 ? 7 : 3) << "o " << o;

    zeros.assign(32, 2);  // stored 1 = 0b001
    zeros[5] = 0;
    zm1 = zeros;
    for (auto& z : zm1) z -= 1;
    words = ReferencePackColumns(zm1, 1, 32, bits);
    fields = UnpackColumns(reinterpret_cast<const int32_t*>(words.data()), 1, 32, bits);
    ASSERT_TRUE(fields.ok());
    for (int o = 0; o < 32; ++o) {
      // field 10: low bits flooded (0b11), top bit from word 1 bit 0 (0 for stored 1) -> 3.
      const int expected = o < 5 ? 1 : o < 10 ? 7 : o == 10 ? 3 : 1;
      EXPECT_EQ((*fields)[o], expected) << "o " << o;
    }
  }
}

// ---- Validation -------------------------------------------------------------------------------

TEST(GptqPackValidationTest, CheckGptqPackable) {
  EXPECT_TRUE(CheckGptqPackable(4, 8, 32).ok());
  EXPECT_TRUE(CheckGptqPackable(2, 16, 64).ok());
  EXPECT_TRUE(CheckGptqPackable(8, 4, 32).ok());
  EXPECT_TRUE(CheckGptqPackable(3, 32, 32).ok());
  EXPECT_TRUE(CheckGptqPackable(4, 11008, 4096).ok());
  for (int bits : {0, 1, 5, 6, 7, 16, -4}) {
    Status s = CheckGptqPackable(bits, 64, 64);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bits;
    EXPECT_TRUE(HasSubstr(s.message(), "bits = " + std::to_string(bits)));
  }
  Status s = CheckGptqPackable(4, 64, 48);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(s.message(), "in_features = 48"));
  EXPECT_TRUE(HasSubstr(s.message(), "multiple of 32"));
  s = CheckGptqPackable(4, 36, 64);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(s.message(), "out_features = 36"));
  EXPECT_TRUE(HasSubstr(s.message(), "multiple of 8"));
  s = CheckGptqPackable(3, 48, 64);
  EXPECT_TRUE(HasSubstr(s.message(), "out_features = 48"));
  EXPECT_TRUE(HasSubstr(s.message(), "multiple of 32"));
  s = CheckGptqPackable(2, 8, 64);
  EXPECT_TRUE(HasSubstr(s.message(), "multiple of 16"));
  EXPECT_TRUE(CheckGptqPackable(8, 12, 64).ok());
  EXPECT_EQ(CheckGptqPackable(4, 0, 64).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckGptqPackable(4, 64, -32).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckGptqPackable(4, int64_t{1} << 30, int64_t{1} << 30).code(),
            StatusCode::kInvalidArgument);
}

TEST(GptqPackValidationTest, LowLevelShapesAndValues) {
  std::vector<uint8_t> codes(64 * 3, 1);
  EXPECT_EQ(PackRows(codes.data(), 64, 3, 5).status().code(), StatusCode::kInvalidArgument);
  auto r = PackRows(codes.data(), 16, 3, 4);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(r.status().message(), "rows = 16"));
  EXPECT_EQ(PackRows(codes.data(), -32, 3, 4).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PackRows(nullptr, 32, 3, 4).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(PackRows(nullptr, 0, 3, 4).ok());

  codes[5 * 3 + 2] = 16;
  r = PackRows(codes.data(), 64, 3, 4);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(r.status().message(), "row 5, col 2"));
  EXPECT_TRUE(HasSubstr(r.status().message(), "= 16"));
  EXPECT_TRUE(PackRows(codes.data(), 64, 3, 8).ok());  // 16 fits in 8 bits
  codes[5 * 3 + 2] = 8;
  EXPECT_TRUE(HasSubstr(PackRows(codes.data(), 64, 3, 3).status().message(), "row 5, col 2"));

  std::vector<int32_t> values(2 * 32, 1);
  auto c = PackColumns(values.data(), 2, 12, 4);
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(c.status().message(), "cols = 12"));
  EXPECT_EQ(PackColumns(values.data(), 2, 16, 3).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(PackColumns(values.data(), 2, 16, 2).ok());
  values[1 * 32 + 7] = -1;
  c = PackColumns(values.data(), 2, 32, 4);
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(c.status().message(), "row 1, col 7"));
  values[1 * 32 + 7] = 4;
  c = PackColumns(values.data(), 2, 32, 2);
  EXPECT_TRUE(HasSubstr(c.status().message(), "row 1, col 7"));

  std::vector<int32_t> words(12, 0);
  EXPECT_EQ(UnpackRows(words.data(), 48, 1, 4).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(UnpackColumns(words.data(), 1, 20, 3).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(UnpackColumns(words.data(), 1, 32, 6).status().code(), StatusCode::kInvalidArgument);
}

TEST(GptqPackValidationTest, LayerArguments) {
  std::mt19937 rng(3);
  const LayerInputs base = RandomLayer(4, 32, 64, 2, rng);
  auto expect_error = [&](const LayerInputs& l, const std::string& needle, int bits = 4,
                          int64_t groups = 2) {
    auto p = PackGptqLayer(l.codes.data(), l.scales.data(), l.zeros.data(), l.g_idx.data(), bits,
                           l.out, l.in, groups, GptqCheckpointFormat::kV1);
    ASSERT_FALSE(p.ok()) << needle;
    EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(HasSubstr(p.status().message(), needle));
  };
  LayerInputs l = base;
  l.codes[1 * 64 + 33] = 16;
  expect_error(l, "codes[out 1, in 33] = 16");
  l = base;
  l.g_idx[7] = 2;
  expect_error(l, "g_idx[7] = 2");
  l.g_idx[7] = -1;
  expect_error(l, "g_idx[7] = -1");
  l = base;
  l.zeros[0 * 32 + 9] = 16;
  expect_error(l, "zeros[group 0, out 9] = 16");
  l.zeros[0 * 32 + 9] = -2;
  expect_error(l, "zeros[group 0, out 9] = -2");
  l = base;
  l.scales[1 * 32 + 3] = std::nanf("");
  expect_error(l, "scales[group 1, out 3]");
  l.scales[1 * 32 + 3] = 70000.0f;  // overflows float16
  expect_error(l, "scales[group 1, out 3]");
  l.scales[1 * 32 + 3] = 65504.0f;  // the largest float16 is fine
  EXPECT_TRUE(Pack(l, 4, GptqCheckpointFormat::kV1).ok());
  expect_error(base, "num_groups = 0", 4, 0);
  expect_error(base, "num_groups = 65", 4, 65);
  expect_error(base, "bits = 5", 5);
  l = base;
  l.in = 48;
  expect_error(l, "in_features = 48");
  auto p = PackGptqLayer(nullptr, base.scales.data(), base.zeros.data(), base.g_idx.data(), 4, 32,
                         64, 2, GptqCheckpointFormat::kV1);
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
}

TEST(GptqPackValidationTest, PackedLayerConsistency) {
  std::mt19937 rng(4);
  LayerInputs l = RandomLayer(3, 64, 64, 2, rng);
  auto packed = Pack(l, 3, GptqCheckpointFormat::kV2);
  ASSERT_TRUE(packed.ok());
  EXPECT_TRUE(CheckGptqPackedLayer(*packed).ok());
  auto broken = *packed;
  broken.qweight.pop_back();
  Status s = CheckGptqPackedLayer(broken);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(HasSubstr(s.message(), "qweight"));
  EXPECT_EQ(UnpackGptqLayer(broken).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(DequantizeGptqPacked(broken).status().code(), StatusCode::kInvalidArgument);
  broken = *packed;
  broken.qzeros.push_back(0);
  EXPECT_TRUE(HasSubstr(CheckGptqPackedLayer(broken).message(), "qzeros"));
  broken = *packed;
  broken.scales.resize(3);
  EXPECT_TRUE(HasSubstr(CheckGptqPackedLayer(broken).message(), "scales"));
  broken = *packed;
  broken.g_idx[10] = 2;
  EXPECT_TRUE(HasSubstr(CheckGptqPackedLayer(broken).message(), "g_idx[10] = 2"));
  broken = *packed;
  broken.out_features = 48;
  EXPECT_TRUE(HasSubstr(CheckGptqPackedLayer(broken).message(), "out_features = 48"));
}

TEST(GptqPackFormatTest, Names) {
  EXPECT_STREQ(CheckpointFormatName(GptqCheckpointFormat::kV1), "gptq");
  EXPECT_STREQ(CheckpointFormatName(GptqCheckpointFormat::kV2), "gptq_v2");
  auto f = ParseCheckpointFormat("gptq_v2");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f, GptqCheckpointFormat::kV2);
  f = ParseCheckpointFormat("gptq");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f, GptqCheckpointFormat::kV1);
  EXPECT_EQ(ParseCheckpointFormat("marlin").status().code(), StatusCode::kInvalidArgument);
}

TEST(GptqPackPerfTest, Llama7bMlpLayerPacksQuickly) {
  // 11008 × 4096 (a Llama-2-7B MLP projection), 4 bits, group 128: prints the time, checks the
  // round trip of a sample.
  std::mt19937 rng(77);
  const int bits = 4;
  const int64_t out = 11008, in = 4096, groups = 32;
  std::vector<uint8_t> codes = RandomCodes(out * in, bits, rng);
  std::vector<float> scales(groups * out, 0.02f);
  std::vector<int32_t> zeros = RandomFields(groups * out, 1, 15, rng);
  std::vector<int32_t> g_idx(in);
  for (int64_t i = 0; i < in; ++i) g_idx[i] = static_cast<int32_t>(i / 128);
  const auto t0 = std::chrono::steady_clock::now();
  auto packed = PackGptqLayer(codes.data(), scales.data(), zeros.data(), g_idx.data(), bits, out,
                              in, groups, GptqCheckpointFormat::kV1);
  const auto t1 = std::chrono::steady_clock::now();
  ASSERT_TRUE(packed.ok());
  auto u = UnpackGptqLayer(*packed);
  const auto t2 = std::chrono::steady_clock::now();
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->codes, codes);
  std::printf("pack %lld x %lld 4-bit: %.1f ms, unpack %.1f ms\n", static_cast<long long>(out),
              static_cast<long long>(in),
              std::chrono::duration<double, std::milli>(t1 - t0).count(),
              std::chrono::duration<double, std::milli>(t2 - t1).count());
}

}  // namespace
}  // namespace qforge::quant

// Tests of the VPTQ checkpoint layout (quant/vptq_pack.h): fixed bit-stream vectors,
// round trips, kernel-limit validation, a hand-built layer decoded against hand-computed
// values, and solver results packed and decoded.
#include "quant/vptq_pack.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "quant/synthetic.h"
#include "quant/vptq.h"

namespace qforge::quant {
namespace {

std::vector<uint32_t> Pack(const std::vector<uint32_t>& codes, int bits) {
  auto p = PackIndexStream(codes.data(), static_cast<int64_t>(codes.size()), bits);
  EXPECT_TRUE(p.ok()) << p.status().ToString();
  return p.ok() ? *p : std::vector<uint32_t>();
}

// ---- Bit streams ----------------------------------------------------------------------------

TEST(VptqIndexStream, FixedVectors8Bit) {
  EXPECT_EQ(Pack({0x01, 0x02, 0x03, 0x04, 0xFF}, 8), (std::vector<uint32_t>{0x04030201u, 0x000000FFu}));
}

TEST(VptqIndexStream, FixedVectors12Bit) {
  // 0xABC at bits 0..11, 0x123 at 12..23, 0xFFF at 24..35 (straddles), 0x456 at 36..47.
  EXPECT_EQ(Pack({0xABC, 0x123, 0xFFF, 0x456}, 12), (std::vector<uint32_t>{0xFF123ABCu, 0x0000456Fu}));
}

TEST(VptqIndexStream, FixedVectors16Bit) {
  EXPECT_EQ(Pack({0x1234, 0xBEEF, 0x0001}, 16), (std::vector<uint32_t>{0xBEEF1234u, 0x00000001u}));
}

TEST(VptqIndexStream, FixedVectors16Plus8Bit) {
  // m = (res << 16) | idx: (0x1234, 0xAB), (0xFFFF, 0x01), (0x0000, 0xFF): 24-bit codes.
  const std::vector<uint32_t> codes = {VptqCombineCode(0x1234, 0xAB, 16), VptqCombineCode(0xFFFF, 0x01, 16),
                                       VptqCombineCode(0x0000, 0xFF, 16)};
  EXPECT_EQ(codes, (std::vector<uint32_t>{0xAB1234u, 0x01FFFFu, 0xFF0000u}));
  EXPECT_EQ(Pack(codes, 24), (std::vector<uint32_t>{0xFFAB1234u, 0x000001FFu, 0x000000FFu}));
}

TEST(VptqIndexStream, RoundTripsEveryKernelWidth) {
  Rng rng(3);
  for (int ib : {4, 8, 10, 12, 13, 14, 15, 16}) {
    for (int rb : {0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16}) {
      const int bits = ib + rb;
      for (int64_t count : {1, 7, 31, 32, 33, 130}) {
        std::vector<uint32_t> codes(static_cast<size_t>(count));
        for (uint32_t& c : codes) c = static_cast<uint32_t>(rng.NextU64() & ((uint64_t{1} << bits) - 1));
        const auto words = Pack(codes, bits);
        ASSERT_EQ(static_cast<int64_t>(words.size()), (count * bits + 31) / 32);
        EXPECT_EQ(UnpackIndexStream(words.data(), count, bits), codes) << ib << "+" << rb << " bits, " << count;
        // The tail of the last word is zero.
        const int used = static_cast<int>((count * bits) % 32);
        if (used != 0) {
          EXPECT_EQ(words.back() >> used, 0u);
        }
      }
    }
  }
}

TEST(VptqIndexStream, RejectsCodesThatDoNotFit) {
  const std::vector<uint32_t> codes = {1, 2, 256};
  auto p = PackIndexStream(codes.data(), 3, 8);
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("position 2"), std::string::npos) << p.status().message();
}

// ---- Config validation ------------------------------------------------------------------------

VptqLayerConfig Config(int64_t v, int64_t k, int64_t kr, int64_t in = 4096, int64_t out = 4096) {
  VptqOptions o;
  o.vector_len = static_cast<int>(v);
  o.num_centroids = k;
  o.num_res_centroids = kr;
  auto c = VptqConfigFromOptions(o, out, in, false);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return *c;
}

void ExpectInvalid(const VptqLayerConfig& c, const std::string& needle) {
  const Status s = ValidateVptqLayerConfig(c);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << needle;
  EXPECT_NE(s.message().find(needle), std::string::npos) << s.message();
}

TEST(VptqLayerConfigTest, TheIssueConfigsAreValid) {
  for (const auto& c : {Config(8, 65536, 256), Config(8, 65536, 0), Config(6, 4096, 0),
                        Config(12, 65536, 4096), Config(16, 65536, 65536), Config(2, 16, 4)}) {
    EXPECT_TRUE(ValidateVptqLayerConfig(c).ok()) << ValidateVptqLayerConfig(c).ToString();
  }
  const VptqLayerConfig c = Config(8, 65536, 256, 11008, 4096);
  EXPECT_EQ(c.vector_lens, (std::array<int64_t, 2>{-1, 8}));
  EXPECT_EQ(c.num_centroids, (std::array<int64_t, 2>{-1, 65536}));
  EXPECT_EQ(c.num_res_centroids, (std::array<int64_t, 2>{-1, 256}));
  EXPECT_EQ(c.group_num, 1);
  EXPECT_EQ(c.group_size, 11008);
  EXPECT_EQ(c.outlier_size, 0);
  EXPECT_FALSE(c.indices_as_float);
  EXPECT_TRUE(c.is_indice_packed);
  EXPECT_EQ(c.in_features, 11008);
  EXPECT_EQ(c.out_features, 4096);
  EXPECT_EQ(Config(8, 4096, 0).num_res_centroids, (std::array<int64_t, 2>{-1, -1}));
}

TEST(VptqLayerConfigTest, RefusesWhatTheKernelsCannotRun) {
  ExpectInvalid(Config(8, 2048, 0), "11 index bits");
  ExpectInvalid(Config(8, 32, 0), "5 index bits");
  ExpectInvalid(Config(8, 3000, 0), "not a power of two");
  ExpectInvalid(Config(8, 65536, 8192), "13 residual bits");
  ExpectInvalid(Config(8, 65536, 1), "0 residual bits");
  ExpectInvalid(Config(8, 65536, 100), "not a power of two");
  ExpectInvalid(Config(5, 4096, 0), "vector_len 5");
  ExpectInvalid(Config(32, 4096, 0), "vector_len 32");
  VptqLayerConfig g = Config(8, 8192, 0);
  g.group_num = 2;
  g.group_size = 2048;
  ExpectInvalid(g, "crashes the vptq dequant kernel");
  g.num_centroids[1] = 4096;
  EXPECT_TRUE(ValidateVptqLayerConfig(g).ok());
  VptqLayerConfig big = Config(8, 4096, 0, 70000);
  ExpectInvalid(big, "int16 perm");
  big.enable_perm = false;
  EXPECT_TRUE(ValidateVptqLayerConfig(big).ok());
  VptqLayerConfig s = Config(8, 4096, 0);
  s.group_size = 4000;
  ExpectInvalid(s, "!= in_features");
  s = Config(8, 4096, 0);
  s.indices_as_float = true;
  ExpectInvalid(s, "indices_as_float");
  s = Config(8, 4096, 0);
  s.is_indice_packed = false;
  ExpectInvalid(s, "is_indice_packed");
  s = Config(8, 4096, 0);
  s.outlier_size = 96;
  s.group_size = 4000;
  s.vector_lens[0] = 3;
  s.num_centroids[0] = 1024;
  ExpectInvalid(s, "outlier vector_lens[0] 3 is not 4: the vptq package's small-batch CUDA GEMV");
  s.vector_lens[0] = 8;  // a kernel vector length, but not the GEMV's
  ExpectInvalid(s, "outlier vector_lens[0] 8 is not 4");
  s.vector_lens[0] = 4;
  s.num_centroids[0] = 70000;
  ExpectInvalid(s, "outlier num_centroids 70000");
  s.num_centroids[0] = 65536;
  EXPECT_TRUE(ValidateVptqLayerConfig(s).ok());
  s = Config(8, 4096, 0);
  s.vector_lens[0] = 4;
  ExpectInvalid(s, "must be -1 without outliers");
}

// What some path of the package (torch dequant, CUDA dequant, CUDA GEMV) cannot decode exactly.
TEST(VptqLayerConfigTest, RefusesWhatSomeLoaderPathDecodesWrongly) {
  // Residual bits above the index bits: the torch path masks residual indices with the index
  // bits. Equal widths are fine.
  ExpectInvalid(Config(8, 256, 1024), "num_res_centroids 1024 (10 residual bits) exceeds num_centroids 256 (8 index bits)");
  ExpectInvalid(Config(8, 16, 32), "utils/pack.py");
  EXPECT_TRUE(ValidateVptqLayerConfig(Config(8, 256, 256)).ok());
  EXPECT_TRUE(ValidateVptqLayerConfig(Config(8, 1024, 256)).ok());
  // Outliers: v0 = 4 must divide v.
  for (int64_t v : {2, 4, 6, 8, 10, 12, 16}) {
    VptqLayerConfig o = Config(v, 4096, 0);
    o.outlier_size = 96;
    o.group_size = 4000;
    o.vector_lens[0] = 4;
    o.num_centroids[0] = 256;
    if (v % 4 == 0) {
      EXPECT_TRUE(ValidateVptqLayerConfig(o).ok()) << v << ": " << ValidateVptqLayerConfig(o).ToString();
    } else {
      ExpectInvalid(o, "vector_lens[1] " + std::to_string(v) + " is not a multiple of the outlier vector length 4");
    }
  }
  // Index rows shorter than one 32-bit word: 12-bit codes need at least 3 columns per group;
  // with a residual the row is wider.
  VptqLayerConfig small = Config(8, 4096, 0, 6);
  small.group_num = 3;
  small.group_size = 2;
  ExpectInvalid(small, "group_size 2 x 12 index bits = 24 < 32");
  small = Config(8, 4096, 16, 6);
  small.group_num = 3;
  small.group_size = 2;
  EXPECT_TRUE(ValidateVptqLayerConfig(small).ok()) << ValidateVptqLayerConfig(small).ToString();  // 2 x 16
}

// ---- A hand-built layer -----------------------------------------------------------------------

// out = 5 (v = 4: 2 vector rows, the last padded), in = 13: 1 outlier column (v0 = 4, k0 = 2,
// 2 vector rows), 2 groups of 6 columns, k = 16 (4 bits), kr = 4 (2 bits): 6 codes of 6 bits
// = 36 bits per index row (2 words), perm, norm. Within every limit of the vptq package.
VptqResult HandBuilt() {
  VptqResult r;
  r.out_features = 5;
  r.in_features = 13;
  r.vector_len = 4;
  r.num_centroids = 16;
  r.num_res_centroids = 4;
  r.outlier_size = 1;
  r.outlier_vector_len = 4;
  r.outlier_num_centroids = 2;
  r.group_num = 2;
  r.group_size = 6;
  r.enable_norm = true;
  r.enable_perm = true;
  r.num_vector_rows = 2;
  r.num_outlier_vector_rows = 2;
  r.centroids.resize(2);
  r.res_centroids.resize(2);
  for (int i = 0; i < 16; ++i) {
    const float f = static_cast<float>(i);
    r.centroids[0].insert(r.centroids[0].end(), {f, f + 0.5f, -f, 0.25f * f});  // C0[i]
    r.centroids[1].insert(r.centroids[1].end(), {10 + f, 10.5f + f, -(10 + f), 0.5f * f});  // C1[i]
  }
  for (int j = 0; j < 4; ++j) {
    const float f = static_cast<float>(j);
    r.res_centroids[0].insert(r.res_centroids[0].end(), {0.25f * (f + 1), -0.25f * (f + 1), 0.5f * f, -0.5f * f});
    r.res_centroids[1].insert(r.res_centroids[1].end(), {-0.5f * f, 0.5f * f, 0.25f, -0.25f});
  }
  // [G, R, S]
  r.indices = {3, 15, 0, 7, 9, 1, 2, 4, 15, 0, 5, 11, /* g1 */ 6, 8, 12, 13, 14, 10, 1, 3, 5, 7, 9, 15};
  r.res_indices = {1, 3, 0, 2, 3, 0, 2, 1, 3, 3, 0, 2, /* g1 */ 0, 1, 2, 3, 0, 1, 3, 2, 1, 0, 3, 2};
  r.outlier_centroids = {1, 2, 3, 4, -1, -2, -3, -4};
  r.outlier_indices = {1, 0};  // [R0 = 2, O = 1]
  r.perm = {3, 0, 12, 4, 1, 7, 2, 9, 11, 5, 10, 6, 8};
  r.weight_scale = {1, 2, 0.5f, 4, 1.5f, 0.25f, 1, 2, 0.5f, 1, 4, 0.75f, 1.25f};
  r.weight_bias = {0, 1, -1, 0.25f, 2, 0, -0.5f, 0.5f, 1, -2, 0, 0.125f, -1};
  return r;
}

// Computed apart from the code under test (a short script applying the header's formula by
// hand: Wp[r·v + t, O + g·S + c] = C[g][i][t] + R[g][j][t], outlier column 0 rows 0-3 =
// Co[1], row 4 = Co[0][0]; W[:, n] = Wp[:, argsort(perm)[n]] · scale[n] + bias[n]). E.g.
// W[0, 0]: perm[1] = 0, so Wp[0, 1] = C0[3][0] + R0[1][0] = 3 + 0.5 = 3.5, · 1 + 0.
const float kHandExpected[5][13] = {
    {3.5f, 16.5f, -0.375f, -3.75f, 2.375f, 5.25f, 23.5f, 20.5f, 10.75f, 14.0f, 86.0f, 13.25f, 19.0f},
    {3.0f, 14.5f, -0.375f, -7.75f, 2.375f, 5.875f, 24.0f, 17.5f, 11.5f, 14.5f, 100.0f, 14.375f, 17.125f},
    {-2.5f, -11.0f, -1.5f, -11.75f, 2.0f, -5.4375f, -24.25f, -14.5f, -8.875f, -17.75f, -91.0f, -13.1875f, -17.875f},
    {0.25f, 2.5f, -0.875f, -15.75f, 2.0f, 1.4375f, 6.25f, 2.0f, 3.375f, 0.75f, 25.0f, 2.9375f, 1.8125f},
    {2.75f, 3.0f, 4.875f, 4.25f, 26.0f, 3.625f, 17.0f, 11.0f, 13.0f, 7.5f, 68.0f, 9.125f, 4.625f},
};

TEST(VptqPackTest, HandBuiltLayerDequantizesToHandComputedValues) {
  const VptqResult r = HandBuilt();
  auto direct = DequantizeVptqResult(r);
  ASSERT_TRUE(direct.ok()) << direct.status().ToString();
  for (VptqModelDtype dt : {VptqModelDtype::kFloat16, VptqModelDtype::kBFloat16}) {
    auto t = PackVptqLayer(r, dt);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    auto w = DequantizeVptqLayer(*t);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int row = 0; row < 5; ++row) {
      for (int n = 0; n < 13; ++n) {
        EXPECT_EQ((*w)(row, n), kHandExpected[row][n]) << "(" << row << ", " << n << ")";
        EXPECT_EQ((*direct)(row, n), kHandExpected[row][n]) << "(" << row << ", " << n << ")";
      }
    }
    // indices (2, 2, 2): 6-bit codes; g0 r0 = (0x13, 0x3F, 0x00, 0x27, 0x39, 0x01) → stream
    // 0x0_799C0FD3: word 0 = 0x799C0FD3, word 1 = 0 (code 5's high bits are zero).
    const VptqTensor* idx = t->Find("indices");
    ASSERT_NE(idx, nullptr);
    EXPECT_EQ(idx->shape, (std::vector<int64_t>{2, 2, 2}));
    ASSERT_EQ(idx->bytes.size(), 32u);
    EXPECT_EQ(std::vector<uint8_t>(idx->bytes.begin(), idx->bytes.begin() + 8),
              (std::vector<uint8_t>{0xD3, 0x0F, 0x9C, 0x79, 0, 0, 0, 0}));
    // perm as uint16 little endian.
    const VptqTensor* perm = t->Find("perm");
    ASSERT_NE(perm, nullptr);
    EXPECT_EQ(perm->bytes, (std::vector<uint8_t>{3, 0, 0, 0, 12, 0, 4, 0, 1, 0, 7, 0, 2, 0,
                                                 9, 0, 11, 0, 5, 0, 10, 0, 6, 0, 8, 0}));
    // outlier_indices (1, 2, 1) int16 unpacked.
    const VptqTensor* oi = t->Find("outlier_indices");
    ASSERT_NE(oi, nullptr);
    EXPECT_EQ(oi->shape, (std::vector<int64_t>{1, 2, 1}));
    EXPECT_EQ(oi->bytes, (std::vector<uint8_t>{1, 0, 0, 0}));
  }
}

TEST(VptqPackTest, TensorListing) {
  const VptqResult r = HandBuilt();
  const std::vector<float> bias = {1, 2, 3, 4, 5};
  auto t = PackVptqLayer(r, VptqModelDtype::kBFloat16, &bias);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  struct Want {
    const char* suffix;
    const char* dtype;
    std::vector<int64_t> shape;
    size_t bytes;
  };
  const std::vector<Want> want = {
      {"centroids.weight", "BF16", {2, 64}, 256},     {"res_centroids.weight", "BF16", {2, 16}, 64},
      {"indices", "I32", {2, 2, 2}, 32},             {"perm", "I16", {13}, 26},
      {"weight_scale", "BF16", {13}, 26},             {"weight_bias", "BF16", {13}, 26},
      {"outlier_centroids.weight", "BF16", {1, 8}, 16}, {"outlier_indices", "I16", {1, 2, 1}, 4},
      {"bias", "BF16", {5}, 10},
  };
  ASSERT_EQ(t->tensors.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(t->tensors[i].suffix, want[i].suffix);
    EXPECT_EQ(t->tensors[i].dtype, want[i].dtype) << want[i].suffix;
    EXPECT_EQ(t->tensors[i].shape, want[i].shape) << want[i].suffix;
    EXPECT_EQ(t->tensors[i].bytes.size(), want[i].bytes) << want[i].suffix;
  }
  EXPECT_TRUE(t->config.bias);
  // bf16 of 1.0 = 0x3F80 little endian.
  EXPECT_EQ(t->Find("bias")->bytes[0], 0x80);
  EXPECT_EQ(t->Find("bias")->bytes[1], 0x3F);

  // A solve without residual, norm, perm and outliers.
  VptqResult plain = HandBuilt();
  plain.num_res_centroids = 0;
  plain.res_centroids.clear();
  plain.res_indices.clear();
  plain.enable_norm = false;
  plain.weight_scale.assign(12, 1.0f);
  plain.weight_bias.assign(12, 0.0f);
  plain.enable_perm = false;
  plain.perm = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  plain.outlier_size = 0;
  plain.outlier_vector_len = 0;
  plain.outlier_num_centroids = 0;
  plain.num_outlier_vector_rows = 0;
  plain.outlier_centroids.clear();
  plain.outlier_indices.clear();
  plain.in_features = 12;
  plain.group_num = 1;  // 12 columns x 4 bits: one index row of 48 bits
  plain.group_size = 12;
  plain.centroids.resize(1);
  auto t2 = PackVptqLayer(plain, VptqModelDtype::kFloat16);
  ASSERT_TRUE(t2.ok()) << t2.status().ToString();
  std::vector<std::string> names;
  for (const auto& x : t2->tensors) names.push_back(x.suffix);
  // No residual and no outliers: those tensors are absent. weight_scale, weight_bias and perm
  // are written as identities (VptqConfigFromResult: the package's CUDA paths read them).
  EXPECT_EQ(names, (std::vector<std::string>{"centroids.weight", "indices", "perm", "weight_scale", "weight_bias"}));
  EXPECT_TRUE(t2->config.enable_norm);
  EXPECT_TRUE(t2->config.enable_perm);
  EXPECT_EQ(t2->Find("weight_scale")->bytes[1], 0x3C);  // float16 1.0 = 0x3C00
  EXPECT_EQ(t2->Find("weight_bias")->bytes[1], 0x00);
  EXPECT_EQ(t2->Find("perm")->bytes[2], 1);  // perm[1] = 1
  EXPECT_EQ(t2->config.num_res_centroids, (std::array<int64_t, 2>{-1, -1}));
  EXPECT_EQ(t2->config.vector_lens, (std::array<int64_t, 2>{-1, 4}));
  auto w2 = DequantizeVptqLayer(*t2);
  auto d2 = DequantizeVptqResult(plain);
  ASSERT_TRUE(w2.ok() && d2.ok()) << w2.status().ToString() << d2.status().ToString();
  EXPECT_EQ(w2->data, d2->data);
}

TEST(VptqPackTest, RejectsBadResultsAndTensors) {
  VptqResult r = HandBuilt();
  r.indices[8] = 16;
  auto p = PackVptqLayer(r, VptqModelDtype::kFloat16);
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("group 0, row 1, column 2"), std::string::npos) << p.status().message();
  r = HandBuilt();
  r.perm[12] = 3;
  EXPECT_EQ(PackVptqLayer(r, VptqModelDtype::kFloat16).status().code(), StatusCode::kInvalidArgument);
  r = HandBuilt();
  r.num_centroids = 8;  // 3 index bits: not a kernel width
  r.indices.assign(24, 0);
  p = PackVptqLayer(r, VptqModelDtype::kFloat16);
  EXPECT_NE(p.status().message().find("3 index bits"), std::string::npos) << p.status().message();

  auto t = PackVptqLayer(HandBuilt(), VptqModelDtype::kFloat16);
  ASSERT_TRUE(t.ok());
  VptqLayerTensors missing = *t;
  missing.tensors.erase(missing.tensors.begin() + 3);  // perm
  auto m = DequantizeVptqLayer(missing);
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("'perm' is missing"), std::string::npos) << m.status().message();
  VptqLayerTensors shaped = *t;
  shaped.tensors[2].shape = {2, 4, 1};
  m = DequantizeVptqLayer(shaped);
  EXPECT_NE(m.status().message().find("'indices' has shape (2, 4, 1), expected (2, 2, 2)"), std::string::npos)
      << m.status().message();
  VptqLayerTensors outlier = *t;
  outlier.tensors[7].bytes[0] = 5;  // outlier index 5 >= k0 = 2
  m = DequantizeVptqLayer(outlier);
  EXPECT_NE(m.status().message().find("outlier_indices"), std::string::npos) << m.status().message();
}

// Solver → pack → decode gives exactly the solver's dequantized weights when the solver
// rounded its parameters to the same dtype.
TEST(VptqPackTest, SolverResultsRoundTrip) {
  const SyntheticLayer layer = MakeSyntheticLayer(100, 200, 512, 4);  // 100 % 8 != 0
  auto solver = NewCpuVptqSolver();
  VptqOptions o;
  o.vector_len = 8;
  o.num_centroids = 256;
  o.num_res_centroids = 16;
  o.outlier_size = 8;
  o.outlier_vector_len = 4;
  o.outlier_num_centroids = 64;
  o.group_num = 2;
  for (VptqModelDtype dt : {VptqModelDtype::kFloat16, VptqModelDtype::kBFloat16}) {
    o.param_dtype = dt == VptqModelDtype::kFloat16 ? VptqParamDtype::kFloat16 : VptqParamDtype::kBFloat16;
    auto r = solver->Quantize(layer.weight, layer.hessian, o);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    auto t = PackVptqLayer(*r, dt);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    EXPECT_TRUE(ValidateVptqLayerConfig(t->config).ok());
    EXPECT_EQ(t->Find("indices")->shape, (std::vector<int64_t>{2, 13, (96 * 12 + 31) / 32}));
    auto w = DequantizeVptqLayer(*t);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ(w->data, r->dequantized.data);
  }
}

}  // namespace
}  // namespace qforge::quant

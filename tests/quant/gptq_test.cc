// The blocked float32 GPTQ solver against the unblocked float64 oracle
// (quant/reference), against round-to-nearest, and its options, layouts and errors.
// The oracle comparisons run on the BLAS and on the portable linear algebra.
#include "quant/gptq.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "tests/quant/cached_layers.h"
#include "base/float16.h"
#include "quant/linalg_internal.h"
#include "quant/reference/gptq_ref.h"
#include "quant/synthetic.h"

namespace qforge::quant {
namespace {

// Tolerances of the float32 solver against the float64 oracle. A code can flip where a
// value lies within float rounding of a grid midpoint; the flip then changes that row's
// later feedback, so a few neighbours may follow.
constexpr double kMinCodeAgreement = 0.999;
constexpr double kLossRelTol = 1e-3;
// At 8 bits the grid step is 16x finer relative to float32 rounding than at 4 bits, so
// midpoint flips are that much likelier.
constexpr double kMinCodeAgreement8Bit = 0.995;
// Group params (scale within 1e-4 and equal zero): a flipped code changes the row's later
// groups' fits, so this is looser than the code agreement.
constexpr double kMinParamAgreement = 0.99;

double Agreement(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size() || a.empty()) return 0;
  size_t same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
  return static_cast<double>(same) / a.size();
}

double RelDiff(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-300); }

GptqResult Solve(const Matrix& w, const Matrix& h, const GptqOptions& o) {
  auto s = NewCpuGptqSolver()->Quantize(w, h, o);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return s.ok() ? *std::move(s) : GptqResult();
}

void ExpectMatchesOracle(const Matrix& w, const Matrix& h, const GptqOptions& o,
                         const std::string& what, double min_agreement = kMinCodeAgreement,
                         double loss_tol = kLossRelTol) {
  const GptqResult r = Solve(w, h, o);
  auto ref = reference::GptqReference(w, h, o);
  ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  const double agree = Agreement(r.codes, ref->codes);
  EXPECT_GE(agree, min_agreement) << what;
  EXPECT_LE(RelDiff(r.proxy_loss, ref->proxy_loss), loss_tol)
      << what << ": " << r.proxy_loss << " vs " << ref->proxy_loss;
  EXPECT_LE(RelDiff(r.output_error, ref->output_error), loss_tol)
      << what << ": " << r.output_error << " vs " << ref->output_error;
  EXPECT_EQ(r.g_idx, ref->g_idx) << what;
  EXPECT_EQ(r.perm, ref->perm) << what;
  EXPECT_EQ(r.num_groups, ref->num_groups) << what;
  EXPECT_EQ(r.cholesky_attempts, ref->cholesky_attempts) << what;
  EXPECT_DOUBLE_EQ(r.damp_percent_used, ref->damp_percent_used) << what;
  // Group params: equal zero points and scales within float accuracy for nearly all.
  size_t close = 0;
  for (size_t i = 0; i < r.scales.size(); ++i) {
    close += r.zeros[i] == ref->zeros[i] &&
             std::fabs(r.scales[i] - ref->scales[i]) <= 1e-4 * ref->scales[i];
  }
  EXPECT_GE(static_cast<double>(close) / r.scales.size(),
            std::min(min_agreement, kMinParamAgreement))
      << what;
  // The result's own dequantization is what output_error measured.
  const Matrix deq = DequantizeGptq(r);
  EXPECT_LE(RelDiff(OutputError(w, deq, h), r.output_error), 1e-12) << what;
  std::printf("%s: codes agree %.5f, proxy %.6g vs %.6g, output error %.6g vs %.6g\n", what.c_str(),
              agree, r.proxy_loss, ref->proxy_loss, r.output_error, ref->output_error);
}

class GptqOracleTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
#ifndef QFORGE_HAVE_BLAS
    if (!GetParam()) GTEST_SKIP() << "built without BLAS: the portable case covers this path";
#endif
    internal::SetForcePortableLinalg(GetParam());
  }
  void TearDown() override { internal::SetForcePortableLinalg(false); }
};

// 256 x 512 with groups of 128, and 96 x 300 with groups of 64 (not a multiple of the block:
// groups start inside blocks and the last block is partial), sym/asym, act-order on/off.
TEST_P(GptqOracleTest, MatchesFloat64Reference) {
  struct Case {
    int64_t out, in, samples;
    int group_size;
  };
  for (const Case& c : {Case{256, 512, 1024, 128}, Case{96, 300, 600, 64}}) {
    const SyntheticLayer& l = Layer(c.out, c.in, c.samples, 1);
    for (bool act_order : {false, true}) {
      for (bool sym : {true, false}) {
        GptqOptions o;
        o.group_size = c.group_size;
        o.act_order = act_order;
        o.sym = sym;
        ExpectMatchesOracle(l.weight, l.hessian, o,
                            std::to_string(c.out) + "x" + std::to_string(c.in) + " g" +
                                std::to_string(c.group_size) + (act_order ? " act" : "") +
                                (sym ? " sym" : " asym"));
      }
    }
  }
}

// reference_compat: the stale group fit (groups of 32 inside blocks of 128) and the sym
// quirk (rows made all-positive), against the oracle's emulation of both.
TEST_P(GptqOracleTest, ReferenceCompatMatchesReference) {
  SyntheticLayer l = Layer(128, 256, 512, 2);
  for (int64_t r = 0; r < 32; ++r) {
    for (int64_t j = 0; j < l.weight.cols; ++j) l.weight(r, j) = std::fabs(l.weight(r, j));
  }
  for (bool act_order : {false, true}) {
    GptqOptions o;
    o.group_size = 32;
    o.reference_compat = true;
    o.act_order = act_order;
    ExpectMatchesOracle(l.weight, l.hessian, o, act_order ? "compat g32 act" : "compat g32");
    o.block_size = 64;  // the stale fit depends on the block size; the oracle follows it
    ExpectMatchesOracle(l.weight, l.hessian, o, "compat g32 b64");
  }
}

// Per-channel, static groups with act-order, 2/3/8 bits, MSE: the rest of the option space.
TEST_P(GptqOracleTest, MatchesReferenceAcrossOptions) {
  const SyntheticLayer& l = Layer(96, 300, 600, 1);
  GptqOptions per_channel;
  per_channel.group_size = -1;
  ExpectMatchesOracle(l.weight, l.hessian, per_channel, "per-channel");
  GptqOptions stat;
  stat.group_size = 64;
  stat.static_groups = true;
  stat.act_order = true;
  ExpectMatchesOracle(l.weight, l.hessian, stat, "static act g64");
  for (int bits : {2, 3, 8}) {
    GptqOptions o;
    o.bits = bits;
    o.sym = bits != 3;
    o.group_size = 32;
    ExpectMatchesOracle(l.weight, l.hessian, o, "bits " + std::to_string(bits),
                        bits == 8 ? kMinCodeAgreement8Bit : kMinCodeAgreement);
  }
  // The MSE search compares candidates with a 1e-6-accurate power, so near-ties may pick a
  // neighbouring scale (1% apart) for a row's group; a looser bound for the codes.
  GptqOptions mse;
  mse.mse = true;
  mse.group_size = 64;
  ExpectMatchesOracle(l.weight, l.hessian, mse, "mse g64", 0.99, 1e-2);
}

// Degenerate shapes: a single weight, a single row, a single column, tiny groups/blocks.
TEST_P(GptqOracleTest, TinyShapesMatchReference) {
  struct Case {
    int64_t out, in;
    int group_size, block_size;
  };
  for (const Case& c : {Case{1, 1, 128, 128}, Case{1, 40, 8, 16}, Case{17, 1, -1, 128},
                        Case{3, 5, 2, 2}, Case{5, 33, 3, 7}}) {
    const SyntheticLayer& l = Layer(c.out, c.in, 64, 31);
    for (bool act_order : {false, true}) {
      GptqOptions o;
      o.group_size = c.group_size;
      o.block_size = c.block_size;
      o.act_order = act_order;
      o.sym = c.in % 2 == 1;
      ExpectMatchesOracle(
          l.weight, l.hessian, o,
          std::to_string(c.out) + "x" + std::to_string(c.in) + (act_order ? " act" : ""), 1.0,
          1e-4);
    }
  }
}

// Without stale group fits the block size only regroups the same arithmetic. On the
// portable path (our kernels, a fixed summation order on every x86-64) the codes are
// identical for these layers; BLAS kernels differ by CPU, so there the bound allows a rare
// float-reassociation flip.
TEST_P(GptqOracleTest, BlockSizeDoesNotChangeTheResult) {
  const bool portable = GetParam();
  const SyntheticLayer& l = Layer(96, 300, 600, 1);
  for (int gs : {32, 64, 100}) {
    GptqOptions o;
    o.group_size = gs;
    o.act_order = gs == 64;
    const GptqResult base = Solve(l.weight, l.hessian, o);
    for (int bs : {1, 7, 32, 100, 1000}) {
      o.block_size = bs;
      const GptqResult r = Solve(l.weight, l.hessian, o);
      const double agree = Agreement(r.codes, base.codes);
      if (portable) {
        EXPECT_EQ(r.codes, base.codes) << "gs " << gs << " bs " << bs;
      } else {
        EXPECT_GE(agree, 0.9995) << "gs " << gs << " bs " << bs;
      }
      EXPECT_LE(RelDiff(r.proxy_loss, base.proxy_loss), 1e-4) << "gs " << gs << " bs " << bs;
      if (agree < 1) std::printf("gs %d bs %d: codes agree %.6f\n", gs, bs, agree);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, GptqOracleTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? std::string("Portable") : std::string("Blas");
                         });

// GPTQ's error feedback beats round-to-nearest on the same grid at every bit width.
TEST(GptqTest, BeatsRoundToNearest) {
  const SyntheticLayer& l = Layer(256, 512, 1024, 3);
  for (int bits : {2, 3, 4, 8}) {
    for (bool act_order : {false, true}) {
      GptqOptions o;
      o.bits = bits;
      o.act_order = act_order;
      const GptqResult g = Solve(l.weight, l.hessian, o);
      auto rtn = QuantizeRtn(l.weight, l.hessian, o);
      ASSERT_TRUE(rtn.ok()) << rtn.status().ToString();
      std::printf("bits %d act %d: relative output error GPTQ %.5f, RTN %.5f\n", bits, act_order,
                  g.output_error / g.weight_energy, rtn->output_error / rtn->weight_energy);
      EXPECT_LT(g.output_error, 0.8 * rtn->output_error) << bits << " act " << act_order;
      EXPECT_DOUBLE_EQ(g.weight_energy, rtn->weight_energy);
      EXPECT_EQ(rtn->g_idx, g.g_idx);
    }
  }
}

// Act-order with groups: g_idx is the group of each column's processing position, scales
// are stored per group in processing order, the dequantization uses them, and act-order
// lowers the error on a Hessian with outlier channels.
TEST(GptqTest, ActOrderWithGroups) {
  const SyntheticLayer& l = Layer(256, 512, 1024, 4);
  GptqOptions o;
  o.group_size = 64;
  const GptqResult plain = Solve(l.weight, l.hessian, o);
  o.act_order = true;
  const GptqResult act = Solve(l.weight, l.hessian, o);
  ASSERT_EQ(act.perm.size(), 512u);
  bool permuted = false;
  for (int64_t k = 0; k < 512; ++k) {
    EXPECT_EQ(act.g_idx[act.perm[k]], k / 64) << k;
    EXPECT_EQ(plain.g_idx[k], k / 64);
    permuted |= act.perm[k] != k;
    if (k > 0) {
      EXPECT_GE(l.hessian(act.perm[k - 1], act.perm[k - 1]), l.hessian(act.perm[k], act.perm[k]));
    }
  }
  EXPECT_TRUE(permuted);
  EXPECT_EQ(act.num_groups, 8);
  // Each group's params fit its columns: every code is in range and the dequantized column
  // lies within the group's grid.
  const Matrix deq = DequantizeGptq(act);
  for (int64_t r = 0; r < 256; ++r) {
    for (int64_t j = 0; j < 512; ++j) {
      const int64_t g = act.g_idx[j];
      const float s = act.scales[g * 256 + r];
      EXPECT_LE(std::fabs(deq(r, j)), s * 8.0f + 1e-12f);
    }
  }
  std::printf("act-order g64: output error %.6g -> %.6g\n", plain.output_error, act.output_error);
  EXPECT_LT(act.output_error, 0.9 * plain.output_error);
}

TEST(GptqTest, StaticGroupsUseTheOriginalWeights) {
  const SyntheticLayer& l = Layer(64, 256, 512, 5);
  GptqOptions o;
  o.group_size = 32;
  o.static_groups = true;
  o.act_order = true;
  const GptqResult r = Solve(l.weight, l.hessian, o);
  const QuantizerOptions qo = GptqQuantizerOptions(o);
  for (int64_t j = 0; j < 256; ++j) ASSERT_EQ(r.g_idx[j], j / 32);  // original order
  for (int64_t g = 0; g < 8; ++g) {
    for (int64_t row = 0; row < 64; ++row) {
      const QuantParams p = FindQuantParams(l.weight.row(row) + g * 32, 32, 1, qo);
      ASSERT_EQ(r.scales[g * 64 + row], p.scale);
      ASSERT_EQ(r.zeros[g * 64 + row], p.zero);
    }
  }
  auto rtn = QuantizeRtn(l.weight, l.hessian, o);
  ASSERT_TRUE(rtn.ok());
  EXPECT_EQ(rtn->scales, r.scales);  // RTN fits the same groups on the same weights
  EXPECT_LT(r.output_error, rtn->output_error);
}

TEST(GptqTest, PerChannelIsOneGroup) {
  const SyntheticLayer& l = Layer(64, 256, 512, 5);
  GptqOptions o;
  o.group_size = -1;
  o.act_order = true;
  const GptqResult r = Solve(l.weight, l.hessian, o);
  EXPECT_EQ(r.group_size, 256);
  EXPECT_EQ(r.num_groups, 1);
  EXPECT_EQ(r.scales.size(), 64u);
  for (int32_t g : r.g_idx) ASSERT_EQ(g, 0);
  // A group larger than the layer is one group too.
  o.group_size = 1000;
  const GptqResult big = Solve(l.weight, l.hessian, o);
  EXPECT_EQ(big.num_groups, 1);
  EXPECT_EQ(big.codes, r.codes);
}

// The measurement reported in gptq.h: stale (reference) against fresh group fits for
// groups smaller than the block. The two are within noise of each other (a larger sweep,
// 128 configurations: stale/fresh geometric mean 0.9988); assert they stay within 3 %.
TEST(GptqTest, StaleAndFreshGroupFitsAreWithinNoise) {
  double fresh = 0, stale = 0;
  for (uint64_t seed : {1, 2, 3}) {
    const SyntheticLayer& l = Layer(128, 512, 1024, 10 + seed);
    for (bool sym : {false, true}) {
      GptqOptions o;
      o.group_size = 16;
      o.sym = sym;
      o.v1_zero_compat = false;
      fresh += Solve(l.weight, l.hessian, o).proxy_loss;
      o.stale_group_params = true;
      stale += Solve(l.weight, l.hessian, o).proxy_loss;
    }
  }
  std::printf("groups of 16 in blocks of 128: proxy loss fresh %.6g, stale %.6g (x%.4f)\n", fresh,
              stale, stale / fresh);
  EXPECT_NEAR(stale / fresh, 1.0, 0.03);
  EXPECT_NE(stale, fresh);  // the option does change the fit
}

// The sym quirk inside GPTQ: all-positive rows (|W|), 4 bits, groups of 32 (= block size,
// so only the quirk differs).
TEST(GptqTest, PositiveWeightsQuirkCostsLoss) {
  SyntheticLayer l = Layer(128, 256, 512, 6);
  for (float& v : l.weight.data) v = std::fabs(v);
  GptqOptions o;
  o.group_size = 32;
  o.block_size = 32;
  const double symmetric = Solve(l.weight, l.hessian, o).proxy_loss;
  o.reference_compat = true;
  const double quirk = Solve(l.weight, l.hessian, o).proxy_loss;
  std::printf("|W| 4-bit g32: proxy loss symmetric %.6g, quirk %.6g (x%.2f)\n", symmetric, quirk,
              quirk / symmetric);
  EXPECT_GT(quirk, 1.4 * symmetric);
}

// Asym zero points stay >= 1 with v1_zero_compat (all-positive rows force zero 0 otherwise).
TEST(GptqTest, V1ZeroCompatKeepsZeroAtLeastOne) {
  SyntheticLayer l = Layer(64, 256, 512, 7);
  for (int64_t r = 0; r < 16; ++r) {
    for (int64_t j = 0; j < 256; ++j) l.weight(r, j) = std::fabs(l.weight(r, j)) + 0.01f;
  }
  GptqOptions o;
  o.sym = false;
  o.group_size = 32;
  o.v1_zero_compat = false;
  const GptqResult free_zero = Solve(l.weight, l.hessian, o);
  int zeros_at_0 = 0;
  for (int32_t z : free_zero.zeros) zeros_at_0 += z == 0;
  EXPECT_GT(zeros_at_0, 0);
  o.v1_zero_compat = true;
  const GptqResult v1 = Solve(l.weight, l.hessian, o);
  for (int32_t z : v1.zeros) ASSERT_GE(z, 1);
  std::printf("asym g32, %d groups at zero 0: proxy loss %.6g -> %.6g with v1 zeros\n", zeros_at_0,
              free_zero.proxy_loss, v1.proxy_loss);
  EXPECT_LT(v1.proxy_loss, 1.2 * free_zero.proxy_loss);
}

TEST(GptqTest, DeadColumnsQuantizeToZero) {
  SyntheticLayer l = Layer(32, 128, 256, 8);
  for (int64_t i = 0; i < 128; ++i) {
    l.hessian(5, i) = l.hessian(i, 5) = 0;
    l.hessian(77, i) = l.hessian(i, 77) = 0;
  }
  GptqOptions o;
  o.act_order = true;
  o.sym = false;
  const GptqResult r = Solve(l.weight, l.hessian, o);
  const Matrix deq = DequantizeGptq(r);
  for (int64_t row = 0; row < 32; ++row) {
    EXPECT_EQ(deq(row, 5), 0.0f);
    EXPECT_EQ(deq(row, 77), 0.0f);
  }
  EXPECT_TRUE(std::isfinite(r.output_error));
  ExpectMatchesOracle(l.weight, l.hessian, o, "dead columns");
}

TEST(GptqTest, DequantizeWithF16Scales) {
  const SyntheticLayer& l = Layer(32, 128, 256, 9);
  const GptqResult r = Solve(l.weight, l.hessian, GptqOptions());
  const Matrix a = DequantizeGptq(r), b = DequantizeGptqF16Scales(r);
  ASSERT_EQ(a.size(), 32 * 128);
  for (int64_t row = 0; row < 32; ++row) {
    for (int64_t j = 0; j < 128; ++j) {
      const int64_t g = r.g_idx[j];
      const float s = r.scales[g * 32 + row];
      const int q = r.codes[row * 128 + j] - r.zeros[g * 32 + row];
      ASSERT_EQ(a(row, j), s * q);
      ASSERT_EQ(b(row, j), RoundToHalf(s) * q);
    }
  }
  GptqResult broken = r;
  broken.g_idx[3] = 7;  // only one group
  EXPECT_EQ(DequantizeGptq(broken).size(), 0);
}

TEST(GptqTest, OutputErrorMatchesDoubleLoops) {
  const SyntheticLayer& l = Layer(20, 70, 200, 12);
  Matrix w_hat = l.weight;
  Rng rng(1);
  for (float& v : w_hat.data) v += static_cast<float>(0.001 * rng.Normal());
  double ref = 0, energy = 0;
  for (int64_t r = 0; r < 20; ++r) {
    for (int64_t i = 0; i < 70; ++i) {
      for (int64_t j = 0; j < 70; ++j) {
        const double di = double(l.weight(r, i)) - w_hat(r, i);
        const double dj = double(l.weight(r, j)) - w_hat(r, j);
        ref += di * l.hessian(i, j) * dj;
        energy += double(l.weight(r, i)) * l.hessian(i, j) * l.weight(r, j);
      }
    }
  }
  EXPECT_NEAR(OutputError(l.weight, w_hat, l.hessian), ref, 1e-10 * ref);
  EXPECT_NEAR(WeightEnergy(l.weight, l.hessian), energy, 1e-10 * energy);
  EXPECT_TRUE(std::isnan(OutputError(l.weight, Matrix(3, 3), l.hessian)));
}

TEST(GptqTest, InvalidOptionsNameTheField) {
  const SyntheticLayer& l = Layer(32, 128, 256, 9);
  auto solver = NewCpuGptqSolver();
  EXPECT_STREQ(solver->backend(), "cpu");
  struct Bad {
    const char* field;
    void (*set)(GptqOptions&);
  };
  const Bad bad[] = {
      {"bits", [](GptqOptions& o) { o.bits = 5; }},
      {"group_size", [](GptqOptions& o) { o.group_size = 0; }},
      {"group_size", [](GptqOptions& o) { o.group_size = -2; }},
      {"block_size", [](GptqOptions& o) { o.block_size = 0; }},
      {"damp_percent", [](GptqOptions& o) { o.damp_percent = -0.01; }},
      {"damp_percent", [](GptqOptions& o) { o.damp_percent = std::nan(""); }},
      {"damp_auto_increment", [](GptqOptions& o) { o.damp_auto_increment = -1; }},
      {"max_damp_percent", [](GptqOptions& o) { o.max_damp_percent = -1; }},
  };
  for (const Bad& b : bad) {
    GptqOptions o;
    b.set(o);
    const Status v = ValidateGptqOptions(o, 32, 128);
    EXPECT_EQ(v.code(), StatusCode::kInvalidArgument) << b.field;
    EXPECT_NE(v.message().find(b.field), std::string::npos) << v.message();
    auto s = solver->Quantize(l.weight, l.hessian, o);
    EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument) << b.field;
    EXPECT_EQ(QuantizeRtn(l.weight, l.hessian, o).status().code(), StatusCode::kInvalidArgument);
  }
  EXPECT_NE(ValidateGptqOptions(GptqOptions(), 0, 128).message().find("out_features"),
            std::string::npos);
  EXPECT_NE(ValidateGptqOptions(GptqOptions(), 8, 0).message().find("in_features"),
            std::string::npos);
  EXPECT_TRUE(ValidateGptqOptions(GptqOptions(), 8, 8).ok());
}

TEST(GptqTest, BadInputsAreInvalidArgument) {
  const SyntheticLayer& l = Layer(32, 128, 256, 9);
  auto solver = NewCpuGptqSolver();
  Matrix w = l.weight;
  w(3, 17) = std::numeric_limits<float>::quiet_NaN();
  auto s = solver->Quantize(w, l.hessian, GptqOptions());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("W entry (3, 17) is not finite"), std::string::npos)
      << s.status().message();
  Matrix h = l.hessian;
  h(4, 9) = std::numeric_limits<float>::infinity();
  s = solver->Quantize(l.weight, h, GptqOptions());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("Hessian entry (4, 9)"), std::string::npos);
  s = solver->Quantize(l.weight, Matrix(127, 127), GptqOptions());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("does not match"), std::string::npos);
  Matrix torn = l.weight;
  torn.data.pop_back();
  EXPECT_EQ(solver->Quantize(torn, l.hessian, GptqOptions()).status().code(),
            StatusCode::kInvalidArgument);
  // Indefinite beyond any damping: FAILED_PRECONDITION.
  Matrix ind(128, 128);
  for (int64_t i = 0; i < 128; ++i) ind(i, i) = 1;
  ind(0, 1) = ind(1, 0) = 30;
  s = solver->Quantize(l.weight, ind, GptqOptions());
  EXPECT_EQ(s.status().code(), StatusCode::kFailedPrecondition) << s.status().ToString();
}

TEST(GptqTest, SyntheticLayerIsDeterministic) {
  const SyntheticLayer a = MakeSyntheticLayer(8, 40, 100, 42);
  const SyntheticLayer b = MakeSyntheticLayer(8, 40, 100, 42);
  EXPECT_EQ(a.weight.data, b.weight.data);
  EXPECT_EQ(a.hessian.data, b.hessian.data);
  const SyntheticLayer c = MakeSyntheticLayer(8, 40, 100, 43);
  EXPECT_NE(a.weight.data, c.weight.data);
  Rng rng(0);
  EXPECT_EQ(rng.NextU64(), 0xE220A8397B1DCDAFull);  // splitmix64(0), first output
  // H is symmetric PSD with a few outlier channels (diag far above the median).
  std::vector<float> d;
  for (int64_t i = 0; i < 40; ++i) {
    d.push_back(a.hessian(i, i));
    for (int64_t j = 0; j < 40; ++j) ASSERT_EQ(a.hessian(i, j), a.hessian(j, i));
  }
  std::sort(d.begin(), d.end());
  EXPECT_GT(d.back(), 50 * d[20]);
}

}  // namespace
}  // namespace qforge::quant

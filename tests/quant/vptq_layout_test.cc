// Tests of the host-side pieces every VPTQ backend shares (quant/vptq_layout.h): the
// geometry of parts for sizes that are not multiples of the vector lengths, the input checks
// and their messages, the result header, and the normalisation set-up on small layers with a
// dead column (including that the CPU solver's result is exactly this set-up).
#include "quant/vptq_layout.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "base/float16.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"

namespace qforge::quant {
namespace {

// 61 rows: not a multiple of v = 6 or v0 = 8; 100 columns: 4 outliers + 2 groups of 48.
VptqOptions OddShapeOptions() {
  VptqOptions o;
  o.vector_len = 6;
  o.num_centroids = 48;
  o.num_res_centroids = 8;
  o.outlier_size = 4;
  o.outlier_vector_len = 8;
  o.outlier_num_centroids = 16;
  o.group_num = 2;
  return o;
}

TEST(VptqLayoutTest, VectorRowsRoundUp) {
  EXPECT_EQ(VptqVectorRows(61, 6), 11);
  EXPECT_EQ(VptqVectorRows(60, 6), 10);
  EXPECT_EQ(VptqVectorRows(61, 8), 8);
  EXPECT_EQ(VptqVectorRows(1, 8), 1);
}

TEST(VptqLayoutTest, GeometryOfNonMultipleSizesWithOutliersAndGroups) {
  const VptqGeometry g = MakeVptqGeometry(61, 100, OddShapeOptions());
  EXPECT_EQ(g.M, 61);
  EXPECT_EQ(g.N, 100);
  EXPECT_EQ(g.O, 4);
  EXPECT_EQ(g.G, 2);
  EXPECT_EQ(g.S, 48);
  EXPECT_EQ(g.v, 6);
  EXPECT_EQ(g.v0, 8);
  EXPECT_EQ(g.R, 11);
  EXPECT_EQ(g.R0, 8);
  EXPECT_EQ(g.Mpad, 66);  // max(11·6, 8·8)
  EXPECT_EQ(g.GroupBegin(0), 4);
  EXPECT_EQ(g.GroupBegin(1), 52);
}

TEST(VptqLayoutTest, OutlierPaddingCanSetThePaddedRows) {
  VptqOptions o = OddShapeOptions();
  o.vector_len = 4;         // R·v = 16·4 = 64
  o.outlier_vector_len = 6;  // R0·v0 = 11·6 = 66
  const VptqGeometry g = MakeVptqGeometry(61, 100, o);
  EXPECT_EQ(g.R, 16);
  EXPECT_EQ(g.R0, 11);
  EXPECT_EQ(g.Mpad, 66);
}

TEST(VptqLayoutTest, GeometryWithoutOutliersIgnoresOutlierOptions) {
  VptqOptions o;
  o.vector_len = 8;
  o.outlier_vector_len = 16;  // unused without outliers
  o.group_num = 3;
  const VptqGeometry g = MakeVptqGeometry(50, 72, o);
  EXPECT_EQ(g.O, 0);
  EXPECT_EQ(g.v0, 0);
  EXPECT_EQ(g.R0, 0);
  EXPECT_EQ(g.S, 24);
  EXPECT_EQ(g.R, 7);
  EXPECT_EQ(g.Mpad, 56);
}

TEST(VptqLayoutTest, PartsCoverEveryColumnOnce) {
  const VptqGeometry g = MakeVptqGeometry(61, 100, OddShapeOptions());
  const VptqColumnPart first = g.Part(0), last_outlier = g.Part(3);
  EXPECT_TRUE(first.outlier);
  EXPECT_EQ(first.pos, 0);
  EXPECT_TRUE(last_outlier.outlier);
  EXPECT_EQ(last_outlier.pos, 3);
  const VptqColumnPart g0_first = g.Part(4), g0_last = g.Part(51), g1_first = g.Part(52), g1_last = g.Part(99);
  EXPECT_FALSE(g0_first.outlier);
  EXPECT_EQ(g0_first.group, 0);
  EXPECT_EQ(g0_first.pos, 0);
  EXPECT_EQ(g0_last.group, 0);
  EXPECT_EQ(g0_last.pos, 47);
  EXPECT_EQ(g1_first.group, 1);
  EXPECT_EQ(g1_first.pos, 0);
  EXPECT_EQ(g1_last.group, 1);
  EXPECT_EQ(g1_last.pos, 47);
  // Every (group, position) and every outlier position is hit exactly once, and the part
  // maps back to the column.
  std::vector<int> seen(static_cast<size_t>(g.N), 0);
  for (int64_t p = 0; p < g.N; ++p) {
    const VptqColumnPart part = g.Part(p);
    const int64_t back = part.outlier ? part.pos : g.GroupBegin(part.group) + part.pos;
    ASSERT_EQ(back, p);
    ASSERT_LT(part.pos, part.outlier ? g.O : g.S);
    ++seen[static_cast<size_t>(back)];
  }
  for (int n : seen) EXPECT_EQ(n, 1);
}

TEST(VptqLayoutTest, ResultHeaderDescribesTheGeometry) {
  VptqOptions o = OddShapeOptions();
  o.enable_perm = false;
  o.param_dtype = VptqParamDtype::kBFloat16;
  const VptqResult r = MakeVptqResultHeader(MakeVptqGeometry(61, 100, o), o);
  EXPECT_EQ(r.out_features, 61);
  EXPECT_EQ(r.in_features, 100);
  EXPECT_EQ(r.vector_len, 6);
  EXPECT_EQ(r.num_centroids, 48);
  EXPECT_EQ(r.num_res_centroids, 8);
  EXPECT_EQ(r.outlier_size, 4);
  EXPECT_EQ(r.outlier_vector_len, 8);
  EXPECT_EQ(r.outlier_num_centroids, 16);
  EXPECT_EQ(r.group_num, 2);
  EXPECT_EQ(r.group_size, 48);
  EXPECT_TRUE(r.enable_norm);
  EXPECT_FALSE(r.enable_perm);
  EXPECT_EQ(r.param_dtype, VptqParamDtype::kBFloat16);
  EXPECT_EQ(r.num_vector_rows, 11);
  EXPECT_EQ(r.num_outlier_vector_rows, 8);
  EXPECT_TRUE(r.centroids.empty());
  EXPECT_TRUE(r.perm.empty());
}

TEST(VptqLayoutTest, ResultHeaderWithoutOutliersZeroesTheOutlierCodebook) {
  VptqOptions o;
  o.outlier_num_centroids = 4096;  // the default, unused without outliers
  const VptqResult r = MakeVptqResultHeader(MakeVptqGeometry(16, 32, o), o);
  EXPECT_EQ(r.outlier_size, 0);
  EXPECT_EQ(r.outlier_vector_len, 0);
  EXPECT_EQ(r.outlier_num_centroids, 0);
  EXPECT_EQ(r.num_outlier_vector_rows, 0);
}

// ---- Input checks.

struct Inputs {
  Matrix w{8, 12};
  Matrix h{12, 12};
  VptqOptions o;
  Inputs() {
    for (int64_t i = 0; i < w.size(); ++i) w.data[static_cast<size_t>(i)] = 0.01f * static_cast<float>(i % 7);
    for (int64_t c = 0; c < 12; ++c) h(c, c) = 1.0f;
    o.vector_len = 4;
    o.num_centroids = 8;
  }
};

TEST(VptqLayoutTest, ChecksAcceptValidInputs) {
  const Inputs in;
  EXPECT_TRUE(CheckVptqInputs(in.w, in.h, in.o).ok());
}

TEST(VptqLayoutTest, ChecksNameTheNonFiniteWeightEntry) {
  Inputs in;
  in.w(2, 5) = std::nanf("");
  in.w(3, 0) = std::numeric_limits<float>::infinity();
  const Status s = CheckVptqInputs(in.w, in.h, in.o);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "weight entry (2, 5) is not finite");
}

TEST(VptqLayoutTest, ChecksLeaveHessianFinitenessToTheCaller) {
  Inputs in;
  in.h(3, 4) = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(CheckVptqInputs(in.w, in.h, in.o).ok());
  const Status s = CheckMatrixFinite(in.h, "Hessian");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "Hessian entry (3, 4) is not finite");
}

TEST(VptqLayoutTest, ChecksNameTheHessianShape) {
  Inputs in;
  in.h = Matrix(11, 12);
  const Status s = CheckVptqInputs(in.w, in.h, in.o);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "Hessian must be [12, 12] for a weight of 12 input features, got [11, 12]");
}

TEST(VptqLayoutTest, ChecksRefuseStorageThatDoesNotMatchTheShape) {
  Inputs in;
  in.w.data.pop_back();
  Status s = CheckVptqInputs(in.w, in.h, in.o);
  EXPECT_EQ(s.message(), "weight storage does not match its shape");
  Inputs in2;
  in2.h.data.push_back(0);
  s = CheckVptqInputs(in2.w, in2.h, in2.o);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("Hessian must be [12, 12]"), std::string::npos) << s.message();
}

TEST(VptqLayoutTest, ChecksValidateTheOptionsFirst) {
  Inputs in;
  in.o.group_num = 5;          // 12 % 5 != 0
  in.w(0, 0) = std::nanf("");  // also wrong, reported second
  const Status s = CheckVptqInputs(in.w, in.h, in.o);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "VPTQ options: in_features - outlier_size = 12 is not divisible by group_num = 5");
}

// ---- Normalisation set-up.

TEST(VptqLayoutTest, RoundsParametersToTheStoredDtype) {
  const float x = 0.1f;
  EXPECT_EQ(RoundVptqParam(x, VptqParamDtype::kFloat32), x);
  EXPECT_EQ(RoundVptqParam(x, VptqParamDtype::kFloat16), HalfToFloat(FloatToHalf(x)));
  EXPECT_NE(RoundVptqParam(x, VptqParamDtype::kFloat16), x);
  EXPECT_EQ(RoundVptqParam(x, VptqParamDtype::kBFloat16), BFloat16ToFloat(FloatToBFloat16(x)));
  EXPECT_NE(RoundVptqParam(x, VptqParamDtype::kBFloat16), RoundVptqParam(x, VptqParamDtype::kFloat16));
}

TEST(VptqLayoutTest, FindsDeadColumnsByTheirHessianDiagonal) {
  Matrix h(5, 5);
  for (int64_t c = 0; c < 5; ++c) h(c, c) = 2.0f;
  h(1, 1) = 0.0f;
  h(4, 4) = -0.0f;  // == 0
  h(2, 3) = 0.0f;   // off-diagonal zeros do not matter
  EXPECT_EQ(FindDeadColumns(h), (std::vector<int32_t>{1, 4}));
}

TEST(VptqLayoutTest, ColumnNormIsTheRoundedRange) {
  const VptqColumnNorm n = ColumnNormFromRange(-1.0f, 2.0f, VptqParamDtype::kFloat16);
  EXPECT_EQ(n.scale, 3.0f);
  EXPECT_EQ(n.bias, -1.0f);
  const VptqColumnNorm r = ColumnNormFromRange(0.1f, 0.3f, VptqParamDtype::kFloat16);
  EXPECT_EQ(r.scale, RoundVptqParam(0.3f - 0.1f, VptqParamDtype::kFloat16));
  EXPECT_EQ(r.bias, RoundVptqParam(0.1f, VptqParamDtype::kFloat16));
  const VptqColumnNorm dead = ColumnNormFromRange(0.0f, 0.0f, VptqParamDtype::kFloat16);
  EXPECT_EQ(dead.scale, 0.0f);
  EXPECT_EQ(dead.bias, 0.0f);
  // 120000 overflows float16: the scale becomes 0 (the column is then stored as its bias).
  const VptqColumnNorm wide = ColumnNormFromRange(-60000.0f, 60000.0f, VptqParamDtype::kFloat16);
  EXPECT_EQ(wide.scale, 0.0f);
  EXPECT_EQ(wide.bias, -60000.0f);
  EXPECT_EQ(ColumnNormFromRange(-60000.0f, 60000.0f, VptqParamDtype::kFloat32).scale, 120000.0f);
}

TEST(VptqLayoutTest, ScaledHessianOnlyWithNormalisationInTheScaledSpace) {
  VptqOptions o;
  EXPECT_TRUE(UsesScaledHessian(o));
  o.hessian_space = HessianSpace::kReference;
  EXPECT_FALSE(UsesScaledHessian(o));
  o.hessian_space = HessianSpace::kScaled;
  o.enable_norm = false;
  EXPECT_FALSE(UsesScaledHessian(o));
}

TEST(VptqLayoutTest, ScaleHessianIsDiagSHDiagS) {
  Matrix h(2, 2);
  h(0, 0) = 4;
  h(0, 1) = 1;
  h(1, 0) = 3;
  h(1, 1) = 9;
  const Matrix hs = ScaleHessian(h, {0.5f, 2.0f});
  EXPECT_EQ(hs(0, 0), 1.0f);
  EXPECT_EQ(hs(0, 1), 1.0f);
  EXPECT_EQ(hs(1, 0), 3.0f);
  EXPECT_EQ(hs(1, 1), 36.0f);
}

TEST(VptqLayoutTest, NormalizedDiagonalIsBitIdenticalToTheScaledHessiansDiagonal) {
  const SyntheticLayer L = MakeSyntheticLayer(8, 40, 160, 5);
  std::vector<float> scale(40);
  for (size_t c = 0; c < scale.size(); ++c) scale[c] = 0.013f * static_cast<float>(c + 1) + 0.37f;
  const Matrix hs = ScaleHessian(L.hessian, scale);
  const std::vector<float> scaled = NormalizedHessianDiagonal(L.hessian, scale, true);
  const std::vector<float> plain = NormalizedHessianDiagonal(L.hessian, scale, false);
  for (int64_t c = 0; c < 40; ++c) {
    EXPECT_EQ(scaled[static_cast<size_t>(c)], hs(c, c)) << c;
    EXPECT_EQ(plain[static_cast<size_t>(c)], L.hessian(c, c)) << c;
  }
}

TEST(VptqLayoutTest, KMeansWeightsFollowThePermutation) {
  const std::vector<float> diag = {2.0f, 0.0f, 5.0f, -1.0f};
  const std::vector<int32_t> perm = {2, 0, 1, 3};
  EXPECT_EQ(KMeansColumnWeights(diag, perm, true), (std::vector<float>{5.0f, 2.0f, 0.0f, 0.0f}));
  EXPECT_EQ(KMeansColumnWeights(diag, perm, false), (std::vector<float>(4, 1.0f)));
}

TEST(VptqLayoutTest, KMeansTrainsOnFullVectorsOrTheOnePaddedOne) {
  EXPECT_EQ(KMeansVectorsPerColumn(61, 8), 7);
  EXPECT_EQ(KMeansVectorsPerColumn(64, 8), 8);
  EXPECT_EQ(KMeansVectorsPerColumn(5, 8), 1);
}

TEST(VptqLayoutTest, KMeansOptionsComeFromTheVptqOptions) {
  VptqOptions o;
  o.kmeans_iterations = 17;
  o.kmeans_tol = 0.25;
  o.kmeans_init = KMeansInit::kRandom;
  o.kmeans_init_max_samples = 999;
  const KMeansOptions ko = VptqKMeansOptions(o, 64, 1234);
  EXPECT_EQ(ko.num_centroids, 64);
  EXPECT_EQ(ko.seed, 1234u);
  EXPECT_EQ(ko.max_iterations, 17);
  EXPECT_EQ(ko.tol, 0.25);
  EXPECT_EQ(ko.init, KMeansInit::kRandom);
  EXPECT_EQ(ko.init_max_samples, 999);
}

// The CPU solver's dead columns, scales and biases on a small layer with a dead column are
// exactly the shared set-up: dead columns from diag(H), each column's norm from its range with
// the dead column read as 0.
TEST(VptqLayoutTest, CpuSolverUsesTheSharedNormalisationSetUp) {
  SyntheticLayer L = MakeSyntheticLayer(13, 24, 96, 21);
  for (int64_t i = 0; i < 24; ++i) {
    L.hessian(5, i) = 0;
    L.hessian(i, 5) = 0;
  }
  VptqOptions o;
  o.vector_len = 4;  // 13 rows: a partial last vector
  o.num_centroids = 8;
  o.kmeans_iterations = 5;
  auto r = NewCpuVptqSolver()->Quantize(L.weight, L.hessian, o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(FindDeadColumns(L.hessian), (std::vector<int32_t>{5}));
  EXPECT_EQ(r->dead_columns, (std::vector<int32_t>{5}));
  ASSERT_EQ(r->weight_scale.size(), 24u);
  for (int64_t c = 0; c < 24; ++c) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    for (int64_t row = 0; row < 13; ++row) {
      const float x = c == 5 ? 0.0f : L.weight(row, c);
      mn = std::min(mn, x);
      mx = std::max(mx, x);
    }
    const VptqColumnNorm n = ColumnNormFromRange(mn, mx, o.param_dtype);
    EXPECT_EQ(r->weight_scale[static_cast<size_t>(c)], n.scale) << c;
    EXPECT_EQ(r->weight_bias[static_cast<size_t>(c)], n.bias) << c;
  }
  EXPECT_EQ(r->weight_scale[5], 0.0f);
  EXPECT_EQ(r->weight_bias[5], 0.0f);
  // The dead column decodes to its bias, 0.
  for (int64_t row = 0; row < 13; ++row) EXPECT_EQ(r->dequantized(row, 5), 0.0f);
  EXPECT_EQ(r->num_vector_rows, 4);
  EXPECT_EQ(r->indices.size(), 4u * 24u);
}

}  // namespace
}  // namespace qforge::quant

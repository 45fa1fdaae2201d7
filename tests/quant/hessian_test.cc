// Hessian preparation (dead columns, act-order, damping with automatic increase, factor of
// the inverse) against a double reference, and the running-mean accumulator. Both the BLAS
// and the portable path.
// clang-format off
#include <cstddef>  // base/matrix.h uses ::size_t without including it
#include "quant/hessian.h"
// clang-format on

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "quant/linalg_internal.h"
#include "quant/synthetic.h"

namespace qforge::quant {
namespace {

using Dense = std::vector<double>;

// The reference sequence in double: Cholesky of M, inverse, upper Cholesky of the inverse.
Dense InverseUpperFactorRef(const Dense& m, int64_t n) {
  auto chol = [n](const Dense& a) {
    Dense l(n * n, 0.0);
    for (int64_t j = 0; j < n; ++j) {
      double s = a[j * n + j];
      for (int64_t k = 0; k < j; ++k) s -= l[j * n + k] * l[j * n + k];
      l[j * n + j] = std::sqrt(s);
      for (int64_t i = j + 1; i < n; ++i) {
        double t = a[i * n + j];
        for (int64_t k = 0; k < j; ++k) t -= l[i * n + k] * l[j * n + k];
        l[i * n + j] = t / l[j * n + j];
      }
    }
    return l;
  };
  const Dense l = chol(m);
  Dense x(n * n, 0.0);  // L⁻¹
  for (int64_t j = 0; j < n; ++j) {
    x[j * n + j] = 1 / l[j * n + j];
    for (int64_t i = j + 1; i < n; ++i) {
      double s = 0;
      for (int64_t k = j; k < i; ++k) s += l[i * n + k] * x[k * n + j];
      x[i * n + j] = -s / l[i * n + i];
    }
  }
  Dense inv(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t k = std::max(i, j); k < n; ++k) s += x[k * n + i] * x[k * n + j];
      inv[i * n + j] = s;
    }
  }
  const Dense l2 = chol(inv);
  Dense u(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = i; j < n; ++j) u[i * n + j] = l2[j * n + i];
  }
  return u;
}

class HessianTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
#ifndef QFORGE_HAVE_BLAS
    if (!GetParam()) GTEST_SKIP() << "built without BLAS: the portable case covers this path";
#endif
    internal::SetForcePortableLinalg(GetParam());
  }
  void TearDown() override { internal::SetForcePortableLinalg(false); }
};

TEST_P(HessianTest, IdentityGivesScaledIdentity) {
  Matrix h(5, 5);
  for (int i = 0; i < 5; ++i) h(i, i) = 1;
  HessianOptions o;
  o.damp_percent = 0.25;
  auto p = PrepareHessian(h, o);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->cholesky_attempts, 1);
  EXPECT_DOUBLE_EQ(p->damp_percent_used, 0.25);
  EXPECT_TRUE(p->dead_columns.empty());
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(p->perm[i], i);
    for (int j = 0; j < 5; ++j) {
      EXPECT_NEAR(p->hinv_upper(i, j), i == j ? 1 / std::sqrt(1.25) : 0.0, 1e-7);
    }
  }
}

// U against the double reference on a synthetic Hessian with outlier channels, with and
// without act-order. The float factor is compared relative to max|U|: the damped H has
// condition number up to ~1e4 here, float Cholesky + inverse loses ~cond·u.
TEST_P(HessianTest, FactorMatchesDoubleReference) {
  const int64_t n = 160;
  const SyntheticLayer layer = MakeSyntheticLayer(4, n, 400, 17);
  for (bool act_order : {false, true}) {
    HessianOptions o;
    o.act_order = act_order;
    auto p = PrepareHessian(layer.hessian, o);
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    ASSERT_EQ(p->cholesky_attempts, 1);
    // perm: descending diagonal, or identity.
    for (int64_t k = 0; k < n; ++k) {
      if (!act_order) {
        ASSERT_EQ(p->perm[k], k);
      } else if (k > 0) {
        ASSERT_GE(layer.hessian(p->perm[k - 1], p->perm[k - 1]),
                  layer.hessian(p->perm[k], p->perm[k]));
      }
    }
    double mean = 0;
    for (int64_t i = 0; i < n; ++i) mean += layer.hessian(i, i);
    mean /= n;
    Dense m(n * n);
    for (int64_t a = 0; a < n; ++a) {
      for (int64_t b = 0; b < n; ++b) {
        m[a * n + b] = layer.hessian(p->perm[a], p->perm[b]) + (a == b ? 0.01 * mean : 0.0);
      }
    }
    const Dense u = InverseUpperFactorRef(m, n);
    double umax = 0;
    for (double v : u) umax = std::max(umax, std::fabs(v));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        ASSERT_NEAR(p->hinv_upper(i, j), u[i * n + j], 2e-3 * umax)
            << "act_order=" << act_order << " (" << i << ", " << j << ")";
      }
    }
  }
}

TEST_P(HessianTest, DeadColumnsGetUnitDiagonal) {
  const int64_t n = 6;
  Matrix h(n, n);
  for (int64_t i = 0; i < n; ++i) h(i, i) = 4.0f + i;
  h(0, 1) = h(1, 0) = 0.5f;
  h(2, 2) = 0;
  h(5, 5) = 0;
  HessianOptions o;
  o.act_order = true;
  o.damp_percent = 0;
  auto p = PrepareHessian(h, o);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->dead_columns, (std::vector<int32_t>{2, 5}));
  // diag after the fix: 4 5 1 7 8 1 -> descending, ties in original order.
  EXPECT_EQ(p->perm, (std::vector<int32_t>{4, 3, 1, 0, 2, 5}));
  // Dead columns are independent unit columns: their U diagonal is 1.
  EXPECT_NEAR(p->hinv_upper(4, 4), 1.0, 1e-6);
  EXPECT_NEAR(p->hinv_upper(5, 5), 1.0, 1e-6);
}

// [[1, 1.045], [1.045, 1]] ⊕ I has eigenvalue -0.045, mean diagonal 1: damping 0.01..0.04
// fails, 0.05 succeeds on the fifth attempt.
TEST_P(HessianTest, DampingIncreasesUntilPositiveDefinite) {
  Matrix h(3, 3);
  h(0, 0) = h(1, 1) = h(2, 2) = 1;
  h(0, 1) = h(1, 0) = 1.045f;
  HessianOptions o;  // 0.01 + 0.01 per attempt
  auto p = PrepareHessian(h, o);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->cholesky_attempts, 5);
  EXPECT_NEAR(p->damp_percent_used, 0.05, 1e-12);

  // Singular PSD (all ones, rank 1) without damping: the second pivot is exactly 0.
  Matrix ones(4, 4, 1.0f);
  o.damp_percent = 0;
  p = PrepareHessian(ones, o);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->cholesky_attempts, 2);
  EXPECT_NEAR(p->damp_percent_used, 0.01, 1e-12);

  // No retries allowed.
  o.damp_auto_increment = 0;
  p = PrepareHessian(ones, o);
  EXPECT_EQ(p.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(p.status().message().find("damp_percent=0 after 1 attempt"), std::string::npos)
      << p.status().message();
}

TEST_P(HessianTest, FailsWhenNoDampingHelps) {
  Matrix h(2, 2);
  h(0, 0) = h(1, 1) = 1;
  h(0, 1) = h(1, 0) = 10;  // eigenvalue -9: needs damping > 900 %
  HessianOptions o;
  o.damp_auto_increment = 0.1;
  auto p = PrepareHessian(h, o);
  ASSERT_EQ(p.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(p.status().message().find(
                "not positive definite even with damp_percent=0.91 after 10 attempt(s)"),
            std::string::npos)
      << p.status().message();
  EXPECT_NE(p.status().message().find("pivot"), std::string::npos) << p.status().message();
}

TEST_P(HessianTest, RejectsInvalidInput) {
  HessianOptions o;
  EXPECT_EQ(PrepareHessian(Matrix(2, 3), o).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(PrepareHessian(Matrix(), o).status().code(), StatusCode::kInvalidArgument);
  Matrix h(3, 3);
  for (int i = 0; i < 3; ++i) h(i, i) = 1;
  h(1, 2) = std::numeric_limits<float>::infinity();
  auto p = PrepareHessian(h, o);
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("entry (1, 2) is not finite"), std::string::npos)
      << p.status().message();
  h(1, 2) = 0;
  h(2, 2) = -1;
  p = PrepareHessian(h, o);
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("diagonal entry 2 is negative"), std::string::npos)
      << p.status().message();
  h(2, 2) = 1;
  o.damp_percent = -0.1;
  p = PrepareHessian(h, o);
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("damp_percent"), std::string::npos);
}

// The accumulator equals 2/n XᵀX over all samples, whatever the batching.
TEST_P(HessianTest, AccumulatorIsTheRunningMean) {
  const int64_t in = 37, total = 700;
  Rng rng(3);
  std::vector<float> x(total * in);
  for (float& v : x) v = static_cast<float>(rng.StudentT(4));
  HessianAccumulator acc(in);
  int64_t done = 0;
  for (int64_t b : {1, 99, 600}) {
    ASSERT_TRUE(acc.Add(x.data() + done * in, b).ok());
    done += b;
  }
  ASSERT_TRUE(acc.Add(x.data(), 0).ok());
  EXPECT_EQ(acc.num_samples(), total);
  for (int64_t i = 0; i < in; ++i) {
    for (int64_t j = 0; j < in; ++j) {
      double s = 0, mag = 0;
      for (int64_t r = 0; r < total; ++r) {
        s += double(x[r * in + i]) * x[r * in + j];
        mag += std::fabs(double(x[r * in + i]) * x[r * in + j]);
      }
      ASSERT_NEAR(acc.hessian()(i, j), 2.0 * s / total, 1e-13 * mag) << i << "," << j;
    }
  }
  const Matrix f = acc.HessianF32();
  EXPECT_EQ(f(3, 5), static_cast<float>(acc.hessian()(3, 5)));
  x[5] = std::numeric_limits<float>::quiet_NaN();
  const Status s = acc.Add(x.data(), 2);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("row 0, column 5"), std::string::npos) << s.message();
  EXPECT_EQ(acc.Add(x.data(), -1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(acc.Add(nullptr, 3).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(acc.num_samples(), total);
}

INSTANTIATE_TEST_SUITE_P(Paths, HessianTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? std::string("Portable") : std::string("Blas");
                         });

}  // namespace
}  // namespace qforge::quant

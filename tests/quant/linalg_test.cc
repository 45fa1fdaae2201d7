// Linear algebra of the CPU solvers against plain double loops, on the BLAS path and on the
// portable path (the suite is parameterised by internal::SetForcePortableLinalg).
#include "quant/linalg.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "quant/linalg_internal.h"
#include "quant/synthetic.h"

namespace qforge::quant {
namespace {

constexpr double kFloatEps = 5.96e-8;  // unit roundoff of float32

std::vector<float> RandomVec(int64_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = static_cast<float>(rng.Normal());
  return v;
}

// Symmetric positive definite [n, n]: B Bᵀ / n + I (condition number ~ 5).
std::vector<double> RandomSpd(int64_t n, uint64_t seed) {
  Rng rng(seed);
  std::vector<double> b(static_cast<size_t>(n * n));
  for (double& x : b) x = rng.Normal();
  std::vector<double> a(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t k = 0; k < n; ++k) s += b[i * n + k] * b[j * n + k];
      s /= n;
      if (i == j) s += 1;
      a[i * n + j] = a[j * n + i] = s;
    }
  }
  return a;
}

// Plain double Cholesky (lower) for comparisons.
std::vector<double> CholeskyRef(const std::vector<double>& a, int64_t n) {
  std::vector<double> l(static_cast<size_t>(n * n), 0.0);
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
}

double MaxAbs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

class LinalgTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
#ifndef QFORGE_HAVE_BLAS
    if (!GetParam()) GTEST_SKIP() << "built without BLAS: the portable case covers this path";
#endif
    internal::SetForcePortableLinalg(GetParam());
  }
  void TearDown() override { internal::SetForcePortableLinalg(false); }
};

TEST_P(LinalgTest, ReportsWhichPathRuns) {
#ifdef QFORGE_HAVE_BLAS
  EXPECT_EQ(internal::BlasActiveHere(), !GetParam());
#else
  EXPECT_FALSE(internal::BlasActiveHere());
#endif
}

// All four transpose combinations, odd shapes, k beyond one packed slice (256), n beyond one
// tile (512), padded leading dimensions, beta in {0, 1, -0.5}. Bound per element: the
// standard GEMM bound γ_{k+2} = (k+2)·u times Σ|alpha a b| + |beta c|.
TEST_P(LinalgTest, GemmMatchesDoubleLoopsForAllTransposes) {
  struct Shape {
    int64_t m, n, k;
  };
  const Shape shapes[] = {{1, 1, 1}, {7, 13, 5}, {67, 35, 300}, {21, 530, 70}, {100, 17, 0}};
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    for (int ta = 0; ta < 2; ++ta) {
      for (int tb = 0; tb < 2; ++tb) {
        for (float beta : {0.0f, 1.0f, -0.5f}) {
          const int64_t ar = ta ? s.k : s.m, ac = ta ? s.m : s.k;
          const int64_t br = tb ? s.n : s.k, bc = tb ? s.k : s.n;
          const int64_t lda = ac + 3, ldb = bc + 1, ldc = s.n + 2;
          const std::vector<float> a = RandomVec(std::max<int64_t>(ar * lda, 1), seed++);
          const std::vector<float> b = RandomVec(std::max<int64_t>(br * ldb, 1), seed++);
          std::vector<float> c = RandomVec(s.m * ldc, seed++);
          std::vector<float> c0 = c;
          if (beta == 0.0f) {
            // beta == 0 must not read C.
            for (float& x : c) x = std::numeric_limits<float>::quiet_NaN();
          }
          const float alpha = 0.7f;
          Gemm(ta, tb, s.m, s.n, s.k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
          for (int64_t i = 0; i < s.m; ++i) {
            for (int64_t j = 0; j < s.n; ++j) {
              double ref = 0, mag = 0;
              for (int64_t p = 0; p < s.k; ++p) {
                const double av = ta ? a[p * lda + i] : a[i * lda + p];
                const double bv = tb ? b[j * ldb + p] : b[p * ldb + j];
                ref += alpha * av * bv;
                mag += std::fabs(alpha * av * bv);
              }
              if (beta != 0.0f) {
                ref += beta * double(c0[i * ldc + j]);
                mag += std::fabs(beta * double(c0[i * ldc + j]));
              }
              const double tol = (s.k + 2) * kFloatEps * mag + 1e-30;
              ASSERT_NEAR(c[i * ldc + j], ref, tol)
                  << "m=" << s.m << " n=" << s.n << " k=" << s.k << " ta=" << ta << " tb=" << tb
                  << " beta=" << beta << " at (" << i << ", " << j << ")";
            }
            // Padding columns of C are not touched.
            for (int64_t j = s.n; j < ldc; ++j) {
              if (beta != 0.0f) {
                ASSERT_EQ(c[i * ldc + j], c0[i * ldc + j]);
              }
            }
          }
        }
      }
    }
  }
}

TEST_P(LinalgTest, GemmDMatchesDoubleLoops) {
  const int64_t m = 33, n = 41, k = 290;
  Rng rng(5);
  std::vector<double> a(m * k), b(n * k), c(m * n, 0.0);
  for (double& x : a) x = rng.Normal();
  for (double& x : b) x = rng.Normal();
  internal::GemmD(false, true, m, n, k, 1.5, a.data(), k, b.data(), k, 0.0, c.data(), n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double ref = 0, mag = 0;
      for (int64_t p = 0; p < k; ++p) {
        ref += 1.5 * a[i * k + p] * b[j * k + p];
        mag += std::fabs(1.5 * a[i * k + p] * b[j * k + p]);
      }
      ASSERT_NEAR(c[i * n + j], ref, (k + 2) * 1.12e-16 * mag);
    }
  }
}

TEST_P(LinalgTest, SyrkLowerWritesOnlyTheLowerTriangle) {
  const int64_t n = 45, k = 270;
  Rng rng(9);
  std::vector<double> a(k * n);
  for (double& x : a) x = rng.Normal();
  std::vector<double> c(n * n, 7.0);
  internal::SyrkLowerD(/*trans=*/true, n, k, 0.5, a.data(), n, 2.0, c.data(), n);
  std::vector<float> af(a.begin(), a.end());
  std::vector<float> cf(n * n, 7.0f);
  internal::SyrkLower(/*trans=*/true, n, k, 0.5f, af.data(), n, 2.0f, cf.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      if (j > i) {
        ASSERT_EQ(c[i * n + j], 7.0) << i << "," << j;
        ASSERT_EQ(cf[i * n + j], 7.0f) << i << "," << j;
        continue;
      }
      double ref = 14.0, mag = 14.0;
      for (int64_t p = 0; p < k; ++p) {
        ref += 0.5 * a[p * n + i] * a[p * n + j];
        mag += std::fabs(0.5 * a[p * n + i] * a[p * n + j]);
      }
      ASSERT_NEAR(c[i * n + j], ref, (k + 2) * 1.12e-16 * mag);
      ASSERT_NEAR(cf[i * n + j], ref, (k + 2) * kFloatEps * mag);
    }
  }
}

// Sizes below, at and beyond one factorization block (96) and the recursion base (48).
TEST_P(LinalgTest, CholeskyLowerMatchesDouble) {
  for (int64_t n : {1, 5, 96, 131, 300}) {
    const std::vector<double> a = RandomSpd(n, 100 + n);
    const std::vector<double> lref = CholeskyRef(a, n);
    std::vector<float> l(a.begin(), a.end());
    ASSERT_TRUE(CholeskyLower(l.data(), n).ok()) << n;
    std::vector<double> ld(a);
    ASSERT_TRUE(CholeskyLowerD(ld.data(), n).ok()) << n;
    // cond(A) <= ~5, so the float factor is accurate to a few hundred ulps of max|L|.
    const double scale = MaxAbs(lref);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (j > i) {
          ASSERT_EQ(l[i * n + j], 0.0f);
          ASSERT_EQ(ld[i * n + j], 0.0);
        } else {
          ASSERT_NEAR(l[i * n + j], lref[i * n + j], 2e-5 * scale) << n << ": " << i << "," << j;
          ASSERT_NEAR(ld[i * n + j], lref[i * n + j], 1e-12 * scale) << n;
        }
      }
    }
  }
}

TEST_P(LinalgTest, CholeskyUpperIsTheTransposedFactor) {
  for (int64_t n : {3, 131}) {
    const std::vector<double> a = RandomSpd(n, 7 + n);
    const std::vector<double> lref = CholeskyRef(a, n);
    std::vector<float> u(a.begin(), a.end());
    ASSERT_TRUE(CholeskyUpper(u.data(), n).ok());
    std::vector<double> ud(a);
    ASSERT_TRUE(CholeskyUpperD(ud.data(), n).ok());
    const double scale = MaxAbs(lref);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (j < i) {
          ASSERT_EQ(u[i * n + j], 0.0f);
          ASSERT_EQ(ud[i * n + j], 0.0);
        } else {
          ASSERT_NEAR(u[i * n + j], lref[j * n + i], 2e-5 * scale);
          ASSERT_NEAR(ud[i * n + j], lref[j * n + i], 1e-12 * scale);
        }
      }
    }
  }
}

TEST_P(LinalgTest, CholeskyInverseGivesTheSymmetricInverse) {
  for (int64_t n : {4, 150}) {
    const std::vector<double> a = RandomSpd(n, 31 + n);
    std::vector<float> x(a.begin(), a.end());
    ASSERT_TRUE(CholeskyLower(x.data(), n).ok());
    ASSERT_TRUE(CholeskyInverse(x.data(), n).ok());
    std::vector<double> xd(a);
    ASSERT_TRUE(CholeskyLowerD(xd.data(), n).ok());
    ASSERT_TRUE(CholeskyInverseD(xd.data(), n).ok());
    // A · A⁻¹ = I; cond(A) <= ~5 so the float inverse is good to ~1e-5.
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        ASSERT_EQ(x[i * n + j], x[j * n + i]) << "not symmetric";
        double s = 0, sd = 0;
        for (int64_t k = 0; k < n; ++k) {
          s += a[i * n + k] * x[k * n + j];
          sd += a[i * n + k] * xd[k * n + j];
        }
        ASSERT_NEAR(s, i == j ? 1.0 : 0.0, 2e-5) << n << ": " << i << "," << j;
        ASSERT_NEAR(sd, i == j ? 1.0 : 0.0, 1e-12) << n;
      }
    }
  }
}

TEST_P(LinalgTest, TriangularInverse) {
  for (int64_t n : {1, 47, 200}) {
    const std::vector<double> a = RandomSpd(n, 3 + n);
    const std::vector<double> l = CholeskyRef(a, n);
    std::vector<float> x(l.begin(), l.end());
    ASSERT_TRUE(internal::TriangularInverseLower(x.data(), n).ok());
    std::vector<double> xd(l);
    ASSERT_TRUE(internal::TriangularInverseLowerD(xd.data(), n).ok());
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double s = 0, sd = 0;
        for (int64_t k = 0; k < n; ++k) {
          s += l[i * n + k] * x[k * n + j];
          sd += l[i * n + k] * xd[k * n + j];
        }
        ASSERT_NEAR(s, i == j ? 1.0 : 0.0, 1e-5) << n << ": " << i << "," << j;
        ASSERT_NEAR(sd, i == j ? 1.0 : 0.0, 1e-12);
        if (j > i) {
          ASSERT_EQ(x[i * n + j], 0.0f);
        }
      }
    }
  }
  std::vector<float> singular = {1, 0, 2, 0};  // [[1, 0], [2, 0]]
  const Status s = internal::TriangularInverseLower(singular.data(), 2);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
}

// A negative pivot at 150 (beyond the first 96-block, so the blocked path finds it after a
// trailing update) must be reported at 150 by both paths.
TEST_P(LinalgTest, NotPositiveDefiniteNamesThePivot) {
  const int64_t n = 200;
  std::vector<float> a(n * n, 0.0f);
  for (int64_t i = 0; i < n; ++i) a[i * n + i] = 2.0f;
  for (int64_t i = 1; i < n; ++i) a[i * n + i - 1] = a[(i - 1) * n + i] = 0.5f;
  a[150 * n + 150] = -3.0f;
  std::vector<float> b = a;
  Status s = CholeskyLower(a.data(), n);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("not positive definite (pivot 150)"), std::string::npos)
      << s.message();
  s = CholeskyUpper(b.data(), n);
  EXPECT_NE(s.message().find("pivot 150"), std::string::npos) << s.message();
  std::vector<double> d = {1, 2, 2, 1};  // eigenvalues 3, -1
  s = CholeskyLowerD(d.data(), 2);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("pivot 1"), std::string::npos) << s.message();
  std::vector<float> nan = {1, 0, std::numeric_limits<float>::quiet_NaN(), 1};  // lower
  EXPECT_EQ(CholeskyLower(nan.data(), 2).code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(CholeskyLower(nullptr, 3).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(CholeskyLower(nullptr, 0).ok());
}

// Gemm called from inside a ParallelFor body runs the portable kernel on that thread and
// gives the same result as outside.
TEST_P(LinalgTest, GemmInsideParallelForMatches) {
  const int64_t m = 30, n = 40, k = 50;
  const std::vector<float> a = RandomVec(m * k, 1), b = RandomVec(k * n, 2);
  std::vector<float> outside(m * n);
  Gemm(false, false, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, outside.data(), n);
  std::vector<std::vector<float>> inside(8, std::vector<float>(m * n));
  std::atomic<int> blas_inside{0};
  ParallelFor(8, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (internal::BlasActiveHere() && NumThreads() > 1) ++blas_inside;
      Gemm(false, false, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, inside[i].data(), n);
    }
  });
  if (NumThreads() > 1) {
    EXPECT_EQ(blas_inside.load(), 0);
  }
  for (const auto& v : inside) {
    for (int64_t i = 0; i < m * n; ++i) {
      double mag = 0;
      for (int64_t p = 0; p < k; ++p) mag += std::fabs(a[(i / n) * k + p] * b[p * n + i % n]);
      ASSERT_NEAR(v[i], outside[i], 2 * (k + 2) * kFloatEps * mag);
    }
  }
}

// tr(X H Xᵀ) in double against plain loops, with G whole and in column panels.
TEST_P(LinalgTest, TraceXHXtMatchesDoubleLoops) {
  const int64_t rows = 300, in = 50;
  Rng rng(77);
  std::vector<double> x(rows * in);
  for (double& v : x) v = rng.Normal();
  std::vector<float> h(in * in);
  for (float& v : h) v = static_cast<float>(rng.Normal());  // asymmetric on purpose
  double ref = 0, mag = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < in; ++i) {
      for (int64_t j = 0; j < in; ++j) {
        ref += x[r * in + i] * h[i * in + j] * x[r * in + j];
        mag += std::fabs(x[r * in + i] * h[i * in + j] * x[r * in + j]);
      }
    }
  }
  int fills = 0;
  auto fill = [&](int64_t r0, int64_t r1, double* dst) {
    ++fills;
    std::copy(x.begin() + r0 * in, x.begin() + r1 * in, dst);
  };
  for (int64_t budget : {int64_t{1} << 30, in * 8 * 20, int64_t{1}}) {
    fills = 0;
    const double t = internal::TraceXHXt(rows, in, h.data(), fill, budget);
    EXPECT_NEAR(t, ref, 1e-13 * mag) << "budget " << budget;
    // One row slice per panel: whole G; panels of 20 columns (3); panels of 16 (4).
    EXPECT_EQ(fills, budget > in * in * 8 ? 1 : budget == 1 ? 4 : 3) << budget;
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, LinalgTest, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? std::string("Portable") : std::string("Blas");
                         });

TEST(ParallelForTest, CoversEveryIndexOnceInChunksOfAtLeastGrain) {
  for (int64_t n : {0, 1, 7, 1000, 12345}) {
    for (int64_t grain : {1, 3, 100, 100000}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      std::atomic<int> short_chunks{0};
      ParallelFor(n, grain, [&](int64_t b, int64_t e) {
        ASSERT_LT(b, e);
        if (e - b < grain && e != n) ++short_chunks;
        for (int64_t i = b; i < e; ++i) ++hits[i];
      });
      EXPECT_EQ(short_chunks.load(), 0) << "n=" << n << " grain=" << grain;
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << i;
    }
  }
}

TEST(ParallelForTest, NestedCallsRunAndExceptionsPropagate) {
  std::atomic<int64_t> total{0};
  ParallelFor(4, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      ParallelFor(100, 1, [&](int64_t b2, int64_t e2) { total += e2 - b2; });
    }
  });
  EXPECT_EQ(total.load(), 400);
  EXPECT_THROW(ParallelFor(100, 1,
                           [](int64_t b, int64_t) {
                             if (b == 0) throw std::runtime_error("boom");
                           }),
               std::runtime_error);
}

TEST(NumThreadsTest, HonoursQforgeNumThreads) {
  // NumThreads() is read once per process: check the variable in a fresh process (the
  // threadsafe style re-runs this test's body up to the statement in a new process, so
  // nothing before it may call NumThreads()).
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        setenv("QFORGE_NUM_THREADS", "3", 1);
        std::exit(NumThreads() == 3 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(
      {
        setenv("QFORGE_NUM_THREADS", "zero", 1);
        std::exit(NumThreads() >= 1 ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  EXPECT_GE(NumThreads(), 1);
}

}  // namespace
}  // namespace qforge::quant

#include "quant/synthetic.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "quant/hessian.h"

namespace qforge::quant {
namespace {
constexpr double kTwoPi = 6.283185307179586476925286766559;
}  // namespace

Rng::Rng(uint64_t seed) : state_(seed) {}

uint64_t Rng::NextU64() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double Rng::Uniform() { return static_cast<double>(NextU64() >> 11) * 0x1.0p-53; }

double Rng::Normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  // u1 in (0, 1] so the log is finite.
  const double u1 = 1.0 - Uniform();
  const double u2 = Uniform();
  const double radius = std::sqrt(-2.0 * std::log(u1));
  const double angle = kTwoPi * u2;
  spare_ = radius * std::sin(angle);
  has_spare_ = true;
  return radius * std::cos(angle);
}

double Rng::Gamma(double shape) {
  if (!(shape > 0)) return 0.0;
  if (shape < 1) {
    // Gamma(a) = Gamma(a + 1) · U^(1/a).
    const double g = Gamma(shape + 1);
    const double u = 1.0 - Uniform();
    return g * std::exp(std::log(u) / shape);
  }
  // Marsaglia & Tsang (2000).
  const double d = shape - 1.0 / 3.0;
  const double c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    double x, v;
    do {
      x = Normal();
      v = 1.0 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = 1.0 - Uniform();
    if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
    if (std::log(u) < 0.5 * x * x + d * (1.0 - v + std::log(v))) return d * v;
  }
}

double Rng::StudentT(double nu) {
  const double z = Normal();
  const double chi2 = 2.0 * Gamma(nu / 2.0);
  return z / std::sqrt(std::max(chi2, 1e-300) / nu);
}

SyntheticLayer MakeSyntheticLayer(int64_t out, int64_t in, int64_t samples, uint64_t seed) {
  out = std::max<int64_t>(out, 1);
  in = std::max<int64_t>(in, 1);
  samples = std::max<int64_t>(samples, 1);
  SyntheticLayer layer;
  Rng rng(seed);
  layer.weight = Matrix(out, in);
  for (float& v : layer.weight.data) v = static_cast<float>(0.02 * rng.StudentT(4.0));

  // Channel structure.
  constexpr int kFactors = 8;
  std::vector<double> scale(static_cast<size_t>(in));
  for (double& s : scale) s = std::exp(0.5 * rng.Normal());
  const int64_t outliers = std::max<int64_t>(1, in / 64);
  for (int64_t i = 0; i < outliers; ++i) {
    const int64_t c = static_cast<int64_t>(rng.NextU64() % static_cast<uint64_t>(in));
    scale[c] *= 10.0 + 40.0 * rng.Uniform();
  }
  std::vector<double> mix(static_cast<size_t>(kFactors * in));  // [factor, channel]
  for (double& m : mix) m = rng.Normal() / std::sqrt(static_cast<double>(kFactors));

  HessianAccumulator acc(in);
  constexpr int64_t kSlice = 1024;  // one Add (and one mirror of H) per slice
  std::vector<float> x(static_cast<size_t>(std::min(samples, kSlice) * in));
  double f[kFactors];
  for (int64_t s0 = 0; s0 < samples; s0 += kSlice) {
    const int64_t b = std::min(kSlice, samples - s0);
    for (int64_t r = 0; r < b; ++r) {
      for (double& v : f) v = rng.Normal();
      float* row = x.data() + r * in;
      for (int64_t c = 0; c < in; ++c) {
        double v = 0.5 * rng.StudentT(4.0);
        for (int k = 0; k < kFactors; ++k) v += f[k] * mix[k * in + c];
        row[c] = static_cast<float>(scale[c] * v);
      }
    }
    // Inputs are finite by construction, so Add cannot fail.
    (void)acc.Add(x.data(), b);
  }
  layer.hessian = acc.HessianF32();
  return layer;
}

}  // namespace qforge::quant

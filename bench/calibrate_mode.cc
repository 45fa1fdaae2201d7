#include "bench/calibrate_mode.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "quant/cuda/backends.h"
#include "quant/decoder.h"
#include "quant/linalg.h"

namespace qforge::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

// Fills v with values of standard deviation `scale` (uniform on ±scale·√3) from a counter
// hash, in parallel; `offset` is added.
void FillRandom(std::vector<float>& v, uint64_t seed, float scale, float offset = 0.0f) {
  const float a = scale * std::sqrt(3.0f);
  quant::ParallelFor(static_cast<int64_t>(v.size()), 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      uint64_t z = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i);  // splitmix64
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
      v[i] = offset + a * (2.0f * u - 1.0f);
    }
  });
}

std::vector<float> Random(int64_t n, uint64_t seed, float scale, float offset = 0.0f) {
  std::vector<float> v(static_cast<size_t>(n));
  FillRandom(v, seed, scale, offset);
  return v;
}

double PeakRssMiB() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

// GFLOP/s of quant::Gemm on C[m, n] = A[m, k] · B[n, k]ᵀ (best of two runs).
double GemmRate(int64_t m, int64_t n, int64_t k, const float* b) {
  std::vector<float> a = Random(m * k, 99, 1.0f), c(static_cast<size_t>(m * n));
  double best = 1e300;
  for (int rep = 0; rep < 2; ++rep) {
    const auto t = Clock::now();
    quant::Gemm(false, true, m, n, k, 1.0f, a.data(), k, b, k, 0.0f, c.data(), n);
    best = std::min(best, Seconds(t));
  }
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) / best /
         1e9;
}

}  // namespace

int64_t DefaultCalibrationSamples(const Device& device) { return device.is_gpu() ? 128 : 2; }
int64_t DefaultCalibrationSeqLen(const Device& device) { return device.is_gpu() ? 2048 : 512; }

CalibrationFlops CountCalibrationFlops(int64_t hidden, int64_t intermediate, int64_t heads,
                                       int64_t kv_heads, int64_t head_dim, int64_t samples,
                                       int64_t seq_len) {
  const double T = static_cast<double>(samples) * static_cast<double>(seq_len);
  const double h = static_cast<double>(hidden), im = static_cast<double>(intermediate);
  const double q = static_cast<double>(heads * head_dim);
  const double kv = static_cast<double>(kv_heads * head_dim);
  const double L = static_cast<double>(seq_len);
  CalibrationFlops f;
  f.projections = 2 * T * h * (q + 2 * kv) + 2 * T * q * h + 3 * 2 * T * h * im;
  f.attention = 2.0 * static_cast<double>(head_dim) * L * (L + 1) * static_cast<double>(heads) *
                static_cast<double>(samples);
  for (double d : {h, q, h, im}) f.hessian += T * d * (d + 1);
  return f;
}

qforge::Status RunCalibrateMode(const Flags& f, const Device& device) {
  quant::DecoderConfig c;
  c.hidden_size = f.hidden;
  c.intermediate_size = f.intermediate;
  c.num_attention_heads = f.heads;
  c.num_key_value_heads = f.kv_heads > 0 ? f.kv_heads : f.heads;
  c.head_dim = f.head_dim > 0 ? f.head_dim : (f.heads > 0 ? f.hidden / f.heads : 0);
  c.num_hidden_layers = 32;
  c.vocab_size = 32000;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  const int64_t samples = f.samples > 0 ? f.samples : DefaultCalibrationSamples(device);
  const int64_t seq_len = f.seq_len > 0 ? f.seq_len : DefaultCalibrationSeqLen(device);
  c.max_position_embeddings = std::max<int64_t>(4096, seq_len);
  QF_RETURN_IF_ERROR(quant::ValidateDecoderConfig(c));

  std::unique_ptr<quant::DecoderForward> fwd;
  if (device.is_gpu()) {
    QF_ASSIGN_OR_RETURN(fwd, quant::NewCudaDecoderForward(device.gpu));
  } else {
    fwd = quant::NewCpuDecoderForward();
  }

  const auto t_gen = Clock::now();
  const int64_t H = c.hidden_size, Q = c.q_out(), KV = c.kv_out(), I = c.intermediate_size;
  quant::DecoderLayerWeights w;
  w.input_layernorm = Random(H, 1, 0.1f, 1.0f);
  w.post_attention_layernorm = Random(H, 2, 0.1f, 1.0f);
  const float sh = 1.0f / std::sqrt(static_cast<float>(H));
  w.q_proj = Random(Q * H, 3, sh);
  w.k_proj = Random(KV * H, 4, sh);
  w.v_proj = Random(KV * H, 5, sh);
  w.o_proj = Random(H * Q, 6, 1.0f / std::sqrt(static_cast<float>(Q)));
  w.gate_proj = Random(I * H, 7, sh);
  w.up_proj = Random(I * H, 8, sh);
  w.down_proj = Random(H * I, 9, 1.0f / std::sqrt(static_cast<float>(I)));
  const std::vector<float> input = Random(samples * seq_len * H, 10 + f.seed, 1.0f);
  std::vector<float> hidden(input.size());
  quant::LayerHessianSums sums;
  sums.Reset(c);
  std::fprintf(stderr,
               "calibrate: layer hidden %lld, intermediate %lld, %lld heads (%lld KV) of %lld; "
               "%lld samples × %lld tokens on %s; generated in %.1f s, %d threads\n",
               static_cast<long long>(H), static_cast<long long>(I),
               static_cast<long long>(c.num_attention_heads),
               static_cast<long long>(c.num_key_value_heads), static_cast<long long>(c.head_dim),
               static_cast<long long>(samples), static_cast<long long>(seq_len),
               device.name.c_str(), Seconds(t_gen), quant::NumThreads());

  const quant::TokenBatch batch{samples, seq_len, nullptr};
  const int repeats = std::max(1, f.repeats);
  std::vector<double> times;
  for (int rep = -1; rep < repeats; ++rep) {  // one untimed warm-up (scratch, device setup)
    std::copy(input.begin(), input.end(), hidden.begin());
    const auto t = Clock::now();
    QF_RETURN_IF_ERROR(fwd->ForwardLayer(c, w, batch, hidden.data(), &sums));
    const double secs = Seconds(t);
    std::fprintf(stderr, "  run %d: %.3f s%s\n", rep + 1, secs, rep < 0 ? " (warm-up)" : "");
    if (rep >= 0) times.push_back(secs);
  }
  const double peak_rss_mib = PeakRssMiB();
  const double median = Median(times);
  const double tokens = static_cast<double>(samples * seq_len);
  const CalibrationFlops flops = CountCalibrationFlops(
      H, I, c.num_attention_heads, c.num_key_value_heads, c.head_dim, samples, seq_len);

  nlohmann::json j = {{"mode", "calibrate"},
                      {"backend", fwd->backend()},
                      {"hidden", H},
                      {"intermediate", I},
                      {"heads", c.num_attention_heads},
                      {"kv_heads", c.num_key_value_heads},
                      {"head_dim", c.head_dim},
                      {"samples", samples},
                      {"seq_len", seq_len},
                      {"tokens", samples * seq_len},
                      {"repeats", repeats},
                      {"median_seconds", median},
                      {"tokens_per_second", tokens / median},
                      {"gflop", flops.total() / 1e9},
                      {"gflop_projections", flops.projections / 1e9},
                      {"gflop_attention", flops.attention / 1e9},
                      {"gflop_hessian", flops.hessian / 1e9},
                      {"gflops", flops.total() / median / 1e9},
                      {"peak_rss_mib", peak_rss_mib},
                      {"threads", quant::NumThreads()}};
  if (!device.is_gpu()) {
    // The ceiling: quant::Gemm on gate_proj's shape over one MLP block of tokens.
    const double ceiling = GemmRate(std::min<int64_t>(samples * seq_len, 2048), I, H,
                                    w.gate_proj.data());
    j["gemm_ceiling_gflops"] = ceiling;
    j["fraction_of_ceiling"] = flops.total() / median / 1e9 / ceiling;
  }
  AddDevice(device, j);
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
  return qforge::OkStatus();
}

}  // namespace qforge::bench

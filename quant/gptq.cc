// CPU GPTQ solver. See gptq.h for the contract and FORMATS.md for the reference algorithm.
//
// Layout of the sweep. GPTQ is independent across output rows except for the shared factor
// U, so each lazy block [b0, b1) is one ParallelFor over row chunks: a row's in-block sweep
// (quantize column k, err = (w - q) / U[k,k], w[k+1:b1] -= err U[k, k+1:b1]) touches only
// that row and the block of U, which stays in cache. The block's errors E [out, b1-b0]
// then update the trailing columns with one GEMM, W[:, b1:] -= E U[b0:b1, b1:] (BLAS when
// available). Every row is computed by one thread in a fixed order, so the result does not
// depend on the thread count.
#include "quant/gptq.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <utility>

#include "base/float16.h"
#include "quant/hessian.h"
#include "quant/linalg.h"
#include "quant/linalg_internal.h"
#include "quant/multiversion.h"

namespace qforge::quant {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string Shape(int64_t r, int64_t c) {
  return "[" + std::to_string(r) + ", " + std::to_string(c) + "]";
}

Status CheckMatrix(const Matrix& m, const char* what) {
  if (m.rows < 0 || m.cols < 0 || static_cast<int64_t>(m.data.size()) != m.rows * m.cols) {
    return InvalidArgumentError(std::string(what) + " storage holds " +
                                std::to_string(m.data.size()) + " values, shape is " +
                                Shape(m.rows, m.cols));
  }
  return OkStatus();
}

Status CheckFinite(const Matrix& m, const char* what) {
  for (int64_t r = 0; r < m.rows; ++r) {
    const float* row = m.row(r);
    for (int64_t c = 0; c < m.cols; ++c) {
      if (!std::isfinite(row[c])) {
        return InvalidArgumentError(std::string(what) + " entry (" + std::to_string(r) + ", " +
                                    std::to_string(c) + ") is not finite");
      }
    }
  }
  return OkStatus();
}

// Which group each column belongs to, in original and in processing order.
struct GroupLayout {
  int64_t group_size = 0;  // effective
  int64_t num_groups = 0;
  bool dynamic = true;                // params fitted during the sweep at group starts
  std::vector<int32_t> g_idx;         // [in] original column -> group
  std::vector<int32_t> group_of_pos;  // [in] processing position -> group
};

GroupLayout MakeLayout(int64_t in, const GptqOptions& o, const std::vector<int32_t>& perm) {
  GroupLayout l;
  const int64_t gs = o.group_size == -1 ? in : o.group_size;
  l.group_size = gs;
  l.num_groups = (in + gs - 1) / gs;
  l.dynamic = !o.static_groups;
  l.g_idx.resize(static_cast<size_t>(in));
  l.group_of_pos.resize(static_cast<size_t>(in));
  for (int64_t k = 0; k < in; ++k) {
    const int64_t orig = perm[k];
    // Dynamic groups are contiguous in processing order (the permuted g_idx of act-order);
    // static groups are contiguous in the original order.
    const int64_t g = l.dynamic ? k / gs : orig / gs;
    l.g_idx[orig] = static_cast<int32_t>(g);
    l.group_of_pos[k] = static_cast<int32_t>(g);
  }
  return l;
}

std::vector<int32_t> ActOrderPerm(const Matrix& h, bool act_order) {
  const int64_t n = h.rows;
  std::vector<int32_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  if (act_order) {
    std::vector<float> d(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) d[i] = h(i, i) == 0.0f ? 1.0f : h(i, i);
    std::stable_sort(perm.begin(), perm.end(), [&](int32_t a, int32_t b) { return d[a] > d[b]; });
  }
  return perm;
}

// Params of every (group, row) from the original W (static groups, RTN): the values of
// group g are the columns with g_idx == g, visited in processing order.
void FitParamsFromOriginal(const Matrix& w, const std::vector<int32_t>& perm, const GroupLayout& l,
                           const std::vector<uint8_t>* dead, const QuantizerOptions& qo,
                           GptqResult& r) {
  const int64_t out = w.rows, in = w.cols;
  // Columns of each group (original indices), in processing order.
  std::vector<std::vector<int32_t>> cols(static_cast<size_t>(l.num_groups));
  if (l.dynamic) {
    for (int64_t k = 0; k < in; ++k) cols[l.group_of_pos[k]].push_back(perm[k]);
  } else {
    for (int64_t j = 0; j < in; ++j) cols[l.g_idx[j]].push_back(static_cast<int32_t>(j));
  }
  ParallelFor(out, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf;
    for (int64_t row = r0; row < r1; ++row) {
      const float* wr = w.row(row);
      for (int64_t g = 0; g < l.num_groups; ++g) {
        buf.clear();
        for (int32_t c : cols[g]) buf.push_back(dead != nullptr && (*dead)[c] ? 0.0f : wr[c]);
        const QuantParams p = FindQuantParams(buf.data(), static_cast<int64_t>(buf.size()), 1, qo);
        r.scales[g * out + row] = p.scale;
        r.zeros[g * out + row] = p.zero;
      }
    }
  });
}

// Everything one block's row sweep needs.
struct SweepBlock {
  int64_t out = 0, in = 0, b0 = 0, b1 = 0;
  const GroupLayout* layout = nullptr;
  bool stale_group_fit = false;  // reference_compat
  const float* u = nullptr;      // [in, in] upper factor, processing order
  const int32_t* perm = nullptr;
  float* w = nullptr;  // [out, in] working weights, processing order
  float* e = nullptr;  // [out, lde] scaled errors of the block
  int64_t lde = 0;
  uint8_t* codes = nullptr;  // [out, in] original order
  float* scales = nullptr;   // [num_groups, out]
  int32_t* zeros = nullptr;
  const QuantizerOptions* qo = nullptr;
  double* row_loss = nullptr;  // [out], Σ err²
};

inline void AxpyNeg(float* __restrict y, const float* __restrict x, float a, int64_t n) {
  int64_t i = 0;
#if QF_VECTOR_EXT
  typedef float V __attribute__((vector_size(32)));
  for (; i + 8 <= n; i += 8) {
    V yv, xv;
    std::memcpy(&yv, y + i, sizeof(V));
    std::memcpy(&xv, x + i, sizeof(V));
    yv -= a * xv;
    std::memcpy(y + i, &yv, sizeof(V));
  }
#endif
  for (; i < n; ++i) y[i] -= a * x[i];
}

QF_MULTIVERSION void SweepRows(const SweepBlock& s, int64_t r0, int64_t r1) {
  const int64_t in = s.in, b0 = s.b0, b1 = s.b1, nb = b1 - b0;
  const int64_t gs = s.layout->group_size;
  const int maxq = MaxQ(s.qo->bits);
  std::vector<float> stale(static_cast<size_t>(s.stale_group_fit ? nb : 0));
  std::vector<float> gbuf;
  for (int64_t r = r0; r < r1; ++r) {
    float* wr = s.w + r * in;
    float* er = s.e + r * s.lde;
    if (s.stale_group_fit) std::copy(wr + b0, wr + b1, stale.begin());
    double loss = 0;
    for (int64_t k = b0; k < b1; ++k) {
      const int64_t g = s.layout->group_of_pos[k];
      if (s.layout->dynamic && k % gs == 0) {
        // Fit the group [k, kend) on the columns as they are now.
        const int64_t kend = std::min(in, k + gs);
        gbuf.resize(static_cast<size_t>(kend - k));
        for (int64_t j = k; j < kend; ++j) {
          float v;
          if (j < b1) {
            v = s.stale_group_fit ? stale[j - b0] : wr[j];
          } else {
            v = wr[j];
            if (!s.stale_group_fit) {
              // Feedback of this block's earlier columns not yet applied by the lazy GEMM.
              for (int64_t c = b0; c < k; ++c) v -= er[c - b0] * s.u[c * in + j];
            }
          }
          gbuf[j - k] = v;
        }
        const QuantParams p = FindQuantParams(gbuf.data(), kend - k, 1, *s.qo);
        s.scales[g * s.out + r] = p.scale;
        s.zeros[g * s.out + r] = p.zero;
      }
      const QuantParams p{s.scales[g * s.out + r], s.zeros[g * s.out + r]};
      const float x = wr[k];
      const int code = QuantizeToCode(x, p, maxq);
      const float q = DequantizeCode(code, p);
      const float err = (x - q) / s.u[k * in + k];
      s.codes[r * in + s.perm[k]] = static_cast<uint8_t>(code);
      er[k - b0] = err;
      loss += static_cast<double>(err) * err;
      AxpyNeg(wr + k + 1, s.u + k * in + k + 1, err, b1 - k - 1);
    }
    s.row_loss[r] += loss;
  }
}

double TraceXHXt(int64_t rows, const Matrix& h,
                 const std::function<void(int64_t, int64_t, double*)>& fill) {
  return internal::TraceXHXt(rows, h.rows, h.data.data(), fill, int64_t{512} << 20);
}

// Fills r.weight_energy and r.output_error (ΔW = W - DequantizeGptq(r), in double).
void FillMetrics(const Matrix& w, const Matrix& h, GptqResult& r) {
  const int64_t in = w.cols;
  r.weight_energy = TraceXHXt(w.rows, h, [&](int64_t r0, int64_t r1, double* dst) {
    for (int64_t i = 0; i < (r1 - r0) * in; ++i) dst[i] = w.data[r0 * in + i];
  });
  r.output_error = TraceXHXt(w.rows, h, [&](int64_t r0, int64_t r1, double* dst) {
    for (int64_t row = r0; row < r1; ++row) {
      const float* wr = w.row(row);
      const uint8_t* cr = r.codes.data() + row * in;
      double* d = dst + (row - r0) * in;
      for (int64_t j = 0; j < in; ++j) {
        const int64_t g = r.g_idx[j];
        const QuantParams p{r.scales[g * r.out_features + row], r.zeros[g * r.out_features + row]};
        d[j] = static_cast<double>(wr[j]) - static_cast<double>(DequantizeCode(cr[j], p));
      }
    }
  });
}

GptqResult EmptyResult(const Matrix& w, const GptqOptions& o, const GroupLayout& l) {
  GptqResult r;
  r.out_features = w.rows;
  r.in_features = w.cols;
  r.bits = o.bits;
  r.group_size = l.group_size;
  r.num_groups = l.num_groups;
  r.codes.assign(static_cast<size_t>(w.rows * w.cols), 0);
  r.scales.assign(static_cast<size_t>(l.num_groups * w.rows), 0.0f);
  r.zeros.assign(static_cast<size_t>(l.num_groups * w.rows), 0);
  r.g_idx = l.g_idx;
  return r;
}

class CpuGptqSolver final : public GptqSolver {
 public:
  const char* backend() const override { return "cpu"; }

  StatusOr<GptqResult> Quantize(const Matrix& w, const Matrix& h, const GptqOptions& o) override {
    const Clock::time_point t_start = Clock::now();
    QF_RETURN_IF_ERROR(CheckGptqInputs(w, h, o));
    const int64_t out = w.rows, in = w.cols;

    QF_ASSIGN_OR_RETURN(PreparedHessian ph, PrepareHessian(h, GptqHessianOptions(o)));
    const double prepare_seconds = SecondsSince(t_start);

    const Clock::time_point t_sweep = Clock::now();
    const GroupLayout layout = MakeLayout(in, o, ph.perm);
    const QuantizerOptions qo = GptqQuantizerOptions(o);
    GptqResult r = EmptyResult(w, o, layout);
    r.perm = ph.perm;
    r.damp_percent_used = ph.damp_percent_used;
    r.cholesky_attempts = ph.cholesky_attempts;

    std::vector<uint8_t> dead(static_cast<size_t>(in), 0);
    for (int32_t d : ph.dead_columns) dead[d] = 1;
    if (!layout.dynamic) FitParamsFromOriginal(w, ph.perm, layout, &dead, qo, r);

    // Working weights in processing order, dead columns zeroed.
    Matrix wp(out, in);
    ParallelFor(out, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const float* src = w.row(row);
        float* dst = wp.row(row);
        for (int64_t k = 0; k < in; ++k) {
          const int32_t c = ph.perm[k];
          dst[k] = dead[c] ? 0.0f : src[c];
        }
      }
    });

    const int64_t bs = std::min<int64_t>(o.block_size, in);
    std::vector<float> e(static_cast<size_t>(out * bs));
    std::vector<double> row_loss(static_cast<size_t>(out), 0.0);
    SweepBlock s;
    s.out = out;
    s.in = in;
    s.layout = &layout;
    s.stale_group_fit = o.reference_compat || o.stale_group_params;
    s.u = ph.hinv_upper.data.data();
    s.perm = ph.perm.data();
    s.w = wp.data.data();
    s.e = e.data();
    s.lde = bs;
    s.codes = r.codes.data();
    s.scales = r.scales.data();
    s.zeros = r.zeros.data();
    s.qo = &qo;
    s.row_loss = row_loss.data();
    const int64_t grain = std::max<int64_t>(1, 65536 / (bs * bs));
    for (int64_t b0 = 0; b0 < in; b0 += bs) {
      const int64_t b1 = std::min(in, b0 + bs);
      s.b0 = b0;
      s.b1 = b1;
      ParallelFor(out, grain, [&](int64_t r0, int64_t r1) { SweepRows(s, r0, r1); });
      if (b1 < in) {
        // W[:, b1:] -= E U[b0:b1, b1:]
        Gemm(false, false, out, in - b1, b1 - b0, -1.0f, e.data(), bs, s.u + b0 * in + b1, in, 1.0f,
             wp.data.data() + b1, in);
      }
      QF_RETURN_IF_ERROR(ReportGptqProgress(o, b1, in));
    }
    double loss = 0;
    for (double v : row_loss) loss += v;
    r.proxy_loss = loss / 2;
    r.sweep_seconds = SecondsSince(t_sweep);
    r.prepare_seconds = prepare_seconds;

    if (o.compute_output_error) {
      const Clock::time_point t_metrics = Clock::now();
      FillMetrics(w, h, r);
      r.metrics_seconds = SecondsSince(t_metrics);
    }
    r.seconds = SecondsSince(t_start);
    return r;
  }
};

Matrix Dequantize(const GptqResult& r, bool f16_scales) {
  const int64_t out = r.out_features, in = r.in_features;
  if (out < 0 || in < 0 || r.num_groups < 0 || static_cast<int64_t>(r.codes.size()) != out * in ||
      static_cast<int64_t>(r.scales.size()) != r.num_groups * out ||
      static_cast<int64_t>(r.zeros.size()) != r.num_groups * out ||
      static_cast<int64_t>(r.g_idx.size()) != in) {
    return Matrix();
  }
  for (int32_t g : r.g_idx) {
    if (g < 0 || g >= r.num_groups) return Matrix();
  }
  Matrix m(out, in);
  for (int64_t row = 0; row < out; ++row) {
    for (int64_t j = 0; j < in; ++j) {
      const int64_t g = r.g_idx[j];
      float scale = r.scales[g * out + row];
      if (f16_scales) scale = RoundToHalf(scale);
      m(row, j) = DequantizeCode(r.codes[row * in + j], QuantParams{scale, r.zeros[g * out + row]});
    }
  }
  return m;
}

}  // namespace

HessianOptions GptqHessianOptions(const GptqOptions& o) {
  HessianOptions ho;
  ho.damp_percent = o.damp_percent;
  ho.damp_auto_increment = o.damp_auto_increment;
  ho.max_damp_percent = std::max(o.max_damp_percent, o.damp_percent);
  ho.act_order = o.act_order;
  return ho;
}

Status CheckGptqInputs(const Matrix& w, const Matrix& h, const GptqOptions& o) {
  QF_RETURN_IF_ERROR(CheckMatrix(w, "W"));
  QF_RETURN_IF_ERROR(CheckMatrix(h, "Hessian"));
  QF_RETURN_IF_ERROR(ValidateGptqOptions(o, w.rows, w.cols));
  if (h.rows != w.cols || h.cols != w.cols) {
    return InvalidArgumentError("Hessian shape " + Shape(h.rows, h.cols) + " does not match W " +
                                Shape(w.rows, w.cols) + ": expected " + Shape(w.cols, w.cols));
  }
  QF_RETURN_IF_ERROR(CheckFinite(w, "W"));
  return CheckFinite(h, "Hessian");
}

Status ValidateGptqOptions(const GptqOptions& o, int64_t out_features, int64_t in_features) {
  if (out_features < 1) {
    return InvalidArgumentError("out_features must be >= 1, got " + std::to_string(out_features));
  }
  if (in_features < 1) {
    return InvalidArgumentError("in_features must be >= 1, got " + std::to_string(in_features));
  }
  if (in_features > INT32_MAX || out_features > INT32_MAX ||
      out_features > (int64_t{1} << 40) / in_features) {
    return InvalidArgumentError("layer " + Shape(out_features, in_features) + " is too large");
  }
  if (o.bits != 2 && o.bits != 3 && o.bits != 4 && o.bits != 8) {
    return InvalidArgumentError("bits must be 2, 3, 4 or 8, got " + std::to_string(o.bits));
  }
  if (o.group_size != -1 && o.group_size < 1) {
    return InvalidArgumentError("group_size must be -1 (per channel) or >= 1, got " +
                                std::to_string(o.group_size));
  }
  if (o.block_size < 1) {
    return InvalidArgumentError("block_size must be >= 1, got " + std::to_string(o.block_size));
  }
  if (!std::isfinite(o.max_damp_percent) || o.max_damp_percent < 0) {
    return InvalidArgumentError("max_damp_percent must be finite and >= 0");
  }
  if (!std::isfinite(o.damp_percent) || o.damp_percent < 0 || o.damp_percent > 1) {
    return InvalidArgumentError("damp_percent must be in [0, 1], got " +
                                std::to_string(o.damp_percent));
  }
  if (!std::isfinite(o.damp_auto_increment) || o.damp_auto_increment < 0) {
    return InvalidArgumentError("damp_auto_increment must be finite and >= 0, got " +
                                std::to_string(o.damp_auto_increment));
  }
  return OkStatus();
}

Status ReportGptqProgress(const GptqOptions& o, int64_t columns_done, int64_t in_features) {
  if (!o.progress) return OkStatus();
  if (o.progress(static_cast<double>(columns_done) / static_cast<double>(in_features))) {
    return OkStatus();
  }
  const int64_t bs = std::min<int64_t>(o.block_size, in_features);
  return CancelledError("solve cancelled after column block " +
                        std::to_string((columns_done + bs - 1) / bs) + " of " +
                        std::to_string((in_features + bs - 1) / bs));
}

QuantizerOptions GptqQuantizerOptions(const GptqOptions& o) {
  QuantizerOptions q;
  q.bits = o.bits;
  q.sym = o.sym;
  q.mse = o.mse;
  q.sym_keep_positive_xmin = o.reference_compat;
  q.asym_zero_at_least_one = o.v1_zero_compat && !o.sym;
  return q;
}

Matrix DequantizeGptq(const GptqResult& r) { return Dequantize(r, false); }
Matrix DequantizeGptqF16Scales(const GptqResult& r) { return Dequantize(r, true); }

std::unique_ptr<GptqSolver> NewCpuGptqSolver() { return std::make_unique<CpuGptqSolver>(); }

StatusOr<GptqResult> QuantizeRtn(const Matrix& w, const Matrix& h, const GptqOptions& o) {
  const Clock::time_point t_start = Clock::now();
  QF_RETURN_IF_ERROR(CheckGptqInputs(w, h, o));
  const int64_t out = w.rows, in = w.cols;
  const std::vector<int32_t> perm = ActOrderPerm(h, o.act_order);
  const GroupLayout layout = MakeLayout(in, o, perm);
  const QuantizerOptions qo = GptqQuantizerOptions(o);
  GptqResult r = EmptyResult(w, o, layout);
  r.perm = perm;
  FitParamsFromOriginal(w, perm, layout, nullptr, qo, r);
  const int maxq = MaxQ(o.bits);
  std::vector<double> row_loss(static_cast<size_t>(out), 0.0);
  ParallelFor(out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      double loss = 0;
      for (int64_t j = 0; j < in; ++j) {
        const int64_t g = layout.g_idx[j];
        const QuantParams p{r.scales[g * out + row], r.zeros[g * out + row]};
        const float x = w(row, j);
        const int code = QuantizeToCode(x, p, maxq);
        r.codes[row * in + j] = static_cast<uint8_t>(code);
        const double d = static_cast<double>(x) - DequantizeCode(code, p);
        loss += d * d;
      }
      row_loss[row] = loss;
    }
  });
  for (double v : row_loss) r.proxy_loss += v;
  r.proxy_loss /= 2;
  r.sweep_seconds = SecondsSince(t_start);
  if (o.compute_output_error) {
    const Clock::time_point t_metrics = Clock::now();
    FillMetrics(w, h, r);
    r.metrics_seconds = SecondsSince(t_metrics);
  }
  r.seconds = SecondsSince(t_start);
  return r;
}

double OutputError(const Matrix& w, const Matrix& w_hat, const Matrix& h) {
  if (!CheckMatrix(w, "W").ok() || !CheckMatrix(w_hat, "W_hat").ok() || !CheckMatrix(h, "H").ok() ||
      w.rows != w_hat.rows || w.cols != w_hat.cols || h.rows != w.cols || h.cols != w.cols) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const int64_t in = w.cols;
  return TraceXHXt(w.rows, h, [&](int64_t r0, int64_t r1, double* dst) {
    for (int64_t i = 0; i < (r1 - r0) * in; ++i) {
      dst[i] = static_cast<double>(w.data[r0 * in + i]) - w_hat.data[r0 * in + i];
    }
  });
}

double WeightEnergy(const Matrix& w, const Matrix& h) {
  if (!CheckMatrix(w, "W").ok() || !CheckMatrix(h, "H").ok() || h.rows != w.cols ||
      h.cols != w.cols) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  const int64_t in = w.cols;
  return TraceXHXt(w.rows, h, [&](int64_t r0, int64_t r1, double* dst) {
    for (int64_t i = 0; i < (r1 - r0) * in; ++i) dst[i] = w.data[r0 * in + i];
  });
}

}  // namespace qforge::quant

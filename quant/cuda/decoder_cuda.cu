// The calibration forward pass of a decoder layer on the GPU (NewCudaDecoderForward,
// backends.h): the DecoderForward contract of quant/decoder.h, with the layer as that header
// writes it and the CPU backend (decoder_cpu.cc) computes it.
//
// One ForwardLayer call, all on ctx->stream():
//  1. Host: the CPU's checks (ValidateDecoderLayerWeights, ValidateTokenBatch,
//     ValidateHessianSums), the buffer plan (decoder_plan.h, shared with the memory estimate),
//     the RoPE tables cos/sin [seq_len, head_dim/2] from RopeInvFreq (angles in double, as the
//     CPU), then every buffer allocated once: the layer's weights (copied in), the tables,
//     the micro-batch's buffers, the float64 sums of the wanted inputs (zeroed).
//  2. Per micro-batch of whole samples (about kCudaDecoderMicroBatchTokens tokens): its
//     hidden states and mask copied in; a = RMSNorm(x); q, k, v by cuBLAS GEMMs (+ biases);
//     per-head q/k RMSNorm (Qwen3) and RoPE in one kernel, which also writes k repeated for
//     every query head of its KV group (v likewise), so that attention is one strided batched
//     GEMM over the heads per block of queries: scores = q kᵀ / sqrt(d) over the causal keys
//     of the block, the masked causal softmax (a warp per query row; a query without an
//     attendable key gets a row of zeros, so o = 0), o = P v written straight into
//     o [T, q_out]; x += o Woᵀ (+ bias); then the MLP in row blocks: b = RMSNorm(x), gate and
//     up GEMMs, SwiGLU, x += m Wdᵀ. The states are copied back (which waits for the stream),
//     the progress is reported with the samples done, and a cancellation returns there.
//  3. Hessian sums: each input, right after it is computed, has its unmasked rows gathered
//     (the row list is made on the host from the mask; without padding the rows are used in
//     place) in blocks of at most kHessianBlockTokens; per block and column panel of
//     kCudaDecoderGramPanel, a float32 GEMM gives the panel of XᵀX and a kernel adds its lower
//     triangle into the float64 sum on the device. At the end of the call the sums are copied
//     out once (in row chunks) and added to the caller's, mirrored, so they stay exactly
//     symmetric.
//
// Every GEMM is float32 with CUBLAS_COMPUTE_32F_PEDANTIC: never TF32, whatever the context
// allows. Reductions (RMSNorm, softmax) are float32 in a fixed tree order, so results are
// deterministic. Memory: weights of one layer, one micro-batch of activations, one block of
// attention scores and the sums, whatever the number of samples (decoder_memory.cc).
//
// Thread-safety: as backends.h, one call at a time per GpuContext.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "quant/cuda/backends.h"
#include "quant/cuda/decoder_plan.h"
#include "quant/cuda/gpu_context.cuh"
#include "quant/decoder.h"

namespace qforge::quant {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kMaxRowThreads = 256;
constexpr int kElementwiseThreads = 256;
constexpr int kNormRopeThreads = 128;
constexpr int kSoftmaxWarps = 8;           // rows per block of the softmax
constexpr int64_t kMaxGridBlocks = 65536;  // grid-stride kernels
// Doubles per row chunk of the sums' copy to the host (32 MiB).
constexpr int64_t kSumChunkDoubles = int64_t{1} << 22;

int GridFor(int64_t total, int threads) {
  return static_cast<int>(std::clamp<int64_t>(CeilDiv(total, threads), 1, kMaxGridBlocks));
}

// Threads of a one-block-per-row kernel over rows of `width` values: whole warps, at most 256.
int RowThreads(int64_t width) {
  return static_cast<int>(
      std::clamp<int64_t>(CeilDiv(width, kWarpSize) * kWarpSize, kWarpSize, kMaxRowThreads));
}

// ---------------------------------------------------------------------------------------------
// Kernels (file-local; the launchers below check every launch).

// The sum of the `v` of every thread of the block (blockDim.x a multiple of 32), in a fixed
// tree order; every thread gets it. scratch: __shared__ [32], free again when this returns.
__device__ float BlockSum(float v, float* scratch) {
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int warps = blockDim.x / kWarpSize;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  __syncthreads();
  return v;
}

// out[r, :] = w ⊙ x[r, :] / sqrt(mean(x[r, :]²) + eps); one block per row (grid = rows).
__global__ void RmsNormKernel(const float* __restrict__ x,  // [rows, dim]
                              int64_t dim,
                              const float* __restrict__ w,  // [dim]
                              float eps,
                              float* __restrict__ out) {  // [rows, dim]
  __shared__ float scratch[kWarpSize];
  const float* xr = x + blockIdx.x * dim;
  float* yr = out + blockIdx.x * dim;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = BlockSum(ss, scratch);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// y[r, :] += bias over rows × dim.
__global__ void AddBiasKernel(float* __restrict__ y,  // [rows, dim]
                              int64_t rows, int64_t dim,
                              const float* __restrict__ bias) {  // [dim]
  const int64_t total = rows * dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] += bias[i % dim];
  }
}

// Per-head RMSNorm over head_dim (when `norm` is not null) and RoPE (rotate-half) of the
// `heads` heads of src row r (position r % seq_len), written to dst heads h·repeat .. h·repeat
// + repeat − 1 (repeat 1 and dst == src: in place). One block per row (grid = rows); dynamic
// shared memory: `heads` floats (the heads' inverse RMS) when normalising.
__global__ void NormRopeKernel(const float* src,  // [rows, src_ld], heads·d used
                               int64_t src_ld, int64_t heads, int64_t d,
                               const float* __restrict__ norm,  // [d] or null
                               float eps,
                               const float* __restrict__ cos_t,  // [seq_len, d/2]
                               const float* __restrict__ sin_t,  // [seq_len, d/2]
                               int64_t seq_len, int64_t repeat,
                               float* dst,  // [rows, dst_ld], heads·repeat·d used
                               int64_t dst_ld) {
  extern __shared__ float inv_rms[];
  const int64_t r = blockIdx.x, half = d / 2;
  const float* x = src + r * src_ld;
  float* y = dst + r * dst_ld;
  if (norm != nullptr) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    for (int64_t h = warp; h < heads; h += warps) {
      float ss = 0.0f;
      for (int64_t i = lane; i < d; i += kWarpSize) ss += x[h * d + i] * x[h * d + i];
      for (int o = kWarpSize / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(kFullMask, ss, o);
      if (lane == 0) inv_rms[h] = 1.0f / sqrtf(ss / static_cast<float>(d) + eps);
    }
    __syncthreads();  // every head's sum is read before any in-place write
  }
  const float* c = cos_t + (r % seq_len) * half;
  const float* s = sin_t + (r % seq_len) * half;
  for (int64_t p = threadIdx.x; p < heads * half; p += blockDim.x) {
    const int64_t h = p / half, i = p - h * half;
    float x0 = x[h * d + i], x1 = x[h * d + i + half];
    if (norm != nullptr) {
      x0 = norm[i] * (x0 * inv_rms[h]);
      x1 = norm[i + half] * (x1 * inv_rms[h]);
    }
    const float y0 = x0 * c[i] - x1 * s[i];
    const float y1 = x1 * c[i] + x0 * s[i];
    for (int64_t g = 0; g < repeat; ++g) {
      float* yh = y + (h * repeat + g) * d;
      yh[i] = y0;
      yh[i + half] = y1;
    }
  }
}

// dst[t, h·d + e] = src[t, (h / repeat)·d + e]: each KV head repeated for its query heads.
__global__ void RepeatHeadsKernel(const float* __restrict__ src,  // [rows, kv_heads·d]
                                  int64_t rows, int64_t kv_heads, int64_t d, int64_t repeat,
                                  float* __restrict__ dst) {  // [rows, kv_heads·repeat·d]
  const int64_t src_ld = kv_heads * d, dst_ld = src_ld * repeat, total = rows * dst_ld;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / dst_ld, col = i - t * dst_ld;
    const int64_t h = col / d, e = col - h * d;
    dst[i] = src[t * src_ld + (h / repeat) * d + e];
  }
}

// In place on the scores of one query block: s [heads, nq, nk], query r at position q0 + r
// (nk = q0 + nq); row (h, r) becomes the softmax over its attendable keys j <= q0 + r with
// mask[j] == 1 (mask null: all), 0 elsewhere; a row without an attendable key becomes all 0.
// One warp per row: kSoftmaxWarps rows per block, grid = (ceil(nq / kSoftmaxWarps), heads).
__global__ void CausalSoftmaxKernel(float* __restrict__ s, int64_t nq, int64_t nk, int64_t q0,
                                    const uint8_t* __restrict__ mask) {  // [nk] or null
  const int lane = threadIdx.x % kWarpSize;
  const int64_t r = int64_t{blockIdx.x} * kSoftmaxWarps + threadIdx.x / kWarpSize;
  if (r >= nq) return;  // the whole warp: no collective below is left waiting
  float* row = s + (int64_t{blockIdx.y} * nq + r) * nk;
  const int64_t last = q0 + r;  // keys 0 .. last are causal
  float mx = -INFINITY;
  for (int64_t j = lane; j <= last; j += kWarpSize) {
    if (mask == nullptr || mask[j] != 0) mx = fmaxf(mx, row[j]);
  }
  for (int o = kWarpSize / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
  if (mx == -INFINITY) {  // no attendable key: o = 0 (the same branch for the whole warp)
    for (int64_t j = lane; j < nk; j += kWarpSize) row[j] = 0.0f;
    return;
  }
  float sum = 0.0f;
  for (int64_t j = lane; j < nk; j += kWarpSize) {
    const bool live = j <= last && (mask == nullptr || mask[j] != 0);
    const float e = live ? expf(row[j] - mx) : 0.0f;
    row[j] = e;
    sum += e;
  }
  for (int o = kWarpSize / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
  const float inv = 1.0f / sum;
  for (int64_t j = lane; j < nk; j += kWarpSize) row[j] *= inv;
}

// g = silu(g) ⊙ u.
__global__ void SwiGluKernel(float* __restrict__ g, const float* __restrict__ u, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float gv = g[i];
    g[i] = gv / (1.0f + expf(-gv)) * u[i];
  }
}

// dst[k, :] = src[rows[k] − row_offset, :] for k < count.
__global__ void GatherRowsKernel(const float* __restrict__ src,  // [.., dim]
                                 int64_t dim,
                                 const int32_t* __restrict__ rows,  // [count]
                                 int64_t count, int64_t row_offset,
                                 float* __restrict__ dst) {  // [count, dim]
  const int64_t total = count * dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t k = i / dim, e = i - k * dim;
    dst[i] = src[(rows[k] - row_offset) * dim + e];
  }
}

// The lower triangle of sum [dim, dim] (float64) at rows j0 + i, columns j0 + j (j <= i)
// += tile[i, j], tile [h, w] float32.
__global__ void AddLowerPanelKernel(const float* __restrict__ tile, int64_t h, int64_t w,
                                    double* __restrict__ sum, int64_t dim, int64_t j0) {
  const int64_t total = h * w;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / w, j = e - i * w;
    if (j <= i) sum[(j0 + i) * dim + j0 + j] += static_cast<double>(tile[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers and GEMMs.

// C = alpha·op(A)·op(B) + beta·C, column-major, float32 without TF32.
Status Sgemm(const GpuContext& ctx, cublasOperation_t ta, cublasOperation_t tb, int64_t m,
             int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
             int64_t ldb, float beta, float* c, int64_t ldc) {
  QF_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
      ctx.cublas(), ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha,
      a, CUDA_R_32F, static_cast<int>(lda), b, CUDA_R_32F, static_cast<int>(ldb), &beta, c,
      CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
  return OkStatus();
}

// The same over `batch` matrices at the given strides (elements).
Status SgemmStridedBatched(const GpuContext& ctx, cublasOperation_t ta, cublasOperation_t tb,
                           int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                           int64_t lda, int64_t stride_a, const float* b, int64_t ldb,
                           int64_t stride_b, float beta, float* c, int64_t ldc, int64_t stride_c,
                           int64_t batch) {
  QF_CUBLAS_RETURN_IF_ERROR(cublasGemmStridedBatchedEx(
      ctx.cublas(), ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha,
      a, CUDA_R_32F, static_cast<int>(lda), stride_a, b, CUDA_R_32F, static_cast<int>(ldb),
      stride_b, &beta, c, CUDA_R_32F, static_cast<int>(ldc), stride_c, static_cast<int>(batch),
      CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
  return OkStatus();
}

// y [rows, out] = x [rows, in] · Wᵀ + beta·y (+ bias), W [out, in] row-major. Row-major y is
// column-major yᵀ [out, rows] = op_T(W as column-major [in, out]) · (x as [in, rows]).
Status Linear(const GpuContext& ctx, const float* x, int64_t rows, int64_t in, const float* w,
              int64_t out, const float* bias, float beta, float* y) {
  QF_RETURN_IF_ERROR(
      Sgemm(ctx, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, 1.0f, w, in, x, in, beta, y, out));
  if (bias != nullptr) {
    AddBiasKernel<<<GridFor(rows * out, kElementwiseThreads), kElementwiseThreads, 0,
                    ctx.stream()>>>(y, rows, out, bias);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return OkStatus();
}

Status RmsNorm(const GpuContext& ctx, const float* x, int64_t rows, int64_t dim, const float* w,
               float eps, float* out) {
  if (rows == 0) return OkStatus();
  RmsNormKernel<<<static_cast<unsigned>(rows), RowThreads(dim), 0, ctx.stream()>>>(x, dim, w, eps,
                                                                                   out);
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return OkStatus();
}

// The device side of one call: the weights, tables and buffers of its plan.
struct DeviceState {
  CudaDecoderPlan plan;
  DeviceBuffer<float> weights;
  const float* w[kNumCudaDecoderWeights] = {};  // into `weights`; null for absent tensors
  DeviceBuffer<float> cos_t, sin_t;
  DeviceBuffer<float> x, a;    // [T, hidden]
  DeviceBuffer<float> phase;   // attention buffers, then the MLP's
  DeviceBuffer<uint8_t> mask;  // [T] (masked batches)
  DeviceBuffer<int32_t> rows;  // [T] unmasked rows of the micro-batch (masked, with sums)
  DeviceBuffer<float> gather;  // [gram_rows, max_input_dim] (masked, with sums)
  DeviceBuffer<float> tile;    // [max_input_dim, gram_panel] (with sums)
  DeviceBuffer<double> sums[kNumDecoderInputs];  // [dim, dim], lower triangles (wanted)

  const float* weight(CudaDecoderWeight k) const { return w[static_cast<int>(k)]; }
};

// The unmasked rows of the micro-batch being processed.
struct MicroRows {
  bool dense = true;          // every row is unmasked: use the rows in place
  std::vector<int32_t> host;  // sorted micro-batch row indices (when not dense)
};

// Adds XᵀX of the unmasked rows among micro-batch rows [row_offset, row_offset + rows) into
// the lower triangle of `sum`; x holds those rows ([rows, dim], row 0 = row_offset).
Status AccumulateGram(const GpuContext& ctx, DeviceState& d, const MicroRows& real, const float* x,
                      int64_t row_offset, int64_t rows, int64_t dim, double* sum) {
  const CudaDecoderPlan& p = d.plan;
  int64_t k_begin = 0, k_end = rows;
  if (!real.dense) {
    k_begin = std::lower_bound(real.host.begin(), real.host.end(), row_offset) - real.host.begin();
    k_end =
        std::lower_bound(real.host.begin(), real.host.end(), row_offset + rows) - real.host.begin();
  }
  const int64_t panel = std::min(p.gram_panel, dim);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += p.gram_rows) {
    const int64_t n = std::min(p.gram_rows, k_end - k0);
    const float* xb = x + k0 * dim;
    if (!real.dense) {
      GatherRowsKernel<<<GridFor(n * dim, kElementwiseThreads), kElementwiseThreads, 0,
                         ctx.stream()>>>(x, dim, d.rows.get() + k0, n, row_offset, d.gather.get());
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      xb = d.gather.get();
    }
    for (int64_t j0 = 0; j0 < dim; j0 += panel) {
      const int64_t w = std::min(panel, dim - j0), h = dim - j0;
      // Row-major tile [h, w] = X[:, j0:]ᵀ X[:, j0:j0+w] is column-major tileᵀ [w, h] =
      // (X[:, j0:j0+w] as column-major [w, n]) · (X[:, j0:] as column-major [h, n])ᵀ.
      QF_RETURN_IF_ERROR(Sgemm(ctx, CUBLAS_OP_N, CUBLAS_OP_T, w, h, n, 1.0f, xb + j0, dim, xb + j0,
                               dim, 0.0f, d.tile.get(), w));
      AddLowerPanelKernel<<<GridFor(h * w, kElementwiseThreads), kElementwiseThreads, 0,
                            ctx.stream()>>>(d.tile.get(), h, w, sum, dim, j0);
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
  }
  return OkStatus();
}

class CudaDecoderForward final : public DecoderForward {
 public:
  explicit CudaDecoderForward(std::shared_ptr<GpuContext> ctx) : ctx_(std::move(ctx)) {}

  const char* backend() const override { return "cuda"; }

  Status ForwardLayer(const DecoderConfig& config, const DecoderLayerWeights& weights,
                      const TokenBatch& batch, float* hidden, LayerHessianSums* sums,
                      const std::function<bool(double)>& progress) override;

 private:
  Status Allocate(const DecoderConfig& c, const DecoderLayerWeights& weights,
                  const TokenBatch& batch, const bool* wanted, DeviceState& d);
  Status Attention(const DecoderConfig& c, const DeviceState& d, int64_t samples, int64_t L,
                   const uint8_t* mask, const float* q, const float* k, const float* v,
                   float* scores, float* o);

  std::shared_ptr<GpuContext> ctx_;
};

Status CudaDecoderForward::Allocate(const DecoderConfig& c, const DecoderLayerWeights& lw,
                                    const TokenBatch& batch, const bool* wanted, DeviceState& d) {
  const GpuContext& ctx = *ctx_;
  const CudaDecoderPlan& p = d.plan;
  const std::vector<float>* host[kNumCudaDecoderWeights] = {
      &lw.input_layernorm, &lw.q_proj,   &lw.k_proj,    &lw.v_proj,
      &lw.q_bias,          &lw.k_bias,   &lw.v_bias,    &lw.q_norm,
      &lw.k_norm,          &lw.o_proj,   &lw.o_bias,    &lw.post_attention_layernorm,
      &lw.gate_proj,       &lw.up_proj,  &lw.gate_bias, &lw.up_bias,
      &lw.down_proj,       &lw.down_bias};
  QF_RETURN_IF_ERROR(d.weights.Allocate(ctx, p.weight_floats));
  int64_t offset = 0;
  for (int i = 0; i < kNumCudaDecoderWeights; ++i) {
    const int64_t n = CudaDecoderWeightSize(c, static_cast<CudaDecoderWeight>(i));
    if (static_cast<int64_t>(host[i]->size()) != n) {
      return InternalError("CUDA decoder forward: weight tensor " + std::to_string(i) + " has " +
                           std::to_string(host[i]->size()) + " values, the plan expects " +
                           std::to_string(n) + " (decoder_plan.h and decoder.cc disagree)");
    }
    if (n == 0) continue;
    float* dst = d.weights.get() + offset;
    QF_RETURN_IF_ERROR(Upload(ctx, host[i]->data(), n, dst));
    d.w[i] = dst;
    offset += CeilDiv(n, kCudaDecoderWeightAlignFloats) * kCudaDecoderWeightAlignFloats;
  }

  // RoPE tables, as the CPU computes them.
  const int64_t L = batch.seq_len, half = c.head_dim / 2;
  const std::vector<float> inv_freq = RopeInvFreq(c);
  std::vector<float> cos_h(static_cast<size_t>(L * half)), sin_h(static_cast<size_t>(L * half));
  for (int64_t pos = 0; pos < L; ++pos) {
    for (int64_t i = 0; i < half; ++i) {
      const double theta = static_cast<double>(inv_freq[i]) * static_cast<double>(pos);
      cos_h[pos * half + i] = static_cast<float>(std::cos(theta));
      sin_h[pos * half + i] = static_cast<float>(std::sin(theta));
    }
  }
  QF_RETURN_IF_ERROR(d.cos_t.Allocate(ctx, L * half));
  QF_RETURN_IF_ERROR(d.sin_t.Allocate(ctx, L * half));
  QF_RETURN_IF_ERROR(Upload(ctx, cos_h.data(), L * half, d.cos_t.get()));
  QF_RETURN_IF_ERROR(Upload(ctx, sin_h.data(), L * half, d.sin_t.get()));

  QF_RETURN_IF_ERROR(d.x.Allocate(ctx, p.hidden_floats));
  QF_RETURN_IF_ERROR(d.a.Allocate(ctx, p.hidden_floats));
  QF_RETURN_IF_ERROR(d.phase.Allocate(ctx, p.phase_floats));
  bool any = false;
  for (int i = 0; wanted != nullptr && i < kNumDecoderInputs; ++i) {
    if (!wanted[i]) continue;
    any = true;
    const int64_t dim = DecoderInputDim(c, static_cast<DecoderInput>(i));
    QF_RETURN_IF_ERROR(d.sums[i].Allocate(ctx, dim * dim));
    QF_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d.sums[i].get(), 0, d.sums[i].bytes(), ctx.stream()));
  }
  if (any) QF_RETURN_IF_ERROR(d.tile.Allocate(ctx, p.tile_floats));
  if (batch.mask != nullptr) {
    QF_RETURN_IF_ERROR(d.mask.Allocate(ctx, p.mask_bytes));
    if (any) {
      QF_RETURN_IF_ERROR(d.rows.Allocate(ctx, p.index_ints));
      QF_RETURN_IF_ERROR(d.gather.Allocate(ctx, p.gather_floats));
    }
  }
  return OkStatus();
}

// o [samples·L, q_out] = causal masked softmax(q kᵀ / sqrt(d)) v per head, for the micro-batch's
// samples; q, k, v [samples·L, q_out] (k and v repeated per query head); mask [samples·L] or
// null; scores: [heads, query_block, L].
Status CudaDecoderForward::Attention(const DecoderConfig& c, const DeviceState& d, int64_t samples,
                                     int64_t L, const uint8_t* mask, const float* q, const float* k,
                                     const float* v, float* scores, float* o) {
  const GpuContext& ctx = *ctx_;
  const int64_t heads = c.num_attention_heads, hd = c.head_dim, QO = c.q_out();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  for (int64_t s = 0; s < samples; ++s) {
    const float* qs = q + s * L * QO;
    const float* ks = k + s * L * QO;
    const float* vs = v + s * L * QO;
    float* os = o + s * L * QO;
    const uint8_t* ms = mask == nullptr ? nullptr : mask + s * L;
    for (int64_t i0 = 0; i0 < L; i0 += d.plan.query_block) {
      const int64_t i1 = std::min(L, i0 + d.plan.query_block), nq = i1 - i0, nk = i1;
      // Per head h (batch index, stride hd in q and k): row-major scores [nq, nk] =
      // q[i0:i1, h] k[0:nk, h]ᵀ is column-major [nk, nq] = op_T(k as [hd, nk]) · (q as
      // [hd, nq]), both with leading dimension q_out.
      QF_RETURN_IF_ERROR(SgemmStridedBatched(ctx, CUBLAS_OP_T, CUBLAS_OP_N, nk, nq, hd, scale, ks,
                                             QO, hd, qs + i0 * QO, QO, hd, 0.0f, scores, nk,
                                             nq * nk, heads));
      CausalSoftmaxKernel<<<dim3(static_cast<unsigned>(CeilDiv(nq, kSoftmaxWarps)),
                                 static_cast<unsigned>(heads)),
                            kSoftmaxWarps * kWarpSize, 0, ctx.stream()>>>(scores, nq, nk, i0, ms);
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      // Row-major o[i0:i1, h] [nq, hd] = P [nq, nk] · v[0:nk, h] is column-major [hd, nq] =
      // (v as [hd, nk], ld q_out) · (P as [nk, nq]).
      QF_RETURN_IF_ERROR(SgemmStridedBatched(ctx, CUBLAS_OP_N, CUBLAS_OP_N, hd, nq, nk, 1.0f, vs,
                                             QO, hd, scores, nk, nq * nk, 0.0f, os + i0 * QO, QO,
                                             hd, heads));
    }
  }
  return OkStatus();
}

Status CudaDecoderForward::ForwardLayer(const DecoderConfig& c, const DecoderLayerWeights& lw,
                                        const TokenBatch& batch, float* hidden,
                                        LayerHessianSums* sums,
                                        const std::function<bool(double)>& progress) {
  // The CPU backend's checks, in its order with its messages, before any device work.
  QF_RETURN_IF_ERROR(ValidateDecoderLayerWeights(c, lw));
  QF_RETURN_IF_ERROR(ValidateTokenBatch(c, batch, hidden));
  if (sums != nullptr) QF_RETURN_IF_ERROR(ValidateHessianSums(c, *sums));
  const GpuContext& ctx = *ctx_;
  QF_RETURN_IF_ERROR(ctx.Activate());

  const int64_t H = c.hidden_size, QO = c.q_out(), KV = c.kv_out(), I = c.intermediate_size;
  const int64_t L = batch.seq_len, hd = c.head_dim;
  const int64_t heads = c.num_attention_heads, kv_heads = c.num_key_value_heads;
  const int64_t group = heads / kv_heads;
  const float eps = static_cast<float>(c.rms_norm_eps);
  bool wanted[kNumDecoderInputs] = {false, false, false, false};
  for (int i = 0; sums != nullptr && i < kNumDecoderInputs; ++i) wanted[i] = sums->wanted[i];
  const bool any_sum = wanted[0] || wanted[1] || wanted[2] || wanted[3];

  DeviceState d;
  d.plan = MakeCudaDecoderPlan(c, batch.samples, L);
  const CudaDecoderPlan& p = d.plan;
  QF_RETURN_IF_ERROR(Allocate(c, lw, batch, wanted, d));
  auto weight = [&](CudaDecoderWeight k) { return d.weight(k); };
  auto sum_of = [&](DecoderInput in) { return d.sums[static_cast<int>(in)].get(); };
  auto want = [&](DecoderInput in) { return wanted[static_cast<int>(in)]; };

  // The phase buffer: attention (q, k, v, o, the k/v projection, scores), then the MLP.
  const int64_t Tmax = p.micro_tokens;
  float* q = d.phase.get();
  float* k = q + Tmax * QO;
  float* v = k + Tmax * QO;
  float* o = v + Tmax * QO;
  float* kv_proj = o + Tmax * QO;
  float* scores = kv_proj + Tmax * KV;
  float* gate = d.phase.get();
  float* up = gate + p.mlp_rows * I;

  int64_t real_tokens = 0;
  MicroRows real;
  for (int64_t s0 = 0; s0 < batch.samples; s0 += p.micro_samples) {
    const int64_t ns = std::min(p.micro_samples, batch.samples - s0), T = ns * L;
    float* x = d.x.get();
    float* a = d.a.get();
    QF_RETURN_IF_ERROR(Upload(ctx, hidden + s0 * L * H, T * H, x));
    const uint8_t* mask = nullptr;
    real.dense = true;
    real.host.clear();
    if (batch.mask != nullptr) {
      const uint8_t* mh = batch.mask + s0 * L;
      for (int64_t t = 0; t < T; ++t) {
        if (mh[t] != 0) real.host.push_back(static_cast<int32_t>(t));
      }
      real.dense = static_cast<int64_t>(real.host.size()) == T;
      real_tokens += static_cast<int64_t>(real.host.size());
      if (!real.dense) {
        QF_RETURN_IF_ERROR(Upload(ctx, mh, T, d.mask.get()));
        mask = d.mask.get();
        if (any_sum && !real.host.empty()) {
          QF_RETURN_IF_ERROR(
              Upload(ctx, real.host.data(), static_cast<int64_t>(real.host.size()), d.rows.get()));
        }
      }
    } else {
      real_tokens += T;
    }

    // Attention block.
    QF_RETURN_IF_ERROR(RmsNorm(ctx, x, T, H, weight(CudaDecoderWeight::kInputNorm), eps, a));
    if (want(DecoderInput::kQkv)) {
      QF_RETURN_IF_ERROR(AccumulateGram(ctx, d, real, a, 0, T, H, sum_of(DecoderInput::kQkv)));
    }
    const unsigned rows = static_cast<unsigned>(T);
    const size_t q_smem = weight(CudaDecoderWeight::kQNorm) ? heads * sizeof(float) : 0;
    const size_t k_smem = weight(CudaDecoderWeight::kKNorm) ? kv_heads * sizeof(float) : 0;
    QF_RETURN_IF_ERROR(Linear(ctx, a, T, H, weight(CudaDecoderWeight::kQ), QO,
                              weight(CudaDecoderWeight::kQBias), 0.0f, q));
    NormRopeKernel<<<rows, kNormRopeThreads, q_smem, ctx.stream()>>>(
        q, QO, heads, hd, weight(CudaDecoderWeight::kQNorm), eps, d.cos_t.get(), d.sin_t.get(), L,
        1, q, QO);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_RETURN_IF_ERROR(Linear(ctx, a, T, H, weight(CudaDecoderWeight::kK), KV,
                              weight(CudaDecoderWeight::kKBias), 0.0f, kv_proj));
    NormRopeKernel<<<rows, kNormRopeThreads, k_smem, ctx.stream()>>>(
        kv_proj, KV, kv_heads, hd, weight(CudaDecoderWeight::kKNorm), eps, d.cos_t.get(),
        d.sin_t.get(), L, group, k, QO);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_RETURN_IF_ERROR(Linear(ctx, a, T, H, weight(CudaDecoderWeight::kV), KV,
                              weight(CudaDecoderWeight::kVBias), 0.0f, kv_proj));
    RepeatHeadsKernel<<<GridFor(T * QO, kElementwiseThreads), kElementwiseThreads, 0,
                        ctx.stream()>>>(kv_proj, T, kv_heads, hd, group, v);
    QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    QF_RETURN_IF_ERROR(Attention(c, d, ns, L, mask, q, k, v, scores, o));
    QF_RETURN_IF_ERROR(Linear(ctx, o, T, QO, weight(CudaDecoderWeight::kO), H,
                              weight(CudaDecoderWeight::kOBias), 1.0f, x));
    if (want(DecoderInput::kO)) {
      QF_RETURN_IF_ERROR(AccumulateGram(ctx, d, real, o, 0, T, QO, sum_of(DecoderInput::kO)));
    }

    // MLP, in row blocks (gate and up reuse the attention buffers).
    for (int64_t r0 = 0; r0 < T; r0 += p.mlp_rows) {
      const int64_t n = std::min(p.mlp_rows, T - r0);
      float* xr = x + r0 * H;
      float* b = a + r0 * H;
      QF_RETURN_IF_ERROR(RmsNorm(ctx, xr, n, H, weight(CudaDecoderWeight::kPostNorm), eps, b));
      if (want(DecoderInput::kGateUp)) {
        QF_RETURN_IF_ERROR(
            AccumulateGram(ctx, d, real, b, r0, n, H, sum_of(DecoderInput::kGateUp)));
      }
      QF_RETURN_IF_ERROR(Linear(ctx, b, n, H, weight(CudaDecoderWeight::kGate), I,
                                weight(CudaDecoderWeight::kGateBias), 0.0f, gate));
      QF_RETURN_IF_ERROR(Linear(ctx, b, n, H, weight(CudaDecoderWeight::kUp), I,
                                weight(CudaDecoderWeight::kUpBias), 0.0f, up));
      SwiGluKernel<<<GridFor(n * I, kElementwiseThreads), kElementwiseThreads, 0, ctx.stream()>>>(
          gate, up, n * I);
      QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
      if (want(DecoderInput::kDown)) {
        QF_RETURN_IF_ERROR(
            AccumulateGram(ctx, d, real, gate, r0, n, I, sum_of(DecoderInput::kDown)));
      }
      QF_RETURN_IF_ERROR(Linear(ctx, gate, n, I, weight(CudaDecoderWeight::kDown), H,
                                weight(CudaDecoderWeight::kDownBias), 1.0f, xr));
    }

    QF_RETURN_IF_ERROR(Download(ctx, x, T * H, hidden + s0 * L * H));
    if (progress && !progress(static_cast<double>(s0 + ns) / static_cast<double>(batch.samples))) {
      return CancelledError("decoder forward (cuda) cancelled after " + std::to_string(s0 + ns) +
                            " of " + std::to_string(batch.samples) +
                            " samples (hidden states are incomplete; the Hessian sums were not "
                            "updated)");
    }
  }

  if (sums != nullptr) {
    // The device sums' lower triangles, added to the caller's sums and mirrored.
    std::vector<double> chunk;
    for (int i = 0; i < kNumDecoderInputs; ++i) {
      if (!wanted[i]) continue;
      const int64_t dim = DecoderInputDim(c, static_cast<DecoderInput>(i));
      const int64_t chunk_rows = std::clamp<int64_t>(kSumChunkDoubles / dim, 1, dim);
      chunk.resize(static_cast<size_t>(chunk_rows * dim));
      double* s = sums->sums[i].data();
      for (int64_t r0 = 0; r0 < dim; r0 += chunk_rows) {
        const int64_t n = std::min(chunk_rows, dim - r0);
        QF_RETURN_IF_ERROR(Download(ctx, d.sums[i].get() + r0 * dim, n * dim, chunk.data()));
        for (int64_t r = r0; r < r0 + n; ++r) {
          const double* src = chunk.data() + (r - r0) * dim;
          for (int64_t j = 0; j < r; ++j) {
            s[r * dim + j] += src[j];
            s[j * dim + r] += src[j];
          }
          s[r * dim + r] += src[r];
        }
      }
    }
    sums->tokens += real_tokens;
  }
  return OkStatus();
}

}  // namespace

StatusOr<std::unique_ptr<DecoderForward>> NewCudaDecoderForward(std::shared_ptr<GpuContext> ctx) {
  if (ctx == nullptr) return InvalidArgumentError("NewCudaDecoderForward: null GpuContext");
  std::unique_ptr<DecoderForward> forward = std::make_unique<CudaDecoderForward>(std::move(ctx));
  return forward;
}

}  // namespace qforge::quant

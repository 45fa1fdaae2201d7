// The CUDA decoder forward pass's buffer plan (decoder_plan.h) and its device-memory estimate
// (memory_estimates.h): pure arithmetic, built everywhere.
//
// With H = hidden, Q = q_out, KV = kv_out, I = intermediate, L = seq_len, T = the micro-batch's
// tokens (whole samples of about kCudaDecoderMicroBatchTokens, at least one), D = max(H, Q, I),
// a ForwardLayer call allocates at once, in bytes:
//   weights   4 · (every tensor of the layer, each rounded up to 64 floats);
//   RoPE      8 · L · head_dim / 2 (cos and sin);
//   hidden    8 · T · H (the micro-batch's states and its normed copy);
//   phase     4 · max(4·T·Q + T·KV + heads·qb·L, 2·min(T, 4096)·I): the attention buffers
//             (q, k and v repeated per head, o, the k/v projection, one block of qb query
//             rows of scores) and, after them in the same memory, the MLP's gate and up;
//   sums      8 · (H² + Q² + H² + I²) for the wanted inputs, and one Gram panel 4 · D · 1024;
//   padding   T (mask) + 4 · T (unmasked row list) + 4 · min(T, 4096) · D (gathered rows).
// The estimate adds 64 KiB for the allocator's alignment and 64 MiB for cuBLAS's workspace.
#include <algorithm>

#include "quant/cuda/decoder_plan.h"
#include "quant/cuda/memory_estimates.h"

namespace qforge::quant {

int64_t CudaDecoderWeightSize(const DecoderConfig& c, CudaDecoderWeight w) {
  const int64_t h = c.hidden_size, q = c.q_out(), kv = c.kv_out(), im = c.intermediate_size;
  switch (w) {
    case CudaDecoderWeight::kInputNorm:
    case CudaDecoderWeight::kPostNorm:
      return h;
    case CudaDecoderWeight::kQ:
      return q * h;
    case CudaDecoderWeight::kK:
    case CudaDecoderWeight::kV:
      return kv * h;
    case CudaDecoderWeight::kQBias:
      return c.attention_bias ? q : 0;
    case CudaDecoderWeight::kKBias:
    case CudaDecoderWeight::kVBias:
      return c.attention_bias ? kv : 0;
    case CudaDecoderWeight::kQNorm:
    case CudaDecoderWeight::kKNorm:
      return c.qk_norm ? c.head_dim : 0;
    case CudaDecoderWeight::kO:
      return h * q;
    case CudaDecoderWeight::kOBias:
      return c.o_proj_bias ? h : 0;
    case CudaDecoderWeight::kGate:
    case CudaDecoderWeight::kUp:
      return im * h;
    case CudaDecoderWeight::kGateBias:
    case CudaDecoderWeight::kUpBias:
      return c.mlp_bias ? im : 0;
    case CudaDecoderWeight::kDown:
      return h * im;
    case CudaDecoderWeight::kDownBias:
      return c.mlp_bias ? h : 0;
  }
  return 0;
}

CudaDecoderPlan MakeCudaDecoderPlan(const DecoderConfig& c, int64_t samples, int64_t seq_len) {
  samples = std::max<int64_t>(samples, 1);
  const int64_t L = std::max<int64_t>(seq_len, 1);
  const int64_t H = c.hidden_size, Q = c.q_out(), KV = c.kv_out(), I = c.intermediate_size;
  const int64_t heads = std::max<int64_t>(c.num_attention_heads, 1);
  CudaDecoderPlan p;
  p.micro_samples = std::min(samples, std::max<int64_t>(1, kCudaDecoderMicroBatchTokens / L));
  p.micro_tokens = p.micro_samples * L;
  const int64_t T = p.micro_tokens;
  p.query_block = std::clamp<int64_t>(kCudaDecoderScoreFloats / (heads * L), 1, L);
  p.mlp_rows = std::min(T, kCudaDecoderMlpRows);
  p.gram_rows = std::min(T, kHessianBlockTokens);
  p.max_input_dim = std::max({H, Q, I, int64_t{1}});
  p.gram_panel = std::min(kCudaDecoderGramPanel, p.max_input_dim);

  for (int w = 0; w < kNumCudaDecoderWeights; ++w) {
    const int64_t n = CudaDecoderWeightSize(c, static_cast<CudaDecoderWeight>(w));
    p.weight_floats += (n + kCudaDecoderWeightAlignFloats - 1) / kCudaDecoderWeightAlignFloats *
                       kCudaDecoderWeightAlignFloats;
  }
  p.rope_floats = 2 * L * (c.head_dim / 2);
  p.hidden_floats = T * H;
  p.attention_floats = 4 * T * Q + T * KV + heads * p.query_block * L;
  p.mlp_floats = 2 * p.mlp_rows * I;
  p.phase_floats = std::max(p.attention_floats, p.mlp_floats);
  p.gather_floats = p.gram_rows * p.max_input_dim;
  p.tile_floats = p.max_input_dim * p.gram_panel;
  p.mask_bytes = T;
  p.index_ints = T;
  return p;
}

uint64_t CudaDecoderAllocatedBytes(const DecoderConfig& c, const CudaDecoderPlan& p,
                                   const bool* wanted, bool masked) {
  auto u = [](int64_t v) { return static_cast<uint64_t>(std::max<int64_t>(v, 0)); };
  uint64_t bytes =
      4 * (u(p.weight_floats) + u(p.rope_floats) + 2 * u(p.hidden_floats) + u(p.phase_floats));
  bool any = false;
  for (int i = 0; wanted != nullptr && i < kNumDecoderInputs; ++i) {
    if (!wanted[i]) continue;
    any = true;
    const uint64_t d = u(DecoderInputDim(c, static_cast<DecoderInput>(i)));
    bytes += 8 * d * d;
  }
  if (any) bytes += 4 * u(p.tile_floats);
  if (masked) {
    bytes += u(p.mask_bytes);
    if (any) bytes += 4 * u(p.index_ints) + 4 * u(p.gather_floats);
  }
  return bytes;
}

uint64_t CudaDecoderForwardMemoryBytes(const DecoderConfig& config, int64_t samples_per_call,
                                       int64_t seq_len) {
  const CudaDecoderPlan p = MakeCudaDecoderPlan(config, samples_per_call, seq_len);
  const bool all[kNumDecoderInputs] = {true, true, true, true};
  return CudaDecoderAllocatedBytes(config, p, all, /*masked=*/true) + (uint64_t{64} << 10) +
         (uint64_t{64} << 20);
}

}  // namespace qforge::quant

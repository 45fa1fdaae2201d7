// The buffer plan of the CUDA decoder forward pass (decoder_cuda.cu): how a ForwardLayer call
// splits its batch and how many elements each device buffer holds. Plain C++, in the
// qforge_quant_cuda_memory library, so the backend and its memory estimate
// (CudaDecoderForwardMemoryBytes, decoder_memory.cc) use one computation and cannot drift.
// Thread-safety: pure functions.
#ifndef QFORGE_QUANT_CUDA_DECODER_PLAN_H_
#define QFORGE_QUANT_CUDA_DECODER_PLAN_H_

#include <cstdint>

#include "quant/decoder.h"

namespace qforge::quant {

// Tokens per micro-batch of whole samples (one sample when seq_len is longer).
inline constexpr int64_t kCudaDecoderMicroBatchTokens = 4096;
// Floats of one block of attention scores [heads, query block, seq_len] (64 MiB); a block has
// at least one query, so a longer sequence of many heads may exceed it.
inline constexpr int64_t kCudaDecoderScoreFloats = int64_t{1} << 24;
// Tokens per MLP row block (gate and up [rows, intermediate] each).
inline constexpr int64_t kCudaDecoderMlpRows = 4096;
// Columns per float32 Gram panel of the Hessian sums.
inline constexpr int64_t kCudaDecoderGramPanel = 1024;
// Every device tensor of the weights starts at a multiple of this many floats (256 bytes).
inline constexpr int64_t kCudaDecoderWeightAlignFloats = 64;

// The weight tensors in their order in the device weight buffer.
enum class CudaDecoderWeight {
  kInputNorm,
  kQ,
  kK,
  kV,
  kQBias,
  kKBias,
  kVBias,
  kQNorm,
  kKNorm,
  kO,
  kOBias,
  kPostNorm,
  kGate,
  kUp,
  kGateBias,
  kUpBias,
  kDown,
  kDownBias
};
inline constexpr int kNumCudaDecoderWeights = 18;

// Values of tensor `w` for `config` (0 for what the architecture does not have), as
// ValidateDecoderLayerWeights expects them.
int64_t CudaDecoderWeightSize(const DecoderConfig& config, CudaDecoderWeight w);

struct CudaDecoderPlan {
  int64_t micro_samples = 0;  // samples per micro-batch
  int64_t micro_tokens = 0;   // micro_samples · seq_len: rows of the device hidden states
  int64_t query_block = 0;    // queries per attention score block (1 .. seq_len)
  int64_t mlp_rows = 0;       // tokens per MLP row block (≤ micro_tokens)
  int64_t gram_rows = 0;      // token rows per float32 Gram block (≤ kHessianBlockTokens)
  int64_t gram_panel = 0;     // columns per Gram panel (≤ the largest input dimension)
  int64_t max_input_dim = 0;  // max(hidden, q_out, intermediate)

  // Elements of each device buffer.
  int64_t weight_floats = 0;     // every tensor, each aligned to kCudaDecoderWeightAlignFloats
  int64_t rope_floats = 0;       // cos and sin tables [seq_len, head_dim / 2] each
  int64_t hidden_floats = 0;     // x and a (the normed input) [micro_tokens, hidden] each
  int64_t attention_floats = 0;  // q, k, v (k and v repeated per head), o [T, q_out] each,
                                 // the k/v projection [T, kv_out], scores [heads, qb, L]
  int64_t mlp_floats = 0;        // gate and up [mlp_rows, intermediate] each
  int64_t phase_floats = 0;      // max(attention, mlp): the two phases share one buffer
  int64_t gather_floats = 0;     // unmasked rows of one Gram block [gram_rows, max_input_dim]
  int64_t tile_floats = 0;       // one Gram panel [max_input_dim, gram_panel]
  int64_t mask_bytes = 0;        // the micro-batch's mask [micro_tokens]
  int64_t index_ints = 0;        // its unmasked rows [micro_tokens] (int32)
};

// The plan of a call over `samples` samples of `seq_len` tokens (both ≥ 1) for a valid config.
CudaDecoderPlan MakeCudaDecoderPlan(const DecoderConfig& config, int64_t samples, int64_t seq_len);

// The bytes a call with plan `p` allocates at once: the sums of the inputs `wanted` (null: none)
// in float64 with the Gram panel, the gather buffer and index list only when `masked`.
uint64_t CudaDecoderAllocatedBytes(const DecoderConfig& config, const CudaDecoderPlan& p,
                                   const bool* wanted, bool masked);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_CUDA_DECODER_PLAN_H_

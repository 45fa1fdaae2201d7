// The head of a Llama-family decoder compared between two models: the final RMSNorm
// (model.norm) and the LM head (lm_head.weight, or embed_tokens when tied) turn each model's
// last hidden states into full next-token logits, which are reduced per position into the
// evaluation's sums (job/evaluation.h):
//   for every position t of a sample whose token and next token are real (mask[t] = mask[t+1]
//   = 1, t + 1 < seq_len), with y = ids[t + 1], p = softmax(reference logits),
//   q = softmax(candidate logits):
//     nll_reference += −log p[y],  nll_candidate += −log q[y],
//     kl += Σ_v p[v] (log p[v] − log q[v])       (KL(reference ‖ candidate), ≥ 0 up to rounding),
//     top1_agree += (argmax p == argmax q)       (ties: the lowest index),
//     predicted_tokens += 1.
// RMSNorm as decoder.h's (float32, the mean of squares summed in double), logits by a float32
// GEMM (quant/linalg.h Gemm) over chunks of predicted positions (at most chunk_tokens rows
// of both models' logits in memory), log-sum-exp and the sums in float64 (max-shifted, so
// stable for any finite logits). The per-position values are added in position order, so the
// sums do not depend on the thread count.
//
// Thread-safety: a pure function (uses quant::ParallelFor internally).
#ifndef QFORGE_QUANT_DECODER_HEAD_H_
#define QFORGE_QUANT_DECODER_HEAD_H_

#include <cstdint>

#include "base/status.h"
#include "quant/decoder.h"

namespace qforge::quant {

// One model's head, float32 row-major: norm [hidden_size], lm_head [vocab_size, hidden_size].
struct DecoderHeadWeights {
  const float* norm = nullptr;
  const float* lm_head = nullptr;
};

// The sums above (additive over calls).
struct HeadComparisonSums {
  double nll_reference = 0, nll_candidate = 0, kl = 0;
  int64_t top1_agree = 0;
  int64_t predicted_tokens = 0;
};

// Both models' logits of one chunk stay under this many bytes by default.
inline constexpr uint64_t kHeadLogitsBudgetBytes = uint64_t{64} << 20;

// Predicted positions per chunk for a vocabulary: max(1, kHeadLogitsBudgetBytes / (8 · vocab)).
int64_t DefaultHeadChunkTokens(int64_t vocab_size);

// Host bytes CompareDecoderHeads uses besides its inputs: per chunk both models' logits and
// normalised hidden rows, and the position list.
uint64_t DecoderHeadScratchBytes(const DecoderConfig& config, int64_t tokens, int64_t chunk_tokens);

// Adds the sums of `samples` × `seq_len` positions into *sums. reference_hidden /
// candidate_hidden: [samples · seq_len, hidden_size] float32 (the last decoder layer's
// outputs); ids [samples · seq_len]; mask: same shape, 0/1, or null (all real).
// chunk_tokens ≤ 0: DefaultHeadChunkTokens. Errors: INVALID_ARGUMENT (null pointers,
// non-positive sizes, a target id outside [0, vocab_size) naming sample and position, a mask
// byte other than 0/1, non-finite logits naming the model and position).
Status CompareDecoderHeads(const DecoderConfig& config, const DecoderHeadWeights& reference,
                           const DecoderHeadWeights& candidate, const float* reference_hidden,
                           const float* candidate_hidden, const int32_t* ids, const uint8_t* mask,
                           int64_t samples, int64_t seq_len, HeadComparisonSums* sums,
                           int64_t chunk_tokens = 0);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_DECODER_HEAD_H_

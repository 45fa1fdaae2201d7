// The forward pass of one decoder layer of a Llama-family model (Llama 1/2/3, Mistral, Qwen2,
// Qwen3), unquantized, with the accumulation of the calibration Hessians of its linear inputs:
// what a CALIBRATE task runs layer after layer over its shard of the calibration samples.
// CPU (NewCpuDecoderForward, OpenBLAS GEMMs when built with it) and CUDA
// (NewCudaDecoderForward in quant/cuda/backends.h: cuBLAS GEMMs, own kernels for RMSNorm,
// RoPE, softmax and SwiGLU) implement the same DecoderForward interface and are checked
// against each other and against a float64 reference (tests/quant/decoder_test.cc).
//
// The layer, as Hugging Face's modeling_llama / modeling_qwen2 / modeling_qwen3 compute it
// (x: [tokens, hidden] of one sample, positions p = 0 .. seq_len-1 of the sample):
//   a   = RMSNorm(x; input_layernorm)                       -> input of q/k/v ("qkv")
//   q,k,v = a·Wqᵀ (+bq), a·Wkᵀ (+bk), a·Wvᵀ (+bv)            (biases: Qwen2)
//   q,k = RMSNorm per head over head_dim (q_norm, k_norm)     (Qwen3 only), then RoPE
//   RoPE: rotate-half convention: for i < d/2, with θ_i = inv_freq[i]·p:
//         y[i] = x[i]cosθ − x[i+d/2]sinθ,  y[i+d/2] = x[i+d/2]cosθ + x[i]sinθ
//         (θ, cosθ and sinθ computed in double from RopeInvFreq's floats, rounded to float)
//   o   = causal softmax(q kᵀ / sqrt(head_dim)) v per head (KV head = head / (heads/kv_heads))
//         keys with attention mask 0 are never attended; a query with no attendable key
//         gets o = 0                                           -> input of o_proj ("o")
//   x  += o·Woᵀ
//   b   = RMSNorm(x; post_attention_layernorm)              -> input of gate/up ("gate_up")
//   m   = silu(b·Wgᵀ) ⊙ (b·Wuᵀ)                              -> input of down_proj ("down")
//   x  += m·Wdᵀ
// RMSNorm(x; w) = w ⊙ x / sqrt(mean(x²) + eps) (computed in float32, as HF does for float32).
// Float32 activations and accumulation throughout.
//
// Hessian sums: for each of the four inputs, S += Σ_t x_t x_tᵀ over the tokens t whose
// attention mask is 1 (padding never enters the Hessian). Each GEMM block of tokens
// (at most kHessianBlockTokens) is multiplied in float32 and added into float64 sums, so the
// error does not grow with the number of blocks. The Hessian of the FORMATS.md file is
// H = (2 / n) · S, n = the number of tokens summed.
//
// Thread-safety: a DecoderForward runs one call at a time (the CPU one uses
// quant::ParallelFor internally; the CUDA one its context's stream).
#ifndef QFORGE_QUANT_DECODER_H_
#define QFORGE_QUANT_DECODER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"

namespace qforge::quant {

// Tokens per float32 GEMM block of the Hessian accumulation (see above).
inline constexpr int64_t kHessianBlockTokens = 4096;

// Llama-3's "rope_scaling": {"rope_type": "llama3", ...}: the inverse frequencies of the
// long wavelengths are divided by `factor`, the medium ones interpolated (see RopeInvFreq).
struct Llama3RopeScaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// The shapes and constants of a decoder, as config.json gives them (job/model_config.h
// reads them; the architecture decides the two flags).
struct DecoderConfig {
  int64_t hidden_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;   // GQA: divides num_attention_heads
  int64_t head_dim = 0;              // config.json's head_dim, else hidden / heads
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool has_llama3_rope_scaling = false;
  Llama3RopeScaling llama3_rope_scaling;
  bool attention_bias = false;       // q/k/v projections have biases (Qwen2; Llama's
                                     // "attention_bias": true also sets o_proj's)
  bool o_proj_bias = false;          // o_proj has a bias (Llama with attention_bias)
  bool mlp_bias = false;             // gate/up/down have biases (Llama's "mlp_bias")
  bool qk_norm = false;              // per-head RMSNorm of q and k before RoPE (Qwen3)
  bool tie_word_embeddings = false;  // lm_head shares embed_tokens (no lm_head.weight)

  int64_t q_out() const { return num_attention_heads * head_dim; }
  int64_t kv_out() const { return num_key_value_heads * head_dim; }
};

// INVALID_ARGUMENT naming the field ("num_key_value_heads: 5 does not divide
// num_attention_heads 32") for non-positive sizes, heads not divisible by KV heads, an odd
// head_dim, non-finite or non-positive eps / theta, an invalid llama3 scaling.
Status ValidateDecoderConfig(const DecoderConfig& config);

// The RoPE inverse frequencies inv_freq[i] = 1 / theta^(2i / head_dim), i < head_dim / 2,
// with Llama-3 scaling applied when configured (transformers' _compute_llama3_parameters:
// wavelen = 2π / f; wavelen > original/low_freq_factor: f / factor; wavelen <
// original/high_freq_factor: f; else smooth = (original/wavelen − low) / (high − low),
// f' = (1 − smooth)·f/factor + smooth·f). Computed in double, returned as float: the one
// definition both backends use.
std::vector<float> RopeInvFreq(const DecoderConfig& config);

// One decoder layer's weights as float32, in Hugging Face's layouts: projections [out, in]
// row-major; norms [hidden] (q_norm/k_norm: [head_dim]); biases [out]. Empty vectors for
// what the architecture does not have.
struct DecoderLayerWeights {
  std::vector<float> input_layernorm;           // [hidden]
  std::vector<float> q_proj, k_proj, v_proj;    // [q_out, hidden], [kv_out, hidden] ×2
  std::vector<float> q_bias, k_bias, v_bias;    // attention_bias
  std::vector<float> q_norm, k_norm;            // [head_dim] (qk_norm)
  std::vector<float> o_proj;                    // [hidden, q_out]
  std::vector<float> o_bias;                    // [hidden] (o_proj_bias)
  std::vector<float> post_attention_layernorm;  // [hidden]
  std::vector<float> gate_proj, up_proj;        // [intermediate, hidden]
  std::vector<float> gate_bias, up_bias;        // [intermediate] (mlp_bias)
  std::vector<float> down_proj;                 // [hidden, intermediate]
  std::vector<float> down_bias;                 // [hidden] (mlp_bias)
};

// INVALID_ARGUMENT naming the weight ("layer weights: k_proj has 1000 values, expected
// 1024 (= 256 × 4)") when a size does not match `config` or a required one is missing.
Status ValidateDecoderLayerWeights(const DecoderConfig& config, const DecoderLayerWeights& w);

// The four linear inputs of a layer whose Hessians are accumulated.
enum class DecoderInput { kQkv = 0, kO = 1, kGateUp = 2, kDown = 3 };
inline constexpr int kNumDecoderInputs = 4;
// "qkv", "o", "gate_up", "down".
const char* DecoderInputName(DecoderInput input);
// The input's dimension: hidden (qkv, gate_up), q_out (o), intermediate (down).
int64_t DecoderInputDim(const DecoderConfig& config, DecoderInput input);

// Running sums S = Σ x xᵀ (float64, full symmetric [dim, dim]) of the inputs `wanted`
// (false: not accumulated, the vector stays empty), and the tokens summed.
struct LayerHessianSums {
  bool wanted[kNumDecoderInputs] = {true, true, true, true};
  std::vector<double> sums[kNumDecoderInputs];
  int64_t tokens = 0;

  // Sizes the wanted sums to [dim, dim] zeros and sets tokens = 0.
  void Reset(const DecoderConfig& config);
};

// A batch of samples of equal length: samples × seq_len tokens, row-major. `mask`:
// samples × seq_len bytes, 1 = a real token, 0 = padding; null means all real.
struct TokenBatch {
  int64_t samples = 0;
  int64_t seq_len = 0;
  const uint8_t* mask = nullptr;
};

// The checks every backend's ForwardLayer makes before any work (INVALID_ARGUMENT naming the
// field): samples or seq_len not positive, seq_len above max_position_embeddings, a null
// `hidden`, a mask byte other than 0 or 1 ("attention mask of sample 1 at position 3 is 2").
Status ValidateTokenBatch(const DecoderConfig& config, const TokenBatch& batch,
                          const float* hidden);
// INVALID_ARGUMENT when a wanted sum is not [dim, dim] for `config` or tokens is negative
// ("Hessian sums: down has 1024 values, expected 4096 (= 64²): call Reset(config) ...").
Status ValidateHessianSums(const DecoderConfig& config, const LayerHessianSums& sums);

class DecoderForward {
 public:
  virtual ~DecoderForward() = default;

  // "cpu" or "cuda".
  virtual const char* backend() const = 0;

  // Runs layer `weights` over `hidden` ([samples · seq_len, hidden_size] float32, in place:
  // the layer's input becomes its output) and, when `sums` is not null, adds the four
  // inputs' x xᵀ of the unmasked tokens into *sums (which must have been Reset for
  // `config`) and their count into sums->tokens. `progress` (optional) is called with the
  // fraction of the batch's samples done (the CPU backend: after each chunk of whole samples
  // of about kHessianBlockTokens tokens, at least one sample), and may cancel (quant/progress.h: CANCELLED,
  // `hidden` and *sums then unspecified).
  // Errors: INVALID_ARGUMENT (config or weights invalid, batch sizes non-positive or
  // seq_len > max_position_embeddings, sums not Reset for config); RESOURCE_EXHAUSTED /
  // INTERNAL from the device; CANCELLED.
  virtual Status ForwardLayer(const DecoderConfig& config, const DecoderLayerWeights& weights,
                              const TokenBatch& batch, float* hidden, LayerHessianSums* sums,
                              const std::function<bool(double)>& progress = {}) = 0;
};

// The CPU implementation.
std::unique_ptr<DecoderForward> NewCpuDecoderForward();

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_DECODER_H_

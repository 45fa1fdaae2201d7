// Packing and unpacking of the Hugging Face GPTQ checkpoint tensors (qweight, qzeros, scales,
// g_idx) that transformers/optimum, vLLM, TGI, ExLlama and GPTQModel load.
//
// The bit layout is defined ONCE, here, by the constexpr helpers in the "layout" section below
// (ggml-style: the CUDA packing kernels include this header and use the same helpers; they are
// __host__ __device__ under nvcc). Everything else in this file is host code.
//
// Layout (FORMATS.md, "GPTQ checkpoint"): along the packed dimension, value k of a
// `bits`-bit stream occupies the bits [bits·k, bits·k + bits) of a little-endian bit stream
// whose 32-bit words are stored consecutively; i.e. for each block of 32 values
// V = Σ_j code[32·B + j] << (bits·j) is stored as `bits` 32-bit limbs, least significant first.
// For 2/4/8 bits a value never straddles a word (word r holds 32/bits values, the first in the
// lowest bits); for 3 bits the 32 values of a block span 3 words and values 10 (bits 30..32)
// and 21 (bits 63..65) straddle a word boundary.
//   qweight int32 [in_features·bits/32, out_features]: packed along the input dimension.
//   qzeros  int32 [num_groups, out_features·bits/32]: packed along the output dimension; format
//           v1 ("gptq") stores zero − 1, v2 ("gptq_v2") stores zero.
//   scales  float16 [num_groups, out_features]; g_idx int32 [in_features].
//   W[o, i] = scales[g_idx[i], o] · (q[i, o] − zero[g_idx[i], o]).
//
// Errors: every function returns INVALID_ARGUMENT for bad shapes, bit widths, out-of-range
// codes/zeros/g_idx, inconsistent tensor sizes or non-finite scales, with a message naming the
// tensor, the dimension or the element (row/column, group/column) and the rule broken. Nothing
// aborts or throws on bad input (an allocation failure of the output is the only exception that
// can escape, as for any std::vector).
// Thread-safety: pure functions of their arguments; safe to call concurrently.
#ifndef QFORGE_QUANT_GPTQ_PACK_H_
#define QFORGE_QUANT_GPTQ_PACK_H_

#include <cstdint>
#include <string_view>
#include <vector>

#include "base/status.h"

#if defined(__CUDACC__)
#define QF_GPTQ_HD __host__ __device__
#else
#define QF_GPTQ_HD
#endif

namespace qforge::quant {

// ---- Layout (shared by the CPU packer and the CUDA kernels) ----------------------------------

// Values per packing block: a block of 32 values always fills exactly `bits` 32-bit words.
inline constexpr int kGptqBlockValues = 32;
inline constexpr int kGptqWordBits = 32;

QF_GPTQ_HD constexpr bool GptqBitsSupported(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 8;
}
// Words per block of 32 values.
QF_GPTQ_HD constexpr int GptqWordsPerBlock(int bits) { return bits; }
// Mask of one field.
QF_GPTQ_HD constexpr uint32_t GptqFieldMask(int bits) { return (uint32_t{1} << bits) - 1u; }
// Number of values along the packed dimension must be a multiple of this: 32/bits for 2/4/8
// (whole words), 32 for 3 bits (whole 3-word blocks).
QF_GPTQ_HD constexpr int64_t GptqPackGranule(int bits) {
  return bits == 3 ? kGptqBlockValues : kGptqWordBits / bits;
}
// Packed length of `n` values (n a multiple of GptqPackGranule(bits)).
QF_GPTQ_HD constexpr int64_t GptqPackedLength(int64_t n, int bits) {
  return n * bits / kGptqWordBits;
}
// Value k of the stream: index of the word holding its lowest bit, and the bit offset there.
QF_GPTQ_HD constexpr int64_t GptqFieldWord(int64_t k, int bits) {
  return (k * bits) / kGptqWordBits;
}
QF_GPTQ_HD constexpr int GptqFieldShift(int64_t k, int bits) {
  return static_cast<int>((k * bits) % kGptqWordBits);
}
// True when value k spills into the next word (only 3-bit values 10 and 21 of each block).
QF_GPTQ_HD constexpr bool GptqFieldStraddles(int64_t k, int bits) {
  return GptqFieldShift(k, bits) + bits > kGptqWordBits;
}

// Packs the 32 values v[0..31] (each < 2^bits, higher bits ignored) of one block into
// words[0..bits-1]. `in_stride` / `out_stride` step between consecutive values / words, so the
// same routine packs along rows or columns.
template <typename In>
QF_GPTQ_HD constexpr void GptqPackBlock(const In* v, int64_t in_stride, int bits, uint32_t* words,
                                        int64_t out_stride) {
  const uint32_t mask = GptqFieldMask(bits);
  for (int w = 0; w < GptqWordsPerBlock(bits); ++w) words[w * out_stride] = 0;
  for (int j = 0; j < kGptqBlockValues; ++j) {
    const uint32_t x = static_cast<uint32_t>(v[j * in_stride]) & mask;
    const int64_t w = GptqFieldWord(j, bits);
    const int s = GptqFieldShift(j, bits);
    words[w * out_stride] |= x << s;
    if (GptqFieldStraddles(j, bits)) words[(w + 1) * out_stride] |= x >> (kGptqWordBits - s);
  }
}

// Value k (0..31) of one block stored in words[0..bits-1] (consecutive words `stride` apart).
QF_GPTQ_HD constexpr uint32_t GptqUnpackField(const uint32_t* words, int64_t stride, int k,
                                              int bits) {
  const int64_t w = GptqFieldWord(k, bits);
  const int s = GptqFieldShift(k, bits);
  uint32_t x = words[w * stride] >> s;
  if (GptqFieldStraddles(k, bits)) x |= words[(w + 1) * stride] << (kGptqWordBits - s);
  return x & GptqFieldMask(bits);
}

// Word `word` (0..bits-1) of a block whose 32 fields all hold `field`: the qzeros words of a
// symmetric quantizer are such constants.
QF_GPTQ_HD constexpr uint32_t GptqUniformBlockWord(uint32_t field, int bits, int word) {
  uint32_t v[kGptqBlockValues] = {};
  for (int j = 0; j < kGptqBlockValues; ++j) v[j] = field;
  uint32_t words[8] = {};
  GptqPackBlock(v, 1, bits, words, 1);
  return words[word];
}
// The stored qzeros field of a symmetric quantizer (zero = 2^(bits−1)) in either format.
QF_GPTQ_HD constexpr uint32_t GptqSymmetricStoredZero(int bits, bool v1) {
  return (uint32_t{1} << (bits - 1)) - (v1 ? 1u : 0u);
}

namespace gptq_layout_internal {
constexpr int CountStraddling(int bits) {
  int n = 0;
  for (int j = 0; j < kGptqBlockValues; ++j) n += GptqFieldStraddles(j, bits) ? 1 : 0;
  return n;
}
}  // namespace gptq_layout_internal

static_assert(GptqFieldWord(kGptqBlockValues - 1, 3) == 2, "3-bit: 32 values span 3 words");
static_assert(GptqFieldWord(10, 3) == 0 && GptqFieldShift(10, 3) == 30 && GptqFieldStraddles(10, 3),
              "3-bit value 10 occupies bits 30..32 (word 0 bits 30-31, word 1 bit 0)");
static_assert(GptqFieldWord(21, 3) == 1 && GptqFieldShift(21, 3) == 31 && GptqFieldStraddles(21, 3),
              "3-bit value 21 occupies bits 63..65 (word 1 bit 31, word 2 bits 0-1)");
static_assert(GptqFieldWord(11, 3) == 1 && GptqFieldShift(11, 3) == 1,
              "3-bit value 11 at word 1 bit 1");
static_assert(GptqFieldWord(22, 3) == 2 && GptqFieldShift(22, 3) == 2,
              "3-bit value 22 at word 2 bit 2");
static_assert(gptq_layout_internal::CountStraddling(3) == 2,
              "only 3-bit values 10 and 21 straddle");
static_assert(gptq_layout_internal::CountStraddling(2) == 0 &&
                  gptq_layout_internal::CountStraddling(4) == 0 &&
                  gptq_layout_internal::CountStraddling(8) == 0,
              "2/4/8-bit values never straddle");
static_assert(GptqFieldWord(8, 4) == 1 && GptqFieldShift(7, 4) == 28, "4-bit: 8 values per word");
static_assert(GptqUniformBlockWord(GptqSymmetricStoredZero(4, true), 4, 0) == 0x77777777u);
static_assert(GptqUniformBlockWord(GptqSymmetricStoredZero(8, true), 8, 0) == 0x7F7F7F7Fu);
static_assert(GptqUniformBlockWord(GptqSymmetricStoredZero(2, true), 2, 0) == 0x55555555u);
static_assert(GptqUniformBlockWord(GptqSymmetricStoredZero(3, true), 3, 0) == 0xDB6DB6DBu &&
                  GptqUniformBlockWord(GptqSymmetricStoredZero(3, true), 3, 1) == 0xB6DB6DB6u &&
                  GptqUniformBlockWord(GptqSymmetricStoredZero(3, true), 3, 2) == 0x6DB6DB6Du,
              "3-bit symmetric v1 qzeros (stored 3 = 0b011 repeated)");
static_assert(GptqUniformBlockWord(GptqSymmetricStoredZero(4, false), 4, 0) == 0x88888888u);

// ---- Checkpoint formats -----------------------------------------------------------------------

// "gptq" (v1: qzeros hold zero − 1) / "gptq_v2" (qzeros hold zero).
enum class GptqCheckpointFormat { kV1, kV2 };
// "gptq" / "gptq_v2" (the `checkpoint_format` value of quantize_config.json).
const char* CheckpointFormatName(GptqCheckpointFormat f);
// Inverse of CheckpointFormatName; INVALID_ARGUMENT for any other string.
StatusOr<GptqCheckpointFormat> ParseCheckpointFormat(std::string_view name);

// OK when a [out_features, in_features] linear layer can be stored as a GPTQ checkpoint:
// bits ∈ {2,3,4,8}, both dimensions positive, in_features % 32 == 0, out_features % (32/bits)
// == 0 (% 32 for 3 bits). INVALID_ARGUMENT naming the dimension and the rule otherwise.
Status CheckGptqPackable(int bits, int64_t out_features, int64_t in_features);

// ---- Low-level packing ------------------------------------------------------------------------

// Packs codes [rows, cols] (row-major, each < 2^bits) along the ROW dimension into int32
// [rows·bits/32, cols]: for each column and each block of 32 rows the block's values are stored
// as `bits` words (qweight layout). Requires rows % 32 == 0, bits ∈ {2,3,4,8}; a code ≥ 2^bits
// gives INVALID_ARGUMENT naming its row and column. `codes` may be null only when empty.
StatusOr<std::vector<int32_t>> PackRows(const uint8_t* codes, int64_t rows, int64_t cols, int bits);
// Inverse of PackRows: packed int32 [rows·bits/32, cols] → codes [rows, cols].
StatusOr<std::vector<uint8_t>> UnpackRows(const int32_t* packed, int64_t rows, int64_t cols,
                                          int bits);

// Packs values [rows, cols] (row-major, each in [0, 2^bits)) along the COLUMN dimension into
// int32 [rows, cols·bits/32] (qzeros layout; each row is one bit stream laid out as PackRows
// lays out a column). Requires cols % (32/bits) == 0 (cols % 32 == 0 for 3 bits). A negative
// value or one ≥ 2^bits gives INVALID_ARGUMENT naming its row and column.
StatusOr<std::vector<int32_t>> PackColumns(const int32_t* values, int64_t rows, int64_t cols,
                                           int bits);
// Inverse of PackColumns: packed int32 [rows, cols·bits/32] → fields [rows, cols], each in
// [0, 2^bits) (the raw stored fields; no v1 adjustment).
StatusOr<std::vector<int32_t>> UnpackColumns(const int32_t* packed, int64_t rows, int64_t cols,
                                             int bits);

// ---- Layer-level packing ----------------------------------------------------------------------

// The four tensors of one quantized linear layer, as written to safetensors.
struct GptqPackedLayer {
  int bits = 0;
  int64_t out_features = 0, in_features = 0, num_groups = 0;
  GptqCheckpointFormat format = GptqCheckpointFormat::kV1;
  std::vector<int32_t> qweight;  // [in·bits/32, out]
  std::vector<int32_t> qzeros;   // [num_groups, out·bits/32]
  std::vector<uint16_t> scales;  // float16 bits, [num_groups, out]
  std::vector<int32_t> g_idx;    // [in], values in [0, num_groups)
};

// OK when `packed` is self-consistent: packable shape (CheckGptqPackable), 1 ≤ num_groups ≤
// in_features, every vector of the size its shape comment says, g_idx values in range.
// INVALID_ARGUMENT naming the tensor otherwise. (Does not look at scale or field values.)
Status CheckGptqPackedLayer(const GptqPackedLayer& packed);

// Packs a solver result.
//   codes   [out, in] row-major, original column order, each < 2^bits
//   scales  [num_groups, out] float32; rounded to float16 here (must be finite and not overflow
//           float16)
//   zeros   [num_groups, out] integers in [0, 2^bits); v1 stores zero − 1, so a zero of 0 cannot
//           be represented (the −1 would overflow into the neighbouring field) and is refused
//           with INVALID_ARGUMENT naming the group and column (the solver avoids it with its
//           v1 zero-compatibility option, or the caller writes kV2)
//   g_idx   [in] values in [0, num_groups)
// Shapes per CheckGptqPackable; 1 ≤ num_groups ≤ in_features. The pointers are only read.
StatusOr<GptqPackedLayer> PackGptqLayer(const uint8_t* codes, const float* scales,
                                        const int32_t* zeros, const int32_t* g_idx, int bits,
                                        int64_t out_features, int64_t in_features,
                                        int64_t num_groups, GptqCheckpointFormat format);

// What a loader sees in a packed layer.
struct GptqUnpackedLayer {
  std::vector<uint8_t> codes;  // [out, in], original column order
  std::vector<float> scales;   // [num_groups, out], the float16 values as float32
  // [num_groups, out]: the zero a loader subtracts, i.e. the stored field (v2) or field + 1
  // (v1). For v1 this lies in [1, 2^bits]: a field of 2^bits − 1 (e.g. a wrapped −1 written by
  // a packer that did not refuse zero 0) reads back as 2^bits, exactly as v1 loaders see it.
  std::vector<int32_t> zeros;
  std::vector<int32_t> g_idx;  // [in]
};
// Unpacks `packed` (validated with CheckGptqPackedLayer first).
StatusOr<GptqUnpackedLayer> UnpackGptqLayer(const GptqPackedLayer& packed);

// The loader's dequantisation straight from the packed tensors (the reference used by tests
// and the verify tool): W[o, i] = fp16(scales[g_idx[i], o]) · (q[i, o] − zero[g_idx[i], o]) with
// zero as in GptqUnpackedLayer::zeros, computed in float32 (exact: an 11-bit float16 significand
// times an integer of at most 9 bits fits float32's 24-bit significand).
// Returns float32 [out, in].
// With GptqDecodeArithmetic::kFloat16 each weight is then rounded to float16 (nearest even),
// as the loaders' torch path computes scales[g_idx] * (q − zero) with float16 scales: the
// product is a float16 tensor (transformers loads GPTQ checkpoints in float16).
enum class GptqDecodeArithmetic { kFloat32, kFloat16 };
StatusOr<std::vector<float>> DequantizeGptqPacked(
    const GptqPackedLayer& packed, GptqDecodeArithmetic arithmetic = GptqDecodeArithmetic::kFloat32);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_GPTQ_PACK_H_

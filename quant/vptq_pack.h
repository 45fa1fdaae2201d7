// The VPTQ checkpoint of one linear layer (what transformers >= 4.48 and the `vptq` package
// load; FORMATS.md "VPTQ checkpoint"): the per-layer `config_for_layers` entry, validation
// against the `vptq` kernels' limits, the named tensors, and a dequantiser that decodes the
// PACKED tensors with the published formula.
//
// Index layout (defined once, here; the CUDA packer includes this header): for group g and
// vector row r, the S codes of the row (S = group_size, columns in permuted order), code
// m = (res_idx << ib) | idx with ib = log2 k and rb = log2 kr (0 without a residual), form an
// LSB-first bit stream of (ib + rb) bits per code: code c occupies stream bits
// [c·(ib+rb), (c+1)·(ib+rb)); 32-bit word w of the row holds stream bits 32w .. 32w+31 (bit i
// of the word = stream bit 32w + i); the tail of the last word is zero. Words are stored as
// int32, shape (G, ⌈out/v⌉, ⌈S·(ib+rb)/32⌉).
//
// Tensors (suffixes after "<module>."; model dtype = float16 or bfloat16):
//   centroids.weight          model dtype (G, k·v)
//   res_centroids.weight      model dtype (G, kr·v)            only with a residual
//   indices                   int32       (G, ⌈M/v⌉, ⌈S·(ib+rb)/32⌉)
//   perm                      int16       (N,)  uint16 bit pattern; only with enable_perm
//   weight_scale, weight_bias model dtype (N,)                 only with enable_norm
//   outlier_centroids.weight  model dtype (1, k0·v0)           only with outliers
//   outlier_indices           int16       (1, ⌈M/v0⌉, O)       unpacked, uint16 bit pattern
//   bias                      model dtype (M,)                 only with a bias
// qforge sets enable_perm and enable_norm for every layer (VptqConfigFromResult), so it always
// writes perm, weight_scale and weight_bias; other tools' checkpoints may omit them.
// VptqTensorSuffixes(config) is this table for one config, the one list the packer, the
// dequantiser and the assembler (job/assembler.cc) use.
//
// Errors: INVALID_ARGUMENT with a message naming the field, tensor or limit. Nothing aborts.
// Thread-safety: pure functions; safe to call concurrently.
#ifndef QFORGE_QUANT_VPTQ_PACK_H_
#define QFORGE_QUANT_VPTQ_PACK_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "base/matrix.h"
#include "base/status.h"
#include "quant/vptq.h"

#if defined(__CUDACC__)
#define QF_VPTQ_HD __host__ __device__
#else
#define QF_VPTQ_HD
#endif

namespace qforge::quant {

// ---- Layout (shared by the CPU packer and the CUDA kernels) ----------------------------------

inline constexpr int kVptqWordBits = 32;

// int32 words of one (g, r) row holding `count` codes of `bits` bits.
QF_VPTQ_HD constexpr int64_t VptqPackedWords(int64_t count, int bits) {
  return (count * bits + kVptqWordBits - 1) / kVptqWordBits;
}
// Code m = (res << index_bits) | idx.
QF_VPTQ_HD constexpr uint32_t VptqCombineCode(uint32_t idx, uint32_t res, int index_bits) {
  return (res << index_bits) | idx;
}
// Writes code c (< 2^bits, bits <= 32) of a row into words (which must start zeroed).
QF_VPTQ_HD constexpr void VptqPutCode(uint32_t* words, int64_t c, int bits, uint32_t code) {
  const int64_t bit = c * bits;
  const int64_t w = bit / kVptqWordBits;
  const int s = static_cast<int>(bit % kVptqWordBits);
  words[w] |= code << s;
  if (s + bits > kVptqWordBits) words[w + 1] |= code >> (kVptqWordBits - s);
}
// Reads code c of a row.
QF_VPTQ_HD constexpr uint32_t VptqGetCode(const uint32_t* words, int64_t c, int bits) {
  const int64_t bit = c * bits;
  const int64_t w = bit / kVptqWordBits;
  const int s = static_cast<int>(bit % kVptqWordBits);
  uint64_t x = words[w] >> s;
  if (s + bits > kVptqWordBits) x |= static_cast<uint64_t>(words[w + 1]) << (kVptqWordBits - s);
  const uint64_t mask = bits >= 32 ? 0xFFFFFFFFull : ((uint64_t{1} << bits) - 1);
  return static_cast<uint32_t>(x & mask);
}

namespace vptq_layout_internal {
constexpr uint32_t PackTwelve() {  // codes 0xABC, 0x123, 0xFFF of 12 bits
  uint32_t w[2] = {0, 0};
  VptqPutCode(w, 0, 12, 0xABC);
  VptqPutCode(w, 1, 12, 0x123);
  VptqPutCode(w, 2, 12, 0xFFF);
  return w[1];
}
}  // namespace vptq_layout_internal
static_assert(VptqPackedWords(3, 12) == 2 && VptqPackedWords(128, 16) == 64 &&
                  VptqPackedWords(5, 24) == 4,
              "words per row");
// Code 2 of 12 bits starts at stream bit 24: word 0 bits 24..31 and word 1 bits 0..3.
static_assert(vptq_layout_internal::PackTwelve() == 0xF, "12-bit code 2 straddles words 0/1");

// ---- Kernel limits ---------------------------------------------------------------------------

// Whether the `vptq` package's CUDA kernels take these (FORMATS.md).
QF_VPTQ_HD constexpr bool VptqIndexBitsSupported(int b) {
  return b == 4 || b == 8 || b == 10 || b == 12 || b == 13 || b == 14 || b == 15 || b == 16;
}
QF_VPTQ_HD constexpr bool VptqResidualBitsSupported(int b) {
  return b == 0 || (b >= 2 && b <= 12) || b == 15 || b == 16;
}
QF_VPTQ_HD constexpr bool VptqVectorLenSupported(int v) {
  return v == 2 || v == 4 || v == 6 || v == 8 || v == 10 || v == 12 || v == 16;
}
// The only outlier vector length the small-batch CUDA GEMV kernel takes ("only support 4
// out_vec_len"); the kernels also fill v / v0 outlier sub-vectors per vector of length v, so
// v0 must divide v.
inline constexpr int kVptqOutlierVectorLen = 4;
QF_VPTQ_HD constexpr bool VptqOutlierVectorLenSupported(int64_t v0, int64_t v) {
  return v0 == kVptqOutlierVectorLen && v % v0 == 0;
}
// Whether every path of the package decodes rb residual bits beside ib index bits: the
// pure-torch dequant (utils/pack.py unpack_index_tensor) masks residual indices with the
// INDEX bits' mask, the CUDA dequant with the residual bits', so both agree only for rb <= ib.
QF_VPTQ_HD constexpr bool VptqResidualBitsDecodable(int rb, int ib) { return rb <= ib; }
// The torch dequant computes the padding of a packed (g, r) row as (words · 32) mod
// (S · (ib + rb)), which is the true padding only when a row holds at least 32 bits.
inline constexpr int64_t kVptqMinRowBits = 32;
// group_num > 1 with more than this many centroids crashes the dequant kernel.
inline constexpr int64_t kVptqMaxCentroidsWithGroups = 4096;
// perm and outlier indices are uint16 bit patterns in int16 tensors.
inline constexpr int64_t kVptqMaxInFeatures = 65536;
inline constexpr int64_t kVptqMaxOutlierCentroids = 65536;

// ---- Per-layer config -------------------------------------------------------------------------

// One `config_for_layers` entry, field for field (the lead serialises it to JSON with these
// names). There is deliberately no enable_proxy_error or norm_dim: the current loader fails
// with a duplicate keyword when they are present.
struct VptqLayerConfig {
  std::array<int64_t, 2> vector_lens{-1, 8};         // [v0, v]; v0 = −1 without outliers
  std::array<int64_t, 2> num_centroids{-1, 4096};    // [k0, k]; k0 = −1 without outliers
  std::array<int64_t, 2> num_res_centroids{-1, -1};  // [−1, kr]; kr = −1 without a residual
  int64_t group_num = 1;
  int64_t group_size = 0;
  int64_t outlier_size = 0;
  bool indices_as_float = false;  // always false
  bool is_indice_packed = true;   // always true
  bool enable_norm = true;
  bool enable_perm = true;
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool bias = false;
};

// The config of the artifact written for a solver result (bias: whether the layer has one).
// enable_norm and enable_perm are ALWAYS true, whatever the solve used: the `vptq` package's
// VQuantLinear registers perm / weight_scale / weight_bias only when they are enabled, but its
// CUDA paths (post_init, fast_gemv, fast_dequant, taken whenever `vptq.ops` imports) read
// self.perm, self.weight_scale and self.weight_bias unconditionally, so a layer without them
// fails with AttributeError on a GPU. A solve without norm stores weight_scale = 1 and
// weight_bias = 0, one without perm the identity perm (VptqResult holds exactly these); both
// decode exactly (x·1 + 0 = x in every dtype; argsort of the identity is the identity), at a
// cost of 48 bits per input column (< 0.003 bits per weight for out_features >= 16384).
VptqLayerConfig VptqConfigFromResult(const VptqResult& r, bool bias);
// The config a job with these options will produce for an [out, in] layer, so that
// ValidateVptqLayerConfig can refuse it before the job starts. Runs ValidateVptqOptions first.
StatusOr<VptqLayerConfig> VptqConfigFromOptions(const VptqOptions& o, int64_t out_features,
                                                int64_t in_features, bool bias);

// OK when the config is structurally sound (in = O + G·S, sizes positive, indices_as_float
// false, is_indice_packed true, k and kr powers of two) AND within the `vptq` kernels' limits:
// index bits {4,8,10,12,13,14,15,16}; residual bits {0,2..12,15,16}; v and v0 in
// {2,4,6,8,10,12,16}; group_num > 1 only with k <= 4096; in_features <= 65536 with
// enable_perm (int16 perm); k0 in [1, 65536]; AND decodable exactly by every path of the
// package (pure-torch dequant, CUDA dequant, CUDA GEMV): residual bits <= index bits (kr <= k,
// VptqResidualBitsDecodable); with outliers v0 = 4 dividing v (VptqOutlierVectorLenSupported);
// group_size · (ib + rb) >= 32 (kVptqMinRowBits). INVALID_ARGUMENT naming the config field
// and the reason otherwise. This is the one check of a layer against the package; the job
// spec (job/spec.cc ValidateLayerForSpec) calls it at submit for every planned layer.
Status ValidateVptqLayerConfig(const VptqLayerConfig& c);

// The suffixes of exactly the tensors the `vptq` package's VQuantLinear registers for a layer
// with config `c` (is_indice_packed, so no res_indices), in the order of the table above:
// centroids.weight; res_centroids.weight when kr > 0; indices; perm with enable_perm;
// weight_scale and weight_bias with enable_norm; outlier_centroids.weight and outlier_indices
// with outliers (outlier_size > 0); bias when c.bias. A checkpoint holding any other tensor of
// the module, or lacking one of these, does not load into it (missing / unexpected keys).
// The layer's `bias` is not packed by the quantizer: it stays in the source model and the
// assembler copies it.
std::vector<std::string> VptqTensorSuffixes(const VptqLayerConfig& c);

// ---- Index streams ----------------------------------------------------------------------------

// Packs `count` codes (each < 2^bits, 1 <= bits <= 32) into VptqPackedWords(count, bits)
// words. INVALID_ARGUMENT naming the position of a code that does not fit.
StatusOr<std::vector<uint32_t>> PackIndexStream(const uint32_t* codes, int64_t count, int bits);
// Inverse; `words` must hold VptqPackedWords(count, bits) words.
std::vector<uint32_t> UnpackIndexStream(const uint32_t* words, int64_t count, int bits);

// ---- Tensors ----------------------------------------------------------------------------------

enum class VptqModelDtype { kFloat16, kBFloat16 };

struct VptqTensor {
  std::string suffix;          // "centroids.weight", ...; full name = "<module>." + suffix
  std::string dtype;           // safetensors dtype: "F16", "BF16", "I32", "I16"
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian, row-major; size = product(shape) × dtype size
};

struct VptqLayerTensors {
  VptqLayerConfig config;
  std::vector<VptqTensor> tensors;  // in the order of the table above
  // The tensor with this suffix, or null.
  const VptqTensor* Find(const std::string& suffix) const;
};

// Packs a solver result. `bias` [out_features] (null = no bias) is stored in the model dtype.
// Codebooks, scales and biases are converted to `dtype` (round to nearest even; exact when
// the solver already rounded them to the same dtype). INVALID_ARGUMENT when the result is
// inconsistent or its config fails ValidateVptqLayerConfig.
StatusOr<VptqLayerTensors> PackVptqLayer(const VptqResult& r, VptqModelDtype dtype,
                                         const std::vector<float>* bias = nullptr);

// How DequantizeVptqLayer does its arithmetic.
enum class VptqDecodeArithmetic {
  // float32 on the stored 16-bit values (one rounding: to float32).
  kFloat32,
  // As the `vptq` package's torch path (VQuantLinear.dequant) computes in the model dtype
  // (that of centroids.weight): every elementwise result is rounded to that dtype (round to
  // nearest even), i.e. Wp = rnd(C + R) with a residual (C alone without), then
  // W = rnd(rnd(Wp · weight_scale) + weight_bias) with enable_norm (W = Wp without).
  kModelDtype,
};

// Decodes the packed tensors with the published formula (FORMATS.md): for g < G, r < ⌈M/v⌉,
// c < S: m = code[g,r,c]; i = m & (2^ib − 1); j = (m >> ib) & (2^rb − 1);
// Wp[r·v + t, O + g·S + c] = C[g][i·v + t] + (kr > 0 ? R[g][j·v + t] : 0) for rows < M;
// outliers Wp[r·v0 + t, c] = Co[oidx[0,r,c]·v0 + t] for c < O; then
// W[:, n] = Wp[:, argsort(perm)[n]] · weight_scale[n] + weight_bias[n] (scale 1, bias 0
// without enable_norm; identity perm without enable_perm), with `arithmetic`. Returns
// W [out, in] (the layer bias is not applied). INVALID_ARGUMENT naming the tensor that is
// missing, is not one of VptqTensorSuffixes(t.config) (a tensor the package does not
// register), or has the wrong dtype/shape/size, or an index out of range.
StatusOr<Matrix> DequantizeVptqLayer(const VptqLayerTensors& t,
                                     VptqDecodeArithmetic arithmetic = VptqDecodeArithmetic::kFloat32);

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_VPTQ_PACK_H_

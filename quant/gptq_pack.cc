#include "quant/gptq_pack.h"

#include <cmath>
#include <string>

#include "base/float16.h"

namespace qforge::quant {
namespace {

// Upper bound on the elements of any one tensor handled here (guards the size arithmetic; a
// real layer has < 2^31 elements).
constexpr int64_t kMaxElements = int64_t{1} << 40;

std::string Str(int64_t v) { return std::to_string(v); }

// Unsigned view of an int32 buffer (signed and unsigned variants of a type may alias).
uint32_t* AsWords(std::vector<int32_t>& v) { return reinterpret_cast<uint32_t*>(v.data()); }
const uint32_t* AsWords(const int32_t* p) { return reinterpret_cast<const uint32_t*>(p); }

Status CheckBits(int bits) {
  if (!GptqBitsSupported(bits)) {
    return InvalidArgumentError("GPTQ bits = " + Str(bits) +
                                " is not supported (use 2, 3, 4 or 8)");
  }
  return OkStatus();
}

// Validates a [rows, cols] matrix argument: non-negative dimensions, bounded size, and a
// non-null pointer when it is not empty.
Status CheckMatrix(const char* what, const void* data, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) {
    return InvalidArgumentError(std::string(what) + ": negative shape [" + Str(rows) + ", " +
                                Str(cols) + "]");
  }
  if (cols != 0 && rows > kMaxElements / cols) {
    return InvalidArgumentError(std::string(what) + ": shape [" + Str(rows) + ", " + Str(cols) +
                                "] exceeds the supported tensor size (2^40 elements)");
  }
  if (data == nullptr && rows * cols != 0) {
    return InvalidArgumentError(std::string(what) + ": null data for shape [" + Str(rows) + ", " +
                                Str(cols) + "]");
  }
  return OkStatus();
}

// The packed dimension must be a whole number of words (and of 3-word blocks for 3 bits).
Status CheckPackedDim(const char* what, const char* dim, int64_t n, int bits, bool require_32) {
  const int64_t granule = require_32 ? kGptqBlockValues : GptqPackGranule(bits);
  if (n % granule != 0) {
    return InvalidArgumentError(
        std::string(what) + ": " + dim + " = " + Str(n) + " is not a multiple of " + Str(granule) +
        " (" + Str(bits) + "-bit values are packed " +
        (granule == kGptqBlockValues ? "in blocks of 32" : Str(granule) + " per 32-bit word") +
        ")");
  }
  return OkStatus();
}

// Finds the first code ≥ 2^bits in codes[rows, cols]; OK when there is none.
Status CheckCodes(const char* what, const char* row_name, const char* col_name,
                  const uint8_t* codes, int64_t rows, int64_t cols, int bits) {
  if (bits >= 8) return OkStatus();
  const int64_t n = rows * cols;
  unsigned bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= static_cast<unsigned>(codes[k]) >> bits;
  if (bad == 0) return OkStatus();
  for (int64_t k = 0; k < n; ++k) {
    if ((codes[k] >> bits) != 0) {
      return InvalidArgumentError(std::string(what) + "[" + row_name + " " + Str(k / cols) + ", " +
                                  col_name + " " + Str(k % cols) + "] = " + Str(codes[k]) +
                                  " does not fit in " + Str(bits) + " bits (max " +
                                  Str(GptqFieldMask(bits)) + ")");
    }
  }
  return InternalError("CheckCodes: inconsistent scan");  // unreachable
}

Status CheckFieldValues(const char* what, const char* row_name, const char* col_name,
                        const int32_t* values, int64_t rows, int64_t cols, int bits) {
  const int64_t n = rows * cols;
  const uint32_t limit = GptqFieldMask(bits);
  for (int64_t k = 0; k < n; ++k) {
    if (values[k] < 0 || static_cast<uint32_t>(values[k]) > limit) {
      return InvalidArgumentError(std::string(what) + "[" + row_name + " " + Str(k / cols) + ", " +
                                  col_name + " " + Str(k % cols) + "] = " + Str(values[k]) +
                                  " is outside [0, " + Str(limit) + "] (" + Str(bits) + " bits)");
    }
  }
  return OkStatus();
}

Status CheckGidx(const int32_t* g_idx, int64_t in_features, int64_t num_groups) {
  for (int64_t i = 0; i < in_features; ++i) {
    if (g_idx[i] < 0 || g_idx[i] >= num_groups) {
      return InvalidArgumentError("g_idx[" + Str(i) + "] = " + Str(g_idx[i]) +
                                  " is outside [0, num_groups = " + Str(num_groups) + ")");
    }
  }
  return OkStatus();
}

Status CheckNumGroups(int64_t num_groups, int64_t in_features) {
  if (num_groups < 1 || num_groups > in_features) {
    return InvalidArgumentError("num_groups = " + Str(num_groups) +
                                " is outside [1, in_features = " + Str(in_features) + "]");
  }
  return OkStatus();
}

Status CheckSize(const char* tensor, size_t actual, int64_t expected, const std::string& shape) {
  if (static_cast<int64_t>(actual) != expected) {
    return InvalidArgumentError(std::string("GPTQ ") + tensor + " has " +
                                Str(static_cast<int64_t>(actual)) + " elements; shape " + shape +
                                " needs " + Str(expected));
  }
  return OkStatus();
}

// Packs each row of values[rows, cols] (already range-checked) as one bit stream.
void PackColumnsUnchecked(const int32_t* values, int64_t rows, int64_t cols, int bits,
                          uint32_t* out) {
  const int64_t words = GptqPackedLength(cols, bits);
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* src = values + r * cols;
    uint32_t* dst = out + r * words;
    for (int64_t k = 0; k < cols; ++k) {
      const uint32_t x = static_cast<uint32_t>(src[k]);
      const int64_t w = GptqFieldWord(k, bits);
      const int s = GptqFieldShift(k, bits);
      dst[w] |= x << s;
      if (GptqFieldStraddles(k, bits)) dst[w + 1] |= x >> (kGptqWordBits - s);
    }
  }
}

void UnpackColumnsUnchecked(const uint32_t* packed, int64_t rows, int64_t cols, int bits,
                            int32_t* out) {
  const int64_t words = GptqPackedLength(cols, bits);
  const uint32_t mask = GptqFieldMask(bits);
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* src = packed + r * words;
    int32_t* dst = out + r * cols;
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t w = GptqFieldWord(k, bits);
      const int s = GptqFieldShift(k, bits);
      uint32_t x = src[w] >> s;
      if (GptqFieldStraddles(k, bits)) x |= src[w + 1] << (kGptqWordBits - s);
      dst[k] = static_cast<int32_t>(x & mask);
    }
  }
}

}  // namespace

const char* CheckpointFormatName(GptqCheckpointFormat f) {
  switch (f) {
    case GptqCheckpointFormat::kV1:
      return "gptq";
    case GptqCheckpointFormat::kV2:
      return "gptq_v2";
  }
  return "unknown";
}

StatusOr<GptqCheckpointFormat> ParseCheckpointFormat(std::string_view name) {
  if (name == "gptq") return GptqCheckpointFormat::kV1;
  if (name == "gptq_v2") return GptqCheckpointFormat::kV2;
  return InvalidArgumentError("checkpoint_format \"" + std::string(name) +
                              "\" is not a GPTQ checkpoint format (use \"gptq\" or \"gptq_v2\")");
}

Status CheckGptqPackable(int bits, int64_t out_features, int64_t in_features) {
  QF_RETURN_IF_ERROR(CheckBits(bits));
  if (out_features <= 0 || in_features <= 0) {
    return InvalidArgumentError("GPTQ layer shape [out_features = " + Str(out_features) +
                                ", in_features = " + Str(in_features) + "] must be positive");
  }
  if (out_features > kMaxElements / in_features) {
    return InvalidArgumentError("GPTQ layer shape [" + Str(out_features) + ", " + Str(in_features) +
                                "] exceeds the supported tensor size (2^40 elements)");
  }
  if (in_features % kGptqBlockValues != 0) {
    return InvalidArgumentError("GPTQ in_features = " + Str(in_features) +
                                " is not a multiple of 32 (qweight packs the input dimension in "
                                "blocks of 32 rows)");
  }
  const int64_t granule = GptqPackGranule(bits);
  if (out_features % granule != 0) {
    return InvalidArgumentError(
        "GPTQ out_features = " + Str(out_features) + " is not a multiple of " + Str(granule) +
        " (qzeros packs the output dimension " +
        (bits == 3 ? std::string("in blocks of 32 for 3 bits")
                   : Str(granule) + " values per 32-bit word for " + Str(bits) + " bits") +
        ")");
  }
  return OkStatus();
}

StatusOr<std::vector<int32_t>> PackRows(const uint8_t* codes, int64_t rows, int64_t cols,
                                        int bits) {
  QF_RETURN_IF_ERROR(CheckBits(bits));
  QF_RETURN_IF_ERROR(CheckMatrix("PackRows codes", codes, rows, cols));
  QF_RETURN_IF_ERROR(CheckPackedDim("PackRows", "rows", rows, bits, /*require_32=*/true));
  QF_RETURN_IF_ERROR(CheckCodes("PackRows codes", "row", "col", codes, rows, cols, bits));
  std::vector<int32_t> out(static_cast<size_t>(GptqPackedLength(rows, bits) * cols), 0);
  uint32_t* words = AsWords(out);
  // Row by row: every row of a block writes one field at the same (word, shift) in each column,
  // so the inner loop is a contiguous, vectorisable sweep over the columns.
  for (int64_t b = 0; b < rows / kGptqBlockValues; ++b) {
    uint32_t* block = words + b * GptqWordsPerBlock(bits) * cols;
    for (int j = 0; j < kGptqBlockValues; ++j) {
      const uint8_t* src = codes + (b * kGptqBlockValues + j) * cols;
      const int s = GptqFieldShift(j, bits);
      uint32_t* dst = block + GptqFieldWord(j, bits) * cols;
      for (int64_t c = 0; c < cols; ++c) dst[c] |= static_cast<uint32_t>(src[c]) << s;
      if (GptqFieldStraddles(j, bits)) {
        uint32_t* next = dst + cols;
        for (int64_t c = 0; c < cols; ++c) {
          next[c] |= static_cast<uint32_t>(src[c]) >> (kGptqWordBits - s);
        }
      }
    }
  }
  return out;
}

StatusOr<std::vector<uint8_t>> UnpackRows(const int32_t* packed, int64_t rows, int64_t cols,
                                          int bits) {
  QF_RETURN_IF_ERROR(CheckBits(bits));
  QF_RETURN_IF_ERROR(CheckMatrix("UnpackRows packed", packed, rows, cols));
  QF_RETURN_IF_ERROR(CheckPackedDim("UnpackRows", "rows", rows, bits, /*require_32=*/true));
  std::vector<uint8_t> out(static_cast<size_t>(rows * cols));
  const uint32_t* words = AsWords(packed);
  const uint32_t mask = GptqFieldMask(bits);
  for (int64_t b = 0; b < rows / kGptqBlockValues; ++b) {
    const uint32_t* block = words + b * GptqWordsPerBlock(bits) * cols;
    for (int j = 0; j < kGptqBlockValues; ++j) {
      uint8_t* dst = out.data() + (b * kGptqBlockValues + j) * cols;
      const int s = GptqFieldShift(j, bits);
      const uint32_t* src = block + GptqFieldWord(j, bits) * cols;
      if (GptqFieldStraddles(j, bits)) {
        const uint32_t* next = src + cols;
        for (int64_t c = 0; c < cols; ++c) {
          dst[c] = static_cast<uint8_t>(((src[c] >> s) | (next[c] << (kGptqWordBits - s))) & mask);
        }
      } else {
        for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<uint8_t>((src[c] >> s) & mask);
      }
    }
  }
  return out;
}

StatusOr<std::vector<int32_t>> PackColumns(const int32_t* values, int64_t rows, int64_t cols,
                                           int bits) {
  QF_RETURN_IF_ERROR(CheckBits(bits));
  QF_RETURN_IF_ERROR(CheckMatrix("PackColumns values", values, rows, cols));
  QF_RETURN_IF_ERROR(CheckPackedDim("PackColumns", "cols", cols, bits, /*require_32=*/false));
  QF_RETURN_IF_ERROR(
      CheckFieldValues("PackColumns values", "row", "col", values, rows, cols, bits));
  std::vector<int32_t> out(static_cast<size_t>(rows * GptqPackedLength(cols, bits)), 0);
  PackColumnsUnchecked(values, rows, cols, bits, AsWords(out));
  return out;
}

StatusOr<std::vector<int32_t>> UnpackColumns(const int32_t* packed, int64_t rows, int64_t cols,
                                             int bits) {
  QF_RETURN_IF_ERROR(CheckBits(bits));
  QF_RETURN_IF_ERROR(CheckMatrix("UnpackColumns packed", packed, rows, cols));
  QF_RETURN_IF_ERROR(CheckPackedDim("UnpackColumns", "cols", cols, bits, /*require_32=*/false));
  std::vector<int32_t> out(static_cast<size_t>(rows * cols));
  UnpackColumnsUnchecked(AsWords(packed), rows, cols, bits, out.data());
  return out;
}

Status CheckGptqPackedLayer(const GptqPackedLayer& p) {
  QF_RETURN_IF_ERROR(CheckGptqPackable(p.bits, p.out_features, p.in_features));
  QF_RETURN_IF_ERROR(CheckNumGroups(p.num_groups, p.in_features));
  if (p.format != GptqCheckpointFormat::kV1 && p.format != GptqCheckpointFormat::kV2) {
    return InvalidArgumentError("GPTQ checkpoint format value " + Str(static_cast<int>(p.format)) +
                                " is not gptq or gptq_v2");
  }
  const int64_t out = p.out_features, in = p.in_features, g = p.num_groups;
  const int64_t packed_in = GptqPackedLength(in, p.bits);
  const int64_t packed_out = GptqPackedLength(out, p.bits);
  QF_RETURN_IF_ERROR(CheckSize("qweight", p.qweight.size(), packed_in * out,
                               "[" + Str(packed_in) + ", " + Str(out) + "]"));
  QF_RETURN_IF_ERROR(CheckSize("qzeros", p.qzeros.size(), g * packed_out,
                               "[" + Str(g) + ", " + Str(packed_out) + "]"));
  QF_RETURN_IF_ERROR(
      CheckSize("scales", p.scales.size(), g * out, "[" + Str(g) + ", " + Str(out) + "]"));
  QF_RETURN_IF_ERROR(CheckSize("g_idx", p.g_idx.size(), in, "[" + Str(in) + "]"));
  return CheckGidx(p.g_idx.data(), in, g);
}

StatusOr<GptqPackedLayer> PackGptqLayer(const uint8_t* codes, const float* scales,
                                        const int32_t* zeros, const int32_t* g_idx, int bits,
                                        int64_t out_features, int64_t in_features,
                                        int64_t num_groups, GptqCheckpointFormat format) {
  QF_RETURN_IF_ERROR(CheckGptqPackable(bits, out_features, in_features));
  QF_RETURN_IF_ERROR(CheckNumGroups(num_groups, in_features));
  if (format != GptqCheckpointFormat::kV1 && format != GptqCheckpointFormat::kV2) {
    return InvalidArgumentError("GPTQ checkpoint format value " + Str(static_cast<int>(format)) +
                                " is not gptq or gptq_v2");
  }
  const int64_t out = out_features, in = in_features, groups = num_groups;
  QF_RETURN_IF_ERROR(CheckMatrix("GPTQ codes", codes, out, in));
  QF_RETURN_IF_ERROR(CheckMatrix("GPTQ scales", scales, groups, out));
  QF_RETURN_IF_ERROR(CheckMatrix("GPTQ zeros", zeros, groups, out));
  QF_RETURN_IF_ERROR(CheckMatrix("GPTQ g_idx", g_idx, 1, in));
  QF_RETURN_IF_ERROR(CheckCodes("GPTQ codes", "out", "in", codes, out, in, bits));
  QF_RETURN_IF_ERROR(CheckGidx(g_idx, in, groups));
  QF_RETURN_IF_ERROR(CheckFieldValues("GPTQ zeros", "group", "out", zeros, groups, out, bits));

  GptqPackedLayer p;
  p.bits = bits;
  p.out_features = out;
  p.in_features = in;
  p.num_groups = groups;
  p.format = format;

  // scales: float32 → float16 bits; refuse what a loader could not use.
  p.scales.resize(static_cast<size_t>(groups * out));
  for (int64_t k = 0; k < groups * out; ++k) {
    const uint16_t h = FloatToHalf(scales[k]);
    if (!std::isfinite(scales[k]) || (h & 0x7C00u) == 0x7C00u) {
      return InvalidArgumentError("GPTQ scales[group " + Str(k / out) + ", out " + Str(k % out) +
                                  "] = " + std::to_string(scales[k]) +
                                  " is not finite in float16 (|scale| must be < 65520)");
    }
    p.scales[static_cast<size_t>(k)] = h;
  }

  // qzeros: v1 stores zero − 1, which cannot represent a zero of 0.
  std::vector<int32_t> stored(static_cast<size_t>(groups * out));
  const int32_t offset = format == GptqCheckpointFormat::kV1 ? 1 : 0;
  for (int64_t k = 0; k < groups * out; ++k) {
    if (zeros[k] < offset) {
      return InvalidArgumentError(
          "GPTQ zeros[group " + Str(k / out) + ", out " + Str(k % out) +
          "] = 0 cannot be stored in checkpoint format \"gptq\" (v1 stores zero - 1; -1 would "
          "overflow into the neighbouring field): quantize with the v1 zero-compatibility option "
          "or write \"gptq_v2\"");
    }
    stored[static_cast<size_t>(k)] = zeros[k] - offset;
  }
  p.qzeros.assign(static_cast<size_t>(groups * GptqPackedLength(out, bits)), 0);
  PackColumnsUnchecked(stored.data(), groups, out, bits, AsWords(p.qzeros));

  // qweight [in·bits/32, out]: each 32-input block of row o of codes is contiguous; its `bits`
  // words go to column o of rows b·bits … b·bits + bits − 1.
  p.qweight.assign(static_cast<size_t>(GptqPackedLength(in, bits) * out), 0);
  uint32_t* qw = AsWords(p.qweight);
  const int words_per_block = GptqWordsPerBlock(bits);
  for (int64_t b = 0; b < in / kGptqBlockValues; ++b) {
    uint32_t* block = qw + b * words_per_block * out;
    for (int64_t o = 0; o < out; ++o) {
      GptqPackBlock(codes + o * in + b * kGptqBlockValues, 1, bits, block + o, out);
    }
  }

  p.g_idx.assign(g_idx, g_idx + in);
  return p;
}

StatusOr<GptqUnpackedLayer> UnpackGptqLayer(const GptqPackedLayer& p) {
  QF_RETURN_IF_ERROR(CheckGptqPackedLayer(p));
  const int64_t out = p.out_features, in = p.in_features, groups = p.num_groups;
  const int bits = p.bits;
  GptqUnpackedLayer u;

  u.codes.resize(static_cast<size_t>(out * in));
  const uint32_t* qw = AsWords(p.qweight.data());
  const int words_per_block = GptqWordsPerBlock(bits);
  for (int64_t b = 0; b < in / kGptqBlockValues; ++b) {
    const uint32_t* block = qw + b * words_per_block * out;
    for (int64_t o = 0; o < out; ++o) {
      uint8_t* dst = u.codes.data() + o * in + b * kGptqBlockValues;
      for (int j = 0; j < kGptqBlockValues; ++j) {
        dst[j] = static_cast<uint8_t>(GptqUnpackField(block + o, out, j, bits));
      }
    }
  }

  u.zeros.resize(static_cast<size_t>(groups * out));
  UnpackColumnsUnchecked(AsWords(p.qzeros.data()), groups, out, bits, u.zeros.data());
  if (p.format == GptqCheckpointFormat::kV1) {
    for (int32_t& z : u.zeros) z += 1;  // A wrapped −1 (field 2^bits − 1) reads as 2^bits.
  }

  u.scales.resize(p.scales.size());
  for (size_t k = 0; k < p.scales.size(); ++k) u.scales[k] = HalfToFloat(p.scales[k]);
  u.g_idx = p.g_idx;
  return u;
}

StatusOr<std::vector<float>> DequantizeGptqPacked(const GptqPackedLayer& packed,
                                                  GptqDecodeArithmetic arithmetic) {
  const bool f16 = arithmetic == GptqDecodeArithmetic::kFloat16;
  QF_ASSIGN_OR_RETURN(GptqUnpackedLayer u, UnpackGptqLayer(packed));
  const int64_t out = packed.out_features, in = packed.in_features;
  std::vector<float> w(static_cast<size_t>(out * in));
  for (int64_t o = 0; o < out; ++o) {
    const uint8_t* q = u.codes.data() + o * in;
    float* row = w.data() + o * in;
    for (int64_t i = 0; i < in; ++i) {
      const int64_t gz = static_cast<int64_t>(u.g_idx[static_cast<size_t>(i)]) * out + o;
      row[i] = u.scales[static_cast<size_t>(gz)] *
               static_cast<float>(static_cast<int32_t>(q[i]) - u.zeros[static_cast<size_t>(gz)]);
      if (f16) row[i] = RoundToHalf(row[i]);
    }
  }
  return w;
}

}  // namespace qforge::quant

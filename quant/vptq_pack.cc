// VPTQ checkpoint packing, validation and dequantisation. See vptq_pack.h.
#include "quant/vptq_pack.h"

#include <cmath>
#include <string>
#include <utility>

#include "base/float16.h"

namespace qforge::quant {
namespace {

std::string Str(int64_t v) { return std::to_string(v); }

// log2 of a power of two, −1 otherwise.
int ExactLog2(int64_t k) {
  if (k < 1 || (k & (k - 1)) != 0) return -1;
  int b = 0;
  while ((int64_t{1} << b) < k) ++b;
  return b;
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

uint16_t ToModel(float x, VptqModelDtype d) {
  return d == VptqModelDtype::kFloat16 ? FloatToHalf(x) : FloatToBFloat16(x);
}
float FromModel(uint16_t b, const std::string& dtype) {
  return dtype == "F16" ? HalfToFloat(b) : BFloat16ToFloat(b);
}
const char* ModelDtypeName(VptqModelDtype d) { return d == VptqModelDtype::kFloat16 ? "F16" : "BF16"; }

void PutU16(std::vector<uint8_t>& out, uint16_t v) {
  out.push_back(static_cast<uint8_t>(v & 0xFF));
  out.push_back(static_cast<uint8_t>(v >> 8));
}
void PutU32(std::vector<uint8_t>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>((v >> (8 * i)) & 0xFF));
}
uint16_t GetU16(const std::vector<uint8_t>& b, int64_t i) {
  return static_cast<uint16_t>(b[static_cast<size_t>(2 * i)] | (b[static_cast<size_t>(2 * i + 1)] << 8));
}
uint32_t GetU32(const std::vector<uint8_t>& b, int64_t i) {
  uint32_t v = 0;
  for (int k = 0; k < 4; ++k) v |= static_cast<uint32_t>(b[static_cast<size_t>(4 * i + k)]) << (8 * k);
  return v;
}

VptqTensor ModelTensor(std::string suffix, VptqModelDtype d, std::vector<int64_t> shape,
                       const float* values, int64_t count) {
  VptqTensor t;
  t.suffix = std::move(suffix);
  t.dtype = ModelDtypeName(d);
  t.shape = std::move(shape);
  t.bytes.reserve(static_cast<size_t>(2 * count));
  for (int64_t i = 0; i < count; ++i) PutU16(t.bytes, ToModel(values[i], d));
  return t;
}

int64_t DtypeSize(const std::string& dtype) {
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16") return 2;
  if (dtype == "I32") return 4;
  return 0;
}

// The tensor `suffix` with one of `dtypes` and exactly `shape`.
StatusOr<const VptqTensor*> Expect(const VptqLayerTensors& t, const std::string& suffix,
                                   const std::vector<std::string>& dtypes,
                                   const std::vector<int64_t>& shape) {
  const VptqTensor* x = t.Find(suffix);
  if (x == nullptr) return InvalidArgumentError("VPTQ tensor '" + suffix + "' is missing");
  bool dtype_ok = false;
  for (const std::string& d : dtypes) dtype_ok = dtype_ok || x->dtype == d;
  if (!dtype_ok) {
    return InvalidArgumentError("VPTQ tensor '" + suffix + "' has dtype " + x->dtype + ", expected " + dtypes[0]);
  }
  auto shape_str = [](const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + Str(s[i]);
    return out + ")";
  };
  if (x->shape != shape) {
    return InvalidArgumentError("VPTQ tensor '" + suffix + "' has shape " + shape_str(x->shape) +
                                ", expected " + shape_str(shape));
  }
  int64_t count = 1;
  for (int64_t s : shape) count *= s;
  if (static_cast<int64_t>(x->bytes.size()) != count * DtypeSize(x->dtype)) {
    return InvalidArgumentError("VPTQ tensor '" + suffix + "' holds " + Str(static_cast<int64_t>(x->bytes.size())) +
                                " bytes, expected " + Str(count * DtypeSize(x->dtype)));
  }
  return x;
}

}  // namespace

const VptqTensor* VptqLayerTensors::Find(const std::string& suffix) const {
  for (const VptqTensor& t : tensors) {
    if (t.suffix == suffix) return &t;
  }
  return nullptr;
}

std::vector<std::string> VptqTensorSuffixes(const VptqLayerConfig& c) {
  std::vector<std::string> s = {"centroids.weight"};
  if (c.num_res_centroids[1] > 0) s.push_back("res_centroids.weight");
  s.push_back("indices");
  if (c.enable_perm) s.push_back("perm");
  if (c.enable_norm) {
    s.push_back("weight_scale");
    s.push_back("weight_bias");
  }
  if (c.outlier_size > 0) {
    s.push_back("outlier_centroids.weight");
    s.push_back("outlier_indices");
  }
  if (c.bias) s.push_back("bias");
  return s;
}

VptqLayerConfig VptqConfigFromResult(const VptqResult& r, bool bias) {
  VptqLayerConfig c;
  const bool outliers = r.outlier_size > 0;
  c.vector_lens = {outliers ? r.outlier_vector_len : -1, r.vector_len};
  c.num_centroids = {outliers ? r.outlier_num_centroids : -1, r.num_centroids};
  c.num_res_centroids = {-1, r.num_res_centroids > 0 ? r.num_res_centroids : -1};
  c.group_num = r.group_num;
  c.group_size = r.group_size;
  c.outlier_size = r.outlier_size;
  // Always on in the artifact (see the header): a solve without them stores identity tensors.
  c.enable_norm = true;
  c.enable_perm = true;
  c.in_features = r.in_features;
  c.out_features = r.out_features;
  c.bias = bias;
  return c;
}

StatusOr<VptqLayerConfig> VptqConfigFromOptions(const VptqOptions& o, int64_t out_features,
                                                int64_t in_features, bool bias) {
  QF_RETURN_IF_ERROR(ValidateVptqOptions(o, out_features, in_features));
  VptqResult r;
  r.out_features = out_features;
  r.in_features = in_features;
  r.vector_len = o.vector_len;
  r.num_centroids = o.num_centroids;
  r.num_res_centroids = o.num_res_centroids;
  r.outlier_size = o.outlier_size;
  r.outlier_vector_len = o.outlier_size > 0 ? o.outlier_vector_len : 0;
  r.outlier_num_centroids = o.outlier_size > 0 ? o.outlier_num_centroids : 0;
  r.group_num = o.group_num;
  r.group_size = (in_features - o.outlier_size) / o.group_num;
  return VptqConfigFromResult(r, bias);  // enable_norm / enable_perm: always on in the artifact
}

Status ValidateVptqLayerConfig(const VptqLayerConfig& c) {
  auto bad = [](const std::string& m) { return InvalidArgumentError("VPTQ layer config: " + m); };
  if (c.in_features < 1 || c.out_features < 1) {
    return bad("in_features and out_features must be >= 1, got " + Str(c.in_features) + " and " + Str(c.out_features));
  }
  if (c.indices_as_float) return bad("indices_as_float must be false");
  if (!c.is_indice_packed) return bad("is_indice_packed must be true (only packed indices are written)");
  const int64_t v = c.vector_lens[1], k = c.num_centroids[1], kr = c.num_res_centroids[1];
  if (!VptqVectorLenSupported(static_cast<int>(v)) || v != static_cast<int>(v)) {
    return bad("vector_len " + Str(v) + " is not supported by the vptq kernels (allowed: 2, 4, 6, 8, 10, 12, 16)");
  }
  const int ib = ExactLog2(k);
  if (ib < 0) return bad("num_centroids " + Str(k) + " is not a power of two");
  if (!VptqIndexBitsSupported(ib)) {
    return bad("num_centroids " + Str(k) + " needs " + Str(ib) +
               " index bits; the vptq kernels take 4, 8, 10, 12, 13, 14, 15 or 16");
  }
  if (c.num_res_centroids[0] != -1) return bad("num_res_centroids[0] must be -1 (no residual on outliers)");
  if (kr != -1) {
    const int rb = ExactLog2(kr);
    if (rb < 0) return bad("num_res_centroids " + Str(kr) + " is not a power of two (use -1 for no residual)");
    if (rb == 0 || !VptqResidualBitsSupported(rb)) {
      return bad("num_res_centroids " + Str(kr) + " needs " + Str(rb) +
                 " residual bits; the vptq kernels take 2..12, 15 or 16 (or -1 for none)");
    }
    if (!VptqResidualBitsDecodable(rb, ib)) {
      return bad("num_res_centroids " + Str(kr) + " (" + Str(rb) + " residual bits) exceeds num_centroids " +
                 Str(k) + " (" + Str(ib) + " index bits): the vptq package's torch dequant (utils/pack.py "
                 "unpack_index_tensor) masks residual indices with the index bits, so residual entries >= " +
                 Str(k) + " would decode wrongly; use num_res_centroids <= num_centroids");
    }
  }
  if (c.group_num < 1) return bad("group_num must be >= 1, got " + Str(c.group_num));
  if (c.group_size < 1) return bad("group_size must be >= 1, got " + Str(c.group_size));
  if (c.outlier_size < 0) return bad("outlier_size must be >= 0, got " + Str(c.outlier_size));
  if (c.outlier_size + c.group_num * c.group_size != c.in_features) {
    return bad("outlier_size + group_num * group_size = " + Str(c.outlier_size + c.group_num * c.group_size) +
               " != in_features = " + Str(c.in_features));
  }
  {
    const int row_bits = ib + (kr != -1 ? ExactLog2(kr) : 0);
    if (c.group_size * row_bits < kVptqMinRowBits) {
      return bad("group_size " + Str(c.group_size) + " x " + Str(row_bits) + " index bits = " +
                 Str(c.group_size * row_bits) + " < 32: the vptq package's torch dequant miscounts the "
                 "padding of a packed index row shorter than one 32-bit word; use fewer groups (group_num) "
                 "or fewer outlier columns");
    }
  }
  if (c.group_num > 1 && k > kVptqMaxCentroidsWithGroups) {
    return bad("group_num " + Str(c.group_num) + " > 1 with num_centroids " + Str(k) +
               " > 4096 crashes the vptq dequant kernel");
  }
  if (c.outlier_size > 0) {
    if (c.vector_lens[0] != kVptqOutlierVectorLen) {
      return bad("outlier vector_lens[0] " + Str(c.vector_lens[0]) +
                 " is not 4: the vptq package's small-batch CUDA GEMV kernel takes only outlier vector length 4");
    }
    if (!VptqOutlierVectorLenSupported(c.vector_lens[0], v)) {
      return bad("vector_lens[1] " + Str(v) + " is not a multiple of the outlier vector length " +
                 Str(c.vector_lens[0]) + ": the vptq CUDA kernels fill vector_len / outlier_vector_len outlier "
                 "sub-vectors per vector, leaving rows unwritten otherwise; use vector_len 4, 8, 12 or 16 with outliers");
    }
    if (c.num_centroids[0] < 1 || c.num_centroids[0] > kVptqMaxOutlierCentroids) {
      return bad("outlier num_centroids " + Str(c.num_centroids[0]) +
                 " outside [1, 65536] (outlier indices are 16-bit)");
    }
  } else if (c.vector_lens[0] != -1 || c.num_centroids[0] != -1) {
    return bad("vector_lens[0] and num_centroids[0] must be -1 without outliers");
  }
  if (c.enable_perm && c.in_features > kVptqMaxInFeatures) {
    return bad("in_features " + Str(c.in_features) + " > 65536 cannot be stored in the int16 perm (the "
               "vptq package's CUDA paths read a perm for every layer, so it is written even with --no-perm)");
  }
  return OkStatus();
}

StatusOr<std::vector<uint32_t>> PackIndexStream(const uint32_t* codes, int64_t count, int bits) {
  if (bits < 1 || bits > 32) return InvalidArgumentError("index stream: bits = " + Str(bits) + " outside [1, 32]");
  if (count < 0) return InvalidArgumentError("index stream: count < 0");
  std::vector<uint32_t> words(static_cast<size_t>(VptqPackedWords(count, bits)), 0u);
  const uint64_t limit = uint64_t{1} << bits;
  for (int64_t c = 0; c < count; ++c) {
    if (codes[c] >= limit) {
      return InvalidArgumentError("index stream: code " + Str(codes[c]) + " at position " + Str(c) +
                                  " does not fit in " + Str(bits) + " bits");
    }
    VptqPutCode(words.data(), c, bits, codes[c]);
  }
  return words;
}

std::vector<uint32_t> UnpackIndexStream(const uint32_t* words, int64_t count, int bits) {
  std::vector<uint32_t> codes(static_cast<size_t>(count));
  for (int64_t c = 0; c < count; ++c) codes[static_cast<size_t>(c)] = VptqGetCode(words, c, bits);
  return codes;
}

StatusOr<VptqLayerTensors> PackVptqLayer(const VptqResult& r, VptqModelDtype dtype,
                                         const std::vector<float>* bias) {
  VptqLayerTensors out;
  out.config = VptqConfigFromResult(r, bias != nullptr);
  QF_RETURN_IF_ERROR(ValidateVptqLayerConfig(out.config));
  const int64_t M = r.out_features, N = r.in_features, G = r.group_num, S = r.group_size;
  const int64_t O = r.outlier_size, v = r.vector_len, k = r.num_centroids;
  const int64_t kr = r.num_res_centroids > 0 ? r.num_res_centroids : 0;
  const int64_t R = CeilDiv(M, v);
  auto bad = [](const std::string& m) { return InvalidArgumentError("VPTQ pack: " + m); };
  if (r.num_vector_rows != R) return bad("num_vector_rows " + Str(r.num_vector_rows) + " != ceil(out / v) = " + Str(R));
  if (static_cast<int64_t>(r.centroids.size()) != G) return bad("centroids holds " + Str(static_cast<int64_t>(r.centroids.size())) + " groups, expected " + Str(G));
  if (r.indices.size() != static_cast<size_t>(G * R * S)) return bad("indices size");
  if (kr > 0 && (static_cast<int64_t>(r.res_centroids.size()) != G || r.res_indices.size() != static_cast<size_t>(G * R * S))) {
    return bad("res_centroids / res_indices sizes");
  }
  if (r.perm.size() != static_cast<size_t>(N) || r.weight_scale.size() != static_cast<size_t>(N) ||
      r.weight_bias.size() != static_cast<size_t>(N)) {
    return bad("perm / weight_scale / weight_bias must hold in_features values");
  }
  if (bias != nullptr && static_cast<int64_t>(bias->size()) != M) {
    return bad("bias holds " + Str(static_cast<int64_t>(bias->size())) + " values, expected out_features = " + Str(M));
  }

  // centroids.weight (G, k·v)
  {
    std::vector<float> all;
    all.reserve(static_cast<size_t>(G * k * v));
    for (int64_t g = 0; g < G; ++g) {
      const auto& c = r.centroids[static_cast<size_t>(g)];
      if (static_cast<int64_t>(c.size()) != k * v) return bad("codebook of group " + Str(g) + " does not hold k * v values");
      all.insert(all.end(), c.begin(), c.end());
    }
    out.tensors.push_back(ModelTensor("centroids.weight", dtype, {G, k * v}, all.data(), G * k * v));
  }
  if (kr > 0) {
    std::vector<float> all;
    for (int64_t g = 0; g < G; ++g) {
      const auto& c = r.res_centroids[static_cast<size_t>(g)];
      if (static_cast<int64_t>(c.size()) != kr * v) return bad("residual codebook of group " + Str(g) + " does not hold kr * v values");
      all.insert(all.end(), c.begin(), c.end());
    }
    out.tensors.push_back(ModelTensor("res_centroids.weight", dtype, {G, kr * v}, all.data(), G * kr * v));
  }
  // indices (G, R, words)
  {
    const int ib = ExactLog2(k);
    const int rb = kr > 0 ? ExactLog2(kr) : 0;
    const int bits = ib + rb;
    const int64_t words = VptqPackedWords(S, bits);
    VptqTensor t;
    t.suffix = "indices";
    t.dtype = "I32";
    t.shape = {G, R, words};
    t.bytes.reserve(static_cast<size_t>(G * R * words * 4));
    std::vector<uint32_t> codes(static_cast<size_t>(S));
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t rr = 0; rr < R; ++rr) {
        for (int64_t c = 0; c < S; ++c) {
          const size_t at = static_cast<size_t>((g * R + rr) * S + c);
          const int64_t i = r.indices[at];
          const int64_t j = kr > 0 ? r.res_indices[at] : 0;
          if (i < 0 || i >= k) return bad("index " + Str(i) + " out of range at (group " + Str(g) + ", row " + Str(rr) + ", column " + Str(c) + ")");
          if (j < 0 || (kr > 0 && j >= kr)) return bad("residual index " + Str(j) + " out of range at (group " + Str(g) + ", row " + Str(rr) + ", column " + Str(c) + ")");
          codes[static_cast<size_t>(c)] = VptqCombineCode(static_cast<uint32_t>(i), static_cast<uint32_t>(j), ib);
        }
        QF_ASSIGN_OR_RETURN(std::vector<uint32_t> packed, PackIndexStream(codes.data(), S, bits));
        for (uint32_t wd : packed) PutU32(t.bytes, wd);
      }
    }
    out.tensors.push_back(std::move(t));
  }
  // perm (N,) int16 and weight_scale / weight_bias (N,): written for every layer (see
  // VptqConfigFromResult); a solve without perm / norm must hold the identity.
  if (!r.enable_perm) {
    for (int64_t p = 0; p < N; ++p) {
      if (r.perm[static_cast<size_t>(p)] != p) return bad("enable_perm is false but the result's perm is not the identity");
    }
  }
  if (!r.enable_norm) {
    for (int64_t n = 0; n < N; ++n) {
      if (r.weight_scale[static_cast<size_t>(n)] != 1.0f || r.weight_bias[static_cast<size_t>(n)] != 0.0f) {
        return bad("enable_norm is false but weight_scale / weight_bias are not 1 / 0 (column " + Str(n) + ")");
      }
    }
  }
  {
    VptqTensor t;
    t.suffix = "perm";
    t.dtype = "I16";
    t.shape = {N};
    std::vector<char> seen(static_cast<size_t>(N), 0);
    for (int64_t p = 0; p < N; ++p) {
      const int64_t c = r.perm[static_cast<size_t>(p)];
      if (c < 0 || c >= N || seen[static_cast<size_t>(c)]) return bad("perm is not a permutation of [0, in_features) (position " + Str(p) + ")");
      seen[static_cast<size_t>(c)] = 1;
      PutU16(t.bytes, static_cast<uint16_t>(c));
    }
    out.tensors.push_back(std::move(t));
  }
  out.tensors.push_back(ModelTensor("weight_scale", dtype, {N}, r.weight_scale.data(), N));
  out.tensors.push_back(ModelTensor("weight_bias", dtype, {N}, r.weight_bias.data(), N));
  if (O > 0) {
    const int64_t v0 = r.outlier_vector_len, k0 = r.outlier_num_centroids, R0 = CeilDiv(M, v0);
    if (static_cast<int64_t>(r.outlier_centroids.size()) != k0 * v0) return bad("outlier_centroids size");
    if (r.outlier_indices.size() != static_cast<size_t>(R0 * O)) return bad("outlier_indices size");
    out.tensors.push_back(ModelTensor("outlier_centroids.weight", dtype, {1, k0 * v0},
                                      r.outlier_centroids.data(), k0 * v0));
    VptqTensor t;
    t.suffix = "outlier_indices";
    t.dtype = "I16";
    t.shape = {1, R0, O};
    for (size_t i = 0; i < r.outlier_indices.size(); ++i) {
      const int64_t x = r.outlier_indices[i];
      if (x < 0 || x >= k0) return bad("outlier index " + Str(x) + " out of range at position " + Str(static_cast<int64_t>(i)));
      PutU16(t.bytes, static_cast<uint16_t>(x));
    }
    out.tensors.push_back(std::move(t));
  }
  if (bias != nullptr) out.tensors.push_back(ModelTensor("bias", dtype, {M}, bias->data(), M));
  // The tensors written are exactly the ones the package registers, in the table's order.
  const std::vector<std::string> expected = VptqTensorSuffixes(out.config);
  bool same = expected.size() == out.tensors.size();
  for (size_t i = 0; same && i < expected.size(); ++i) same = expected[i] == out.tensors[i].suffix;
  if (!same) return InternalError("VPTQ pack: the tensors written differ from VptqTensorSuffixes");
  return out;
}

StatusOr<Matrix> DequantizeVptqLayer(const VptqLayerTensors& t, VptqDecodeArithmetic arithmetic) {
  const VptqLayerConfig& c = t.config;
  QF_RETURN_IF_ERROR(ValidateVptqLayerConfig(c));
  {
    const std::vector<std::string> registered = VptqTensorSuffixes(c);
    for (const VptqTensor& x : t.tensors) {
      bool known = false;
      for (const std::string& s : registered) known = known || s == x.suffix;
      if (!known) {
        return InvalidArgumentError("VPTQ tensor '" + x.suffix + "' is not one the vptq package registers for "
                                    "this layer config (enable_perm " + (c.enable_perm ? "true" : "false") +
                                    ", enable_norm " + (c.enable_norm ? "true" : "false") + ", bias " +
                                    (c.bias ? "true" : "false") + "); remove it or fix the config");
      }
    }
  }
  const int64_t M = c.out_features, N = c.in_features, G = c.group_num, S = c.group_size;
  const int64_t O = c.outlier_size, v = c.vector_lens[1], k = c.num_centroids[1];
  const int64_t kr = c.num_res_centroids[1] > 0 ? c.num_res_centroids[1] : 0;
  const int64_t R = CeilDiv(M, v);
  const int ib = ExactLog2(k), rb = kr > 0 ? ExactLog2(kr) : 0;
  const int64_t words = VptqPackedWords(S, ib + rb);
  const std::vector<std::string> model = {"F16", "BF16"};

  QF_ASSIGN_OR_RETURN(const VptqTensor* cent, Expect(t, "centroids.weight", model, {G, k * v}));
  const std::string mdtype = cent->dtype;
  // The rounding of one elementwise result: to the model dtype on the torch path, none in float32.
  const bool in_dtype = arithmetic == VptqDecodeArithmetic::kModelDtype;
  const bool f16 = mdtype == "F16";
  auto rnd = [in_dtype, f16](float x) {
    if (!in_dtype) return x;
    return f16 ? HalfToFloat(FloatToHalf(x)) : BFloat16ToFloat(FloatToBFloat16(x));
  };
  const std::vector<std::string> same = {mdtype};
  const VptqTensor* rcent = nullptr;
  if (kr > 0) {
    QF_ASSIGN_OR_RETURN(rcent, Expect(t, "res_centroids.weight", same, {G, kr * v}));
  }
  QF_ASSIGN_OR_RETURN(const VptqTensor* idx, Expect(t, "indices", {"I32"}, {G, R, words}));
  std::vector<int64_t> inv(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) inv[static_cast<size_t>(n)] = n;
  if (c.enable_perm) {
    QF_ASSIGN_OR_RETURN(const VptqTensor* perm, Expect(t, "perm", {"I16"}, {N}));
    std::vector<char> seen(static_cast<size_t>(N), 0);
    for (int64_t p = 0; p < N; ++p) {
      const int64_t col = GetU16(perm->bytes, p);
      if (col >= N || seen[static_cast<size_t>(col)]) {
        return InvalidArgumentError("VPTQ tensor 'perm' is not a permutation (position " + Str(p) + ")");
      }
      seen[static_cast<size_t>(col)] = 1;
      inv[static_cast<size_t>(col)] = p;
    }
  }
  std::vector<float> scale(static_cast<size_t>(N), 1.0f), biasv(static_cast<size_t>(N), 0.0f);
  if (c.enable_norm) {
    QF_ASSIGN_OR_RETURN(const VptqTensor* ws, Expect(t, "weight_scale", same, {N}));
    QF_ASSIGN_OR_RETURN(const VptqTensor* wb, Expect(t, "weight_bias", same, {N}));
    for (int64_t n = 0; n < N; ++n) {
      scale[static_cast<size_t>(n)] = FromModel(GetU16(ws->bytes, n), mdtype);
      biasv[static_cast<size_t>(n)] = FromModel(GetU16(wb->bytes, n), mdtype);
    }
  }
  Matrix wp(M, N);
  std::vector<uint32_t> row_words(static_cast<size_t>(words));
  const uint32_t imask = (uint32_t{1} << ib) - 1u;
  const uint32_t rmask = rb > 0 ? ((uint32_t{1} << rb) - 1u) : 0u;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t rr = 0; rr < R; ++rr) {
      for (int64_t w = 0; w < words; ++w) row_words[static_cast<size_t>(w)] = GetU32(idx->bytes, (g * R + rr) * words + w);
      for (int64_t col = 0; col < S; ++col) {
        const uint32_t m = VptqGetCode(row_words.data(), col, ib + rb);
        const int64_t i = m & imask;
        const int64_t j = rb > 0 ? ((m >> ib) & rmask) : 0;
        for (int64_t tt = 0; tt < v; ++tt) {
          const int64_t row = rr * v + tt;
          if (row >= M) break;
          float val = FromModel(GetU16(cent->bytes, g * k * v + i * v + tt), mdtype);
          if (kr > 0) val = rnd(val + FromModel(GetU16(rcent->bytes, g * kr * v + j * v + tt), mdtype));
          wp(row, O + g * S + col) = val;
        }
      }
    }
  }
  if (O > 0) {
    const int64_t v0 = c.vector_lens[0], k0 = c.num_centroids[0], R0 = CeilDiv(M, v0);
    QF_ASSIGN_OR_RETURN(const VptqTensor* oc, Expect(t, "outlier_centroids.weight", same, {1, k0 * v0}));
    QF_ASSIGN_OR_RETURN(const VptqTensor* oi, Expect(t, "outlier_indices", {"I16"}, {1, R0, O}));
    for (int64_t rr = 0; rr < R0; ++rr) {
      for (int64_t col = 0; col < O; ++col) {
        const int64_t i = GetU16(oi->bytes, rr * O + col);
        if (i >= k0) {
          return InvalidArgumentError("VPTQ tensor 'outlier_indices' holds " + Str(i) + " >= num_centroids[0] = " +
                                      Str(k0) + " at (0, " + Str(rr) + ", " + Str(col) + ")");
        }
        for (int64_t tt = 0; tt < v0; ++tt) {
          const int64_t row = rr * v0 + tt;
          if (row >= M) break;
          wp(row, col) = FromModel(GetU16(oc->bytes, i * v0 + tt), mdtype);
        }
      }
    }
  }
  Matrix out(M, N);
  for (int64_t row = 0; row < M; ++row) {
    for (int64_t n = 0; n < N; ++n) {
      const float x = wp(row, inv[static_cast<size_t>(n)]);
      out(row, n) = c.enable_norm ? rnd(rnd(x * scale[static_cast<size_t>(n)]) + biasv[static_cast<size_t>(n)]) : x;
    }
  }
  return out;
}

}  // namespace qforge::quant

#include "job/layer_dequantizer.h"

#include <array>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/status_bridge.h"

namespace qforge {
namespace {

std::string TensorName(const QuantizedModuleSource& s, std::string_view suffix) {
  return absl::StrCat(Sv(s.module), ".", Sv(suffix));
}

// The tensor `<module>.<suffix>` with `dtype` and, when `shape` is not empty, that shape.
absl::StatusOr<const TensorInfo*> FindChecked(const QuantizedModuleSource& s,
                                              std::string_view suffix, DType dtype,
                                              const std::vector<int64_t>& shape) {
  const std::string name = TensorName(s, suffix);
  const TensorInfo* t = s.header->Find(name);
  if (t == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(Sv(s.key), ": tensor '", name, "' is missing"));
  }
  if (t->dtype != dtype) {
    return absl::InvalidArgumentError(absl::StrCat(Sv(s.key), ": tensor '", name, "' is ",
                                                   DTypeName(t->dtype), ", expected ",
                                                   DTypeName(dtype)));
  }
  if (!shape.empty() && t->shape != shape) {
    std::string got, want;
    for (int64_t d : t->shape) absl::StrAppend(&got, got.empty() ? "" : ", ", d);
    for (int64_t d : shape) absl::StrAppend(&want, want.empty() ? "" : ", ", d);
    return absl::InvalidArgumentError(absl::StrCat(Sv(s.key), ": tensor '", name, "' has shape [",
                                                   got, "], expected [", want, "]"));
  }
  return t;
}

template <class T>
absl::StatusOr<std::vector<T>> ReadAs(const QuantizedModuleSource& s, const TensorInfo& t) {
  QF_ASSIGN_OR_RETURN(std::string bytes, ReadTensorBytes(*s.store, s.key, *s.header, t));
  std::vector<T> out(bytes.size() / sizeof(T));
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
  return out;
}

absl::Status RequireSource(const QuantizedModuleSource& s) {
  if (s.store == nullptr || s.header == nullptr) {
    return absl::InvalidArgumentError("dequantize: the source needs a store and a header");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Matrix> DequantizeGptqModule(const QuantizedModuleSource& source,
                                            int64_t out_features, int64_t in_features,
                                            quant::GptqCheckpointFormat format) {
  QF_RETURN_IF_ERROR(RequireSource(source));
  if (out_features <= 0 || in_features <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("module '", Sv(source.module), "': shape [",
                                                   out_features, ", ", in_features,
                                                   "] is not positive"));
  }
  QF_ASSIGN_OR_RETURN(const TensorInfo* qweight, FindChecked(source, "qweight", DType::kI32, {}));
  if (qweight->shape.size() != 2 || qweight->shape[1] != out_features ||
      (qweight->shape[0] * 32) % in_features != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        Sv(source.key), ": tensor '", TensorName(source, "qweight"),
        "' does not have the shape [in_features · bits / 32, out_features] for in_features ",
        in_features, " and out_features ", out_features));
  }
  const int bits = static_cast<int>(qweight->shape[0] * 32 / in_features);
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(absl::StrCat(Sv(source.key), ": tensor '",
                                                   TensorName(source, "qweight"),
                                                   "' implies ", bits,
                                                   " bits, not one of 2, 3, 4, 8"));
  }
  QF_ASSIGN_OR_RETURN(const TensorInfo* scales, FindChecked(source, "scales", DType::kF16, {}));
  if (scales->shape.size() != 2 || scales->shape[1] != out_features || scales->shape[0] < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(Sv(source.key), ": tensor '", TensorName(source, "scales"),
                     "' does not have the shape [num_groups, out_features]"));
  }
  const int64_t groups = scales->shape[0];
  QF_ASSIGN_OR_RETURN(const TensorInfo* qzeros,
                      FindChecked(source, "qzeros", DType::kI32,
                                  {groups, out_features * bits / 32}));
  QF_ASSIGN_OR_RETURN(const TensorInfo* g_idx,
                      FindChecked(source, "g_idx", DType::kI32, {in_features}));

  quant::GptqPackedLayer packed;
  packed.bits = bits;
  packed.out_features = out_features;
  packed.in_features = in_features;
  packed.num_groups = groups;
  packed.format = format;
  QF_ASSIGN_OR_RETURN(packed.qweight, ReadAs<int32_t>(source, *qweight));
  QF_ASSIGN_OR_RETURN(packed.qzeros, ReadAs<int32_t>(source, *qzeros));
  QF_ASSIGN_OR_RETURN(packed.scales, ReadAs<uint16_t>(source, *scales));
  QF_ASSIGN_OR_RETURN(packed.g_idx, ReadAs<int32_t>(source, *g_idx));
  auto w = quant::DequantizeGptqPacked(packed);
  if (!w.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(Sv(source.key), ": module '",
                                                   Sv(source.module), "': ",
                                                   w.status().message()));
  }
  Matrix out(out_features, in_features);
  out.data = std::move(*w);
  return out;
}

absl::StatusOr<quant::VptqLayerConfig> VptqLayerConfigFromJson(const nlohmann::json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("VPTQ layer config: not a JSON object");
  quant::VptqLayerConfig c;
  auto integer = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat("VPTQ layer config: '", key, "' is missing or not an integer"));
    }
    *out = it->get<int64_t>();
    return absl::OkStatus();
  };
  auto boolean = [&](const char* key, bool* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_boolean()) {
      return absl::InvalidArgumentError(
          absl::StrCat("VPTQ layer config: '", key, "' is missing or not a boolean"));
    }
    *out = it->get<bool>();
    return absl::OkStatus();
  };
  auto pair = [&](const char* key, std::array<int64_t, 2>* out) -> absl::Status {
    auto it = j.find(key);
    if (it == j.end() || !it->is_array() || it->size() != 2 || !(*it)[0].is_number_integer() ||
        !(*it)[1].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat("VPTQ layer config: '", key, "' is missing or not a pair of integers"));
    }
    (*out)[0] = (*it)[0].get<int64_t>();
    (*out)[1] = (*it)[1].get<int64_t>();
    return absl::OkStatus();
  };
  QF_RETURN_IF_ERROR(pair("vector_lens", &c.vector_lens));
  QF_RETURN_IF_ERROR(pair("num_centroids", &c.num_centroids));
  QF_RETURN_IF_ERROR(pair("num_res_centroids", &c.num_res_centroids));
  QF_RETURN_IF_ERROR(integer("group_num", &c.group_num));
  QF_RETURN_IF_ERROR(integer("group_size", &c.group_size));
  QF_RETURN_IF_ERROR(integer("outlier_size", &c.outlier_size));
  QF_RETURN_IF_ERROR(integer("in_features", &c.in_features));
  QF_RETURN_IF_ERROR(integer("out_features", &c.out_features));
  QF_RETURN_IF_ERROR(boolean("indices_as_float", &c.indices_as_float));
  QF_RETURN_IF_ERROR(boolean("is_indice_packed", &c.is_indice_packed));
  QF_RETURN_IF_ERROR(boolean("enable_norm", &c.enable_norm));
  QF_RETURN_IF_ERROR(boolean("enable_perm", &c.enable_perm));
  QF_RETURN_IF_ERROR(boolean("bias", &c.bias));
  Status valid = quant::ValidateVptqLayerConfig(c);
  if (!valid.ok()) return ToAbslStatus(valid);
  return c;
}

absl::StatusOr<Matrix> DequantizeVptqModule(const QuantizedModuleSource& source,
                                            const nlohmann::json& layer_config) {
  QF_RETURN_IF_ERROR(RequireSource(source));
  quant::VptqLayerTensors layer;
  QF_ASSIGN_OR_RETURN(layer.config, VptqLayerConfigFromJson(layer_config));
  // Every tensor of the module is handed over; DequantizeVptqLayer checks which it needs and
  // their dtypes and shapes, naming the one that is wrong.
  const std::string prefix = absl::StrCat(Sv(source.module), ".");
  for (const TensorInfo& t : source.header->tensors()) {
    if (t.name.compare(0, prefix.size(), prefix) != 0) continue;
    quant::VptqTensor v;
    v.suffix = t.name.substr(prefix.size());
    v.dtype = DTypeName(t.dtype);
    v.shape = t.shape;
    QF_ASSIGN_OR_RETURN(std::string bytes, ReadTensorBytes(*source.store, source.key,
                                                           *source.header, t));
    v.bytes.assign(bytes.begin(), bytes.end());
    layer.tensors.push_back(std::move(v));
  }
  auto w = quant::DequantizeVptqLayer(layer);
  if (!w.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(Sv(source.key), ": module '",
                                                   Sv(source.module), "': ",
                                                   w.status().message()));
  }
  return std::move(*w);
}

}  // namespace qforge

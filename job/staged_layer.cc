#include "job/staged_layer.h"

#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace qforge {

absl::StatusOr<TensorLocation> LocateTensor(const SafetensorsModel& model,
                                            std::string_view tensor) {
  QF_ASSIGN_OR_RETURN(SafetensorsModel::Location loc, model.Find(tensor));
  TensorLocation t;
  t.name = std::string(tensor);
  t.key = loc.key;
  t.offset = loc.header->data_offset() + loc.info->data_begin;
  t.length = loc.info->num_bytes();
  t.dtype = loc.info->dtype;
  t.shape = loc.info->shape;
  return t;
}

nlohmann::json LayerOutcomeToJson(const LayerOutcome& o) {
  return {{"module", o.module},
          {"out_features", o.out_features},
          {"in_features", o.in_features},
          {"proxy_loss", o.proxy_loss},
          {"output_error", o.output_error},
          {"weight_energy", o.weight_energy},
          {"relative_error", o.relative_error},
          {"output_error_f32", o.output_error_f32},
          {"relative_error_f32", o.relative_error_f32},
          {"damp_percent_used", o.damp_percent_used},
          {"read_seconds", o.read_seconds},
          {"solve_seconds", o.solve_seconds},
          {"write_seconds", o.write_seconds},
          {"bytes_read", o.bytes_read},
          {"bytes_written", o.bytes_written},
          {"bits_per_weight", o.bits_per_weight}};
}

absl::StatusOr<LayerOutcome> LayerOutcomeFromJson(const nlohmann::json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("staged layer metadata '", kStagedOutcomeKey, "' is not a JSON object"));
  }
  LayerOutcome o;
  try {
    o.module = j.at("module").get<std::string>();
    o.out_features = j.at("out_features").get<int64_t>();
    o.in_features = j.at("in_features").get<int64_t>();
    o.proxy_loss = j.at("proxy_loss").get<double>();
    o.output_error = j.at("output_error").get<double>();
    o.weight_energy = j.at("weight_energy").get<double>();
    o.relative_error = j.at("relative_error").get<double>();
    o.damp_percent_used = j.at("damp_percent_used").get<double>();
    o.read_seconds = j.at("read_seconds").get<double>();
    o.solve_seconds = j.at("solve_seconds").get<double>();
    o.write_seconds = j.at("write_seconds").get<double>();
    o.bytes_read = j.at("bytes_read").get<uint64_t>();
    o.bytes_written = j.at("bytes_written").get<uint64_t>();
    o.bits_per_weight = j.value("bits_per_weight", 0.0);
    o.output_error_f32 = j.value("output_error_f32", o.output_error);
    o.relative_error_f32 = j.value("relative_error_f32", o.relative_error);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("staged layer metadata '", kStagedOutcomeKey,
                                                   "' is incomplete: ", e.what()));
  }
  return o;
}

std::string StagedTensorName(std::string_view module, std::string_view suffix) {
  std::string name(module);
  name.push_back('.');
  name.append(suffix);
  return name;
}

absl::Status WriteStagedLayer(ObjectStore& store, std::string_view key, const LayerOutcome& outcome,
                              const quant::QuantizedLayer& layer) {
  std::vector<TensorSpec> specs;
  specs.reserve(layer.tensors.size());
  for (const quant::QuantizedTensor& t : layer.tensors) {
    TensorSpec spec{StagedTensorName(outcome.module, t.suffix), DType::kF32, t.shape};
    QF_ASSIGN_OR_RETURN(spec.dtype, ParseDType(t.dtype));
    uint64_t bytes = DTypeSize(spec.dtype);
    for (int64_t d : t.shape) bytes *= static_cast<uint64_t>(d);
    if (bytes != t.bytes.size()) {
      return absl::InvalidArgumentError(absl::StrCat("staged tensor '", spec.name, "' holds ",
                                                     t.bytes.size(), " bytes; its shape and ",
                                                     t.dtype, " take ", bytes));
    }
    specs.push_back(std::move(spec));
  }
  std::map<std::string, std::string> metadata = {
      {kStagedOutcomeKey, LayerOutcomeToJson(outcome).dump()}};
  if (!layer.layer_config.empty()) metadata[kStagedLayerConfigKey] = layer.layer_config;
  QF_ASSIGN_OR_RETURN(auto writer, SafetensorsWriter::Create(store, key, specs, metadata));
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::vector<uint8_t>& b = layer.tensors[i].bytes;
    QF_RETURN_IF_ERROR(writer->WriteTensorData(
        specs[i].name, std::string_view(reinterpret_cast<const char*>(b.data()), b.size())));
  }
  return writer->Finish();
}

const TensorInfo* StagedLayerObject::FindTensor(std::string_view suffix) const {
  return header.Find(StagedTensorName(module, suffix));
}

std::vector<const TensorInfo*> StagedLayerObject::Tensors() const {
  const std::string prefix = StagedTensorName(module, "");
  std::vector<const TensorInfo*> out;
  for (const TensorInfo& info : header.tensors()) {
    if (info.name.compare(0, prefix.size(), prefix) == 0) out.push_back(&info);
  }
  return out;
}

absl::StatusOr<StagedLayerObject> ReadStagedLayer(ObjectStore& store, std::string_view key,
                                                  std::string_view module) {
  StagedLayerObject object;
  object.module = std::string(module);
  QF_ASSIGN_OR_RETURN(object.header, ReadSafetensorsHeader(store, key));
  const auto& metadata = object.header.metadata();
  if (auto it = metadata.find(kStagedOutcomeKey); it != metadata.end()) {
    auto outcome = LayerOutcomeFromJson(nlohmann::json::parse(it->second, nullptr, false));
    if (outcome.ok()) object.outcome = *std::move(outcome);
  }
  if (auto it = metadata.find(kStagedLayerConfigKey); it != metadata.end()) {
    object.layer_config = nlohmann::json::parse(it->second, nullptr, false);
  }
  return object;
}

}  // namespace qforge

#include "job/layer_runner.h"

#include <chrono>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "common/status_bridge.h"

namespace qforge {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename T>
std::string_view Bytes(const std::vector<T>& v) {
  return std::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

}  // namespace

std::string StagedTensorName(std::string_view module, std::string_view suffix) {
  std::string name(module);
  name.push_back('.');
  name.append(suffix);
  return name;
}

std::string LayerOutcomeToJson(const LayerOutcome& o) {
  nlohmann::json j = {{"module", o.module},
                      {"out_features", o.out_features},
                      {"in_features", o.in_features},
                      {"proxy_loss", o.proxy_loss},
                      {"output_error", o.output_error},
                      {"weight_energy", o.weight_energy},
                      {"relative_error", o.relative_error},
                      {"damp_percent_used", o.damp_percent_used},
                      {"read_seconds", o.read_seconds},
                      {"solve_seconds", o.solve_seconds},
                      {"write_seconds", o.write_seconds},
                      {"bytes_read", o.bytes_read},
                      {"bytes_written", o.bytes_written},
                      {"bits_per_weight", o.bits_per_weight}};
  return j.dump();
}

absl::StatusOr<LayerOutcome> LayerOutcomeFromJson(std::string_view json) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    return absl::InvalidArgumentError("staged layer metadata 'qforge.layer' is not a JSON object");
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
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("staged layer metadata 'qforge.layer' is incomplete: ", e.what()));
  }
  return o;
}

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

namespace {

// Reads the weight (one ranged read of its bytes) and the Hessian (identity when there is
// no Hessian file) of one layer into `w` and `h`, filling the read figures of `out`.
absl::Status ReadLayerInputs(const std::string& module, ObjectStore* model_store,
                             const TensorLocation& wl, ObjectStore* hessian_store,
                             const HessianFile* hessians, const ObjectStore* out_store,
                             qforge::Matrix* w, qforge::Matrix* h, LayerOutcome* out) {
  if (model_store == nullptr || out_store == nullptr) {
    return absl::InvalidArgumentError("layer runner: the model and output stores are required");
  }
  if ((hessian_store == nullptr) != (hessians == nullptr)) {
    return absl::InvalidArgumentError("layer runner: Hessian store and file go together");
  }
  auto t0 = std::chrono::steady_clock::now();
  if (wl.shape.size() != 2 || wl.shape[0] <= 0 || wl.shape[1] <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", wl.name, "' in ", wl.key, " has ",
                                                    wl.shape.size(),
                                                    " dimensions; a linear weight is 2-D [out, in]"));
  }
  const int64_t rows = wl.shape[0], cols = wl.shape[1];
  if (wl.length != static_cast<uint64_t>(rows * cols) * DTypeSize(wl.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", wl.name, "' in ", wl.key, ": ",
                                                    wl.length, " bytes for [", rows, ", ", cols,
                                                    "] ", DTypeName(wl.dtype)));
  }
  out->module = module;
  out->out_features = rows;
  out->in_features = cols;
  std::string raw;
  QF_RETURN_IF_ERROR(model_store->ReadRange(wl.key, wl.offset, wl.length, &raw));
  w->rows = rows;
  w->cols = cols;
  QF_ASSIGN_OR_RETURN(w->data, DecodeToF32(wl.dtype, raw, absl::StrCat(wl.name, " in ", wl.key)));
  out->bytes_read += wl.length;

  *h = qforge::Matrix(cols, cols);
  if (hessians != nullptr) {
    QF_ASSIGN_OR_RETURN(h->data, hessians->Read(*hessian_store, module, cols));
    out->bytes_read += static_cast<uint64_t>(cols * cols) * sizeof(float);
  } else {
    for (int64_t i = 0; i < cols; ++i) (*h)(i, i) = 1.0f;
  }
  out->read_seconds = SecondsSince(t0);
  return absl::OkStatus();
}

// The solver's figures, common to both methods.
void RecordSolve(double proxy_loss, double output_error, double weight_energy, double damp,
                 std::chrono::steady_clock::time_point solve_start, LayerOutcome* out) {
  out->solve_seconds = SecondsSince(solve_start);
  out->proxy_loss = proxy_loss;
  out->output_error = output_error;
  out->weight_energy = weight_energy;
  out->relative_error = weight_energy > 0 ? output_error / weight_energy : 0.0;
  out->damp_percent_used = damp;
}

// A solver error, with the layer named.
absl::Status SolverError(const std::string& module, const qforge::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(s.code())),
                      absl::StrCat("layer '", module, "': ", s.message()));
}

}  // namespace

absl::StatusOr<LayerOutcome> RunGptqLayer(const GptqLayerJob& job, quant::GptqSolver& solver) {
  LayerOutcome out;
  qforge::Matrix w, h;
  QF_RETURN_IF_ERROR(ReadLayerInputs(job.module, job.model_store, job.weight, job.hessian_store,
                                     job.hessians, job.out_store, &w, &h, &out));
  const int64_t rows = w.rows, cols = w.cols;

  // 2. Solve.
  QF_RETURN_IF_ERROR(ToAbslStatus(quant::CheckGptqPackable(job.options.bits, rows, cols)));
  auto t0 = std::chrono::steady_clock::now();
  auto solved = solver.Quantize(w, h, job.options);
  if (!solved.ok()) return SolverError(job.module, solved.status());
  const quant::GptqResult& r = *solved;
  RecordSolve(r.proxy_loss, r.output_error, r.weight_energy, r.damp_percent_used, t0, &out);

  // 3. Pack and stage.
  t0 = std::chrono::steady_clock::now();
  QF_ASSIGN_OR_RETURN(
      quant::GptqPackedLayer packed,
      ToAbslStatusOr(quant::PackGptqLayer(r.codes.data(), r.scales.data(), r.zeros.data(),
                                          r.g_idx.data(), r.bits, rows, cols, r.num_groups,
                                          job.format)));
  const int64_t qweight_rows = cols * job.options.bits / 32;
  const int64_t qzeros_cols = rows * job.options.bits / 32;
  std::vector<TensorSpec> specs = {
      {StagedTensorName(job.module, "g_idx"), DType::kI32, {cols}},
      {StagedTensorName(job.module, "qweight"), DType::kI32, {qweight_rows, rows}},
      {StagedTensorName(job.module, "qzeros"), DType::kI32, {r.num_groups, qzeros_cols}},
      {StagedTensorName(job.module, "scales"), DType::kF16, {r.num_groups, rows}},
  };
  for (const TensorSpec& s : specs) {
    uint64_t n = DTypeSize(s.dtype);
    for (int64_t d : s.shape) n *= static_cast<uint64_t>(d);
    out.bytes_written += n;
  }
  out.staged_key = job.staged_key;
  // The header precedes the data, so the metadata records read and solve figures only.
  std::map<std::string, std::string> metadata = {{"qforge.layer", LayerOutcomeToJson(out)}};
  QF_ASSIGN_OR_RETURN(auto writer,
                      SafetensorsWriter::Create(*job.out_store, job.staged_key, specs, metadata));
  QF_RETURN_IF_ERROR(writer->WriteTensorData(specs[0].name, Bytes(packed.g_idx)));
  QF_RETURN_IF_ERROR(writer->WriteTensorData(specs[1].name, Bytes(packed.qweight)));
  QF_RETURN_IF_ERROR(writer->WriteTensorData(specs[2].name, Bytes(packed.qzeros)));
  QF_RETURN_IF_ERROR(writer->WriteTensorData(specs[3].name, Bytes(packed.scales)));
  QF_RETURN_IF_ERROR(writer->Finish());
  out.write_seconds = SecondsSince(t0);
  return out;
}

}  // namespace qforge

namespace qforge {

std::string VptqLayerConfigToJson(const quant::VptqLayerConfig& c) {
  nlohmann::json j = {{"vector_lens", {c.vector_lens[0], c.vector_lens[1]}},
                      {"num_centroids", {c.num_centroids[0], c.num_centroids[1]}},
                      {"num_res_centroids", {c.num_res_centroids[0], c.num_res_centroids[1]}},
                      {"group_num", c.group_num},
                      {"group_size", c.group_size},
                      {"outlier_size", c.outlier_size},
                      {"indices_as_float", c.indices_as_float},
                      {"is_indice_packed", c.is_indice_packed},
                      {"enable_norm", c.enable_norm},
                      {"enable_perm", c.enable_perm},
                      {"in_features", c.in_features},
                      {"out_features", c.out_features},
                      {"bias", c.bias}};
  return j.dump();
}

absl::StatusOr<LayerOutcome> RunVptqLayer(const VptqLayerJob& job, quant::VptqSolver& solver) {
  LayerOutcome out;
  qforge::Matrix w, h;
  QF_RETURN_IF_ERROR(ReadLayerInputs(job.module, job.model_store, job.weight, job.hessian_store,
                                     job.hessians, job.out_store, &w, &h, &out));
  const bool bf16 = job.weight.dtype == DType::kBF16;
  quant::VptqOptions options = job.options;
  options.param_dtype = bf16 ? quant::VptqParamDtype::kBFloat16 : quant::VptqParamDtype::kFloat16;
  {
    auto cfg = quant::VptqConfigFromOptions(options, w.rows, w.cols, job.has_bias);
    if (!cfg.ok()) return SolverError(job.module, cfg.status());
    qforge::Status valid = quant::ValidateVptqLayerConfig(*cfg);
    if (!valid.ok()) return SolverError(job.module, valid);
  }

  auto t0 = std::chrono::steady_clock::now();
  auto solved = solver.Quantize(w, h, options);
  if (!solved.ok()) return SolverError(job.module, solved.status());
  const quant::VptqResult& r = *solved;
  RecordSolve(r.proxy_loss, r.output_error, r.weight_energy, r.damp_percent_used, t0, &out);
  out.bits_per_weight = quant::VptqBitsPerWeight(r);

  t0 = std::chrono::steady_clock::now();
  auto packed = quant::PackVptqLayer(
      r, bf16 ? quant::VptqModelDtype::kBFloat16 : quant::VptqModelDtype::kFloat16);
  if (!packed.ok()) return SolverError(job.module, packed.status());
  packed->config.bias = job.has_bias;
  std::vector<TensorSpec> specs;
  for (const quant::VptqTensor& t : packed->tensors) {
    QF_ASSIGN_OR_RETURN(DType dtype, ParseDType(t.dtype));
    specs.push_back({StagedTensorName(job.module, t.suffix), dtype, t.shape});
    out.bytes_written += t.bytes.size();
  }
  out.staged_key = job.staged_key;
  std::map<std::string, std::string> metadata = {
      {"qforge.layer", LayerOutcomeToJson(out)},
      {"qforge.vptq_config", VptqLayerConfigToJson(packed->config)}};
  QF_ASSIGN_OR_RETURN(auto writer,
                      SafetensorsWriter::Create(*job.out_store, job.staged_key, specs, metadata));
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::vector<uint8_t>& b = packed->tensors[i].bytes;
    QF_RETURN_IF_ERROR(writer->WriteTensorData(
        specs[i].name, std::string_view(reinterpret_cast<const char*>(b.data()), b.size())));
  }
  QF_RETURN_IF_ERROR(writer->Finish());
  out.write_seconds = SecondsSince(t0);
  return out;
}

}  // namespace qforge

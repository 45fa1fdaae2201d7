#include "server/planner.h"

#include <string>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/hessian_file.h"
#include "common/safetensors.h"
#include "common/uri.h"
#include "job/staged_layer.h"
#include "job/layer_selection.h"
#include "job/staging_layout.h"

namespace qforge {
namespace {

// Prefixes a status's message with the spec field it concerns; transient store errors keep
// their code (a retry may succeed), everything else becomes INVALID_ARGUMENT.
absl::Status FieldStatus(std::string_view field, const absl::Status& s,
                         std::string_view context = "") {
  std::string msg = absl::StrCat(std::string(field), ": ", std::string(context),
                                 std::string(s.message()));
  if (s.code() == absl::StatusCode::kUnavailable ||
      s.code() == absl::StatusCode::kDeadlineExceeded) {
    return absl::Status(s.code(), msg);
  }
  return absl::InvalidArgumentError(msg);
}

// Every selected module has a Hessian of shape [in_features, in_features] in the file.
absl::Status CheckHessians(const StoreOpener& open_store, const std::string& hessians_uri,
                           const std::vector<PlannedLayer>& layers) {
  constexpr char kField[] = "spec.calibration.hessians_uri";
  auto split = SplitObjectUri(hessians_uri);
  if (!split.ok()) return FieldStatus(kField, split.status());
  auto store = open_store(split->store_uri);
  if (!store.ok()) return FieldStatus(kField, store.status());
  auto hessians = HessianFile::Open(**store, split->key);
  if (!hessians.ok()) {
    return FieldStatus(kField, hessians.status(),
                       absl::StrCat("cannot open the Hessian file ", hessians_uri, ": "));
  }
  for (const PlannedLayer& l : layers) {
    auto t = hessians->Find(l.module);
    if (!t.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          kField, ": ", hessians_uri, " has no Hessian for module '", l.module, "'"));
    }
    const std::vector<int64_t>& shape = (*t)->shape;
    if (shape.size() != 2 || shape[0] != l.in_features || shape[1] != l.in_features) {
      std::string dims;
      for (int64_t d : shape) absl::StrAppend(&dims, dims.empty() ? "" : ", ", d);
      return absl::InvalidArgumentError(absl::StrCat(
          kField, ": the Hessian of module '", l.module, "' in ", hessians_uri, " is [", dims,
          "], expected [", l.in_features, ", ", l.in_features, "] (in_features)"));
    }
  }
  return absl::OkStatus();
}

// The output prefix holds nothing but staging objects (of jobs in flight).
absl::Status CheckOutputEmpty(const StoreOpener& open_store, const std::string& output_uri) {
  auto store = open_store(output_uri);
  if (!store.ok()) return FieldStatus("spec.output_uri", store.status());
  auto listing = (*store)->List("");
  if (!listing.ok()) return FieldStatus("spec.output_uri", listing.status());
  std::vector<std::string> existing;
  for (const ObjectInfo& o : *listing) {
    if (!IsStagingKey(o.key)) existing.push_back(o.key);
  }
  if (existing.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "spec.output_uri: ", output_uri, " is not empty (it holds '", existing.front(), "'",
      existing.size() > 1 ? absl::StrCat(" and ", existing.size() - 1, " more objects") : "",
      "); give an empty or new output prefix"));
}

}  // namespace

absl::StatusOr<std::vector<TaskRecord>> Planner::Plan(const JobConfig& config) const {
  const v1::JobSpec& spec = config.spec;

  // The model: headers only.
  auto model_store = open_store_(spec.model_uri());
  if (!model_store.ok()) return FieldStatus("spec.model_uri", model_store.status());
  auto model = SafetensorsModel::Open(**model_store, "");
  if (!model.ok()) {
    return FieldStatus("spec.model_uri", model.status(),
                       absl::StrCat("cannot open the model at ", spec.model_uri(), ": "));
  }
  if (absl::Status s = (*model_store)->Stat("config.json").status(); !s.ok()) {
    return FieldStatus("spec.model_uri", s,
                       absl::StrCat(spec.model_uri(),
                                    " has no readable config.json (a Hugging Face model "
                                    "directory is expected): "));
  }
  auto layers = SelectLayers(*model, config.selection);
  if (!layers.ok()) return FieldStatus("spec.include", layers.status());
  for (const PlannedLayer& l : *layers) {
    QF_RETURN_IF_ERROR(ValidateLayerForSpec(config, l.module, l.out_features, l.in_features));
  }
  if (!config.identity_hessian) {
    QF_RETURN_IF_ERROR(CheckHessians(open_store_, config.hessians_uri, *layers));
  }
  QF_RETURN_IF_ERROR(CheckOutputEmpty(open_store_, spec.output_uri()));

  // One QUANTIZE task per layer, with the weight's byte range and the memory it needs.
  const std::vector<std::string> backends = {"cpu", "cuda"};
  std::vector<TaskRecord> tasks;
  for (const PlannedLayer& l : *layers) {
    auto loc = LocateTensor(*model, l.weight);
    if (!loc.ok()) return FieldStatus("spec.model_uri", loc.status());
    TaskRecord t;
    t.kind = v1::TASK_KIND_QUANTIZE;
    t.state = v1::TASK_STATE_QUEUED;
    t.layer.set_module(l.module);
    t.layer.set_weight_tensor(l.weight);
    t.layer.set_model_uri(spec.model_uri());
    t.layer.set_shard_key(loc->key);
    t.layer.set_byte_offset(loc->offset);
    t.layer.set_byte_length(loc->length);
    t.layer.set_dtype(DTypeName(l.dtype));
    t.layer.set_out_features(l.out_features);
    t.layer.set_in_features(l.in_features);
    t.layer.set_hessians_uri(config.hessians_uri);
    t.layer.set_has_bias(model->Find(absl::StrCat(l.module, ".bias")).ok());
    t.memory_bytes =
        TaskMemoryBytes(config, l.out_features, l.in_features, task_memory_factor_);
    t.gpu_memory_bytes = GpuTaskMemoryBytes(config, l.out_features, l.in_features);
    t.backends = backends;
    tasks.push_back(std::move(t));
  }
  return tasks;
}

}  // namespace qforge

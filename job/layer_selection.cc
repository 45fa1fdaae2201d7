#include "job/layer_selection.h"

#include <regex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"

namespace qforge {
namespace {

absl::StatusOr<std::vector<std::regex>> Compile(const std::vector<std::string>& patterns,
                                                const char* what) {
  std::vector<std::regex> out;
  for (const std::string& p : patterns) {
    try {
      out.emplace_back(p, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " pattern '", p, "' is not a valid regular expression: ", e.what()));
    }
  }
  return out;
}

bool AnyMatch(const std::vector<std::regex>& res, const std::string& s) {
  for (const std::regex& re : res) {
    if (std::regex_search(s, re)) return true;
  }
  return false;
}

}  // namespace

absl::StatusOr<std::vector<PlannedLayer>> SelectLayers(const SafetensorsModel& model,
                                                       const LayerSelection& selection) {
  QF_ASSIGN_OR_RETURN(auto include, Compile(selection.include, "include"));
  QF_ASSIGN_OR_RETURN(auto exclude, Compile(selection.exclude, "exclude"));
  std::vector<PlannedLayer> layers;
  for (const std::string& name : model.TensorNames()) {
    if (!absl::EndsWith(name, ".weight")) continue;
    if (!AnyMatch(include, name) || AnyMatch(exclude, name)) continue;
    QF_ASSIGN_OR_RETURN(SafetensorsModel::Location loc, model.Find(name));
    const TensorInfo& t = *loc.info;
    if (t.shape.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("selected tensor '", name, "' in ", loc.key, " has ", t.shape.size(),
                       " dimensions; only 2-D linear weights [out, in] can be quantized "
                       "(adjust --include/--exclude)"));
    }
    if (t.dtype != DType::kF16 && t.dtype != DType::kBF16 && t.dtype != DType::kF32) {
      return absl::InvalidArgumentError(
          absl::StrCat("selected tensor '", name, "' in ", loc.key, " has dtype ",
                       DTypeName(t.dtype), "; supported: F16, BF16, F32"));
    }
    PlannedLayer l;
    l.weight = name;
    l.module = name.substr(0, name.size() - std::string_view(".weight").size());
    l.shard = loc.key;
    l.out_features = t.shape[0];
    l.in_features = t.shape[1];
    l.dtype = t.dtype;
    layers.push_back(std::move(l));
  }
  if (layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "no tensor of the model matches the layer selection (include: ",
        absl::StrJoin(selection.include, ", "), "; exclude: ",
        absl::StrJoin(selection.exclude, ", "), ")"));
  }
  return layers;
}

}  // namespace qforge

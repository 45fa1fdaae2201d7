#include "job/layer_selection.h"

#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "re2/re2.h"

namespace qforge {
namespace {

std::string Quoted(std::string_view s) {
  constexpr size_t kShown = 200;
  if (s.size() <= kShown) return absl::StrCat("'", std::string(s), "'");
  return absl::StrCat("'", std::string(s.substr(0, kShown)), "...' (", s.size(), " bytes)");
}

RE2::Options PatternOptions() {
  RE2::Options o;
  o.set_log_errors(false);
  o.set_max_mem(kMaxLayerPatternProgramBytes);
  return o;
}

// Compiles `pattern` after CheckLayerPattern's size checks; the caller reports errors.
std::unique_ptr<RE2> Compile(std::string_view field, const std::string& pattern,
                             absl::Status* status) {
  if (pattern.empty()) {
    *status = absl::InvalidArgumentError(absl::StrCat(std::string(field), ": empty pattern"));
    return nullptr;
  }
  if (pattern.size() > kMaxLayerPatternBytes) {
    *status = absl::InvalidArgumentError(absl::StrCat(
        std::string(field), ": pattern of ", pattern.size(), " bytes is longer than the limit of ",
        kMaxLayerPatternBytes));
    return nullptr;
  }
  auto re = std::make_unique<RE2>(pattern, PatternOptions());
  if (!re->ok()) {
    const bool too_big = re->error_code() == RE2::ErrorPatternTooLarge;
    *status = absl::InvalidArgumentError(absl::StrCat(
        std::string(field), ": ", Quoted(pattern),
        too_big ? absl::StrCat(" needs more than ", kMaxLayerPatternProgramBytes >> 20,
                               " MiB to compile; use a simpler pattern")
                : absl::StrCat(" is not a valid RE2 regular expression: ", re->error())));
    return nullptr;
  }
  *status = absl::OkStatus();
  return re;
}

absl::StatusOr<std::vector<std::unique_ptr<RE2>>> CompileAll(
    const std::vector<std::string>& patterns, const char* what) {
  std::vector<std::unique_ptr<RE2>> out;
  for (size_t i = 0; i < patterns.size(); ++i) {
    absl::Status s;
    std::unique_ptr<RE2> re = Compile(absl::StrCat(what, "[", i, "]"), patterns[i], &s);
    if (!s.ok()) return s;
    out.push_back(std::move(re));
  }
  return out;
}

bool AnyMatch(const std::vector<std::unique_ptr<RE2>>& res, const std::string& s) {
  for (const auto& re : res) {
    if (RE2::PartialMatch(s, *re)) return true;
  }
  return false;
}

}  // namespace

absl::Status CheckLayerPattern(std::string_view field, const std::string& pattern) {
  absl::Status s;
  Compile(field, pattern, &s);
  return s;
}

absl::StatusOr<std::vector<PlannedLayer>> SelectLayers(const SafetensorsModel& model,
                                                       const LayerSelection& selection) {
  QF_ASSIGN_OR_RETURN(auto include, CompileAll(selection.include, "include"));
  QF_ASSIGN_OR_RETURN(auto exclude, CompileAll(selection.exclude, "exclude"));
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

// Job planning from safetensors headers only: which tensors of a model are quantized.
//
// Patterns are RE2 regular expressions (https://github.com/google/re2/wiki/Syntax): matching
// takes time linear in the tensor name whatever the pattern, so a client's pattern cannot
// stall the coordinator (ECMAScript backtracking could: `^(([a-z_.0-9])+)+$!`). RE2 has no
// backreferences or lookaround; `\d`, `\w`, classes, alternation, anchors and repetition work
// as in ECMAScript. A pattern matches anywhere in the name unless anchored.
//
// Thread-safety: pure functions.
#ifndef QFORGE_JOB_LAYER_SELECTION_H_
#define QFORGE_JOB_LAYER_SELECTION_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/safetensors.h"

namespace qforge {

// The default selection: the linear `*_proj.weight` tensors of the decoder layers.
inline constexpr char kDefaultLayerInclude[] = R"(^model\.layers\.\d+\..*_proj\.weight$)";

// Limits on one pattern: its length, and the memory RE2 may use to compile it (a pattern
// whose automaton needs more is refused, not truncated).
inline constexpr size_t kMaxLayerPatternBytes = 1024;
inline constexpr int64_t kMaxLayerPatternProgramBytes = 1 << 20;

struct LayerSelection {
  std::vector<std::string> include = {kDefaultLayerInclude};  // RE2 patterns (any match)
  std::vector<std::string> exclude;                            // dropped if any matches
};

struct PlannedLayer {
  std::string module;  // tensor name without ".weight"
  std::string weight;  // tensor name
  std::string shard;   // shard key holding it
  int64_t out_features = 0, in_features = 0;
  DType dtype = DType::kF32;
};

// The one check of a selection pattern, used by the spec conversion (SubmitJob), the planner
// and the offline driver: OK when `pattern` is non-empty, at most kMaxLayerPatternBytes, and a
// valid RE2 pattern that compiles within kMaxLayerPatternProgramBytes. INVALID_ARGUMENT
// "<field>: ..." otherwise (`field` names it, e.g. "spec.include[2]"), quoting at most the
// first 200 bytes of the pattern and RE2's reason.
absl::Status CheckLayerPattern(std::string_view field, const std::string& pattern);

// Selects the weights to quantize, sorted by name. INVALID_ARGUMENT for a pattern that
// CheckLayerPattern refuses (field "include[i]" / "exclude[i]"), for a selected tensor that is not 2-D or not F16/BF16/F32 (naming it), or when
// nothing is selected.
absl::StatusOr<std::vector<PlannedLayer>> SelectLayers(const SafetensorsModel& model,
                                                       const LayerSelection& selection);

}  // namespace qforge

#endif  // QFORGE_JOB_LAYER_SELECTION_H_

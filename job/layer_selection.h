// Job planning from safetensors headers only: which tensors of a model are quantized.
// Thread-safety: pure functions.
#ifndef QFORGE_JOB_LAYER_SELECTION_H_
#define QFORGE_JOB_LAYER_SELECTION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/safetensors.h"

namespace qforge {

// The default selection: the linear `*_proj.weight` tensors of the decoder layers.
inline constexpr char kDefaultLayerInclude[] = R"(^model\.layers\.\d+\..*_proj\.weight$)";

struct LayerSelection {
  std::vector<std::string> include = {kDefaultLayerInclude};  // ECMAScript regexes (any match)
  std::vector<std::string> exclude;                            // dropped if any matches
};

struct PlannedLayer {
  std::string module;  // tensor name without ".weight"
  std::string weight;  // tensor name
  std::string shard;   // shard key holding it
  int64_t out_features = 0, in_features = 0;
  DType dtype = DType::kF32;
};

// Selects the weights to quantize, sorted by name. INVALID_ARGUMENT for a malformed regex
// (naming it), for a selected tensor that is not 2-D or not F16/BF16/F32 (naming it), or when
// nothing is selected.
absl::StatusOr<std::vector<PlannedLayer>> SelectLayers(const SafetensorsModel& model,
                                                       const LayerSelection& selection);

}  // namespace qforge

#endif  // QFORGE_JOB_LAYER_SELECTION_H_

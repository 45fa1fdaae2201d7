// The Hessian file format (`--hessians URI`, and what CALIBRATE writes): a safetensors file
// with one float32 [in, in] tensor per linear module, named by the module
// ("model.layers.0.mlp.down_proj"). Modules that share an input (q/k/v, gate/up) may share one
// tensor through `__metadata__` aliases: "alias.<module>": "<tensor name>". Optional
// `__metadata__` "n_samples": "<calibration samples>" and "n_tokens": "<token positions
// summed>" (what CALIBRATE writes); other metadata keys (e.g. "sha256.<tensor>") are kept
// in header().metadata() and otherwise ignored.
// Thread-safety: HessianFile is immutable after Open and safe to share.
#ifndef QFORGE_COMMON_HESSIAN_FILE_H_
#define QFORGE_COMMON_HESSIAN_FILE_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "common/safetensors.h"

namespace qforge {

class HessianFile {
 public:
  // Reads and validates the header (every alias must point at a tensor of the file; every
  // tensor must be a square 2-D floating-point matrix). INVALID_ARGUMENT naming the problem.
  static absl::StatusOr<HessianFile> Open(ObjectStore& store, std::string_view key);

  // The tensor holding `module`'s Hessian (following an alias). NOT_FOUND naming the module.
  absl::StatusOr<const TensorInfo*> Find(std::string_view module) const;

  // Reads `module`'s Hessian as float32 [in_features, in_features] (ranged read of that
  // tensor only). INVALID_ARGUMENT if its shape is not [in_features, in_features]; when the
  // file records "sha256.<tensor>" (as reduced calibration files do), the bytes read must
  // hash to it, else DATA_LOSS naming the tensor and the file.
  absl::StatusOr<std::vector<float>> Read(ObjectStore& store, std::string_view module,
                                          int64_t in_features) const;

  // Number of modules covered (tensors plus aliases).
  size_t num_modules() const { return tensors_.size() + aliases_.size(); }
  int64_t n_samples() const { return n_samples_; }  // -1 when not recorded
  int64_t n_tokens() const { return n_tokens_; }    // -1 when not recorded
  // The file's safetensors header (tensors, metadata).
  const SafetensorsHeader& header() const { return header_; }
  // module -> tensor name, for the aliased modules.
  const std::map<std::string, std::string, std::less<>>& aliases() const { return aliases_; }
  const std::string& key() const { return key_; }

 private:
  std::string key_;
  SafetensorsHeader header_;
  std::map<std::string, std::string, std::less<>> aliases_;  // module -> tensor name
  std::map<std::string, const TensorInfo*, std::less<>> tensors_;
  int64_t n_samples_ = -1;
  int64_t n_tokens_ = -1;
};

struct HessianEntry {
  std::string module;        // tensor name
  const float* data = nullptr;  // [n, n]
  int64_t n = 0;
};

// Writes a Hessian file. `aliases` maps a module name to the module name of an entry.
absl::Status WriteHessianFile(ObjectStore& store, std::string_view key,
                              const std::vector<HessianEntry>& entries,
                              const std::map<std::string, std::string>& aliases,
                              int64_t n_samples);

}  // namespace qforge

#endif  // QFORGE_COMMON_HESSIAN_FILE_H_

// Local scratch of the layer-by-layer forward passes (CALIBRATE, EVALUATE): the spill
// directory, anonymous local files, and a shard's hidden states [tokens, hidden] float32 held
// in memory or, above a limit, in an unlinked file mapped into memory (the kernel pages it to
// local disk). Thread-safety: a HiddenStates is used by one task at a time.
#ifndef QFORGE_JOB_HIDDEN_STATES_H_
#define QFORGE_JOB_HIDDEN_STATES_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace qforge {

// `dir`, or when empty $TMPDIR, else /tmp.
std::string SpillDirectory(const std::string& dir);

// An anonymous local file in `dir` (created and unlinked at once, so it disappears with the
// process), `bytes` long with its blocks reserved (so a full disk is an error here, not a
// SIGBUS later). Returns the descriptor (the caller closes it). UNAVAILABLE /
// RESOURCE_EXHAUSTED naming the directory.
absl::StatusOr<int> AnonymousFile(const std::string& dir, uint64_t bytes, std::string_view what);

// Hidden states [tokens, hidden] float32, zero-initialised: in memory, or above
// `spill_above` bytes in an unlinked file under SpillDirectory(spill_dir) mapped into memory.
class HiddenStates {
 public:
  HiddenStates(const HiddenStates&) = delete;
  HiddenStates& operator=(const HiddenStates&) = delete;
  ~HiddenStates();

  // RESOURCE_EXHAUSTED when memory or the local disk is short (saying which limit to change).
  static absl::StatusOr<std::unique_ptr<HiddenStates>> Create(uint64_t values, uint64_t spill_above,
                                                              const std::string& spill_dir);

  float* data() { return data_; }
  bool spilled() const { return map_ != nullptr; }

 private:
  HiddenStates() = default;
  std::vector<float> memory_;
  void* map_ = nullptr;
  uint64_t bytes_ = 0;
  float* data_ = nullptr;
};

}  // namespace qforge

#endif  // QFORGE_JOB_HIDDEN_STATES_H_

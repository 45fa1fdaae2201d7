// Calibration token data (`--calibration URI`): read, validated against the model, cut to
// the requested samples and length. The coordinator loads it once at submit (validation
// before any work, sha256 recorded); every CALIBRATE task loads it again and checks that
// the bytes still have that sha256.
//
// Accepted files (by content, not by name):
//   safetensors: an I32 or I64 tensor "input_ids" [samples, seq_len]; optional
//     "attention_mask" of the same shape (any integer or BOOL dtype; 0 = padding, 1 = token);
//   JSON Lines: one object per non-empty line with "input_ids": [int, ...] (and optionally
//     "attention_mask": [0/1, ...] of the same length).
// Selection: rows are taken in file order.
//   options.seq_len == 0: every row must have the same length (else "ragged rows"), which
//     becomes seq_len; the first options.max_samples rows (0 = all) are taken.
//   options.seq_len == L and every row has at least L positions: each row is truncated to
//     its first L positions (truncate).
//   otherwise (some row shorter than L): the real tokens (mask 1) of all rows are
//     concatenated in order and cut into rows of exactly L (pack); the tail shorter than L
//     is dropped; then the first max_samples rows are taken.
//
// Errors: INVALID_ARGUMENT whose message starts with `field` (e.g.
// "spec.calibration.dataset_uri") and says what is wrong and where: not safetensors nor
// JSON Lines; no input_ids, wrong dtype or rank; "line 7: ..." for malformed JSON; ragged
// rows (naming the first differing row and both lengths, and that --calib-seq-len packs
// them); empty data (no rows, or fewer than L tokens to pack); an id outside
// [0, vocab_size) ("sample 3, position 17: id 32001 is outside the vocabulary
// (vocab_size 32000)": the sample is the row of the file, the position within it), checked
// on the real tokens of the rows taken (a padding position's id is never used; one outside
// the vocabulary is stored as 0); seq_len above max_position_embeddings;
// a mask that is not 0/1 or has no real token in a row; files above kMaxCalibrationBytes.
// NOT_FOUND when the object does not exist; the store's errors otherwise.
//
// Thread-safety: pure functions, I/O through the given store only.
#ifndef QFORGE_JOB_CALIBRATION_DATA_H_
#define QFORGE_JOB_CALIBRATION_DATA_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "quant/decoder.h"

namespace qforge {

inline constexpr uint64_t kMaxCalibrationBytes = uint64_t{4} << 30;  // 4 GiB

struct CalibrationDataOptions {
  int64_t max_samples = 0;  // 0: all rows
  int64_t seq_len = 0;      // 0: the data's (rows must be equal)
};

struct CalibrationData {
  int64_t samples = 0;
  int64_t seq_len = 0;
  std::vector<int32_t> ids;   // [samples, seq_len]
  std::vector<uint8_t> mask;  // [samples, seq_len] 0/1, or empty: all tokens real
  int64_t tokens = 0;         // real tokens (mask 1)
  bool packed = false;        // rows were packed (see above)
  std::string sha256;         // of the file's bytes, lowercase hex
  uint64_t file_bytes = 0;

  // The batch of rows [begin, end) (mask pointer into `mask`, or null).
  quant::TokenBatch Batch(int64_t begin, int64_t end) const;
};

// Reads and validates `key` (see above). `config` gives vocab_size and
// max_position_embeddings.
absl::StatusOr<CalibrationData> LoadCalibrationData(ObjectStore& store, std::string_view key,
                                                    const CalibrationDataOptions& options,
                                                    const quant::DecoderConfig& config,
                                                    std::string_view field);

}  // namespace qforge

#endif  // QFORGE_JOB_CALIBRATION_DATA_H_

// Calibration: the Hessians of every decoder linear input, computed from the user's token
// data by running the unquantized model (quant/decoder.h) layer by layer. The job DAG
//   CALIBRATE × shards → REDUCE → QUANTIZE × layers → ASSEMBLE
// is built from the three steps here; the coordinator, the worker and the offline driver
// (qforge-quantize --calibration) all call them.
//
// 1. RunCalibrationShard (one CALIBRATE task): samples [begin, end) of the data; embeds them,
//    then for every decoder layer 0 .. num_hidden_layers−1 reads that layer's weights only,
//    runs quant::DecoderForward::ForwardLayer (accumulating the four Hessian sums) and writes
//    the layer's partial Hessians. Memory: one layer's weights, one layer's float64 sums and
//    the shard's hidden states [samples · seq_len, hidden] float32, which live in memory or,
//    above job.spill_above_bytes, in a file under job.spill_dir mapped into memory (the
//    kernel pages it to local disk). The hidden states never leave the process.
//    Output (one object at job.staged_key, a "partial Hessian file"): the Hessian-file format
//    (common/hessian_file.h) with every decoder linear module of every layer: one float32
//    [dim, dim] tensor H_s = (2 / n_s) · S_s per input (named DecoderInputTensorName,
//    aliases for the modules sharing it), metadata "n_samples" (the shard's samples) and
//    "n_tokens" (n_s, the real tokens summed).
// 2. ReduceHessians (one REDUCE task): H = Σ_s (n_s / N) · H_s, N = Σ n_s, summed in float64,
//    tensor by tensor (ranged reads; memory: one float64 [dim, dim] and one float32 tensor),
//    written as the Hessian file with n_samples = Σ samples and n_tokens = N, plus
//    "sha256.<tensor>" metadata per tensor (verified by VerifyHessianCacheEntry). With one
//    shard H = H_1 exactly.
// 3. The Hessian cache: the reduced file is kept at HessianCacheEntryKey(...) under the
//    coordinator's cache URI, keyed by the model's shard sha256s, the data's sha256, samples
//    and seq_len; a later job with the same inputs skips steps 1–2.
//
// Thread-safety: pure functions; a DecoderForward runs one call at a time.
#ifndef QFORGE_JOB_CALIBRATION_H_
#define QFORGE_JOB_CALIBRATION_H_

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "quant/decoder.h"

namespace qforge {

inline constexpr char kCalibrationPartialName[] = "hessians.partial.safetensors";
inline constexpr char kHessianCacheFileName[] = "hessians.safetensors";
inline constexpr uint64_t kDefaultSpillAboveBytes = uint64_t{8} << 30;  // 8 GiB

struct CalibrationShardJob {
  ObjectStore* model_store = nullptr;
  const SafetensorsModel* model = nullptr;      // opened on model_store
  const DecoderModelConfig* model_config = nullptr;
  const CalibrationData* data = nullptr;
  int64_t sample_begin = 0, sample_end = 0;     // within data->samples
  quant::DecoderForward* forward = nullptr;
  // Fraction of this shard's work done (layers done / layers), may cancel (CANCELLED).
  std::function<bool(double)> progress;
  ObjectStore* out_store = nullptr;
  std::string staged_key;
  std::string spill_dir;                        // "" = the system's temp directory
  uint64_t spill_above_bytes = kDefaultSpillAboveBytes;
};

struct CalibrationShardOutcome {
  int64_t samples = 0;
  int64_t tokens = 0;        // n_s
  int64_t layers = 0;
  uint64_t bytes_written = 0;
  bool spilled = false;      // hidden states lived in a mapped file
  double forward_seconds = 0, read_seconds = 0, write_seconds = 0;
};

// Step 1 (see above). Errors: INVALID_ARGUMENT for missing pointers or an empty / out of
// range sample range; the model's errors naming the tensor; the forward's; the store's;
// CANCELLED.
absl::StatusOr<CalibrationShardOutcome> RunCalibrationShard(const CalibrationShardJob& job);

// The checks every layer-by-layer shard (CALIBRATE, EVALUATE) makes before any work:
// INVALID_ARGUMENT starting with `what` for an empty or out of range sample range, data whose
// sizes disagree, seq_len above max_position_embeddings, or a sliding window shorter than
// seq_len (naming `seq_len_flag`, the option that shortens the samples).
absl::Status CheckForwardShard(std::string_view what, const DecoderModelConfig& config,
                               const CalibrationData& data, int64_t sample_begin,
                               int64_t sample_end, std::string_view seq_len_flag);

struct ReduceJob {
  ObjectStore* in_store = nullptr;
  std::vector<std::string> partial_keys;  // outputs of RunCalibrationShard, any order
  ObjectStore* out_store = nullptr;
  std::string out_key;                    // written atomically
  std::function<bool(double)> progress;   // fraction of tensors done, may cancel
  // The reduced tensors are staged in an unlinked local file here ("" = the system's temp
  // directory) while their sha256s, which the output's header holds, are computed: local
  // disk of the output's size.
  std::string spill_dir;
};

struct ReduceOutcome {
  int64_t samples = 0;  // Σ n_samples
  int64_t tokens = 0;   // N
  int64_t tensors = 0;
  uint64_t bytes_written = 0;
};

// Step 2 (see above). INVALID_ARGUMENT when the partials disagree (tensor sets, shapes,
// aliases) or lack n_tokens, naming the file; DATA_LOSS for a truncated partial; the
// stores' errors; CANCELLED.
absl::StatusOr<ReduceOutcome> ReduceHessians(const ReduceJob& job);

// The model's fingerprint: sha256 over "<shard file name>\n<sha256 of its bytes>\n" of every
// shard in shard_keys() order (the index file is not part of it). Reads every shard once
// (shards in parallel).
absl::StatusOr<std::string> ModelFingerprint(ObjectStore& store, const SafetensorsModel& model);

// "<64 hex>/hessians.safetensors": the cache entry of (model fingerprint, data sha256,
// samples, seq_len), relative to the cache store's root.
std::string HessianCacheEntryKey(std::string_view model_fingerprint,
                                 std::string_view data_sha256, int64_t samples,
                                 int64_t seq_len);

// OK when `key` in `store` is a complete cache entry for `config`: a Hessian file with an
// entry of the right shape for every decoder linear module of every layer, n_tokens and a
// "sha256.<tensor>" for each tensor; with verify_data, every tensor's bytes hash to it.
// NOT_FOUND when there is no entry; DATA_LOSS / INVALID_ARGUMENT naming what is wrong.
absl::Status VerifyHessianCacheEntry(ObjectStore& store, std::string_view key,
                                     const quant::DecoderConfig& config, bool verify_data);

// Host memory of one CALIBRATE task of `samples` × `seq_len` tokens: one layer's float32
// weights, the float64 sums and float32 block of the largest input, the hidden states
// (counted up to spill_above_bytes) and the forward's per-sample activations.
uint64_t CalibrationTaskMemoryBytes(const quant::DecoderConfig& config, int64_t samples,
                                    int64_t seq_len, uint64_t spill_above_bytes);

}  // namespace qforge

#endif  // QFORGE_JOB_CALIBRATION_H_

// The ONE place where a qforge.v1.JobSpec becomes the options the quantization core takes
// (quant::QuantizeOptions: the method's options for its LayerQuantizer, the layer selection,
// the memory a task needs) and where its fields are
// validated. The coordinator calls it at SubmitJob (and stores the normalized spec, every
// default filled in); the worker calls ConvertJobSpec on the normalized spec of its Task to
// get the same options back.
//
// Every error is INVALID_ARGUMENT whose message starts with the offending field's path,
// e.g. "spec.gptq.bits: 5 is not one of 2, 3, 4, 8".
//
// Thread-safety: pure functions, no I/O except CheckUriAllowed (which resolves local paths).
#ifndef QFORGE_JOB_SPEC_H_
#define QFORGE_JOB_SPEC_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "qforge/v1/common.pb.h"
#include "job/assembler.h"
#include "job/layer_selection.h"
#include "quant/layer_quantizer.h"

namespace qforge {

// Defaults that ConvertJobSpec writes into the normalized spec when a field is 0 / empty.
inline constexpr int kDefaultGptqBits = 4;
inline constexpr int kDefaultGptqGroupSize = 128;
inline constexpr double kDefaultGptqDampPercent = 0.01;
inline constexpr int kDefaultVptqVectorLen = 8;
inline constexpr int kDefaultVptqCentroids = 65536;
inline constexpr int kDefaultVptqKMeansIters = 100;
inline constexpr int kMaxVptqKMeansIters = 10000;
inline constexpr double kDefaultVptqDampPercent = 0.01;
inline constexpr uint64_t kDefaultMaxShardBytes = 5'000'000'000ull;  // transformers' "5GB"
inline constexpr int kMaxTaskAttempts = 100;
inline constexpr int kMaxSpecPatterns = 64;   // include / exclude patterns each
inline constexpr int kMaxSpecLabels = 64;
inline constexpr size_t kMaxSpecStringBytes = 4096;  // URIs, regexes, label values

struct SpecOptions {
  // Used when spec.max_attempts is 0.
  int default_max_attempts = 4;
  // When non-empty, every file:// (or plain-path) URI of the spec must lie under one of
  // these directories ("" entries ignored). Other schemes are not restricted here.
  std::vector<std::string> allowed_file_roots;
  // Also allowed for calibration.hessians_uri when allowed_file_roots is in force: the
  // coordinator's own Hessian cache (a user may hand a cache entry back with --hessians).
  std::vector<std::string> allowed_hessian_roots;
};

// Calibration from token data (calibration.dataset_uri; job/calibration.h runs it).
struct CalibrationConfig {
  std::string dataset_uri;    // "" unless calibrating from data
  int64_t samples = 0;        // the first N samples (after packing); 0 = all
  int64_t seq_len = 0;        // rows truncated or packed to this length; 0 = the data's
  int64_t shard_samples = 0;  // samples per CALIBRATE task; 0 = chosen by the coordinator
  bool no_cache = false;      // do not reuse cached Hessians (the result refreshes the cache)
};

// Evaluation of the quantized (or given) model against the original (spec.evaluation;
// job/evaluation.h runs it).
struct EvaluationConfig {
  std::string dataset_uri;            // "" = no evaluation
  int64_t samples = 0;                // the first N samples (after packing); 0 = all
  int64_t seq_len = 0;                // rows truncated or packed to this length; 0 = the data's
  int64_t shard_samples = 0;          // samples per EVALUATE task; 0 = chosen by the coordinator
  bool allow_calibration_data = false;
  // The quality gate (job/evaluation.h QualityGate): unset thresholds are not checked.
  std::optional<double> max_ppl_increase_pct;
  std::optional<double> max_kl;
};

// A validated job spec, converted.
struct JobConfig {
  v1::JobSpec spec;                     // normalized: method, the method's parameters,
                                        // include, max_attempts and max_shard_bytes filled in
  // The method's options, what RunLayer (job/layer_runner.h) gives the method's quantizer.
  quant::QuantizeOptions quantize;
  LayerSelection selection;             // spec.include (default: decoder *_proj) / exclude
  bool identity_hessian = false;        // calibration.none: data-free, H = I
  std::string hessians_uri;             // calibration.hessians_uri ("" with identity_hessian
                                        // or dataset calibration)
  CalibrationConfig calibration;        // calibration.dataset_uri and its options
  EvaluationConfig evaluation;          // evaluation.dataset_uri and its options
  // An evaluation-only job (`qforge eval`): spec.reference_model_uri, the original that
  // spec.model_uri is evaluated against; "" for a quantization job.
  std::string reference_model_uri;
  int max_attempts = 4;                 // per task
  uint64_t max_shard_bytes = kDefaultMaxShardBytes;

  bool evaluation_only() const { return !reference_model_uri.empty(); }
  bool evaluates() const { return !evaluation.dataset_uri.empty(); }
  // The original model of the evaluation: reference_model_uri, or the quantized job's input.
  const std::string& evaluation_reference_uri() const {
    return evaluation_only() ? reference_model_uri : spec.model_uri();
  }

  // The artifact's format: the method whose options `quantize` holds.
  ArtifactMethod method() const {
    return std::holds_alternative<quant::VptqLayerOptions>(quantize) ? ArtifactMethod::kVptq
                                                                     : ArtifactMethod::kGptq;
  }
};

// Checks every field that needs no I/O and fills in the defaults:
//   every local path (model_uri, output_uri, reference_model_uri, calibration.hessians_uri,
//     calibration.dataset_uri, evaluation.dataset_uri) that is relative is made absolute
//     against this process's working directory (AbsoluteLocalUri, common/uri.h), so the
//     normalized spec names the same files in every process (workers run elsewhere);
//   model_uri, output_uri: required, at most kMaxSpecStringBytes, allowed by the roots;
//   method: UNSPECIFIED means GPTQ;
//   GPTQ (vptq must be absent):
//     gptq.bits: 0 means 4, else one of 2, 3, 4, 8;
//     gptq.group_size: 0 means 128, -1 per channel, else >= 1;
//     gptq.damp_percent: 0 means 0.01, else finite in (0, 1];
//     gptq.checkpoint_format: "" means "gptq", else "gptq" or "gptq_v2";
//   VPTQ (gptq must be absent), within the `vptq` package's kernel limits:
//     vptq.vector_len: 0 means 8, else one of 2, 4, 6, 8, 10, 12, 16;
//     vptq.num_centroids: 0 means 65536, else 2^b with b in {4, 8, 10, 12..16};
//     vptq.num_res_centroids: 0 (none) or 2^b with b in {2..12, 15, 16}, and <= num_centroids
//       (the package's torch dequant masks residual indices with the index bits);
//     vptq.outlier_size: >= 0; with outliers, outlier_vector_len 0 means 4 and must be 4 (the
//       package's GEMV kernel), vector_len must be a multiple of it (4, 8, 12, 16),
//       outlier_centroids (0 means num_centroids) in [1, 65536];
//     vptq.group_num: 0 means 1; > 1 only with num_centroids <= 4096;
//     vptq.enable_norm / enable_perm: unset means true;
//     vptq.kmeans_iters: 0 means 100, else 1..10000; vptq.damp_percent as gptq's;
//   calibration: required: exactly one of hessians_uri (a Hessian file URI), none = true,
//     or dataset_uri (token data, allowed by the roots); samples, seq_len and
//     shard_samples >= 0 (0 = the default) and, like no_cache, only with dataset_uri;
//   include / exclude: RE2 patterns CheckLayerPattern accepts (job/layer_selection.h; empty
//     include = the default selection);
//   max_attempts: 0 means options.default_max_attempts, else 1..kMaxTaskAttempts;
//   max_shard_bytes: 0 means 5 GB; labels: non-empty keys, bounded sizes;
//   evaluation: with dataset_uri (token data, allowed by the roots): samples, seq_len and
//     shard_samples >= 0 (0 = the default); max_ppl_increase_pct and max_kl, when set,
//     finite and >= 0; without dataset_uri every other evaluation field must be unset;
//   reference_model_uri (an evaluation-only job, `qforge eval`): allowed by the roots;
//     then method must be unset (and stays METHOD_UNSPECIFIED), gptq, vptq, calibration,
//     include and exclude absent, evaluation.dataset_uri required, output_uri optional
//     (where report.html goes).
absl::StatusOr<JobConfig> ConvertJobSpec(const v1::JobSpec& spec,
                                         const SpecOptions& options = {});

// Checks that layer `module` [out_features, in_features] can be quantized with `config`.
// GPTQ: the shape is packable for the bits (CheckGptqPackable), the options are valid for it
// (ValidateGptqOptions), and a positive group size divides in_features (what vLLM and the
// ExLlama kernels require). VPTQ: the options are valid for the shape (ValidateVptqOptions:
// outlier_size leaves room for the groups, (in − outlier_size) % group_num == 0) and the
// layer's config_for_layers entry is within the `vptq` kernels' limits
// (ValidateVptqLayerConfig: in_features <= 65536 with enable_perm, ...).
// INVALID_ARGUMENT naming the field and the layer.
absl::Status ValidateLayerForSpec(const JobConfig& config, std::string_view module,
                                  int64_t out_features, int64_t in_features);

// The host memory one QUANTIZE task of an [out, in] layer needs on a CPU worker, in bytes:
// float32 W and H and the solver's working copies (`cpu_factor` times W + H), plus VPTQ's
// codebooks, indices and dequantized copy.
uint64_t TaskMemoryBytes(const JobConfig& config, int64_t out_features, int64_t in_features,
                         double cpu_factor);
// The device memory the same task needs on a CUDA worker (the CUDA backend's own upper
// bound, cuda/backends.h). Pure arithmetic: usable where no GPU or CUDA runtime exists.
uint64_t GpuTaskMemoryBytes(const JobConfig& config, int64_t out_features, int64_t in_features);

// What quantize_config.json / config.json's quantization_config say for a GPTQ `config`
// (the defaults for another method's).
GptqQuantizeConfig QuantizeConfigForSpec(const JobConfig& config);

// The spec as JSON (proto3 JSON mapping, field names as in the .proto), for the manifest.
nlohmann::json JobSpecToJson(const v1::JobSpec& spec);

// What calibration used and produced, for the manifest's "calibration" object: dataset_uri,
// dataset_sha256, samples, seq_len, tokens, packed, shards, cache_hit, hessians_uri,
// model_fingerprint, seconds (integers as JSON numbers).
nlohmann::json CalibrationInfoToJson(const v1::CalibrationInfo& info);

// OK when `uri` may be used: `roots` is empty (after dropping "" entries), `uri` has a
// scheme other than file://, or its local path (made absolute and resolved, symlinks
// included, as far as it exists) lies under one of the roots. INVALID_ARGUMENT naming
// `field` otherwise.
absl::Status CheckUriAllowed(std::string_view uri, const std::vector<std::string>& roots,
                             std::string_view field);

// `uri` with `name` appended as a path segment, before any "?query"
// ("s3://b/p?endpoint=x" + "m.json" -> "s3://b/p/m.json?endpoint=x").
std::string ChildUri(std::string_view uri, std::string_view name);

}  // namespace qforge

#endif  // QFORGE_JOB_SPEC_H_

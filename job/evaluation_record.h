// What an evaluation records once it is reduced (job/evaluation.h computes it): the one
// conversion between the EVAL_REDUCE task's result object, the API's QualityReport and the
// manifest's "quality" / "quality_gate" keys (docs/FORMATS.md §6).
//
//   worker (EVAL_REDUCE): ReduceEvaluation → CheckQualityGate → QualityMetricsToJson(metrics,
//     gate), staged at the task's staging key (kQualityResultName)
//   coordinator: QualityResultFromJson (validated: every external byte) → QualityReportOf
//     → Job.quality; RecordJobQualityInManifest rewrites qforge_manifest.json (atomic Put)
//     with "quality" and "quality_gate"; CheckQualityGate on the parsed metrics decides
//     SUCCEEDED or FAILED (QUALITY_GATE).
//
// Thread-safety: pure functions except RecordJobQualityInManifest (I/O on the given store).
#ifndef QFORGE_JOB_EVALUATION_RECORD_H_
#define QFORGE_JOB_EVALUATION_RECORD_H_

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "job/evaluation.h"
#include "job/spec.h"
#include "nlohmann/json.hpp"
#include "qforge/v1/common.pb.h"

namespace qforge {

// The name of the EVAL_REDUCE task's staged result (QualityMetricsToJson's object).
inline constexpr char kQualityResultName[] = "quality.json";

// The manifest's "quality_gate" values.
inline constexpr char kGatePassed[] = "passed";
inline constexpr char kGateFailed[] = "failed";
inline constexpr char kGateNone[] = "none";

// The gate of a job's evaluation (its thresholds; unset ones are not checked).
QualityGate QualityGateOf(const EvaluationConfig& evaluation);

// Parses QualityMetricsToJson's object (job/evaluation.h) back into metrics. A module keeps
// its relative error as output_error = relative_error, reference_energy = 1 (the object holds
// the ratio only), so relative_error() reads back exactly. The "gate" member is ignored (the
// caller applies its own gate with CheckQualityGate). INVALID_ARGUMENT naming `source` and
// the field for malformed JSON, a missing member, a wrong type, or a negative / non-finite
// number (ppl_* must be > 0; top1_agreement within [0, 1]; samples, tokens > 0).
absl::StatusOr<QualityMetrics> QualityMetricsFromJson(std::string_view json,
                                                      std::string_view source);

// The API's record of an evaluation: the metrics, the gate's thresholds and outcome
// (gate_enabled, gate_passed), bits_per_weight, seconds, and the data it ran on.
v1::QualityReport QualityReportOf(const QualityMetrics& metrics, const QualityGate& gate,
                                  bool gate_passed, double bits_per_weight, double seconds,
                                  std::string_view dataset_uri, std::string_view dataset_sha256);

// The metrics a QualityReport holds (modules as QualityMetricsFromJson's; bits_per_weight), for
// QualityMetricsToJson and CheckQualityGate.
QualityMetrics QualityMetricsOf(const v1::QualityReport& report);

// Bits per weight of the quantized modules of a qforge manifest: the report's figure
// (job/quality_report.h ManifestBitsPerWeight over "layers"): the stored bits (every byte of
// the modules' tensors, packing and g_idx included) when known, else the nominal ones; 0 when
// the manifest has no usable "layers" (unknown).
double ManifestBitsPerWeightOrZero(const nlohmann::json& manifest);

// The manifest's / report's "quality": QualityMetricsToJson(metrics, gate) (with
// "bits_per_weight" when > 0) plus what the service records beside it ("seconds",
// "dataset_uri", "dataset_sha256"), from `report`.
nlohmann::json QualityRecordJson(const v1::QualityReport& report, const QualityGate& gate);

// The service's form of job/evaluation.h RecordQualityInManifest (which the offline driver
// uses): the caller's `quality` object (QualityRecordJson) and "quality_gate" written always,
// "none" without thresholds. Reads `manifest_key` of `store` (a qforge manifest), sets
// "quality" = `quality` and "quality_gate" = `gate` (kGatePassed, kGateFailed or kGateNone), and writes it back with
// one Put (atomic: a reader sees the old or the new manifest), in the assembler's format
// (2-space JSON, sorted keys, trailing newline). Idempotent. Returns the updated manifest.
// Errors: the store's (NOT_FOUND when the manifest is missing); DATA_LOSS naming the key
// when it is not a JSON object.
absl::StatusOr<nlohmann::json> RecordJobQualityInManifest(ObjectStore& store,
                                                       std::string_view manifest_key,
                                                       const nlohmann::json& quality,
                                                       std::string_view gate);

// Reads a manifest (a JSON object). The store's errors; DATA_LOSS naming the key otherwise.
absl::StatusOr<nlohmann::json> ReadManifest(ObjectStore& store, std::string_view manifest_key);

}  // namespace qforge

#endif  // QFORGE_JOB_EVALUATION_RECORD_H_

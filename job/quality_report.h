// The quality report: one self-contained HTML page (report.html, written beside
// qforge_manifest.json; the GetJobReport RPC; `qforge-report MANIFEST.json`) that shows how
// good a quantized model is and where its error sits. It is rendered from a JSON document
// of one of two kinds:
//
//  1. A qforge_manifest.json object (docs/FORMATS.md §6): "layers" (required, an object
//     keyed by module), "spec", "format", "quantization_config", "created_at",
//     "qforge_version", "source", "calibration", and, when the job evaluated the artifact,
//     "quality" (below) and "quality_gate": "passed" | "failed" | "none".
//  2. An evaluation-only document (`qforge eval MODEL --reference ORIGINAL`, no
//     quantization; EvaluationReportDocument builds it):
//        {"model": uri, "reference": uri, "quality": {...}, "quality_gate"?: ..,
//         "job_id"?: .., "created_at"?: ..}
//     It is recognised by having no "layers" and no "spec"; "model" and "quality" are then
//     required.
//
// "quality" is QualityMetricsToJson's object (job/evaluation.h) — "samples", "tokens",
// "ppl_reference", "ppl_candidate", "ppl_increase_pct", "mean_kl", "top1_agreement",
// "modules": [{"module", "layer", "relative_error"}], "gate"?: {"max_ppl_increase_pct"?,
// "max_kl"?, "passed"} — plus, optionally, what the service records beside it:
// "seconds" (evaluation wall time), "dataset_uri", "dataset_sha256", "bits_per_weight".
//
// The page holds, in this order: a header (model, reference or method, job id, created_at,
// version); the quality table (perplexity original vs quantized, increase, mean KL, top-1
// agreement, samples and tokens) or "not evaluated"; the gate (PASSED / FAILED / no gate,
// with every threshold's measured and allowed value); an inline SVG chart of the relative
// output error of every quantized linear module by decoder layer (x) and module (series q,
// k, v, o, gate, up, down; log-scale y, one point per module) — the evaluation activations'
// error (quality.modules) when present, else the calibration Hessians'
// (layers[m].relative_error); the 10 worst modules by that error; bits per weight; timings;
// and every module in a collapsed table.
//
// Figures as printed: perplexity %.3f; increase %+.2f %%; mean KL %.4g nats; top-1
// agreement %.2f %% (of 0..1 × 100); relative errors %.3e; bits per weight %.3f;
// seconds %.1f s. The page fetches nothing: no URL, no script, inline CSS only, and a
// Content-Security-Policy of default-src 'none' so a browser refuses any fetch. Every string
// taken from the document is HTML-escaped.
//
// Bits per weight of a quantized module (ModuleBitsPerWeight):
//   nominal — GPTQ: b + (16 + b) / g (b-bit weights, one fp16 scale and one b-bit zero point
//             per group of g weights in a row; g = in_features for group_size −1; g_idx,
//             32 bits per input column, not counted); VPTQ: the quantizer's own figure
//             (layers[m].bits_per_weight: indices, codebooks, outliers, norm, perm).
//   stored  — bytes_written · 8 / (out_features · in_features): every byte the module's
//             quantized tensors occupy, packing and g_idx included.
// The averages over the quantized modules are weighted by out_features · in_features.
//
// Thread-safety: pure functions.
#ifndef QFORGE_JOB_QUALITY_REPORT_H_
#define QFORGE_JOB_QUALITY_REPORT_H_

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace qforge {

// The report's object name beside the manifest.
inline constexpr char kQualityReportName[] = "report.html";

struct ModuleBits {
  std::optional<double> nominal;  // unset when the entry has neither GPTQ bits nor a VPTQ figure
  std::optional<double> stored;   // unset without bytes_written / shape
  int64_t weights = 0;            // out_features · in_features (0 when unknown)
};
// One manifest "layers" entry's bits per weight (see above). INVALID_ARGUMENT naming
// `where` and the field when a field present has the wrong type or an impossible value
// (bits outside 1..16, group_size 0 or below −1, negative sizes).
absl::StatusOr<ModuleBits> ModuleBitsPerWeight(const nlohmann::json& layer_entry,
                                               const std::string& where);

struct BitsPerWeightSummary {
  int64_t modules = 0;            // quantized modules counted
  int64_t weights = 0;            // their weights (0 when some shape is unknown)
  std::optional<double> nominal;  // weighted mean (unweighted when a shape is unknown)
  std::optional<double> stored;
};
// The weighted means over a manifest's "layers" object. Errors as ModuleBitsPerWeight.
absl::StatusOr<BitsPerWeightSummary> ManifestBitsPerWeight(const nlohmann::json& layers);

// The evaluation-only document (kind 2 above). `quality` is QualityMetricsToJson's object
// (with the optional extras); `quality_gate` "passed" | "failed" | "none"; empty strings
// are left out.
nlohmann::json EvaluationReportDocument(const std::string& model_uri,
                                        const std::string& reference_uri,
                                        const nlohmann::json& quality,
                                        const std::string& quality_gate,
                                        const std::string& job_id, const std::string& created_at);

// The page (see above). INVALID_ARGUMENT naming the malformed field ("quality.mean_kl must
// be a finite number ≥ 0, got \"x\"") for a document that is not an object, misses a
// required field, has a field of the wrong type or a negative / non-finite figure, or whose
// "quality_gate" contradicts quality.gate.passed.
absl::StatusOr<std::string> RenderQualityReportHtml(const nlohmann::json& document);

}  // namespace qforge

#endif  // QFORGE_JOB_QUALITY_REPORT_H_

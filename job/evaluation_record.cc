#include "job/evaluation_record.h"

#include <cmath>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "job/quality_report.h"

namespace qforge {
namespace {

absl::Status Bad(std::string_view source, std::string_view field, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(source), ": \"", std::string(field), "\" ", std::string(what)));
}

// `field` of `j`; `shown` names it in messages ("" = `field`).
absl::StatusOr<double> Number(const nlohmann::json& j, std::string_view source,
                              const char* field, std::string_view shown = "") {
  if (shown.empty()) shown = field;
  auto it = j.find(field);
  if (it == j.end()) return Bad(source, shown, "is missing");
  if (!it->is_number()) return Bad(source, shown, "is not a number");
  const double v = it->get<double>();
  if (!std::isfinite(v) || v < 0) {
    return Bad(source, shown, absl::StrCat("is ", v, ": not a finite number >= 0"));
  }
  return v;
}

absl::StatusOr<int64_t> Count(const nlohmann::json& j, std::string_view source,
                              const char* field) {
  auto it = j.find(field);
  if (it == j.end()) return Bad(source, field, "is missing");
  if (!it->is_number_integer()) return Bad(source, field, "is not an integer");
  const int64_t v = it->get<int64_t>();
  if (v <= 0) return Bad(source, field, absl::StrCat("is ", v, ": not a count > 0"));
  return v;
}

}  // namespace

QualityGate QualityGateOf(const EvaluationConfig& evaluation) {
  QualityGate g;
  g.max_ppl_increase_pct = evaluation.max_ppl_increase_pct;
  g.max_kl = evaluation.max_kl;
  return g;
}

absl::StatusOr<QualityMetrics> QualityMetricsFromJson(std::string_view json,
                                                      std::string_view source) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(source), ": not a JSON object (the evaluation's metrics)"));
  }
  QualityMetrics m;
  QF_ASSIGN_OR_RETURN(m.samples, Count(j, source, "samples"));
  QF_ASSIGN_OR_RETURN(m.tokens, Count(j, source, "tokens"));
  QF_ASSIGN_OR_RETURN(m.ppl_reference, Number(j, source, "ppl_reference"));
  QF_ASSIGN_OR_RETURN(m.ppl_candidate, Number(j, source, "ppl_candidate"));
  if (m.ppl_reference <= 0) return Bad(source, "ppl_reference", "is 0: a perplexity is >= 1");
  if (m.ppl_candidate <= 0) return Bad(source, "ppl_candidate", "is 0: a perplexity is >= 1");
  // The increase may be negative (the quantized model can do better on some data).
  auto inc = j.find("ppl_increase_pct");
  if (inc == j.end() || !inc->is_number() || !std::isfinite(inc->get<double>())) {
    return Bad(source, "ppl_increase_pct", "is missing or not a finite number");
  }
  m.ppl_increase_pct = inc->get<double>();
  QF_ASSIGN_OR_RETURN(m.mean_kl, Number(j, source, "mean_kl"));
  QF_ASSIGN_OR_RETURN(m.top1_agreement, Number(j, source, "top1_agreement"));
  if (m.top1_agreement > 1) {
    return Bad(source, "top1_agreement", absl::StrCat("is ", m.top1_agreement, ": above 1"));
  }
  auto modules = j.find("modules");
  if (modules == j.end() || !modules->is_array()) {
    return Bad(source, "modules", "is missing or not an array");
  }
  for (size_t i = 0; i < modules->size(); ++i) {
    const nlohmann::json& e = (*modules)[i];
    const std::string where = absl::StrCat("modules[", i, "]");
    if (!e.is_object()) return Bad(source, where, "is not an object");
    auto name = e.find("module");
    if (name == e.end() || !name->is_string() || name->get<std::string>().empty()) {
      return Bad(source, absl::StrCat(where, ".module"), "is missing or not a non-empty string");
    }
    auto layer = e.find("layer");
    if (layer == e.end() || !layer->is_number_integer() || layer->get<int64_t>() < 0) {
      return Bad(source, absl::StrCat(where, ".layer"), "is missing or not an integer >= 0");
    }
    const std::string field = absl::StrCat(where, ".relative_error");
    QF_ASSIGN_OR_RETURN(double rel, Number(e, source, "relative_error", field));
    ModuleErrorSums s;
    s.module = name->get<std::string>();
    s.layer = layer->get<int64_t>();
    s.output_error = rel;
    s.reference_energy = 1.0;
    m.modules.push_back(std::move(s));
  }
  return m;
}

v1::QualityReport QualityReportOf(const QualityMetrics& metrics, const QualityGate& gate,
                                  bool gate_passed, double bits_per_weight, double seconds,
                                  std::string_view dataset_uri, std::string_view dataset_sha256) {
  v1::QualityReport r;
  r.set_samples(metrics.samples);
  r.set_tokens(metrics.tokens);
  r.set_ppl_reference(metrics.ppl_reference);
  r.set_ppl_quantized(metrics.ppl_candidate);
  r.set_ppl_increase_pct(metrics.ppl_increase_pct);
  r.set_mean_kl(metrics.mean_kl);
  r.set_top1_agreement(metrics.top1_agreement);
  for (const ModuleErrorSums& s : metrics.modules) {
    v1::ModuleQuality* q = r.add_modules();
    q->set_module(s.module);
    q->set_layer(s.layer);
    q->set_relative_error(s.relative_error());
  }
  r.set_gate_enabled(gate.enabled());
  r.set_gate_passed(gate.enabled() && gate_passed);
  if (gate.max_ppl_increase_pct) r.set_max_ppl_increase_pct(*gate.max_ppl_increase_pct);
  if (gate.max_kl) r.set_max_kl(*gate.max_kl);
  r.set_bits_per_weight(bits_per_weight);
  r.set_seconds(seconds);
  r.set_dataset_uri(std::string(dataset_uri));
  r.set_dataset_sha256(std::string(dataset_sha256));
  return r;
}

QualityMetrics QualityMetricsOf(const v1::QualityReport& report) {
  QualityMetrics m;
  m.samples = report.samples();
  m.tokens = report.tokens();
  m.ppl_reference = report.ppl_reference();
  m.ppl_candidate = report.ppl_quantized();
  m.ppl_increase_pct = report.ppl_increase_pct();
  m.mean_kl = report.mean_kl();
  m.top1_agreement = report.top1_agreement();
  m.bits_per_weight = report.bits_per_weight();
  for (const v1::ModuleQuality& q : report.modules()) {
    ModuleErrorSums s;
    s.module = q.module();
    s.layer = q.layer();
    s.output_error = q.relative_error();
    s.reference_energy = 1.0;
    m.modules.push_back(std::move(s));
  }
  return m;
}

double ManifestBitsPerWeightOrZero(const nlohmann::json& manifest) {
  if (!manifest.is_object() || !manifest.contains("layers")) return 0;
  auto summary = ManifestBitsPerWeight(manifest["layers"]);
  if (!summary.ok() || summary->modules == 0) return 0;
  if (summary->stored) return *summary->stored;
  return summary->nominal.value_or(0.0);
}

nlohmann::json QualityRecordJson(const v1::QualityReport& report, const QualityGate& gate) {
  nlohmann::json j = QualityMetricsToJson(QualityMetricsOf(report), gate);
  j["seconds"] = report.seconds();
  if (!report.dataset_uri().empty()) j["dataset_uri"] = report.dataset_uri();
  if (!report.dataset_sha256().empty()) j["dataset_sha256"] = report.dataset_sha256();
  return j;
}

absl::StatusOr<nlohmann::json> ReadManifest(ObjectStore& store, std::string_view manifest_key) {
  QF_ASSIGN_OR_RETURN(std::string text, store.ReadAll(manifest_key));
  nlohmann::json manifest = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded() || !manifest.is_object()) {
    return absl::DataLossError(absl::StrCat("the manifest '", std::string(manifest_key),
                                            "' is not a JSON object; the artifact is damaged"));
  }
  return manifest;
}

absl::StatusOr<nlohmann::json> RecordJobQualityInManifest(ObjectStore& store,
                                                       std::string_view manifest_key,
                                                       const nlohmann::json& quality,
                                                       std::string_view gate) {
  QF_ASSIGN_OR_RETURN(nlohmann::json manifest, ReadManifest(store, manifest_key));
  manifest["quality"] = quality;
  manifest["quality_gate"] = std::string(gate);
  std::string out = manifest.dump(2);
  out.push_back('\n');
  QF_RETURN_IF_ERROR(store.Put(manifest_key, out));
  return manifest;
}

}  // namespace qforge

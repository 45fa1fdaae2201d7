#include "job/quality_report.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"

namespace qforge {
namespace {

// ---------------------------------------------------------------- reading the document

std::string Describe(const nlohmann::json& v) {
  std::string s = v.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

absl::Status Malformed(const std::string& where, const std::string& what,
                       const nlohmann::json& got) {
  return absl::InvalidArgumentError(absl::StrCat(
      "report input: ", where, " must be ", what, ", got ", Describe(got),
      " (render from a qforge_manifest.json or an evaluation document, job/quality_report.h)"));
}

std::string Field(const std::string& where, const std::string& key) {
  return where.empty() ? key : absl::StrCat(where, ".", key);
}

// A number ≥ 0 (`allow_negative` for signed figures such as a perplexity change).
absl::StatusOr<std::optional<double>> OptNumber(const nlohmann::json& obj, const char* key,
                                                const std::string& where,
                                                bool allow_negative = false) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::optional<double>();
  if (!it->is_number()) {
    return Malformed(Field(where, key), allow_negative ? "a finite number" : "a finite number >= 0",
                     *it);
  }
  double v = it->get<double>();
  if (!std::isfinite(v) || (!allow_negative && v < 0)) {
    return Malformed(Field(where, key), allow_negative ? "a finite number" : "a finite number >= 0",
                     *it);
  }
  return std::optional<double>(v);
}

absl::StatusOr<double> ReqNumber(const nlohmann::json& obj, const char* key,
                                 const std::string& where, bool allow_negative = false) {
  QF_ASSIGN_OR_RETURN(std::optional<double> v, OptNumber(obj, key, where, allow_negative));
  if (!v) {
    return absl::InvalidArgumentError(
        absl::StrCat("report input: ", Field(where, key), " is missing (a number is required)"));
  }
  return *v;
}

absl::StatusOr<std::optional<int64_t>> OptInt(const nlohmann::json& obj, const char* key,
                                              const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::optional<int64_t>();
  if (!it->is_number_integer()) return Malformed(Field(where, key), "an integer", *it);
  return std::optional<int64_t>(it->get<int64_t>());
}

absl::StatusOr<std::string> OptString(const nlohmann::json& obj, const char* key,
                                      const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::string();
  if (!it->is_string()) return Malformed(Field(where, key), "a string", *it);
  return it->get<std::string>();
}

// The object at `key` (null when absent).
absl::StatusOr<const nlohmann::json*> OptObject(const nlohmann::json& obj, const char* key,
                                                const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return static_cast<const nlohmann::json*>(nullptr);
  if (!it->is_object()) return Malformed(Field(where, key), "an object", *it);
  return &*it;
}

// "model.layers.12.mlp.down_proj" → 12 (−1 without a layer index).
int64_t LayerOfModule(const std::string& module) {
  static const std::regex re(R"((?:^|\.)(?:layers|h|blocks)\.(\d+)\.)");
  std::smatch m;
  if (std::regex_search(module, m, re)) return std::stoll(m[1].str());
  return -1;
}

// The chart's series, in legend order.
const std::vector<std::string>& SeriesOrder() {
  static const std::vector<std::string> order = {"q", "k", "v", "o", "gate", "up", "down"};
  return order;
}

// "…self_attn.q_proj" → "q"; other names keep their last component.
std::string KindOfModule(const std::string& module) {
  std::string last = module.substr(module.rfind('.') == std::string::npos ? 0
                                                                           : module.rfind('.') + 1);
  static const std::map<std::string, std::string> kinds = {
      {"q_proj", "q"},       {"k_proj", "k"},   {"v_proj", "v"},      {"o_proj", "o"},
      {"gate_proj", "gate"}, {"up_proj", "up"}, {"down_proj", "down"}};
  auto it = kinds.find(last);
  return it == kinds.end() ? last : it->second;
}

int SeriesIndex(const std::string& kind) {
  const auto& order = SeriesOrder();
  auto it = std::find(order.begin(), order.end(), kind);
  return it == order.end() ? static_cast<int>(order.size()) : static_cast<int>(it - order.begin());
}

struct ModuleRow {
  std::string module;
  int64_t layer = -1;
  std::string kind;
  std::string method;
  std::optional<double> calibration_error;  // layers[m].relative_error (calibration Hessian)
  std::optional<double> evaluation_error;   // quality.modules (evaluation activations)
  std::optional<double> seconds;
  ModuleBits bits;
};

struct Threshold {
  std::string name, unit;
  double measured = 0, allowed = 0;
  bool met() const { return measured <= allowed; }
};

struct Quality {
  int64_t samples = 0, tokens = 0;
  double ppl_reference = 0, ppl_candidate = 0, ppl_increase_pct = 0, mean_kl = 0, top1 = 0;
  std::optional<double> seconds, bits_per_weight;
  std::string dataset_uri, dataset_sha256;
  std::vector<Threshold> thresholds;
  std::optional<bool> gate_passed;
};

struct Report {
  bool evaluation_only = false;
  std::string model, reference, job_id, created_at, version, method;
  std::vector<ModuleRow> modules;  // layer order, then q k v o gate up down, then name
  std::optional<Quality> quality;
  std::string gate;  // "passed" | "failed" | "none"
  std::optional<double> calibration_seconds;
  std::string calibration_dataset;
  std::optional<int64_t> calibration_samples, calibration_tokens;
  BitsPerWeightSummary bits;
};

absl::StatusOr<Quality> ReadQuality(const nlohmann::json& q, std::map<std::string, ModuleRow>& rows) {
  Quality out;
  const std::string w = "quality";
  QF_ASSIGN_OR_RETURN(std::optional<int64_t> samples, OptInt(q, "samples", w));
  QF_ASSIGN_OR_RETURN(std::optional<int64_t> tokens, OptInt(q, "tokens", w));
  if (!samples || *samples < 0) return Malformed(Field(w, "samples"), "an integer >= 0", q.value("samples", nlohmann::json()));
  if (!tokens || *tokens < 0) return Malformed(Field(w, "tokens"), "an integer >= 0", q.value("tokens", nlohmann::json()));
  out.samples = *samples;
  out.tokens = *tokens;
  QF_ASSIGN_OR_RETURN(out.ppl_reference, ReqNumber(q, "ppl_reference", w));
  QF_ASSIGN_OR_RETURN(out.ppl_candidate, ReqNumber(q, "ppl_candidate", w));
  QF_ASSIGN_OR_RETURN(out.ppl_increase_pct, ReqNumber(q, "ppl_increase_pct", w, true));
  QF_ASSIGN_OR_RETURN(out.mean_kl, ReqNumber(q, "mean_kl", w));
  QF_ASSIGN_OR_RETURN(out.top1, ReqNumber(q, "top1_agreement", w));
  if (out.top1 > 1) return Malformed(Field(w, "top1_agreement"), "a fraction in [0, 1]", q["top1_agreement"]);
  QF_ASSIGN_OR_RETURN(out.seconds, OptNumber(q, "seconds", w));
  QF_ASSIGN_OR_RETURN(out.bits_per_weight, OptNumber(q, "bits_per_weight", w));
  QF_ASSIGN_OR_RETURN(out.dataset_uri, OptString(q, "dataset_uri", w));
  QF_ASSIGN_OR_RETURN(out.dataset_sha256, OptString(q, "dataset_sha256", w));

  if (auto it = q.find("modules"); it != q.end() && !it->is_null()) {
    if (!it->is_array()) return Malformed(Field(w, "modules"), "an array", *it);
    for (size_t i = 0; i < it->size(); ++i) {
      const nlohmann::json& m = (*it)[i];
      const std::string mw = absl::StrCat(w, ".modules[", i, "]");
      if (!m.is_object()) return Malformed(mw, "an object", m);
      QF_ASSIGN_OR_RETURN(std::string name, OptString(m, "module", mw));
      if (name.empty()) return Malformed(Field(mw, "module"), "a non-empty string", m.value("module", nlohmann::json()));
      QF_ASSIGN_OR_RETURN(double rel, ReqNumber(m, "relative_error", mw));
      QF_ASSIGN_OR_RETURN(std::optional<int64_t> layer, OptInt(m, "layer", mw));
      ModuleRow& row = rows[name];
      row.module = name;
      row.evaluation_error = rel;
      if (layer) {
        if (*layer < 0) return Malformed(Field(mw, "layer"), "an integer >= 0", m["layer"]);
        row.layer = *layer;
      }
    }
  }

  QF_ASSIGN_OR_RETURN(const nlohmann::json* gate, OptObject(q, "gate", w));
  if (gate != nullptr) {
    const std::string gw = Field(w, "gate");
    QF_ASSIGN_OR_RETURN(std::optional<double> max_ppl, OptNumber(*gate, "max_ppl_increase_pct", gw));
    QF_ASSIGN_OR_RETURN(std::optional<double> max_kl, OptNumber(*gate, "max_kl", gw));
    if (max_ppl) out.thresholds.push_back({"perplexity increase", "%", out.ppl_increase_pct, *max_ppl});
    if (max_kl) out.thresholds.push_back({"mean KL divergence", "nats", out.mean_kl, *max_kl});
    auto p = gate->find("passed");
    if (p == gate->end() || !p->is_boolean()) {
      return Malformed(Field(gw, "passed"), "true or false",
                       p == gate->end() ? nlohmann::json() : *p);
    }
    out.gate_passed = p->get<bool>();
  }
  return out;
}

absl::Status ReadLayers(const nlohmann::json& layers, std::map<std::string, ModuleRow>& rows) {
  for (const auto& [name, entry] : layers.items()) {
    const std::string w = absl::StrCat("layers[\"", name, "\"]");
    if (!entry.is_object()) return Malformed(w, "an object", entry);
    ModuleRow& row = rows[name];
    row.module = name;
    QF_ASSIGN_OR_RETURN(row.method, OptString(entry, "method", w));
    QF_ASSIGN_OR_RETURN(row.calibration_error, OptNumber(entry, "relative_error", w));
    // The coordinator records the task's wall time; the offline driver reading + solving.
    QF_ASSIGN_OR_RETURN(row.seconds, OptNumber(entry, "seconds", w));
    if (!row.seconds) {
      QF_ASSIGN_OR_RETURN(std::optional<double> read, OptNumber(entry, "read_seconds", w));
      QF_ASSIGN_OR_RETURN(std::optional<double> solve, OptNumber(entry, "solve_seconds", w));
      if (read || solve) row.seconds = read.value_or(0) + solve.value_or(0);
    }
    QF_ASSIGN_OR_RETURN(row.bits, ModuleBitsPerWeight(entry, w));
  }
  return absl::OkStatus();
}

std::string MethodOf(const nlohmann::json& doc) {
  const std::string format = doc.value("format", std::string());
  const nlohmann::json qc = doc.value("quantization_config", nlohmann::json::object());
  if (format == "gptq" && qc.is_object()) {
    std::string s = "GPTQ";
    if (qc.contains("bits") && qc["bits"].is_number_integer())
      absl::StrAppend(&s, " ", qc["bits"].get<int64_t>(), "-bit");
    if (qc.contains("group_size") && qc["group_size"].is_number_integer()) {
      int64_t g = qc["group_size"].get<int64_t>();
      absl::StrAppend(&s, g == -1 ? ", per-channel" : absl::StrCat(", group size ", g));
    }
    if (qc.contains("desc_act") && qc["desc_act"].is_boolean() && qc["desc_act"].get<bool>())
      absl::StrAppend(&s, ", act-order");
    return s;
  }
  if (format == "vptq") return "VPTQ";
  return format;
}

absl::StatusOr<Report> ReadReport(const nlohmann::json& doc) {
  if (!doc.is_object()) return Malformed("the document", "a JSON object", doc);
  Report r;
  std::map<std::string, ModuleRow> rows;
  r.evaluation_only = !doc.contains("layers") && !doc.contains("spec");
  QF_ASSIGN_OR_RETURN(r.created_at, OptString(doc, "created_at", ""));
  QF_ASSIGN_OR_RETURN(r.version, OptString(doc, "qforge_version", ""));
  if (r.evaluation_only) {
    QF_ASSIGN_OR_RETURN(r.model, OptString(doc, "model", ""));
    QF_ASSIGN_OR_RETURN(r.reference, OptString(doc, "reference", ""));
    QF_ASSIGN_OR_RETURN(r.job_id, OptString(doc, "job_id", ""));
    if (r.model.empty()) {
      return absl::InvalidArgumentError(
          "report input: an evaluation document (no \"layers\", no \"spec\") needs \"model\" "
          "(the evaluated model's URI) and \"quality\"; a manifest needs \"layers\"");
    }
    if (!doc.contains("quality") || doc["quality"].is_null()) {
      return absl::InvalidArgumentError(
          "report input: an evaluation document has no \"quality\" object; render a "
          "qforge_manifest.json or an evaluation document with its results");
    }
    r.method = "evaluation only";
  } else {
    QF_ASSIGN_OR_RETURN(const nlohmann::json* layers, OptObject(doc, "layers", ""));
    if (layers == nullptr) {
      return absl::InvalidArgumentError(
          "report input: layers is missing; a qforge_manifest.json has a \"layers\" object "
          "keyed by module (docs/FORMATS.md §6)");
    }
    QF_RETURN_IF_ERROR(ReadLayers(*layers, rows));
    QF_ASSIGN_OR_RETURN(r.bits, ManifestBitsPerWeight(*layers));
    QF_ASSIGN_OR_RETURN(const nlohmann::json* spec, OptObject(doc, "spec", ""));
    if (spec != nullptr) {
      QF_ASSIGN_OR_RETURN(r.job_id, OptString(*spec, "job_id", "spec"));
      QF_ASSIGN_OR_RETURN(r.model, OptString(*spec, "model_uri", "spec"));
      if (r.model.empty()) {
        QF_ASSIGN_OR_RETURN(r.model, OptString(*spec, "model", "spec"));
      }
    }
    QF_ASSIGN_OR_RETURN(const nlohmann::json* source, OptObject(doc, "source", ""));
    if (r.model.empty() && source != nullptr) {
      QF_ASSIGN_OR_RETURN(r.model, OptString(*source, "uri", "source"));
    }
    QF_ASSIGN_OR_RETURN(std::string format, OptString(doc, "format", ""));
    QF_ASSIGN_OR_RETURN(const nlohmann::json* qc, OptObject(doc, "quantization_config", ""));
    (void)format;
    (void)qc;
    r.method = MethodOf(doc);
    QF_ASSIGN_OR_RETURN(const nlohmann::json* calibration, OptObject(doc, "calibration", ""));
    if (calibration != nullptr) {
      QF_ASSIGN_OR_RETURN(r.calibration_seconds, OptNumber(*calibration, "seconds", "calibration"));
      QF_ASSIGN_OR_RETURN(r.calibration_dataset, OptString(*calibration, "dataset_uri", "calibration"));
      QF_ASSIGN_OR_RETURN(r.calibration_samples, OptInt(*calibration, "samples", "calibration"));
      QF_ASSIGN_OR_RETURN(r.calibration_tokens, OptInt(*calibration, "tokens", "calibration"));
    }
  }

  QF_ASSIGN_OR_RETURN(const nlohmann::json* quality, OptObject(doc, "quality", ""));
  if (quality != nullptr) {
    QF_ASSIGN_OR_RETURN(Quality q, ReadQuality(*quality, rows));
    r.quality = std::move(q);
  }
  QF_ASSIGN_OR_RETURN(r.gate, OptString(doc, "quality_gate", ""));
  if (!r.gate.empty() && r.gate != "passed" && r.gate != "failed" && r.gate != "none") {
    return Malformed("quality_gate", "\"passed\", \"failed\" or \"none\"", doc["quality_gate"]);
  }
  const bool has_gate = r.quality && r.quality->gate_passed.has_value();
  const bool passed = has_gate && r.quality->gate_passed.value_or(false);
  if (r.gate.empty()) r.gate = has_gate ? (passed ? "passed" : "failed") : "none";
  if (has_gate && r.gate != (passed ? "passed" : "failed")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "report input: quality_gate is \"", r.gate, "\" but quality.gate.passed is ",
        passed ? "true" : "false", "; the two must agree"));
  }
  if (!has_gate && r.gate != "none") {
    return absl::InvalidArgumentError(absl::StrCat(
        "report input: quality_gate is \"", r.gate,
        "\" but quality.gate (the thresholds and their outcome) is missing"));
  }

  for (auto& [name, row] : rows) {
    if (row.layer < 0) row.layer = LayerOfModule(name);
    row.kind = KindOfModule(name);
    r.modules.push_back(row);
  }
  std::sort(r.modules.begin(), r.modules.end(), [](const ModuleRow& a, const ModuleRow& b) {
    return std::make_tuple(a.layer, SeriesIndex(a.kind), a.module) <
           std::make_tuple(b.layer, SeriesIndex(b.kind), b.module);
  });
  return r;
}

// ---------------------------------------------------------------- writing the page

std::string Esc(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string Ppl(double v) { return absl::StrFormat("%.3f", v); }
std::string Pct(double v) { return absl::StrFormat("%+.2f %%", v); }
std::string Kl(double v) { return absl::StrFormat("%.4g nats", v); }
std::string Agree(double v) { return absl::StrFormat("%.2f %%", v * 100); }
std::string Rel(double v) { return absl::StrFormat("%.3e", v); }
std::string Bits(double v) { return absl::StrFormat("%.3f", v); }
std::string Secs(double v) { return absl::StrFormat("%.1f s", v); }
std::string Dash() { return "&mdash;"; }

const char* SeriesColor(int index) {
  static const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
                                 "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
  return colors[std::min(index, 7)];
}

const char kStyle[] = R"css(
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1140px;color:#1b1f24;background:#fff;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #d0d7de;padding:4px 10px;text-align:left}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta td:first-child{color:#57606a}.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600}
.pass{background:#dafbe1;color:#116329}.fail{background:#ffebe9;color:#a40e26}.none{background:#eaeef2;color:#424a53}
.note{color:#57606a;font-size:12.5px}svg text{font:12px system-ui,sans-serif;fill:#424a53}
svg .grid{stroke:#eaeef2}svg .axis{stroke:#57606a}details{margin:8px 0}
)css";

void AppendRow(std::string& out, const std::string& label, const std::string& value_html,
               bool numeric = true) {
  absl::StrAppend(&out, "<tr><td>", Esc(label), "</td><td", numeric ? " class=\"n\"" : "", ">",
                  value_html, "</td></tr>\n");
}

std::optional<double> ChartValue(const ModuleRow& m, bool evaluation) {
  return evaluation ? m.evaluation_error : m.calibration_error;
}

// The inline SVG: one <circle class="pt"> per module with a layer index and a value.
std::string Chart(const Report& r, bool evaluation) {
  std::vector<const ModuleRow*> pts;
  for (const ModuleRow& m : r.modules) {
    if (m.layer >= 0 && ChartValue(m, evaluation)) pts.push_back(&m);
  }
  if (pts.empty()) return "<p class=\"note\">No per-module errors to chart.</p>\n";
  int64_t lmin = pts.front()->layer, lmax = pts.front()->layer;
  double vmin = 0, vmax = 0;
  bool any_positive = false;
  std::vector<std::string> kinds;
  for (const ModuleRow* m : pts) {
    lmin = std::min(lmin, m->layer);
    lmax = std::max(lmax, m->layer);
    double v = *ChartValue(*m, evaluation);
    if (v > 0) {
      vmin = any_positive ? std::min(vmin, v) : v;
      vmax = any_positive ? std::max(vmax, v) : v;
      any_positive = true;
    }
    if (std::find(kinds.begin(), kinds.end(), m->kind) == kinds.end()) kinds.push_back(m->kind);
  }
  std::sort(kinds.begin(), kinds.end(), [](const std::string& a, const std::string& b) {
    return std::make_pair(SeriesIndex(a), a) < std::make_pair(SeriesIndex(b), b);
  });
  int lo = any_positive ? static_cast<int>(std::floor(std::log10(vmin))) : -6;
  int hi = any_positive ? static_cast<int>(std::ceil(std::log10(vmax))) : 0;
  if (hi <= lo) hi = lo + 1;

  const double W = 1080, H = 440, left = 70, right = 120, top = 20, bottom = 50;
  const double pw = W - left - right, ph = H - top - bottom;
  const int64_t nl = lmax - lmin + 1;
  const double slot = pw / static_cast<double>(nl);
  auto x_of = [&](int64_t layer, int kind_pos) {
    const double spread = std::min(slot * 0.7, 7.0 * static_cast<double>(kinds.size()));
    const double off = kinds.size() > 1
                           ? (kind_pos / static_cast<double>(kinds.size() - 1) - 0.5) * spread
                           : 0.0;
    return left + (static_cast<double>(layer - lmin) + 0.5) * slot + off;
  };
  auto y_of = [&](double v) {
    double lv = v > 0 ? std::log10(v) : lo;
    lv = std::clamp(lv, static_cast<double>(lo), static_cast<double>(hi));
    return top + (hi - lv) / (hi - lo) * ph;
  };

  std::string s = absl::StrFormat(
      "<svg id=\"error-chart\" role=\"img\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f "
      "%.0f\" aria-label=\"relative output error by layer and module\">\n",
      W, H, W, H);
  // Grid and y axis (decades).
  for (int d = lo; d <= hi; ++d) {
    double y = top + static_cast<double>(hi - d) / (hi - lo) * ph;
    absl::StrAppendFormat(&s,
                          "<line class=\"grid\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">1e%d</text>\n",
                          left, y, left + pw, y, left - 6, y + 4, d);
  }
  const int64_t step = std::max<int64_t>(1, (nl + 23) / 24);
  for (int64_t l = lmin; l <= lmax; l += step) {
    absl::StrAppendFormat(&s, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%d</text>\n",
                          x_of(l, 0) + (kinds.size() > 1 ? std::min(slot * 0.35, 3.5 * kinds.size()) : 0),
                          top + ph + 16, l);
  }
  absl::StrAppendFormat(&s,
                        "<line class=\"axis\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>"
                        "<line class=\"axis\" x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\"/>\n",
                        left, top, left, top + ph, left, top + ph, left + pw, top + ph);
  absl::StrAppendFormat(&s, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">decoder layer</text>\n",
                        left + pw / 2, H - 10);
  absl::StrAppendFormat(&s,
                        "<text transform=\"translate(16 %.1f) rotate(-90)\" "
                        "text-anchor=\"middle\">relative output error (log)</text>\n",
                        top + ph / 2);
  // Series: a line through the layers, a point per module, a legend entry.
  for (size_t k = 0; k < kinds.size(); ++k) {
    const char* color = SeriesColor(SeriesIndex(kinds[k]));
    std::string line;
    std::string points;
    for (const ModuleRow* m : pts) {
      if (m->kind != kinds[k]) continue;
      double v = *ChartValue(*m, evaluation);
      double x = x_of(m->layer, static_cast<int>(k)), y = y_of(v);
      absl::StrAppendFormat(&line, "%.1f,%.1f ", x, y);
      absl::StrAppendFormat(
          &points,
          "<circle class=\"pt\" cx=\"%.1f\" cy=\"%.1f\" r=\"3.5\" fill=\"%s\"%s><title>%s: "
          "%s</title></circle>\n",
          x, y, v > 0 ? color : "#fff", v > 0 ? "" : absl::StrCat(" stroke=\"", color, "\""),
          Esc(m->module), Rel(v));
    }
    absl::StrAppendFormat(&s,
                          "<polyline fill=\"none\" stroke=\"%s\" stroke-opacity=\"0.45\" "
                          "points=\"%s\"/>\n%s",
                          color, line, points);
    const double ly = top + 10 + 18 * static_cast<double>(k);
    absl::StrAppendFormat(&s,
                          "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"4\" fill=\"%s\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                          left + pw + 20, ly, color, left + pw + 30, ly + 4, Esc(kinds[k]));
  }
  s += "</svg>\n";
  const size_t unplaced = std::count_if(r.modules.begin(), r.modules.end(), [&](const ModuleRow& m) {
    return m.layer < 0 && ChartValue(m, evaluation);
  });
  if (unplaced > 0) {
    absl::StrAppend(&s, "<p class=\"note\">", unplaced,
                    " module(s) without a decoder-layer index are in the tables only.</p>\n");
  }
  return s;
}

std::string RenderPage(const Report& r) {
  const bool evaluated = r.quality.has_value();
  const bool eval_errors = std::any_of(r.modules.begin(), r.modules.end(),
                                       [](const ModuleRow& m) { return m.evaluation_error.has_value(); });
  std::string title = r.job_id.empty() ? r.model : r.job_id;
  std::string out;
  absl::StrAppend(&out,
                  "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                  "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
                  "style-src 'unsafe-inline'\">\n<meta name=\"viewport\" "
                  "content=\"width=device-width, initial-scale=1\">\n<title>qforge report: ",
                  Esc(title), "</title>\n<style>", kStyle, "</style>\n</head>\n<body>\n");
  // Header.
  absl::StrAppend(&out, "<h1>qforge quality report</h1>\n<table class=\"meta\">\n");
  AppendRow(out, "model", Esc(r.model.empty() ? "(unknown)" : r.model), false);
  if (!r.reference.empty()) AppendRow(out, "reference (original)", Esc(r.reference), false);
  AppendRow(out, "method", Esc(r.method.empty() ? "(unknown)" : r.method), false);
  if (!r.job_id.empty()) AppendRow(out, "job id", Esc(r.job_id), false);
  if (!r.created_at.empty()) AppendRow(out, "created at", Esc(r.created_at), false);
  if (!r.version.empty()) AppendRow(out, "qforge version", Esc(r.version), false);
  out += "</table>\n";

  // Quality.
  out += "<h2 id=\"quality\">Quality</h2>\n";
  if (!evaluated) {
    out += "<p id=\"not-evaluated\"><span class=\"badge none\">not evaluated</span> This job ran "
           "no evaluation; submit it with an evaluation data set (<code>--eval URI</code>) or "
           "run <code>qforge eval MODEL --reference ORIGINAL --eval URI</code>.</p>\n";
  } else {
    const Quality& q = *r.quality;
    out += "<table id=\"quality-table\">\n<tr><th>measure</th><th>value</th></tr>\n";
    if (!q.dataset_uri.empty()) AppendRow(out, "evaluation data", Esc(q.dataset_uri), false);
    if (!q.dataset_sha256.empty()) AppendRow(out, "data sha256", Esc(q.dataset_sha256), false);
    AppendRow(out, "samples", absl::StrCat(q.samples));
    AppendRow(out, "tokens predicted", absl::StrCat(q.tokens));
    AppendRow(out, "perplexity, original", Ppl(q.ppl_reference));
    AppendRow(out, "perplexity, quantized", Ppl(q.ppl_candidate));
    AppendRow(out, "perplexity increase", Pct(q.ppl_increase_pct));
    AppendRow(out, "mean KL(original \u2016 quantized)", Kl(q.mean_kl));
    AppendRow(out, "top-1 agreement", Agree(q.top1));
    out += "</table>\n";
  }
  out += "<h2 id=\"gate\">Quality gate</h2>\n";
  if (r.gate == "passed") {
    out += "<p><span class=\"badge pass\" id=\"gate-status\">PASSED</span></p>\n";
  } else if (r.gate == "failed") {
    out += "<p><span class=\"badge fail\" id=\"gate-status\">FAILED</span> The job ended FAILED "
           "(QUALITY_GATE); the artifact is kept for inspection.</p>\n";
  } else {
    out += "<p><span class=\"badge none\" id=\"gate-status\">no gate</span> No threshold was set "
           "(<code>--max-ppl-increase PCT</code>, <code>--max-kld X</code>).</p>\n";
  }
  if (evaluated && !r.quality->thresholds.empty()) {
    out += "<table id=\"gate-table\">\n<tr><th>threshold</th><th>measured</th><th>allowed</th>"
           "<th>result</th></tr>\n";
    for (const Threshold& t : r.quality->thresholds) {
      const bool pct = t.unit == "%";
      absl::StrAppend(&out, "<tr><td>", Esc(t.name), "</td><td class=\"n\">",
                      pct ? Pct(t.measured) : Kl(t.measured), "</td><td class=\"n\">",
                      pct ? absl::StrFormat("%.2f %%", t.allowed) : Kl(t.allowed), "</td><td>",
                      t.met() ? "<span class=\"badge pass\">met</span>"
                              : "<span class=\"badge fail\">missed</span>",
                      "</td></tr>\n");
    }
    out += "</table>\n";
  }

  // Chart and worst modules.
  out += "<h2 id=\"where\">Where the error sits</h2>\n";
  absl::StrAppend(&out, "<p class=\"note\">Relative output error ",
                  eval_errors ? "tr(&Delta;W S &Delta;W&#7488;) / tr(W S W&#7488;) on the "
                                "evaluation activations"
                              : "tr(&Delta;W H &Delta;W&#7488;) / tr(W H W&#7488;) under the "
                                "calibration Hessians",
                  " of each quantized linear module; hollow points are 0, drawn on the "
                  "bottom axis.</p>\n");
  out += Chart(r, eval_errors);
  std::vector<const ModuleRow*> ranked;
  for (const ModuleRow& m : r.modules) {
    if (ChartValue(m, eval_errors)) ranked.push_back(&m);
  }
  std::stable_sort(ranked.begin(), ranked.end(), [&](const ModuleRow* a, const ModuleRow* b) {
    return *ChartValue(*a, eval_errors) > *ChartValue(*b, eval_errors);
  });
  auto module_table = [&](const std::string& id, const std::vector<const ModuleRow*>& rows,
                          bool rank) {
    std::string t = absl::StrCat("<table id=\"", id, "\">\n<tr>", rank ? "<th>#</th>" : "",
                                 "<th>module</th><th>layer</th><th>error (evaluation)</th>"
                                 "<th>error (calibration)</th><th>bits/weight</th><th>seconds</th>"
                                 "</tr>\n");
    for (size_t i = 0; i < rows.size(); ++i) {
      const ModuleRow& m = *rows[i];
      absl::StrAppend(
          &t, "<tr>", rank ? absl::StrCat("<td class=\"n\">", i + 1, "</td>") : "", "<td>",
          Esc(m.module), "</td><td class=\"n\">",
          m.layer >= 0 ? absl::StrCat(m.layer) : Dash(), "</td><td class=\"n\">",
          m.evaluation_error ? Rel(*m.evaluation_error) : Dash(), "</td><td class=\"n\">",
          m.calibration_error ? Rel(*m.calibration_error) : Dash(), "</td><td class=\"n\">",
          m.bits.nominal ? Bits(*m.bits.nominal) : Dash(), "</td><td class=\"n\">",
          m.seconds ? Secs(*m.seconds) : Dash(), "</td></tr>\n");
    }
    t += "</table>\n";
    return t;
  };
  if (!ranked.empty()) {
    out += "<h2 id=\"worst\">The 10 worst modules</h2>\n";
    std::vector<const ModuleRow*> worst(ranked.begin(),
                                        ranked.begin() + std::min<size_t>(10, ranked.size()));
    out += module_table("worst-table", worst, true);
  }
  // Bits per weight.
  out += "<h2 id=\"bits\">Bits per weight</h2>\n<table id=\"bits-table\">\n";
  if (!r.evaluation_only) {
    AppendRow(out, "quantized modules", absl::StrCat(r.bits.modules));
    if (r.bits.weights > 0) AppendRow(out, "quantized weights", absl::StrCat(r.bits.weights));
    AppendRow(out, "bits per weight, nominal", r.bits.nominal ? Bits(*r.bits.nominal) : Dash());
    AppendRow(out, "bits per weight, stored", r.bits.stored ? Bits(*r.bits.stored) : Dash());
  }
  if (evaluated && r.quality->bits_per_weight) {
    AppendRow(out, "bits per weight (evaluation)", Bits(*r.quality->bits_per_weight));
  }
  out += "</table>\n<p class=\"note\">Nominal: GPTQ b + (16 + b) / g (b-bit weights, an fp16 "
         "scale and a b-bit zero point per group of g weights; g = in_features per-channel; "
         "g_idx not counted); VPTQ the quantizer's figure (indices, codebooks, outliers, norm, "
         "perm). Stored: bytes of the module's quantized tensors &times; 8 / weights. Means "
         "weighted by out_features &times; in_features.</p>\n";

  // Timings.
  out += "<h2 id=\"timings\">Timings</h2>\n<table id=\"timings-table\">\n";
  if (!r.evaluation_only) {
    double sum = 0;
    int64_t n = 0;
    const ModuleRow* slowest = nullptr;
    for (const ModuleRow& m : r.modules) {
      if (!m.seconds) continue;
      sum += *m.seconds;
      ++n;
      if (slowest == nullptr || *m.seconds > *slowest->seconds) slowest = &m;
    }
    AppendRow(out, absl::StrCat("quantization, summed over ", n, " modules"),
              n > 0 ? Secs(sum) : Dash());
    if (slowest != nullptr) {
      AppendRow(out, "slowest module",
                absl::StrCat(Esc(slowest->module), " (", Secs(*slowest->seconds), ")"), false);
    }
    AppendRow(out, "calibration", r.calibration_seconds ? Secs(*r.calibration_seconds) : Dash());
  }
  AppendRow(out, "evaluation",
            evaluated && r.quality->seconds ? Secs(*r.quality->seconds) : Dash());
  out += "</table>\n<p class=\"note\">Quantization time is the modules' task time added up "
         "(workers run in parallel, so the wall time is shorter); calibration and evaluation "
         "are wall times.</p>\n";

  if (!r.modules.empty()) {
    std::vector<const ModuleRow*> all;
    for (const ModuleRow& m : r.modules) all.push_back(&m);
    absl::StrAppend(&out, "<details><summary>All ", all.size(), " modules</summary>\n",
                    module_table("modules-table", all, false), "</details>\n");
  }
  if (!r.calibration_dataset.empty()) {
    absl::StrAppend(&out, "<p class=\"note\">Calibration data: ", Esc(r.calibration_dataset));
    if (r.calibration_samples) absl::StrAppend(&out, ", ", *r.calibration_samples, " samples");
    if (r.calibration_tokens) absl::StrAppend(&out, ", ", *r.calibration_tokens, " tokens");
    out += ".</p>\n";
  }
  out += "</body>\n</html>\n";
  return out;
}

}  // namespace

absl::StatusOr<ModuleBits> ModuleBitsPerWeight(const nlohmann::json& e, const std::string& where) {
  if (!e.is_object()) return Malformed(where, "an object", e);
  ModuleBits b;
  QF_ASSIGN_OR_RETURN(std::optional<int64_t> out_features, OptInt(e, "out_features", where));
  QF_ASSIGN_OR_RETURN(std::optional<int64_t> in_features, OptInt(e, "in_features", where));
  if (out_features && *out_features <= 0) return Malformed(Field(where, "out_features"), "an integer > 0", e["out_features"]);
  if (in_features && *in_features <= 0) return Malformed(Field(where, "in_features"), "an integer > 0", e["in_features"]);
  if (out_features && in_features) b.weights = *out_features * *in_features;
  QF_ASSIGN_OR_RETURN(std::optional<int64_t> bytes, OptInt(e, "bytes_written", where));
  if (bytes && *bytes < 0) return Malformed(Field(where, "bytes_written"), "an integer >= 0", e["bytes_written"]);
  if (bytes && b.weights > 0) b.stored = static_cast<double>(*bytes) * 8.0 / static_cast<double>(b.weights);

  QF_ASSIGN_OR_RETURN(std::string method, OptString(e, "method", where));
  QF_ASSIGN_OR_RETURN(std::optional<int64_t> bits, OptInt(e, "bits", where));
  if (method == "gptq" || (method.empty() && bits)) {
    if (!bits || *bits < 1 || *bits > 16) {
      return Malformed(Field(where, "bits"), "an integer in 1..16 for a GPTQ module",
                       e.value("bits", nlohmann::json()));
    }
    QF_ASSIGN_OR_RETURN(std::optional<int64_t> group, OptInt(e, "group_size", where));
    if (!group || *group == 0 || *group < -1) {
      return Malformed(Field(where, "group_size"), "-1 (per-channel) or an integer > 0",
                       e.value("group_size", nlohmann::json()));
    }
    if (*group == -1 && !in_features) {
      return absl::InvalidArgumentError(absl::StrCat(
          "report input: ", Field(where, "in_features"),
          " is missing; a per-channel GPTQ module (group_size -1) needs it for bits per weight"));
    }
    const double g = static_cast<double>(*group == -1 ? *in_features : *group);
    b.nominal = static_cast<double>(*bits) + (16.0 + static_cast<double>(*bits)) / g;
  } else {
    QF_ASSIGN_OR_RETURN(std::optional<double> vptq_bits, OptNumber(e, "bits_per_weight", where));
    if (vptq_bits && *vptq_bits > 0) b.nominal = *vptq_bits;
  }
  return b;
}

absl::StatusOr<BitsPerWeightSummary> ManifestBitsPerWeight(const nlohmann::json& layers) {
  if (!layers.is_object()) return Malformed("layers", "an object keyed by module", layers);
  BitsPerWeightSummary s;
  std::vector<ModuleBits> all;
  bool shapes_known = true;
  for (const auto& [name, entry] : layers.items()) {
    QF_ASSIGN_OR_RETURN(ModuleBits b, ModuleBitsPerWeight(entry, absl::StrCat("layers[\"", name, "\"]")));
    if (b.weights == 0) shapes_known = false;
    all.push_back(b);
  }
  s.modules = static_cast<int64_t>(all.size());
  auto mean = [&](auto pick) -> std::optional<double> {
    double num = 0, den = 0;
    for (const ModuleBits& b : all) {
      std::optional<double> v = pick(b);
      if (!v) return std::nullopt;  // a mean over some modules only would mislead
      const double w = shapes_known ? static_cast<double>(b.weights) : 1.0;
      num += *v * w;
      den += w;
    }
    if (den <= 0) return std::nullopt;
    return num / den;
  };
  s.nominal = mean([](const ModuleBits& b) { return b.nominal; });
  s.stored = mean([](const ModuleBits& b) { return b.stored; });
  if (shapes_known) {
    for (const ModuleBits& b : all) s.weights += b.weights;
  }
  return s;
}

nlohmann::json EvaluationReportDocument(const std::string& model_uri,
                                        const std::string& reference_uri,
                                        const nlohmann::json& quality,
                                        const std::string& quality_gate,
                                        const std::string& job_id,
                                        const std::string& created_at) {
  nlohmann::json doc = {{"model", model_uri}, {"quality", quality}};
  if (!reference_uri.empty()) doc["reference"] = reference_uri;
  if (!quality_gate.empty()) doc["quality_gate"] = quality_gate;
  if (!job_id.empty()) doc["job_id"] = job_id;
  if (!created_at.empty()) doc["created_at"] = created_at;
  return doc;
}

absl::StatusOr<std::string> RenderQualityReportHtml(const nlohmann::json& document) {
  QF_ASSIGN_OR_RETURN(Report report, ReadReport(document));
  return RenderPage(report);
}

}  // namespace qforge

#include "job/spec.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>
#include <system_error>
#include <utility>
#include <variant>

#include "absl/strings/str_cat.h"
#include "common/uri.h"
#include "google/protobuf/util/json_util.h"
#include "quant/cuda/memory_estimates.h"
#include "quant/vptq_pack.h"
#include "common/status_bridge.h"

namespace qforge {
namespace {

absl::Status FieldError(std::string_view field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(std::string(field), ": ", what));
}

std::string Quoted(std::string_view s) {
  constexpr size_t kShown = 200;
  if (s.size() <= kShown) return absl::StrCat("'", std::string(s), "'");
  return absl::StrCat("'", std::string(s.substr(0, kShown)), "...' (", s.size(), " bytes)");
}

std::string FormatDouble(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

absl::Status CheckString(std::string_view field, std::string_view value, bool required) {
  if (value.empty()) {
    if (required) return FieldError(field, "required");
    return absl::OkStatus();
  }
  if (value.size() > kMaxSpecStringBytes) {
    return FieldError(field, absl::StrCat(value.size(), " bytes is longer than the limit of ",
                                          kMaxSpecStringBytes));
  }
  for (char c : value) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return FieldError(field, absl::StrCat(Quoted(value), " contains a control character"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckPatterns(std::string_view field,
                           const google::protobuf::RepeatedPtrField<std::string>& patterns) {
  if (patterns.size() > kMaxSpecPatterns) {
    return FieldError(field, absl::StrCat(patterns.size(), " patterns; at most ",
                                          kMaxSpecPatterns, " are accepted"));
  }
  for (int i = 0; i < patterns.size(); ++i) {
    const std::string name = absl::StrCat(std::string(field), "[", i, "]");
    const std::string& p = patterns[i];
    if (p.empty()) return FieldError(name, "empty pattern");
    if (absl::Status s = CheckString(name, p, true); !s.ok()) return s;
    QF_RETURN_IF_ERROR(CheckLayerPattern(name, p));  // RE2: linear-time matching
  }
  return absl::OkStatus();
}

// The local path of a file:// URI or plain path; "" for other schemes.
bool LocalPath(std::string_view uri, std::string* path) {
  const size_t scheme_end = uri.find("://");
  if (scheme_end == std::string_view::npos) {
    *path = std::string(uri);
    return true;
  }
  if (uri.substr(0, scheme_end) != "file") return false;
  std::string_view rest = uri.substr(scheme_end + 3);
  if (rest.substr(0, 9) == "localhost") rest.remove_prefix(9);
  *path = std::string(rest);
  return true;
}

// Absolute, normalized, with symlinks of the existing part resolved.
std::filesystem::path Resolve(const std::string& p) {
  std::error_code ec;
  std::filesystem::path abs = std::filesystem::absolute(p, ec);
  if (ec) abs = std::filesystem::path(p);
  std::filesystem::path canon = std::filesystem::weakly_canonical(abs, ec);
  if (ec) canon = abs.lexically_normal();
  std::string s = canon.lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return std::filesystem::path(s);
}

bool Under(const std::filesystem::path& p, const std::filesystem::path& root) {
  const std::string ps = p.string(), rs = root.string();
  if (rs == "/") return !ps.empty() && ps.front() == '/';
  if (ps == rs) return true;
  return ps.size() > rs.size() && ps.compare(0, rs.size(), rs) == 0 && ps[rs.size()] == '/';
}

// log2(x) when x is a power of two >= 1, else -1.
int ExactLog2(int64_t x) {
  if (x < 1 || (x & (x - 1)) != 0) return -1;
  int b = 0;
  while ((int64_t{1} << b) < x) ++b;
  return b;
}

absl::Status CheckDamp(std::string_view field, double damp) {
  if (!std::isfinite(damp) || damp < 0 || damp > 1) {
    return FieldError(field, absl::StrCat(FormatDouble(damp), " is not in (0, 1]"));
  }
  return absl::OkStatus();
}

// GPTQ parameters: defaults, ranges, the options of the core.
absl::Status ConvertGptq(v1::JobSpec& spec, JobConfig& c) {
  if (spec.has_vptq()) {
    return FieldError("spec.vptq", "set, but the method is GPTQ (use spec.gptq)");
  }
  v1::GptqSpec& g = *spec.mutable_gptq();
  if (g.bits() == 0) g.set_bits(kDefaultGptqBits);
  if (g.bits() != 2 && g.bits() != 3 && g.bits() != 4 && g.bits() != 8) {
    return FieldError("spec.gptq.bits", absl::StrCat(g.bits(), " is not one of 2, 3, 4, 8"));
  }
  if (g.group_size() == 0) g.set_group_size(kDefaultGptqGroupSize);
  if (g.group_size() != -1 && g.group_size() < 1) {
    return FieldError("spec.gptq.group_size",
                      absl::StrCat(g.group_size(), " is neither -1 (per channel) nor >= 1"));
  }
  if (g.damp_percent() == 0) g.set_damp_percent(kDefaultGptqDampPercent);
  QF_RETURN_IF_ERROR(CheckDamp("spec.gptq.damp_percent", g.damp_percent()));
  if (g.checkpoint_format().empty()) {
    g.set_checkpoint_format(quant::CheckpointFormatName(quant::GptqCheckpointFormat::kV1));
  }
  auto format = quant::ParseCheckpointFormat(g.checkpoint_format());
  if (!format.ok()) {
    return FieldError("spec.gptq.checkpoint_format",
                      absl::StrCat(Quoted(g.checkpoint_format()),
                                   " is not one of \"gptq\", \"gptq_v2\""));
  }
  quant::GptqLayerOptions o;
  o.format = *format;
  o.solver.bits = g.bits();
  o.solver.group_size = g.group_size();
  o.solver.sym = !g.asym();
  o.solver.act_order = g.desc_act();
  o.solver.static_groups = g.static_groups();
  o.solver.damp_percent = g.damp_percent();
  o.solver.mse = g.mse();
  // v1 cannot store a zero point of 0; the solver keeps zero >= 1 for it (asym only matters).
  o.solver.v1_zero_compat = o.format == quant::GptqCheckpointFormat::kV1;
  c.quantize = std::move(o);
  return absl::OkStatus();
}

// VPTQ parameters: defaults, the `vptq` kernels' limits that need no layer shape, the options
// of the core.
absl::Status ConvertVptq(v1::JobSpec& spec, JobConfig& c) {
  if (spec.has_gptq()) {
    return FieldError("spec.gptq", "set, but the method is VPTQ (use spec.vptq)");
  }
  v1::VptqSpec& v = *spec.mutable_vptq();
  if (v.vector_len() == 0) v.set_vector_len(kDefaultVptqVectorLen);
  if (!quant::VptqVectorLenSupported(v.vector_len())) {
    return FieldError("spec.vptq.vector_len",
                      absl::StrCat(v.vector_len(), " is not one of 2, 4, 6, 8, 10, 12, 16 (the "
                                                   "vector lengths the vptq kernels support)"));
  }
  if (v.num_centroids() == 0) v.set_num_centroids(kDefaultVptqCentroids);
  if (int b = ExactLog2(v.num_centroids()); b < 0 || !quant::VptqIndexBitsSupported(b)) {
    return FieldError("spec.vptq.num_centroids",
                      absl::StrCat(v.num_centroids(),
                                   " is not 2^b with b in {4, 8, 10, 12, 13, 14, 15, 16} (the "
                                   "index widths the vptq kernels support), e.g. 4096 or 65536"));
  }
  if (v.num_res_centroids() != 0) {
    const int b = ExactLog2(v.num_res_centroids());
    if (b < 0 || b == 0 || !quant::VptqResidualBitsSupported(b)) {
      return FieldError("spec.vptq.num_res_centroids",
                        absl::StrCat(v.num_res_centroids(),
                                     " is neither 0 (no residual) nor 2^b with b in {2..12, 15, "
                                     "16}, e.g. 256 or 4096"));
    }
  }
  if (v.num_res_centroids() > v.num_centroids()) {
    return FieldError("spec.vptq.num_res_centroids",
                      absl::StrCat(v.num_res_centroids(), " is larger than num_centroids ",
                                   v.num_centroids(),
                                   ": the vptq package's torch dequant reads residual indices "
                                   "with the index bits of num_centroids, so residual entries >= ",
                                   v.num_centroids(), " would decode wrongly"));
  }
  if (v.outlier_size() < 0) {
    return FieldError("spec.vptq.outlier_size", absl::StrCat(v.outlier_size(), " is negative"));
  }
  if (v.outlier_size() > 0) {
    const bool defaulted = v.outlier_vector_len() == 0;
    if (defaulted) v.set_outlier_vector_len(quant::kVptqOutlierVectorLen);
    if (v.outlier_vector_len() != quant::kVptqOutlierVectorLen) {
      return FieldError("spec.vptq.outlier_vector_len",
                        absl::StrCat(v.outlier_vector_len(),
                                     " is not 4 (the only outlier vector length the vptq "
                                     "package's small-batch CUDA GEMV kernel takes; 0 means 4)"));
    }
    if (!quant::VptqOutlierVectorLenSupported(v.outlier_vector_len(), v.vector_len())) {
      return FieldError(
          "spec.vptq.vector_len",
          absl::StrCat(v.vector_len(), " is not a multiple of outlier_vector_len ",
                       v.outlier_vector_len(), defaulted ? " (the default)" : "",
                       ", but outlier_size is ", v.outlier_size(),
                       ": the vptq CUDA kernels fill vector_len / outlier_vector_len outlier "
                       "sub-vectors per vector; use vector_len 4, 8, 12 or 16 with outliers, or "
                       "outlier_size 0"));
    }
    if (v.outlier_centroids() == 0) v.set_outlier_centroids(v.num_centroids());
    if (v.outlier_centroids() < 1 || v.outlier_centroids() > quant::kVptqMaxOutlierCentroids) {
      return FieldError("spec.vptq.outlier_centroids",
                        absl::StrCat(v.outlier_centroids(), " is not in 1..",
                                     quant::kVptqMaxOutlierCentroids,
                                     " (outlier indices are stored as 16-bit integers)"));
    }
  } else if (v.outlier_vector_len() != 0 || v.outlier_centroids() != 0) {
    return FieldError(v.outlier_vector_len() != 0 ? "spec.vptq.outlier_vector_len"
                                                  : "spec.vptq.outlier_centroids",
                      "set, but outlier_size is 0 (no outlier columns)");
  }
  if (v.group_num() == 0) v.set_group_num(1);
  if (v.group_num() < 1) {
    return FieldError("spec.vptq.group_num", absl::StrCat(v.group_num(), " is not >= 1"));
  }
  if (v.group_num() > 1 && v.num_centroids() > quant::kVptqMaxCentroidsWithGroups) {
    return FieldError("spec.vptq.group_num",
                      absl::StrCat(v.group_num(), " groups need num_centroids <= ",
                                   quant::kVptqMaxCentroidsWithGroups,
                                   " (the vptq dequantization kernel's limit), not ",
                                   v.num_centroids()));
  }
  if (!v.has_enable_norm()) v.set_enable_norm(true);
  if (!v.has_enable_perm()) v.set_enable_perm(true);
  if (v.kmeans_iters() == 0) v.set_kmeans_iters(kDefaultVptqKMeansIters);
  if (v.kmeans_iters() < 1 || v.kmeans_iters() > kMaxVptqKMeansIters) {
    return FieldError("spec.vptq.kmeans_iters",
                      absl::StrCat(v.kmeans_iters(), " is not in 1..", kMaxVptqKMeansIters));
  }
  if (v.damp_percent() == 0) v.set_damp_percent(kDefaultVptqDampPercent);
  QF_RETURN_IF_ERROR(CheckDamp("spec.vptq.damp_percent", v.damp_percent()));

  quant::VptqLayerOptions layer_options;
  quant::VptqOptions& o = layer_options.solver;
  o.vector_len = v.vector_len();
  o.num_centroids = v.num_centroids();
  o.num_res_centroids = v.num_res_centroids();
  o.outlier_size = v.outlier_size();
  if (v.outlier_size() > 0) {
    o.outlier_vector_len = v.outlier_vector_len();
    o.outlier_num_centroids = v.outlier_centroids();
  }
  o.group_num = v.group_num();
  o.enable_norm = v.enable_norm();
  o.enable_perm = v.enable_perm();
  o.kmeans_iterations = v.kmeans_iters();
  o.kmeans_seed = v.seed();
  o.damp_percent = v.damp_percent();
  c.quantize = std::move(layer_options);
  return absl::OkStatus();
}

// calibration.samples, seq_len, shard_samples (>= 0, 0 = default) and no_cache: only with
// dataset_uri.
absl::Status ConvertCalibrationOptions(const v1::CalibrationSpec& cal, JobConfig& c) {
  const bool dataset = cal.source_case() == v1::CalibrationSpec::kDatasetUri;
  const struct {
    const char* field;
    int64_t value;
    const char* flag;
  } counts[] = {{"spec.calibration.samples", cal.samples(), "--calib-samples"},
                {"spec.calibration.seq_len", cal.seq_len(), "--calib-seq-len"},
                {"spec.calibration.shard_samples", cal.shard_samples(), "--calib-shard-samples"}};
  for (const auto& f : counts) {
    if (f.value < 0) {
      return FieldError(f.field, absl::StrCat(f.value, " is negative (0 means the default)"));
    }
    if (f.value != 0 && !dataset) {
      return FieldError(f.field, absl::StrCat(f.value, " (", f.flag,
                                              ") applies only to calibration from token data "
                                              "(dataset_uri, --calibration DATA)"));
    }
  }
  if (cal.no_cache() && !dataset) {
    return FieldError("spec.calibration.no_cache",
                      "set, but there is nothing to cache without dataset_uri (--calibration "
                      "DATA)");
  }
  if (dataset) {
    c.calibration.samples = cal.samples();
    c.calibration.seq_len = cal.seq_len();
    c.calibration.shard_samples = cal.shard_samples();
    c.calibration.no_cache = cal.no_cache();
  }
  return absl::OkStatus();
}

// A token-data URI of the spec: required, a valid object URI, allowed by the roots.
absl::Status CheckDataUri(std::string_view field, const std::string& uri) {
  QF_RETURN_IF_ERROR(CheckString(field, uri, true));
  auto split = SplitObjectUri(uri);
  if (!split.ok()) return FieldError(field, std::string(split.status().message()));
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckUriAllowed(std::string_view uri, const std::vector<std::string>& roots,
                             std::string_view field) {
  std::vector<std::filesystem::path> resolved;
  for (const std::string& r : roots) {
    if (r.empty()) continue;
    std::string local;
    if (!LocalPath(r, &local)) continue;
    resolved.push_back(Resolve(local));
  }
  if (resolved.empty()) return absl::OkStatus();
  std::string local;
  if (!LocalPath(uri, &local)) return absl::OkStatus();
  if (local.empty()) return FieldError(field, absl::StrCat(Quoted(uri), " has no path"));
  const std::filesystem::path p = Resolve(local);
  for (const auto& root : resolved) {
    if (Under(p, root)) return absl::OkStatus();
  }
  std::string allowed;
  for (const auto& root : resolved) {
    absl::StrAppend(&allowed, allowed.empty() ? "" : ", ", root.string());
  }
  return FieldError(field, absl::StrCat(Quoted(uri), " (", p.string(),
                                        ") is outside the allowed file roots (", allowed, ")"));
}

namespace {

// hessians_uri may also lie in the coordinator's Hessian cache.
absl::Status CheckHessiansAllowed(const std::string& uri, const SpecOptions& options) {
  absl::Status s =
      CheckUriAllowed(uri, options.allowed_file_roots, "spec.calibration.hessians_uri");
  if (s.ok() || options.allowed_hessian_roots.empty()) return s;
  if (CheckUriAllowed(uri, options.allowed_hessian_roots, "spec.calibration.hessians_uri").ok()) {
    return absl::OkStatus();
  }
  return s;
}

// evaluation: see ConvertJobSpec.
absl::Status ConvertEvaluation(const v1::EvaluationSpec& e, const SpecOptions& options,
                               JobConfig& c) {
  const bool on = !e.dataset_uri().empty();
  const struct {
    const char* field;
    int64_t value;
    const char* flag;
  } counts[] = {{"spec.evaluation.samples", e.samples(), "--eval-samples"},
                {"spec.evaluation.seq_len", e.seq_len(), "--eval-seq-len"},
                {"spec.evaluation.shard_samples", e.shard_samples(), "--eval-shard-samples"}};
  for (const auto& f : counts) {
    if (f.value < 0) {
      return FieldError(f.field, absl::StrCat(f.value, " is negative (0 means the default)"));
    }
    if (f.value != 0 && !on) {
      return FieldError(f.field, absl::StrCat(f.value, " (", f.flag,
                                              ") applies only with evaluation data "
                                              "(evaluation.dataset_uri, --eval DATA)"));
    }
  }
  const struct {
    const char* field;
    bool set;
    double value;
    const char* flag;
  } thresholds[] = {{"spec.evaluation.max_ppl_increase_pct", e.has_max_ppl_increase_pct(),
                     e.max_ppl_increase_pct(), "--max-ppl-increase"},
                    {"spec.evaluation.max_kl", e.has_max_kl(), e.max_kl(), "--max-kld"}};
  for (const auto& t : thresholds) {
    if (!t.set) continue;
    if (!std::isfinite(t.value) || t.value < 0) {
      return FieldError(t.field, absl::StrCat(FormatDouble(t.value),
                                              " is not a finite number >= 0 (", t.flag, ")"));
    }
    if (!on) {
      return FieldError(t.field, absl::StrCat("set (", t.flag,
                                              "), but there is no evaluation to gate: give "
                                              "evaluation data (--eval DATA)"));
    }
  }
  if (e.allow_calibration_data() && !on) {
    return FieldError("spec.evaluation.allow_calibration_data",
                      "set, but there is no evaluation data (--eval DATA)");
  }
  if (!on) return absl::OkStatus();
  QF_RETURN_IF_ERROR(CheckDataUri("spec.evaluation.dataset_uri", e.dataset_uri()));
  QF_RETURN_IF_ERROR(CheckUriAllowed(e.dataset_uri(), options.allowed_file_roots,
                                     "spec.evaluation.dataset_uri"));
  EvaluationConfig& ev = c.evaluation;
  ev.dataset_uri = e.dataset_uri();
  ev.samples = e.samples();
  ev.seq_len = e.seq_len();
  ev.shard_samples = e.shard_samples();
  ev.allow_calibration_data = e.allow_calibration_data();
  if (e.has_max_ppl_increase_pct()) ev.max_ppl_increase_pct = e.max_ppl_increase_pct();
  if (e.has_max_kl()) ev.max_kl = e.max_kl();
  return absl::OkStatus();
}

// An evaluation-only job (reference_model_uri set): nothing to quantize.
absl::Status CheckEvaluationOnly(const v1::JobSpec& spec) {
  constexpr char kWhy[] = "an evaluation-only job (reference_model_uri, `qforge eval`) "
                          "quantizes nothing";
  if (spec.method() != v1::METHOD_UNSPECIFIED) {
    return FieldError("spec.method", absl::StrCat(v1::Method_Name(spec.method()), " is set, but ",
                                                  kWhy, "; leave it unset"));
  }
  if (spec.has_gptq()) return FieldError("spec.gptq", absl::StrCat("set, but ", kWhy));
  if (spec.has_vptq()) return FieldError("spec.vptq", absl::StrCat("set, but ", kWhy));
  if (spec.has_calibration()) {
    return FieldError("spec.calibration", absl::StrCat("set, but ", kWhy));
  }
  if (!spec.include().empty()) return FieldError("spec.include", absl::StrCat("set, but ", kWhy));
  if (!spec.exclude().empty()) return FieldError("spec.exclude", absl::StrCat("set, but ", kWhy));
  if (spec.max_shard_bytes() != 0) {
    return FieldError("spec.max_shard_bytes", absl::StrCat("set, but ", kWhy));
  }
  if (spec.evaluation().dataset_uri().empty()) {
    return FieldError("spec.evaluation.dataset_uri",
                      "required for an evaluation-only job (--eval DATA: token data in the "
                      "calibration formats)");
  }
  return absl::OkStatus();
}

}  // namespace

std::string ChildUri(std::string_view uri, std::string_view name) {
  std::string_view base = uri, query;
  const size_t q = uri.find('?');
  if (q != std::string_view::npos) {
    base = uri.substr(0, q);
    query = uri.substr(q);
  }
  std::string out(base);
  if (out.empty() || out.back() != '/') out.push_back('/');
  out.append(name);
  out.append(query);
  return out;
}

namespace {
absl::Status ConvertQuantization(v1::JobSpec& spec, const SpecOptions& options, JobConfig& c);

// Every local path of the spec made absolute against this process's working directory
// (AbsoluteLocalUri), once, at conversion: a worker started elsewhere then names the same
// files. A normalized spec is already absolute, so converting it again changes nothing.
absl::Status AbsolutizeSpecUris(v1::JobSpec& spec) {
  const auto fix = [](const std::string& uri, auto set) -> absl::Status {
    if (uri.empty()) return absl::OkStatus();
    QF_ASSIGN_OR_RETURN(std::string abs, AbsoluteLocalUri(uri));
    if (abs != uri) set(std::move(abs));
    return absl::OkStatus();
  };
  QF_RETURN_IF_ERROR(fix(spec.model_uri(), [&](std::string u) { spec.set_model_uri(u); }));
  QF_RETURN_IF_ERROR(fix(spec.output_uri(), [&](std::string u) { spec.set_output_uri(u); }));
  QF_RETURN_IF_ERROR(fix(spec.reference_model_uri(),
                         [&](std::string u) { spec.set_reference_model_uri(u); }));
  if (spec.has_calibration()) {
    v1::CalibrationSpec* cal = spec.mutable_calibration();
    if (cal->source_case() == v1::CalibrationSpec::kHessiansUri) {
      QF_RETURN_IF_ERROR(fix(cal->hessians_uri(), [&](std::string u) { cal->set_hessians_uri(u); }));
    } else if (cal->source_case() == v1::CalibrationSpec::kDatasetUri) {
      QF_RETURN_IF_ERROR(fix(cal->dataset_uri(), [&](std::string u) { cal->set_dataset_uri(u); }));
    }
  }
  if (spec.has_evaluation()) {
    v1::EvaluationSpec* ev = spec.mutable_evaluation();
    QF_RETURN_IF_ERROR(fix(ev->dataset_uri(), [&](std::string u) { ev->set_dataset_uri(u); }));
  }
  return absl::OkStatus();
}
absl::Status ConvertScheduling(v1::JobSpec& spec, const SpecOptions& options, JobConfig& c);
}  // namespace

absl::StatusOr<JobConfig> ConvertJobSpec(const v1::JobSpec& in, const SpecOptions& options) {
  JobConfig c;
  c.spec = in;
  v1::JobSpec& spec = c.spec;
  const bool evaluation_only = !spec.reference_model_uri().empty();
  QF_RETURN_IF_ERROR(AbsolutizeSpecUris(spec));

  // Where the data is.
  if (absl::Status s = CheckString("spec.model_uri", spec.model_uri(), true); !s.ok()) return s;
  if (absl::Status s = CheckUriAllowed(spec.model_uri(), options.allowed_file_roots,
                                       "spec.model_uri");
      !s.ok()) {
    return s;
  }
  // An evaluation-only job writes nothing but (optionally) its report.
  if (absl::Status s = CheckString("spec.output_uri", spec.output_uri(), !evaluation_only);
      !s.ok()) {
    return s;
  }
  if (!spec.output_uri().empty()) {
    QF_RETURN_IF_ERROR(CheckUriAllowed(spec.output_uri(), options.allowed_file_roots,
                                       "spec.output_uri"));
  }
  QF_RETURN_IF_ERROR(ConvertEvaluation(spec.evaluation(), options, c));

  if (evaluation_only) {
    QF_RETURN_IF_ERROR(CheckString("spec.reference_model_uri", spec.reference_model_uri(), true));
    QF_RETURN_IF_ERROR(CheckUriAllowed(spec.reference_model_uri(), options.allowed_file_roots,
                                       "spec.reference_model_uri"));
    QF_RETURN_IF_ERROR(CheckEvaluationOnly(spec));
    c.reference_model_uri = spec.reference_model_uri();
  } else {
    QF_RETURN_IF_ERROR(ConvertQuantization(spec, options, c));
  }
  QF_RETURN_IF_ERROR(ConvertScheduling(spec, options, c));
  return c;
}

namespace {

absl::Status ConvertQuantization(v1::JobSpec& spec, const SpecOptions& options, JobConfig& c) {
  // Method and its parameters.
  switch (spec.method()) {
    case v1::METHOD_UNSPECIFIED:
      spec.set_method(v1::METHOD_GPTQ);
      QF_RETURN_IF_ERROR(ConvertGptq(spec, c));
      break;
    case v1::METHOD_GPTQ:
      QF_RETURN_IF_ERROR(ConvertGptq(spec, c));
      break;
    case v1::METHOD_VPTQ:
      QF_RETURN_IF_ERROR(ConvertVptq(spec, c));
      break;
    default:
      return FieldError("spec.method", absl::StrCat(static_cast<int>(spec.method()),
                                                    " is not a known method (GPTQ, VPTQ)"));
  }

  // Calibration.
  switch (spec.calibration().source_case()) {
    case v1::CalibrationSpec::kHessiansUri: {
      const std::string& uri = spec.calibration().hessians_uri();
      if (absl::Status s = CheckString("spec.calibration.hessians_uri", uri, true); !s.ok()) {
        return s;
      }
      auto split = SplitObjectUri(uri);
      if (!split.ok()) {
        return FieldError("spec.calibration.hessians_uri", std::string(split.status().message()));
      }
      if (absl::Status s = CheckHessiansAllowed(uri, options); !s.ok()) return s;
      c.hessians_uri = uri;
      break;
    }
    case v1::CalibrationSpec::kNone:
      if (!spec.calibration().none()) {
        return FieldError("spec.calibration.none",
                          "false; set it to true for identity Hessians (data-free), or give "
                          "hessians_uri");
      }
      c.identity_hessian = true;
      break;
    case v1::CalibrationSpec::kDatasetUri: {
      const std::string& uri = spec.calibration().dataset_uri();
      if (absl::Status s = CheckString("spec.calibration.dataset_uri", uri, true); !s.ok()) {
        return s;
      }
      auto split = SplitObjectUri(uri);
      if (!split.ok()) {
        return FieldError("spec.calibration.dataset_uri", std::string(split.status().message()));
      }
      if (absl::Status s = CheckUriAllowed(uri, options.allowed_file_roots,
                                           "spec.calibration.dataset_uri");
          !s.ok()) {
        return s;
      }
      c.calibration.dataset_uri = uri;
      break;
    }
    case v1::CalibrationSpec::SOURCE_NOT_SET:
      return FieldError("spec.calibration",
                        "required: dataset_uri (token data to calibrate with), hessians_uri "
                        "(precomputed Hessians), or none = true for identity Hessians "
                        "(data-free)");
  }
  QF_RETURN_IF_ERROR(ConvertCalibrationOptions(spec.calibration(), c));

  // Layer selection.
  if (absl::Status s = CheckPatterns("spec.include", spec.include()); !s.ok()) return s;
  if (absl::Status s = CheckPatterns("spec.exclude", spec.exclude()); !s.ok()) return s;
  if (spec.include().empty()) spec.add_include(kDefaultLayerInclude);
  c.selection.include.assign(spec.include().begin(), spec.include().end());
  c.selection.exclude.assign(spec.exclude().begin(), spec.exclude().end());
  return absl::OkStatus();
}

absl::Status ConvertScheduling(v1::JobSpec& spec, const SpecOptions& options, JobConfig& c) {
  // Scheduling and output.
  if (spec.max_attempts() == 0) {
    spec.set_max_attempts(options.default_max_attempts > 0 ? options.default_max_attempts : 4);
  }
  if (spec.max_attempts() < 1 || spec.max_attempts() > kMaxTaskAttempts) {
    return FieldError("spec.max_attempts", absl::StrCat(spec.max_attempts(), " is not in 1..",
                                                        kMaxTaskAttempts));
  }
  c.max_attempts = spec.max_attempts();
  if (spec.max_shard_bytes() == 0 && !c.evaluation_only()) {
    spec.set_max_shard_bytes(kDefaultMaxShardBytes);
  }
  c.max_shard_bytes = spec.max_shard_bytes();

  if (spec.labels_size() > kMaxSpecLabels) {
    return FieldError("spec.labels", absl::StrCat(spec.labels_size(), " labels; at most ",
                                                  kMaxSpecLabels, " are accepted"));
  }
  for (const auto& [key, value] : spec.labels()) {
    if (key.empty()) return FieldError("spec.labels", "empty key");
    if (key.size() > 63) {
      return FieldError("spec.labels", absl::StrCat("key ", Quoted(key), " is longer than 63 bytes"));
    }
    if (absl::Status s = CheckString(absl::StrCat("spec.labels[", key, "]"), value, false);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// One callable over the alternatives of quant::QuantizeOptions (for std::visit): a method
// without its branch does not compile.
template <typename... Fs>
struct PerMethod : Fs... {
  using Fs::operator()...;
};
template <typename... Fs>
PerMethod(Fs...) -> PerMethod<Fs...>;

absl::Status ValidateVptqLayer(const quant::VptqOptions& options, std::string_view module,
                               int64_t out_features, int64_t in_features) {
  const std::string where =
      absl::StrCat("layer ", std::string(module), " [", out_features, ", ", in_features, "]: ");
  auto layer = quant::VptqConfigFromOptions(options, out_features, in_features,
                                            /*bias=*/false);
  if (!layer.ok()) {
    return FieldError("spec.vptq", absl::StrCat(where, layer.status().message()));
  }
  if (qforge::Status s = quant::ValidateVptqLayerConfig(*layer); !s.ok()) {
    return FieldError("spec.vptq", absl::StrCat(where, s.message()));
  }
  return absl::OkStatus();
}

absl::Status ValidateGptqLayer(const quant::GptqOptions& options, std::string_view module,
                               int64_t out_features, int64_t in_features) {
  const std::string shape = absl::StrCat("[", out_features, ", ", in_features, "]");
  const int bits = options.bits;
  if (qforge::Status s = quant::CheckGptqPackable(bits, out_features, in_features); !s.ok()) {
    return FieldError("spec.gptq.bits",
                      absl::StrCat("layer ", std::string(module), " ", shape,
                                   " cannot be stored with ", bits, " bits: ", s.message()));
  }
  const int group = options.group_size;
  if (group > 0 && group > in_features) {
    return FieldError("spec.gptq.group_size",
                      absl::StrCat(group, " is larger than in_features ", in_features,
                                   " of layer ", std::string(module),
                                   " (use -1 for one group per channel)"));
  }
  if (group > 0 && in_features % group != 0) {
    return FieldError("spec.gptq.group_size",
                      absl::StrCat(group, " does not divide in_features ", in_features,
                                   " of layer ", std::string(module),
                                   " (GPTQ loaders such as vLLM require it; use a divisor or -1)"));
  }
  if (qforge::Status s = quant::ValidateGptqOptions(options, out_features, in_features);
      !s.ok()) {
    return FieldError("spec.gptq",
                      absl::StrCat("layer ", std::string(module), " ", shape, ": ", s.message()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateLayerForSpec(const JobConfig& config, std::string_view module,
                                  int64_t out_features, int64_t in_features) {
  return std::visit(PerMethod{[&](const quant::GptqLayerOptions& o) {
                                return ValidateGptqLayer(o.solver, module, out_features,
                                                         in_features);
                              },
                              [&](const quant::VptqLayerOptions& o) {
                                return ValidateVptqLayer(o.solver, module, out_features,
                                                         in_features);
                              }},
                    config.quantize);
}

uint64_t TaskMemoryBytes(const JobConfig& config, int64_t out_features, int64_t in_features,
                         double cpu_factor) {
  const double m = static_cast<double>(std::max<int64_t>(out_features, 0));
  const double n = static_cast<double>(std::max<int64_t>(in_features, 0));
  // W and H and the solver's working copies, plus what the method keeps beside them.
  const double solver_bytes = 4.0 * (m * n + n * n) * std::max(1.0, cpu_factor);
  const double method_bytes = std::visit(
      PerMethod{[&](const quant::GptqLayerOptions&) { return 0.0; },
                [&](const quant::VptqLayerOptions& v) {
                  const quant::VptqOptions& o = v.solver;
                  const double k = static_cast<double>(o.num_centroids + o.num_res_centroids);
                  const double codebooks = 4.0 * std::max(1, o.group_num) * k * (o.vector_len + 4);
                  const double indices = 8.0 * m * n / std::max(1, o.vector_len);  // main + res
                  return codebooks + indices + 4.0 * m * n;  // + the dequantized copy
                }},
      config.quantize);
  return static_cast<uint64_t>(solver_bytes + method_bytes);
}

uint64_t GpuTaskMemoryBytes(const JobConfig& config, int64_t out_features, int64_t in_features) {
  return std::visit(PerMethod{[&](const quant::GptqLayerOptions& o) {
                                return quant::CudaGptqMemoryBytes(out_features, in_features,
                                                                  o.solver);
                              },
                              [&](const quant::VptqLayerOptions& o) {
                                return quant::CudaVptqMemoryBytes(out_features, in_features,
                                                                  o.solver);
                              }},
                    config.quantize);
}

GptqQuantizeConfig QuantizeConfigForSpec(const JobConfig& config) {
  GptqQuantizeConfig q;
  const auto* gptq = std::get_if<quant::GptqLayerOptions>(&config.quantize);
  if (gptq == nullptr) return q;
  q.bits = gptq->solver.bits;
  q.group_size = gptq->solver.group_size;
  q.desc_act = gptq->solver.act_order;
  q.sym = gptq->solver.sym;
  q.damp_percent = gptq->solver.damp_percent;
  q.static_groups = gptq->solver.static_groups;
  // Every layer is solved independently, from the original model's Hessians.
  q.true_sequential = false;
  q.format = gptq->format;
  return q;
}

nlohmann::json CalibrationInfoToJson(const v1::CalibrationInfo& info) {
  return nlohmann::json{{"dataset_uri", info.dataset_uri()},
                        {"dataset_sha256", info.dataset_sha256()},
                        {"samples", info.samples()},
                        {"seq_len", info.seq_len()},
                        {"tokens", info.tokens()},
                        {"packed", info.packed()},
                        {"shards", info.shards()},
                        {"cache_hit", info.cache_hit()},
                        {"hessians_uri", info.hessians_uri()},
                        {"model_fingerprint", info.model_fingerprint()},
                        {"seconds", info.seconds()}};
}

nlohmann::json JobSpecToJson(const v1::JobSpec& spec) {
  std::string text;
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(spec, &text, opts).ok()) {
    return nlohmann::json::object();
  }
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  return j.is_discarded() ? nlohmann::json::object() : j;
}

}  // namespace qforge

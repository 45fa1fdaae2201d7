#include "server/planner.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/hessian_file.h"
#include "common/safetensors.h"
#include "common/uri.h"
#include "job/calibration.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "job/evaluation.h"
#include "job/staged_layer.h"
#include "job/layer_selection.h"
#include "job/staging_layout.h"
#include "quant/cuda/memory_estimates.h"
#include "server/file_uri_access.h"
#include "server/scheduler.h"

namespace qforge {
namespace {

// Prefixes a status's message with the spec field it concerns; transient store errors keep
// their code (a retry may succeed), everything else becomes INVALID_ARGUMENT.
absl::Status FieldStatus(std::string_view field, const absl::Status& s,
                         std::string_view context = "") {
  std::string msg = absl::StrCat(std::string(field), ": ", std::string(context),
                                 std::string(s.message()));
  if (s.code() == absl::StatusCode::kUnavailable ||
      s.code() == absl::StatusCode::kDeadlineExceeded) {
    return absl::Status(s.code(), msg);
  }
  return absl::InvalidArgumentError(msg);
}

bool Transient(const absl::Status& s) {
  return s.code() == absl::StatusCode::kUnavailable ||
         s.code() == absl::StatusCode::kDeadlineExceeded;
}

// As FieldStatus, for errors of the job floor whose message may already name a spec field
// (then it is kept as it is).
absl::Status NamedFieldStatus(std::string_view field, const absl::Status& s,
                              std::string_view context = "") {
  if (!absl::StartsWith(s.message(), "spec.")) return FieldStatus(field, s, context);
  if (Transient(s)) return s;
  return absl::InvalidArgumentError(s.message());
}

// Every selected module has a Hessian of shape [in_features, in_features] in the file.
absl::Status CheckHessians(const StoreOpener& open_store, const std::string& hessians_uri,
                           const std::vector<PlannedLayer>& layers) {
  constexpr char kField[] = "spec.calibration.hessians_uri";
  auto split = SplitObjectUri(hessians_uri);
  if (!split.ok()) return FieldStatus(kField, split.status());
  auto store = open_store(split->store_uri);
  if (!store.ok()) return FieldStatus(kField, store.status());
  auto hessians = HessianFile::Open(**store, split->key);
  if (!hessians.ok()) {
    return FieldStatus(kField, hessians.status(),
                       absl::StrCat("cannot open the Hessian file ", hessians_uri, ": "));
  }
  for (const PlannedLayer& l : layers) {
    auto t = hessians->Find(l.module);
    if (!t.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          kField, ": ", hessians_uri, " has no Hessian for module '", l.module, "'"));
    }
    const std::vector<int64_t>& shape = (*t)->shape;
    if (shape.size() != 2 || shape[0] != l.in_features || shape[1] != l.in_features) {
      std::string dims;
      for (int64_t d : shape) absl::StrAppend(&dims, dims.empty() ? "" : ", ", d);
      return absl::InvalidArgumentError(absl::StrCat(
          kField, ": the Hessian of module '", l.module, "' in ", hessians_uri, " is [", dims,
          "], expected [", l.in_features, ", ", l.in_features, "] (in_features)"));
    }
  }
  return absl::OkStatus();
}

const std::vector<std::string>& WorkerBackends() {
  static const std::vector<std::string> kBackends = {"cpu", "cuda"};
  return kBackends;
}

// Every selected layer is a linear of a decoder layer whose input the forward pass knows,
// with the input's dimension.
absl::Status CheckDecoderLinears(const quant::DecoderConfig& config,
                                 const std::vector<PlannedLayer>& layers) {
  for (const PlannedLayer& l : layers) {
    std::optional<ModuleInput> in = DecoderModuleInput(l.module);
    if (!in.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spec.include: layer '", l.module,
          "' is not a linear of a decoder layer (model.layers.N.self_attn.{q,k,v,o}_proj, "
          "model.layers.N.mlp.{gate,up,down}_proj); calibration computes Hessians for those "
          "only: exclude it (--exclude) or give its Hessians with --hessians"));
    }
    if (in->layer >= config.num_hidden_layers) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spec.model_uri: layer '", l.module, "' lies beyond num_hidden_layers ",
          config.num_hidden_layers, " of config.json"));
    }
    const int64_t dim = quant::DecoderInputDim(config, in->input);
    if (l.in_features != dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spec.model_uri: layer '", l.module, "' has in_features ", l.in_features,
          " but config.json gives its input (", quant::DecoderInputName(in->input), ") ", dim,
          " features"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

int64_t ChooseShardSamples(int64_t samples, int64_t requested, int live_workers,
                           const std::function<bool(int64_t)>& fits) {
  samples = std::max<int64_t>(1, samples);
  if (requested > 0) return std::min(requested, samples);
  const int64_t workers = std::max(1, live_workers);
  int64_t chosen = (samples + workers - 1) / workers;
  if (fits && !fits(chosen)) {
    // The largest count that fits (fits is monotone: fewer samples, less memory).
    int64_t lo = 1, hi = chosen - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (fits(mid)) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    chosen = std::max<int64_t>(1, lo);
  }
  return chosen;
}

namespace {

// ChooseShardSamples with fits(n): a task of n samples (`task_of(n)`) fits every live
// worker that states a memory budget.
int64_t ShardSamplesForWorkers(int64_t samples, int64_t requested,
                               const std::vector<WorkerRecord>& live_workers,
                               const std::function<TaskRecord(int64_t)>& task_of) {
  std::vector<const WorkerRecord*> budgeted;
  for (const WorkerRecord& w : live_workers) {
    if (w.registration.memory_budget_bytes() != 0) budgeted.push_back(&w);
  }
  auto fits = [&](int64_t n) {
    const TaskRecord t = task_of(n);
    for (const WorkerRecord* w : budgeted) {
      if (Scheduler::MemoryNeeded(*w, t) > w->registration.memory_budget_bytes()) return false;
    }
    return true;
  };
  return ChooseShardSamples(samples, requested, static_cast<int>(live_workers.size()), fits);
}

// Dataset calibration (see the file comment): fills `plan` with the calibration info and,
// on a cache miss, the CALIBRATE and REDUCE tasks; QUANTIZE tasks are added by the caller
// (PENDING unless plan->calibration.cache_hit()).
absl::Status PlanCalibration(const StoreOpener& open_store, const std::string& cache_uri,
                             const JobConfig& config, ObjectStore& model_store,
                             const SafetensorsModel& model, const DecoderModelConfig& decoder,
                             const std::vector<PlannedLayer>& layers,
                             const std::vector<WorkerRecord>& live_workers, JobPlan* plan) {
  constexpr char kDataField[] = "spec.calibration.dataset_uri";
  const v1::JobSpec& spec = config.spec;
  const CalibrationConfig& cal = config.calibration;
  const quant::DecoderConfig& dc = decoder.decoder;
  QF_RETURN_IF_ERROR(CheckDecoderLinears(dc, layers));

  // The data, validated in full before any work.
  auto split = SplitObjectUri(cal.dataset_uri);
  if (!split.ok()) return FieldStatus(kDataField, split.status());
  auto data_store = open_store(split->store_uri);
  if (!data_store.ok()) return FieldStatus(kDataField, data_store.status());
  CalibrationDataOptions data_options;
  data_options.max_samples = cal.samples;
  data_options.seq_len = cal.seq_len;
  auto data = LoadCalibrationData(**data_store, split->key, data_options, dc, kDataField);
  if (!data.ok()) {
    return NamedFieldStatus(kDataField, data.status(),
                            absl::StrCat("cannot read ", cal.dataset_uri, ": "));
  }
  if (decoder.sliding_window > 0 && data->seq_len > decoder.sliding_window) {
    return absl::InvalidArgumentError(absl::StrCat(
        "spec.calibration.seq_len: ", data->seq_len, " tokens per sample is above the model's "
        "sliding_window ", decoder.sliding_window, " (", decoder.architecture,
        " attends that far back only; calibration runs full causal attention); give "
        "--calib-seq-len ", decoder.sliding_window, " or less"));
  }
  v1::CalibrationInfo& info = plan->calibration;
  info.set_dataset_uri(cal.dataset_uri);
  info.set_dataset_sha256(data->sha256);
  info.set_samples(data->samples);
  info.set_seq_len(data->seq_len);
  info.set_tokens(data->tokens);
  info.set_packed(data->packed);
  plan->dataset_calibration = true;

  QF_RETURN_IF_ERROR(CheckOutputEmpty(open_store, spec.output_uri()));

  // The cache entry of (model, data, samples, seq_len).
  auto fingerprint = ModelFingerprint(model_store, model);
  if (!fingerprint.ok()) {
    return FieldStatus("spec.model_uri", fingerprint.status(),
                       absl::StrCat("reading the model's shards for its fingerprint: "));
  }
  info.set_model_fingerprint(*fingerprint);
  plan->cache_key = HessianCacheEntryKey(*fingerprint, data->sha256, data->samples, data->seq_len);
  info.set_hessians_uri(ChildUri(cache_uri, plan->cache_key));
  // A cache directory that does not exist yet holds no entry (it is not created here).
  std::optional<absl::StatusOr<std::unique_ptr<ObjectStore>>> cache;
  if (!cal.no_cache) cache = open_store(cache_uri);
  if (cache.has_value() && !absl::IsNotFound(cache->status())) {
    if (!cache->ok()) {
      return absl::Status(cache->status().code(),
                          absl::StrCat("the coordinator's Hessian cache ", cache_uri, ": ",
                                       cache->status().message()));
    }
    absl::Status verified =
        VerifyHessianCacheEntry(***cache, plan->cache_key, dc, /*verify_data=*/false);
    if (verified.ok()) {
      info.set_cache_hit(true);
      return absl::OkStatus();
    }
    if (Transient(verified)) {
      return absl::Status(verified.code(),
                          absl::StrCat("the coordinator's Hessian cache ", cache_uri, ": ",
                                       verified.message()));
    }
    if (verified.code() != absl::StatusCode::kNotFound) {
      plan->cache_note = absl::StrCat("the cached Hessians ", info.hessians_uri(),
                                      " are unusable (", verified.message(),
                                      "); calibrating again");
    }
  }

  // CALIBRATE × shards, each within the smallest budget of the live workers.
  auto calibrate_task = [&](int64_t samples) {
    TaskRecord t;
    t.kind = v1::TASK_KIND_CALIBRATE;
    t.state = v1::TASK_STATE_QUEUED;
    t.memory_bytes =
        CalibrationTaskMemoryBytes(dc, samples, data->seq_len, kDefaultSpillAboveBytes);
    // A CUDA worker streams the shard's hidden states through the device (one ForwardLayer
    // call per layer over the shard's samples).
    t.gpu_memory_bytes = quant::CudaDecoderForwardMemoryBytes(dc, samples, data->seq_len);
    t.backends = WorkerBackends();
    return t;
  };
  const int64_t shard_samples =
      ShardSamplesForWorkers(data->samples, cal.shard_samples, live_workers, calibrate_task);
  v1::CalibrationWork work;
  work.set_model_uri(spec.model_uri());
  work.set_dataset_uri(cal.dataset_uri);
  work.set_dataset_sha256(data->sha256);
  work.set_samples(data->samples);
  work.set_seq_len(data->seq_len);
  for (int64_t begin = 0; begin < data->samples; begin += shard_samples) {
    const int64_t end = std::min(data->samples, begin + shard_samples);
    TaskRecord t = calibrate_task(end - begin);
    t.calibration = work;
    t.calibration.set_sample_begin(begin);
    t.calibration.set_sample_end(end);
    plan->tasks.push_back(std::move(t));
    ++plan->shards;
  }
  info.set_shards(plan->shards);

  // One REDUCE: one float64 [dim, dim] sum and the tensor being added, for the largest input.
  int64_t max_dim = 0;
  for (int i = 0; i < quant::kNumDecoderInputs; ++i) {
    max_dim = std::max(max_dim, quant::DecoderInputDim(dc, static_cast<quant::DecoderInput>(i)));
  }
  TaskRecord reduce;
  reduce.kind = v1::TASK_KIND_REDUCE;
  reduce.state = v1::TASK_STATE_PENDING;
  reduce.memory_bytes = 2 * sizeof(double) * static_cast<uint64_t>(max_dim) *
                        static_cast<uint64_t>(max_dim);
  reduce.gpu_memory_bytes = 0;  // runs on the host
  reduce.backends = WorkerBackends();
  reduce.calibration = work;
  reduce.calibration.set_hessians_uri(cache_uri);
  reduce.calibration.set_hessians_key(plan->cache_key);
  plan->tasks.push_back(std::move(reduce));
  return absl::OkStatus();
}

// Evaluation (see the file comment): loads and validates the evaluation data against the
// reference model's `decoder`, refuses the calibration data, and adds EVALUATE × shards and
// the EVAL_REDUCE to plan->evaluation_tasks (EVALUATE QUEUED unless `after_assembly`, then
// PENDING until ASSEMBLE succeeded; EVAL_REDUCE PENDING until every shard succeeded).
absl::Status PlanEvaluation(const StoreOpener& open_store, const JobConfig& config,
                            const DecoderModelConfig& decoder, const std::string& candidate_uri,
                            bool after_assembly, const std::vector<WorkerRecord>& live_workers,
                            JobPlan* plan) {
  constexpr char kDataField[] = "spec.evaluation.dataset_uri";
  const EvaluationConfig& ev = config.evaluation;
  const quant::DecoderConfig& dc = decoder.decoder;
  auto split = SplitObjectUri(ev.dataset_uri);
  if (!split.ok()) return FieldStatus(kDataField, split.status());
  auto data_store = open_store(split->store_uri);
  if (!data_store.ok()) return FieldStatus(kDataField, data_store.status());
  CalibrationDataOptions data_options;
  data_options.max_samples = ev.samples;
  data_options.seq_len = ev.seq_len;
  auto data = LoadCalibrationData(**data_store, split->key, data_options, dc, kDataField);
  if (!data.ok()) {
    return NamedFieldStatus(kDataField, data.status(),
                            absl::StrCat("cannot read ", ev.dataset_uri, ": "));
  }
  if (decoder.sliding_window > 0 && data->seq_len > decoder.sliding_window) {
    return absl::InvalidArgumentError(absl::StrCat(
        "spec.evaluation.seq_len: ", data->seq_len, " tokens per sample is above the model's "
        "sliding_window ", decoder.sliding_window, " (", decoder.architecture,
        " attends that far back only; evaluation runs full causal attention); give "
        "--eval-seq-len ", decoder.sliding_window, " or less"));
  }
  if (plan->dataset_calibration && !ev.allow_calibration_data &&
      data->sha256 == plan->calibration.dataset_sha256()) {
    return absl::InvalidArgumentError(absl::StrCat(
        kDataField, ": ", ev.dataset_uri, " has the same bytes (sha256 ", data->sha256,
        ") as the calibration data ", plan->calibration.dataset_uri(),
        "; evaluating on the data the model was calibrated on overstates its quality: give "
        "held-out data, or --eval-allow-calibration-data "
        "(spec.evaluation.allow_calibration_data) to evaluate on it anyway"));
  }
  plan->evaluation = true;
  plan->eval_samples = data->samples;
  plan->eval_seq_len = data->seq_len;
  plan->eval_tokens = data->tokens;
  plan->eval_dataset_sha256 = data->sha256;

  auto evaluate_task = [&](int64_t samples) {
    TaskRecord t;
    t.kind = v1::TASK_KIND_EVALUATE;
    t.state = after_assembly ? v1::TASK_STATE_PENDING : v1::TASK_STATE_QUEUED;
    t.memory_bytes = EvaluationTaskMemoryBytes(dc, samples, data->seq_len, kDefaultSpillAboveBytes);
    // The device runs one model's layer over the shard at a time, as CALIBRATE does.
    t.gpu_memory_bytes = quant::CudaDecoderForwardMemoryBytes(dc, samples, data->seq_len);
    t.backends = WorkerBackends();
    return t;
  };
  const int64_t shard_samples =
      ShardSamplesForWorkers(data->samples, ev.shard_samples, live_workers, evaluate_task);
  v1::EvaluationWork work;
  work.set_reference_model_uri(config.evaluation_reference_uri());
  work.set_candidate_model_uri(candidate_uri);
  work.set_dataset_uri(ev.dataset_uri);
  work.set_dataset_sha256(data->sha256);
  work.set_samples(data->samples);
  work.set_seq_len(data->seq_len);
  for (int64_t begin = 0; begin < data->samples; begin += shard_samples) {
    const int64_t end = std::min(data->samples, begin + shard_samples);
    TaskRecord t = evaluate_task(end - begin);
    t.evaluation = work;
    t.evaluation.set_sample_begin(begin);
    t.evaluation.set_sample_end(end);
    plan->evaluation_tasks.push_back(std::move(t));
    ++plan->eval_shards;
  }
  // One EVAL_REDUCE: the shards' sums (a few numbers per quantized module each).
  TaskRecord reduce;
  reduce.kind = v1::TASK_KIND_EVAL_REDUCE;
  reduce.state = v1::TASK_STATE_PENDING;
  const uint64_t modules = static_cast<uint64_t>(std::max<int64_t>(1, dc.num_hidden_layers)) * 7;
  reduce.memory_bytes = (64u << 20) + static_cast<uint64_t>(plan->eval_shards) * modules * 512;
  reduce.gpu_memory_bytes = 0;  // runs on the host
  reduce.backends = WorkerBackends();
  reduce.evaluation = work;
  plan->evaluation_tasks.push_back(std::move(reduce));
  return absl::OkStatus();
}

// A model directory: its headers and a supported decoder config.json; errors name `field`.
absl::Status OpenDecoderModel(const StoreOpener& open_store, const std::string& uri,
                              std::string_view field, std::unique_ptr<ObjectStore>* store,
                              DecoderModelConfig* decoder) {
  auto s = open_store(uri);
  if (!s.ok()) return FieldStatus(field, s.status());
  auto model = SafetensorsModel::Open(**s, "");
  if (!model.ok()) {
    return FieldStatus(field, model.status(), absl::StrCat("cannot open the model at ", uri, ": "));
  }
  auto d = ReadDecoderModelConfig(**s, "");
  if (!d.ok()) return NamedFieldStatus(field, d.status(), absl::StrCat(uri, ": config.json: "));
  *decoder = *std::move(d);
  *store = *std::move(s);
  return absl::OkStatus();
}

// An evaluation-only job: spec.model_uri (the candidate, read as a loader reads it) against
// spec.reference_model_uri; both must be decoders of the same shape.
absl::Status PlanEvaluationOnly(const StoreOpener& open_store, const JobConfig& config,
                                const std::vector<WorkerRecord>& live_workers, JobPlan* plan) {
  const v1::JobSpec& spec = config.spec;
  std::unique_ptr<ObjectStore> candidate_store, reference_store;
  DecoderModelConfig candidate, reference;
  QF_RETURN_IF_ERROR(OpenDecoderModel(open_store, spec.model_uri(), "spec.model_uri",
                                      &candidate_store, &candidate));
  QF_RETURN_IF_ERROR(OpenDecoderModel(open_store, spec.reference_model_uri(),
                                      "spec.reference_model_uri", &reference_store, &reference));
  const quant::DecoderConfig& a = candidate.decoder;
  const quant::DecoderConfig& b = reference.decoder;
  const struct {
    const char* name;
    int64_t candidate, reference;
  } dims[] = {{"hidden_size", a.hidden_size, b.hidden_size},
              {"num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers},
              {"intermediate_size", a.intermediate_size, b.intermediate_size},
              {"num_attention_heads", a.num_attention_heads, b.num_attention_heads},
              {"num_key_value_heads", a.num_key_value_heads, b.num_key_value_heads},
              {"vocab_size", a.vocab_size, b.vocab_size}};
  for (const auto& d : dims) {
    if (d.candidate != d.reference) {
      return absl::InvalidArgumentError(absl::StrCat(
          "spec.model_uri: config.json gives ", d.name, " ", d.candidate, " but the reference ",
          spec.reference_model_uri(), " has ", d.reference,
          "; evaluate a model against the original it was quantized from"));
    }
  }
  auto quantization = ReadModelQuantization(*candidate_store, "");
  if (!quantization.ok()) {
    return NamedFieldStatus("spec.model_uri", quantization.status(),
                            absl::StrCat(spec.model_uri(), ": config.json: "));
  }
  if (!spec.output_uri().empty()) {
    QF_RETURN_IF_ERROR(CheckOutputEmpty(open_store, spec.output_uri()));
  }
  return PlanEvaluation(open_store, config, reference, spec.model_uri(),
                        /*after_assembly=*/false, live_workers, plan);
}

}  // namespace

absl::StatusOr<JobPlan> Planner::Plan(const JobConfig& config,
                                      const std::vector<WorkerRecord>& live_workers) const {
  const v1::JobSpec& spec = config.spec;
  if (config.evaluation_only()) {
    JobPlan plan;
    QF_RETURN_IF_ERROR(PlanEvaluationOnly(open_store_, config, live_workers, &plan));
    return plan;
  }
  const bool dataset = !config.calibration.dataset_uri.empty();

  // The model: headers only.
  auto model_store = open_store_(spec.model_uri());
  if (!model_store.ok()) return FieldStatus("spec.model_uri", model_store.status());
  auto model = SafetensorsModel::Open(**model_store, "");
  if (!model.ok()) {
    return FieldStatus("spec.model_uri", model.status(),
                       absl::StrCat("cannot open the model at ", spec.model_uri(), ": "));
  }
  if (absl::Status s = (*model_store)->Stat("config.json").status(); !s.ok()) {
    return FieldStatus("spec.model_uri", s,
                       absl::StrCat(spec.model_uri(),
                                    " has no readable config.json (a Hugging Face model "
                                    "directory is expected): "));
  }
  // Calibration and evaluation run the model: its architecture must be one the forward
  // pass knows.
  std::optional<DecoderModelConfig> decoder;
  if (dataset || config.evaluates()) {
    auto d = ReadDecoderModelConfig(**model_store, "");
    if (!d.ok()) {
      return NamedFieldStatus("spec.model_uri", d.status(),
                              absl::StrCat(spec.model_uri(), ": config.json: "));
    }
    decoder = *std::move(d);
  }
  auto layers = SelectLayers(*model, config.selection);
  if (!layers.ok()) return FieldStatus("spec.include", layers.status());
  for (const PlannedLayer& l : *layers) {
    QF_RETURN_IF_ERROR(ValidateLayerForSpec(config, l.module, l.out_features, l.in_features));
  }

  JobPlan plan;
  if (dataset) {
    QF_RETURN_IF_ERROR(PlanCalibration(open_store_, hessian_cache_uri_, config, **model_store,
                                       *model, *decoder, *layers, live_workers, &plan));
  } else {
    if (!config.identity_hessian) {
      QF_RETURN_IF_ERROR(CheckHessians(open_store_, config.hessians_uri, *layers));
    }
    QF_RETURN_IF_ERROR(CheckOutputEmpty(open_store_, spec.output_uri()));
  }
  const bool wait_for_reduce = dataset && !plan.calibration.cache_hit();
  const std::string& hessians_uri = dataset ? plan.calibration.hessians_uri() : config.hessians_uri;

  // One QUANTIZE task per layer, with the weight's byte range, its shard pinned as it is
  // now (size and version: workers refuse a shard that changed) and the memory it needs.
  std::map<std::string, ObjectInfo> pinned;  // shard key -> its Stat
  for (const PlannedLayer& l : *layers) {
    auto loc = LocateTensor(*model, l.weight);
    if (!loc.ok()) return FieldStatus("spec.model_uri", loc.status());
    auto pin = pinned.find(loc->key);
    if (pin == pinned.end()) {
      auto info = (*model_store)->Stat(loc->key);
      if (!info.ok()) return FieldStatus("spec.model_uri", info.status());
      pin = pinned.emplace(loc->key, *std::move(info)).first;
    }
    TaskRecord t;
    t.kind = v1::TASK_KIND_QUANTIZE;
    t.state = wait_for_reduce ? v1::TASK_STATE_PENDING : v1::TASK_STATE_QUEUED;
    t.layer.set_module(l.module);
    t.layer.set_weight_tensor(l.weight);
    t.layer.set_model_uri(spec.model_uri());
    t.layer.set_shard_key(loc->key);
    t.layer.set_byte_offset(loc->offset);
    t.layer.set_byte_length(loc->length);
    t.layer.set_dtype(DTypeName(l.dtype));
    t.layer.set_out_features(l.out_features);
    t.layer.set_in_features(l.in_features);
    t.layer.set_hessians_uri(hessians_uri);
    t.layer.set_has_bias(model->Find(absl::StrCat(l.module, ".bias")).ok());
    t.layer.set_shard_size(pin->second.size);
    t.layer.set_shard_version(pin->second.version);
    t.memory_bytes =
        TaskMemoryBytes(config, l.out_features, l.in_features, task_memory_factor_);
    t.gpu_memory_bytes = GpuTaskMemoryBytes(config, l.out_features, l.in_features);
    t.backends = WorkerBackends();
    plan.tasks.push_back(std::move(t));
    ++plan.layers;
  }
  if (config.evaluates()) {
    // The evaluation reads every quantized module as a decoder linear of the artifact.
    if (absl::Status s = CheckDecoderLinears(decoder->decoder, *layers); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          s.message(), dataset ? "" : " (evaluation, --eval, runs decoder linears only)"));
    }
    QF_RETURN_IF_ERROR(PlanEvaluation(open_store_, config, *decoder, spec.output_uri(),
                                      /*after_assembly=*/true, live_workers, &plan));
  }
  return plan;
}

}  // namespace qforge

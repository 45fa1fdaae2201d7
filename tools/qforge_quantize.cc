// qforge-quantize: offline GPTQ or VPTQ quantization of a Hugging Face safetensors model into a
// HF GPTQ model directory or a VPTQ one (quant_method "vptq", loaded by the `vptq` package), on
// this machine (the CPU quantizers), through the same layer runner the worker calls and the same
// assembler the coordinator runs.
//
//   qforge-quantize --model DIR_URI --output DIR_URI
//                   (--calibration DATA_URI [--calib-samples N] [--calib-seq-len L]
//                    [--hessians-out FILE_URI] | --hessians FILE_URI | --calibration none)
//                   [--bits 4] [--group-size 128] [--asym] [--desc-act] [--static-groups] ...
//                   [--method vptq --vector-len 8 --centroids 65536 --res-centroids 256 ...]
//
// With --calibration DATA_URI (token ids: safetensors input_ids [samples, seq_len] or JSON
// Lines, job/calibration_data.h) the Hessians are computed first, as the service's CALIBRATE
// and REDUCE tasks do (one shard of all samples, the CPU forward pass), into a temporary
// directory or --hessians-out, and the layers are then quantized with them.
//
// Evaluation (job/evaluation.h), after assembling:
//   --eval DATA_URI [--eval-samples N] [--eval-seq-len L] [--max-ppl-increase PCT]
//   [--max-kld X] [--eval-allow-calibration-data]
// runs the artifact, read back exactly as a loader reads it, and the source model over the
// token data (one EVALUATE shard of all samples on the CPU, then EVAL_REDUCE), prints the
// quality table (perplexity original vs quantized, increase, mean KL, top-1 agreement, bits
// per weight, the 5 modules of largest relative output error) and records "quality" (and,
// with a threshold, "quality_gate") in qforge_manifest.json. Data whose sha256 equals the
// calibration data's is refused unless --eval-allow-calibration-data.
// Standalone, for any HF GPTQ / VPTQ / unquantized directory of a supported architecture:
//   qforge-quantize --eval-only MODEL_DIR_URI --reference ORIGINAL_DIR_URI --eval DATA_URI
//                   [--eval-samples N] [--eval-seq-len L] [--max-ppl-increase PCT] [--max-kld X]
//                   [--record-manifest]
// (--record-manifest: also write the quality into MODEL_DIR's qforge_manifest.json).
//
// Exit codes: 0 success, 1 quantization or evaluation failed, 2 usage error, 3 the quality
// gate failed (the artifact and its manifest, marked "quality_gate": "failed", stay written).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sys/stat.h>
#include <unistd.h>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "common/hessian_file.h"
#include "common/sha256.h"
#include "common/local_store.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "base/status_macros.h"
#include "common/uri.h"
#include "nlohmann/json.hpp"
#include "job/assembler.h"
#include "job/calibration.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "job/evaluation.h"
#include "job/layer_selection.h"
#include "job/spec.h"
#include "job/staging_layout.h"
#include "job/layer_dequantizer.h"
#include "job/layer_runner.h"
#include "job/staged_layer.h"
#include "quant/gptq.h"
#include "quant/decoder.h"
#include "quant/layer_quantizer.h"

namespace qforge {
namespace {

struct Flags {
  std::string model, hessians, calibration, output;
  // Calibration from token data (--calibration DATA_URI).
  int64_t calib_samples = 0, calib_seq_len = 0;
  std::string hessians_out, spill_dir;
  std::string score_hessians;  // score every layer's result under these Hessians too
  std::string method = "gptq";
  // VPTQ
  int vector_len = 8;
  int64_t centroids = 65536, res_centroids = 0, outlier_size = 0, outlier_centroids = 4096;
  int outlier_vector_len = 4, group_num = 1, kmeans_iters = 100;
  uint64_t seed = 0;
  bool no_norm = false, no_perm = false;
  int bits = 4;
  int64_t group_size = 128;
  bool asym = false, desc_act = false, static_groups = false, mse = false;
  double damp = 0.01;
  std::string format = "gptq";
  std::vector<std::string> include, exclude;
  uint64_t max_shard_bytes = 5'000'000'000ull;
  bool overwrite = false;
  bool quiet = false;
  // Evaluation (--eval DATA_URI, --eval-only MODEL_DIR_URI --reference ORIGINAL_DIR_URI).
  std::string eval, eval_only, reference;
  int64_t eval_samples = 0, eval_seq_len = 0;
  std::optional<double> max_ppl_increase, max_kld;
  bool eval_allow_calibration_data = false;
  bool record_manifest = false;
};

// Exit code of a failed quality gate (documented above).
constexpr int kQualityGateFailedExit = 3;

QualityGate GateOf(const Flags& f) {
  QualityGate gate;
  gate.max_ppl_increase_pct = f.max_ppl_increase;
  gate.max_kl = f.max_kld;
  return gate;
}

// A local directory removed (with what it holds) when this goes out of scope.
struct TempDir {
  std::string path;
  ~TempDir() {
    if (path.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// --calibration DATA_URI: loads and validates the token data against the model, runs one
// CALIBRATE shard over all samples with the CPU forward pass (partial in `temp`) and reduces
// it into `hessians_uri`. Returns what the manifest records under "calibration" (the service's
// CalibrationInfo: one shard, no cache).
absl::StatusOr<v1::CalibrationInfo> Calibrate(const Flags& f, ObjectStore& model_store,
                                             const SafetensorsModel& model, const TempDir& temp,
                                             const std::string& hessians_uri) {
  const auto t0 = std::chrono::steady_clock::now();
  QF_ASSIGN_OR_RETURN(DecoderModelConfig config, ReadDecoderModelConfig(model_store, ""));
  QF_ASSIGN_OR_RETURN(ObjectUri du, SplitObjectUri(f.calibration));
  QF_ASSIGN_OR_RETURN(auto data_store, OpenObjectStore(du.store_uri));
  CalibrationDataOptions options;
  options.max_samples = f.calib_samples;
  options.seq_len = f.calib_seq_len;
  QF_ASSIGN_OR_RETURN(CalibrationData data,
                      LoadCalibrationData(*data_store, du.key, options, config.decoder,
                                          "--calibration"));
  std::fprintf(stderr,
               "qforge-quantize: calibrating %s (%s, %lld layers) on %lld samples x %lld tokens%s "
               "(%lld real tokens, sha256 %.12s...)\n",
               f.model.c_str(), config.architecture.c_str(),
               static_cast<long long>(config.decoder.num_hidden_layers),
               static_cast<long long>(data.samples), static_cast<long long>(data.seq_len),
               data.packed ? ", packed" : "", static_cast<long long>(data.tokens),
               data.sha256.c_str());

  QF_ASSIGN_OR_RETURN(auto temp_store, OpenObjectStore(temp.path));
  std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
  CalibrationShardJob job;
  job.model_store = &model_store;
  job.model = &model;
  job.model_config = &config;
  job.data = &data;
  job.sample_begin = 0;
  job.sample_end = data.samples;
  job.forward = forward.get();
  job.out_store = temp_store.get();
  job.staged_key = kCalibrationPartialName;
  job.spill_dir = f.spill_dir;
  const int64_t layers = config.decoder.num_hidden_layers;
  int64_t reported = 0;
  if (!f.quiet) {
    job.progress = [&](double fraction) {
      const int64_t done = static_cast<int64_t>(fraction * static_cast<double>(layers) + 1e-9);
      if (done > reported) {
        reported = done;
        std::fprintf(stderr, "  calibration: %lld/%lld layers\n", static_cast<long long>(done),
                     static_cast<long long>(layers));
      }
      return true;
    };
  }
  QF_ASSIGN_OR_RETURN(CalibrationShardOutcome shard, RunCalibrationShard(job));

  QF_ASSIGN_OR_RETURN(ObjectUri hu, SplitObjectUri(hessians_uri));
  QF_ASSIGN_OR_RETURN(auto hessian_store, OpenObjectStore(hu.store_uri));
  ReduceJob reduce;
  reduce.in_store = temp_store.get();
  reduce.partial_keys = {kCalibrationPartialName};
  reduce.out_store = hessian_store.get();
  reduce.out_key = hu.key;
  reduce.spill_dir = f.spill_dir;
  QF_ASSIGN_OR_RETURN(ReduceOutcome reduced, ReduceHessians(reduce));
  QF_RETURN_IF_ERROR(temp_store->Delete(kCalibrationPartialName));

  v1::CalibrationInfo out;
  out.set_dataset_uri(f.calibration);
  out.set_dataset_sha256(data.sha256);
  out.set_samples(data.samples);
  out.set_seq_len(data.seq_len);
  out.set_tokens(reduced.tokens);
  out.set_packed(data.packed);
  out.set_shards(1);
  out.set_cache_hit(false);
  out.set_hessians_uri(hessians_uri);
  QF_ASSIGN_OR_RETURN(std::string fingerprint, ModelFingerprint(model_store, model));
  out.set_model_fingerprint(fingerprint);
  out.set_seconds(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  std::fprintf(stderr,
               "qforge-quantize: Hessians of %lld modules' inputs from %lld tokens in %.2f s "
               "(forward %.2f s, reads %.2f s%s) -> %s\n",
               static_cast<long long>(reduced.tensors), static_cast<long long>(reduced.tokens),
               out.seconds(), shard.forward_seconds, shard.read_seconds,
               shard.spilled ? ", hidden states spilled to disk" : "", hessians_uri.c_str());
  return out;
}

// The relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of layer `l`'s staged result under the
// Hessian `score` holds for it: the result is decoded as the loaders decode it
// (job/layer_dequantizer.h), not taken from the solver.
absl::StatusOr<double> ScoreStagedLayer(ObjectStore& model_store, const SafetensorsModel& model,
                                        const PlannedLayer& l, ObjectStore& staging,
                                        const std::string& staged_key, ObjectStore& score_store,
                                        const HessianFile& score, const JobConfig& config) {
  QF_ASSIGN_OR_RETURN(StagedLayerObject staged, ReadStagedLayer(staging, staged_key, l.module));
  const QuantizedModuleSource source{&staging, staged_key, &staged.header, l.module};
  Matrix w_hat;
  if (config.method() == ArtifactMethod::kVptq) {
    QF_ASSIGN_OR_RETURN(w_hat, DequantizeVptqModule(source, staged.layer_config));
  } else {
    const auto& gptq = std::get<quant::GptqLayerOptions>(config.quantize);
    QF_ASSIGN_OR_RETURN(w_hat, DequantizeGptqModule(source, l.out_features, l.in_features,
                                                    gptq.format));
  }
  Matrix w(l.out_features, l.in_features);
  QF_ASSIGN_OR_RETURN(w.data, model.ReadF32(model_store, l.weight));
  Matrix h(l.in_features, l.in_features);
  QF_ASSIGN_OR_RETURN(h.data, score.Read(score_store, l.module, l.in_features));
  const double energy = quant::WeightEnergy(w, h);
  if (!(energy > 0)) {
    return absl::InvalidArgumentError(absl::StrCat("--score-hessians: tr(W H Wᵀ) of '", l.module,
                                                   "' is not positive"));
  }
  return quant::OutputError(w, w_hat, h) / energy;
}

// Evaluates the candidate directory against the reference over f.eval (one shard of all
// samples, the CPU forward pass, the reduce step in `temp`), prints the quality table and
// returns the metrics (bits_per_weight set). `calibration_sha256`: the calibration data's, ""
// when there was none.
absl::StatusOr<QualityMetrics> EvaluateOffline(const Flags& f, ObjectStore& reference_store,
                                               ObjectStore& candidate_store,
                                               const std::string& calibration_sha256) {
  const auto t0 = std::chrono::steady_clock::now();
  QF_ASSIGN_OR_RETURN(SafetensorsModel reference, SafetensorsModel::Open(reference_store, ""));
  QF_ASSIGN_OR_RETURN(SafetensorsModel candidate, SafetensorsModel::Open(candidate_store, ""));
  QF_ASSIGN_OR_RETURN(DecoderModelConfig reference_config,
                      ReadDecoderModelConfig(reference_store, ""));
  QF_ASSIGN_OR_RETURN(DecoderModelConfig candidate_config,
                      ReadDecoderModelConfig(candidate_store, ""));
  QF_ASSIGN_OR_RETURN(ModelQuantization quantization, ReadModelQuantization(candidate_store, ""));
  QF_ASSIGN_OR_RETURN(ObjectUri du, SplitObjectUri(f.eval));
  QF_ASSIGN_OR_RETURN(auto data_store, OpenObjectStore(du.store_uri));
  CalibrationDataOptions options;
  options.max_samples = f.eval_samples;
  options.seq_len = f.eval_seq_len;
  QF_ASSIGN_OR_RETURN(CalibrationData data,
                      LoadCalibrationData(*data_store, du.key, options, reference_config.decoder,
                                          "--eval"));
  if (!calibration_sha256.empty() && data.sha256 == calibration_sha256 &&
      !f.eval_allow_calibration_data) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--eval: ", f.eval, " is the calibration data (sha256 ", data.sha256,
        "); perplexity on the tokens the quantizer fitted is optimistic: give held-out data, or "
        "--eval-allow-calibration-data to evaluate on it anyway"));
  }
  std::fprintf(stderr,
               "qforge-quantize: evaluating %s (%s) against %s on %lld samples x %lld tokens%s "
               "(sha256 %.12s...)\n",
               f.eval_only.empty() ? f.output.c_str() : f.eval_only.c_str(),
               quantization.Describe().c_str(),
               f.eval_only.empty() ? f.model.c_str() : f.reference.c_str(),
               static_cast<long long>(data.samples), static_cast<long long>(data.seq_len),
               data.packed ? ", packed" : "", data.sha256.c_str());

  TempDir temp;
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = (tmp != nullptr && *tmp != '\0' ? std::string(tmp) : std::string("/tmp")) +
                     "/qforge-eval-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot create a temporary directory ", tmpl, " for evaluation"));
  }
  temp.path = tmpl;
  QF_ASSIGN_OR_RETURN(auto temp_store, OpenObjectStore(temp.path));
  std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
  EvaluationShardJob job;
  job.reference_store = &reference_store;
  job.reference_model = &reference;
  job.reference_config = &reference_config;
  job.candidate_store = &candidate_store;
  job.candidate_model = &candidate;
  job.candidate_config = &candidate_config;
  job.candidate_quantization = &quantization;
  job.data = &data;
  job.sample_begin = 0;
  job.sample_end = data.samples;
  job.forward = forward.get();
  job.out_store = temp_store.get();
  job.staged_key = kEvaluationPartialName;
  job.spill_dir = f.spill_dir;
  const int64_t units = reference_config.decoder.num_hidden_layers + 1;
  int64_t reported = 0;
  if (!f.quiet) {
    job.progress = [&](double fraction) {
      const int64_t done = static_cast<int64_t>(fraction * static_cast<double>(units) + 1e-9);
      if (done > reported) {
        reported = done;
        std::fprintf(stderr, "  evaluation: %lld/%lld layers%s\n",
                     static_cast<long long>(std::min(done, units - 1)),
                     static_cast<long long>(units - 1), done == units ? " + head" : "");
      }
      return true;
    };
  }
  QF_ASSIGN_OR_RETURN(EvaluationShardOutcome shard, RunEvaluationShard(job));
  QF_ASSIGN_OR_RETURN(QualityMetrics m, ReduceEvaluation(*temp_store, {kEvaluationPartialName}));
  QF_ASSIGN_OR_RETURN(m.bits_per_weight,
                      QuantizedBitsPerWeight(candidate, candidate_config.decoder, m.modules));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::printf("\nquality on %s (%lld samples, %lld predicted tokens; %s):\n", f.eval.c_str(),
              static_cast<long long>(m.samples), static_cast<long long>(m.tokens),
              quantization.Describe().c_str());
  std::printf("  %-28s %12.4f\n", "perplexity, original", m.ppl_reference);
  std::printf("  %-28s %12.4f\n", "perplexity, quantized", m.ppl_candidate);
  std::printf("  %-28s %+11.2f %%\n", "perplexity increase", m.ppl_increase_pct);
  std::printf("  %-28s %12.5f\n", "mean KL (nats/token)", m.mean_kl);
  std::printf("  %-28s %11.2f %%\n", "top-1 agreement", 100.0 * m.top1_agreement);
  if (m.bits_per_weight > 0) {
    std::printf("  %-28s %12.3f\n", "bits per weight (quantized)", m.bits_per_weight);
  }
  std::vector<ModuleErrorSums> worst = m.modules;
  std::sort(worst.begin(), worst.end(), [](const ModuleErrorSums& a, const ModuleErrorSums& b) {
    return a.relative_error() > b.relative_error();
  });
  if (worst.size() > 5) worst.resize(5);
  if (!worst.empty()) {
    std::printf("  largest relative output error on the evaluation data:\n");
    for (const ModuleErrorSums& e : worst) {
      std::printf("    %-44s %12.4e\n", e.module.c_str(), e.relative_error());
    }
  }
  std::printf("  (%.2f s: forward %.2f s, head and module errors %.2f s, reads %.2f s%s)\n",
              seconds, shard.forward_seconds, shard.head_seconds, shard.read_seconds,
              shard.spilled ? ", hidden states spilled to disk" : "");
  const QualityGate gate = GateOf(f);
  if (gate.enabled()) {
    const absl::Status passed = CheckQualityGate(m, gate);
    std::printf("  %s\n",
                passed.ok() ? "quality gate: passed" : std::string(passed.message()).c_str());
  }
  std::fflush(stdout);
  return m;
}

// Records the metrics in `store`'s manifest and applies the gate: OK, or FAILED_PRECONDITION
// with the gate's message (main maps it to kQualityGateFailedExit).
absl::Status RecordAndGate(const Flags& f, ObjectStore& store, const QualityMetrics& m,
                           bool record) {
  const QualityGate gate = GateOf(f);
  if (record) {
    QF_RETURN_IF_ERROR(RecordQualityInManifest(store, "", m, gate));
    std::printf("recorded the quality%s in %s/%s\n",
                gate.enabled() ? " and the gate's verdict" : "", store.uri().c_str(),
                kManifestName);
    std::fflush(stdout);
  }
  return CheckQualityGate(m, gate);
}

// --eval-only MODEL --reference ORIGINAL --eval DATA.
absl::Status RunEvalOnly(const Flags& f) {
  QF_ASSIGN_OR_RETURN(auto candidate_store, OpenObjectStore(f.eval_only));
  QF_ASSIGN_OR_RETURN(auto reference_store, OpenObjectStore(f.reference));
  QF_ASSIGN_OR_RETURN(QualityMetrics m, EvaluateOffline(f, *reference_store, *candidate_store, ""));
  return RecordAndGate(f, *candidate_store, m, f.record_manifest);
}

absl::Status Run(const Flags& f) {
  const auto t_start = std::chrono::steady_clock::now();
  QF_ASSIGN_OR_RETURN(auto model_store, OpenObjectStore(f.model));
  QF_ASSIGN_OR_RETURN(SafetensorsModel model, SafetensorsModel::Open(*model_store, ""));
  LayerSelection selection;
  if (!f.include.empty()) selection.include = f.include;
  selection.exclude = f.exclude;
  QF_ASSIGN_OR_RETURN(std::vector<PlannedLayer> layers, SelectLayers(model, selection));

  quant::GptqOptions options;
  options.bits = f.bits;
  options.group_size = static_cast<int>(f.group_size);
  options.sym = !f.asym;
  options.act_order = f.desc_act;
  options.static_groups = f.static_groups;
  options.damp_percent = f.damp;
  options.mse = f.mse;
  quant::GptqCheckpointFormat format;
  if (f.format == "gptq") {
    format = quant::GptqCheckpointFormat::kV1;
    options.v1_zero_compat = true;
  } else if (f.format == "gptq_v2") {
    format = quant::GptqCheckpointFormat::kV2;
    options.v1_zero_compat = false;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--format is '", f.format, "'; expected gptq or gptq_v2"));
  }
  const bool vptq = f.method == "vptq";
  quant::VptqOptions vopt;
  vopt.vector_len = f.vector_len;
  vopt.num_centroids = f.centroids;
  vopt.num_res_centroids = f.res_centroids;
  vopt.outlier_size = f.outlier_size;
  vopt.outlier_vector_len = f.outlier_vector_len;
  vopt.outlier_num_centroids = f.outlier_centroids;
  vopt.group_num = f.group_num;
  vopt.enable_norm = !f.no_norm;
  vopt.enable_perm = !f.no_perm;
  vopt.kmeans_iterations = f.kmeans_iters;
  vopt.kmeans_seed = f.seed;
  vopt.damp_percent = f.damp;
  // What ConvertJobSpec gives the coordinator for the same spec.
  JobConfig config;
  if (vptq) {
    config.quantize = quant::VptqLayerOptions{vopt};
  } else {
    config.quantize = quant::GptqLayerOptions{options, format};
  }
  // The coordinator's own per-layer check (the solver's and the loader's limits), so both
  // paths refuse the same layers, before doing any work.
  for (const PlannedLayer& l : layers) {
    QF_RETURN_IF_ERROR(ValidateLayerForSpec(config, l.module, l.out_features, l.in_features));
  }
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  quant::LayerQuantizer* quantizer = quantizers.For(config.quantize);
  if (quantizer == nullptr) {
    return absl::UnimplementedError(absl::StrCat("no CPU quantizer for method ",
                                                 quant::QuantizeMethod(config.quantize)));
  }

  // Whether this run creates the output directory (OpenObjectStore creates a missing one):
  // if so, a failed run removes it again when it is still empty.
  const bool output_existed = [&] {
    std::string path = f.output;
    if (absl::StartsWith(path, "file://")) path = path.substr(7);
    struct stat st;
    return path.find("://") != std::string::npos || ::stat(path.c_str(), &st) == 0;
  }();
  QF_ASSIGN_OR_RETURN(auto out_store, OpenObjectStore(f.output));
  QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> existing, out_store->List(""));
  // A run that fails removes the objects it created (a partial artifact: shards without a
  // manifest), keeping what the output held before (--overwrite), and then the output
  // directory itself when the run created it and it is empty.
  struct FailedRunCleanup {
    ObjectStore* store;
    std::set<std::string> before;
    std::string created_dir;  // empty: the run did not create the directory
    bool succeeded = false;
    ~FailedRunCleanup() {
      if (succeeded) return;
      if (auto now = store->List(""); now.ok()) {
        for (const ObjectInfo& o : *now) {
          if (before.count(o.key) == 0) (void)store->Delete(o.key);
        }
      }
      if (!created_dir.empty()) (void)::rmdir(created_dir.c_str());  // only when empty
    }
  } cleanup{out_store.get(), {}, {}};
  for (const ObjectInfo& o : existing) cleanup.before.insert(o.key);
  if (!output_existed) {
    if (const auto* local = dynamic_cast<const LocalStore*>(out_store.get())) {
      cleanup.created_dir = local->root();
    }
  }
  if (!existing.empty() && !f.overwrite) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output ", f.output, " is not empty (", existing.size(),
        " objects, e.g. '", existing.front().key, "'); choose an empty prefix or pass --overwrite"));
  }

  // Calibration from token data: the Hessians go to --hessians-out or a temporary directory.
  std::string hessians_uri = f.hessians;
  TempDir temp;
  v1::CalibrationInfo calibration;
  const bool calibrate = !f.calibration.empty() && f.calibration != "none";
  if (calibrate) {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = (tmp != nullptr && *tmp != '\0' ? std::string(tmp) : std::string("/tmp")) +
                       "/qforge-quantize-XXXXXX";
    if (mkdtemp(tmpl.data()) == nullptr) {
      return absl::UnavailableError(
          absl::StrCat("cannot create a temporary directory ", tmpl, " for calibration"));
    }
    temp.path = tmpl;
    hessians_uri = f.hessians_out.empty() ? temp.path + "/" + kHessianCacheFileName : f.hessians_out;
    QF_ASSIGN_OR_RETURN(calibration, Calibrate(f, *model_store, model, temp, hessians_uri));
    if (!f.eval.empty() && !f.eval_allow_calibration_data) {
      // Refuse evaluation on the calibration tokens before the quantization, not after.
      QF_ASSIGN_OR_RETURN(ObjectUri eu, SplitObjectUri(f.eval));
      QF_ASSIGN_OR_RETURN(auto eval_store, OpenObjectStore(eu.store_uri));
      QF_ASSIGN_OR_RETURN(std::string eval_bytes, eval_store->ReadAll(eu.key));
      if (Sha256Hex(eval_bytes) == calibration.dataset_sha256()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--eval: ", f.eval, " is the calibration data (sha256 ", calibration.dataset_sha256(),
            "); perplexity on the tokens the quantizer fitted is optimistic: give held-out data, "
            "or --eval-allow-calibration-data to evaluate on it anyway"));
      }
    }
  }

  std::unique_ptr<ObjectStore> hessian_store;
  std::unique_ptr<HessianFile> hessians;
  if (!hessians_uri.empty()) {
    QF_ASSIGN_OR_RETURN(ObjectUri hu, SplitObjectUri(hessians_uri));
    QF_ASSIGN_OR_RETURN(hessian_store, OpenObjectStore(hu.store_uri));
    QF_ASSIGN_OR_RETURN(HessianFile hf, HessianFile::Open(*hessian_store, hu.key));
    hessians = std::make_unique<HessianFile>(std::move(hf));
    for (const PlannedLayer& l : layers) {
      QF_ASSIGN_OR_RETURN(const TensorInfo* t, hessians->Find(l.module));
      if (t->shape[0] != l.in_features) {
        return absl::InvalidArgumentError(absl::StrCat(
            "Hessian for '", l.module, "' is [", t->shape[0], ", ", t->shape[1],
            "] but the layer has in_features = ", l.in_features));
      }
    }
  }

  std::unique_ptr<ObjectStore> score_store;
  std::unique_ptr<HessianFile> score;
  if (!f.score_hessians.empty()) {
    QF_ASSIGN_OR_RETURN(ObjectUri su, SplitObjectUri(f.score_hessians));
    QF_ASSIGN_OR_RETURN(score_store, OpenObjectStore(su.store_uri));
    QF_ASSIGN_OR_RETURN(HessianFile sf, HessianFile::Open(*score_store, su.key));
    score = std::make_unique<HessianFile>(std::move(sf));
    for (const PlannedLayer& l : layers) {
      QF_ASSIGN_OR_RETURN(const TensorInfo* t, score->Find(l.module));
      if (t->shape[0] != l.in_features) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--score-hessians: the Hessian for '", l.module, "' is [", t->shape[0], ", ",
            t->shape[1], "] but the layer has in_features = ", l.in_features));
      }
    }
  }
  std::vector<double> scores;

  const std::string staging_job = absl::StrCat(
      "offline-", std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count());
  // On any failure from here on, the staging prefix is removed (on success too, below).
  StagingGuard staging_guard(out_store.get(), staging_job);
  std::vector<StagedLayer> staged;
  const std::string method_desc =
      vptq ? absl::StrCat("VPTQ v", f.vector_len, " k", f.centroids,
                          f.res_centroids ? absl::StrCat(" r", f.res_centroids) : std::string(),
                          f.outlier_size ? absl::StrCat(" outliers ", f.outlier_size) : std::string(),
                          f.group_num > 1 ? absl::StrCat(" groups ", f.group_num) : std::string())
           : absl::StrCat("GPTQ ", f.bits, "-bit g", f.group_size, f.asym ? " asym" : " sym",
                          f.desc_act ? " act-order" : "");
  const std::string h_desc =
      calibrate ? absl::StrCat("calibrated from ", f.calibration)
                : (hessians ? f.hessians : std::string("identity (--calibration none)"));
  std::fprintf(stderr, "qforge-quantize: %zu layers, %s, H: %s\n", layers.size(),
               method_desc.c_str(), h_desc.c_str());
  std::printf("%-44s %12s %12s %12s %9s%s\n", "layer", "shape", "proxy_loss", "rel_error",
              "seconds", score ? "   scored_rel" : "");
  double total_solve = 0;
  for (const PlannedLayer& l : layers) {
    const std::string staged_key = StagingKey(staging_job, l.module, 0);
    LayerJob job;
    job.module = l.module;
    job.model_store = model_store.get();
    QF_ASSIGN_OR_RETURN(job.weight, LocateTensor(model, l.weight));
    job.has_bias = model.Find(l.module + ".bias").ok();
    job.hessian_store = hessian_store.get();
    job.hessians = hessians.get();
    job.options = config.quantize;
    job.out_store = out_store.get();
    job.staged_key = staged_key;
    QF_ASSIGN_OR_RETURN(LayerOutcome o, RunLayer(job, *quantizer));
    total_solve += o.solve_seconds;
    nlohmann::json extras = {{"solver", quantizer->backend()}, {"attempt", 0}};
    std::string scored;
    if (score) {
      QF_ASSIGN_OR_RETURN(double rel, ScoreStagedLayer(*model_store, model, l, *out_store,
                                                       staged_key, *score_store, *score, config));
      scores.push_back(rel);
      extras["scored_relative_error"] = rel;
      scored = absl::StrFormat(" %12.4e", rel);
    }
    std::printf("%-44s %5lldx%-6lld %12.5g %12.4e %9.3f%s\n", l.module.c_str(),
                static_cast<long long>(o.out_features), static_cast<long long>(o.in_features),
                o.proxy_loss, o.relative_error, o.solve_seconds, scored.c_str());
    std::fflush(stdout);
    staged.push_back({l.module, staged_key, std::move(extras)});
  }

  AssembleRequest req;
  req.method = config.method();
  req.model_store = model_store.get();
  req.model_uri = f.model;
  req.model = &model;
  req.staging_store = out_store.get();
  req.layers = staged;
  req.output_store = out_store.get();
  // Written beside the staged layers, then renamed (S3: copied server-side) into place with
  // the manifest last (the staging guard removes what an interrupted run left there).
  if (out_store->SupportsRename() || out_store->SupportsCopy()) {
    req.temp_dir = JoinKey(StagingPrefix(staging_job), "assembly");
  }
  req.config = QuantizeConfigForSpec(config);
  req.max_shard_bytes = f.max_shard_bytes;
  req.qforge_version = QFORGE_VERSION;
  req.spec = {{"model", f.model},
              {"method", f.method},
              {"bits", f.bits},
              {"group_size", f.group_size},
              {"sym", !f.asym},
              {"desc_act", f.desc_act},
              {"static_groups", f.static_groups},
              {"damp_percent", f.damp},
              {"mse", f.mse},
              {"checkpoint_format", f.format},
              {"hessians", f.hessians.empty() ? "none" : f.hessians},
              {"output", f.output}};
  if (vptq) {
    req.spec = {{"model", f.model},
                {"method", "vptq"},
                {"vector_len", f.vector_len},
                {"num_centroids", f.centroids},
                {"num_res_centroids", f.res_centroids},
                {"outlier_size", f.outlier_size},
                {"outlier_vector_len", f.outlier_vector_len},
                {"outlier_centroids", f.outlier_centroids},
                {"group_num", f.group_num},
                {"enable_norm", !f.no_norm},
                {"enable_perm", !f.no_perm},
                {"kmeans_iterations", f.kmeans_iters},
                {"seed", f.seed},
                {"damp_percent", f.damp},
                {"hessians", f.hessians.empty() ? "none" : f.hessians},
                {"output", f.output}};
  }
  if (score) req.spec["score_hessians"] = f.score_hessians;
  if (calibrate) {
    req.spec["hessians"] = f.hessians_out.empty() ? "calibrated" : f.hessians_out;
    req.calibration = CalibrationInfoToJson(calibration);
  } else if (f.calibration == "none") {
    req.spec["calibration"] = "none";
  }
  QF_ASSIGN_OR_RETURN(AssembleResult assembled, AssembleArtifact(req));

  // The staging prefix is removed once the manifest is written.
  QF_RETURN_IF_ERROR(staging_guard.DeleteNow());
  cleanup.succeeded = true;

  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("\nwrote %zu files (%.1f MB) to %s:\n", assembled.files_written.size(),
              assembled.bytes_written / 1e6, f.output.c_str());
  for (const std::string& k : assembled.files_written) {
    QF_ASSIGN_OR_RETURN(ObjectInfo info, out_store->Stat(k));
    std::printf("  %-40s %12llu bytes\n", k.c_str(), static_cast<unsigned long long>(info.size));
  }
  if (!scores.empty()) {
    std::vector<double> sorted = scores;
    std::sort(sorted.begin(), sorted.end());
    double mean = 0;
    for (double x : sorted) mean += x / static_cast<double>(sorted.size());
    std::printf("relative output error under %s: median %.4e, mean %.4e, max %.4e\n",
                f.score_hessians.c_str(), sorted[sorted.size() / 2], mean, sorted.back());
  }
  std::printf("%d layers quantized, %d tensors copied; solver %.2f s, total %.2f s\n",
              assembled.tensors_quantized, assembled.tensors_copied, total_solve, total);
  if (f.eval.empty()) return absl::OkStatus();
  std::fflush(stdout);
  QF_ASSIGN_OR_RETURN(QualityMetrics m,
                      EvaluateOffline(f, *model_store, *out_store,
                                      calibrate ? calibration.dataset_sha256() : std::string()));
  return RecordAndGate(f, *out_store, m, /*record=*/true);
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  qforge::Flags f;
  CLI::App app{"qforge-quantize: offline GPTQ/VPTQ quantization of a safetensors model into a HF directory"};
  app.set_version_flag("--version", QFORGE_VERSION);
  auto* model_opt =
      app.add_option("--model", f.model, "model directory URI (file:///path or a path)");
  auto* hess = app.add_option("--hessians", f.hessians, "Hessian file URI (safetensors, one [in,in] per module)");
  auto* calib = app.add_option(
      "--calibration", f.calibration,
      "token data URI (safetensors input_ids [samples, seq_len] or JSON Lines) to compute the "
      "Hessians from, or 'none' for identity Hessians (data-free, lower quality)");
  hess->excludes(calib);
  auto* samples = app.add_option("--calib-samples", f.calib_samples,
                                 "calibration: take the first N samples (0 = all)")
                      ->check(CLI::NonNegativeNumber);
  auto* seq_len = app.add_option("--calib-seq-len", f.calib_seq_len,
                                 "calibration: truncate (or pack) the samples to L tokens "
                                 "(0 = the data's length)")
                      ->check(CLI::NonNegativeNumber);
  auto* hout = app.add_option("--hessians-out", f.hessians_out,
                              "calibration: keep the computed Hessian file at this URI "
                              "(default: a temporary directory)");
  auto* spill = app.add_option("--spill-dir", f.spill_dir,
                               "calibration: local directory for hidden states above 8 GiB and "
                               "the reduce staging (default: $TMPDIR or /tmp)");
  for (auto* o : {samples, seq_len, hout, spill}) o->needs(calib)->excludes(hess);
  app.add_option("--score-hessians", f.score_hessians,
                 "also score every layer's result under these Hessians (decoded as the loaders "
                 "do): relative output error tr(dW H dW^T) / tr(W H W^T), printed and recorded "
                 "in the manifest as scored_relative_error");
  auto* output_opt = app.add_option("--output", f.output, "output directory URI");
  auto* eval = app.add_option("--eval", f.eval,
                              "evaluation token data URI (the calibration formats; held-out "
                              "data): after assembling, perplexity / KL of the artifact against "
                              "the model, recorded in qforge_manifest.json");
  auto* eval_samples = app.add_option("--eval-samples", f.eval_samples,
                                      "evaluation: take the first N samples (0 = all)")
                           ->check(CLI::NonNegativeNumber);
  auto* eval_seq_len = app.add_option("--eval-seq-len", f.eval_seq_len,
                                      "evaluation: truncate (or pack) the samples to L tokens "
                                      "(0 = the data's length)")
                           ->check(CLI::NonNegativeNumber);
  auto* max_ppl = app.add_option("--max-ppl-increase", f.max_ppl_increase,
                                 "quality gate: fail (exit 3) when perplexity rises more than "
                                 "PCT percent");
  auto* max_kld = app.add_option("--max-kld", f.max_kld,
                                 "quality gate: fail (exit 3) when the mean KL divergence "
                                 "(nats/token) is above X")
                      ->check(CLI::NonNegativeNumber);
  auto* allow = app.add_flag("--eval-allow-calibration-data", f.eval_allow_calibration_data,
                             "evaluate even on data identical to the calibration data");
  for (auto* o : {eval_samples, eval_seq_len, max_ppl, max_kld, allow}) o->needs(eval);
  auto* eval_only = app.add_option(
      "--eval-only", f.eval_only,
      "evaluate this HF GPTQ / VPTQ / unquantized model directory against --reference with "
      "--eval data (no quantization)");
  auto* reference = app.add_option("--reference", f.reference,
                                   "--eval-only: the original (unquantized) model directory");
  auto* record = app.add_flag("--record-manifest", f.record_manifest,
                              "--eval-only: also write the quality into the model's "
                              "qforge_manifest.json");
  eval_only->needs(reference)->needs(eval)->excludes(model_opt)->excludes(output_opt);
  reference->needs(eval_only);
  record->needs(eval_only);
  app.add_option("--method", f.method, "gptq or vptq")->check(CLI::IsMember({"gptq", "vptq"}));
  app.add_option("--bits", f.bits, "GPTQ: 2, 3, 4 or 8")->check(CLI::IsMember({2, 3, 4, 8}));
  app.add_option("--vector-len", f.vector_len, "VPTQ: vector length v (2,4,6,8,10,12,16)");
  app.add_option("--centroids", f.centroids, "VPTQ: codebook entries k (a power of two)");
  app.add_option("--res-centroids", f.res_centroids, "VPTQ: residual codebook entries (0 = none)");
  app.add_option("--outlier-size", f.outlier_size, "VPTQ: outlier columns with their own codebook");
  app.add_option("--outlier-vector-len", f.outlier_vector_len, "VPTQ: outlier vector length (default and only value: 4; --vector-len must be a multiple)");
  app.add_option("--outlier-centroids", f.outlier_centroids, "VPTQ: outlier codebook entries");
  app.add_option("--group-num", f.group_num, "VPTQ: column groups with their own codebooks");
  app.add_option("--kmeans-iters", f.kmeans_iters, "VPTQ: k-means iterations (reference: 100)");
  app.add_option("--seed", f.seed, "VPTQ: k-means seed");
  app.add_flag("--no-norm", f.no_norm, "VPTQ: no per-column normalisation");
  app.add_flag("--no-perm", f.no_perm, "VPTQ: no act-order permutation");
  app.add_option("--group-size", f.group_size, "input columns per group; -1 = per channel");
  app.add_flag("--asym", f.asym, "asymmetric quantization (default symmetric)");
  app.add_flag("--desc-act", f.desc_act, "act-order: columns by descending Hessian diagonal");
  app.add_flag("--static-groups", f.static_groups, "group parameters from the original weights");
  app.add_flag("--mse", f.mse, "MSE grid search for scales");
  app.add_option("--damp", f.damp, "damping, fraction of mean(diag H) (raised automatically if needed)");
  app.add_option("--format", f.format, "checkpoint_format: gptq (v1, widest reach) or gptq_v2");
  app.add_option("--include", f.include, "RE2 pattern of weight names to quantize (repeatable)");
  app.add_option("--exclude", f.exclude, "regex of weight names to leave unquantized (repeatable)");
  app.add_option("--max-shard-bytes", f.max_shard_bytes, "largest output shard");
  app.add_flag("--overwrite", f.overwrite, "allow a non-empty output directory");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (!f.eval_only.empty()) {
    absl::Status s = qforge::RunEvalOnly(f);
    if (!s.ok()) {
      std::fprintf(stderr, "qforge-quantize: %s\n", s.ToString().c_str());
      if (absl::IsFailedPrecondition(s) &&
          absl::StartsWith(s.message(), "quality gate")) {
        return qforge::kQualityGateFailedExit;
      }
      return absl::IsInvalidArgument(s) || absl::IsFailedPrecondition(s) || absl::IsNotFound(s)
                 ? 2
                 : 1;
    }
    return 0;
  }
  if (f.model.empty() || f.output.empty()) {
    std::fprintf(stderr, "error: --model and --output are required (or --eval-only MODEL "
                         "--reference ORIGINAL --eval DATA)\n");
    return 2;
  }
  if (f.hessians.empty() && f.calibration.empty()) {
    std::fprintf(stderr,
                 "error: give --calibration DATA_URI (token data), --hessians URI or "
                 "--calibration none\n");
    return 2;
  }
  if (f.calibration == "none") {
    if (f.calib_samples != 0 || f.calib_seq_len != 0 || !f.hessians_out.empty()) {
      std::fprintf(stderr, "error: --calib-samples, --calib-seq-len and --hessians-out need "
                           "--calibration DATA_URI, not none\n");
      return 2;
    }
    std::fprintf(stderr,
                 "warning: --calibration none quantizes with identity Hessians (data-free): every "
                 "input channel counts the same, which costs quality; give --calibration DATA_URI "
                 "with token data of the model's use\n");
  }
  absl::Status s = qforge::Run(f);
  if (!s.ok()) {
    std::fprintf(stderr, "qforge-quantize: %s\n", s.ToString().c_str());
    if (absl::IsFailedPrecondition(s) && absl::StartsWith(s.message(), "quality gate")) {
      return qforge::kQualityGateFailedExit;
    }
    return absl::IsInvalidArgument(s) || absl::IsFailedPrecondition(s) || absl::IsNotFound(s) ? 2 : 1;
  }
  return 0;
}

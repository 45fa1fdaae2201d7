// qforge-quantize: offline GPTQ or VPTQ quantization of a Hugging Face safetensors model into a
// HF GPTQ model directory or a VPTQ one (quant_method "vptq", loaded by the `vptq` package), on
// this machine (the CPU quantizers), through the same layer runner the worker calls and the same
// assembler the coordinator runs.
//
//   qforge-quantize --model DIR_URI (--hessians FILE_URI | --calibration none) --output DIR_URI
//                   [--bits 4] [--group-size 128] [--asym] [--desc-act] [--static-groups] ...
//                   [--method vptq --vector-len 8 --centroids 65536 --res-centroids 256 ...]
//
// Exit codes: 0 success, 1 quantization failed, 2 usage error.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/hessian_file.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "base/status_macros.h"
#include "common/uri.h"
#include "nlohmann/json.hpp"
#include "job/assembler.h"
#include "job/layer_selection.h"
#include "job/spec.h"
#include "job/staging_layout.h"
#include "job/layer_runner.h"
#include "quant/layer_quantizer.h"

namespace qforge {
namespace {

struct Flags {
  std::string model, hessians, calibration, output;
  std::string method = "gptq";
  // VPTQ
  int vector_len = 8;
  int64_t centroids = 65536, res_centroids = 0, outlier_size = 0, outlier_centroids = 4096;
  int outlier_vector_len = 8, group_num = 1, kmeans_iters = 100;
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
};

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

  std::unique_ptr<ObjectStore> hessian_store;
  std::unique_ptr<HessianFile> hessians;
  if (!f.hessians.empty()) {
    QF_ASSIGN_OR_RETURN(ObjectUri hu, SplitObjectUri(f.hessians));
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

  QF_ASSIGN_OR_RETURN(auto out_store, OpenObjectStore(f.output));
  QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> existing, out_store->List(""));
  if (!existing.empty() && !f.overwrite) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output ", f.output, " is not empty (", existing.size(),
        " objects, e.g. '", existing.front().key, "'); choose an empty prefix or pass --overwrite"));
  }

  const std::string staging_job = absl::StrCat(
      "offline-", std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count());
  std::vector<StagedLayer> staged;
  const std::string method_desc =
      vptq ? absl::StrCat("VPTQ v", f.vector_len, " k", f.centroids,
                          f.res_centroids ? absl::StrCat(" r", f.res_centroids) : std::string(),
                          f.outlier_size ? absl::StrCat(" outliers ", f.outlier_size) : std::string(),
                          f.group_num > 1 ? absl::StrCat(" groups ", f.group_num) : std::string())
           : absl::StrCat("GPTQ ", f.bits, "-bit g", f.group_size, f.asym ? " asym" : " sym",
                          f.desc_act ? " act-order" : "");
  std::fprintf(stderr, "qforge-quantize: %zu layers, %s, H: %s\n", layers.size(),
               method_desc.c_str(), hessians ? f.hessians.c_str() : "identity (--calibration none)");
  std::printf("%-44s %12s %12s %12s %9s\n", "layer", "shape", "proxy_loss", "rel_error", "seconds");
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
    std::printf("%-44s %5lldx%-6lld %12.5g %12.4e %9.3f\n", l.module.c_str(),
                static_cast<long long>(o.out_features), static_cast<long long>(o.in_features),
                o.proxy_loss, o.relative_error, o.solve_seconds);
    std::fflush(stdout);
    staged.push_back({l.module, staged_key, {{"solver", quantizer->backend()}, {"attempt", 0}}});
  }

  AssembleRequest req;
  req.method = config.method();
  req.model_store = model_store.get();
  req.model_uri = f.model;
  req.model = &model;
  req.staging_store = out_store.get();
  req.layers = staged;
  req.output_store = out_store.get();
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
  QF_ASSIGN_OR_RETURN(AssembleResult assembled, AssembleArtifact(req));

  // The staging prefix is removed once the manifest is written.
  QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> staged_objects,
                      out_store->List(StagingPrefix(staging_job)));
  for (const ObjectInfo& o : staged_objects) QF_RETURN_IF_ERROR(out_store->Delete(o.key));

  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  std::printf("\nwrote %zu files (%.1f MB) to %s:\n", assembled.files_written.size(),
              assembled.bytes_written / 1e6, f.output.c_str());
  for (const std::string& k : assembled.files_written) {
    QF_ASSIGN_OR_RETURN(ObjectInfo info, out_store->Stat(k));
    std::printf("  %-40s %12llu bytes\n", k.c_str(), static_cast<unsigned long long>(info.size));
  }
  std::printf("%d layers quantized, %d tensors copied; solver %.2f s, total %.2f s\n",
              assembled.tensors_quantized, assembled.tensors_copied, total_solve, total);
  return absl::OkStatus();
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  qforge::Flags f;
  CLI::App app{"qforge-quantize: offline GPTQ/VPTQ quantization of a safetensors model into a HF directory"};
  app.add_option("--model", f.model, "model directory URI (file:///path or a path)")->required();
  auto* hess = app.add_option("--hessians", f.hessians, "Hessian file URI (safetensors, one [in,in] per module)");
  auto* calib = app.add_option("--calibration", f.calibration, "'none' for identity Hessians (data-free)")
                    ->check(CLI::IsMember({"none"}));
  hess->excludes(calib);
  app.add_option("--output", f.output, "output directory URI")->required();
  app.add_option("--method", f.method, "gptq or vptq")->check(CLI::IsMember({"gptq", "vptq"}));
  app.add_option("--bits", f.bits, "GPTQ: 2, 3, 4 or 8")->check(CLI::IsMember({2, 3, 4, 8}));
  app.add_option("--vector-len", f.vector_len, "VPTQ: vector length v (2,4,6,8,10,12,16)");
  app.add_option("--centroids", f.centroids, "VPTQ: codebook entries k (a power of two)");
  app.add_option("--res-centroids", f.res_centroids, "VPTQ: residual codebook entries (0 = none)");
  app.add_option("--outlier-size", f.outlier_size, "VPTQ: outlier columns with their own codebook");
  app.add_option("--outlier-vector-len", f.outlier_vector_len, "VPTQ: outlier vector length");
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
  app.add_option("--include", f.include, "regex of weight names to quantize (repeatable)");
  app.add_option("--exclude", f.exclude, "regex of weight names to leave unquantized (repeatable)");
  app.add_option("--max-shard-bytes", f.max_shard_bytes, "largest output shard");
  app.add_flag("--overwrite", f.overwrite, "allow a non-empty output directory");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (f.hessians.empty() && f.calibration.empty()) {
    std::fprintf(stderr, "error: give --hessians URI or --calibration none\n");
    return 2;
  }
  absl::Status s = qforge::Run(f);
  if (!s.ok()) {
    std::fprintf(stderr, "qforge-quantize: %s\n", s.ToString().c_str());
    return absl::IsInvalidArgument(s) || absl::IsFailedPrecondition(s) || absl::IsNotFound(s) ? 2 : 1;
  }
  return 0;
}

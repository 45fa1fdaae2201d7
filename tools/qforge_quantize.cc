// qforge-quantize: offline GPTQ quantization of a Hugging Face safetensors model into a HF GPTQ
// model directory, on this machine, through the same layer runner the worker calls and the same
// assembler the coordinator runs. Until the service exists this is what `make demo` drives.
//
//   qforge-quantize --model DIR_URI (--hessians FILE_URI | --calibration none) --output DIR_URI
//                   [--bits 4] [--group-size 128] [--asym] [--desc-act] [--static-groups] ...
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
#include "common/status_macros.h"
#include "common/uri.h"
#include "nlohmann/json.hpp"
#include "server/assembler.h"
#include "server/planner.h"
#include "worker/layer_runner.h"
#include "worker/quant_status_bridge.h"

namespace qforge {
namespace {

struct Flags {
  std::string model, hessians, calibration, output;
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
  // Validate every layer before doing any work.
  for (const PlannedLayer& l : layers) {
    QF_RETURN_IF_ERROR(ToAbslStatus(quant::ValidateGptqOptions(options, l.out_features, l.in_features)));
    QF_RETURN_IF_ERROR(ToAbslStatus(quant::CheckGptqPackable(f.bits, l.out_features, l.in_features)));
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

  const std::string staging = absl::StrCat(
      ".qforge-staging/offline-",
      std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::system_clock::now().time_since_epoch()).count());
  auto solver = quant::NewCpuGptqSolver();
  std::vector<StagedLayer> staged;
  std::fprintf(stderr, "qforge-quantize: %zu layers, GPTQ %d-bit g%lld%s%s, H: %s\n",
               layers.size(), f.bits, static_cast<long long>(f.group_size),
               f.asym ? " asym" : " sym", f.desc_act ? " act-order" : "",
               hessians ? f.hessians.c_str() : "identity (--calibration none)");
  std::printf("%-44s %12s %12s %12s %9s\n", "layer", "shape", "proxy_loss", "rel_error", "seconds");
  double total_solve = 0;
  for (const PlannedLayer& l : layers) {
    GptqLayerJob job;
    job.module = l.module;
    job.model_store = model_store.get();
    QF_ASSIGN_OR_RETURN(job.weight, LocateTensor(model, l.weight));
    job.hessian_store = hessian_store.get();
    job.hessians = hessians.get();
    job.options = options;
    job.format = format;
    job.out_store = out_store.get();
    job.staged_key = absl::StrCat(staging, "/", l.module, "/0/layer.safetensors");
    QF_ASSIGN_OR_RETURN(LayerOutcome o, RunGptqLayer(job, *solver));
    total_solve += o.solve_seconds;
    std::printf("%-44s %5lldx%-6lld %12.5g %12.4e %9.3f\n", l.module.c_str(),
                static_cast<long long>(o.out_features), static_cast<long long>(o.in_features),
                o.proxy_loss, o.relative_error, o.solve_seconds);
    std::fflush(stdout);
    staged.push_back({l.module, job.staged_key, {{"solver", "cpu"}, {"attempt", 0}}});
  }

  AssembleRequest req;
  req.model_store = model_store.get();
  req.model_uri = f.model;
  req.model = &model;
  req.staging_store = out_store.get();
  req.layers = staged;
  req.output_store = out_store.get();
  req.config.bits = f.bits;
  req.config.group_size = f.group_size;
  req.config.desc_act = f.desc_act;
  req.config.sym = !f.asym;
  req.config.damp_percent = f.damp;
  req.config.static_groups = f.static_groups;
  req.config.format = format;
  req.max_shard_bytes = f.max_shard_bytes;
  req.qforge_version = QFORGE_VERSION;
  req.spec = {{"model", f.model},
              {"method", "gptq"},
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
  QF_ASSIGN_OR_RETURN(AssembleResult assembled, AssembleGptqArtifact(req));

  // The staging prefix is removed once the manifest is written.
  QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> staged_objects, out_store->List(staging + "/"));
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
  CLI::App app{"qforge-quantize: offline GPTQ quantization of a safetensors model into a HF GPTQ directory"};
  app.add_option("--model", f.model, "model directory URI (file:///path or a path)")->required();
  auto* hess = app.add_option("--hessians", f.hessians, "Hessian file URI (safetensors, one [in,in] per module)");
  auto* calib = app.add_option("--calibration", f.calibration, "'none' for identity Hessians (data-free)")
                    ->check(CLI::IsMember({"none"}));
  hess->excludes(calib);
  app.add_option("--output", f.output, "output directory URI")->required();
  app.add_option("--bits", f.bits, "2, 3, 4 or 8")->check(CLI::IsMember({2, 3, 4, 8}));
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

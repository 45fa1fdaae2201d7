// qforge submit MODEL_URI --method gptq --bits 4 --group-size 128 [--asym] [--desc-act]
//   [--static-groups] [--damp F] [--mse] [--format gptq|gptq_v2]
// qforge submit MODEL_URI --method vptq --vector-len 8 --centroids 65536 [--res-centroids 256]
//   [--outlier-size N [--outlier-vector-len V] [--outlier-centroids K]] [--group-num G]
//   [--no-norm] [--no-perm] [--kmeans-iters N] [--seed S] [--damp F]
//   (--calibration DATA [--calib-samples N] [--calib-seq-len L] [--calib-shard-samples N]
//    [--no-cache] | --hessians URI | --calibration none)
//   --output URI [--include RE]... [--exclude RE]...
//   [--eval DATA [--eval-samples N] [--eval-seq-len L] [--eval-shard-samples N]
//    [--max-ppl-increase PCT] [--max-kld X] [--eval-allow-calibration-data]]
//   [--priority N] [--max-attempts N] [--request-id ID] [--label k=v]... [--validate-only]
//   [--wait] [--watch]
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "client/cli.h"

namespace qforge::cli {
namespace {

struct SubmitFlags {
  std::string model;
  std::string method = "gptq";
  int bits = 4;
  int group_size = 128;
  bool asym = false, desc_act = false, static_groups = false, mse = false;
  double damp = 0;
  std::string checkpoint_format = "gptq";
  // VPTQ (0 = the server's default, see job/spec.h).
  int vector_len = 0, centroids = 0, res_centroids = 0;
  int outlier_size = 0, outlier_vector_len = 0, outlier_centroids = 0;
  int group_num = 0, kmeans_iters = 0;
  bool no_norm = false, no_perm = false;
  uint64_t seed = 0;
  // The method-specific flags given on the command line (set by the parser's callback).
  std::vector<std::string> gptq_flags_given, vptq_flags_given;
  std::string hessians, calibration;
  int64_t calib_samples = 0, calib_seq_len = 0, calib_shard_samples = 0;
  bool no_cache = false;
  std::vector<std::string> calib_flags_given;  // --calib-* and --no-cache
  std::string output;
  EvalFlags eval;
  std::vector<std::string> include, exclude, labels;
  int priority = 0;
  int max_attempts = 0;
  uint64_t max_shard_bytes = 0;
  std::string request_id;
  bool validate_only = false, wait = false, watch = false;
  std::string format = "table";
};

int Usage(const std::string& message) {
  std::fprintf(stderr, "qforge submit: %s\n", message.c_str());
  return kExitUsage;
}

int RunSubmit(Connection& conn, const SubmitFlags& f) {
  if (f.hessians.empty() == f.calibration.empty()) {
    return Usage(
        "give exactly one of --calibration DATA (token ids: safetensors input_ids or JSON "
        "Lines), --hessians URI or --calibration none");
  }
  const bool from_data = !f.calibration.empty() && f.calibration != "none";
  if (!from_data && !f.calib_flags_given.empty()) {
    return Usage(f.calib_flags_given.front() +
                 " applies to calibration from token data only (--calibration DATA)");
  }
  if (f.calibration == "none") {
    std::fprintf(stderr,
                 "qforge: warning: --calibration none quantizes data-free (identity Hessians), "
                 "which costs quality; give --calibration DATA (the model's own tokens, e.g. "
                 "128 samples × 2048) for the accuracy GPTQ and VPTQ are known for\n");
  }
  const bool vptq = f.method == "vptq";
  if (vptq && !f.gptq_flags_given.empty()) {
    return Usage(f.gptq_flags_given.front() + " is a GPTQ option; the method is vptq");
  }
  if (!vptq && !f.vptq_flags_given.empty()) {
    return Usage(f.vptq_flags_given.front() + " is a VPTQ option; add --method vptq");
  }
  v1::SubmitJobRequest req;
  v1::JobSpec* spec = req.mutable_spec();
  spec->set_model_uri(AbsolutizeLocalUri(f.model));
  spec->set_output_uri(AbsolutizeLocalUri(f.output));
  spec->set_method(vptq ? v1::METHOD_VPTQ : v1::METHOD_GPTQ);
  if (vptq) {
    v1::VptqSpec* v = spec->mutable_vptq();
    v->set_vector_len(f.vector_len);
    v->set_num_centroids(f.centroids);
    v->set_num_res_centroids(f.res_centroids);
    v->set_outlier_size(f.outlier_size);
    v->set_outlier_vector_len(f.outlier_vector_len);
    v->set_outlier_centroids(f.outlier_centroids);
    v->set_group_num(f.group_num);
    if (f.no_norm) v->set_enable_norm(false);
    if (f.no_perm) v->set_enable_perm(false);
    v->set_kmeans_iters(f.kmeans_iters);
    v->set_seed(f.seed);
    v->set_damp_percent(f.damp);
  } else {
    v1::GptqSpec* g = spec->mutable_gptq();
    g->set_bits(f.bits);
    g->set_group_size(f.group_size);
    g->set_asym(f.asym);
    g->set_desc_act(f.desc_act);
    g->set_static_groups(f.static_groups);
    g->set_damp_percent(f.damp);
    g->set_mse(f.mse);
    g->set_checkpoint_format(f.checkpoint_format);
  }
  if (!f.hessians.empty()) {
    spec->mutable_calibration()->set_hessians_uri(AbsolutizeLocalUri(f.hessians));
  } else if (f.calibration == "none") {
    spec->mutable_calibration()->set_none(true);
  } else {
    v1::CalibrationSpec* c = spec->mutable_calibration();
    c->set_dataset_uri(AbsolutizeLocalUri(f.calibration));
    c->set_samples(static_cast<int32_t>(f.calib_samples));
    c->set_seq_len(static_cast<int32_t>(f.calib_seq_len));
    c->set_shard_samples(static_cast<int32_t>(f.calib_shard_samples));
    c->set_no_cache(f.no_cache);
  }
  std::string eval_error;
  if (!FillEvaluationSpec(f.eval, spec->mutable_evaluation(), &eval_error)) {
    return Usage(eval_error);
  }
  if (f.eval.data.empty()) spec->clear_evaluation();
  for (const std::string& re : f.include) spec->add_include(re);
  for (const std::string& re : f.exclude) spec->add_exclude(re);
  spec->set_priority(f.priority);
  spec->set_max_attempts(f.max_attempts);
  spec->set_max_shard_bytes(f.max_shard_bytes);
  for (const std::string& kv : f.labels) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) return Usage("--label '" + kv + "' is not key=value");
    (*spec->mutable_labels())[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  const bool generated = f.request_id.empty();
  req.set_request_id(generated ? NewUuid() : f.request_id);
  req.set_validate_only(f.validate_only);

  grpc::ClientContext ctx;
  conn.Prepare(&ctx);
  v1::Job job;
  grpc::Status s = conn.jobs().SubmitJob(&ctx, req, &job);
  if (generated && !f.validate_only) {
    // Printed even on failure: re-running with it cannot create a second job.
    std::fprintf(stderr, "qforge: request id %s (pass --request-id %s to retry safely)\n",
                 req.request_id().c_str(), req.request_id().c_str());
  }
  if (!s.ok()) return ReportRpcError(s, f.validate_only ? "validate" : "submit", conn.config());
  const OutputFormat format = ParseFormat(f.format);
  if (f.validate_only) {
    std::fprintf(stderr, "qforge: the spec is valid (no job was created): %s\n",
                 FormatPlanSummary(job.tasks()).c_str());
    PrintJob(job, format);
    return kExitOk;
  }
  if (f.wait || f.watch) {
    std::fprintf(stderr, "qforge: submitted job %s\n", job.id().c_str());
    HintIfNoLiveWorker(conn, job);
    return FollowJob(conn, job.id(), /*show_progress=*/f.watch, format);
  }
  if (format == OutputFormat::kTable) std::fprintf(stderr, "qforge: submitted job %s\n", job.id().c_str());
  HintIfNoLiveWorker(conn, job);
  PrintJob(job, format);
  return kExitOk;
}

}  // namespace

void AddSubmitCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<SubmitFlags>();
  CLI::App* cmd = app.add_subcommand("submit", "Submit a quantization job");
  cmd->add_option("model", f->model, "model directory URI (a path, file:///dir or s3://bucket/prefix)")
      ->required();
  cmd->add_option("--method", f->method, "gptq (default) or vptq")
      ->check(CLI::IsMember({"gptq", "vptq"}));
  cmd->add_option("--damp", f->damp, "damping, fraction of mean(diag H) (default 0.01)")
      ->check(CLI::Range(0.0, 1.0));
  std::vector<CLI::Option*> gptq = {
      cmd->add_option("--bits", f->bits, "GPTQ: 2, 3, 4 (default) or 8")
          ->check(CLI::IsMember({2, 3, 4, 8})),
      cmd->add_option("--group-size", f->group_size,
                      "GPTQ: input columns per group (default 128; -1 per channel)"),
      cmd->add_flag("--asym", f->asym, "GPTQ: asymmetric quantization (default symmetric)"),
      cmd->add_flag("--desc-act", f->desc_act,
                    "GPTQ: act-order: columns by descending Hessian diagonal"),
      cmd->add_flag("--static-groups", f->static_groups,
                    "GPTQ: group parameters from the original weights"),
      cmd->add_flag("--mse", f->mse, "GPTQ: MSE grid search for scales"),
      cmd->add_option("--format", f->checkpoint_format,
                      "GPTQ: checkpoint format: gptq (default) or gptq_v2")
          ->check(CLI::IsMember({"gptq", "gptq_v2"})),
  };
  std::vector<CLI::Option*> vptq = {
      cmd->add_option("--vector-len", f->vector_len,
                      "VPTQ: vector length v: 2, 4, 6, 8 (default), 10, 12, 16"),
      cmd->add_option("--centroids", f->centroids,
                      "VPTQ: codebook entries k: 2^4, 2^8, 2^10, 2^12..2^16 (default 65536)"),
      cmd->add_option("--res-centroids", f->res_centroids,
                      "VPTQ: residual codebook entries (default 0 = none; e.g. 256)"),
      cmd->add_option("--outlier-size", f->outlier_size,
                      "VPTQ: outlier columns with their own codebook (default 0)"),
      cmd->add_option("--outlier-vector-len", f->outlier_vector_len,
                      "VPTQ: outlier vector length (default and only value: 4; --vector-len must be a multiple)"),
      cmd->add_option("--outlier-centroids", f->outlier_centroids,
                      "VPTQ: outlier codebook entries (default: --centroids)"),
      cmd->add_option("--group-num", f->group_num,
                      "VPTQ: column groups with their own codebooks (default 1)"),
      cmd->add_flag("--no-norm", f->no_norm, "VPTQ: no per-column min-max normalisation"),
      cmd->add_flag("--no-perm", f->no_perm, "VPTQ: no act-order permutation"),
      cmd->add_option("--kmeans-iters", f->kmeans_iters,
                      "VPTQ: k-means iterations (default 100)"),
      cmd->add_option("--seed", f->seed, "VPTQ: k-means seed (default 0)"),
  };
  auto* hessians =
      cmd->add_option("--hessians", f->hessians, "Hessian file URI (safetensors, one [in,in] per module)");
  auto* calibration = cmd->add_option(
      "--calibration", f->calibration,
      "token data to calibrate with (safetensors with int32/int64 input_ids [samples, seq_len], "
      "or JSON Lines {\"input_ids\": [...]}), or 'none' (identity Hessians, data-free: costs "
      "quality)");
  hessians->excludes(calibration);
  std::vector<CLI::Option*> calib = {
      cmd->add_option("--calib-samples", f->calib_samples,
                      "calibration: use the first N samples (default: all)")
          ->check(CLI::Range(int64_t{0}, int64_t{2147483647})),
      cmd->add_option("--calib-seq-len", f->calib_seq_len,
                      "calibration: tokens per sample; longer rows are truncated, shorter ones "
                      "packed (default: the data's, rows of equal length)")
          ->check(CLI::Range(int64_t{0}, int64_t{2147483647})),
      cmd->add_option("--calib-shard-samples", f->calib_shard_samples,
                      "calibration: samples per CALIBRATE task (default: chosen from the "
                      "workers and their memory)")
          ->check(CLI::Range(int64_t{0}, int64_t{2147483647})),
      cmd->add_flag("--no-cache", f->no_cache,
                    "calibration: recompute the Hessians even when cached ones exist"),
  };
  cmd->add_option("--output", f->output, "output directory URI (must be empty)")->required();
  AddEvalOptions(cmd, &f->eval, /*data_required=*/false);
  cmd->add_option("--include", f->include, "RE2 pattern of weight names to quantize (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--exclude", f->exclude, "RE2 pattern of weight names to skip (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_option("--priority", f->priority, "higher runs first (default 0)");
  cmd->add_option("--max-attempts", f->max_attempts, "attempts per task (default: the server's, 4)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--max-shard-bytes", f->max_shard_bytes, "largest output shard (default 5 GB)");
  cmd->add_option("--request-id", f->request_id,
                  "idempotency key: resubmitting with the same one returns the same job "
                  "(default: a fresh UUID, printed)");
  cmd->add_option("--label", f->labels, "key=value label (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_flag("--validate-only", f->validate_only, "check and plan the spec without creating a job");
  cmd->add_flag("--wait", f->wait, "block until the job ends; exit with its outcome");
  cmd->add_flag("--watch", f->watch, "like --wait, showing progress on stderr");
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f, gptq, vptq, calib] {
    for (CLI::Option* o : calib) {
      if (o->count() > 0) f->calib_flags_given.push_back(o->get_name());
    }
    for (CLI::Option* o : gptq) {
      if (o->count() > 0) f->gptq_flags_given.push_back(o->get_name());
    }
    for (CLI::Option* o : vptq) {
      if (o->count() > 0) f->vptq_flags_given.push_back(o->get_name());
    }
    cli.run = [f](Connection& conn) { return RunSubmit(conn, *f); };
  });
}

}  // namespace qforge::cli

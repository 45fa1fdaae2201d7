// qforge eval MODEL --reference ORIGINAL --eval DATA [--eval-samples N] [--eval-seq-len L]
//   [--eval-shard-samples N] [--max-ppl-increase PCT] [--max-kld X] [--output URI]
//   [--priority N] [--max-attempts N] [--request-id ID] [--label k=v]... [--validate-only]
//   [--no-wait] [--watch] [-o table|json]
// An evaluation-only job (JobSpec.reference_model_uri): MODEL (any Hugging Face GPTQ, VPTQ
// or unquantized directory of a supported decoder) against the original it came from. Waits
// for the outcome by default and exits with it (1 when the quality gate is missed).
//
// Also the evaluation flags shared with `qforge submit` (AddEvalOptions, FillEvaluationSpec).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "client/cli.h"

namespace qforge::cli {

void AddEvalOptions(CLI::App* cmd, EvalFlags* f, bool data_required) {
  CLI::Option* data = cmd->add_option(
      "--eval", f->data,
      "evaluation data (token ids in the calibration formats, held out from calibration): "
      "perplexity, KL divergence and top-1 agreement of the quantized model against the "
      "original");
  if (data_required) data->required();
  f->options = {
      cmd->add_option("--eval-samples", f->samples,
                      "evaluation: use the first N samples (default: all)")
          ->check(CLI::Range(int64_t{0}, int64_t{2147483647})),
      cmd->add_option("--eval-seq-len", f->seq_len,
                      "evaluation: tokens per sample; longer rows are truncated, shorter ones "
                      "packed (default: the data's)")
          ->check(CLI::Range(int64_t{0}, int64_t{2147483647})),
      cmd->add_option("--eval-shard-samples", f->shard_samples,
                      "evaluation: samples per EVALUATE task (default: chosen from the workers "
                      "and their memory)")
          ->check(CLI::Range(int64_t{0}, int64_t{2147483647})),
      cmd->add_flag("--eval-allow-calibration-data", f->allow_calibration_data,
                    "evaluation: accept data identical to the calibration data (overstates "
                    "the quality)"),
  };
  f->max_ppl_increase_option =
      cmd->add_option("--max-ppl-increase", f->max_ppl_increase,
                      "quality gate: the job fails (QUALITY_GATE) when the perplexity rises "
                      "more than PCT percent");
  f->max_kld_option = cmd->add_option(
      "--max-kld", f->max_kld,
      "quality gate: the job fails (QUALITY_GATE) when the mean KL divergence exceeds X nats");
  f->options.push_back(f->max_ppl_increase_option);
  f->options.push_back(f->max_kld_option);
}

bool FillEvaluationSpec(const EvalFlags& f, v1::EvaluationSpec* spec, std::string* error) {
  if (f.data.empty()) {
    for (const CLI::Option* o : f.options) {
      if (o->count() > 0) {
        *error = o->get_name() + " applies with evaluation data only (--eval DATA)";
        return false;
      }
    }
    return true;
  }
  // Ranges and finiteness are checked by the coordinator (ConvertJobSpec), naming the field.
  spec->set_dataset_uri(AbsolutizeLocalUri(f.data));
  spec->set_samples(static_cast<int32_t>(f.samples));
  spec->set_seq_len(static_cast<int32_t>(f.seq_len));
  spec->set_shard_samples(static_cast<int32_t>(f.shard_samples));
  spec->set_allow_calibration_data(f.allow_calibration_data);
  if (f.max_ppl_increase_option->count() > 0) {
    spec->set_max_ppl_increase_pct(f.max_ppl_increase);
  }
  if (f.max_kld_option->count() > 0) spec->set_max_kl(f.max_kld);
  return true;
}

namespace {

struct EvalCommandFlags {
  std::string model, reference, output;
  EvalFlags eval;
  int priority = 0;
  int max_attempts = 0;
  std::vector<std::string> labels;
  std::string request_id;
  bool validate_only = false, no_wait = false, watch = false;
  std::string format = "table";
};

int Usage(const std::string& message) {
  std::fprintf(stderr, "qforge eval: %s\n", message.c_str());
  return kExitUsage;
}

int RunEval(Connection& conn, const EvalCommandFlags& f) {
  v1::SubmitJobRequest req;
  v1::JobSpec* spec = req.mutable_spec();
  spec->set_model_uri(AbsolutizeLocalUri(f.model));
  spec->set_reference_model_uri(AbsolutizeLocalUri(f.reference));
  if (!f.output.empty()) spec->set_output_uri(AbsolutizeLocalUri(f.output));
  std::string error;
  if (!FillEvaluationSpec(f.eval, spec->mutable_evaluation(), &error)) return Usage(error);
  spec->set_priority(f.priority);
  spec->set_max_attempts(f.max_attempts);
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
    std::fprintf(stderr, "qforge: request id %s (pass --request-id %s to retry safely)\n",
                 req.request_id().c_str(), req.request_id().c_str());
  }
  if (!s.ok()) {
    return ReportRpcError(s, f.validate_only ? "validate" : "eval", conn.config());
  }
  const OutputFormat format = ParseFormat(f.format);
  if (f.validate_only) {
    std::fprintf(stderr, "qforge: the spec is valid: %d evaluation tasks would run\n",
                 job.tasks().total());
    PrintJob(job, format);
    return kExitOk;
  }
  if (f.no_wait) {
    if (format == OutputFormat::kTable) {
      std::fprintf(stderr, "qforge: submitted job %s\n", job.id().c_str());
    }
    PrintJob(job, format);
    return kExitOk;
  }
  std::fprintf(stderr, "qforge: submitted job %s\n", job.id().c_str());
  return FollowJob(conn, job.id(), /*show_progress=*/f.watch, format);
}

}  // namespace

void AddEvalCommand(CLI::App& app, Cli& cli) {
  auto f = std::make_shared<EvalCommandFlags>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Evaluate a model (GPTQ, VPTQ or unquantized) against its original");
  cmd->add_option("model", f->model, "model directory URI to evaluate")->required();
  cmd->add_option("--reference", f->reference, "the original (unquantized) model directory URI")
      ->required();
  AddEvalOptions(cmd, &f->eval, /*data_required=*/true);
  cmd->add_option("--output", f->output,
                  "where the job's report goes (empty or new prefix; default: none)");
  cmd->add_option("--priority", f->priority, "higher runs first (default 0)");
  cmd->add_option("--max-attempts", f->max_attempts, "attempts per task (default: the server's, 4)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--request-id", f->request_id,
                  "idempotency key: resubmitting with the same one returns the same job");
  cmd->add_option("--label", f->labels, "key=value label (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  cmd->add_flag("--validate-only", f->validate_only, "check and plan without creating a job");
  cmd->add_flag("--no-wait", f->no_wait, "print the job and return without waiting");
  cmd->add_flag("--watch", f->watch, "show progress on stderr while waiting");
  AddFormatOption(cmd, &f->format);
  cmd->callback([&cli, f] { cli.run = [f](Connection& conn) { return RunEval(conn, *f); }; });
}

}  // namespace qforge::cli

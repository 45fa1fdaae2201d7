// The `qforge` CLI's commands: each file registers one subcommand on the CLI11 app
// (submit.cc, get.cc, list.cc, watch.cc, cancel.cc, workers.cc, eval.cc, report.cc,
// layers.cc, events.cc, delete.cc); main.cc
// resolves the connection and runs the chosen one. Data goes to stdout, diagnostics and
// progress to stderr.
// Thread-safety: commands run on the main thread; watch's interrupt watcher is internal.
#ifndef QFORGE_CLIENT_CLI_H_
#define QFORGE_CLIENT_CLI_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "client/connection.h"
#include "client/output.h"

namespace qforge::cli {

struct Cli {
  // Global flags (accepted before or after the subcommand).
  std::string endpoint;
  std::string token;
  double timeout_seconds = 30;
  TlsOptions tls;  // --tls-ca, --tls-cert, --tls-key (override the environment and file)
  // Set by the chosen subcommand's parse callback; returns the exit code.
  std::function<int(Connection&)> run;
};

void AddSubmitCommand(CLI::App& app, Cli& cli);
void AddGetCommand(CLI::App& app, Cli& cli);
void AddListCommand(CLI::App& app, Cli& cli);
void AddWatchCommand(CLI::App& app, Cli& cli);
void AddCancelCommand(CLI::App& app, Cli& cli);
void AddWorkersCommand(CLI::App& app, Cli& cli);
void AddEvalCommand(CLI::App& app, Cli& cli);
void AddReportCommand(CLI::App& app, Cli& cli);
void AddLayersCommand(CLI::App& app, Cli& cli);
void AddEventsCommand(CLI::App& app, Cli& cli);
void AddDeleteCommand(CLI::App& app, Cli& cli);

// Every layer of job `id` (ListLayers, all pages) into *out, in plan order.
grpc::Status ListAllLayers(Connection& conn, const std::string& id,
                           std::vector<v1::LayerResult>* out);

// The evaluation flags shared by `submit` and `eval` (--eval URI, --eval-samples N,
// --eval-seq-len L, --eval-shard-samples N, --max-ppl-increase PCT, --max-kld X,
// --eval-allow-calibration-data).
struct EvalFlags {
  std::string data;
  int64_t samples = 0, seq_len = 0, shard_samples = 0;
  double max_ppl_increase = 0, max_kld = 0;
  bool allow_calibration_data = false;
  // Options registered by AddEvalOptions, to tell which were given.
  CLI::Option* max_ppl_increase_option = nullptr;
  CLI::Option* max_kld_option = nullptr;
  std::vector<CLI::Option*> options;  // every one but --eval
};
// Registers the flags on `cmd`; `data_required`: --eval is required (qforge eval).
void AddEvalOptions(CLI::App* cmd, EvalFlags* f, bool data_required);
// Fills `spec` from the flags (nothing without --eval). False, with *error naming the flag,
// when an evaluation flag is given without --eval.
bool FillEvaluationSpec(const EvalFlags& f, v1::EvaluationSpec* spec, std::string* error);

// `-o table|json` on a subcommand.
void AddFormatOption(CLI::App* cmd, std::string* format);
OutputFormat ParseFormat(const std::string& format);

// Wall clock, Unix milliseconds.
int64_t NowUnixMs();

// Prints `job` to stdout in `format` (table: FormatJobTable; json: the resource).
void PrintJob(const v1::Job& job, OutputFormat format);

// Follows job `id` until it is terminal, through WatchJob (resumed after the last seen
// sequence when the connection drops; gives up with exit 3 after `reconnect_timeout_ms` of
// failed reconnects). With `show_progress`: a progress bar on stderr when it is a terminal
// (coloured unless NO_COLOR is set or TERM=dumb), per-event lines otherwise. Ctrl-C
// detaches (the job keeps running) and returns 130. Prints the final job to stdout and
// returns ExitCodeForJob (or an RPC error's exit code).
int FollowJob(Connection& conn, const std::string& id, bool show_progress, OutputFormat format,
              int64_t reconnect_timeout_ms = 120'000);

// A call that failed with `code` may succeed when repeated after a reconnect: a dropped or
// restarted server shows as UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, or UNKNOWN/INTERNAL
// ("stream removed"). `watch` and `events -f` resume their stream then.
bool IsTransient(grpc::StatusCode code);

// "queued", "QUANTIZING", "JOB_STATE_FAILED" (any case), or "active" (every non-terminal
// state) → states appended to *out. False for anything else.
bool ParseJobStates(const std::string& text, std::vector<v1::JobState>* out);

// The subcommand of `commands` the user most likely meant by `typed`: the one at the smallest
// edit distance (insertions, deletions, substitutions, adjacent transpositions) when that is at
// most 2 (at most 1 for words of 3 letters or fewer), else one that `typed` is a prefix of.
// "" when none is close. SuggestCommand("sumbit", {...,"submit",...}) == "submit".
std::string SuggestCommand(const std::string& typed, const std::vector<std::string>& commands);

// The first positional argument of argv[1..argc) (the subcommand the user typed), skipping
// the global options and their values (--endpoint X, --token X, --timeout X, --opt=X); ""
// when there is none (only options, or --help / --version).
std::string FirstPositional(int argc, const char* const* argv);

// Prints a hint to stderr when `job` is QUEUED and the coordinator has no live worker (none
// registered, or all lost): the job waits until one connects. Errors of the ListWorkers call
// are ignored (the hint is best effort). True when the hint was printed.
bool HintIfNoLiveWorker(Connection& conn, const v1::Job& job);

// A local path ("model", "./m", "/abs") becomes absolute, so the coordinator reads what the
// user meant; URIs with a scheme ("file://", "s3://") are kept as they are.
std::string AbsolutizeLocalUri(const std::string& uri);

}  // namespace qforge::cli

#endif  // QFORGE_CLIENT_CLI_H_

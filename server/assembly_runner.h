// AssemblyRunner: runs the ASSEMBLE step of jobs (AssembleArtifact, job/assembler.h) in
// background threads, or synchronously for tests, and deletes jobs' staging objects. It
// holds no job state: the JobManager decides when a job assembles, hands over everything
// the run needs, and records the outcome when `finished` is called.
//
// One run: open the model and output stores; when the output already holds this job's
// manifest (written last by an earlier run that was not recorded) nothing is written
// ("reused"); otherwise the artifact is assembled from the staged layers, each checked
// against the digest its task reported (a mismatch: nothing written, the layers listed in
// corrupt_layers). An output store with rename (file://) or server-side copy (s3://) gets the
// artifact written under the job's AssemblyTempPrefix and published by rename (copy), the
// manifest last, after a journal (PublishJournalKey) naming the final keys; what an
// interrupted run left (e.g. before a coordinator restart: final files without the manifest,
// temp files, multipart uploads) is deleted first. Other stores get it written in place, the
// manifest last. Then, when
// `cancelled(job_id)` says the job was cancelled meanwhile, the files just written are
// removed again (the staging stays for the usual clean-up); otherwise, after a successful
// run, the job's staging prefix is deleted. Finally `finished(job_id, outcome)` is called.
//
// Thread-safety: thread-safe. The callbacks are called from the assembling thread (the
// caller's, when run_inline) without any lock of the runner held.
#ifndef QFORGE_SERVER_ASSEMBLY_RUNNER_H_
#define QFORGE_SERVER_ASSEMBLY_RUNNER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "job/assembler.h"
#include "job/spec.h"
#include "server/store_opener.h"

namespace qforge {

// Everything one assembly run needs.
struct AssemblyWork {
  std::string job_id;
  std::shared_ptr<const JobConfig> config;  // the job's converted spec (shared, immutable)
  std::vector<StagedLayer> layers;          // the staged result of every QUANTIZE task
  nlohmann::json calibration = nullptr;     // the manifest's "calibration" (null: none)
};

struct AssemblyOutcome {
  absl::Status status;           // of opening the stores or of AssembleArtifact
  AssembleResult result;         // what was written (status OK and not reused)
  bool reused = false;           // this job's manifest was already there: nothing written
  bool staging_deleted = false;  // the job's staging prefix was deleted
  // Modules whose staged object no longer matches its task's report (status DATA_LOSS):
  // their QUANTIZE tasks must run again.
  std::vector<std::string> corrupt_layers;
};

// Where a job's assembly writes before publishing: `.qforge-staging/<job>/assembly` (under
// the staging prefix, so every clean-up of the job's staging removes it too).
std::string AssemblyTempPrefix(const std::string& job_id);
// The job's publication journal: `.qforge-staging/<job>/publish.json` (job/assembler.h).
std::string PublishJournalKey(const std::string& job_id);

struct AssemblyRunnerOptions {
  StoreOpener open_store;      // model and output stores; required
  std::string qforge_version;  // recorded in manifests
  bool run_inline = false;     // Start runs the assembly in the calling thread
  // Whether the job was cancelled while it assembled; required.
  std::function<bool(const std::string& job_id)> cancelled;
  // The outcome of a run, once per Start; required.
  std::function<void(const std::string& job_id, const AssemblyOutcome& outcome)> finished;
};

class AssemblyRunner {
 public:
  explicit AssemblyRunner(AssemblyRunnerOptions options) : options_(std::move(options)) {}
  // JoinAll().
  ~AssemblyRunner();

  AssemblyRunner(const AssemblyRunner&) = delete;
  AssemblyRunner& operator=(const AssemblyRunner&) = delete;

  // Runs `work` (see the file comment) in a new thread, or before returning when
  // run_inline.
  void Start(AssemblyWork work) ABSL_LOCKS_EXCLUDED(mu_);

  // Joins the threads whose run has finished.
  void ReapFinished() ABSL_LOCKS_EXCLUDED(mu_);

  // Waits for every run in flight, then joins its thread.
  void JoinAll() ABSL_LOCKS_EXCLUDED(mu_);

  // Deletes every object under the job's staging prefix in the store at `output_uri`
  // (ObjectStore::DeletePrefix: with the temp files of killed writers and the directories
  // left empty), after the final files of a publication that did not finish (per the
  // journal; nothing when the output holds this job's manifest). Called after a successful assembly (Run) and, for a job that ended any other
  // way (failed, including a failed assembly that is not retried, or cancelled), by the job
  // manager's staging cleanup. The store's errors (UNAVAILABLE, ...).
  absl::Status DeleteStaging(const std::string& output_uri, const std::string& job_id) const;

 private:
  struct Running {
    std::shared_ptr<std::atomic<bool>> done;
    std::thread thread;
  };

  void Run(const AssemblyWork& work);
  void Join(bool all) ABSL_LOCKS_EXCLUDED(mu_);

  const AssemblyRunnerOptions options_;
  absl::Mutex mu_;
  std::vector<Running> running_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qforge

#endif  // QFORGE_SERVER_ASSEMBLY_RUNNER_H_

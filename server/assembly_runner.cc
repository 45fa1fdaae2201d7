#include "server/assembly_runner.h"

#include <cstdio>
#include <utility>

#include "base/status_macros.h"
#include "common/fault_point.h"
#include "common/safetensors.h"
#include "nlohmann/json.hpp"
#include "job/staging_layout.h"

namespace qforge {
namespace {

void LogError(const std::string& what, const absl::Status& s) {
  std::fprintf(stderr, "qforge-coordinator: %s: %s\n", what.c_str(), s.ToString().c_str());
}

// Whether the output already holds the manifest of job `job_id` (a run that completed
// before a restart, or before its outcome could be recorded, wrote it last).
bool HasManifestOf(ObjectStore& out_store, const std::string& job_id) {
  auto prior = out_store.ReadAll(kManifestName);
  if (!prior.ok()) return false;
  nlohmann::json m = nlohmann::json::parse(*prior, nullptr, /*allow_exceptions=*/false);
  return m.is_object() && m.contains("spec") && m["spec"].is_object() &&
         m["spec"].value("job_id", std::string()) == job_id;
}

}  // namespace

std::string AssemblyTempPrefix(const std::string& job_id) {
  return StagingPrefix(job_id) + "assembly";
}

std::string PublishJournalKey(const std::string& job_id) {
  return StagingPrefix(job_id) + "publish.json";
}

AssemblyRunner::~AssemblyRunner() { JoinAll(); }

void AssemblyRunner::Start(AssemblyWork work) {
  if (options_.run_inline) {
    Run(work);
    return;
  }
  auto done = std::make_shared<std::atomic<bool>>(false);
  std::thread t([this, done, w = std::move(work)] {
    Run(w);
    done->store(true);
  });
  absl::MutexLock lock(&mu_);
  running_.push_back({std::move(done), std::move(t)});
}

void AssemblyRunner::ReapFinished() { Join(/*all=*/false); }

void AssemblyRunner::JoinAll() { Join(/*all=*/true); }

void AssemblyRunner::Join(bool all) {
  std::vector<std::thread> finished;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = running_.begin(); it != running_.end();) {
      if (all || it->done->load()) {
        finished.push_back(std::move(it->thread));
        it = running_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (std::thread& t : finished) t.join();
}

absl::Status AssemblyRunner::DeleteStaging(const std::string& output_uri,
                                           const std::string& job_id) const {
  QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> store, options_.open_store(output_uri));
  // Final files of a publication that never wrote its manifest, then the objects, temp files
  // of killed writers (aborted multipart uploads on S3) and the directories left empty.
  QF_RETURN_IF_ERROR(
      RemoveUnpublished(*store, PublishJournalKey(job_id), kManifestName, job_id));
  return store->DeletePrefix(StagingPrefix(job_id));
}

void AssemblyRunner::Run(const AssemblyWork& work) {
  const JobConfig& config = *work.config;
  const v1::JobSpec& spec = config.spec;
  AssemblyOutcome outcome;
  outcome.status = [&]() -> absl::Status {
    QF_RETURN_IF_ERROR(FaultPoint("assemble.begin"));  // fault tests (common/fault_point.h)
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> model_store,
                        options_.open_store(spec.model_uri()));
    QF_ASSIGN_OR_RETURN(SafetensorsModel model, SafetensorsModel::Open(*model_store, ""));
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> out_store,
                        options_.open_store(spec.output_uri()));
    if (HasManifestOf(*out_store, work.job_id)) {
      outcome.reused = true;
      return absl::OkStatus();
    }
    AssembleRequest req;
    req.model_store = model_store.get();
    req.model_uri = spec.model_uri();
    req.model = &model;
    req.staging_store = out_store.get();
    req.layers = work.layers;
    req.output_store = out_store.get();
    if (out_store->SupportsRename() || out_store->SupportsCopy()) {
      // What an interrupted run left goes first: final files of a publication cut short, then
      // the temp prefix (files, killed writers' temp files or multipart uploads).
      req.temp_dir = AssemblyTempPrefix(work.job_id);
      req.publish_journal = PublishJournalKey(work.job_id);
      QF_RETURN_IF_ERROR(
          RemoveUnpublished(*out_store, req.publish_journal, kManifestName, work.job_id));
      QF_RETURN_IF_ERROR(out_store->DeletePrefix(req.temp_dir + "/"));
    }
    req.method = config.method();
    if (config.method() == ArtifactMethod::kGptq) req.config = QuantizeConfigForSpec(config);
    req.max_shard_bytes = config.max_shard_bytes;
    req.spec = JobSpecToJson(spec);
    req.spec["job_id"] = work.job_id;
    req.calibration = work.calibration;
    req.qforge_version = options_.qforge_version;
    QF_ASSIGN_OR_RETURN(outcome.result, AssembleArtifact(req, &outcome.corrupt_layers));
    return absl::OkStatus();
  }();

  if (outcome.status.ok() && options_.cancelled(work.job_id)) {
    // The user cancelled while the artifact was being written: remove it again.
    if (auto store = options_.open_store(spec.output_uri()); store.ok()) {
      const std::vector<std::string>& written = outcome.result.files_written;
      for (auto it = written.rbegin(); it != written.rend(); ++it) {
        if (absl::Status s = (*store)->Delete(*it); !s.ok()) {
          LogError("removing the artifact of cancelled job " + work.job_id, s);
        }
      }
    }
  } else if (outcome.status.ok()) {
    absl::Status s = DeleteStaging(spec.output_uri(), work.job_id);
    if (!s.ok()) LogError("deleting the staging objects of " + work.job_id, s);
    outcome.staging_deleted = s.ok();
  }
  options_.finished(work.job_id, outcome);
}

}  // namespace qforge

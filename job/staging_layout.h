// Where staged layers (job/staged_layer.h) live in a job's output store: every QUANTIZE
// attempt writes `.qforge-staging/<job>/<task>.<attempt>.layer.safetensors` (a CALIBRATE
// attempt its partial Hessians, under another name), all of a job's staged objects side by
// side in one directory of a file:// store (no directory per task or attempt: creating and
// removing two directories per task cost more than the task on a local disk), the assembler
// reads them from there, and the whole `.qforge-staging/<job>/` prefix is deleted once the
// job is settled. Objects under `.qforge-staging/` never count as "the output holds files".
// The coordinator names the keys; the offline driver (qforge-quantize) uses the same layout
// with a job id of its own and the module as task id.
//
// Thread-safety: pure functions.
#ifndef QFORGE_JOB_STAGING_LAYOUT_H_
#define QFORGE_JOB_STAGING_LAYOUT_H_

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/object_store.h"

namespace qforge {

inline constexpr char kStagingRoot[] = ".qforge-staging";
inline constexpr char kStagedLayerName[] = "layer.safetensors";

// ".qforge-staging/<job_id>/": the prefix of every staging object of the job.
inline std::string StagingPrefix(const std::string& job_id) {
  return absl::StrCat(kStagingRoot, "/", job_id, "/");
}

// The key attempt `attempt` (0-based) of task `task_id` writes its output to: the staged
// layer of a QUANTIZE task (`name` = kStagedLayerName), a CALIBRATE task's partial Hessians
// (kCalibrationPartialName, job/calibration.h): `<prefix><task_id>.<attempt>.<name>`. Distinct
// (task, attempt, name) give distinct keys: `name` is one of the fixed names, none of which
// starts with digits and a dot, and `attempt` is decimal, so the key splits back from its end.
// The key is stored with the task when it is leased, so tasks leased under the earlier layout
// (`<task>/<attempt>/<name>`) keep theirs; both lie under StagingPrefix.
inline std::string StagingKey(const std::string& job_id, const std::string& task_id,
                              int32_t attempt, const char* name = kStagedLayerName) {
  return absl::StrCat(StagingPrefix(job_id), task_id, ".", attempt, ".", name);
}

// Whether `key` lies under `.qforge-staging/` (of any job).
inline bool IsStagingKey(const std::string& key) {
  return absl::StartsWith(key, absl::StrCat(kStagingRoot, "/"));
}

// Deletes the staging prefix of job `job_id` in `store` (ObjectStore::DeletePrefix: objects,
// temp files of killed writers, the directories left empty, so `.qforge-staging/` itself goes
// when no other job uses it) when it goes out of scope, so that a run that fails or returns
// early never leaves staging inside the user's output. DeleteNow deletes at once and reports
// the store's error; the destructor then does nothing. A failure in the destructor is written
// to stderr. `store` is not owned and must outlive the guard. Thread-compatible.
class StagingGuard {
 public:
  StagingGuard(ObjectStore* store, std::string job_id)
      : store_(store), prefix_(StagingPrefix(job_id)) {}
  ~StagingGuard() {
    if (armed_) {
      const absl::Status s = DeleteNow();
      if (!s.ok()) {
        std::fprintf(stderr, "qforge: cannot delete the staging objects under '%s' of %s: %s\n",
                     prefix_.c_str(), store_->uri().c_str(), s.ToString().c_str());
      }
    }
  }
  StagingGuard(const StagingGuard&) = delete;
  StagingGuard& operator=(const StagingGuard&) = delete;

  absl::Status DeleteNow() {
    armed_ = false;
    return store_->DeletePrefix(prefix_);
  }

 private:
  ObjectStore* const store_;
  const std::string prefix_;
  bool armed_ = true;
};

}  // namespace qforge

#endif  // QFORGE_JOB_STAGING_LAYOUT_H_

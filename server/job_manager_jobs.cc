// JobManager: the client calls (submit, get, list, cancel, watch). See job_manager_impl.h.
#include <algorithm>
#include <map>
#include <cstdio>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "google/protobuf/util/message_differencer.h"
#include "job/evaluation_record.h"
#include "job/quality_report.h"
#include "server/job_manager_impl.h"
#include "server/request_limits.h"

namespace qforge {
namespace {

constexpr int kDefaultPageSize = 50;
constexpr int kMaxPageSize = 500;
constexpr int kDefaultWatchEvents = 100;
constexpr int kMaxWatchEvents = 1000;

bool IsTaskFinal(v1::TaskState s) {
  return s == v1::TASK_STATE_SUCCEEDED || s == v1::TASK_STATE_FAILED ||
         s == v1::TASK_STATE_CANCELLED;
}

std::string StateName(v1::JobState s) {
  std::string n = v1::JobState_Name(s);
  return n.rfind("JOB_STATE_", 0) == 0 ? n.substr(10) : n;
}

}  // namespace

absl::Status JobManager::Impl::CheckOutputFree(const std::string& output_uri,
                                               std::string_view tenant) const {
  if (output_uri.empty()) return absl::OkStatus();  // an evaluation-only job without a report
  for (const auto& [id, e] : jobs_) {
    if (IsTerminal(e.rec.job.state()) || e.rec.job.spec().output_uri() != output_uri) continue;
    // Another tenant's job id is not disclosed.
    return absl::InvalidArgumentError(absl::StrCat(
        "spec.output_uri: ", output_uri, " is the output of ",
        e.rec.job.tenant() == tenant ? absl::StrCat("job ", id) : std::string("another job"),
        ", which has not finished"));
  }
  return absl::OkStatus();
}

absl::Status JobManager::Impl::CheckTenantQuota(std::string_view tenant,
                                                int64_t new_tasks) const {
  const std::string who = tenant.empty()
                              ? std::string("this coordinator")
                              : absl::StrCat("tenant '", std::string(tenant), "'");
  if (options_.max_running_jobs_per_tenant > 0) {
    int64_t unfinished = 0;
    for (const auto& [id, e] : jobs_) {
      if (e.rec.job.tenant() == tenant && !IsTerminal(e.rec.job.state())) ++unfinished;
    }
    if (unfinished >= options_.max_running_jobs_per_tenant) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "quota: ", who, " has ", unfinished, " unfinished jobs and the limit is ",
          options_.max_running_jobs_per_tenant,
          " (coordinator flag --max-running-jobs-per-tenant); wait for a job to finish or "
          "cancel one"));
    }
  }
  if (options_.max_queued_tasks_per_tenant > 0) {
    int64_t queued = 0;
    for (const auto& [id, t] : tasks_) {
      if (t.state != v1::TASK_STATE_PENDING && t.state != v1::TASK_STATE_QUEUED) continue;
      auto job = jobs_.find(t.job_id);
      if (job != jobs_.end() && job->second.rec.job.tenant() == tenant &&
          !IsTerminal(job->second.rec.job.state())) {
        ++queued;
      }
    }
    if (queued + new_tasks > options_.max_queued_tasks_per_tenant) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "quota: ", who, " has ", queued, " queued tasks and this job adds ", new_tasks,
          "; the limit is ", options_.max_queued_tasks_per_tenant,
          " (coordinator flag --max-queued-tasks-per-tenant); wait for queued work to run, or "
          "select fewer layers (spec.include / spec.exclude)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> JobManager::Impl::SubmitJob(std::string_view tenant,
                                                    const v1::SubmitJobRequest& request) {
  QF_RETURN_IF_ERROR(CheckRequest(request));
  const std::string& rid = request.request_id();
  // The one conversion of this job's spec: planning, scheduling and assembly use it.
  QF_ASSIGN_OR_RETURN(JobConfig converted,
                      ConvertJobSpec(request.spec(), SpecOptionsFor(tenant)));
  const auto config = std::make_shared<const JobConfig>(std::move(converted));
  const v1::JobSpec& normalized = config->spec;
  std::vector<WorkerRecord> live_workers;  // the CALIBRATE shard size depends on them
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    const int64_t now = Now();
    for (const auto& [id, w] : workers_) {
      if (!scheduler_.WorkerLost(w, now)) live_workers.push_back(w);
    }
  }
  // Requires mu_.
  auto same_request = [&]() -> absl::StatusOr<v1::Job> {
    auto it = by_request_.find({std::string(tenant), rid});
    if (it == by_request_.end()) return absl::NotFoundError("");
    const JobRecord& prior = jobs_.at(it->second).rec;
    if (!google::protobuf::util::MessageDifferencer::Equals(prior.job.spec(), normalized)) {
      return absl::AlreadyExistsError(absl::StrCat(
          "request_id '", rid, "' was already used for job ", it->second,
          " with a different spec; use a new request_id for a new job"));
    }
    Txn view(this);
    return BuildJob(view, it->second);
  };
  if (!request.validate_only()) {
    absl::MutexLock lock(&mu_);
    if (!rid.empty()) {
      auto prior = same_request();
      if (prior.ok() || prior.status().code() != absl::StatusCode::kNotFound) return prior;
    }
    QF_RETURN_IF_ERROR(CheckOutputFree(normalized.output_uri(), tenant));
    QF_RETURN_IF_ERROR(CheckTenantQuota(tenant, 0));  // before the planning I/O
  }

  // Validation and planning read headers (and token data) through the stores: no lock held.
  if (!config->calibration.dataset_uri.empty() && options_.hessian_cache_uri.empty()) {
    return absl::FailedPreconditionError(
        "spec.calibration.dataset_uri: this coordinator has no Hessian cache to calibrate into "
        "(start it with --hessian-cache URI); give --hessians or --calibration none");
  }
  if (config->evaluation_only() && normalized.output_uri().empty() &&
      options_.hessian_cache_uri.empty()) {
    return absl::FailedPreconditionError(
        "spec.output_uri: an evaluation-only job without an output stages its shards' sums in "
        "the coordinator's Hessian cache, and this coordinator has none (start it with "
        "--hessian-cache URI); or give the job an output prefix (qforge eval --output URI)");
  }
  QF_ASSIGN_OR_RETURN(JobPlan plan, planner_.Plan(*config, live_workers));
  const int64_t now = Now();
  // Plan order: [CALIBRATE × shards, REDUCE,] QUANTIZE × layers, ASSEMBLE, [EVALUATE ×
  // shards, EVAL_REDUCE]; an evaluation-only job has the last two only.
  std::vector<TaskRecord> tasks = std::move(plan.tasks);
  if (!config->evaluation_only()) {
    TaskRecord assemble;
    assemble.kind = v1::TASK_KIND_ASSEMBLE;
    assemble.state = v1::TASK_STATE_PENDING;
    tasks.push_back(std::move(assemble));
  }
  for (TaskRecord& t : plan.evaluation_tasks) tasks.push_back(std::move(t));

  if (request.validate_only()) {
    {
      absl::MutexLock lock(&mu_);
      QF_RETURN_IF_ERROR(CheckTenantQuota(tenant, static_cast<int64_t>(tasks.size())));
    }
    v1::Job job;
    job.set_tenant(std::string(tenant));
    *job.mutable_spec() = normalized;
    job.set_state(v1::JOB_STATE_UNSPECIFIED);
    job.set_request_id(rid);
    job.set_eta_seconds(-1);
    if (plan.dataset_calibration) *job.mutable_calibration() = plan.calibration;
    v1::TaskCounts* c = job.mutable_tasks();
    c->set_total(static_cast<int32_t>(tasks.size()));
    int32_t queued = 0;
    int32_t layers = 0;
    for (const TaskRecord& t : tasks) {
      queued += t.state == v1::TASK_STATE_QUEUED ? 1 : 0;
      layers += t.kind == v1::TASK_KIND_QUANTIZE ? 1 : 0;
    }
    c->set_queued(queued);
    c->set_layers(layers);
    c->set_pending(c->total() - queued);
    return job;
  }

  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  if (!rid.empty()) {  // a concurrent retry may have won
    auto prior = same_request();
    if (prior.ok() || prior.status().code() != absl::StatusCode::kNotFound) return prior;
  }
  QF_RETURN_IF_ERROR(CheckOutputFree(normalized.output_uri(), tenant));
  QF_RETURN_IF_ERROR(CheckTenantQuota(tenant, static_cast<int64_t>(tasks.size())));

  std::string job_id;
  do {
    job_id = absl::StrCat("job-", RandomHex(6));
  } while (jobs_.count(job_id) != 0);
  JobRecord rec;
  rec.job.set_id(job_id);
  rec.job.set_tenant(std::string(tenant));
  *rec.job.mutable_spec() = normalized;
  rec.job.set_state(v1::JOB_STATE_QUEUED);
  rec.job.set_create_time_unix_ms(now);
  rec.job.set_request_id(rid);
  rec.job.set_eta_seconds(-1);
  if (plan.dataset_calibration) *rec.job.mutable_calibration() = plan.calibration;

  size_t quantize = 0, calibrate = 0, evaluate = 0;
  for (size_t i = 0; i < tasks.size(); ++i) {
    TaskRecord& t = tasks[i];
    char suffix[32];
    switch (t.kind) {
      case v1::TASK_KIND_CALIBRATE:
        std::snprintf(suffix, sizeof(suffix), "-c%05zu", calibrate++);
        break;
      case v1::TASK_KIND_REDUCE:
        std::snprintf(suffix, sizeof(suffix), "-reduce");
        break;
      case v1::TASK_KIND_ASSEMBLE:
        std::snprintf(suffix, sizeof(suffix), "-assemble");
        break;
      case v1::TASK_KIND_EVALUATE:
        std::snprintf(suffix, sizeof(suffix), "-e%05zu", evaluate++);
        break;
      case v1::TASK_KIND_EVAL_REDUCE:
        std::snprintf(suffix, sizeof(suffix), "-eval-reduce");
        break;
      default:
        std::snprintf(suffix, sizeof(suffix), "-q%05zu", quantize++);
        break;
    }
    t.id = job_id + suffix;
    t.job_id = job_id;
    t.ordinal = static_cast<int32_t>(i);
    t.create_ms = now;
    if (t.state == v1::TASK_STATE_QUEUED) t.queued_ms = now;
  }

  Txn tx(this);
  tx.NewJob(std::move(rec), std::move(tasks), config);
  if (config->evaluation_only()) {
    tx.Event(job_id, absl::StrCat("submitted: evaluation of ", normalized.model_uri(),
                                  " against ", normalized.reference_model_uri()));
  } else {
    tx.Event(job_id, absl::StrCat("submitted: ", plan.layers, " layers to quantize"));
  }
  if (plan.dataset_calibration) {
    const v1::CalibrationInfo& c = plan.calibration;
    if (!plan.cache_note.empty()) tx.Event(job_id, plan.cache_note);
    if (c.cache_hit()) {
      tx.Event(job_id, absl::StrCat("calibration: cached Hessians found (", plan.cache_key,
                                    "), skipping calibration"));
    } else {
      tx.Event(job_id,
               absl::StrCat("calibration: ", c.samples(), " samples × ", c.seq_len(),
                            " tokens (", c.tokens(), " real", c.packed() ? ", packed" : "",
                            ") of ", c.dataset_uri(), " in ", plan.shards, " shard(s)",
                            config->calibration.no_cache ? " (--no-cache)" : ""));
    }
  }
  if (plan.evaluation) {
    const EvaluationConfig& ev = config->evaluation;
    std::string gate;
    if (ev.max_ppl_increase_pct) {
      absl::StrAppend(&gate, ", perplexity may rise ", *ev.max_ppl_increase_pct, " % at most");
    }
    if (ev.max_kl) absl::StrAppend(&gate, ", mean KL ", *ev.max_kl, " nats at most");
    tx.Event(job_id, absl::StrCat("evaluation: ", plan.eval_samples, " samples × ",
                                  plan.eval_seq_len, " tokens of ", ev.dataset_uri, " in ",
                                  plan.eval_shards, " shard(s)", gate));
  }
  QF_RETURN_IF_ERROR(tx.Commit());
  SignalWork();
  Txn view(this);
  return BuildJob(view, job_id);
}

absl::StatusOr<v1::Job> JobManager::Impl::GetJob(std::string_view tenant,
                                                 std::string_view job_id) {
  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, job_id));
  Txn view(this);
  return BuildJob(view, e->rec.job.id());
}

absl::StatusOr<v1::JobReport> JobManager::Impl::GetJobReport(std::string_view tenant,
                                                             std::string_view job_id) {
  v1::Job job;
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, job_id));
    job = e->rec.job;
  }
  const v1::JobSpec& spec = job.spec();
  if (!job.has_quality() || job.quality().tokens() == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job.id(), " has no evaluation results",
        spec.evaluation().dataset_uri().empty()
            ? " (it was submitted without evaluation data: --eval DATA)"
            : absl::StrCat(" yet (", StateName(job.state()), ")")));
  }
  v1::JobReport report;
  const std::string report_uri =
      spec.output_uri().empty() ? "" : ChildUri(spec.output_uri(), kQualityReportName);
  absl::StatusOr<std::string> html;
  if (spec.reference_model_uri().empty()) {
    // A quantization job: the page of its manifest (which holds the quality).
    QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> output,
                        options_.open_store(spec.output_uri()));
    QF_ASSIGN_OR_RETURN(nlohmann::json manifest, ReadManifest(*output, kManifestName));
    html = RenderQualityReportHtml(manifest);
  } else {
    QualityGate gate;
    if (job.quality().has_max_ppl_increase_pct()) {
      gate.max_ppl_increase_pct = job.quality().max_ppl_increase_pct();
    }
    if (job.quality().has_max_kl()) gate.max_kl = job.quality().max_kl();
    const char* gate_text = !job.quality().gate_enabled() ? kGateNone
                            : job.quality().gate_passed() ? kGatePassed
                                                          : kGateFailed;
    html = RenderQualityReportHtml(EvaluationReportDocument(
        spec.model_uri(), spec.reference_model_uri(), QualityRecordJson(job.quality(), gate),
        gate_text, job.id(), ""));
  }
  if (!html.ok()) {
    return absl::Status(html.status().code(),
                        absl::StrCat("rendering the quality report of job ", job.id(), ": ",
                                     html.status().message()));
  }
  report.set_html(*std::move(html));
  report.set_uri(report_uri);
  return report;
}

absl::StatusOr<v1::ListJobsResponse> JobManager::Impl::ListJobs(
    std::string_view tenant, const v1::ListJobsRequest& request) {
  QF_RETURN_IF_ERROR(CheckRequest(request));
  const int page_size = request.page_size() == 0 ? kDefaultPageSize
                                                 : std::min(request.page_size(), kMaxPageSize);
  // Newest first; the token is the (create time, id) of the last job returned.
  bool have_cursor = false;
  int64_t cursor_ms = 0;
  std::string cursor_id;
  if (!request.page_token().empty()) {
    std::string raw;
    const size_t slash = [&] {
      if (!absl::WebSafeBase64Unescape(request.page_token(), &raw)) return std::string::npos;
      return raw.find('/');
    }();
    if (slash == std::string::npos || !absl::SimpleAtoi(raw.substr(0, slash), &cursor_ms)) {
      return absl::InvalidArgumentError("page_token: malformed (pass back next_page_token as is)");
    }
    cursor_id = raw.substr(slash + 1);
    have_cursor = true;
  }
  std::set<int> states(request.states().begin(), request.states().end());

  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  std::vector<const JobEntry*> matching;
  for (const auto& [id, e] : jobs_) {
    if (e.rec.job.tenant() != tenant) continue;
    if (!states.empty() && states.count(e.rec.job.state()) == 0) continue;
    if (have_cursor) {
      const int64_t ms = e.rec.job.create_time_unix_ms();
      if (ms > cursor_ms || (ms == cursor_ms && id >= cursor_id)) continue;
    }
    matching.push_back(&e);
  }
  std::sort(matching.begin(), matching.end(), [](const JobEntry* a, const JobEntry* b) {
    const int64_t am = a->rec.job.create_time_unix_ms(), bm = b->rec.job.create_time_unix_ms();
    if (am != bm) return am > bm;
    return a->rec.job.id() > b->rec.job.id();
  });
  v1::ListJobsResponse out;
  Txn view(this);
  for (size_t i = 0; i < matching.size() && i < static_cast<size_t>(page_size); ++i) {
    *out.add_jobs() = BuildJob(view, matching[i]->rec.job.id());
  }
  if (matching.size() > static_cast<size_t>(page_size)) {
    const v1::Job& last = out.jobs(out.jobs_size() - 1);
    out.set_next_page_token(
        absl::WebSafeBase64Escape(absl::StrCat(last.create_time_unix_ms(), "/", last.id())));
  }
  return out;
}

absl::StatusOr<v1::Job> JobManager::Impl::CancelJob(std::string_view tenant,
                                                    std::string_view job_id) {
  absl::StatusOr<v1::Job> result;
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, job_id));
    const std::string id = e->rec.job.id();
    const v1::JobState state = e->rec.job.state();
    if (state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED) {
      return absl::FailedPreconditionError(absl::StrCat("job ", id, " already ",
                                                        StateName(state), "; nothing to cancel"));
    }
    if (state != v1::JOB_STATE_CANCELLING && state != v1::JOB_STATE_CANCELLED) {
      const int64_t now = Now();
      Txn tx(this);
      int running = 0;
      for (const TaskRecord& t : tx.TasksOf(id)) {
        if (t.state == v1::TASK_STATE_RUNNING) {
          ++running;
        } else if (!IsTaskFinal(t.state)) {
          TaskRecord& c = tx.Task(t.id);
          c.state = v1::TASK_STATE_CANCELLED;
          c.end_ms = now;
        }
      }
      JobRecord& j = tx.Job(id);
      if (running > 0 || e->assembling) {
        j.job.set_state(v1::JOB_STATE_CANCELLING);
        tx.Event(id, absl::StrCat("cancelling: waiting for ", std::max(running, 1),
                                  " running task(s) to stop"));
      } else {
        j.job.set_state(v1::JOB_STATE_CANCELLED);
        j.job.set_end_time_unix_ms(now);
        tx.Event(id, "cancelled");
      }
      QF_RETURN_IF_ERROR(tx.Commit());
      tick_cv_.SignalAll();  // staging cleanup
    }
    Txn view(this);
    result = BuildJob(view, id);
  }
  FlushNotes();
  return result;
}

absl::StatusOr<std::vector<v1::JobEvent>> JobManager::Impl::WatchEvents(
    std::string_view tenant, std::string_view job_id, int64_t after_sequence, int max_events,
    int64_t wait_ms, bool* job_finished) {
  if (job_finished != nullptr) *job_finished = false;
  if (after_sequence < 0) after_sequence = 0;
  max_events = max_events <= 0 ? kDefaultWatchEvents : std::min(max_events, kMaxWatchEvents);
  const std::string id(job_id);
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    QF_RETURN_IF_ERROR(FindJob(tenant, job_id).status());
    const absl::Time deadline = absl::Now() + absl::Milliseconds(std::max<int64_t>(0, wait_ms));
    JobEntry* e = nullptr;
    for (;;) {
      // Looked up again after every wait: the job may have been deleted meanwhile.
      auto it = jobs_.find(id);
      if (it == jobs_.end()) {
        if (job_finished != nullptr) *job_finished = true;
        return std::vector<v1::JobEvent>();
      }
      e = &it->second;
      if (e->last_sequence > after_sequence || IsTerminal(e->rec.job.state()) || shutdown_ ||
          absl::Now() >= deadline) {
        break;
      }
      event_cv_.WaitWithDeadline(&mu_, deadline);
    }
    QF_RETURN_IF_ERROR(CheckRunning());
    if (e->last_sequence <= after_sequence) {
      // Nothing new (a poll with wait_ms 0, or the wait ended): no database read.
      if (job_finished != nullptr) *job_finished = IsTerminal(e->rec.job.state());
      return std::vector<v1::JobEvent>();
    }
    // A watcher that keeps up gets the events from memory, as the store holds them.
    const std::deque<v1::JobEvent>& recent = e->recent_events;
    if (!recent.empty() && recent.front().sequence() <= after_sequence + 1) {
      std::vector<v1::JobEvent> events;
      for (auto it = recent.begin() + (after_sequence + 1 - recent.front().sequence());
           it != recent.end() && static_cast<int>(events.size()) < max_events; ++it) {
        events.push_back(*it);
      }
      if (job_finished != nullptr) {
        *job_finished = IsTerminal(e->rec.job.state()) &&
                        events.back().sequence() >= e->last_sequence;
      }
      return events;
    }
  }
  QF_ASSIGN_OR_RETURN(std::vector<v1::JobEvent> events,
                      store_->ReadEvents(id, after_sequence, max_events));
  if (job_finished != nullptr) {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end()) {
      // Deleted while the events were read (DeleteJob, retention): nothing more will come.
      *job_finished = true;
      return events;
    }
    const JobEntry& e = it->second;
    const int64_t seen = events.empty() ? after_sequence : events.back().sequence();
    *job_finished = IsTerminal(e.rec.job.state()) && seen >= e.last_sequence;
  }
  return events;
}

void JobManager::Impl::NotifyOnEvents(std::string_view job_id, int64_t after_sequence,
                                      int64_t max_wait_ms, std::function<void()> wake) {
  const std::string id(job_id);
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    const bool now = shutdown_ || it == jobs_.end() ||
                     it->second.last_sequence > after_sequence ||
                     IsTerminal(it->second.rec.job.state());
    if (!now) {
      // Registered under the lock, so that no event committed after the check is missed
      // (commits fire under the same lock). The board runs it on its own thread.
      wakeups_.Add(EventWakeupKey(id), absl::Milliseconds(max_wait_ms), std::move(wake));
      return;
    }
  }
  // Due now. Outside the lock: once the board has stopped (the JobManager is being
  // destroyed) Add runs `wake` on this thread, and it may call back in.
  wakeups_.Add(EventWakeupKey(id), absl::ZeroDuration(), std::move(wake));
}

absl::StatusOr<v1::ListLayersResponse> JobManager::Impl::ListLayers(
    std::string_view tenant, const v1::ListLayersRequest& request) {
  QF_RETURN_IF_ERROR(CheckRequest(request));
  constexpr int kDefaultLayerPage = 100, kMaxLayerPage = 1000;
  const int page_size = request.page_size() == 0 ? kDefaultLayerPage
                                                 : std::min(request.page_size(), kMaxLayerPage);
  // The token is the index of the first layer of the next page (among the QUANTIZE tasks).
  int64_t first = 0;
  if (!request.page_token().empty()) {
    std::string raw;
    absl::string_view rest;
    if (!absl::WebSafeBase64Unescape(request.page_token(), &raw) ||
        !absl::ConsumePrefix(&(rest = raw), "layer:") || !absl::SimpleAtoi(rest, &first) ||
        first < 0) {
      return absl::InvalidArgumentError("page_token: malformed (pass back next_page_token as is)");
    }
  }
  std::vector<TaskRecord> tasks;
  std::map<std::string, TaskProgress> progress;
  v1::JobSpec spec;
  std::string id;
  bool settled = false;
  {
    absl::MutexLock lock(&mu_);
    QF_RETURN_IF_ERROR(CheckRunning());
    QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, request.id()));
    id = e->rec.job.id();
    spec = e->rec.job.spec();
    settled = e->rec.settled;
    if (!settled) {
      for (const std::string& task_id : e->task_ids) {
        const TaskRecord& t = tasks_.at(task_id);
        if (t.kind != v1::TASK_KIND_QUANTIZE) continue;
        tasks.push_back(t);
        auto p = progress_.find(task_id);
        if (p != progress_.end()) progress.emplace(task_id, p->second);
      }
    }
  }
  if (settled) {  // its tasks live in the StateStore only
    QF_ASSIGN_OR_RETURN(std::vector<TaskRecord> all, store_->ReadTasks(id));
    for (TaskRecord& t : all) {
      if (t.kind == v1::TASK_KIND_QUANTIZE) tasks.push_back(std::move(t));
    }
  }
  v1::ListLayersResponse out;
  out.set_total_layers(static_cast<int32_t>(tasks.size()));
  first = std::min<int64_t>(first, static_cast<int64_t>(tasks.size()));  // past the end: empty
  const int64_t end = std::min<int64_t>(static_cast<int64_t>(tasks.size()), first + page_size);
  for (int64_t i = first; i < end; ++i) {
    const TaskRecord& t = tasks[static_cast<size_t>(i)];
    auto p = progress.find(t.id);
    *out.add_layers() = LayerResultOf(t, spec, p == progress.end() ? nullptr : &p->second);
  }
  if (end < static_cast<int64_t>(tasks.size())) {
    out.set_next_page_token(absl::WebSafeBase64Escape(absl::StrCat("layer:", end)));
  }
  return out;
}

absl::Status JobManager::Impl::DeleteJob(std::string_view tenant, std::string_view job_id) {
  absl::MutexLock lock(&mu_);
  QF_RETURN_IF_ERROR(CheckRunning());
  QF_ASSIGN_OR_RETURN(JobEntry * e, FindJob(tenant, job_id));
  const std::string id = e->rec.job.id();
  if (!IsTerminal(e->rec.job.state())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", id, " is ",
        std::string(absl::StripPrefix(v1::JobState_Name(e->rec.job.state()), "JOB_STATE_")),
        ": only a finished job (SUCCEEDED, FAILED, CANCELLED) can be deleted; cancel it first "
        "(qforge cancel ", id, " --wait)"));
  }
  if (!e->rec.settled) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", id, " has just ended and is still deleting its staging files; retry in a few "
        "seconds"));
  }
  return RemoveJobs({id});
}


}  // namespace qforge

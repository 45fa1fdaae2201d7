#include "server/job_manager.h"

#include <algorithm>
#include <cstdio>
#include <random>
#include <tuple>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "common/fault_point.h"
#include "common/store_traffic.h"
#include "job/evaluation_record.h"
#include "job/quality_report.h"
#include "job/staging_layout.h"
#include "server/job_manager_impl.h"
#include "server/request_limits.h"
#include "server/state_store.h"

namespace qforge {
namespace {

JobManagerOptions WithDefaultOpener(JobManagerOptions options) {
  if (!options.open_store) {
    options.open_store = [](std::string_view uri) { return OpenCountedObjectStore(uri); };
  }
  return options;
}

// `name` without its enum prefix: "TASK_STATE_RUNNING" -> "RUNNING".
std::string EnumSuffix(const std::string& name, std::string_view prefix) {
  return name.compare(0, prefix.size(), prefix) == 0 ? name.substr(prefix.size()) : name;
}

SpecOptions SpecOptionsOf(const JobManagerOptions& options) {
  SpecOptions s;
  s.default_max_attempts = options.default_max_attempts;
  s.allowed_file_roots = options.allowed_file_roots;
  if (!options.hessian_cache_uri.empty()) {
    s.allowed_hessian_roots.push_back(options.hessian_cache_uri);
  }
  return s;
}

SchedulerPolicy PolicyOf(const JobManagerOptions& options) {
  SchedulerPolicy p;
  p.lease_duration_ms = options.lease_duration_ms;
  p.worker_lost_after_ms = options.worker_lost_after_ms;
  p.retry_initial_backoff_ms = options.retry_initial_backoff_ms;
  p.retry_backoff_multiplier = options.retry_backoff_multiplier;
  p.retry_max_backoff_ms = options.retry_max_backoff_ms;
  return p;
}

}  // namespace

JobManager::Impl::Impl(std::unique_ptr<StateStore> store, Clock* clock, JobManagerOptions options,
                       JobManagerListener* listener)
    : store_(std::move(store)),
      clock_(clock),
      options_(WithDefaultOpener(std::move(options))),
      spec_options_(SpecOptionsOf(options_)),
      listener_(listener),
      scheduler_(PolicyOf(options_)),
      planner_(options_.open_store, options_.task_memory_factor, options_.hessian_cache_uri),
      assembly_(AssemblyRunnerOptions{
          options_.open_store, options_.qforge_version, options_.run_assembly_inline,
          [this](const std::string& job_id) { return AssemblyCancelled(job_id); },
          [this](const std::string& job_id, const AssemblyOutcome& outcome) {
            FinishAssembly(job_id, outcome);
          }}) {}

// ---- Helpers ------------------------------------------------------------------------------

SpecOptions JobManager::Impl::SpecOptionsFor(std::string_view tenant) const {
  SpecOptions s = spec_options_;
  auto it = options_.tenant_file_roots.find(std::string(tenant));
  if (it != options_.tenant_file_roots.end()) {
    s.allowed_file_roots.insert(s.allowed_file_roots.end(), it->second.begin(), it->second.end());
  }
  return s;
}

std::string JobManager::Impl::RandomHex(int bytes) {
  // The system's entropy source, opened once per thread (not once per token).
  thread_local std::random_device rd;
  std::string raw;
  while (static_cast<int>(raw.size()) < bytes) {
    uint32_t v = rd();
    for (int i = 0; i < 4 && static_cast<int>(raw.size()) < bytes; ++i) {
      raw.push_back(static_cast<char>(v & 0xff));
      v >>= 8;
    }
  }
  return absl::BytesToHexString(raw);
}

std::string JobManager::Impl::Seconds(int64_t ms) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f s", static_cast<double>(ms) / 1000.0);
  return buf;
}

v1::ErrorInfo JobManager::Impl::MakeError(absl::StatusCode code, std::string message,
                                          std::string reason, std::string subject) {
  v1::ErrorInfo e;
  e.set_code(static_cast<int32_t>(code));
  e.set_message(std::move(message));
  e.set_reason(std::move(reason));
  e.set_subject(std::move(subject));
  return e;
}

void JobManager::Impl::LogError(const std::string& what, const absl::Status& s) {
  std::fprintf(stderr, "qforge-coordinator: %s: %s\n", what.c_str(), s.ToString().c_str());
}

// ---- Txn ----------------------------------------------------------------------------------

const JobRecord& JobManager::Impl::Txn::PeekJob(const std::string& id) const {
  auto it = jobs_.find(id);
  return it != jobs_.end() ? it->second : m_->jobs_.at(id).rec;
}

JobRecord& JobManager::Impl::Txn::Job(const std::string& id) {
  auto it = jobs_.find(id);
  if (it != jobs_.end()) return it->second;
  return jobs_.emplace(id, m_->jobs_.at(id).rec).first->second;
}

const TaskRecord& JobManager::Impl::Txn::PeekTask(const std::string& id) const {
  auto it = tasks_.find(id);
  return it != tasks_.end() ? it->second : m_->tasks_.at(id);
}

TaskRecord& JobManager::Impl::Txn::Task(const std::string& id) {
  auto it = tasks_.find(id);
  if (it != tasks_.end()) return it->second;
  const TaskRecord& base = m_->tasks_.at(id);
  TaskRecord& copy = tasks_.emplace(id, base).first->second;
  staged_.emplace_back(&base, &copy);
  if (staged_.size() > kLinearStaged) {
    if (staged_index_.empty()) staged_index_.insert(staged_.begin(), staged_.end());
    staged_index_.emplace(&base, &copy);
  }
  return copy;
}

WorkerRecord& JobManager::Impl::Txn::Worker(const std::string& id) {
  auto it = workers_.find(id);
  if (it != workers_.end()) return it->second;
  return workers_.emplace(id, m_->workers_.at(id)).first->second;
}

JobManager::Impl::Txn::TaskRange JobManager::Impl::Txn::TasksOf(
    const std::string& job_id) const {
  auto it = new_task_refs_.find(job_id);
  return TaskRange(this, it != new_task_refs_.end() ? &it->second
                                                    : &m_->jobs_.at(job_id).task_refs);
}

void JobManager::Impl::Txn::NewJob(JobRecord rec, std::vector<TaskRecord> tasks,
                                   std::shared_ptr<const JobConfig> config) {
  const std::string id = rec.job.id();
  std::vector<std::string>& ids = new_task_ids_[id];
  std::vector<const TaskRecord*>& refs = new_task_refs_[id];
  for (TaskRecord& t : tasks) {
    ids.push_back(t.id);
    const std::string task_id = t.id;
    refs.push_back(&tasks_.emplace(task_id, std::move(t)).first->second);
  }
  jobs_.emplace(id, std::move(rec));
  new_configs_[id] = std::move(config);
}

void JobManager::Impl::Txn::NewWorker(WorkerRecord w) {
  const std::string id = w.id;
  workers_.emplace(id, std::move(w));
}

void JobManager::Impl::Txn::Event(const std::string& job_id, std::string message,
                                  const TaskRecord* task, v1::EventType type) {
  if (!IsNewJob(job_id) && IsTerminal(m_->jobs_.at(job_id).rec.job.state())) return;
  auto seq = sequences_.find(job_id);
  if (seq == sequences_.end()) {
    const int64_t last = IsNewJob(job_id) ? 0 : m_->jobs_.at(job_id).last_sequence;
    seq = sequences_.emplace(job_id, last).first;
  }
  v1::JobEvent e;
  e.set_sequence(++seq->second);
  e.set_time_unix_ms(m_->Now());
  e.set_job_id(job_id);
  e.set_job_state(PeekJob(job_id).job.state());
  *e.mutable_tasks() = m_->Counts(*this, job_id);
  e.set_message(std::move(message));
  e.set_eta_seconds(m_->Eta(*this, job_id));
  e.set_progress(m_->Progress(*this, job_id));
  if (type == v1::EVENT_TYPE_UNSPECIFIED) {
    type = task != nullptr ? v1::EVENT_TYPE_TASK : v1::EVENT_TYPE_JOB;
  }
  e.set_type(type);
  *e.mutable_running() = m_->Running(*this, job_id);
  if (task != nullptr) {
    v1::TaskEvent* te = e.mutable_task();
    te->set_task_id(task->id);
    te->set_kind(task->kind);
    te->set_layer(task->layer.module());
    te->set_state(task->state);
    te->set_attempt(task->attempt);
    te->set_worker_id(task->worker_id);
    te->set_proxy_loss(task->metrics.proxy_loss());
    te->set_relative_error(task->metrics.relative_error());
    if (task->end_ms > 0 && task->start_ms > 0) {
      te->set_seconds(static_cast<double>(task->end_ms - task->start_ms) / 1000.0);
    }
    if (task->error.code() != 0) *te->mutable_error() = task->error;
  }
  events_.push_back(std::move(e));
}

std::vector<std::string> JobManager::Impl::Txn::FaultPointNames() const {
  std::vector<std::string> out;
  for (const auto& [id, r] : jobs_) {
    auto it = m_->jobs_.find(id);
    if (it == m_->jobs_.end() || it->second.rec.job.state() != r.job.state()) {
      out.push_back("job." + EnumSuffix(v1::JobState_Name(r.job.state()), "JOB_STATE_"));
    }
  }
  for (const auto& [id, t] : tasks_) {
    auto it = m_->tasks_.find(id);
    if (it != m_->tasks_.end() && it->second.state == t.state) continue;
    if (it == m_->tasks_.end() && IsNewJob(t.job_id)) continue;  // planned with its job
    out.push_back(absl::StrCat("task.", EnumSuffix(v1::TaskKind_Name(t.kind), "TASK_KIND_"), ".",
                               EnumSuffix(v1::TaskState_Name(t.state), "TASK_STATE_")));
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

absl::Status JobManager::Impl::Txn::Commit() {
  // Fault tests (common/fault_point.h) stop or fail the coordinator just before or after a
  // transition is persisted; an error before it is handled as the store's own would be.
  std::vector<std::string> points;
  if (FaultHooksEnabled()) points = FaultPointNames();
  // Tasks, workers and events move into the mutation (and tasks and workers from it into
  // memory once persisted): a transition is used once, and a failed Commit drops it.
  StateMutation m;
  for (const auto& [id, r] : jobs_) m.jobs.push_back(r);
  for (auto& [id, t] : tasks_) m.tasks.push_back(std::move(t));
  for (auto& [id, w] : workers_) m.workers.push_back(std::move(w));
  const bool any_events = !events_.empty();
  m.events = std::move(events_);
  if (m.empty()) return absl::OkStatus();
  // New jobs first: tasks and events reference them.
  std::stable_partition(m.jobs.begin(), m.jobs.end(),
                        [&](const JobRecord& r) { return IsNewJob(r.job.id()); });
  for (const std::string& p : points) {
    QF_RETURN_IF_ERROR(FaultPoint(absl::StrCat("coordinator.persist.before.", p)));
  }
  QF_RETURN_IF_ERROR(m_->store_->Apply(m));
  // Persisted: only a kill or a delay means something here (an error could not undo it).
  for (const std::string& p : points) {
    (void)FaultPoint(absl::StrCat("coordinator.persist.after.", p));
  }

  // Metrics: created jobs and jobs that became terminal in this transition.
  for (const auto& [id, r] : jobs_) {
    auto before = m_->jobs_.find(id);
    const v1::Method method = r.job.spec().method();
    if (before == m_->jobs_.end()) m_->Note([method](JobManagerListener& l) { l.OnJobSubmitted(method); });
    const bool was_terminal = before != m_->jobs_.end() && IsTerminal(before->second.rec.job.state());
    if (!was_terminal && IsTerminal(r.job.state())) {
      const v1::JobState state = r.job.state();
      const int64_t end = r.job.end_time_unix_ms() > 0 ? r.job.end_time_unix_ms() : m_->Now();
      const double seconds =
          static_cast<double>(std::max<int64_t>(0, end - r.job.create_time_unix_ms())) / 1000.0;
      m_->Note([method, state, seconds](JobManagerListener& l) {
        l.OnJobFinished(method, state, seconds);
      });
    }
  }

  for (auto& [id, r] : jobs_) {
    auto it = m_->jobs_.find(id);
    if (it == m_->jobs_.end()) {
      JobEntry e;
      e.rec = std::move(r);
      e.task_ids = new_task_ids_[id];
      e.config = new_configs_[id];
      if (!e.rec.job.request_id().empty()) {
        m_->by_request_[{e.rec.job.tenant(), e.rec.job.request_id()}] = id;
      }
      it = m_->jobs_.emplace(id, std::move(e)).first;
    } else {
      it->second.rec = std::move(r);
    }
  }
  for (TaskRecord& t : m.tasks) {
    if (t.state != v1::TASK_STATE_RUNNING) m_->progress_.erase(t.id);
    const std::string id = t.id;
    m_->tasks_[id] = std::move(t);
  }
  for (const auto& [id, ids] : new_task_ids_) m_->FillTaskRefs(m_->jobs_.at(id));
  for (WorkerRecord& w : m.workers) {
    const std::string id = w.id;
    m_->workers_[id] = std::move(w);
  }
  for (const auto& [id, seq] : sequences_) m_->jobs_.at(id).last_sequence = seq;
  for (v1::JobEvent& e : m.events) {
    auto it = m_->jobs_.find(e.job_id());
    if (it == m_->jobs_.end()) continue;
    JobEntry& job = it->second;
    job.recent_event_bytes += e.ByteSizeLong();
    job.recent_events.push_back(std::move(e));
    while (job.recent_event_bytes > m_->options_.watch_memory_bytes_per_job &&
           job.recent_events.size() > 1) {
      job.recent_event_bytes -= job.recent_events.front().ByteSizeLong();
      job.recent_events.pop_front();
    }
  }
  // Settled jobs keep only their record (with the final counts).
  for (const auto& [id, unused] : jobs_) {
    JobEntry& e = m_->jobs_.at(id);
    if (!e.rec.settled || e.task_ids.empty()) continue;
    for (const std::string& t : e.task_ids) {
      m_->tasks_.erase(t);
      m_->progress_.erase(t);
    }
    e.task_ids.clear();
    e.task_refs.clear();
    e.config.reset();
    e.recent_events.clear();
    e.recent_event_bytes = 0;
  }
  if (any_events) {
    m_->event_cv_.SignalAll();
    for (const auto& [job_id, sequence] : sequences_) m_->wakeups_.Fire(EventWakeupKey(job_id));
  }
  return absl::OkStatus();
}

// ---- Views ----------------------------------------------------------------------------------

v1::TaskCounts JobManager::Impl::Counts(const Txn& view, const std::string& job_id) const {
  const JobRecord& rec = view.PeekJob(job_id);
  if (rec.settled) return rec.job.tasks();
  // A task still leased when its job ended (FAILED, or CANCELLED) is stopped at the worker's
  // next heartbeat and its result discarded: it counts as cancelled, never as running.
  const bool ended = IsTerminal(rec.job.state());
  v1::TaskCounts c;
  for (const TaskRecord& t : view.TasksOf(job_id)) {
    c.set_total(c.total() + 1);
    c.set_retries(c.retries() + t.attempt);
    const v1::TaskState state =
        ended && t.state == v1::TASK_STATE_RUNNING ? v1::TASK_STATE_CANCELLED : t.state;
    if (t.kind == v1::TASK_KIND_QUANTIZE) {
      c.set_layers(c.layers() + 1);
      if (state == v1::TASK_STATE_SUCCEEDED) c.set_layers_succeeded(c.layers_succeeded() + 1);
    }
    switch (state) {
      case v1::TASK_STATE_PENDING: c.set_pending(c.pending() + 1); break;
      case v1::TASK_STATE_QUEUED: c.set_queued(c.queued() + 1); break;
      case v1::TASK_STATE_RUNNING: c.set_running(c.running() + 1); break;
      case v1::TASK_STATE_SUCCEEDED: c.set_succeeded(c.succeeded() + 1); break;
      case v1::TASK_STATE_FAILED: c.set_failed(c.failed() + 1); break;
      case v1::TASK_STATE_CANCELLED: c.set_cancelled(c.cancelled() + 1); break;
      default: break;
    }
  }
  return c;
}

int JobManager::Impl::ActiveWorkers(int64_t now) const {
  int n = 0;
  for (const auto& [id, w] : workers_) n += scheduler_.WorkerLost(w, now) ? 0 : 1;
  return n;
}

std::string JobManager::Impl::WorkerState(const WorkerRecord& w, bool busy, int64_t now) const {
  if (scheduler_.WorkerLost(w, now)) return "lost";
  if (busy) return "busy";  // holds a lease (one from before a restart stays valid)
  if (w.last_seen_ms < started_ms_) {
    // Known from before a restart and silent since: a worker that exited with the old
    // coordinator never calls again, so it is lost once a live one would have called.
    return now - started_ms_ > options_.lease_duration_ms ? "lost" : "unknown";
  }
  return "idle";
}

bool JobManager::Impl::AnyRunning(const Txn& view, const std::string& job_id) const {
  if (view.PeekJob(job_id).settled) return false;
  for (const TaskRecord& t : view.TasksOf(job_id)) {
    if (t.state == v1::TASK_STATE_RUNNING) return true;
  }
  return false;
}

double JobManager::Impl::Eta(const Txn& view, const std::string& job_id) const {
  const JobRecord& rec = view.PeekJob(job_id);
  const v1::JobState state = rec.job.state();
  if (IsTerminal(state)) return 0;
  if (state != v1::JOB_STATE_QUEUED && state != v1::JOB_STATE_QUANTIZING) return -1;
  // Cost is measured per weight (out × in): finished layers give their whole time, running
  // ones the time since their lease over the fraction they reported (once it is at least
  // kMinReportedProgress, so that a just-started layer does not swing the estimate). The
  // work left is the weights of unfinished layers less what running ones reported; it is
  // spread over the workers that can take it.
  constexpr double kMinReportedProgress = 0.05;
  const int64_t now = Now();
  double measured_s = 0, measured_weights = 0, left_weights = 0;
  int remaining = 0, running = 0;
  for (const TaskRecord& t : view.TasksOf(job_id)) {
    if (t.kind != v1::TASK_KIND_QUANTIZE) continue;
    const double weights = static_cast<double>(std::max<int64_t>(1, t.layer.out_features())) *
                           static_cast<double>(std::max<int64_t>(1, t.layer.in_features()));
    if (t.state == v1::TASK_STATE_SUCCEEDED) {
      measured_s += static_cast<double>(std::max<int64_t>(0, t.end_ms - t.start_ms)) / 1000.0;
      measured_weights += weights;
      continue;
    }
    ++remaining;
    double done = 0;
    if (t.state == v1::TASK_STATE_RUNNING) {
      ++running;
      auto p = progress_.find(t.id);
      if (p != progress_.end()) done = std::clamp(p->second.progress, 0.0, 1.0);
      if (done >= kMinReportedProgress) {
        measured_s += static_cast<double>(std::max<int64_t>(0, now - t.start_ms)) / 1000.0;
        measured_weights += weights * done;
      }
    }
    left_weights += weights * (1.0 - done);
  }
  if (remaining == 0) return 0;
  if (measured_weights <= 0) return -1;  // nothing measured yet
  int workers = std::max(ActiveWorkers(now), running);
  workers = std::max(1, std::min(workers, remaining));
  return measured_s / measured_weights * left_weights / workers;
}

double JobManager::Impl::Progress(const Txn& view, const std::string& job_id) const {
  const JobRecord& rec = view.PeekJob(job_id);
  switch (rec.job.state()) {
    case v1::JOB_STATE_ASSEMBLING:
    case v1::JOB_STATE_SUCCEEDED:
      return 1.0;
    case v1::JOB_STATE_CALIBRATING:
    case v1::JOB_STATE_QUANTIZING:
    case v1::JOB_STATE_EVALUATING:
      break;
    default:
      return rec.job.progress();  // QUEUED: 0; stopped jobs keep what they reached
  }
  if (rec.settled) return rec.job.progress();
  const bool calibrating = rec.job.state() == v1::JOB_STATE_CALIBRATING;
  const bool evaluating = rec.job.state() == v1::JOB_STATE_EVALUATING;
  // The shards of the running stage, weighted by their samples: samples forwarded of all.
  const v1::TaskKind sharded = calibrating ? v1::TASK_KIND_CALIBRATE : v1::TASK_KIND_EVALUATE;
  double done = 0, total = 0;
  for (const TaskRecord& t : view.TasksOf(job_id)) {
    if ((calibrating || evaluating) && t.kind == sharded) {
      const int64_t begin = calibrating ? t.calibration.sample_begin() : t.evaluation.sample_begin();
      const int64_t end = calibrating ? t.calibration.sample_end() : t.evaluation.sample_end();
      const double samples = static_cast<double>(std::max<int64_t>(0, end - begin));
      total += samples;
      if (t.state == v1::TASK_STATE_SUCCEEDED) {
        done += samples;
      } else if (t.state == v1::TASK_STATE_RUNNING) {
        auto p = progress_.find(t.id);
        if (p != progress_.end()) done += samples * p->second.progress;
      }
    } else if (!calibrating && !evaluating && t.kind == v1::TASK_KIND_QUANTIZE) {
      total += 1;
      if (t.state == v1::TASK_STATE_SUCCEEDED) done += 1;
    }
  }
  return total > 0 ? std::clamp(done / total, 0.0, 1.0) : 0.0;
}

std::string JobManager::Impl::TaskSubject(const Txn& view, const TaskRecord& t) const {
  switch (t.kind) {
    case v1::TASK_KIND_QUANTIZE:
      return absl::StrCat("layer ", t.layer.module());
    case v1::TASK_KIND_CALIBRATE:
      return absl::StrCat("calibration shard ", t.ordinal + 1, "/",
                          view.PeekJob(t.job_id).job.calibration().shards(), " (samples [",
                          t.calibration.sample_begin(), ", ", t.calibration.sample_end(),
                          "))");
    case v1::TASK_KIND_REDUCE:
      return "the reduce of the calibration shards";
    case v1::TASK_KIND_EVALUATE: {
      int index = 0, shards = 0;
      for (const TaskRecord& o : view.TasksOf(t.job_id)) {
        if (o.kind != v1::TASK_KIND_EVALUATE) continue;
        ++shards;
        if (o.ordinal < t.ordinal) ++index;
      }
      return absl::StrCat("evaluation shard ", index + 1, "/", shards, " (samples [",
                          t.evaluation.sample_begin(), ", ", t.evaluation.sample_end(), "))");
    }
    case v1::TASK_KIND_EVAL_REDUCE:
      return "the reduce of the evaluation shards";
    default:
      return "assembly";
  }
}

std::string JobManager::Impl::AssembleTaskOf(const JobEntry& e,
                                             const std::map<std::string, TaskRecord>& tasks) {
  for (const std::string& id : e.task_ids) {
    auto it = tasks.find(id);
    if (it != tasks.end() && it->second.kind == v1::TASK_KIND_ASSEMBLE) return id;
  }
  return "";
}

google::protobuf::RepeatedPtrField<v1::RunningTask> JobManager::Impl::Running(
    const Txn& view, const std::string& job_id) const {
  google::protobuf::RepeatedPtrField<v1::RunningTask> out;
  const JobRecord& rec = view.PeekJob(job_id);
  if (rec.settled || IsTerminal(rec.job.state())) return out;
  const int64_t now = Now();
  for (const TaskRecord& t : view.TasksOf(job_id)) {
    if (t.state != v1::TASK_STATE_RUNNING) continue;
    v1::RunningTask* r = out.Add();
    r->set_task_id(t.id);
    r->set_kind(t.kind);
    r->set_subject(TaskSubject(view, t));
    if (t.kind == v1::TASK_KIND_QUANTIZE) r->set_module(t.layer.module());
    r->set_worker_id(t.worker_id);
    r->set_attempt(t.attempt);
    auto p = progress_.find(t.id);
    if (p != progress_.end()) {
      r->set_progress(p->second.progress);
      r->set_phase(p->second.phase);
    }
    r->set_elapsed_seconds(static_cast<double>(std::max<int64_t>(0, now - t.start_ms)) / 1000.0);
  }
  return out;
}

v1::LayerResult JobManager::Impl::LayerResultOf(const TaskRecord& t, const v1::JobSpec& spec,
                                               const TaskProgress* progress) {
  v1::LayerResult r;
  r.set_module(t.layer.module());
  r.set_out_features(t.layer.out_features());
  r.set_in_features(t.layer.in_features());
  r.set_state(t.state);
  r.set_attempt(t.attempt);
  r.set_worker_id(t.worker_id);
  r.set_method(spec.method());
  if (spec.method() == v1::METHOD_GPTQ) *r.mutable_gptq() = spec.gptq();
  if (spec.method() == v1::METHOD_VPTQ) *r.mutable_vptq() = spec.vptq();
  if (t.state == v1::TASK_STATE_SUCCEEDED) {
    r.set_proxy_loss(t.metrics.proxy_loss());
    r.set_relative_error(t.metrics.relative_error());
    r.set_bits_per_weight(t.metrics.bits_per_weight());
    r.set_backend(t.metrics.backend());
    r.set_damp_percent_used(t.metrics.damp_percent_used());
    if (t.end_ms > 0 && t.start_ms > 0) {
      r.set_seconds(static_cast<double>(t.end_ms - t.start_ms) / 1000.0);
    }
  }
  if (t.state == v1::TASK_STATE_RUNNING && progress != nullptr) {
    r.set_progress(progress->progress);
    r.set_phase(progress->phase);
  }
  if (t.error.code() != 0) *r.mutable_error() = t.error;
  return r;
}

v1::Job JobManager::Impl::BuildJob(const Txn& view, const std::string& job_id) const {
  const JobRecord& rec = view.PeekJob(job_id);
  v1::Job job = rec.job;
  if (!rec.settled) {
    *job.mutable_tasks() = Counts(view, job_id);
    job.set_eta_seconds(Eta(view, job_id));
    job.set_progress(Progress(view, job_id));
    *job.mutable_running() = Running(view, job_id);
  }
  if (IsTerminal(job.state())) job.set_eta_seconds(0);
  return job;
}

absl::StatusOr<JobManager::Impl::JobEntry*> JobManager::Impl::FindJob(std::string_view tenant,
                                                                      std::string_view job_id) {
  QF_RETURN_IF_ERROR(CheckJobIdField("id", job_id));
  auto it = jobs_.find(std::string(job_id));
  if (job_id.empty() || it == jobs_.end() || it->second.rec.job.tenant() != tenant) {
    return absl::NotFoundError(absl::StrCat("job '", std::string(job_id), "' not found"));
  }
  return &it->second;
}

void JobManager::Impl::FlushNotes() {
  std::vector<std::function<void(JobManagerListener&)>> notes;
  {
    absl::MutexLock lock(&mu_);
    notes.swap(notes_);
  }
  for (auto& f : notes) f(*listener_);
}


// ---- Load, start, shutdown ----------------------------------------------------------------

absl::Status JobManager::Impl::Load() {
  QF_ASSIGN_OR_RETURN(StateSnapshot snap, store_->Load());
  absl::MutexLock lock(&mu_);
  started_ms_ = Now();
  for (JobRecord& r : snap.jobs) {
    const std::string id = r.job.id();
    JobEntry e;
    e.rec = std::move(r);
    auto seq = snap.last_event_sequence.find(id);
    if (seq != snap.last_event_sequence.end()) e.last_sequence = seq->second;
    if (!e.rec.job.request_id().empty()) {
      by_request_[{e.rec.job.tenant(), e.rec.job.request_id()}] = id;
    }
    jobs_.emplace(id, std::move(e));
  }
  std::sort(snap.tasks.begin(), snap.tasks.end(), [](const TaskRecord& a, const TaskRecord& b) {
    return std::tie(a.job_id, a.ordinal) < std::tie(b.job_id, b.ordinal);
  });
  for (TaskRecord& t : snap.tasks) {
    auto job = jobs_.find(t.job_id);
    if (job == jobs_.end()) {
      return absl::DataLossError(absl::StrCat("state store: task '", t.id,
                                              "' belongs to unknown job '", t.job_id, "'"));
    }
    job->second.task_ids.push_back(t.id);
    const std::string id = t.id;
    job->second.task_refs.push_back(&tasks_.emplace(id, std::move(t)).first->second);
  }
  for (WorkerRecord& w : snap.workers) {
    const std::string id = w.id;
    workers_.emplace(id, std::move(w));
  }
  const int64_t now = Now();
  Txn tx(this);
  RequeueInterruptedAssemblies(tx, now);
  ConvertLoadedSpecs(tx, now);
  return tx.Commit();
}

void JobManager::Impl::RequeueInterruptedAssemblies(Txn& tx, int64_t now) {
  // An assembly that was running when the coordinator stopped runs again (the assembler
  // overwrites what it wrote and writes the manifest last). Leases of QUANTIZE tasks are
  // kept: their workers may still complete them, or they expire.
  for (auto& [id, t] : tasks_) {
    if (t.kind != v1::TASK_KIND_ASSEMBLE || t.state != v1::TASK_STATE_RUNNING) continue;
    TaskRecord& a = tx.Task(id);
    a.state = v1::TASK_STATE_QUEUED;
    a.lease_token.clear();
    a.queued_ms = now;
    a.not_before_ms = 0;
    tx.Event(a.job_id, "the coordinator restarted during assembly; assembling again", &a);
  }
}

void JobManager::Impl::ConvertLoadedSpecs(Txn& tx, int64_t now) {
  // Once per job that may still schedule or assemble. A stored spec is normalized, so it
  // converts unless this coordinator's options refuse it now (narrower allowed_file_roots):
  // then the job fails rather than writing where it may no longer write.
  for (auto& [id, e] : jobs_) {
    const v1::JobState s = e.rec.job.state();
    if (s != v1::JOB_STATE_QUEUED && s != v1::JOB_STATE_CALIBRATING &&
        s != v1::JOB_STATE_QUANTIZING && s != v1::JOB_STATE_ASSEMBLING &&
        s != v1::JOB_STATE_EVALUATING) {
      continue;
    }
    absl::StatusOr<JobConfig> config =
        ConvertJobSpec(e.rec.job.spec(), SpecOptionsFor(e.rec.job.tenant()));
    if (!config.ok()) {
      FailJob(tx, id,
              MakeError(config.status().code(),
                        absl::StrCat("the job's spec is no longer accepted after the "
                                     "coordinator restarted: ",
                                     config.status().message()),
                        "SPEC_REJECTED", id),
              now);
      continue;
    }
    e.config = std::make_shared<const JobConfig>(*std::move(config));
    // Tasks stored before the device-memory estimate was (schema v1) get it now.
    for (const std::string& tid : e.task_ids) {
      const TaskRecord& t = tasks_.at(tid);
      if (t.kind != v1::TASK_KIND_QUANTIZE || t.gpu_memory_bytes != 0) continue;
      tx.Task(tid).gpu_memory_bytes =
          GpuTaskMemoryBytes(*e.config, t.layer.out_features(), t.layer.in_features());
    }
  }
}

void JobManager::Impl::Start() {
  if (!options_.background_tick) return;
  tick_thread_ = std::thread([this] {
    for (;;) {
      {
        absl::MutexLock lock(&mu_);
        if (shutdown_) return;
        tick_cv_.WaitWithTimeout(&mu_, absl::Milliseconds(std::max<int64_t>(
                                           1, options_.tick_interval_ms)));
        if (shutdown_) return;
      }
      Tick();
    }
  });
}

void JobManager::Impl::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;  // idempotent
    work_cv_.SignalAll();
    event_cv_.SignalAll();
    tick_cv_.SignalAll();
    wakeups_.FireAll();  // later registrations fire at once (shutdown_)
  }
  if (tick_thread_.joinable() && tick_thread_.get_id() != std::this_thread::get_id()) {
    tick_thread_.join();
  }
  assembly_.JoinAll();
}

// ---- Transitions --------------------------------------------------------------------------

void JobManager::Impl::RetryOrFail(Txn& tx, const std::string& task_id, v1::ErrorInfo error,
                                   bool retryable, int64_t now) {
  TaskRecord& t = tx.Task(task_id);
  const JobRecord& job = tx.PeekJob(t.job_id);
  const int max_attempts = std::max(1, job.job.spec().max_attempts());
  const std::string what = TaskSubject(tx, t);
  const bool calibration =
      t.kind == v1::TASK_KIND_CALIBRATE || t.kind == v1::TASK_KIND_REDUCE;
  const bool evaluation =
      t.kind == v1::TASK_KIND_EVALUATE || t.kind == v1::TASK_KIND_EVAL_REDUCE;
  const double seconds = t.start_ms > 0 ? static_cast<double>(now - t.start_ms) / 1000.0 : 0;
  const v1::TaskKind kind = t.kind;
  const v1::Method method = job.job.spec().method();
  Note([kind, method, seconds](JobManagerListener& l) {
    l.OnTaskFinished(kind, method, false, seconds);
  });
  t.error = error;
  t.lease_token.clear();
  const RetryDecision retry = scheduler_.DecideRetry(t, max_attempts, retryable, now);
  if (retry.retry) {
    t.state = v1::TASK_STATE_QUEUED;
    t.end_ms = now;
    tx.Event(t.job_id,
             absl::StrCat(what, " attempt ", t.attempt + 1, " of ", max_attempts, " failed: ",
                          error.message(), "; retrying in ", Seconds(retry.backoff_ms)),
             &t);
    ++t.attempt;
    t.end_ms = 0;
    t.not_before_ms = retry.not_before_ms;
    t.queued_ms = now;
    Note([kind](JobManagerListener& l) { l.OnTaskRetried(kind); });
    return;
  }
  t.state = v1::TASK_STATE_FAILED;
  t.end_ms = now;
  tx.Event(t.job_id, absl::StrCat(what, " failed: ", error.message()), &t);
  v1::ErrorInfo job_error = error;
  job_error.set_message(absl::StrCat(
      what, " (task ", t.id, ") failed",
      retryable ? absl::StrCat(" after ", t.attempt + 1, " attempts") : std::string(), ": ",
      error.message()));
  if (calibration || evaluation) {
    // The worker's own reason stays with the task's event.
    job_error.set_reason(calibration ? "CALIBRATION_FAILED" : "EVALUATION_FAILED");
    job_error.set_subject(what);
  }
  if (job_error.reason().empty()) {
    job_error.set_reason(t.kind == v1::TASK_KIND_QUANTIZE ? "TASK_FAILED" : "ASSEMBLY_FAILED");
  }
  if (job_error.subject().empty()) {
    job_error.set_subject(t.kind == v1::TASK_KIND_QUANTIZE ? t.layer.module()
                                                           : job.job.spec().output_uri());
  }
  FailJob(tx, t.job_id, std::move(job_error), now);
}

void JobManager::Impl::FailJob(Txn& tx, const std::string& job_id, v1::ErrorInfo error,
                               int64_t now) {
  // Queued and pending tasks stop here; running ones learn it from their next heartbeat.
  for (const TaskRecord& t : tx.TasksOf(job_id)) {
    if (t.state == v1::TASK_STATE_QUEUED || t.state == v1::TASK_STATE_PENDING) {
      TaskRecord& c = tx.Task(t.id);
      c.state = v1::TASK_STATE_CANCELLED;
      c.end_ms = now;
    }
  }
  JobRecord& j = tx.Job(job_id);
  j.job.set_state(v1::JOB_STATE_FAILED);
  j.job.set_end_time_unix_ms(now);
  const std::string message = error.message();
  *j.job.mutable_error() = std::move(error);
  tx.Event(job_id, absl::StrCat("failed: ", message));
}

void JobManager::Impl::CancelTaskOfStoppedJob(Txn& tx, const std::string& task_id, int64_t now,
                                              std::string why) {
  TaskRecord& t = tx.Task(task_id);
  t.state = v1::TASK_STATE_CANCELLED;
  t.end_ms = now;
  t.lease_token.clear();
  tx.Event(t.job_id, absl::StrCat(TaskSubject(tx, t), " cancelled (", why, ")"), &t);
}

void JobManager::Impl::MaybeFinishCancel(Txn& tx, const std::string& job_id, int64_t now) {
  if (tx.PeekJob(job_id).job.state() != v1::JOB_STATE_CANCELLING) return;
  if (AnyRunning(tx, job_id) || jobs_.at(job_id).assembling) return;
  JobRecord& j = tx.Job(job_id);
  j.job.set_state(v1::JOB_STATE_CANCELLED);
  j.job.set_end_time_unix_ms(now);
  tx.Event(job_id, "cancelled");
}

void JobManager::Impl::MaybeStartAssembling(Txn& tx, const std::string& job_id, int64_t now) {
  const v1::JobState s = tx.PeekJob(job_id).job.state();
  if (s != v1::JOB_STATE_QUEUED && s != v1::JOB_STATE_QUANTIZING) return;
  std::string assemble;
  for (const TaskRecord& t : tx.TasksOf(job_id)) {
    if (t.kind == v1::TASK_KIND_QUANTIZE && t.state != v1::TASK_STATE_SUCCEEDED) return;
    if (t.kind == v1::TASK_KIND_ASSEMBLE) assemble = t.id;
  }
  if (assemble.empty()) return;
  TaskRecord& a = tx.Task(assemble);
  if (a.state == v1::TASK_STATE_PENDING) {
    a.state = v1::TASK_STATE_QUEUED;
    a.queued_ms = now;
  }
  tx.Job(job_id).job.set_state(v1::JOB_STATE_ASSEMBLING);
  tx.Event(job_id, "assembling: every layer is quantized");
}

void JobManager::Impl::MaybeStartReduce(Txn& tx, const std::string& job_id, int64_t now) {
  const v1::JobState s = tx.PeekJob(job_id).job.state();
  if (s != v1::JOB_STATE_QUEUED && s != v1::JOB_STATE_CALIBRATING) return;
  std::string reduce;
  std::vector<std::string> partials;
  for (const TaskRecord& t : tx.TasksOf(job_id)) {
    if (t.kind == v1::TASK_KIND_CALIBRATE) {
      if (t.state != v1::TASK_STATE_SUCCEEDED) return;
      partials.push_back(t.output_key);
    }
    if (t.kind == v1::TASK_KIND_REDUCE && t.state == v1::TASK_STATE_PENDING) reduce = t.id;
  }
  if (reduce.empty() || partials.empty()) return;
  TaskRecord& r = tx.Task(reduce);
  r.state = v1::TASK_STATE_QUEUED;
  r.queued_ms = now;
  r.calibration.clear_partial_keys();
  for (const std::string& k : partials) r.calibration.add_partial_keys(k);
  tx.Event(job_id, absl::StrCat("reducing the partial Hessians of ", partials.size(),
                                " calibration shard(s)"),
           &r);
}

void JobManager::Impl::MaybeFinishCalibration(Txn& tx, const std::string& job_id, int64_t now) {
  const v1::JobState s = tx.PeekJob(job_id).job.state();
  if (s != v1::JOB_STATE_QUEUED && s != v1::JOB_STATE_CALIBRATING) return;
  const TaskRecord* reduce = nullptr;
  std::vector<std::string> pending;
  for (const TaskRecord& t : tx.TasksOf(job_id)) {
    if (t.kind == v1::TASK_KIND_REDUCE) reduce = &t;
    if (t.kind == v1::TASK_KIND_QUANTIZE && t.state == v1::TASK_STATE_PENDING) {
      pending.push_back(t.id);
    }
  }
  if (reduce == nullptr || reduce->state != v1::TASK_STATE_SUCCEEDED) return;
  const int64_t tokens = reduce->metrics.tokens();
  JobRecord& j = tx.Job(job_id);
  v1::CalibrationInfo* info = j.job.mutable_calibration();
  if (tokens > 0) info->set_tokens(tokens);
  const int64_t started = j.job.start_time_unix_ms() > 0 ? j.job.start_time_unix_ms() : now;
  info->set_seconds(static_cast<double>(std::max<int64_t>(0, now - started)) / 1000.0);
  for (const std::string& tid : pending) {
    TaskRecord& q = tx.Task(tid);
    q.state = v1::TASK_STATE_QUEUED;
    q.queued_ms = now;
  }
  j.job.set_state(v1::JOB_STATE_QUANTIZING);
  char seconds[32];
  std::snprintf(seconds, sizeof(seconds), "%.1f s", info->seconds());
  tx.Event(job_id, absl::StrCat("calibration done: ", info->tokens(), " tokens in ", seconds,
                                "; quantizing"));
}

bool JobManager::Impl::MaybeStartEvaluation(Txn& tx, const std::string& job_id, int64_t now) {
  std::vector<std::string> pending;
  int64_t samples = 0;
  for (const TaskRecord& t : tx.TasksOf(job_id)) {
    if (t.kind != v1::TASK_KIND_EVALUATE) continue;
    samples = t.evaluation.samples();
    if (t.state == v1::TASK_STATE_PENDING) pending.push_back(t.id);
  }
  if (pending.empty()) return false;
  for (const std::string& tid : pending) {
    TaskRecord& e = tx.Task(tid);
    e.state = v1::TASK_STATE_QUEUED;
    e.queued_ms = now;
  }
  tx.Job(job_id).job.set_state(v1::JOB_STATE_EVALUATING);
  tx.Event(job_id, absl::StrCat("evaluating: ", samples, " samples in ", pending.size(),
                                " shard(s)"));
  return true;
}

void JobManager::Impl::MaybeStartEvalReduce(Txn& tx, const std::string& job_id, int64_t now) {
  const v1::JobState s = tx.PeekJob(job_id).job.state();
  if (s != v1::JOB_STATE_QUEUED && s != v1::JOB_STATE_EVALUATING) return;
  std::string reduce;
  std::vector<std::string> partials;
  for (const TaskRecord& t : tx.TasksOf(job_id)) {
    if (t.kind == v1::TASK_KIND_EVALUATE) {
      if (t.state != v1::TASK_STATE_SUCCEEDED) return;
      partials.push_back(t.output_key);
    }
    if (t.kind == v1::TASK_KIND_EVAL_REDUCE && t.state == v1::TASK_STATE_PENDING) reduce = t.id;
  }
  if (reduce.empty() || partials.empty()) return;
  TaskRecord& r = tx.Task(reduce);
  r.state = v1::TASK_STATE_QUEUED;
  r.queued_ms = now;
  r.evaluation.clear_partial_keys();
  for (const std::string& k : partials) r.evaluation.add_partial_keys(k);
  tx.Event(job_id, absl::StrCat("reducing the sums of ", partials.size(), " evaluation shard(s)"),
           &r);
}

JobManager::Impl::EvaluationOutcome JobManager::Impl::ReadEvaluationResult(
    const std::string& staging_uri, const std::string& output_key,
    const std::shared_ptr<const JobConfig>& config, const TaskRecord& reduce,
    double seconds) const {
  EvaluationOutcome out;
  auto transient = [](const absl::Status& s) {
    return s.code() == absl::StatusCode::kUnavailable ||
           s.code() == absl::StatusCode::kDeadlineExceeded;
  };
  const std::string source = absl::StrCat(staging_uri, "/", output_key);
  auto staging = options_.open_store(staging_uri);
  if (!staging.ok()) {
    out.error = staging.status();
    out.retryable = true;
    return out;
  }
  auto text = (*staging)->ReadAll(output_key);
  if (!text.ok()) {
    out.error = absl::Status(text.status().code(),
                             absl::StrCat("reading the evaluation's metrics ", source, ": ",
                                          text.status().message()));
    out.retryable = transient(text.status());
    return out;
  }
  auto metrics = QualityMetricsFromJson(*text, source);
  if (!metrics.ok()) {
    out.error = metrics.status();
    return out;
  }
  const QualityGate gate = QualityGateOf(config->evaluation);
  out.gate = CheckQualityGate(*metrics, gate);
  const char* gate_text = !gate.enabled() ? kGateNone : out.gate.ok() ? kGatePassed : kGateFailed;
  const v1::JobSpec& spec = config->spec;
  auto report_of = [&](double bits_per_weight) {
    return QualityReportOf(*metrics, gate, out.gate.ok(), bits_per_weight, seconds,
                           reduce.evaluation.dataset_uri(), reduce.evaluation.dataset_sha256());
  };
  // The page beside the manifest (job/quality_report.h); a page that cannot be rendered or
  // written is logged: the measurement and the job's outcome do not depend on it.
  auto write_report = [&](ObjectStore& store, const nlohmann::json& document) {
    auto html = RenderQualityReportHtml(document);
    absl::Status s = html.ok() ? store.Put(kQualityReportName, *html) : html.status();
    if (!s.ok()) {
      LogError(absl::StrCat("writing ", ChildUri(spec.output_uri(), kQualityReportName)), s);
    }
  };
  if (!config->evaluation_only()) {
    // The artifact's manifest gets the quality (the job's outcome follows it).
    absl::Status recorded = [&]() -> absl::Status {
      QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> output,
                          options_.open_store(spec.output_uri()));
      QF_ASSIGN_OR_RETURN(nlohmann::json manifest, ReadManifest(*output, kManifestName));
      out.report = report_of(ManifestBitsPerWeightOrZero(manifest));
      QF_ASSIGN_OR_RETURN(manifest,
                          RecordJobQualityInManifest(*output, kManifestName,
                                                  QualityRecordJson(out.report, gate), gate_text));
      write_report(*output, manifest);
      return absl::OkStatus();
    }();
    if (!recorded.ok()) {
      out.error = absl::Status(
          recorded.code(), absl::StrCat("recording the quality in the manifest ",
                                        ChildUri(spec.output_uri(), kManifestName), ": ",
                                        recorded.message()));
      out.retryable = transient(recorded);
    }
    return out;
  }
  // A qforge artifact evaluated on its own: its manifest gives the bits per weight.
  double bits_per_weight = 0;
  if (auto model = options_.open_store(spec.model_uri()); model.ok()) {
    if (auto manifest = ReadManifest(**model, kManifestName); manifest.ok()) {
      bits_per_weight = ManifestBitsPerWeightOrZero(*manifest);
    }
  }
  out.report = report_of(bits_per_weight);
  if (!spec.output_uri().empty()) {
    if (auto output = options_.open_store(spec.output_uri()); output.ok()) {
      write_report(**output, EvaluationReportDocument(spec.model_uri(),
                                                      spec.reference_model_uri(),
                                                      QualityRecordJson(out.report, gate),
                                                      gate_text, reduce.job_id, ""));
    } else {
      LogError("opening " + spec.output_uri(), output.status());
    }
  }
  return out;
}

void JobManager::Impl::FinishEvaluation(Txn& tx, const std::string& job_id,
                                        v1::QualityReport report, const absl::Status& gate,
                                        int64_t now) {
  JobRecord& j = tx.Job(job_id);
  const v1::Method method = j.job.spec().method();
  const double ppl = report.ppl_increase_pct(), kl = report.mean_kl();
  const std::string gate_text =
      !report.gate_enabled() ? kGateNone : gate.ok() ? kGatePassed : kGateFailed;
  char figures[160];
  std::snprintf(figures, sizeof(figures),
                "perplexity %.4g → %.4g (%+.2f %%), mean KL %.4g nats, top-1 %.1f %%",
                report.ppl_reference(), report.ppl_quantized(), ppl, kl,
                100.0 * report.top1_agreement());
  *j.job.mutable_quality() = std::move(report);
  tx.Event(job_id, absl::StrCat("evaluated: ", figures, "; quality gate ", gate_text));
  Note([method, ppl, kl, gate_text](JobManagerListener& l) {
    l.OnEvaluation(method, ppl, kl, gate_text);
  });
  const std::string subject = j.job.spec().reference_model_uri().empty()
                                  ? ChildUri(j.job.spec().output_uri(), kManifestName)
                                  : j.job.spec().model_uri();
  if (!gate.ok()) {
    FailJob(tx, job_id,
            MakeError(absl::StatusCode::kFailedPrecondition, std::string(gate.message()),
                      "QUALITY_GATE", subject),
            now);
    return;
  }
  j.job.set_state(v1::JOB_STATE_SUCCEEDED);
  j.job.set_end_time_unix_ms(now);
  tx.Event(job_id, j.job.manifest_uri().empty()
                       ? std::string("succeeded")
                       : absl::StrCat("succeeded: manifest at ", j.job.manifest_uri()));
}

void JobManager::Impl::Settle(Txn& tx, const std::string& job_id) {
  const v1::TaskCounts counts = Counts(tx, job_id);
  const double progress = Progress(tx, job_id);
  JobRecord& j = tx.Job(job_id);
  *j.job.mutable_tasks() = counts;
  j.job.set_progress(progress);
  j.job.set_eta_seconds(0);
  j.settled = true;
}


// ---- JobManager -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(std::unique_ptr<StateStore> store,
                                                               Clock* clock,
                                                               JobManagerOptions options,
                                                               JobManagerListener* listener) {
  if (store == nullptr) return absl::InvalidArgumentError("JobManager: no state store");
  if (clock == nullptr) return absl::InvalidArgumentError("JobManager: no clock");
  if (options.lease_duration_ms <= 0 || options.retry_initial_backoff_ms < 0 ||
      options.retry_max_backoff_ms < 0 || options.default_max_attempts < 1) {
    return absl::InvalidArgumentError(
        "JobManager options: lease_duration_ms must be > 0, backoffs >= 0, "
        "default_max_attempts >= 1");
  }
  std::unique_ptr<JobManager> jm(new JobManager());
  jm->impl_ = std::make_unique<Impl>(std::move(store), clock, std::move(options), listener);
  QF_RETURN_IF_ERROR(jm->impl_->Load());
  jm->impl_->Start();
  return jm;
}

JobManager::~JobManager() {
  if (impl_ != nullptr) impl_->Shutdown();
}

absl::StatusOr<v1::Job> JobManager::SubmitJob(std::string_view tenant,
                                              const v1::SubmitJobRequest& request) {
  absl::StatusOr<v1::Job> job = impl_->SubmitJob(tenant, request);
  impl_->FlushNotes();
  return job;
}
absl::StatusOr<v1::Job> JobManager::GetJob(std::string_view tenant, std::string_view job_id) {
  return impl_->GetJob(tenant, job_id);
}
absl::StatusOr<v1::JobReport> JobManager::GetJobReport(std::string_view tenant,
                                                       std::string_view job_id) {
  return impl_->GetJobReport(tenant, job_id);
}
absl::StatusOr<v1::ListJobsResponse> JobManager::ListJobs(std::string_view tenant,
                                                          const v1::ListJobsRequest& request) {
  return impl_->ListJobs(tenant, request);
}
absl::StatusOr<v1::Job> JobManager::CancelJob(std::string_view tenant, std::string_view job_id) {
  return impl_->CancelJob(tenant, job_id);
}
absl::StatusOr<std::vector<v1::JobEvent>> JobManager::WatchEvents(
    std::string_view tenant, std::string_view job_id, int64_t after_sequence, int max_events,
    int64_t wait_ms, bool* job_finished) {
  return impl_->WatchEvents(tenant, job_id, after_sequence, max_events, wait_ms, job_finished);
}
std::vector<v1::WorkerInfo> JobManager::ListWorkers(std::string_view tenant) {
  return impl_->ListWorkers(tenant);
}
void JobManager::NotifyOnEvents(std::string_view job_id, int64_t after_sequence,
                                int64_t max_wait_ms, std::function<void()> wake) {
  impl_->NotifyOnEvents(job_id, after_sequence, max_wait_ms, std::move(wake));
}
uint64_t JobManager::WorkGeneration() { return impl_->WorkGeneration(); }
void JobManager::NotifyOnWork(uint64_t generation, int64_t max_wait_ms,
                              std::function<void()> wake) {
  impl_->NotifyOnWork(generation, max_wait_ms, std::move(wake));
}
absl::StatusOr<v1::ListLayersResponse> JobManager::ListLayers(
    std::string_view tenant, const v1::ListLayersRequest& request) {
  return impl_->ListLayers(tenant, request);
}
absl::Status JobManager::DeleteJob(std::string_view tenant, std::string_view job_id) {
  return impl_->DeleteJob(tenant, job_id);
}
absl::StatusOr<v1::RegisterWorkerResponse> JobManager::RegisterWorker(
    const v1::RegisterWorkerRequest& request) {
  return impl_->RegisterWorker(request);
}
absl::StatusOr<std::optional<v1::Task>> JobManager::AcquireTask(
    const v1::AcquireTaskRequest& request) {
  return impl_->AcquireTask(request);
}
absl::StatusOr<v1::HeartbeatResponse> JobManager::Heartbeat(const v1::HeartbeatRequest& request) {
  return impl_->Heartbeat(request);
}
absl::Status JobManager::CompleteTask(const v1::CompleteTaskRequest& request,
                                      v1::CompleteTaskResponse* response) {
  return impl_->CompleteTask(request, response);
}
absl::Status JobManager::FailTask(const v1::FailTaskRequest& request) {
  return impl_->FailTask(request);
}
void JobManager::Tick() { impl_->Tick(); }
JobManagerStats JobManager::Stats() { return impl_->Stats(); }
void JobManager::Shutdown() { impl_->Shutdown(); }

}  // namespace qforge

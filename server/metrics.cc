#include "server/metrics.h"

#include <cctype>
#include <exception>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/metrics_collectors.h"
#include "common/store_traffic.h"
#include "prometheus/text_serializer.h"

namespace qforge {
namespace {

using prometheus::Histogram;

// Attempts last from a fraction of a second (small layers on a GPU) to an hour (a 70B
// model's largest layers on a CPU).
const Histogram::BucketBoundaries& TaskDurationBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600};
  return *b;
}

// Jobs last from seconds (a tiny model) to a day (a 405B model on few workers).
const Histogram::BucketBoundaries& JobDurationBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400};
  return *b;
}

const Histogram::BucketBoundaries& PhaseBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900};
  return *b;
}

const Histogram::BucketBoundaries& PplIncreaseBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, 200};
  return *b;
}

const Histogram::BucketBoundaries& KlBuckets() {
  static const auto* b = new Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2};
  return *b;
}

// "TASK_KIND_QUANTIZE" with prefix "TASK_KIND_" -> "quantize".
std::string EnumLabel(const std::string& name, std::string_view prefix, int value) {
  if (name.empty()) return std::to_string(value);
  std::string_view rest = name;
  if (rest.substr(0, prefix.size()) == prefix) rest.remove_prefix(prefix.size());
  std::string out(rest);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string SanitizePhase(std::string_view phase) {
  std::string out;
  for (char c : phase) {
    if (out.size() == 32) break;
    const unsigned char u = static_cast<unsigned char>(c);
    out.push_back(std::isalnum(u) ? static_cast<char>(std::tolower(u)) : '_');
  }
  if (out.empty()) out = "unknown";
  return out;
}

}  // namespace

std::string CoordinatorMetrics::KindLabel(v1::TaskKind kind) {
  return EnumLabel(v1::TaskKind_Name(kind), "TASK_KIND_", kind);
}
std::string CoordinatorMetrics::MethodLabel(v1::Method method) {
  return EnumLabel(v1::Method_Name(method), "METHOD_", method);
}
std::string CoordinatorMetrics::EvaluationMethodLabel(v1::Method method) {
  return method == v1::METHOD_UNSPECIFIED ? "none" : MethodLabel(method);
}
std::string CoordinatorMetrics::JobStateLabel(v1::JobState state) {
  return EnumLabel(v1::JobState_Name(state), "JOB_STATE_", state);
}

CoordinatorMetrics::CoordinatorMetrics(CoordinatorMetricsOptions options)
    : options_(std::move(options)),
      registry_(std::make_shared<prometheus::Registry>()),
      jobs_family_(prometheus::BuildGauge()
                       .Name("qforge_jobs")
                       .Help("Jobs known to the coordinator, by state")
                       .Register(*registry_)),
      workers_family_(prometheus::BuildGauge()
                          .Name("qforge_workers")
                          .Help("Registered workers, by state (idle, busy, lost)")
                          .Register(*registry_)),
      task_duration_family_(prometheus::BuildHistogram()
                                .Name("qforge_task_duration_seconds")
                                .Help("Duration of finished task attempts, by kind and method")
                                .Register(*registry_)),
      tasks_finished_family_(prometheus::BuildCounter()
                                 .Name("qforge_tasks_finished_total")
                                 .Help("Finished task attempts, by kind and outcome")
                                 .Register(*registry_)),
      retries_family_(prometheus::BuildCounter()
                          .Name("qforge_task_retries_total")
                          .Help("Task attempts queued again after a failure, by kind")
                          .Register(*registry_)),
      phase_family_(prometheus::BuildHistogram()
                        .Name("qforge_solver_phase_seconds")
                        .Help("Time spent in each solver phase, as reported by workers")
                        .Register(*registry_)),
      eval_ppl_family_(prometheus::BuildHistogram()
                           .Name("qforge_eval_ppl_increase_pct")
                           .Help("Perplexity increase of evaluated models over their "
                                 "originals (percent), by method")
                           .Register(*registry_)),
      eval_kl_family_(prometheus::BuildHistogram()
                          .Name("qforge_eval_mean_kl")
                          .Help("Mean KL divergence (nats) of evaluated models' next-token "
                                "distributions from their originals', by method")
                          .Register(*registry_)),
      quality_gate_family_(prometheus::BuildCounter()
                               .Name("qforge_quality_gate_total")
                               .Help("Evaluations by quality-gate result (passed, failed, "
                                     "none: no threshold set)")
                               .Register(*registry_)),
      jobs_submitted_family_(prometheus::BuildCounter()
                                 .Name("qforge_jobs_submitted_total")
                                 .Help("Jobs created, by method (gptq, vptq, none: evaluation only)")
                                 .Register(*registry_)),
      jobs_finished_family_(prometheus::BuildCounter()
                                .Name("qforge_jobs_finished_total")
                                .Help("Jobs that ended, by method and outcome (succeeded, failed, "
                                      "cancelled)")
                                .Register(*registry_)),
      job_duration_family_(prometheus::BuildHistogram()
                               .Name("qforge_job_duration_seconds")
                               .Help("Time from a job's creation to its end, by method and outcome")
                               .Register(*registry_)),
      oldest_worker_heartbeat_(prometheus::BuildGauge()
                                   .Name("qforge_oldest_worker_heartbeat_timestamp_seconds")
                                   .Help("Unix time of the oldest last contact (registration, task "
                                         "poll, heartbeat) among workers not lost; 0 when there "
                                         "is none")
                                   .Register(*registry_)
                                   .Add({})),
      grpc_(*registry_),
      collectables_{std::make_shared<ProcessCollector>(),
                    std::make_shared<StoreTrafficCollector>(&GlobalStoreTraffic())},
      tasks_queued_(prometheus::BuildGauge()
                        .Name("qforge_tasks_queued")
                        .Help("Tasks runnable and waiting for a worker (including backoff)")
                        .Register(*registry_)
                        .Add({})),
      tasks_running_(prometheus::BuildGauge()
                         .Name("qforge_tasks_running")
                         .Help("Tasks leased to a worker")
                         .Register(*registry_)
                         .Add({})),
      oldest_queued_(prometheus::BuildGauge()
                         .Name("qforge_oldest_queued_task_timestamp_seconds")
                         .Help("Unix time at which the oldest queued task was created; 0 when "
                               "none is queued")
                         .Register(*registry_)
                         .Add({})),
      bytes_read_(prometheus::BuildCounter()
                      .Name("qforge_bytes_read_total")
                      .Help("Bytes read from object storage by finished tasks")
                      .Register(*registry_)
                      .Add({})),
      bytes_written_(prometheus::BuildCounter()
                         .Name("qforge_bytes_written_total")
                         .Help("Bytes written to object storage by finished tasks and assembly")
                         .Register(*registry_)
                         .Add({})) {
  prometheus::BuildGauge()
      .Name("qforge_build_info")
      .Help("Build of the running coordinator; the value is always 1")
      .Register(*registry_)
      .Add({{"version", options_.version.empty() ? "unknown" : options_.version}})
      .Set(1);
  // Series that exist from the start, so that rate() and absent() behave from the first
  // scrape.
  for (int s = v1::JobState_MIN; s <= v1::JobState_MAX; ++s) {
    if (s == v1::JOB_STATE_UNSPECIFIED || !v1::JobState_IsValid(s)) continue;
    jobs_by_state_[s] = &jobs_family_.Add({{"state", JobStateLabel(static_cast<v1::JobState>(s))}});
  }
  for (const char* state : {"idle", "busy", "lost", "unknown"}) WorkersGauge(state);
  for (v1::TaskKind kind : {v1::TASK_KIND_CALIBRATE, v1::TASK_KIND_REDUCE, v1::TASK_KIND_QUANTIZE,
                            v1::TASK_KIND_ASSEMBLE}) {
    Retries(kind);
    TasksFinished(kind, true);
    TasksFinished(kind, false);
  }
  for (v1::TaskKind kind : {v1::TASK_KIND_EVALUATE, v1::TASK_KIND_EVAL_REDUCE}) {
    Retries(kind);
    TasksFinished(kind, true);
    TasksFinished(kind, false);
  }
  for (v1::Method method : {v1::METHOD_GPTQ, v1::METHOD_VPTQ}) {
    TaskDuration(v1::TASK_KIND_QUANTIZE, method);
  }
  for (v1::Method method : {v1::METHOD_GPTQ, v1::METHOD_VPTQ, v1::METHOD_UNSPECIFIED}) {
    const std::string label = EvaluationMethodLabel(method);
    eval_ppl_[label] = &eval_ppl_family_.Add({{"method", label}}, PplIncreaseBuckets());
    eval_kl_[label] = &eval_kl_family_.Add({{"method", label}}, KlBuckets());
  }
  for (const char* result : {"passed", "failed", "none"}) {
    quality_gate_[result] = &quality_gate_family_.Add({{"result", result}});
  }
  for (v1::Method method : {v1::METHOD_GPTQ, v1::METHOD_VPTQ, v1::METHOD_UNSPECIFIED}) {
    const std::string label = EvaluationMethodLabel(method);
    jobs_submitted_[label] = &jobs_submitted_family_.Add({{"method", label}});
    for (const char* outcome : {"succeeded", "failed", "cancelled"}) {
      jobs_finished_[{label, outcome}] =
          &jobs_finished_family_.Add({{"method", label}, {"outcome", outcome}});
      job_duration_[{label, outcome}] =
          &job_duration_family_.Add({{"method", label}, {"outcome", outcome}}, JobDurationBuckets());
    }
  }
}

absl::StatusOr<std::unique_ptr<CoordinatorMetrics>> CoordinatorMetrics::Create(
    CoordinatorMetricsOptions options) {
  std::unique_ptr<CoordinatorMetrics> m(new CoordinatorMetrics(std::move(options)));
  const std::string& address = m->options_.listen_address;
  if (address.empty()) return m;
  MetricsHttpServerOptions http;
  http.listen_address = address;
  http.collectable = m->registry_;
  http.collectables = m->collectables_;
  http.ready = [raw = m.get()] { return raw->ready_.load(); };
  auto server = MetricsHttpServer::Start(std::move(http));
  if (!server.ok()) return server.status();
  m->http_ = *std::move(server);
  m->listening_address_ = m->http_->listening_address();
  return m;
}

CoordinatorMetrics::~CoordinatorMetrics() {
  StopRefresh();
  http_.reset();
}

void CoordinatorMetrics::Update(const JobManagerStats& stats) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [state, gauge] : jobs_by_state_) {
    auto it = stats.jobs_by_state.find(static_cast<v1::JobState>(state));
    gauge->Set(it == stats.jobs_by_state.end() ? 0.0 : static_cast<double>(it->second));
  }
  for (auto& [state, gauge] : workers_by_state_) {
    auto it = stats.workers_by_state.find(state);
    gauge->Set(it == stats.workers_by_state.end() ? 0.0 : static_cast<double>(it->second));
  }
  for (const auto& [state, count] : stats.workers_by_state) {
    if (workers_by_state_.count(state) == 0 && workers_by_state_.size() < 16) {
      workers_by_state_[state] = &workers_family_.Add({{"state", SanitizePhase(state)}});
      workers_by_state_[state]->Set(static_cast<double>(count));
    }
  }
  tasks_queued_.Set(static_cast<double>(stats.tasks_queued));
  tasks_running_.Set(static_cast<double>(stats.tasks_running));
  oldest_worker_heartbeat_.Set(stats.oldest_worker_seen_ms > 0
                                   ? static_cast<double>(stats.oldest_worker_seen_ms) / 1000.0
                                   : 0.0);
  oldest_queued_.Set(stats.oldest_queued_task_create_ms > 0
                         ? static_cast<double>(stats.oldest_queued_task_create_ms) / 1000.0
                         : 0.0);
}

void CoordinatorMetrics::StartRefresh(std::function<JobManagerStats()> stats) {
  StopRefresh();
  Update(stats());
  {
    std::lock_guard<std::mutex> lock(refresh_mu_);
    refresh_stop_ = false;
  }
  refresh_thread_ = std::thread([this, stats = std::move(stats)] {
    std::unique_lock<std::mutex> lock(refresh_mu_);
    while (!refresh_cv_.wait_for(lock, options_.refresh_interval, [this] { return refresh_stop_; })) {
      lock.unlock();
      Update(stats());
      lock.lock();
    }
  });
}

void CoordinatorMetrics::StopRefresh() {
  {
    std::lock_guard<std::mutex> lock(refresh_mu_);
    refresh_stop_ = true;
  }
  refresh_cv_.notify_all();
  if (refresh_thread_.joinable()) refresh_thread_.join();
}

std::string CoordinatorMetrics::Serialize() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  for (const auto& c : collectables_) {
    std::vector<prometheus::MetricFamily> more = c->Collect();
    families.insert(families.end(), more.begin(), more.end());
  }
  return prometheus::TextSerializer().Serialize(families);
}

prometheus::Gauge& CoordinatorMetrics::WorkersGauge(const std::string& state) {
  // Called from the constructor only (no lock needed then); Update() adds under mu_.
  prometheus::Gauge*& g = workers_by_state_[state];
  if (g == nullptr) g = &workers_family_.Add({{"state", state}});
  return *g;
}

prometheus::Histogram& CoordinatorMetrics::TaskDuration(v1::TaskKind kind, v1::Method method) {
  prometheus::Histogram*& h = task_duration_[{kind, method}];
  if (h == nullptr) {
    h = &task_duration_family_.Add({{"kind", KindLabel(kind)}, {"method", MethodLabel(method)}},
                                   TaskDurationBuckets());
  }
  return *h;
}

prometheus::Counter& CoordinatorMetrics::TasksFinished(v1::TaskKind kind, bool succeeded) {
  prometheus::Counter*& c = tasks_finished_[{kind, succeeded}];
  if (c == nullptr) {
    c = &tasks_finished_family_.Add(
        {{"kind", KindLabel(kind)}, {"outcome", succeeded ? "succeeded" : "failed"}});
  }
  return *c;
}

prometheus::Counter& CoordinatorMetrics::Retries(v1::TaskKind kind) {
  prometheus::Counter*& c = retries_[kind];
  if (c == nullptr) c = &retries_family_.Add({{"kind", KindLabel(kind)}});
  return *c;
}

prometheus::Histogram& CoordinatorMetrics::SolverPhase(std::string_view phase) {
  std::string label = SanitizePhase(phase);
  if (auto it = phases_.find(label); it != phases_.end()) return *it->second;
  if (static_cast<int>(phases_.size()) >= kMaxPhases - 1) label = "other";
  prometheus::Histogram*& h = phases_[label];
  if (h == nullptr) h = &phase_family_.Add({{"phase", label}}, PhaseBuckets());
  return *h;
}

void CoordinatorMetrics::OnTaskFinished(v1::TaskKind kind, v1::Method method, bool succeeded,
                                        double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  TaskDuration(kind, method).Observe(seconds < 0 ? 0 : seconds);
  TasksFinished(kind, succeeded).Increment();
}

void CoordinatorMetrics::OnTaskRetried(v1::TaskKind kind) {
  std::lock_guard<std::mutex> lock(mu_);
  Retries(kind).Increment();
}

void CoordinatorMetrics::OnBytes(uint64_t read, uint64_t written) {
  bytes_read_.Increment(static_cast<double>(read));
  bytes_written_.Increment(static_cast<double>(written));
}

void CoordinatorMetrics::OnEvaluation(v1::Method method, double ppl_increase_pct,
                                      double mean_kl, std::string_view gate) {
  std::lock_guard<std::mutex> lock(mu_);
  auto ppl = eval_ppl_.find(EvaluationMethodLabel(method));
  auto kl = eval_kl_.find(EvaluationMethodLabel(method));
  if (ppl != eval_ppl_.end()) ppl->second->Observe(ppl_increase_pct);
  if (kl != eval_kl_.end()) kl->second->Observe(mean_kl < 0 ? 0 : mean_kl);
  auto result = quality_gate_.find(std::string(gate));
  if (result != quality_gate_.end()) result->second->Increment();
}

void CoordinatorMetrics::OnJobSubmitted(v1::Method method) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_submitted_.find(EvaluationMethodLabel(method));
  if (it != jobs_submitted_.end()) it->second->Increment();
}

void CoordinatorMetrics::OnJobFinished(v1::Method method, v1::JobState state, double seconds) {
  const std::pair<std::string, std::string> key{EvaluationMethodLabel(method), JobStateLabel(state)};
  std::lock_guard<std::mutex> lock(mu_);
  auto finished = jobs_finished_.find(key);
  auto duration = job_duration_.find(key);
  if (finished != jobs_finished_.end()) finished->second->Increment();
  if (duration != job_duration_.end()) duration->second->Observe(seconds < 0 ? 0 : seconds);
}

void CoordinatorMetrics::OnSolverPhase(std::string_view phase, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  SolverPhase(phase).Observe(seconds < 0 ? 0 : seconds);
}

}  // namespace qforge

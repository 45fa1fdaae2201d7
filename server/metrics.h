// CoordinatorMetrics: the coordinator's Prometheus metrics (prometheus-cpp), served over HTTP
// at http://<listen>/metrics by a MetricsHttpServer (common/metrics_http_server.h), which also
// answers /healthz and /readyz (ready between set_ready(true) and set_ready(false)). It is the JobManager's listener (task durations, retries,
// bytes, solver phases) and refreshes point-in-time gauges from JobManager::Stats() on a
// background thread. Names follow DESIGN.md: `qforge_` prefix, base units, `_total` for
// counters, timestamps instead of ages, never a job, task, worker or layer id as a label.
//
//   qforge_build_info{version}                             gauge, always 1
//   qforge_jobs{state}                                     gauge: jobs by state (queued,
//                                                          calibrating, quantizing, assembling,
//                                                          succeeded, failed, cancelling,
//                                                          cancelled)
//   qforge_tasks_queued, qforge_tasks_running              gauges
//   qforge_oldest_queued_task_timestamp_seconds            gauge: Unix time at which the
//                                                          oldest queued task was created,
//                                                          0 when none is queued
//   qforge_workers{state}                                  gauge: idle, busy, lost
//   qforge_task_duration_seconds{kind,method}              histogram of finished attempts
//   qforge_tasks_finished_total{kind,outcome}              counter: succeeded | failed
//   qforge_task_retries_total{kind}                        counter
//   qforge_bytes_read_total, qforge_bytes_written_total    counters (object store traffic
//                                                          reported by tasks)
//   qforge_solver_phase_seconds{phase}                     histogram
//   qforge_jobs_submitted_total{method}                    counter: jobs created
//   qforge_jobs_finished_total{method,outcome}             counter: jobs that reached
//                                                          succeeded | failed | cancelled
//   qforge_job_duration_seconds{method,outcome}            histogram: creation to the end
//   qforge_oldest_worker_heartbeat_timestamp_seconds       gauge: Unix time of the oldest
//                                                          last contact among workers not
//                                                          lost, 0 when there is none
//   qforge_grpc_server_handled_total{grpc_service,grpc_method,grpc_code}, and
//   qforge_grpc_server_handling_seconds{...}               server/grpc_server_metrics.h
//   qforge_store_*{scheme,...}                             the coordinator's own object-store
//                                                          traffic (common/metrics_collectors.h)
//   process_*                                              common/metrics_collectors.h
//
// Job `method` labels: gptq, vptq, none (an evaluation-only job).
// Label values are the enum names in lower case without their prefix (TASK_KIND_QUANTIZE ->
// "quantize"). Solver phase names come from workers, so they are sanitised to [a-z0-9_]
// (at most 32 characters) and at most kMaxPhases distinct values are kept; others count as
// "other".
//
// Thread-safety: all methods are thread-safe. Listener callbacks take no JobManager lock.
#ifndef QFORGE_SERVER_METRICS_H_
#define QFORGE_SERVER_METRICS_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/metrics_http_server.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/grpc_server_metrics.h"
#include "server/job_manager.h"

namespace qforge {

struct CoordinatorMetricsOptions {
  // HTTP address of /metrics: "host:port"; port 0 picks a free port (see listening_address());
  // "" serves nothing (the registry is still filled: tests, embedding).
  std::string listen_address = "127.0.0.1:9464";
  std::string version;  // qforge_build_info{version}
  // How often StartRefresh() reads JobManager::Stats().
  std::chrono::milliseconds refresh_interval{1000};
};

class CoordinatorMetrics final : public JobManagerListener {
 public:
  static constexpr int kMaxPhases = 32;

  // UNAVAILABLE when the HTTP listener cannot be bound, INVALID_ARGUMENT for a malformed
  // listen_address (messages name the address).
  static absl::StatusOr<std::unique_ptr<CoordinatorMetrics>> Create(
      CoordinatorMetricsOptions options);
  ~CoordinatorMetrics() override;  // StopRefresh(), then closes the HTTP listener

  CoordinatorMetrics(const CoordinatorMetrics&) = delete;
  CoordinatorMetrics& operator=(const CoordinatorMetrics&) = delete;

  // The bound "host:port" (the real port when 0 was asked for); "" without a listener.
  const std::string& listening_address() const { return listening_address_; }
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // What /readyz answers: 200 while ready, 503 otherwise (the initial state). The coordinator
  // sets it once its gRPC server serves and clears it when shutdown begins.
  void set_ready(bool ready) { ready_.store(ready); }

  // Sets the point-in-time gauges from a snapshot.
  void Update(const JobManagerStats& stats);
  // Calls Update(stats()) now and then every refresh_interval on a background thread until
  // StopRefresh(). `stats` must stay callable until StopRefresh() returns.
  void StartRefresh(std::function<JobManagerStats()> stats);
  void StopRefresh();  // idempotent

  // What /metrics answers, in Prometheus text format: the registry, the process metrics and
  // the process's object-store traffic.
  std::string Serialize() const;

  // The interceptor factory that feeds qforge_grpc_server_* (pass it to the ServerBuilder;
  // this object must outlive the server).
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> NewGrpcInterceptorFactory() {
    return grpc_.NewInterceptorFactory();
  }

  // JobManagerListener.
  void OnJobSubmitted(v1::Method method) override;
  void OnJobFinished(v1::Method method, v1::JobState state, double seconds) override;
  void OnTaskFinished(v1::TaskKind kind, v1::Method method, bool succeeded,
                      double seconds) override;
  void OnTaskRetried(v1::TaskKind kind) override;
  void OnBytes(uint64_t read, uint64_t written) override;
  void OnSolverPhase(std::string_view phase, double seconds) override;
  // qforge_eval_ppl_increase_pct{method} and qforge_eval_mean_kl{method} (method: gptq,
  // vptq, none for an evaluation-only job), qforge_quality_gate_total{result}.
  void OnEvaluation(v1::Method method, double ppl_increase_pct, double mean_kl,
                    std::string_view gate) override;

  // "quantize" for TASK_KIND_QUANTIZE, "gptq" for METHOD_GPTQ, "queued" for
  // JOB_STATE_QUEUED ("unspecified" for 0, the number for unknown values).
  static std::string KindLabel(v1::TaskKind kind);
  static std::string MethodLabel(v1::Method method);
  static std::string JobStateLabel(v1::JobState state);
  // MethodLabel, with "none" for METHOD_UNSPECIFIED (an evaluation-only job).
  static std::string EvaluationMethodLabel(v1::Method method);

 private:
  explicit CoordinatorMetrics(CoordinatorMetricsOptions options);

  prometheus::Histogram& TaskDuration(v1::TaskKind kind, v1::Method method);
  prometheus::Counter& TasksFinished(v1::TaskKind kind, bool succeeded);
  prometheus::Counter& Retries(v1::TaskKind kind);
  prometheus::Histogram& SolverPhase(std::string_view phase);
  prometheus::Gauge& WorkersGauge(const std::string& state);

  const CoordinatorMetricsOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::atomic<bool> ready_{false};
  std::unique_ptr<MetricsHttpServer> http_;
  std::string listening_address_;

  prometheus::Family<prometheus::Gauge>& jobs_family_;
  prometheus::Family<prometheus::Gauge>& workers_family_;
  prometheus::Family<prometheus::Histogram>& task_duration_family_;
  prometheus::Family<prometheus::Counter>& tasks_finished_family_;
  prometheus::Family<prometheus::Counter>& retries_family_;
  prometheus::Family<prometheus::Histogram>& phase_family_;
  prometheus::Family<prometheus::Histogram>& eval_ppl_family_;
  prometheus::Family<prometheus::Histogram>& eval_kl_family_;
  prometheus::Family<prometheus::Counter>& quality_gate_family_;
  prometheus::Family<prometheus::Counter>& jobs_submitted_family_;
  prometheus::Family<prometheus::Counter>& jobs_finished_family_;
  prometheus::Family<prometheus::Histogram>& job_duration_family_;
  prometheus::Gauge& oldest_worker_heartbeat_;
  GrpcServerMetrics grpc_;
  // Served next to the registry.
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables_;
  prometheus::Gauge& tasks_queued_;
  prometheus::Gauge& tasks_running_;
  prometheus::Gauge& oldest_queued_;
  prometheus::Counter& bytes_read_;
  prometheus::Counter& bytes_written_;

  // Metric references by label values, filled lazily (Family::Add takes a lock and hashes
  // the labels; these maps keep that off repeated calls). Guarded by mu_.
  std::mutex mu_;
  std::map<int, prometheus::Gauge*> jobs_by_state_;
  std::map<std::string, prometheus::Gauge*> workers_by_state_;
  std::map<std::pair<int, int>, prometheus::Histogram*> task_duration_;
  std::map<std::pair<int, bool>, prometheus::Counter*> tasks_finished_;
  std::map<int, prometheus::Counter*> retries_;
  std::map<std::string, prometheus::Histogram*, std::less<>> phases_;
  std::map<std::string, prometheus::Histogram*> eval_ppl_, eval_kl_;  // by method label
  std::map<std::string, prometheus::Counter*> quality_gate_;           // by result
  std::map<std::string, prometheus::Counter*> jobs_submitted_;         // by method label
  // By (method label, outcome).
  std::map<std::pair<std::string, std::string>, prometheus::Counter*> jobs_finished_;
  std::map<std::pair<std::string, std::string>, prometheus::Histogram*> job_duration_;

  // Refresh thread.
  std::mutex refresh_mu_;
  std::condition_variable refresh_cv_;
  bool refresh_stop_ = false;  // guarded by refresh_mu_
  std::thread refresh_thread_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_METRICS_H_

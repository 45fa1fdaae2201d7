// qforge-service-load: load and fairness of a running qforge-coordinator (issue: reliability,
// item 6). It runs W workers inside this process (threads, each with its own gRPC connection:
// the worker loop and task executor of qforge-worker, CPU solvers, 1 thread each) and
// submits J jobs spread over T tenants (round robin, all queued at once, equal priority) of a
// model with tiny layers, so that a task's solve is microseconds and what is measured is the
// coordinator and the protocol: leases, heartbeats, staged outputs with their sha256,
// completions (one SQLite transaction each), assemblies. The jobs are submitted first
// (submit_seconds), then the workers start: `seconds` runs from their start to the last job's
// end. It prints one JSON line:
//   jobs, succeeded, tasks, seconds, tasks_per_second, per-tenant tasks done when half of all
//   were (fair share: each near 1/T), per-tenant finish times, queue wait p50/p99 (QUEUED to
//   leased, from the events), the coordinator's peak RSS (VmHWM of --coordinator-pid) and the
//   CPU time it used from the workers' start to the end (user + system, /proc/PID/stat):
//   per task, and its inverse, the tasks one fully used core of the coordinator dispatches
//   per second.
//
//   qforge-service-load --endpoint HOST:PORT --model DIR --out DIR --tokens t1,t2,t3,t4
//       [--worker-token T] [--workers 32] [--jobs 200] [--coordinator-pid PID]
// bench/load_bench.sh starts the coordinator and a model and runs it.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "qforge/v1/job_service.grpc.pb.h"
#include "quant/layer_quantizer.h"
#include "worker/coordinator_client.h"
#include "worker/task_executor.h"

namespace qforge {
namespace {

using Clock = std::chrono::steady_clock;

struct Flags {
  std::string endpoint, model, out, worker_token;
  std::vector<std::string> tokens;
  int workers = 32, jobs = 200;
  long coordinator_pid = 0;
};

int64_t PeakRssKib(long pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::atoll(line.c_str() + 6);
  }
  return -1;
}

// CPU seconds (user + system) process `pid` has used so far; -1 when unreadable.
double CpuSeconds(long pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t paren = text.rfind(')');
  if (paren == std::string::npos) return -1;
  std::vector<std::string> fields = absl::StrSplit(text.substr(paren + 2), ' ');
  // After the command: state is field 3, utime 14 and stime 15 (1-based, proc(5)).
  if (fields.size() < 13) return -1;
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  return (std::atof(fields[11].c_str()) + std::atof(fields[12].c_str())) / ticks;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

int Run(const Flags& f) {
  // Workers: the production worker loop and executor, in threads.
  std::vector<std::unique_ptr<TaskExecutor>> executors;
  std::vector<std::unique_ptr<CoordinatorClient>> clients;
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<std::thread> threads;
  for (int i = 0; i < f.workers; ++i) {
    executors.push_back(std::make_unique<TaskExecutor>(quant::NewCpuLayerQuantizers()));
    clients.push_back(std::make_unique<CoordinatorClient>(
        v1::WorkerService::NewStub(NewCoordinatorChannel(f.endpoint)), f.worker_token, 10'000));
    WorkerOptions o;
    o.coordinator = f.endpoint;
    o.hostname = absl::StrCat("load-", i);
    o.version = "bench";
    o.log = false;
    o.drain_ms = 0;
    TaskExecutor* ex = executors.back().get();
    workers.push_back(std::make_unique<Worker>(
        o, clients.back().get(),
        [ex](const v1::Task& task, TaskControl* control) { return ex->Execute(task, control); }));
  }

  // Jobs: all submitted before the workers start (so that dispatch is measured alone, with
  // every tenant's tasks queued), tenants in turn.
  auto channel = grpc::CreateChannel(f.endpoint, grpc::InsecureChannelCredentials());
  auto jobs = v1::JobService::NewStub(channel);
  auto prepare = [&](grpc::ClientContext* ctx, const std::string& token) {
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    ctx->AddMetadata("authorization", "Bearer " + token);
  };
  struct Submitted {
    std::string id, tenant_token;
    int tenant = 0;
  };
  std::vector<Submitted> submitted;
  const auto submit_start = Clock::now();
  for (int j = 0; j < f.jobs; ++j) {
    const int tenant = j % static_cast<int>(f.tokens.size());
    v1::SubmitJobRequest req;
    v1::JobSpec* spec = req.mutable_spec();
    spec->set_model_uri(f.model);
    spec->set_output_uri(absl::StrCat(f.out, "/job-", j));
    spec->set_method(v1::METHOD_GPTQ);
    spec->mutable_gptq()->set_bits(4);
    spec->mutable_gptq()->set_group_size(32);
    spec->mutable_calibration()->set_none(true);
    grpc::ClientContext ctx;
    prepare(&ctx, f.tokens[tenant]);
    v1::Job job;
    grpc::Status s = jobs->SubmitJob(&ctx, req, &job);
    if (!s.ok()) {
      std::fprintf(stderr, "qforge-service-load: submit %d: %s\n", j, s.error_message().c_str());
      return 1;
    }
    submitted.push_back({job.id(), f.tokens[tenant], tenant});
  }
  const double submit_seconds =
      std::chrono::duration<double>(Clock::now() - submit_start).count();
  const auto start = Clock::now();
  const double cpu_start = f.coordinator_pid > 0 ? CpuSeconds(f.coordinator_pid) : -1;
  for (auto& w : workers) threads.emplace_back([&w] { (void)w->Run(); });

  // Poll until every job ended.
  const size_t tenants = f.tokens.size();
  std::vector<double> finish(submitted.size(), -1);
  int64_t total_tasks = 0, succeeded = 0;
  std::vector<v1::Job> last(submitted.size());
  for (;;) {
    int64_t all = 0;
    bool pending = false;
    for (size_t i = 0; i < submitted.size(); ++i) {
      if (finish[i] >= 0) {
        all += last[i].tasks().total();
        continue;
      }
      grpc::ClientContext ctx;
      prepare(&ctx, submitted[i].tenant_token);
      v1::GetJobRequest req;
      req.set_id(submitted[i].id);
      if (!jobs->GetJob(&ctx, req, &last[i]).ok()) {
        pending = true;
        continue;
      }
      all += last[i].tasks().total();
      const v1::JobState st = last[i].state();
      if (st == v1::JOB_STATE_SUCCEEDED || st == v1::JOB_STATE_FAILED ||
          st == v1::JOB_STATE_CANCELLED) {
        finish[i] = std::chrono::duration<double>(Clock::now() - start).count();
      } else {
        pending = true;
      }
    }
    total_tasks = all;
    if (!pending) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const double cpu_end = f.coordinator_pid > 0 ? CpuSeconds(f.coordinator_pid) : -1;
  const double coordinator_cpu = cpu_start >= 0 && cpu_end >= 0 ? cpu_end - cpu_start : -1;
  const int64_t rss_kib = f.coordinator_pid > 0 ? PeakRssKib(f.coordinator_pid) : -1;
  for (auto& w : workers) w->Shutdown(true);
  for (auto& t : threads) t.join();

  // Queue waits from the events: a task's QUEUED (or the job's submission) to its lease; and
  // every task's success (time, tenant), for the tasks each tenant had done when half of all
  // were (by the events' times, not by the polls above, a round of which takes a while).
  std::vector<double> waits;
  std::vector<std::pair<int64_t, int>> successes;
  for (const Submitted& s : submitted) {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer " + s.tenant_token);
    v1::WatchJobRequest req;
    req.set_id(s.id);
    req.set_history_only(true);
    auto reader = jobs->WatchJob(&ctx, req);
    v1::JobEvent e;
    int64_t submitted_ms = 0;
    std::map<std::string, int64_t> queued_ms;
    while (reader->Read(&e)) {
      if (submitted_ms == 0) submitted_ms = e.time_unix_ms();
      if (!e.has_task()) continue;
      const std::string& t = e.task().task_id();
      if (e.task().state() == v1::TASK_STATE_QUEUED) queued_ms[t] = e.time_unix_ms();
      if (e.task().state() == v1::TASK_STATE_SUCCEEDED) {
        successes.emplace_back(e.time_unix_ms(), s.tenant);
      }
      if (e.task().state() == v1::TASK_STATE_RUNNING) {
        auto q = queued_ms.find(t);
        const int64_t from = q != queued_ms.end() ? q->second : submitted_ms;
        waits.push_back(static_cast<double>(e.time_unix_ms() - from) / 1000.0);
      }
    }
    (void)reader->Finish();
  }

  std::sort(successes.begin(), successes.end());
  std::vector<int64_t> done_at_half(tenants, 0);
  for (size_t i = 0; i < (successes.size() + 1) / 2; ++i) ++done_at_half[successes[i].second];
  std::vector<std::string> half, finished;
  for (size_t t = 0; t < tenants; ++t) {
    half.push_back(absl::StrCat(done_at_half[t]));
    double last_finish = 0;
    for (size_t i = 0; i < submitted.size(); ++i) {
      if (submitted[i].tenant == static_cast<int>(t)) last_finish = std::max(last_finish, finish[i]);
    }
    finished.push_back(absl::StrCat(last_finish));
  }
  for (const v1::Job& j : last) succeeded += j.state() == v1::JOB_STATE_SUCCEEDED;
  std::printf(
      "{\"workers\": %d, \"tenants\": %zu, \"jobs\": %zu, \"succeeded\": %lld, \"tasks\": %lld, "
      "\"submit_seconds\": %.2f, \"seconds\": %.2f, \"tasks_per_second\": %.1f, "
      "\"tasks_done_by_tenant_at_half\": [%s], \"last_job_finished_s_by_tenant\": [%s], "
      "\"queue_wait_p50_s\": %.3f, \"queue_wait_p99_s\": %.3f, \"coordinator_peak_rss_mib\": %.1f, "
      "\"coordinator_cpu_s\": %.2f, \"coordinator_cpu_ms_per_task\": %.3f, "
      "\"coordinator_tasks_per_cpu_second\": %.0f}\n",
      f.workers, tenants, submitted.size(), static_cast<long long>(succeeded),
      static_cast<long long>(total_tasks), submit_seconds, seconds,
      static_cast<double>(total_tasks) / seconds, absl::StrJoin(half, ", ").c_str(),
      absl::StrJoin(finished, ", ").c_str(), Percentile(waits, 0.5), Percentile(waits, 0.99),
      rss_kib > 0 ? static_cast<double>(rss_kib) / 1024.0 : -1.0, coordinator_cpu,
      coordinator_cpu > 0 ? 1000.0 * coordinator_cpu / static_cast<double>(total_tasks) : -1.0,
      coordinator_cpu > 0 ? static_cast<double>(total_tasks) / coordinator_cpu : -1.0);
  return succeeded == static_cast<int64_t>(submitted.size()) ? 0 : 1;
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  qforge::Flags f;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--endpoint") f.endpoint = v;
    else if (a == "--model") f.model = v;
    else if (a == "--out") f.out = v;
    else if (a == "--tokens") f.tokens = absl::StrSplit(v, ',', absl::SkipEmpty());
    else if (a == "--worker-token") f.worker_token = v;
    else if (a == "--workers") f.workers = std::atoi(v.c_str());
    else if (a == "--jobs") f.jobs = std::atoi(v.c_str());
    else if (a == "--coordinator-pid") f.coordinator_pid = std::atol(v.c_str());
    else {
      std::fprintf(stderr, "qforge-service-load: unknown flag %s (see the header of bench/service_load.cc)\n",
                   a.c_str());
      return 2;
    }
  }
  if (f.endpoint.empty() || f.model.empty() || f.out.empty() || f.tokens.empty() ||
      f.workers <= 0 || f.jobs <= 0) {
    std::fprintf(stderr,
                 "usage: qforge-service-load --endpoint HOST:PORT --model DIR --out DIR --tokens "
                 "t1,t2,... [--worker-token T] [--workers 32] [--jobs 200] [--coordinator-pid P]\n");
    return 2;
  }
  return qforge::Run(f);
}

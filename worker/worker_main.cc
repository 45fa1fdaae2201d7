// qforge-worker: registers with a coordinator, long-polls for tasks, runs them (fetch → solve →
// stage) and reports the results. See worker/coordinator_client.h for the protocol and
// worker/task_executor.h for what one task does.
//
//   qforge-worker [--coordinator HOST:PORT] [--token T] [--device cpu|cuda[:N]]
//                 [--memory-budget 16GiB] [--metrics-listen HOST:PORT] [--threads N]
//                 [--max-tasks N] [--drain-seconds S] [--spill-dir DIR]
//                 [--spill-above-bytes 8GiB]
//
// When registered it prints one line to stderr (tests and supervisors wait for it):
//   qforge-worker <worker-id> registered with <coordinator> metrics on <host:port|off>
// SIGTERM/SIGINT: the running task may finish within --drain-seconds, else it is given back
// (FailTask retryable); then exit 0. A second signal gives it back at once.
// Exit codes: 0 normal end (signal, --max-tasks), 1 the coordinator refused this worker
// (bad token, invalid registration) or an internal error, 2 usage error.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/metrics_collectors.h"
#include "common/metrics_http_server.h"
#include "common/object_store.h"
#include "common/s3_flags.h"
#include "common/store_traffic.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "common/tls.h"
#include "worker/coordinator_client.h"
#include "quant/cuda/device.h"
#include "quant/layer_quantizer.h"
#include "worker/task_executor.h"

#ifndef QFORGE_VERSION
#define QFORGE_VERSION "dev"
#endif

namespace qforge {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

int g_signal_pipe[2] = {-1, -1};

void OnSignal(int sig) {
  const unsigned char b = static_cast<unsigned char>(sig);
  (void)!write(g_signal_pipe[1], &b, 1);  // async-signal-safe
}

// "16GiB", "512M", "1.5G", "1000000" → bytes (K/M/G/T decimal, Ki/Mi/Gi/Ti binary; an
// optional trailing B). False for anything else.
bool ParseByteSize(std::string text, uint64_t* out) {
  text = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  double value = 0;
  if (i == 0 || !absl::SimpleAtod(text.substr(0, i), &value) || value < 0) return false;
  std::string unit = text.substr(i);
  if (!unit.empty() && unit.back() == 'b') unit.pop_back();
  double mult = 1;
  if (unit.empty()) {
    mult = 1;
  } else {
    const bool binary = unit.size() == 2 && unit[1] == 'i';
    if (unit.size() > 2 || (unit.size() == 2 && !binary)) return false;
    const double base = binary ? 1024.0 : 1000.0;
    switch (unit[0]) {
      case 'k': mult = base; break;
      case 'm': mult = base * base; break;
      case 'g': mult = base * base * base; break;
      case 't': mult = base * base * base * base; break;
      default: return false;
    }
  }
  const double bytes = value * mult;
  if (!std::isfinite(bytes) || bytes > 1.8e19) return false;
  *out = static_cast<uint64_t>(bytes);
  return true;
}

std::string CpuModelName() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) {
        return std::string(absl::StripAsciiWhitespace(line.substr(colon + 1)));
      }
    }
  }
  return "cpu";
}

std::string KindLabel(v1::TaskKind kind) {
  std::string name = v1::TaskKind_Name(kind);
  const std::string prefix = "TASK_KIND_";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  return absl::AsciiStrToLower(name);
}

// The worker's /metrics, its readiness (/readyz: registered and not draining) and its ready
// line.
class WorkerMetrics final : public WorkerListener {
 public:
  WorkerMetrics(std::string coordinator, const std::string& backend, const std::string& device)
      : coordinator_(std::move(coordinator)),
        registry_(std::make_shared<prometheus::Registry>()),
        tasks_(prometheus::BuildCounter()
                   .Name("qforge_worker_tasks_total")
                   .Help("Tasks this worker ran, by kind and outcome")
                   .Register(*registry_)),
        duration_(prometheus::BuildHistogram()
                      .Name("qforge_worker_task_duration_seconds")
                      .Help("Wall time of a task on this worker, from lease to report")
                      .Register(*registry_)),
        phases_(prometheus::BuildHistogram()
                    .Name("qforge_worker_solver_phase_seconds")
                    .Help("Time per phase of a quantize task (read, solve, write)")
                    .Register(*registry_)),
        bytes_read_(prometheus::BuildCounter()
                        .Name("qforge_worker_bytes_read_total")
                        .Help("Bytes read from object stores by finished tasks")
                        .Register(*registry_)
                        .Add({})),
        bytes_written_(prometheus::BuildCounter()
                           .Name("qforge_worker_bytes_written_total")
                           .Help("Bytes staged to object stores by finished tasks")
                           .Register(*registry_)
                           .Add({})),
        tokens_(prometheus::BuildCounter()
                    .Name("qforge_worker_calibration_tokens_total")
                    .Help("Token positions forwarded by finished CALIBRATE tasks")
                    .Register(*registry_)
                    .Add({})),
        busy_(prometheus::BuildGauge()
                  .Name("qforge_worker_busy")
                  .Help("1 while a task runs on this worker")
                  .Register(*registry_)
                  .Add({})),
        last_contact_(prometheus::BuildGauge()
                          .Name("qforge_worker_last_heartbeat_timestamp_seconds")
                          .Help("Unix time at which the coordinator last answered this worker "
                                "(registration, task poll or heartbeat); 0 before that")
                          .Register(*registry_)
                          .Add({})) {
    prometheus::BuildGauge()
        .Name("qforge_worker_info")
        .Help("Build and device of this worker (value 1)")
        .Register(*registry_)
        .Add({{"version", QFORGE_VERSION}, {"backend", backend}, {"device", device}})
        .Set(1);
    for (const char* kind : {"calibrate", "reduce", "quantize"}) {
      for (const char* outcome : {"succeeded", "failed", "cancelled", "lost", "released"}) {
        tasks_.Add({{"kind", kind}, {"outcome", outcome}});
      }
      duration_.Add({{"kind", kind}}, DurationBuckets());
    }
    for (const char* phase : {"read", "solve", "write"}) {
      phase_[phase] = &phases_.Add({{"phase", phase}}, DurationBuckets());
    }
  }

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }
  // Shown in the ready line: the metrics port's "host:port", or "off".
  void set_metrics_address(std::string address) { metrics_addr_ = std::move(address); }
  // /readyz: true from the first registration until draining starts.
  bool ready() const { return registered_.load() && !draining_.load(); }
  void SetDraining() { draining_.store(true); }

  void OnRegistered(const std::string& worker_id, bool again) override {
    registered_.store(true);
    if (again) {
      std::fprintf(stderr, "qforge-worker %s re-registered with %s\n", worker_id.c_str(),
                   coordinator_.c_str());
    } else {
      std::fprintf(stderr, "qforge-worker %s registered with %s metrics on %s\n",
                   worker_id.c_str(), coordinator_.c_str(), metrics_addr_.c_str());
    }
    std::fflush(stderr);
  }

  void OnCoordinatorContact() override { last_contact_.SetToCurrentTime(); }

  void OnTaskStarted(const v1::Task&) override { busy_.Set(1); }

  void OnTaskFinished(const v1::Task& task, TaskOutcome outcome, double seconds,
                      const TaskResult* result) override {
    busy_.Set(0);
    const std::string kind = KindLabel(task.kind());
    tasks_.Add({{"kind", kind}, {"outcome", TaskOutcomeName(outcome)}}).Increment();
    duration_.Add({{"kind", kind}}, DurationBuckets()).Observe(seconds);
    if (result != nullptr) {
      const v1::TaskMetrics& m = result->metrics;
      bytes_read_.Increment(static_cast<double>(m.bytes_read()));
      bytes_written_.Increment(static_cast<double>(m.bytes_written()));
      if (task.kind() == v1::TASK_KIND_CALIBRATE) tokens_.Increment(static_cast<double>(m.tokens()));
      if (task.kind() == v1::TASK_KIND_QUANTIZE) {
        phase_["read"]->Observe(m.read_seconds());
        phase_["solve"]->Observe(m.solve_seconds());
        phase_["write"]->Observe(m.write_seconds());
      }
    }
  }

 private:
  static prometheus::Histogram::BucketBoundaries DurationBuckets() {
    return {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};
  }

  const std::string coordinator_;
  std::string metrics_addr_ = "off";
  std::atomic<bool> registered_{false}, draining_{false};
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& tasks_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Family<prometheus::Histogram>& phases_;
  std::map<std::string, prometheus::Histogram*> phase_;
  prometheus::Counter& bytes_read_;
  prometheus::Counter& bytes_written_;
  prometheus::Counter& tokens_;
  prometheus::Gauge& busy_;
  prometheus::Gauge& last_contact_;
};

// qforge_worker_device_memory_used_bytes / _total_bytes{device="cuda:N"}: on a CUDA worker,
// the device's memory in use by all processes (total − free, cudaMemGetInfo) and its size,
// read at most once a second; absent on a CPU worker and while the device cannot be queried.
std::vector<std::shared_ptr<prometheus::Collectable>> DeviceMemoryCollectables(
    const DeviceSpec& device, uint64_t total_bytes) {
  if (device.kind != DeviceSpec::Kind::kCuda || total_bytes == 0) return {};
  struct Cache {
    std::mutex mu;
    std::chrono::steady_clock::time_point at;
    bool valid = false;
    uint64_t free_bytes = 0;
  };
  auto cache = std::make_shared<Cache>();
  const int index = device.index;
  const std::string label = device.ToString();
  auto used = [cache, index, label, total_bytes]() -> std::vector<GaugeCallback::Sample> {
    std::lock_guard<std::mutex> lock(cache->mu);
    const auto now = std::chrono::steady_clock::now();
    if (now - cache->at >= std::chrono::seconds(1)) {
      cache->at = now;
      auto free_bytes = quant::CudaDeviceFreeMemoryBytes(index);
      cache->valid = free_bytes.ok();
      if (free_bytes.ok()) cache->free_bytes = *free_bytes;
    }
    if (!cache->valid || cache->free_bytes > total_bytes) return {};
    return {{{{"device", label}}, static_cast<double>(total_bytes - cache->free_bytes)}};
  };
  auto total = [label, total_bytes]() -> std::vector<GaugeCallback::Sample> {
    return {{{{"device", label}}, static_cast<double>(total_bytes)}};
  };
  return {std::make_shared<GaugeCallback>(
              "qforge_worker_device_memory_used_bytes",
              "Memory in use on this worker's GPU by all processes (total - free)", used),
          std::make_shared<GaugeCallback>("qforge_worker_device_memory_total_bytes",
                                          "Memory of this worker's GPU", total)};
}

struct Flags {
  std::string coordinator;
  std::string token;
  std::string device;
  std::string memory_budget;
  std::string metrics_listen;
  std::string hostname;
  int max_tasks = 0;
  int threads = 0;
  double drain_seconds = 30;
  int64_t poll_ms = 20'000;
  int64_t rpc_timeout_ms = 10'000;
  std::string spill_dir;
  std::string spill_above = "8GiB";
  S3Settings s3;
  TlsOptions tls;
};

std::string EnvOr(const char* name, std::string fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

int Main(int argc, char** argv) {
  Flags f;
  f.coordinator = EnvOr("QFORGE_ENDPOINT", "127.0.0.1:50051");
  f.token = EnvOr("QFORGE_WORKER_TOKEN", "");
  CLI::App app{"qforge-worker: runs quantization tasks leased by a qforge coordinator"};
  app.set_version_flag("--version", QFORGE_VERSION);
  app.add_option("--coordinator", f.coordinator,
                 "coordinator gRPC address (default $QFORGE_ENDPOINT or 127.0.0.1:50051)");
  app.add_option("--token", f.token, "worker token (default $QFORGE_WORKER_TOKEN)");
  app.add_option("--tls-ca", f.tls.ca,
                 "PEM CA certificates that signed the coordinator's certificate: connect over TLS");
  app.add_option("--tls-cert", f.tls.cert,
                 "PEM client certificate (with --tls-key) for a coordinator that requires "
                 "mutual TLS");
  app.add_option("--tls-key", f.tls.key, "PEM private key of --tls-cert");
  app.add_option("--device", f.device,
                 "cpu, cuda or cuda:N (default: the first GPU with a solver, else cpu)");
  app.add_option("--memory-budget", f.memory_budget,
                 "largest task memory this worker accepts, e.g. 16GiB (default: the machine's memory; on "
                 "a GPU, its free memory less 512 MiB for the CUDA context)");
  app.add_option("--metrics-listen", f.metrics_listen,
                 "serve Prometheus /metrics, /healthz and /readyz (ready once registered) on "
                 "HOST:PORT (port 0 picks one; default off)");
  app.add_option("--hostname", f.hostname, "name reported to the coordinator (default: gethostname)");
  app.add_option("--max-tasks", f.max_tasks, "exit after this many tasks (0 = no limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", f.threads, "solver threads (default: $QFORGE_NUM_THREADS or all cores)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--drain-seconds", f.drain_seconds,
                 "on SIGTERM, how long the running task may take to finish before it is given back")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--poll-ms", f.poll_ms, "AcquireTask long-poll budget")->check(CLI::PositiveNumber);
  app.add_option("--rpc-timeout-ms", f.rpc_timeout_ms, "deadline of unary calls")
      ->check(CLI::PositiveNumber);
  app.add_option("--spill-dir", f.spill_dir,
                 "CALIBRATE: directory for hidden states above --spill-above-bytes (default: the "
                 "system's temp directory)");
  app.add_option("--spill-above-bytes", f.spill_above,
                 "CALIBRATE: hidden states larger than this live in a file under --spill-dir "
                 "mapped into memory, e.g. 8GiB (the default)");
  AddS3Flags(&app, &f.s3);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  // S3 settings (common/s3_settings.h): resolved once, used for every s3:// store.
  absl::StatusOr<S3Options> s3 = ResolveS3Options(f.s3);
  if (!s3.ok()) {
    std::fprintf(stderr, "qforge-worker: %s\n", std::string(s3.status().message()).c_str());
    return kExitUsage;
  }

  // Before any solver code reads it (NumThreads() is computed once).
  if (f.threads > 0) setenv("QFORGE_NUM_THREADS", std::to_string(f.threads).c_str(), 1);

  // SIGTERM/SIGINT reach a watcher thread through a self-pipe (threads that libraries start
  // before main, e.g. OpenBLAS's pool, have the default mask, so sigwait cannot be used).
  if (pipe(g_signal_pipe) != 0) {
    std::perror("qforge-worker: pipe");
    return kExitFailure;
  }
  struct sigaction sa = {};
  sa.sa_handler = OnSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  // Device and quantizers (the one place: worker/task_executor.h).
  std::vector<quant::CudaDeviceInfo> gpus;
  if (auto listed = quant::ListCudaDevices(); listed.ok()) gpus = *listed;
  std::string note;
  absl::StatusOr<DeviceSpec> device = ResolveDevice(f.device, gpus, &note);
  if (!device.ok()) {
    std::fprintf(stderr, "qforge-worker: %s\n", std::string(device.status().message()).c_str());
    return kExitUsage;
  }
  if (!note.empty()) std::fprintf(stderr, "qforge-worker: %s\n", note.c_str());
  uint64_t spill_above = 0;
  if (!ParseByteSize(f.spill_above, &spill_above)) {
    std::fprintf(stderr, "qforge-worker: --spill-above-bytes '%s' is not a size (e.g. 8GiB)\n",
                 f.spill_above.c_str());
    return kExitUsage;
  }
  absl::StatusOr<DeviceBackends> backends = NewBackendsForDevice(*device);
  if (!backends.ok() && f.device.empty() && device->kind == DeviceSpec::Kind::kCuda) {
    // The default device is a convenience: a GPU that cannot be used falls back to the CPU.
    std::fprintf(stderr, "qforge-worker: %s: using cpu\n",
                 std::string(backends.status().message()).c_str());
    device = DeviceSpec{};
    backends = NewBackendsForDevice(*device);
  }
  if (!backends.ok()) {
    std::fprintf(stderr, "qforge-worker: %s\n", backends.status().ToString().c_str());
    return kExitFailure;
  }

  v1::DeviceInfo info;
  info.set_kind(device->backend());
  info.set_index(device->index);
  if (device->kind == DeviceSpec::Kind::kCpu) {
    info.set_name(CpuModelName());
    const long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
    const long page = sysconf(_SC_PAGE_SIZE);
    info.set_memory_bytes(pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * page : 0);
    info.set_free_memory_bytes(avail > 0 && page > 0 ? static_cast<uint64_t>(avail) * page : 0);
  } else {
    for (const quant::CudaDeviceInfo& g : gpus) {
      if (g.index != device->index) continue;
      info.set_name(g.name);
      info.set_memory_bytes(g.total_memory_bytes);
    }
    // Queried after the quantizers' context exists, and on this device only.
    if (auto free_bytes = quant::CudaDeviceFreeMemoryBytes(device->index); free_bytes.ok()) {
      info.set_free_memory_bytes(*free_bytes);
    }
  }
  // A GPU's budget is what is free once this worker's context and cuBLAS/cuSOLVER handles
  // exist (other processes hold the rest) less a reserve for the libraries' workspaces and
  // the allocator's fragmentation; the CPU's is the machine's memory.
  constexpr uint64_t kCudaContextReserve = 512ull << 20;
  uint64_t memory_budget = info.memory_bytes();
  if (device->kind == DeviceSpec::Kind::kCuda && info.free_memory_bytes() > kCudaContextReserve) {
    memory_budget = info.free_memory_bytes() - kCudaContextReserve;
  }
  if (!f.memory_budget.empty() && !ParseByteSize(f.memory_budget, &memory_budget)) {
    std::fprintf(stderr, "qforge-worker: --memory-budget '%s' is not a size (e.g. 16GiB, 512M)\n",
                 f.memory_budget.c_str());
    return kExitUsage;
  }

  if (f.hostname.empty()) {
    char host[256] = {0};
    f.hostname = gethostname(host, sizeof(host) - 1) == 0 ? host : "unknown";
  }

  // Metrics, /healthz and /readyz (common/metrics_http_server.h), served before registering
  // so that a startup probe sees the process alive while it waits for the coordinator.
  WorkerMetrics metrics(f.coordinator, device->backend(), device->ToString());
  std::unique_ptr<MetricsHttpServer> metrics_server;
  if (!f.metrics_listen.empty()) {
    MetricsHttpServerOptions http;
    http.listen_address = f.metrics_listen;
    http.collectable = metrics.registry();
    http.collectables = {std::make_shared<ProcessCollector>(),
                         std::make_shared<StoreTrafficCollector>(&GlobalStoreTraffic())};
    for (auto& c : DeviceMemoryCollectables(*device, info.memory_bytes())) {
      http.collectables.push_back(std::move(c));
    }
    http.ready = [&metrics] { return metrics.ready(); };
    auto started = MetricsHttpServer::Start(std::move(http));
    if (!started.ok()) {
      std::fprintf(stderr, "qforge-worker: --metrics-listen %s: %s\n", f.metrics_listen.c_str(),
                   std::string(started.status().message()).c_str());
      return absl::IsInvalidArgument(started.status()) ? kExitUsage : kExitFailure;
    }
    metrics_server = *std::move(started);
    metrics.set_metrics_address(metrics_server->listening_address());
  }

  TaskExecutorOptions executor_options;
  executor_options.forward = backends->forward;
  executor_options.spill_dir = f.spill_dir;
  executor_options.spill_above_bytes = spill_above;
  executor_options.open_store = [s3 = *s3](std::string_view uri) {
    return OpenCountedObjectStore(uri, s3);
  };
  TaskExecutor executor(std::move(backends->quantizers), std::move(executor_options));
  auto credentials = ChannelCredentialsFor(f.tls);
  if (!credentials.ok()) {
    std::fprintf(stderr, "qforge-worker: %s\n", std::string(credentials.status().message()).c_str());
    return kExitUsage;
  }
  CoordinatorClient client(
      v1::WorkerService::NewStub(NewCoordinatorChannel(f.coordinator, *credentials)), f.token,
      f.rpc_timeout_ms);
  WorkerOptions options;
  options.coordinator = f.coordinator;
  options.tls = f.tls.enabled();
  options.hostname = f.hostname;
  options.version = QFORGE_VERSION;
  options.backends = {device->backend()};
  options.devices = {info};
  options.memory_budget_bytes = memory_budget;
  options.acquire_wait_ms = f.poll_ms;
  options.max_tasks = f.max_tasks;
  options.drain_ms = static_cast<int64_t>(f.drain_seconds * 1000);
  Worker worker(options, &client,
                [&executor](const v1::Task& task, TaskControl* control) {
                  return executor.Execute(task, control);
                },
                &metrics);

  std::thread signal_thread([&worker, &f, &metrics] {
    int signals_seen = 0;
    for (;;) {
      unsigned char sig = 0;
      const ssize_t n = read(g_signal_pipe[0], &sig, 1);
      if (n < 0 && errno == EINTR) continue;
      if (n != 1 || sig == 0) return;  // 0: Run() returned
      metrics.SetDraining();
      if (signals_seen++ == 0) {
        std::fprintf(stderr,
                     "qforge-worker: %s: finishing the current task (up to %.0f s), then exiting\n",
                     strsignal(sig), f.drain_seconds);
        worker.Shutdown(false);
      } else {
        std::fprintf(stderr, "qforge-worker: %s again: releasing the current task now\n",
                     strsignal(sig));
        worker.Shutdown(true);
      }
    }
  });

  absl::Status s = worker.Run();
  const unsigned char stop = 0;
  (void)!write(g_signal_pipe[1], &stop, 1);
  signal_thread.join();
  int code = kExitOk;
  if (!s.ok()) {
    std::fprintf(stderr, "qforge-worker: %s\n", s.ToString().c_str());
    code = kExitFailure;
  } else {
    const std::string id = worker.worker_id();
    std::fprintf(stderr, "qforge-worker%s%s: exiting after %d task(s)\n", id.empty() ? "" : " ",
                 id.c_str(), worker.tasks_run());
  }
  std::fflush(stderr);
  std::fflush(stdout);
  // A released task's solver cannot be interrupted: leave without waiting for it.
  if (worker.has_abandoned_work()) std::_Exit(code);
  return code;
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) { return qforge::Main(argc, argv); }

// qforge-coordinator: accepts quantization jobs over gRPC (qforge.v1.JobService), leases their
// layers to workers (qforge.v1.WorkerService), keeps its state in SQLite and serves Prometheus
// metrics (HTTP /metrics, with /healthz and /readyz for probes). With no flags it is the
// embedded default: state in ./qforge-data/state.db, gRPC on 127.0.0.1:50051, metrics on
// 127.0.0.1:9464, no authentication, file:// access only under the store root
// (./qforge-data/store) and the --allow-root directories; `--local-workers N` also starts N
// qforge-worker processes.
//
// Prints `qforge-coordinator listening on <addr> metrics on <addr>` to stderr once it serves
// (tests and scripts parse it; port 0 is replaced by the real port). SIGTERM / SIGINT shut it
// down gracefully: health turns NOT_SERVING, local workers get SIGTERM and time to finish or
// release their task, in-flight RPCs get a few seconds, long-polls end. A second signal exits
// at once.
//
// Exit codes: 0 after a clean shutdown, 1 when it cannot start (state, ports, tokens), 2 for
// a usage error.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/safetensors.h"
#include "common/object_store.h"
#include "common/s3_flags.h"
#include "common/store_traffic.h"
#include "common/tls.h"
#include "server/auth.h"
#include "server/clock.h"
#include "server/job_manager.h"
#include "server/local_workers.h"
#include "server/long_poll_executor.h"
#include "server/metrics.h"
#include "server/rpc_job_service.h"
#include "server/rpc_worker_service.h"
#include "server/sqlite_state_store.h"

#ifndef QFORGE_VERSION
#define QFORGE_VERSION "unknown"
#endif

namespace {

namespace fs = std::filesystem;

struct Flags {
  std::string listen = "127.0.0.1:50051";
  std::string data_dir = "./qforge-data";
  std::string store_root;  // default <data-dir>/store
  std::string hessian_cache;  // default file://<data-dir>/hessian-cache
  std::string metrics_listen = "127.0.0.1:9464";
  int local_workers = 0;
  std::string worker_binary;
  std::vector<std::string> local_worker_args;
  std::string tokens_file;
  std::string worker_token;
  int64_t lease_ms = 30'000;
  int64_t heartbeat_ms = 5'000;
  int max_attempts = 4;
  std::vector<std::string> allow_roots;
  int rpc_threads = 16;
  int64_t shutdown_grace_ms = 35'000;  // the worker's --drain-seconds (30) + its release call
  // Limits (docs/operations.md "Limits").
  int max_running_jobs_per_tenant = 256;
  int64_t max_queued_tasks_per_tenant = 100'000;
  uint64_t max_header_bytes = qforge::kMaxSafetensorsHeaderBytes;
  uint64_t header_parse_budget_bytes = uint64_t{256} << 20;
  qforge::TlsOptions tls;
  std::string retain_jobs = "30d";
  int64_t progress_event_ms = 2'000;
  qforge::S3Settings s3;
};

// --retain-jobs: "30d", "12h", "90m", "45s" (absl durations plus days), "0" = forever; at most
// 100 years (kMaxRetentionDays), so that no figure overflows.
absl::StatusOr<int64_t> ParseRetention(const std::string& text) {
  constexpr int64_t kMaxRetentionDays = 36'500;
  if (text == "0") return 0;
  absl::Duration d;
  int64_t days = 0;
  if (absl::EndsWith(text, "d") && absl::SimpleAtoi(text.substr(0, text.size() - 1), &days)) {
    if (days < 0 || days > kMaxRetentionDays) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--retain-jobs: '", text, "' is outside 0d..", kMaxRetentionDays, "d"));
    }
    d = absl::Hours(24 * days);
  } else if (!absl::ParseDuration(text, &d)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--retain-jobs: '", text, "' is not a duration; use e.g. 30d, 12h, 90m, or 0 to keep "
        "finished jobs forever"));
  }
  if (d < absl::ZeroDuration() || d > absl::Hours(24 * kMaxRetentionDays)) {
    return absl::InvalidArgumentError(absl::StrCat("--retain-jobs: '", text,
                                                   "' is outside 0d..", kMaxRetentionDays, "d"));
  }
  return absl::ToInt64Milliseconds(d);
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "qforge-coordinator: %s\n", message.c_str());
  return 1;
}

// "host:port" -> host; port-only or empty host means every interface.
std::string HostOf(const std::string& address) {
  const size_t colon = address.rfind(':');
  return colon == std::string::npos ? std::string() : address.substr(0, colon);
}

// Where local workers connect for a server listening on `host`.
std::string LoopbackFor(const std::string& host) {
  if (host.empty() || host == "0.0.0.0") return "127.0.0.1";
  if (host == "[::]") return "[::1]";
  return host;
}

int Run(const Flags& flags) {
  // Signals are taken by sigwait() below: block them before any thread starts so that every
  // thread inherits the mask (children unblock them before exec).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  // State.
  std::error_code ec;
  fs::create_directories(flags.data_dir, ec);
  if (ec) return Fail(absl::StrCat("--data-dir ", flags.data_dir, ": ", ec.message()));
  const std::string store_root =
      flags.store_root.empty() ? (fs::path(flags.data_dir) / "store").string() : flags.store_root;
  fs::create_directories(store_root, ec);
  if (ec) return Fail(absl::StrCat("--store-root ", store_root, ": ", ec.message()));
  std::string hessian_cache = flags.hessian_cache;
  if (hessian_cache.empty()) {
    const fs::path dir = fs::absolute(fs::path(flags.data_dir) / "hessian-cache").lexically_normal();
    fs::create_directories(dir, ec);
    if (ec) return Fail(absl::StrCat("--hessian-cache ", dir.string(), ": ", ec.message()));
    hessian_cache = "file://" + dir.string();
  } else if (hessian_cache.find("://") == std::string::npos) {
    const fs::path dir = fs::absolute(hessian_cache).lexically_normal();
    fs::create_directories(dir, ec);
    if (ec) return Fail(absl::StrCat("--hessian-cache ", dir.string(), ": ", ec.message()));
    hessian_cache = dir.string();
  }
  const std::string db_path = (fs::path(flags.data_dir) / "state.db").string();
  auto store = qforge::SqliteStateStore::Open(db_path);
  if (!store.ok()) return Fail(std::string(store.status().message()));

  // S3 settings (common/s3_settings.h): resolved once, used for every s3:// store.
  absl::StatusOr<qforge::S3Options> s3 = qforge::ResolveS3Options(flags.s3);
  if (!s3.ok()) return Fail(std::string(s3.status().message()));

  auto auth = qforge::Authenticator::FromFlags(flags.tokens_file, flags.worker_token);
  if (!auth.ok()) return Fail(std::string(auth.status().message()));

  std::string metrics_listen = flags.metrics_listen;
  if (metrics_listen == "0") metrics_listen = "127.0.0.1:0";
  if (metrics_listen == "off") metrics_listen.clear();
  qforge::CoordinatorMetricsOptions metrics_options;
  metrics_options.listen_address = metrics_listen;
  metrics_options.version = QFORGE_VERSION;
  auto metrics = qforge::CoordinatorMetrics::Create(metrics_options);
  if (!metrics.ok()) return Fail(std::string(metrics.status().message()));

  // Header parsing memory: at most this many header bytes read and parsed at once.
  qforge::SafetensorsHeaderLimits header_limits;
  header_limits.max_header_bytes = flags.max_header_bytes;
  header_limits.parse_budget_bytes = flags.header_parse_budget_bytes;
  if (absl::Status s = qforge::SetSafetensorsHeaderLimits(header_limits); !s.ok()) {
    return Fail(absl::StrCat("--max-header-bytes: ", s.message()));
  }

  qforge::RealClock clock;
  qforge::JobManagerOptions options;
  options.max_running_jobs_per_tenant = flags.max_running_jobs_per_tenant;
  options.max_queued_tasks_per_tenant = flags.max_queued_tasks_per_tenant;
  options.retain_jobs_ms = *ParseRetention(flags.retain_jobs);  // checked in main()
  options.progress_event_interval_ms = flags.progress_event_ms;
  options.lease_duration_ms = flags.lease_ms;
  options.heartbeat_interval_ms = flags.heartbeat_ms;
  options.default_max_attempts = flags.max_attempts;
  options.worker_lost_after_ms = std::max(options.worker_lost_after_ms, 3 * flags.lease_ms);
  options.qforge_version = QFORGE_VERSION;
  options.hessian_cache_uri = hessian_cache;
  options.open_store = [s3 = *s3](std::string_view uri) {
    return qforge::OpenCountedObjectStore(uri, s3);
  };
  // File access (docs/operations.md "File access"): never "anywhere". Without client tokens
  // every job may use the store root and the --allow-root directories; with them, each
  // tenant gets its own <store-root>/<tenant>, its tokens-file allow-root= directories and
  // the shared --allow-root ones. The Hessian cache is always allowed as a Hessian source.
  const std::string store_root_abs = fs::absolute(store_root).lexically_normal().string();
  for (const std::string& root : flags.allow_roots) {
    options.allowed_file_roots.push_back(fs::absolute(root).lexically_normal().string());
  }
  if (auth->num_client_tokens() == 0) {
    options.allowed_file_roots.push_back(store_root_abs);
  } else {
    for (const auto& [tenant, dirs] : auth->tenants()) {
      std::vector<std::string>& roots = options.tenant_file_roots[tenant];
      roots.push_back((fs::path(store_root_abs) / tenant).string());
      roots.insert(roots.end(), dirs.begin(), dirs.end());
    }
  }
  qforge::RpcServiceOptions rpc_options;
  rpc_options.max_acquire_wait_ms = options.max_acquire_wait_ms;

  auto manager = qforge::JobManager::Create(*std::move(store), &clock, options, metrics->get());
  if (!manager.ok()) return Fail(std::string(manager.status().message()));
  qforge::JobManager* jm = manager->get();
  (*metrics)->StartRefresh([jm] { return jm->Stats(); });

  // gRPC, over TLS with --tls-cert/--tls-key; with --tls-ca workers need a client
  // certificate signed by it (common/tls.h).
  auto server_credentials = qforge::ServerCredentialsFor(flags.tls);
  if (!server_credentials.ok()) {
    (*metrics)->StopRefresh();
    jm->Shutdown();
    return Fail(std::string(server_credentials.status().message()));
  }
  rpc_options.require_worker_certificate = !flags.tls.ca.empty();
  qforge::LongPollExecutor executor(flags.rpc_threads);
  qforge::JobServiceImpl job_service(jm, &*auth, &executor, rpc_options);
  qforge::WorkerServiceImpl worker_service(jm, &*auth, &executor, rpc_options);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(flags.listen, *server_credentials, &port);
  builder.RegisterService(&job_service);
  builder.RegisterService(&worker_service);
  {
    // qforge_grpc_server_* (server/grpc_server_metrics.h).
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> f;
    f.push_back((*metrics)->NewGrpcInterceptorFactory());
    builder.experimental().SetInterceptorCreators(std::move(f));
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    (*metrics)->StopRefresh();
    jm->Shutdown();
    return Fail(absl::StrCat("cannot listen on --listen ", flags.listen));
  }
  const std::string host = HostOf(flags.listen);
  const std::string listen_address = absl::StrCat(host, ":", port);
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health != nullptr) {
    health->SetServingStatus(true);
    health->SetServingStatus(qforge::v1::JobService::service_full_name(), true);
    health->SetServingStatus(qforge::v1::WorkerService::service_full_name(), true);
  }

  // Local workers.
  std::unique_ptr<qforge::LocalWorkerSupervisor> workers;
  if (flags.local_workers > 0) {
    auto binary = qforge::LocalWorkerSupervisor::FindWorkerBinary(flags.worker_binary);
    if (!binary.ok()) {
      server->Shutdown();
      (*metrics)->StopRefresh();
      jm->Shutdown();
      return Fail(std::string(binary.status().message()));
    }
    qforge::LocalWorkerOptions w;
    w.binary = *binary;
    w.count = flags.local_workers;
    w.args = {"--coordinator", absl::StrCat(LoopbackFor(host), ":", port)};
    for (std::string& a : qforge::S3FlagArgs(flags.s3)) w.args.push_back(std::move(a));
    // Local workers connect over loopback: they verify the coordinator with --tls-ca (its
    // own certificate without one) and present its certificate as their client certificate
    // (signed by --tls-ca when mutual TLS is on). The certificate must name the loopback
    // address (docs/operations.md "TLS").
    if (flags.tls.enabled()) {
      const std::string ca = flags.tls.ca.empty() ? flags.tls.cert : flags.tls.ca;
      w.args.insert(w.args.end(), {"--tls-ca", ca, "--tls-cert", flags.tls.cert, "--tls-key",
                                   flags.tls.key});
    }
    w.args.insert(w.args.end(), flags.local_worker_args.begin(), flags.local_worker_args.end());
    if (!flags.worker_token.empty()) w.env.push_back("QFORGE_WORKER_TOKEN=" + flags.worker_token);
    if (auth->enabled() && !auth->has_worker_token()) {
      std::fprintf(stderr,
                   "qforge-coordinator: warning: authentication is on but no --worker-token is "
                   "set; local workers cannot authenticate\n");
    }
    auto started = qforge::LocalWorkerSupervisor::Start(std::move(w));
    if (!started.ok()) {
      server->Shutdown();
      (*metrics)->StopRefresh();
      jm->Shutdown();
      return Fail(std::string(started.status().message()));
    }
    workers = *std::move(started);
  }

  (*metrics)->set_ready(true);  // /readyz answers 200 from now until shutdown begins
  std::fprintf(stderr,
               "qforge-coordinator %s: state %s, store root %s, authentication %s, %d local "
               "worker(s), file roots: %s\n",
               QFORGE_VERSION, db_path.c_str(), store_root.c_str(),
               auth->enabled() ? "on" : "off", flags.local_workers,
               options.tenant_file_roots.empty()
                   ? absl::StrJoin(options.allowed_file_roots, ", ").c_str()
                   : absl::StrCat(absl::StrJoin(options.allowed_file_roots, ", "),
                                  options.allowed_file_roots.empty() ? "" : ", ",
                                  "<store root>/<tenant> and the tokens file's allow-root=")
                         .c_str());
  std::fprintf(stderr, "qforge-coordinator listening on %s metrics on %s\n",
               listen_address.c_str(),
               (*metrics)->listening_address().empty() ? "off"
                                                       : (*metrics)->listening_address().c_str());
  std::fflush(stderr);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "qforge-coordinator: %s received, shutting down\n",
               sig == SIGINT ? "SIGINT" : "SIGTERM");
  // A second signal means "now".
  std::thread([stop_signals] {
    int again = 0;
    sigwait(&stop_signals, &again);
    std::fprintf(stderr, "qforge-coordinator: second signal, exiting immediately\n");
    std::_Exit(1);
  }).detach();

  if (health != nullptr) health->Shutdown();  // probes see NOT_SERVING from now on
  (*metrics)->set_ready(false);               // and /readyz 503
  // Workers first, while the server still accepts their CompleteTask / FailTask.
  if (workers != nullptr) workers->Stop(std::chrono::milliseconds(flags.shutdown_grace_ms));
  executor.BeginShutdown();  // long-polls answer within one slice
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  executor.Stop();
  (*metrics)->StopRefresh();
  jm->Shutdown();
  server.reset();
  manager->reset();
  std::fprintf(stderr, "qforge-coordinator: stopped\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  CLI::App app{"qforge-coordinator: accepts GPTQ/VPTQ quantization jobs and leases their layers "
               "to qforge-worker processes"};
  app.set_version_flag("--version", QFORGE_VERSION);
  app.add_option("--listen", flags.listen, "gRPC address host:port (port 0: a free port)")
      ->capture_default_str();
  app.add_option("--data-dir", flags.data_dir, "directory of the state database (state.db)")
      ->capture_default_str();
  app.add_option("--store-root", flags.store_root,
                 "directory of the embedded file:// store (default <data-dir>/store); created, "
                 "for jobs to use as their output location");
  app.add_option("--hessian-cache", flags.hessian_cache,
                 "store URI of the Hessian cache: reduced calibration Hessians kept for later "
                 "jobs on the same model and data (default file://<data-dir>/hessian-cache; "
                 "created)");
  app.add_option("--metrics-listen", flags.metrics_listen,
                 "HTTP address host:port of /metrics, /healthz and /readyz (0: a free port on "
                 "127.0.0.1; off: none)")
      ->capture_default_str();
  app.add_option("--local-workers", flags.local_workers,
                 "start N qforge-worker processes and restart them if they die")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  app.add_option("--worker-binary", flags.worker_binary,
                 "worker executable for --local-workers (default: qforge-worker next to this "
                 "binary)");
  app.add_option("--local-worker-arg", flags.local_worker_args,
                 "extra argument for local workers (repeatable, e.g. --local-worker-arg=--threads "
                 "--local-worker-arg=2)");
  app.add_option("--tokens-file", flags.tokens_file,
                 "client tokens, one '<token> <tenant>' per line; enables authentication");
  app.add_option("--worker-token", flags.worker_token,
                 "token workers must present (also QFORGE_WORKER_TOKEN); enables authentication")
      ->envname("QFORGE_WORKER_TOKEN");
  app.add_option("--lease-ms", flags.lease_ms, "task lease duration")
      ->check(CLI::Range(int64_t{100}, int64_t{86'400'000}))
      ->capture_default_str();
  app.add_option("--heartbeat-ms", flags.heartbeat_ms, "worker heartbeat interval")
      ->check(CLI::Range(int64_t{10}, int64_t{3'600'000}))
      ->capture_default_str();
  app.add_option("--max-attempts", flags.max_attempts,
                 "attempts per task when a job does not say")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  app.add_option("--allow-root", flags.allow_roots,
                 "file:// directory every tenant's jobs may read and write (repeatable); the "
                 "store root is always allowed (per tenant, <store-root>/<tenant>, with "
                 "--tokens-file, whose lines may add allow-root=DIR per tenant); nothing else "
                 "is");
  app.add_option("--rpc-threads", flags.rpc_threads,
                 "threads serving long-polls and job submission")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--shutdown-grace-ms", flags.shutdown_grace_ms,
                 "on SIGTERM, how long local workers get to finish or release their task")
      ->check(CLI::Range(int64_t{0}, int64_t{3'600'000}))
      ->capture_default_str();
  app.add_option("--max-running-jobs-per-tenant", flags.max_running_jobs_per_tenant,
                 "unfinished jobs (not SUCCEEDED, FAILED or CANCELLED) one tenant may have; a "
                 "further SubmitJob is RESOURCE_EXHAUSTED (0: no limit)")
      ->check(CLI::Range(0, 1'000'000))
      ->capture_default_str();
  app.add_option("--max-queued-tasks-per-tenant", flags.max_queued_tasks_per_tenant,
                 "tasks not yet run (PENDING or QUEUED) one tenant's jobs may hold, the new "
                 "job's included; beyond, SubmitJob is RESOURCE_EXHAUSTED (0: no limit)")
      ->check(CLI::Range(int64_t{0}, int64_t{1'000'000'000}))
      ->capture_default_str();
  app.add_option("--max-header-bytes", flags.max_header_bytes,
                 "largest safetensors JSON header accepted (models, Hessian files)")
      ->check(CLI::Range(uint64_t{1}, qforge::kMaxSafetensorsHeaderBytes))
      ->capture_default_str();
  app.add_option("--header-parse-budget-bytes", flags.header_parse_budget_bytes,
                 "safetensors header bytes read and parsed at once across all requests; "
                 "further header reads wait (up to 60 s, then RESOURCE_EXHAUSTED) (0: no "
                 "limit)")
      ->capture_default_str();
  app.add_option("--retain-jobs", flags.retain_jobs,
                 "delete finished jobs (row, tasks, events; not their artifacts) this long after "
                 "they ended: 30d, 12h, 90m, ... (0: keep forever)")
      ->capture_default_str();
  app.add_option("--progress-event-ms", flags.progress_event_ms,
                 "at most one progress event per job this often (WatchJob, qforge events); "
                 "GetJob always shows the latest heartbeat")
      ->check(CLI::Range(int64_t{0}, int64_t{3'600'000}))
      ->capture_default_str();
  app.add_option("--tls-cert", flags.tls.cert,
                 "PEM certificate of this server: serve gRPC over TLS (with --tls-key)");
  app.add_option("--tls-key", flags.tls.key, "PEM private key of --tls-cert");
  app.add_option("--tls-ca", flags.tls.ca,
                 "PEM CA certificates: workers must present a client certificate signed by "
                 "it (mutual TLS); clients of the job API may present one");
  qforge::AddS3Flags(&app, &flags.s3);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  if (flags.heartbeat_ms >= flags.lease_ms) {
    std::fprintf(stderr,
                 "qforge-coordinator: --heartbeat-ms (%lld) must be shorter than --lease-ms "
                 "(%lld)\n",
                 static_cast<long long>(flags.heartbeat_ms), static_cast<long long>(flags.lease_ms));
    return 2;
  }
  if (absl::StatusOr<int64_t> retain = ParseRetention(flags.retain_jobs); !retain.ok()) {
    std::fprintf(stderr, "qforge-coordinator: %s\n", std::string(retain.status().message()).c_str());
    return 2;
  }
  return Run(flags);
}

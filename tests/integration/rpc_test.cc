// The coordinator's gRPC edge over real loopback gRPC: an in-process server (JobManager on a
// SQLite file, JobServiceImpl + WorkerServiceImpl on port 0, health service, reflection,
// CoordinatorMetrics on an HTTP port 0). Checks the auth table, the absl -> gRPC status
// mapping, field-naming INVALID_ARGUMENTs, tenant isolation, WatchJob streaming and resume,
// AcquireTask long-polls (empty after wait_ms, before the deadline, woken by new work, fair
// sharing of a 2-thread pool without starving other calls), health, reflection, /metrics over
// HTTP (and `promtool check metrics` when present), and a real Prometheus server scraping the
// in-process metrics port (skipped when `prometheus` is absent). Also unit tests of
// Authenticator, LongPollExecutor, CoordinatorMetrics and LocalWorkerSupervisor.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "qforge/v1/job_service.grpc.pb.h"
#include "qforge/v1/worker_service.grpc.pb.h"
#include "server/auth.h"
#include "server/clock.h"
#include "server/grpc_server_metrics.h"
#include "server/grpc_status.h"
#include "server/job_manager.h"
#include "server/local_workers.h"
#include "server/long_poll_executor.h"
#include "server/metrics.h"
#include "server/rpc_job_service.h"
#include "server/rpc_worker_service.h"
#include "server/sqlite_state_store.h"
#include "tests/integration/subprocess.h"

namespace qforge {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

constexpr char kTokenA[] = "token-tenant-a-0123456789abcdef";
constexpr char kTokenB[] = "token-tenant-b-0123456789abcdef";
constexpr char kWorkerToken[] = "token-worker-0123456789abcdef";
constexpr char kVersion[] = "9.9.9-test";

// ---- helpers -----------------------------------------------------------------------------

std::string MakeTempDir() {
  char tmpl[] = "/tmp/qforge-rpc-XXXXXX";
  const char* d = mkdtemp(tmpl);
  return d == nullptr ? std::string() : std::string(d);
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out << data;
}

// A Llama-shaped model directory: config.json and model.safetensors with `layers` F32
// q_proj weights [out, in] (non-zero values) plus an embedding that is not selected.
void WriteModel(const std::string& dir, int layers, int64_t out, int64_t in) {
  fs::create_directories(dir);
  WriteFile(dir + "/config.json", R"({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})");
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  auto add = [&](const std::string& name, int64_t rows, int64_t cols) {
    const size_t begin = data.size();
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float v = 0.01f * static_cast<float>((i * 7919 + name.size()) % 201 - 100) + 0.005f;
      data.append(reinterpret_cast<const char*>(&v), sizeof v);
    }
    header[name] = {{"dtype", "F32"}, {"shape", {rows, cols}}, {"data_offsets", {begin, data.size()}}};
  };
  add("model.embed_tokens.weight", 16, in);
  for (int l = 0; l < layers; ++l) {
    add("model.layers." + std::to_string(l) + ".self_attn.q_proj.weight", out, in);
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  std::string file(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  WriteFile(dir + "/model.safetensors", file + h + data);
}

v1::SubmitJobRequest GoodRequest(const std::string& model, const std::string& output) {
  v1::SubmitJobRequest r;
  v1::JobSpec* s = r.mutable_spec();
  s->set_model_uri(model);
  s->set_output_uri(output);
  s->set_method(v1::METHOD_GPTQ);
  s->mutable_gptq()->set_bits(4);
  s->mutable_gptq()->set_group_size(128);
  s->mutable_calibration()->set_none(true);
  return r;
}

v1::RegisterWorkerRequest WorkerRegistration() {
  v1::RegisterWorkerRequest r;
  r.set_hostname("test-host");
  r.add_backends("cpu");
  v1::DeviceInfo* d = r.add_devices();
  d->set_name("cpu");
  d->set_kind("cpu");
  r.set_version(kVersion);
  return r;
}

void Authorize(grpc::ClientContext* ctx, const std::string& token) {
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

void SetDeadline(grpc::ClientContext* ctx, std::chrono::milliseconds d) {
  ctx->set_deadline(std::chrono::system_clock::now() + d);
}

struct HttpResponse {
  int status = 0;
  std::string body;
};

// GET http://<host:port><path> over a plain socket (HTTP/1.0, 5 s timeouts).
HttpResponse HttpGet(const std::string& address, const std::string& path) {
  HttpResponse r;
  const size_t colon = address.rfind(':');
  const std::string host = address.substr(0, colon);
  const int port = std::atoi(address.c_str() + colon + 1);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return r;
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, host == "0.0.0.0" ? "127.0.0.1" : host.c_str(), &sa.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
    close(fd);
    return r;
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: " + address + "\r\n\r\n";
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return r;
  }
  std::string all;
  char buf[8192];
  for (;;) {
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    all.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  if (all.rfind("HTTP/1.", 0) == 0 && all.size() > 12) r.status = std::atoi(all.c_str() + 9);
  const size_t body = all.find("\r\n\r\n");
  if (body != std::string::npos) r.body = all.substr(body + 4);
  return r;
}

int FreeTcpPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sa.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  socklen_t len = sizeof sa;
  getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  const int port = ntohs(sa.sin_port);
  close(fd);
  return port;
}

// Minimal protobuf wire-format reading for the generic health / reflection calls (whose
// generated code Debian does not ship).
bool ReadVarint(const std::string& s, size_t* pos, uint64_t* v) {
  *v = 0;
  for (int shift = 0; shift < 64 && *pos < s.size(); shift += 7) {
    const uint8_t b = static_cast<uint8_t>(s[(*pos)++]);
    *v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if ((b & 0x80) == 0) return true;
  }
  return false;
}
// Fields of one message: (number, wire type 0 value or wire type 2 bytes).
struct WireField {
  int number;
  uint64_t varint = 0;
  std::string bytes;
};
std::vector<WireField> ParseWire(const std::string& s) {
  std::vector<WireField> out;
  size_t pos = 0;
  while (pos < s.size()) {
    uint64_t key = 0;
    if (!ReadVarint(s, &pos, &key)) break;
    WireField f{static_cast<int>(key >> 3), 0, std::string()};
    const int type = static_cast<int>(key & 7);
    if (type == 0) {
      if (!ReadVarint(s, &pos, &f.varint)) break;
    } else if (type == 2) {
      uint64_t len = 0;
      if (!ReadVarint(s, &pos, &len) || pos + len > s.size()) break;
      f.bytes = s.substr(pos, len);
      pos += len;
    } else {
      break;  // not used by these messages
    }
    out.push_back(std::move(f));
  }
  return out;
}

grpc::ByteBuffer ToByteBuffer(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}
std::string FromByteBuffer(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!b.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// ---- in-process coordinator ----------------------------------------------------------------

class InProcessCoordinator {
 public:
  // `serve_metrics`: also serve /metrics over HTTP on a free port (off by default: most
  // tests read the registry directly).
  InProcessCoordinator(const std::string& dir, Authenticator auth, bool serve_metrics = false)
      : auth_(std::move(auth)) {
    auto store = SqliteStateStore::Open(dir + "/state.db");
    EXPECT_TRUE(store.ok()) << store.status();
    CoordinatorMetricsOptions mo;
    mo.listen_address = serve_metrics ? "127.0.0.1:0" : "";
    mo.version = kVersion;
    mo.refresh_interval = 50ms;
    auto metrics = CoordinatorMetrics::Create(mo);
    EXPECT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
    JobManagerOptions options;
    options.lease_duration_ms = 5'000;
    options.heartbeat_interval_ms = 500;
    options.qforge_version = kVersion;
    auto manager = JobManager::Create(*std::move(store), &clock_, options, metrics_.get());
    EXPECT_TRUE(manager.ok()) << manager.status();
    manager_ = *std::move(manager);
    metrics_->StartRefresh([m = manager_.get()] { return m->Stats(); });

    RpcServiceOptions rpc;
    rpc.poll_slice_ms = 100;
    rpc.watch_batch_events = 2;  // several WatchEvents fetches per stream
    executor_ = std::make_unique<LongPollExecutor>(2);
    job_service_ = std::make_unique<JobServiceImpl>(manager_.get(), &auth_, executor_.get(), rpc);
    worker_service_ =
        std::make_unique<WorkerServiceImpl>(manager_.get(), &auth_, executor_.get(), rpc);
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(job_service_.get());
    builder.RegisterService(worker_service_.get());
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> f;
    f.push_back(metrics_->NewGrpcInterceptorFactory());
    builder.experimental().SetInterceptorCreators(std::move(f));
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
    EXPECT_NE(port_, 0);
    if (server_ != nullptr && server_->GetHealthCheckService() != nullptr) {
      server_->GetHealthCheckService()->SetServingStatus(v1::JobService::service_full_name(),
                                                         true);
    }
    channel_ = grpc::CreateChannel("127.0.0.1:" + std::to_string(port_),
                                   grpc::InsecureChannelCredentials());
  }

  ~InProcessCoordinator() {
    executor_->BeginShutdown();
    if (server_ != nullptr) server_->Shutdown(std::chrono::system_clock::now() + 2s);
    executor_->Stop();
    metrics_->StopRefresh();
    manager_->Shutdown();
    server_.reset();
  }

  std::shared_ptr<grpc::Channel> channel() const { return channel_; }
  std::unique_ptr<v1::JobService::Stub> jobs() const { return v1::JobService::NewStub(channel_); }
  std::unique_ptr<v1::WorkerService::Stub> workers() const {
    return v1::WorkerService::NewStub(channel_);
  }
  JobManager* manager() const { return manager_.get(); }
  CoordinatorMetrics* metrics() const { return metrics_.get(); }

 private:
  RealClock clock_;
  Authenticator auth_;
  std::unique_ptr<CoordinatorMetrics> metrics_;
  std::unique_ptr<JobManager> manager_;
  std::unique_ptr<LongPollExecutor> executor_;
  std::unique_ptr<JobServiceImpl> job_service_;
  std::unique_ptr<WorkerServiceImpl> worker_service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
};

Authenticator TestAuth() {
  auto auth = Authenticator::Create({{kTokenA, "tenant-a"}, {kTokenB, "tenant-b"}}, kWorkerToken);
  EXPECT_TRUE(auth.ok()) << auth.status();
  return *std::move(auth);
}

class RpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir();
    ASSERT_FALSE(dir_.empty());
    coordinator_ = std::make_unique<InProcessCoordinator>(dir_, TestAuth(), serve_metrics_);
    model_ = dir_ + "/model";
    WriteModel(model_, /*layers=*/2, /*out=*/32, /*in=*/128);
  }
  void TearDown() override {
    coordinator_.reset();
    if (!HasFailure()) fs::remove_all(dir_);
  }

  absl::StatusOr<v1::Job> Submit(const v1::SubmitJobRequest& request,
                                 const std::string& token = kTokenA) {
    grpc::ClientContext ctx;
    Authorize(&ctx, token);
    SetDeadline(&ctx, 10s);
    v1::Job job;
    grpc::Status s = coordinator_->jobs()->SubmitJob(&ctx, request, &job);
    if (!s.ok()) return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
    return job;
  }

  std::string RegisterWorker() {
    grpc::ClientContext ctx;
    Authorize(&ctx, kWorkerToken);
    SetDeadline(&ctx, 5s);
    v1::RegisterWorkerResponse r;
    grpc::Status s = coordinator_->workers()->RegisterWorker(&ctx, WorkerRegistration(), &r);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return r.worker_id();
  }

  grpc::Status Acquire(const std::string& worker_id, int64_t wait_ms,
                       std::chrono::milliseconds deadline, v1::AcquireTaskResponse* out) {
    grpc::ClientContext ctx;
    Authorize(&ctx, kWorkerToken);
    SetDeadline(&ctx, deadline);
    v1::AcquireTaskRequest req;
    req.set_worker_id(worker_id);
    req.set_wait_ms(wait_ms);
    return coordinator_->workers()->AcquireTask(&ctx, req, out);
  }

  // Reads a whole WatchJob stream.
  grpc::Status Watch(const std::string& job_id, int64_t after, std::vector<v1::JobEvent>* events,
                     std::chrono::milliseconds deadline = 15s,
                     std::atomic<int>* count = nullptr) {
    grpc::ClientContext ctx;
    Authorize(&ctx, kTokenA);
    SetDeadline(&ctx, deadline);
    v1::WatchJobRequest req;
    req.set_id(job_id);
    req.set_after_sequence(after);
    auto reader = coordinator_->jobs()->WatchJob(&ctx, req);
    v1::JobEvent e;
    while (reader->Read(&e)) {
      events->push_back(e);
      if (count != nullptr) count->fetch_add(1);
    }
    return reader->Finish();
  }

  bool serve_metrics_ = false;
  std::string dir_, model_;
  std::unique_ptr<InProcessCoordinator> coordinator_;
};

// The same, with /metrics served over HTTP.
class RpcMetricsTest : public RpcTest {
 protected:
  RpcMetricsTest() { serve_metrics_ = true; }
};

// ---- ToGrpcStatus ----------------------------------------------------------------------------

TEST(ToGrpcStatusTest, KeepsEveryCanonicalCodeAndTheMessage) {
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  for (int code = 1; code <= 16; ++code) {
    const absl::Status in(static_cast<absl::StatusCode>(code), "spec.gptq.bits: 5 is not one of 2, 3, 4, 8");
    const grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(static_cast<int>(out.error_code()), code);
    EXPECT_EQ(out.error_message(), "spec.gptq.bits: 5 is not one of 2, 3, 4, 8");
  }
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("x")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ToGrpcStatus(absl::NotFoundError("x")).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(ToGrpcStatus(absl::FailedPreconditionError("x")).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(ToGrpcStatus(absl::UnauthenticatedError("x")).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(ToGrpcStatus(absl::PermissionDeniedError("x")).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(ToGrpcStatus(absl::UnavailableError("x")).error_code(), grpc::StatusCode::UNAVAILABLE);
  // A non-canonical code (abseil allows them) must not reach the wire as such.
  const grpc::Status odd = ToGrpcStatus(absl::Status(static_cast<absl::StatusCode>(42), "odd"));
  EXPECT_EQ(odd.error_code(), grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(odd.error_message(), "odd");
}

// ---- Authenticator ---------------------------------------------------------------------------

TEST(AuthenticatorTest, ParsesTokensFileWithCommentsAndBlankLines) {
  auto tokens = Authenticator::ParseTokens(
      "# token tenant\n\n  tok-1   research  \n\ttok-2\tprod # trailing comment\r\n", "tokens");
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ(tokens->size(), 2u);
  EXPECT_EQ(tokens->at("tok-1"), "research");
  EXPECT_EQ(tokens->at("tok-2"), "prod");
}

TEST(AuthenticatorTest, RejectsMalformedTokenLinesNamingTheLine) {
  struct Case {
    const char* text;
    const char* expect;
  } cases[] = {
      {"tok-1 research\nlonely\n", "tokens:2: expected two fields"},
      {"tok-1 a b\n", "tokens:1: expected two fields '<token> <tenant>', found 3"},
      {"tok-1 a\n\ntok-1 b\n", "tokens:3: duplicate token (first given on line 1)"},
      {"tok-1 bad/tenant\n", "tokens:1: tenant 'bad/tenant' must be"},
  };
  for (const Case& c : cases) {
    auto r = Authenticator::ParseTokens(c.text, "tokens");
    ASSERT_FALSE(r.ok()) << c.text;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(r.status().message()).find(c.expect), std::string::npos)
        << r.status();
  }
}

TEST(AuthenticatorTest, TokensFileGivesEachTenantItsAllowRoots) {
  auto f = Authenticator::ParseTokensFile(
      "tok-1 research allow-root=/srv/models/r allow-root=/srv/data/r/../r\n"
      "tok-2 prod\n"
      "tok-3 research allow-root=/srv/models/r allow-root=/srv/extra\n",
      "tokens");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->tokens.size(), 3u);
  EXPECT_EQ(f->tenant_roots.at("research"),
            (std::vector<std::string>{"/srv/models/r", "/srv/data/r", "/srv/extra"}));
  EXPECT_TRUE(f->tenant_roots.at("prod").empty());
  for (const char* bad : {"tok a allow-root=relative/dir\n", "tok a allow-root=\n",
                          "tok a extra\n", "tok ..\n", "tok .\n"}) {
    auto r = Authenticator::ParseTokensFile(bad, "tokens");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(std::string(r.status().message()).find("tokens:1: "), std::string::npos)
        << r.status();
  }
  const std::string dir = MakeTempDir();
  WriteFile(dir + "/tokens", "tok-1 research allow-root=/srv/r\ntok-2 prod\n");
  auto auth = Authenticator::FromFlags(dir + "/tokens", "");
  ASSERT_TRUE(auth.ok()) << auth.status();
  EXPECT_EQ(auth->tenants().size(), 2u);
  EXPECT_EQ(auth->tenants().at("research"), (std::vector<std::string>{"/srv/r"}));
  EXPECT_TRUE(auth->tenants().at("prod").empty());
  fs::remove_all(dir);
}

TEST(AuthenticatorTest, FromFlags) {
  const std::string dir = MakeTempDir();
  // Neither flag: authentication off.
  auto off = Authenticator::FromFlags("", "");
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(off->enabled());
  EXPECT_EQ(*off->AuthenticateClient(std::nullopt), "");
  EXPECT_TRUE(off->AuthenticateWorker(std::nullopt).ok());
  // A missing file.
  auto missing = Authenticator::FromFlags(dir + "/nope", "");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(missing.status().message()).find(dir + "/nope"), std::string::npos);
  // An empty file must not silently switch authentication off.
  WriteFile(dir + "/empty", "# nothing yet\n");
  auto empty = Authenticator::FromFlags(dir + "/empty", "");
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  // The worker token may not double as a client token.
  WriteFile(dir + "/tokens", "shared-token t1\nother t2\n");
  auto clash = Authenticator::FromFlags(dir + "/tokens", "shared-token");
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kInvalidArgument);
  auto ok = Authenticator::FromFlags(dir + "/tokens", "worker-token");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_TRUE(ok->enabled());
  EXPECT_EQ(ok->num_client_tokens(), 2u);
  EXPECT_EQ(*ok->AuthenticateClient("Bearer other"), "t2");
  // Only a worker token: authentication is on for both services.
  auto worker_only = Authenticator::FromFlags("", "worker-token");
  ASSERT_TRUE(worker_only.ok());
  EXPECT_TRUE(worker_only->enabled());
  EXPECT_EQ(worker_only->AuthenticateClient(std::nullopt).status().code(),
            absl::StatusCode::kUnauthenticated);
  fs::remove_all(dir);
}

TEST(AuthenticatorTest, HeaderForms) {
  const Authenticator auth = TestAuth();
  EXPECT_EQ(*auth.AuthenticateClient(std::string("Bearer ") + kTokenA), "tenant-a");
  EXPECT_EQ(*auth.AuthenticateClient(std::string("  bearer\t") + kTokenB + " "), "tenant-b");
  for (const std::string& bad : {std::string("Basic ") + kTokenA, std::string("Bearer"),
                                std::string("Bearer   "), std::string(kTokenA),
                                std::string("Bearerx ") + kTokenA}) {
    auto r = auth.AuthenticateClient(bad);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnauthenticated) << bad;
    EXPECT_EQ(std::string(r.status().message()).find(kTokenA), std::string::npos)
        << "the token must not be echoed: " << r.status();
  }
  EXPECT_EQ(auth.AuthenticateClient("Bearer nope").status().code(),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(auth.AuthenticateClient(std::string("Bearer ") + kWorkerToken).status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(auth.AuthenticateWorker(std::string("Bearer ") + kWorkerToken).ok());
  EXPECT_EQ(auth.AuthenticateWorker(std::string("Bearer ") + kTokenA).code(),
            absl::StatusCode::kPermissionDenied);
}

// ---- auth over gRPC ------------------------------------------------------------------------

TEST_F(RpcTest, AuthTable) {
  enum Service { kJobs, kWorkers };
  struct Case {
    Service service;
    std::string authorization;  // "" = no metadata
    grpc::StatusCode expect;
  };
  const std::string bearer = "Bearer ";
  const Case cases[] = {
      {kJobs, "", grpc::StatusCode::UNAUTHENTICATED},
      {kJobs, bearer + "wrong-token", grpc::StatusCode::UNAUTHENTICATED},
      {kJobs, "Basic " + std::string(kTokenA), grpc::StatusCode::UNAUTHENTICATED},
      {kJobs, bearer + kWorkerToken, grpc::StatusCode::PERMISSION_DENIED},
      {kJobs, bearer + kTokenA, grpc::StatusCode::OK},
      {kJobs, bearer + kTokenB, grpc::StatusCode::OK},
      {kWorkers, "", grpc::StatusCode::UNAUTHENTICATED},
      {kWorkers, bearer + "wrong-token", grpc::StatusCode::UNAUTHENTICATED},
      {kWorkers, bearer + kTokenA, grpc::StatusCode::PERMISSION_DENIED},
      {kWorkers, bearer + kWorkerToken, grpc::StatusCode::OK},
  };
  for (const Case& c : cases) {
    grpc::ClientContext ctx;
    if (!c.authorization.empty()) ctx.AddMetadata("authorization", c.authorization);
    SetDeadline(&ctx, 5s);
    grpc::Status s;
    if (c.service == kJobs) {
      v1::ListJobsResponse r;
      s = coordinator_->jobs()->ListJobs(&ctx, v1::ListJobsRequest(), &r);
    } else {
      v1::RegisterWorkerResponse r;
      s = coordinator_->workers()->RegisterWorker(&ctx, WorkerRegistration(), &r);
      if (s.ok()) {
        EXPECT_FALSE(r.worker_id().empty());
      }
    }
    EXPECT_EQ(s.error_code(), c.expect)
        << (c.service == kJobs ? "JobService" : "WorkerService") << " with '"
        << c.authorization << "': " << s.error_message();
    EXPECT_EQ(s.error_message().find(kTokenA), std::string::npos);
  }
  // Every method checks, not just the two above (WatchJob is a stream).
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, 5s);
    v1::WatchJobRequest req;
    req.set_id("whatever");
    auto reader = coordinator_->jobs()->WatchJob(&ctx, req);
    v1::JobEvent e;
    EXPECT_FALSE(reader->Read(&e));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, kTokenB);
    SetDeadline(&ctx, 5s);
    v1::AcquireTaskRequest req;
    v1::AcquireTaskResponse r;
    EXPECT_EQ(coordinator_->workers()->AcquireTask(&ctx, req, &r).error_code(),
              grpc::StatusCode::PERMISSION_DENIED);
  }
}

TEST(RpcAuthOffTest, AcceptsCallsWithoutTokens) {
  const std::string dir = MakeTempDir();
  {
    InProcessCoordinator c(dir, Authenticator());
    grpc::ClientContext ctx1;
    SetDeadline(&ctx1, 5s);
    v1::ListJobsResponse jobs;
    EXPECT_TRUE(c.jobs()->ListJobs(&ctx1, v1::ListJobsRequest(), &jobs).ok());
    grpc::ClientContext ctx2;
    SetDeadline(&ctx2, 5s);
    v1::RegisterWorkerResponse reg;
    EXPECT_TRUE(c.workers()->RegisterWorker(&ctx2, WorkerRegistration(), &reg).ok());
    // A token is ignored when authentication is off.
    grpc::ClientContext ctx3;
    Authorize(&ctx3, "anything");
    SetDeadline(&ctx3, 5s);
    v1::Job job;
    v1::GetJobRequest get;
    get.set_id("no-such-job");
    EXPECT_EQ(c.jobs()->GetJob(&ctx3, get, &job).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  fs::remove_all(dir);
}

// ---- jobs ----------------------------------------------------------------------------------

TEST_F(RpcTest, SubmitJobWithBadSpecNamesTheField) {
  v1::SubmitJobRequest bits = GoodRequest(model_, dir_ + "/out-bits");
  bits.mutable_spec()->mutable_gptq()->set_bits(5);
  auto r = Submit(bits);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_NE(std::string(r.status().message()).find("spec.gptq.bits"), std::string::npos)
      << r.status();

  auto missing = Submit(GoodRequest(dir_ + "/no-such-model", dir_ + "/out-missing"));
  ASSERT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument) << missing.status();
  EXPECT_NE(std::string(missing.status().message()).find("spec.model_uri"), std::string::npos)
      << missing.status();

  fs::create_directories(dir_ + "/out-used");
  WriteFile(dir_ + "/out-used/config.json", "{}");
  auto used = Submit(GoodRequest(model_, dir_ + "/out-used"));
  ASSERT_EQ(used.status().code(), absl::StatusCode::kInvalidArgument) << used.status();
  EXPECT_NE(std::string(used.status().message()).find("spec.output_uri"), std::string::npos)
      << used.status();
}

TEST_F(RpcTest, JobsAreVisibleToTheirTenantOnly) {
  auto job = Submit(GoodRequest(model_, dir_ + "/out"));
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->tenant(), "tenant-a");
  EXPECT_EQ(job->tasks().total() >= 2, true) << job->DebugString();

  for (const auto& [token, code] : {std::pair<std::string, grpc::StatusCode>{kTokenA, grpc::StatusCode::OK},
                                    {kTokenB, grpc::StatusCode::NOT_FOUND}}) {
    grpc::ClientContext ctx;
    Authorize(&ctx, token);
    SetDeadline(&ctx, 5s);
    v1::GetJobRequest req;
    req.set_id(job->id());
    v1::Job got;
    grpc::Status s = coordinator_->jobs()->GetJob(&ctx, req, &got);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    if (s.ok()) {
      EXPECT_EQ(got.id(), job->id());
    }
  }
  grpc::ClientContext ctx;
  Authorize(&ctx, kTokenB);
  SetDeadline(&ctx, 5s);
  v1::ListJobsResponse list;
  ASSERT_TRUE(coordinator_->jobs()->ListJobs(&ctx, v1::ListJobsRequest(), &list).ok());
  EXPECT_EQ(list.jobs_size(), 0);
}

// Issue 18 item 5 / defect 8 over gRPC: ListWorkers hides other tenants' task ids, ListJobs
// refuses a state that does not exist.
TEST_F(RpcTest, ListWorkersShowsATenantOnlyItsOwnTaskAndListJobsChecksStates) {
  auto job = Submit(GoodRequest(model_, dir_ + "/out"));
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string worker = RegisterWorker();
  v1::AcquireTaskResponse acquired;
  ASSERT_TRUE(Acquire(worker, 5000, 10s, &acquired).ok());
  ASSERT_TRUE(acquired.has_task());
  for (const auto& [token, shown] : {std::pair<std::string, std::string>{kTokenA,
                                                                         acquired.task().id()},
                                     {kTokenB, ""}}) {
    grpc::ClientContext ctx;
    Authorize(&ctx, token);
    SetDeadline(&ctx, 5s);
    v1::ListWorkersResponse list;
    grpc::Status s = coordinator_->jobs()->ListWorkers(&ctx, v1::ListWorkersRequest(), &list);
    ASSERT_TRUE(s.ok()) << s.error_message();
    ASSERT_EQ(list.workers_size(), 1);
    EXPECT_EQ(list.workers(0).state(), "busy");
    EXPECT_EQ(list.workers(0).current_task(), shown);
    if (shown.empty()) {
      EXPECT_EQ(list.DebugString().find(job->id()), std::string::npos) << list.DebugString();
    }
  }
  grpc::ClientContext ctx;
  Authorize(&ctx, kTokenA);
  SetDeadline(&ctx, 5s);
  v1::ListJobsRequest req;
  req.add_states(static_cast<v1::JobState>(99));
  v1::ListJobsResponse list;
  grpc::Status s = coordinator_->jobs()->ListJobs(&ctx, req, &list);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("states[0]: 99 is not a JobState"), std::string::npos)
      << s.error_message();
}

TEST_F(RpcTest, WatchJobStreamsEventsAndResumesFromASequence) {
  auto job = Submit(GoodRequest(model_, dir_ + "/out"));
  ASSERT_TRUE(job.ok()) << job.status();

  std::vector<v1::JobEvent> events;
  std::atomic<int> count{0};
  auto watcher = std::async(std::launch::async, [&] {
    return Watch(job->id(), 0, &events, 20s, &count);
  });
  // The stream delivers the submission's events while the job is live...
  const auto until = Clock::now() + 10s;
  while (count.load() == 0 && Clock::now() < until) std::this_thread::sleep_for(10ms);
  ASSERT_GT(count.load(), 0) << "no event streamed for a live job";
  // ...and ends by itself (OK) once the job is terminal.
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, kTokenA);
    SetDeadline(&ctx, 5s);
    v1::CancelJobRequest req;
    req.set_id(job->id());
    v1::Job cancelled;
    grpc::Status s = coordinator_->jobs()->CancelJob(&ctx, req, &cancelled);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  ASSERT_EQ(watcher.wait_for(15s), std::future_status::ready) << "the stream did not end";
  const grpc::Status status = watcher.get();
  ASSERT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
  ASSERT_GE(events.size(), 2u);
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].job_id(), job->id());
    if (i > 0) {
      EXPECT_GT(events[i].sequence(), events[i - 1].sequence()) << "at " << i;
    }
  }
  EXPECT_GE(events.front().sequence(), 1);
  EXPECT_EQ(events.back().job_state(), v1::JOB_STATE_CANCELLED) << events.back().DebugString();

  // Resume from the middle: exactly the rest, in order, then OK.
  const size_t k = events.size() / 2;
  std::vector<v1::JobEvent> rest;
  const grpc::Status resumed = Watch(job->id(), events[k - 1].sequence(), &rest);
  ASSERT_TRUE(resumed.ok()) << resumed.error_message();
  ASSERT_EQ(rest.size(), events.size() - k);
  for (size_t i = 0; i < rest.size(); ++i) {
    EXPECT_EQ(rest[i].sequence(), events[k + i].sequence());
    EXPECT_EQ(rest[i].job_state(), events[k + i].job_state());
  }
  // Resuming after the last event of a finished job ends at once with nothing.
  std::vector<v1::JobEvent> none;
  const auto t0 = Clock::now();
  const grpc::Status done = Watch(job->id(), events.back().sequence(), &none);
  EXPECT_TRUE(done.ok()) << done.error_message();
  EXPECT_TRUE(none.empty());
  EXPECT_LT(Clock::now() - t0, 2s);
}

TEST_F(RpcTest, WatchJobOfUnknownJobIsNotFound) {
  std::vector<v1::JobEvent> events;
  const grpc::Status s = Watch("no-such-job", 0, &events, 5s);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_TRUE(events.empty());
}

TEST_F(RpcTest, WatchJobCancelledByTheClientEndsPromptly) {
  auto job = Submit(GoodRequest(model_, dir_ + "/out"));
  ASSERT_TRUE(job.ok()) << job.status();
  grpc::ClientContext ctx;
  Authorize(&ctx, kTokenA);
  v1::WatchJobRequest req;
  req.set_id(job->id());
  auto reader = coordinator_->jobs()->WatchJob(&ctx, req);
  v1::JobEvent e;
  ASSERT_TRUE(reader->Read(&e));
  ctx.TryCancel();
  while (reader->Read(&e)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // TearDown's server shutdown would hang if the reactor never finished.
}

// ---- AcquireTask long-polls -----------------------------------------------------------------

TEST_F(RpcTest, AcquireTaskReturnsEmptyAfterWaitMs) {
  const std::string worker = RegisterWorker();
  ASSERT_FALSE(worker.empty());
  v1::AcquireTaskResponse r;
  const auto t0 = Clock::now();
  grpc::Status s = Acquire(worker, 300, 10s, &r);
  const auto elapsed = Clock::now() - t0;
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_FALSE(r.has_task());
  EXPECT_GE(elapsed, 280ms);
  EXPECT_LT(elapsed, 3s);

  // wait_ms = 0: one try, no wait.
  const auto t1 = Clock::now();
  ASSERT_TRUE(Acquire(worker, 0, 10s, &r).ok());
  EXPECT_FALSE(r.has_task());
  EXPECT_LT(Clock::now() - t1, 1s);
}

TEST_F(RpcTest, AcquireTaskAnswersBeforeTheCallersDeadline) {
  const std::string worker = RegisterWorker();
  v1::AcquireTaskResponse r;
  const auto t0 = Clock::now();
  grpc::Status s = Acquire(worker, 20'000, 1000ms, &r);
  EXPECT_TRUE(s.ok()) << "a long-poll must answer (empty) before the deadline, got "
                      << s.error_code() << " " << s.error_message();
  EXPECT_FALSE(r.has_task());
  EXPECT_LT(Clock::now() - t0, 1000ms);
}

TEST_F(RpcTest, AcquireTaskIsWokenByNewWorkAndCompletionsAreFenced) {
  const std::string worker = RegisterWorker();
  v1::AcquireTaskResponse r;
  std::chrono::steady_clock::duration waited{};
  auto poll = std::async(std::launch::async, [&] {
    const auto t0 = Clock::now();
    grpc::Status s = Acquire(worker, 10'000, 20s, &r);
    waited = Clock::now() - t0;
    return s;
  });
  std::this_thread::sleep_for(300ms);  // the poll is waiting now
  auto job = Submit(GoodRequest(model_, dir_ + "/out"));
  ASSERT_TRUE(job.ok()) << job.status();
  const grpc::Status s = poll.get();
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_TRUE(r.has_task()) << "the long-poll was not given the new job's task";
  EXPECT_LT(waited, 5s);
  const v1::Task& task = r.task();
  EXPECT_EQ(task.job_id(), job->id());
  EXPECT_EQ(task.kind(), v1::TASK_KIND_QUANTIZE);
  EXPECT_EQ(task.layer().in_features(), 128);
  EXPECT_EQ(task.layer().out_features(), 32);
  EXPECT_EQ(task.layer().byte_length(), 32u * 128u * 4u);
  EXPECT_FALSE(task.lease_token().empty());

  // A heartbeat with the lease is accepted...
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, kWorkerToken);
    SetDeadline(&ctx, 5s);
    v1::HeartbeatRequest hb;
    hb.set_worker_id(worker);
    hb.set_task_id(task.id());
    hb.set_lease_token(task.lease_token());
    hb.set_progress(0.5);
    hb.set_phase("quantize");
    v1::HeartbeatResponse resp;
    grpc::Status hs = coordinator_->workers()->Heartbeat(&ctx, hb, &resp);
    ASSERT_TRUE(hs.ok()) << hs.error_message();
    EXPECT_FALSE(resp.cancel());
    EXPECT_FALSE(resp.lease_lost());
  }
  // ...and a completion with a stale lease token is refused (fencing) as FAILED_PRECONDITION.
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, kWorkerToken);
    SetDeadline(&ctx, 5s);
    v1::CompleteTaskRequest done;
    done.set_worker_id(worker);
    done.set_task_id(task.id());
    done.set_lease_token(task.lease_token() + "-stale");
    done.set_output_key(task.staging_key());
    v1::CompleteTaskResponse resp;
    grpc::Status cs = coordinator_->workers()->CompleteTask(&ctx, done, &resp);
    EXPECT_EQ(cs.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << cs.error_message();
  }
  // An unknown task is NOT_FOUND.
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, kWorkerToken);
    SetDeadline(&ctx, 5s);
    v1::FailTaskRequest fail;
    fail.set_worker_id(worker);
    fail.set_task_id("no-such-task");
    fail.set_lease_token("x");
    v1::FailTaskResponse resp;
    EXPECT_EQ(coordinator_->workers()->FailTask(&ctx, fail, &resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
}

TEST_F(RpcTest, ManyLongPollsShareTheExecutorWithoutStarvingOtherCalls) {
  // 16 long-polls on a 2-thread executor (100 ms slices): each still answers, on time, and
  // unary calls served on gRPC's own threads stay fast meanwhile.
  constexpr int kPolls = 16;
  std::vector<std::string> workers;
  for (int i = 0; i < kPolls; ++i) workers.push_back(RegisterWorker());
  std::vector<std::future<std::pair<grpc::Status, Clock::duration>>> polls;
  for (int i = 0; i < kPolls; ++i) {
    polls.push_back(std::async(std::launch::async, [&, i] {
      v1::AcquireTaskResponse r;
      const auto t0 = Clock::now();
      grpc::Status s = Acquire(workers[i], 1'500, 20s, &r);
      return std::make_pair(s, Clock::now() - t0);
    }));
  }
  std::this_thread::sleep_for(200ms);
  Clock::duration worst{};
  for (int i = 0; i < 10; ++i) {
    grpc::ClientContext ctx;
    Authorize(&ctx, kTokenA);
    SetDeadline(&ctx, 5s);
    v1::ListJobsResponse list;
    const auto t0 = Clock::now();
    ASSERT_TRUE(coordinator_->jobs()->ListJobs(&ctx, v1::ListJobsRequest(), &list).ok());
    worst = std::max(worst, Clock::now() - t0);
  }
  EXPECT_LT(worst, 1s) << "unary calls were starved by long-polls";
  for (auto& p : polls) {
    auto [status, elapsed] = p.get();
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_GE(elapsed, 1'400ms);
    // Fair sharing: one queue pass is kPolls / 2 threads * 100 ms.
    EXPECT_LT(elapsed, 4s);
  }
}

// ---- health and reflection -----------------------------------------------------------------

TEST_F(RpcTest, HealthCheckIsServingWithoutAToken) {
  grpc::GenericStub stub(coordinator_->channel());
  for (const std::string service : {"", "qforge.v1.JobService"}) {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, 5s);
    std::string request;  // HealthCheckRequest{service = 1}
    if (!service.empty()) {
      request.push_back(0x0a);
      request.push_back(static_cast<char>(service.size()));
      request += service;
    }
    const grpc::ByteBuffer req = ToByteBuffer(request);
    grpc::ByteBuffer resp;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req, &resp,
                   [&done](grpc::Status s) { done.set_value(std::move(s)); });
    const grpc::Status s = done.get_future().get();
    ASSERT_TRUE(s.ok()) << "'" << service << "': " << s.error_message();
    const std::vector<WireField> fields = ParseWire(FromByteBuffer(resp));
    ASSERT_EQ(fields.size(), 1u);
    EXPECT_EQ(fields[0].number, 1);
    EXPECT_EQ(fields[0].varint, 1u) << "HealthCheckResponse.status is not SERVING";
  }
}

TEST_F(RpcTest, ReflectionListsTheServices) {
  grpc::GenericStub stub(coordinator_->channel());
  grpc::ClientContext ctx;
  SetDeadline(&ctx, 5s);
  grpc::CompletionQueue cq;
  auto next = [&cq]() {
    void* tag = nullptr;
    bool ok = false;
    return cq.Next(&tag, &ok) && ok;
  };
  auto call = stub.PrepareCall(
      &ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  ASSERT_NE(call, nullptr);
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(next());
  // ServerReflectionRequest{list_services = 7: ""}.
  call->Write(ToByteBuffer(std::string("\x3a\x00", 2)), reinterpret_cast<void*>(2));
  ASSERT_TRUE(next());
  grpc::ByteBuffer resp;
  call->Read(&resp, reinterpret_cast<void*>(3));
  ASSERT_TRUE(next());
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(next());
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(next());
  ASSERT_TRUE(status.ok()) << status.error_message();
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }

  // ServerReflectionResponse{list_services_response = 6: ListServiceResponse{service = 1:
  // ServiceResponse{name = 1}}}.
  std::vector<std::string> names;
  for (const WireField& f : ParseWire(FromByteBuffer(resp))) {
    if (f.number != 6) continue;
    for (const WireField& svc : ParseWire(f.bytes)) {
      if (svc.number != 1) continue;
      for (const WireField& n : ParseWire(svc.bytes)) {
        if (n.number == 1) names.push_back(n.bytes);
      }
    }
  }
  auto has = [&names](const std::string& n) {
    return std::find(names.begin(), names.end(), n) != names.end();
  };
  EXPECT_TRUE(has("qforge.v1.JobService")) << ::testing::PrintToString(names);
  EXPECT_TRUE(has("qforge.v1.WorkerService")) << ::testing::PrintToString(names);
  EXPECT_TRUE(has("grpc.health.v1.Health")) << ::testing::PrintToString(names);
}

// ---- metrics ---------------------------------------------------------------------------------

// The value of an unlabelled or fully labelled sample line `name value` in exposition text.
std::optional<double> Sample(const std::string& text, const std::string& series) {
  size_t pos = 0;
  while ((pos = text.find(series + " ", pos)) != std::string::npos) {
    if (pos == 0 || text[pos - 1] == '\n') {
      return std::strtod(text.c_str() + pos + series.size() + 1, nullptr);
    }
    pos += series.size();
  }
  return std::nullopt;
}

TEST_F(RpcMetricsTest, MetricsEndpointServesQforgeMetrics) {
  const std::string address = coordinator_->metrics()->listening_address();
  ASSERT_FALSE(address.empty());
  HttpResponse r = HttpGet(address, "/metrics");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_NE(r.body.find("qforge_jobs{"), std::string::npos) << r.body.substr(0, 2000);
  EXPECT_EQ(Sample(r.body, std::string("qforge_build_info{version=\"") + kVersion + "\"}"), 1.0)
      << r.body.substr(0, 2000);
  EXPECT_EQ(Sample(r.body, "qforge_tasks_queued"), 0.0);

  auto job = Submit(GoodRequest(model_, dir_ + "/out"));
  ASSERT_TRUE(job.ok()) << job.status();
  // The gauges follow the JobManager within a refresh interval (50 ms here).
  const auto until = Clock::now() + 5s;
  std::optional<double> queued_jobs, queued_tasks, oldest;
  while (Clock::now() < until) {
    r = HttpGet(address, "/metrics");
    queued_jobs = Sample(r.body, "qforge_jobs{state=\"queued\"}");
    queued_tasks = Sample(r.body, "qforge_tasks_queued");
    oldest = Sample(r.body, "qforge_oldest_queued_task_timestamp_seconds");
    if (queued_tasks == 2.0) break;
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(queued_tasks, 2.0) << r.body.substr(0, 3000);
  EXPECT_TRUE((queued_jobs == 1.0) ||
              Sample(r.body, "qforge_jobs{state=\"quantizing\"}") == 1.0)
      << r.body.substr(0, 3000);
  ASSERT_TRUE(oldest.has_value());
  const double now_s = std::chrono::duration<double>(
                           std::chrono::system_clock::now().time_since_epoch()).count();
  EXPECT_GT(*oldest, now_s - 60);
  EXPECT_LE(*oldest, now_s + 1);
  // No job ids in any label.
  EXPECT_EQ(r.body.find(job->id()), std::string::npos);

  // The exposition passes promtool's linter when it is installed.
  if (::access("/usr/bin/promtool", X_OK) == 0) {
    const std::string file = dir_ + "/metrics.txt";
    WriteFile(file, r.body);
    const std::string cmd = "/usr/bin/promtool check metrics < " + file + " > " + dir_ +
                            "/promtool.out 2>&1";
    const int rc = std::system(cmd.c_str());
    std::ifstream in(dir_ + "/promtool.out");
    std::string out((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // prometheus-cpp's own exposer_* metrics are not ours to lint.
    std::string ours;
    for (size_t p = 0, e; p < out.size(); p = e + 1) {
      e = out.find('\n', p);
      if (e == std::string::npos) e = out.size();
      const std::string line = out.substr(p, e - p);
      if (line.find("qforge_") != std::string::npos) ours += line + "\n";
    }
    EXPECT_TRUE(ours.empty()) << "promtool check metrics (rc " << rc << "):\n" << out;
  }
}

TEST_F(RpcMetricsTest, PrometheusServerScrapesTheCoordinator) {
  const char* prometheus = "/usr/bin/prometheus";
  if (::access(prometheus, X_OK) != 0) GTEST_SKIP() << "prometheus is not installed";
  const std::string target = coordinator_->metrics()->listening_address();
  const int port = FreeTcpPort();
  const std::string web = "127.0.0.1:" + std::to_string(port);
  const std::string config = dir_ + "/prometheus.yml";
  WriteFile(config,
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "rule_files:\n  - " QFORGE_SOURCE_DIR "/deploy/prometheus/alerts.yml\n"
            "scrape_configs:\n  - job_name: qforge-coordinator\n    static_configs:\n"
            "      - targets: ['" + target + "']\n");
  qforge::testing::Subprocess server(
      {prometheus, "--config.file=" + config, "--storage.tsdb.path=" + dir_ + "/tsdb",
       "--web.listen-address=" + web, "--log.level=warn"},
      dir_ + "/prometheus");
  ASSERT_TRUE(server.started());

  // Bounded wait (30 s) for a scraped sample of qforge_build_info.
  const auto until = Clock::now() + 30s;
  nlohmann::json sample;
  std::string last;
  while (Clock::now() < until && server.Running()) {
    HttpResponse r = HttpGet(web, "/api/v1/query?query=qforge_build_info");
    last = r.body;
    if (r.status == 200) {
      nlohmann::json j = nlohmann::json::parse(r.body, nullptr, false);
      if (!j.is_discarded() && j["status"] == "success" && !j["data"]["result"].empty()) {
        sample = j["data"]["result"][0];
        break;
      }
    }
    std::this_thread::sleep_for(250ms);
  }
  ASSERT_FALSE(sample.is_null()) << "no qforge_build_info sample within 30 s; last answer: "
                                 << last << "\nprometheus stderr:\n" << server.Stderr();
  EXPECT_EQ(sample["metric"]["version"], kVersion);
  EXPECT_EQ(sample["metric"]["job"], "qforge-coordinator");
  EXPECT_EQ(sample["value"][1], "1");
  // The alert rules loaded into the real server.
  HttpResponse rules = HttpGet(web, "/api/v1/rules");
  nlohmann::json j = nlohmann::json::parse(rules.body, nullptr, false);
  ASSERT_FALSE(j.is_discarded()) << rules.body;
  size_t n = 0;
  for (const auto& g : j["data"]["groups"]) n += g["rules"].size();
  // As many as the file defines.
  std::ifstream alerts(QFORGE_SOURCE_DIR "/deploy/prometheus/alerts.yml");
  size_t defined = 0;
  for (std::string line; std::getline(alerts, line);) {
    if (line.find("- alert: ") != std::string::npos) ++defined;
  }
  EXPECT_GE(defined, 9u);
  EXPECT_EQ(n, defined) << rules.body;
  server.Signal(SIGTERM);
  server.Wait(10s);
}

TEST(CoordinatorMetricsTest, ListenerCallbacksReachTheExposition) {
  CoordinatorMetricsOptions o;
  o.listen_address = "";  // registry only
  o.version = kVersion;
  auto m = CoordinatorMetrics::Create(o);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE((*m)->listening_address().empty());
  (*m)->OnTaskFinished(v1::TASK_KIND_QUANTIZE, v1::METHOD_GPTQ, true, 3.0);
  (*m)->OnTaskFinished(v1::TASK_KIND_QUANTIZE, v1::METHOD_GPTQ, false, 0.2);
  (*m)->OnTaskRetried(v1::TASK_KIND_QUANTIZE);
  (*m)->OnBytes(1000, 250);
  (*m)->OnBytes(24, 6);
  (*m)->OnSolverPhase("Cholesky", 0.02);
  (*m)->OnSolverPhase("cholesky", 0.04);
  for (int i = 0; i < 100; ++i) (*m)->OnSolverPhase("phase-" + std::to_string(i), 1.0);
  JobManagerStats stats;
  stats.jobs_by_state[v1::JOB_STATE_QUANTIZING] = 3;
  stats.jobs_by_state[v1::JOB_STATE_FAILED] = 1;
  stats.tasks_queued = 7;
  stats.tasks_running = 2;
  stats.oldest_queued_task_create_ms = 1'700'000'000'500;
  stats.workers_by_state["busy"] = 2;
  (*m)->Update(stats);

  const std::string text = (*m)->Serialize();
  EXPECT_EQ(Sample(text, "qforge_task_duration_seconds_count{kind=\"quantize\",method=\"gptq\"}"), 2.0) << text;
  EXPECT_NEAR(Sample(text, "qforge_task_duration_seconds_sum{kind=\"quantize\",method=\"gptq\"}").value_or(-1), 3.2, 1e-9);
  EXPECT_EQ(Sample(text, "qforge_task_duration_seconds_bucket{kind=\"quantize\",method=\"gptq\",le=\"0.25\"}"), 1.0);
  EXPECT_EQ(Sample(text, "qforge_tasks_finished_total{kind=\"quantize\",outcome=\"failed\"}"), 1.0);
  EXPECT_EQ(Sample(text, "qforge_task_retries_total{kind=\"quantize\"}"), 1.0);
  EXPECT_EQ(Sample(text, "qforge_bytes_read_total"), 1024.0);
  EXPECT_EQ(Sample(text, "qforge_bytes_written_total"), 256.0);
  EXPECT_EQ(Sample(text, "qforge_solver_phase_seconds_count{phase=\"cholesky\"}"), 2.0);
  EXPECT_EQ(Sample(text, "qforge_jobs{state=\"quantizing\"}"), 3.0);
  EXPECT_EQ(Sample(text, "qforge_jobs{state=\"queued\"}"), 0.0);
  EXPECT_EQ(Sample(text, "qforge_tasks_queued"), 7.0);
  EXPECT_EQ(Sample(text, "qforge_tasks_running"), 2.0);
  EXPECT_NEAR(Sample(text, "qforge_oldest_queued_task_timestamp_seconds").value_or(-1), 1'700'000'000.5, 1e-3);
  EXPECT_EQ(Sample(text, "qforge_workers{state=\"busy\"}"), 2.0);
  EXPECT_EQ(Sample(text, "qforge_workers{state=\"idle\"}"), 0.0);
  // Phase labels are bounded: 101 distinct names became at most kMaxPhases series.
  size_t phases = 0;
  for (size_t p = 0; (p = text.find("qforge_solver_phase_seconds_count{", p)) != std::string::npos; ++p) {
    ++phases;
  }
  EXPECT_LE(phases, static_cast<size_t>(CoordinatorMetrics::kMaxPhases));
  EXPECT_NE(text.find("qforge_solver_phase_seconds_count{phase=\"other\"}"), std::string::npos);
  // Gauges drop back when the state empties.
  // Jobs: submitted and finished by method and outcome, durations.
  (*m)->OnJobSubmitted(v1::METHOD_GPTQ);
  (*m)->OnJobSubmitted(v1::METHOD_GPTQ);
  (*m)->OnJobSubmitted(v1::METHOD_UNSPECIFIED);
  (*m)->OnJobFinished(v1::METHOD_GPTQ, v1::JOB_STATE_SUCCEEDED, 42.0);
  (*m)->OnJobFinished(v1::METHOD_UNSPECIFIED, v1::JOB_STATE_CANCELLED, 3.0);
  stats.oldest_worker_seen_ms = 1'700'000'100'000;
  (*m)->Update(stats);
  const std::string jobs = (*m)->Serialize();
  EXPECT_EQ(Sample(jobs, "qforge_jobs_submitted_total{method=\"gptq\"}"), 2.0) << jobs;
  EXPECT_EQ(Sample(jobs, "qforge_jobs_submitted_total{method=\"none\"}"), 1.0);
  EXPECT_EQ(Sample(jobs, "qforge_jobs_submitted_total{method=\"vptq\"}"), 0.0);
  EXPECT_EQ(Sample(jobs, "qforge_jobs_finished_total{method=\"gptq\",outcome=\"succeeded\"}"), 1.0);
  EXPECT_EQ(Sample(jobs, "qforge_jobs_finished_total{method=\"gptq\",outcome=\"failed\"}"), 0.0);
  EXPECT_EQ(Sample(jobs, "qforge_jobs_finished_total{method=\"none\",outcome=\"cancelled\"}"), 1.0);
  EXPECT_EQ(Sample(jobs, "qforge_job_duration_seconds_sum{method=\"gptq\",outcome=\"succeeded\"}"), 42.0);
  EXPECT_EQ(Sample(jobs, "qforge_job_duration_seconds_bucket{method=\"gptq\",outcome=\"succeeded\",le=\"30\"}"), 0.0);
  EXPECT_EQ(Sample(jobs, "qforge_job_duration_seconds_bucket{method=\"gptq\",outcome=\"succeeded\",le=\"60\"}"), 1.0);
  EXPECT_NEAR(Sample(jobs, "qforge_oldest_worker_heartbeat_timestamp_seconds").value_or(-1), 1'700'000'100.0, 1e-3);
  // The process and object-store families are part of the exposition.
  EXPECT_GT(Sample(jobs, "process_resident_memory_bytes").value_or(0), 0.0);
  EXPECT_GT(Sample(jobs, "process_open_fds").value_or(0), 0.0);
  EXPECT_TRUE(Sample(jobs, "qforge_store_read_bytes_total{scheme=\"s3\"}").has_value());
  EXPECT_TRUE(Sample(jobs, "qforge_store_errors_total{op=\"put\",scheme=\"file\"}").has_value());

  (*m)->Update(JobManagerStats());
  const std::string after = (*m)->Serialize();
  EXPECT_EQ(Sample(after, "qforge_jobs{state=\"quantizing\"}"), 0.0);
  EXPECT_EQ(Sample(after, "qforge_oldest_queued_task_timestamp_seconds"), 0.0);
}

TEST(CoordinatorMetricsTest, BusyAddressIsUnavailable) {
  CoordinatorMetricsOptions o;
  o.listen_address = "127.0.0.1:0";
  auto first = CoordinatorMetrics::Create(o);
  ASSERT_TRUE(first.ok()) << first.status();
  o.listen_address = (*first)->listening_address();
  auto second = CoordinatorMetrics::Create(o);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(second.status().message()).find(o.listen_address), std::string::npos);
}

TEST(GrpcServerMetricsTest, OnlyKnownMethodsGetTheirOwnLabels) {
  using P = std::pair<std::string, std::string>;
  EXPECT_EQ(GrpcServerMetrics::SplitMethod("/qforge.v1.JobService/SubmitJob"),
            P("qforge.v1.JobService", "SubmitJob"));
  EXPECT_EQ(GrpcServerMetrics::SplitMethod("/qforge.v1.WorkerService/Heartbeat"),
            P("qforge.v1.WorkerService", "Heartbeat"));
  EXPECT_EQ(GrpcServerMetrics::SplitMethod("/grpc.health.v1.Health/Check"),
            P("grpc.health.v1.Health", "Check"));
  for (const char* bad : {"", "/", "//", "/qforge.v1.JobService/", "/qforge.v1.JobService/Nope",
                          "/no.Such/Method", "qforge.v1.JobService/SubmitJob",
                          "/grpc.health.v1.Health/Other"}) {
    EXPECT_EQ(GrpcServerMetrics::SplitMethod(bad), P("unknown", "unknown")) << bad;
  }
  EXPECT_EQ(GrpcServerMetrics::CodeName(grpc::StatusCode::NOT_FOUND), "NOT_FOUND");
  EXPECT_EQ(GrpcServerMetrics::CodeName(grpc::StatusCode::OK), "OK");
}

TEST_F(RpcMetricsTest, GrpcCallsAreCountedByMethodAndCode) {
  // A failing and a successful call, plus a method the server lacks.
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, kTokenA);
    SetDeadline(&ctx, 5s);
    v1::GetJobRequest req;
    req.set_id("no-such-job");
    v1::Job resp;
    EXPECT_EQ(coordinator_->jobs()->GetJob(&ctx, req, &resp).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, kTokenA);
    SetDeadline(&ctx, 5s);
    v1::ListJobsRequest req;
    v1::ListJobsResponse resp;
    EXPECT_TRUE(coordinator_->jobs()->ListJobs(&ctx, req, &resp).ok());
  }
  {
    grpc::GenericStub stub(coordinator_->channel());
    grpc::ClientContext ctx;
    SetDeadline(&ctx, 5s);
    const grpc::ByteBuffer req = ToByteBuffer("");
    grpc::ByteBuffer resp;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&ctx, "/qforge.v1.JobService/NoSuchMethod", grpc::StubOptions(), &req, &resp,
                   [&done](grpc::Status s) { done.set_value(std::move(s)); });
    EXPECT_EQ(done.get_future().get().error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
  const std::string text = coordinator_->metrics()->Serialize();
  EXPECT_EQ(Sample(text, "qforge_grpc_server_handled_total{grpc_code=\"NOT_FOUND\",grpc_method=\"GetJob\",grpc_service=\"qforge.v1.JobService\"}"), 1.0) << text;
  EXPECT_EQ(Sample(text, "qforge_grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"ListJobs\",grpc_service=\"qforge.v1.JobService\"}"), 1.0) << text;
  EXPECT_EQ(Sample(text, "qforge_grpc_server_handling_seconds_count{grpc_code=\"OK\",grpc_method=\"ListJobs\",grpc_service=\"qforge.v1.JobService\"}"), 1.0) << text;
  // The client-chosen name never becomes a label.
  EXPECT_EQ(text.find("NoSuchMethod"), std::string::npos);
}

TEST(CoordinatorMetricsTest, EnumLabels) {
  EXPECT_EQ(CoordinatorMetrics::KindLabel(v1::TASK_KIND_QUANTIZE), "quantize");
  EXPECT_EQ(CoordinatorMetrics::MethodLabel(v1::METHOD_VPTQ), "vptq");
  EXPECT_EQ(CoordinatorMetrics::JobStateLabel(v1::JOB_STATE_CANCELLING), "cancelling");
  EXPECT_EQ(CoordinatorMetrics::KindLabel(static_cast<v1::TaskKind>(99)), "99");
}

// ---- LongPollExecutor ------------------------------------------------------------------------

TEST(LongPollExecutorTest, StopRunsQueuedWorkAndLaterWorkRunsInline) {
  std::atomic<int> ran{0};
  LongPollExecutor ex(2);
  for (int i = 0; i < 50; ++i) {
    ex.Submit([&ran] {
      std::this_thread::sleep_for(1ms);
      ran.fetch_add(1);
    });
  }
  // A chain that resubmits itself until draining, like a long-poll.
  std::atomic<int> slices{0};
  std::function<void()> slice = [&] {
    slices.fetch_add(1);
    if (!ex.draining()) {
      std::this_thread::sleep_for(2ms);
      ex.Submit(slice);
    }
  };
  ex.Submit(slice);
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(ex.draining());
  ex.Stop();
  EXPECT_TRUE(ex.draining());
  EXPECT_EQ(ran.load(), 50);
  EXPECT_GT(slices.load(), 1);
  const std::thread::id caller = std::this_thread::get_id();
  std::thread::id ran_on;
  ex.Submit([&ran_on] { ran_on = std::this_thread::get_id(); });
  EXPECT_EQ(ran_on, caller);
}

// ---- LocalWorkerSupervisor -----------------------------------------------------------------

bool Alive(pid_t pid) { return pid > 0 && ::kill(pid, 0) == 0; }

TEST(LocalWorkerSupervisorTest, RestartsDeadWorkersAndStopsThem) {
  LocalWorkerOptions o;
  o.binary = "/bin/sleep";
  o.args = {"30"};
  o.count = 2;
  o.initial_backoff = 50ms;
  o.poll_interval = 10ms;
  auto s = LocalWorkerSupervisor::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  auto wait_for = [](auto pred) {
    const auto until = Clock::now() + 5s;
    while (!pred() && Clock::now() < until) std::this_thread::sleep_for(10ms);
    return pred();
  };
  ASSERT_TRUE(wait_for([&] {
    auto p = (*s)->pids();
    return p.size() == 2 && p[0] > 0 && p[1] > 0;
  }));
  const pid_t first = (*s)->pids()[0];
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  ASSERT_TRUE(wait_for([&] {
    const pid_t now = (*s)->pids()[0];
    return now > 0 && now != first;
  })) << "a killed worker was not restarted";
  EXPECT_EQ((*s)->restarts(), 1);
  const std::vector<pid_t> running = (*s)->pids();
  const auto t0 = Clock::now();
  (*s)->Stop(5s);
  EXPECT_LT(Clock::now() - t0, 2s) << "sleep exits on SIGTERM at once";
  for (pid_t p : running) EXPECT_FALSE(Alive(p));
  for (pid_t p : (*s)->pids()) EXPECT_EQ(p, 0);
}

TEST(LocalWorkerSupervisorTest, KillsWorkersThatIgnoreSigtermAfterTheGrace) {
  LocalWorkerOptions o;
  o.binary = "/bin/sh";
  o.args = {"-c", "trap '' TERM; while true; do sleep 0.05; done"};
  o.count = 1;
  o.poll_interval = 10ms;
  auto s = LocalWorkerSupervisor::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  const auto until = Clock::now() + 5s;
  while ((*s)->pids()[0] == 0 && Clock::now() < until) std::this_thread::sleep_for(10ms);
  const pid_t pid = (*s)->pids()[0];
  ASSERT_GT(pid, 0);
  std::this_thread::sleep_for(100ms);  // let the shell install its trap
  const auto t0 = Clock::now();
  (*s)->Stop(300ms);
  const auto took = Clock::now() - t0;
  EXPECT_GE(took, 250ms);
  EXPECT_LT(took, 3s);
  EXPECT_FALSE(Alive(pid));
}

TEST(LocalWorkerSupervisorTest, StopSendsExactlyOneSigterm) {
  // A second SIGTERM means "give the task back now" to qforge-worker, so a graceful stop must
  // send one (the kernel's PR_SET_PDEATHSIG must not add another when the supervisor's
  // thread exits).
  const std::string dir = MakeTempDir();
  const std::string f = dir + "/terms";
  LocalWorkerOptions o;
  o.binary = "/bin/sh";
  o.args = {"-c", "trap 'echo term >> " + f + "' TERM; while [ ! -s " + f +
                      " ]; do sleep 0.05; done; sleep 0.3; exit 0"};
  o.count = 1;
  o.poll_interval = 10ms;
  auto s = LocalWorkerSupervisor::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  const auto until = Clock::now() + 5s;
  while ((*s)->pids()[0] == 0 && Clock::now() < until) std::this_thread::sleep_for(10ms);
  std::this_thread::sleep_for(100ms);  // let the shell install its trap
  (*s)->Stop(5s);
  std::ifstream in(f);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(all, "term\n");
  fs::remove_all(dir);
}

TEST(LocalWorkerSupervisorTest, ChildEnvironmentAndBinaryLookup) {
  const std::string dir = MakeTempDir();
  LocalWorkerOptions o;
  o.binary = "/bin/sh";
  o.args = {"-c", "echo \"$QFORGE_WORKER_TOKEN $QFORGE_RPC_TEST_INHERITED\" > " + dir + "/env"};
  o.env = {"QFORGE_WORKER_TOKEN=secret"};
  o.count = 1;
  o.initial_backoff = 10s;  // no restart within the test
  o.poll_interval = 10ms;
  ::setenv("QFORGE_RPC_TEST_INHERITED", "inherited", 1);
  auto s = LocalWorkerSupervisor::Start(o);
  ASSERT_TRUE(s.ok()) << s.status();
  const auto until = Clock::now() + 5s;
  std::string got;
  while (Clock::now() < until) {
    std::ifstream in(dir + "/env");
    if (std::getline(in, got) && !got.empty()) break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(got, "secret inherited");
  (*s)->Stop(1s);

  EXPECT_EQ(LocalWorkerSupervisor::Start(LocalWorkerOptions{"/bin/sh", {}, {}, 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LocalWorkerSupervisor::Start(LocalWorkerOptions{dir + "/nope", {}, {}, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto found = LocalWorkerSupervisor::FindWorkerBinary("/bin/sh");
  ASSERT_TRUE(found.ok());
  EXPECT_EQ(*found, "/bin/sh");
  EXPECT_EQ(LocalWorkerSupervisor::FindWorkerBinary(dir + "/nope").status().code(),
            absl::StatusCode::kNotFound);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace qforge

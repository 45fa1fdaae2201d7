// Worker (coordinator_client.h) against an in-process fake WorkerService on loopback:
// registration with the bearer token, completion with checksums, failure classification,
// cancellation and lease loss delivered by heartbeats, SIGTERM-style drains (finish within
// the grace, else release), an interrupted long-poll, re-registration with the same worker id
// after the coordinator restarts, and a refused registration.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "gtest/gtest.h"
#include "qforge/v1/worker_service.grpc.pb.h"
#include "worker/coordinator_client.h"
#include "worker/task_executor.h"

namespace qforge {
namespace {

using namespace std::chrono_literals;

class FakeCoordinator final : public v1::WorkerService::Service {
 public:
  grpc::Status RegisterWorker(grpc::ServerContext* ctx, const v1::RegisterWorkerRequest* req,
                              v1::RegisterWorkerResponse* resp) override {
    std::lock_guard<std::mutex> l(mu);
    auto auth = ctx->client_metadata().find("authorization");
    auth_headers.push_back(auth == ctx->client_metadata().end()
                               ? ""
                               : std::string(auth->second.data(), auth->second.size()));
    if (register_error != grpc::StatusCode::OK) return grpc::Status(register_error, "token rejected");
    registers.push_back(*req);
    resp->set_worker_id(req->worker_id().empty() ? "w-1" : req->worker_id());
    resp->set_heartbeat_interval_ms(heartbeat_interval_ms);
    resp->set_lease_duration_ms(2000);
    cv.notify_all();
    return grpc::Status::OK;
  }

  grpc::Status AcquireTask(grpc::ServerContext* ctx, const v1::AcquireTaskRequest* req,
                           v1::AcquireTaskResponse* resp) override {
    std::unique_lock<std::mutex> l(mu);
    ++acquires;
    cv.notify_all();
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(std::min<int64_t>(req->wait_ms(), max_wait_ms));
    while (queue.empty() && !ctx->IsCancelled() && std::chrono::steady_clock::now() < deadline) {
      cv.wait_for(l, 10ms);
    }
    if (!queue.empty()) {
      *resp->mutable_task() = queue.front();
      queue.pop_front();
    }
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req,
                         v1::HeartbeatResponse* resp) override {
    std::lock_guard<std::mutex> l(mu);
    heartbeats.push_back(*req);
    resp->set_cancel(cancel_on_heartbeat);
    resp->set_lease_lost(lease_lost_on_heartbeat);
    cv.notify_all();
    return grpc::Status::OK;
  }

  grpc::Status CompleteTask(grpc::ServerContext*, const v1::CompleteTaskRequest* req,
                            v1::CompleteTaskResponse*) override {
    std::lock_guard<std::mutex> l(mu);
    completes.push_back(*req);
    cv.notify_all();
    return grpc::Status(complete_error, complete_error == grpc::StatusCode::OK ? "" : "stale lease");
  }

  grpc::Status FailTask(grpc::ServerContext*, const v1::FailTaskRequest* req,
                        v1::FailTaskResponse*) override {
    std::lock_guard<std::mutex> l(mu);
    fails.push_back(*req);
    cv.notify_all();
    return grpc::Status(fail_error, fail_error == grpc::StatusCode::OK ? "" : "stale lease");
  }

  template <typename Pred>
  bool WaitFor(Pred pred, std::chrono::milliseconds timeout = 5s) {
    std::unique_lock<std::mutex> l(mu);
    return cv.wait_for(l, timeout, pred);
  }

  std::mutex mu;
  std::condition_variable cv;
  std::deque<v1::Task> queue;
  std::vector<std::string> auth_headers;
  std::vector<v1::RegisterWorkerRequest> registers;
  std::vector<v1::HeartbeatRequest> heartbeats;
  std::vector<v1::CompleteTaskRequest> completes;
  std::vector<v1::FailTaskRequest> fails;
  int acquires = 0;
  bool cancel_on_heartbeat = false;
  bool lease_lost_on_heartbeat = false;
  grpc::StatusCode register_error = grpc::StatusCode::OK;
  grpc::StatusCode complete_error = grpc::StatusCode::OK;
  grpc::StatusCode fail_error = grpc::StatusCode::OK;
  int64_t heartbeat_interval_ms = 40;
  int64_t max_wait_ms = 200;
};

struct Server {
  explicit Server(const std::string& address = "127.0.0.1:0") {
    grpc::ServerBuilder b;
    b.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
    b.RegisterService(&service);
    server = b.BuildAndStart();
  }
  ~Server() { Stop(); }
  void Stop() {
    if (server) server->Shutdown(std::chrono::system_clock::now() + 200ms);
    server.reset();
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port); }

  FakeCoordinator service;
  int port = 0;
  std::unique_ptr<grpc::Server> server;
};

v1::Task MakeTask(const std::string& id) {
  v1::Task t;
  t.set_id(id);
  t.set_job_id("job-1");
  t.set_kind(v1::TASK_KIND_QUANTIZE);
  t.set_lease_token("lease-" + id);
  t.mutable_layer()->set_module("model.layers.0.mlp.down_proj");
  t.set_staging_key(".qforge-staging/job-1/" + id + "/0/layer.safetensors");
  return t;
}

TaskResult FakeResult(const v1::Task& task) {
  TaskResult r;
  r.output_key = task.staging_key();
  r.output_sha256 = std::string(64, 'a');
  r.output_bytes = 1234;
  r.metrics.set_backend("cpu");
  r.metrics.set_relative_error(0.002);
  return r;
}

struct Recorder : WorkerListener {
  void OnRegistered(const std::string& id, bool again) override {
    std::lock_guard<std::mutex> l(mu);
    registered.push_back({id, again});
  }
  void OnTaskStarted(const v1::Task&) override { started.fetch_add(1); }
  void OnCoordinatorContact() override { contacts.fetch_add(1); }
  void OnTaskFinished(const v1::Task&, TaskOutcome o, double, const TaskResult*) override {
    std::lock_guard<std::mutex> l(mu);
    outcomes.push_back(o);
  }
  std::mutex mu;
  std::vector<std::pair<std::string, bool>> registered;
  std::vector<TaskOutcome> outcomes;
  std::atomic<int> started{0};
  std::atomic<int> contacts{0};  // answered Register/AcquireTask/Heartbeat calls
};

class WorkerLoopTest : public ::testing::Test {
 protected:
  void Start(TaskRunner runner, WorkerOptions options = {}) {
    options.coordinator = server_->address();
    options.hostname = "test-host";
    options.version = "test";
    // Short long-polls unless the test asks for a specific one.
    if (options.acquire_wait_ms == WorkerOptions{}.acquire_wait_ms) options.acquire_wait_ms = 100;
    options.reconnect_initial_ms = 20;
    options.reconnect_max_ms = 100;
    options.log = false;
    client_ = std::make_unique<CoordinatorClient>(
        v1::WorkerService::NewStub(NewCoordinatorChannel(server_->address())), "secret", 2000);
    worker_ = std::make_unique<Worker>(options, client_.get(), std::move(runner), &recorder_);
    thread_ = std::thread([this] {
      status_ = worker_->Run();
      done_.store(true);
    });
  }

  // Waits for Run to return.
  bool Join(std::chrono::milliseconds timeout = 10s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!done_.load() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
    if (!done_.load()) return false;
    thread_.join();
    return true;
  }

  void TearDown() override {
    if (thread_.joinable()) {
      worker_->Shutdown(true);
      thread_.join();
    }
  }

  std::unique_ptr<Server> server_ = std::make_unique<Server>();
  FakeCoordinator& fake() { return server_->service; }
  std::unique_ptr<CoordinatorClient> client_;
  std::unique_ptr<Worker> worker_;
  Recorder recorder_;
  std::thread thread_;
  std::atomic<bool> done_{false};
  absl::Status status_;
};

TEST_F(WorkerLoopTest, CompletesATaskWithItsChecksum) {
  fake().queue.push_back(MakeTask("t-1"));
  WorkerOptions o;
  o.max_tasks = 1;
  o.backends = {"cpu"};
  o.memory_budget_bytes = 1 << 30;
  Start([](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> { return FakeResult(t); }, o);
  ASSERT_TRUE(Join());
  EXPECT_TRUE(status_.ok()) << status_;
  std::lock_guard<std::mutex> l(fake().mu);
  ASSERT_EQ(fake().registers.size(), 1u);
  EXPECT_EQ(fake().registers[0].hostname(), "test-host");
  EXPECT_EQ(fake().registers[0].backends_size(), 1);
  EXPECT_EQ(fake().registers[0].memory_budget_bytes(), 1u << 30);
  EXPECT_EQ(fake().auth_headers.at(0), "Bearer secret");
  ASSERT_EQ(fake().completes.size(), 1u);
  const v1::CompleteTaskRequest& c = fake().completes[0];
  EXPECT_EQ(c.worker_id(), "w-1");
  EXPECT_EQ(c.task_id(), "t-1");
  EXPECT_EQ(c.lease_token(), "lease-t-1");
  EXPECT_EQ(c.output_key(), ".qforge-staging/job-1/t-1/0/layer.safetensors");
  EXPECT_EQ(c.output_sha256(), std::string(64, 'a'));
  EXPECT_EQ(c.output_bytes(), 1234u);
  EXPECT_EQ(c.metrics().backend(), "cpu");
  EXPECT_TRUE(fake().fails.empty());
  EXPECT_EQ(recorder_.outcomes, std::vector<TaskOutcome>{TaskOutcome::kSucceeded});
  EXPECT_EQ(worker_->tasks_run(), 1);
  // The registration and the AcquireTask that leased the task were answered.
  EXPECT_GE(recorder_.contacts.load(), 2);
}

TEST_F(WorkerLoopTest, FailuresAreReportedWithTheirRetryability) {
  fake().queue.push_back(MakeTask("bad-input"));
  fake().queue.push_back(MakeTask("flaky-io"));
  WorkerOptions o;
  o.max_tasks = 2;
  Start(
      [](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> {
        if (t.id() == "bad-input") {
          return WithReason(absl::NotFoundError("no Hessian for model.layers.0.mlp.down_proj"),
                            "HESSIAN_MISSING", "model.layers.0.mlp.down_proj");
        }
        return absl::UnavailableError("store timed out");
      },
      o);
  ASSERT_TRUE(Join());
  std::lock_guard<std::mutex> l(fake().mu);
  ASSERT_EQ(fake().fails.size(), 2u);
  EXPECT_EQ(fake().fails[0].task_id(), "bad-input");
  EXPECT_FALSE(fake().fails[0].retryable());
  EXPECT_EQ(fake().fails[0].error().code(), static_cast<int>(absl::StatusCode::kNotFound));
  EXPECT_EQ(fake().fails[0].error().reason(), "HESSIAN_MISSING");
  EXPECT_EQ(fake().fails[0].error().subject(), "model.layers.0.mlp.down_proj");
  EXPECT_EQ(fake().fails[0].lease_token(), "lease-bad-input");
  EXPECT_EQ(fake().fails[1].task_id(), "flaky-io");
  EXPECT_TRUE(fake().fails[1].retryable());
  EXPECT_EQ(fake().fails[1].error().reason(), "UNAVAILABLE");
  EXPECT_TRUE(fake().completes.empty());
}

// A runner that reports a phase and waits (up to 5 s) for cancellation, like a solver whose
// I/O is refused once cancelled.
struct CancellableRunner {
  std::shared_ptr<std::atomic<bool>> saw_cancel = std::make_shared<std::atomic<bool>>(false);
  absl::StatusOr<TaskResult> operator()(const v1::Task& t, TaskControl* c) const {
    c->SetPhase("solve", 0.5);
    const auto deadline = std::chrono::steady_clock::now() + 5s;
    while (!c->cancelled() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(5ms);
    }
    if (c->cancelled()) {
      saw_cancel->store(true);
      return absl::CancelledError("cancelled");
    }
    return FakeResult(t);
  }
};

TEST_F(WorkerLoopTest, HeartbeatCancellationStopsTheTaskAndReportsIt) {
  fake().queue.push_back(MakeTask("t-1"));
  fake().cancel_on_heartbeat = true;
  CancellableRunner runner;
  WorkerOptions o;
  o.max_tasks = 1;
  Start(runner, o);
  ASSERT_TRUE(Join());
  EXPECT_TRUE(runner.saw_cancel->load());
  std::lock_guard<std::mutex> l(fake().mu);
  ASSERT_GE(fake().heartbeats.size(), 1u);
  EXPECT_EQ(fake().heartbeats[0].task_id(), "t-1");
  EXPECT_EQ(fake().heartbeats[0].lease_token(), "lease-t-1");
  EXPECT_EQ(fake().heartbeats[0].phase(), "solve");
  EXPECT_DOUBLE_EQ(fake().heartbeats[0].progress(), 0.5);
  ASSERT_EQ(fake().fails.size(), 1u);
  EXPECT_FALSE(fake().fails[0].retryable());
  EXPECT_EQ(fake().fails[0].error().code(), static_cast<int>(absl::StatusCode::kCancelled));
  EXPECT_TRUE(fake().completes.empty());
  EXPECT_EQ(recorder_.outcomes, std::vector<TaskOutcome>{TaskOutcome::kCancelled});
  EXPECT_FALSE(worker_->has_abandoned_work());
  // Register, AcquireTask and the answered heartbeat(s).
  EXPECT_GE(recorder_.contacts.load(), 2 + static_cast<int>(fake().heartbeats.size()));
}

TEST_F(WorkerLoopTest, LostLeaseDropsTheTaskWithoutAReport) {
  fake().queue.push_back(MakeTask("t-1"));
  fake().lease_lost_on_heartbeat = true;
  CancellableRunner runner;
  WorkerOptions o;
  o.max_tasks = 1;
  Start(runner, o);
  ASSERT_TRUE(Join());
  EXPECT_TRUE(runner.saw_cancel->load());
  std::lock_guard<std::mutex> l(fake().mu);
  EXPECT_TRUE(fake().fails.empty());
  EXPECT_TRUE(fake().completes.empty());
  EXPECT_EQ(recorder_.outcomes, std::vector<TaskOutcome>{TaskOutcome::kLeaseLost});
}

TEST_F(WorkerLoopTest, RefusedCompletionOfAStaleLeaseCountsAsLeaseLost) {
  fake().queue.push_back(MakeTask("t-1"));
  fake().complete_error = grpc::StatusCode::FAILED_PRECONDITION;
  fake().fail_error = grpc::StatusCode::FAILED_PRECONDITION;  // the lease is stale everywhere
  WorkerOptions o;
  o.max_tasks = 1;
  Start([](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> { return FakeResult(t); }, o);
  ASSERT_TRUE(Join());
  std::lock_guard<std::mutex> l(fake().mu);
  EXPECT_EQ(fake().completes.size(), 1u);  // not retried: the fence is final
  EXPECT_EQ(fake().fails.size(), 1u);
  EXPECT_EQ(recorder_.outcomes, std::vector<TaskOutcome>{TaskOutcome::kLeaseLost});
}

TEST_F(WorkerLoopTest, ARefusedCompletionIsReportedWithFailTaskAtOnce) {
  // E.g. the coordinator cannot find the staged output, or it does not match its sha256:
  // the task must go back to the queue now, not when its lease expires.
  for (grpc::StatusCode refusal : {grpc::StatusCode::FAILED_PRECONDITION,
                                   grpc::StatusCode::DATA_LOSS,
                                   grpc::StatusCode::INVALID_ARGUMENT}) {
    SCOPED_TRACE(static_cast<int>(refusal));
    server_ = std::make_unique<Server>();
    done_.store(false);
    if (thread_.joinable()) thread_.join();
    recorder_.outcomes.clear();
    fake().queue.push_back(MakeTask("t-1"));
    fake().complete_error = refusal;
    WorkerOptions o;
    o.max_tasks = 1;
    Start([](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> { return FakeResult(t); }, o);
    ASSERT_TRUE(Join());
    std::lock_guard<std::mutex> l(fake().mu);
    ASSERT_EQ(fake().completes.size(), 1u);
    ASSERT_EQ(fake().fails.size(), 1u);
    const v1::FailTaskRequest& f = fake().fails[0];
    EXPECT_EQ(f.task_id(), "t-1");
    EXPECT_EQ(f.lease_token(), "lease-t-1");
    EXPECT_TRUE(f.retryable());
    EXPECT_EQ(f.error().reason(), "COMPLETION_REFUSED");
    EXPECT_EQ(f.error().code(), static_cast<int>(refusal));
    EXPECT_NE(f.error().message().find("refused the completion"), std::string::npos)
        << f.error().message();
    EXPECT_EQ(recorder_.outcomes, std::vector<TaskOutcome>{TaskOutcome::kFailed});
  }
}

TEST_F(WorkerLoopTest, ShutdownLetsTheRunningTaskFinishWithinTheDrain) {
  fake().queue.push_back(MakeTask("t-1"));
  fake().queue.push_back(MakeTask("t-2"));  // must not be taken after the shutdown
  WorkerOptions o;
  o.drain_ms = 5000;
  Start(
      [](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> {
        std::this_thread::sleep_for(300ms);
        return FakeResult(t);
      },
      o);
  const auto t0 = std::chrono::steady_clock::now();
  while (recorder_.started.load() == 0 && std::chrono::steady_clock::now() - t0 < 5s) {
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_EQ(recorder_.started.load(), 1);
  worker_->Shutdown();
  ASSERT_TRUE(Join());
  EXPECT_TRUE(status_.ok()) << status_;
  std::lock_guard<std::mutex> l(fake().mu);
  ASSERT_EQ(fake().completes.size(), 1u);
  EXPECT_EQ(fake().completes[0].task_id(), "t-1");
  EXPECT_TRUE(fake().fails.empty());
  EXPECT_EQ(fake().queue.size(), 1u);
  EXPECT_FALSE(worker_->has_abandoned_work());
}

TEST_F(WorkerLoopTest, ShutdownReleasesATaskThatOverrunsTheDrain) {
  fake().queue.push_back(MakeTask("t-1"));
  WorkerOptions o;
  o.drain_ms = 100;
  Start(
      [](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> {
        std::this_thread::sleep_for(1500ms);  // an uninterruptible solve
        return FakeResult(t);
      },
      o);
  const auto t0 = std::chrono::steady_clock::now();
  while (recorder_.started.load() == 0 && std::chrono::steady_clock::now() - t0 < 5s) {
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_EQ(recorder_.started.load(), 1);
  const auto t1 = std::chrono::steady_clock::now();
  worker_->Shutdown();
  ASSERT_TRUE(Join());
  EXPECT_LT(std::chrono::steady_clock::now() - t1, 1000ms) << "the drain was not enforced";
  EXPECT_TRUE(worker_->has_abandoned_work());
  std::lock_guard<std::mutex> l(fake().mu);
  ASSERT_EQ(fake().fails.size(), 1u);
  EXPECT_TRUE(fake().fails[0].retryable());
  EXPECT_EQ(fake().fails[0].error().reason(), "WORKER_SHUTDOWN");
  EXPECT_TRUE(fake().completes.empty());
  EXPECT_EQ(recorder_.outcomes, std::vector<TaskOutcome>{TaskOutcome::kReleased});
}

TEST_F(WorkerLoopTest, ShutdownInterruptsTheLongPoll) {
  fake().max_wait_ms = 30'000;
  WorkerOptions o;
  o.acquire_wait_ms = 30'000;
  Start([](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> { return FakeResult(t); }, o);
  ASSERT_TRUE(fake().WaitFor([&] { return fake().acquires > 0; }));
  std::this_thread::sleep_for(50ms);
  const auto t0 = std::chrono::steady_clock::now();
  worker_->Shutdown();
  ASSERT_TRUE(Join(5s));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2000ms);
  EXPECT_TRUE(status_.ok()) << status_;
}

TEST_F(WorkerLoopTest, ReregistersWithItsIdAfterTheCoordinatorRestarts) {
  WorkerOptions o;
  o.max_tasks = 1;
  Start([](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> { return FakeResult(t); }, o);
  ASSERT_TRUE(fake().WaitFor([&] { return fake().registers.size() == 1 && fake().acquires > 0; }));
  const std::string address = server_->address();
  server_->Stop();
  std::this_thread::sleep_for(200ms);  // the worker sees UNAVAILABLE and backs off
  auto restarted = std::make_unique<Server>(address);
  ASSERT_NE(restarted->server, nullptr) << "could not listen on " << address << " again";
  restarted->service.queue.push_back(MakeTask("t-9"));
  ASSERT_TRUE(Join(15s));
  EXPECT_TRUE(status_.ok()) << status_;
  std::lock_guard<std::mutex> l(restarted->service.mu);
  ASSERT_GE(restarted->service.registers.size(), 1u);
  EXPECT_EQ(restarted->service.registers[0].worker_id(), "w-1");
  ASSERT_EQ(restarted->service.completes.size(), 1u);
  EXPECT_EQ(restarted->service.completes[0].worker_id(), "w-1");
  std::lock_guard<std::mutex> l2(recorder_.mu);
  ASSERT_GE(recorder_.registered.size(), 2u);
  EXPECT_FALSE(recorder_.registered[0].second);
  EXPECT_TRUE(recorder_.registered[1].second);
  server_ = std::move(restarted);
}

TEST_F(WorkerLoopTest, RefusedRegistrationIsFatal) {
  fake().register_error = grpc::StatusCode::UNAUTHENTICATED;
  Start([](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> { return FakeResult(t); });
  ASSERT_TRUE(Join());
  EXPECT_EQ(status_.code(), absl::StatusCode::kUnauthenticated) << status_;
  EXPECT_NE(status_.message().find("token rejected"), std::string::npos) << status_;
}

TEST_F(WorkerLoopTest, WaitsForACoordinatorThatIsNotUpYet) {
  const std::string address = server_->address();
  server_->Stop();
  WorkerOptions o;
  o.max_tasks = 1;
  Start([](const v1::Task& t, TaskControl*) -> absl::StatusOr<TaskResult> { return FakeResult(t); }, o);
  std::this_thread::sleep_for(300ms);
  EXPECT_FALSE(done_.load());
  auto late = std::make_unique<Server>(address);
  ASSERT_NE(late->server, nullptr);
  late->service.queue.push_back(MakeTask("t-1"));
  ASSERT_TRUE(Join(15s));
  EXPECT_TRUE(status_.ok()) << status_;
  std::lock_guard<std::mutex> l(late->service.mu);
  EXPECT_EQ(late->service.completes.size(), 1u);
  server_ = std::move(late);
}

}  // namespace
}  // namespace qforge

// The metrics ports of the real binaries, over real HTTP on loopback: qforge-coordinator and
// qforge-worker started with `--metrics-listen 127.0.0.1:0` serve /metrics, /healthz and
// /readyz, answer 404 for unknown paths (a probe or a browser tab on `/` once segfaulted the
// coordinator), 405 for other methods and 400 for garbage, and stay alive afterwards (the
// worker once exited 2 at start: "null context when constructing CivetServer").
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/integration/subprocess.h"

namespace qforge {
namespace {

using namespace std::chrono_literals;
using ::qforge::testing::Subprocess;

const std::string kBin = QFORGE_BIN_DIR;

struct Reply {
  int status = -1;
  std::string body;
};

// Sends `request` to host:port as it is; reads the reply until the server closes (10 s
// timeouts). status -1 when nothing parseable came back.
Reply Exchange(const std::string& host_port, const std::string& request) {
  Reply r;
  const size_t colon = host_port.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(host_port.substr(colon + 1))));
  if (inet_pton(AF_INET, host_port.substr(0, colon).c_str(), &addr.sin_addr) != 1) return r;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return r;
  }
  (void)!send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string all;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) all.append(buf, static_cast<size_t>(n));
  close(fd);
  if (all.rfind("HTTP/1.1 ", 0) == 0 && all.size() >= 12) r.status = std::stoi(all.substr(9, 3));
  const size_t end = all.find("\r\n\r\n");
  if (end != std::string::npos) r.body = all.substr(end + 4);
  return r;
}

Reply Get(const std::string& host_port, const std::string& path) {
  return Exchange(host_port, "GET " + path + " HTTP/1.1\r\nHost: " + host_port + "\r\n\r\n");
}

class MetricsEndpointsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qforge-metrics-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    coordinator_ = std::make_unique<Subprocess>(
        std::vector<std::string>{kBin + "/server/qforge-coordinator", "--listen", "127.0.0.1:0",
                                 "--data-dir", dir_ + "/data", "--metrics-listen", "127.0.0.1:0"},
        dir_ + "/coordinator");
    auto m = coordinator_->WaitForStderr(
        std::regex(R"(qforge-coordinator listening on (\S+) metrics on (\S+))"), 30s);
    ASSERT_TRUE(m.has_value()) << coordinator_->Stderr();
    endpoint_ = (*m)[1];
    coordinator_metrics_ = (*m)[2];
  }

  void TearDown() override {
    if (worker_ != nullptr) worker_->Signal(SIGKILL);
    if (coordinator_ != nullptr) coordinator_->Signal(SIGKILL);
    worker_.reset();
    coordinator_.reset();
    if (!HasFailure()) std::filesystem::remove_all(dir_);
  }

  // Every request a probe, a scraper, a browser or a stray client may send, with the status
  // it must get; then the process must still run.
  void ExpectServesEveryEndpoint(const std::string& address, Subprocess* process,
                                 const std::string& metric) {
    Reply r = Get(address, "/metrics");
    EXPECT_EQ(r.status, 200);
    EXPECT_NE(r.body.find(metric), std::string::npos) << r.body.substr(0, 500);
    r = Get(address, "/healthz");
    EXPECT_EQ(r.status, 200);
    EXPECT_EQ(r.body, "ok\n");
    r = Get(address, "/readyz");
    EXPECT_EQ(r.status, 200) << r.body;
    for (const char* path : {"/", "/favicon.ico", "/index.html", "/metrics/", "/../etc/passwd"}) {
      EXPECT_EQ(Get(address, path).status, 404) << path;
    }
    EXPECT_EQ(Exchange(address, "POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").status,
              405);
    EXPECT_EQ(Exchange(address, "\x16\x03\x01 garbage\r\n\r\n").status, 400);
    EXPECT_EQ(Exchange(address, "GET /metrics HTTP/1.1\r\nX: " + std::string(100000, 'x') +
                                    "\r\n\r\n")
                  .status,
              431);
    // Still alive and serving.
    EXPECT_TRUE(process->Running()) << process->Stderr();
    EXPECT_EQ(Get(address, "/metrics").status, 200);
  }

  std::string dir_, endpoint_, coordinator_metrics_;
  std::unique_ptr<Subprocess> coordinator_, worker_;
};

TEST_F(MetricsEndpointsTest, CoordinatorServesMetricsHealthzReadyzAnd404) {
  ExpectServesEveryEndpoint(coordinator_metrics_, coordinator_.get(), "qforge_build_info");
  // A clean shutdown still works after all of that.
  coordinator_->Signal(SIGTERM);
  EXPECT_EQ(coordinator_->Wait(30s), std::optional<int>(0)) << coordinator_->Stderr();
}

TEST_F(MetricsEndpointsTest, WorkerWithMetricsListenStartsRegistersAndServesEveryEndpoint) {
  worker_ = std::make_unique<Subprocess>(
      std::vector<std::string>{kBin + "/worker/qforge-worker", "--coordinator", endpoint_,
                               "--threads", "1", "--device", "cpu", "--metrics-listen",
                               "127.0.0.1:0"},
      dir_ + "/worker");
  auto m = worker_->WaitForStderr(
      std::regex(R"(qforge-worker \S+ registered with \S+ metrics on (\S+))"), 30s);
  ASSERT_TRUE(m.has_value()) << worker_->Stderr();
  const std::string address = (*m)[1];
  ASSERT_NE(address, "off");
  ExpectServesEveryEndpoint(address, worker_.get(), "qforge_worker_info");
  worker_->Signal(SIGTERM);
  EXPECT_EQ(worker_->Wait(30s), std::optional<int>(0)) << worker_->Stderr();
}

TEST_F(MetricsEndpointsTest, WorkerIsAliveButNotReadyUntilItRegisters) {
  // A coordinator address where nothing listens: the worker keeps retrying registration.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int dead_port = ntohs(addr.sin_port);
  close(fd);  // bound, never listened: connections are refused
  // A fixed free port for the worker's metrics (its ready line only comes on registration).
  const int mfd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in maddr{};
  maddr.sin_family = AF_INET;
  inet_pton(AF_INET, "127.0.0.1", &maddr.sin_addr);
  ASSERT_EQ(bind(mfd, reinterpret_cast<sockaddr*>(&maddr), sizeof maddr), 0);
  len = sizeof maddr;
  getsockname(mfd, reinterpret_cast<sockaddr*>(&maddr), &len);
  const std::string metrics = "127.0.0.1:" + std::to_string(ntohs(maddr.sin_port));
  close(mfd);

  worker_ = std::make_unique<Subprocess>(
      std::vector<std::string>{kBin + "/worker/qforge-worker", "--coordinator",
                               "127.0.0.1:" + std::to_string(dead_port), "--threads", "1",
                               "--device", "cpu", "--metrics-listen", metrics},
      dir_ + "/worker");
  Reply health;
  for (int i = 0; i < 300 && health.status != 200; ++i) {
    std::this_thread::sleep_for(100ms);
    health = Get(metrics, "/healthz");
  }
  ASSERT_EQ(health.status, 200) << worker_->Stderr();
  EXPECT_EQ(Get(metrics, "/readyz").status, 503);
  EXPECT_EQ(Get(metrics, "/metrics").status, 200);
  EXPECT_TRUE(worker_->Running());
}

TEST_F(MetricsEndpointsTest, MalformedMetricsListenIsAUsageErrorNotACrash) {
  worker_ = std::make_unique<Subprocess>(
      std::vector<std::string>{kBin + "/worker/qforge-worker", "--coordinator", endpoint_,
                               "--device", "cpu", "--metrics-listen", "no-port-here"},
      dir_ + "/worker");
  EXPECT_EQ(worker_->Wait(30s), std::optional<int>(2));
  EXPECT_NE(worker_->Stderr().find("no-port-here"), std::string::npos) << worker_->Stderr();
}

}  // namespace
}  // namespace qforge

// MetricsHttpServer over real loopback sockets: /metrics serves the registry in the text
// format, /healthz and /readyz answer as probes expect (readiness follows its callback), and
// unknown paths, other methods, malformed, oversized, silent and HTTP/2 requests get their
// error statuses without disturbing the server; more clients than handler slots all get served.
#include "common/metrics_http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"

namespace qforge {
namespace {

using namespace std::chrono_literals;

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  timeval tv{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return fd;
}

std::string ReadToEof(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  return out;
}

// Sends `request` as it is (then half-closes when `half_close`) and returns everything the
// server answers until it closes.
std::string Exchange(int port, const std::string& request, bool half_close = false) {
  const int fd = Connect(port);
  if (fd < 0) return "<connect failed>";
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the server may close early on an oversized request
    sent += static_cast<size_t>(n);
  }
  if (half_close) shutdown(fd, SHUT_WR);
  std::string out = ReadToEof(fd);
  close(fd);
  return out;
}

int StatusOf(const std::string& response) {
  if (response.rfind("HTTP/1.1 ", 0) != 0 || response.size() < 12) return -1;
  return std::stoi(response.substr(9, 3));
}

std::string BodyOf(const std::string& response) {
  const size_t end = response.find("\r\n\r\n");
  return end == std::string::npos ? "" : response.substr(end + 4);
}

std::string Get(int port, const std::string& path) {
  return Exchange(port, "GET " + path + " HTTP/1.1\r\nHost: test\r\n\r\n");
}

class MetricsHttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    registry_ = std::make_shared<prometheus::Registry>();
    prometheus::BuildCounter()
        .Name("qforge_test_requests_total")
        .Help("A counter for the test")
        .Register(*registry_)
        .Add({{"kind", "a"}})
        .Increment(3);
    MetricsHttpServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.collectable = registry_;
    options.ready = [this] { return ready_.load(); };
    options.max_request_bytes = 1024;
    options.request_timeout = 500ms;
    auto server = MetricsHttpServer::Start(std::move(options));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    port_ = server_->port();
    ASSERT_GT(port_, 0);
  }

  std::shared_ptr<prometheus::Registry> registry_;
  std::atomic<bool> ready_{false};
  std::unique_ptr<MetricsHttpServer> server_;
  int port_ = 0;
};

TEST_F(MetricsHttpServerTest, ReportsTheBoundAddress) {
  EXPECT_EQ(server_->listening_address(), "127.0.0.1:" + std::to_string(port_));
}

TEST_F(MetricsHttpServerTest, MetricsServesTheRegistryInTextFormat) {
  const std::string r = Get(port_, "/metrics");
  EXPECT_EQ(StatusOf(r), 200) << r;
  EXPECT_NE(r.find("Content-Type: text/plain; version=0.0.4"), std::string::npos) << r;
  EXPECT_NE(r.find("Connection: close"), std::string::npos) << r;
  const std::string body = BodyOf(r);
  EXPECT_NE(body.find("# TYPE qforge_test_requests_total counter"), std::string::npos) << body;
  EXPECT_NE(body.find("qforge_test_requests_total{kind=\"a\"} 3"), std::string::npos) << body;
  EXPECT_NE(r.find("Content-Length: " + std::to_string(body.size()) + "\r\n"), std::string::npos)
      << r;
  // A query string is ignored; HTTP/1.0 is served too.
  EXPECT_EQ(StatusOf(Exchange(port_, "GET /metrics?x=1 HTTP/1.0\r\n\r\n")), 200);
}

TEST_F(MetricsHttpServerTest, HealthzAlwaysAndReadyzFollowingTheCallback) {
  std::string r = Get(port_, "/healthz");
  EXPECT_EQ(StatusOf(r), 200) << r;
  EXPECT_EQ(BodyOf(r), "ok\n");
  r = Get(port_, "/readyz");
  EXPECT_EQ(StatusOf(r), 503) << r;
  EXPECT_EQ(BodyOf(r), "not ready\n");
  ready_ = true;
  r = Get(port_, "/readyz");
  EXPECT_EQ(StatusOf(r), 200) << r;
  EXPECT_EQ(BodyOf(r), "ready\n");
}

TEST_F(MetricsHttpServerTest, UnknownPathsAre404) {
  for (const char* path : {"/", "/favicon.ico", "/metrics/x", "/healthz/", "/%00"}) {
    const std::string r = Get(port_, path);
    EXPECT_EQ(StatusOf(r), 404) << path << ": " << r;
  }
}

TEST_F(MetricsHttpServerTest, OtherMethodsAre405WithAllow) {
  for (const char* method : {"POST", "PUT", "DELETE", "HEAD", "OPTIONS"}) {
    const std::string r =
        Exchange(port_, std::string(method) + " /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    EXPECT_EQ(StatusOf(r), 405) << method << ": " << r;
    EXPECT_NE(r.find("Allow: GET\r\n"), std::string::npos) << r;
  }
}

TEST_F(MetricsHttpServerTest, MalformedRequestsAre400) {
  for (const std::string& request :
       {std::string("garbage\r\n\r\n"), std::string("GET\r\n\r\n"),
        std::string("GET /metrics\r\n\r\n"), std::string("GET  /metrics HTTP/1.1\r\n\r\n"),
        std::string("GET /metrics HTTP/1.1 extra\r\n\r\n"), std::string("GET metrics HTTP/1.1\r\n\r\n"),
        std::string("GET /metrics HTTX/1.1\r\n\r\n"), std::string("G\x01T /metrics HTTP/1.1\r\n\r\n"),
        std::string("GET /met\x7frics HTTP/1.1\r\n\r\n"), std::string("\x16\x03\x01\x02\n\n")}) {
    const std::string r = Exchange(port_, request);
    EXPECT_EQ(StatusOf(r), 400) << "request: " << request << "\nresponse: " << r;
  }
  // The client stops sending after a partial head.
  EXPECT_EQ(StatusOf(Exchange(port_, "GET /metr", /*half_close=*/true)), 400);
}

TEST_F(MetricsHttpServerTest, UnsupportedHttpVersionIs505) {
  const std::string r = Exchange(port_, "GET /metrics HTTP/2.0\r\n\r\n");
  EXPECT_EQ(StatusOf(r), 505) << r;
}

TEST_F(MetricsHttpServerTest, OversizedRequestIs431AndTheServerKeepsServing) {
  const std::string huge =
      "GET /metrics HTTP/1.1\r\nX-Fill: " + std::string(64 * 1024, 'a') + "\r\n\r\n";
  const std::string r = Exchange(port_, huge);
  EXPECT_EQ(StatusOf(r), 431) << r.substr(0, 200);
  EXPECT_EQ(StatusOf(Get(port_, "/healthz")), 200);
}

TEST_F(MetricsHttpServerTest, SilentClientTimesOutWith408AndDoesNotBlockOthers) {
  const int silent = Connect(port_);
  ASSERT_GE(silent, 0);
  // Served while the silent connection is open.
  EXPECT_EQ(StatusOf(Get(port_, "/healthz")), 200);
  const std::string r = ReadToEof(silent);  // after request_timeout (500 ms)
  close(silent);
  EXPECT_EQ(StatusOf(r), 408) << r;
}

TEST_F(MetricsHttpServerTest, ConcurrentScrapesAllSucceed) {
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 16; ++i) {
    threads.emplace_back([&] {
      for (int j = 0; j < 10; ++j) {
        const int status = StatusOf(Get(port_, "/metrics"));
        EXPECT_EQ(status, 200);
        ok += status == 200;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(ok.load(), 160);
}

TEST_F(MetricsHttpServerTest, StopReturnsWithAClientConnectedAndClosesThePort) {
  const int idle = Connect(port_);
  ASSERT_GE(idle, 0);
  server_->Stop();
  close(idle);
  EXPECT_EQ(Connect(port_), -1);
}

TEST(MetricsHttpServerStartTest, MalformedAddressIsInvalidArgument) {
  for (const char* address : {"", "9464", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:70000",
                              "::1:9464"}) {
    MetricsHttpServerOptions options;
    options.listen_address = address;
    auto s = MetricsHttpServer::Start(options);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << address;
  }
}

TEST(MetricsHttpServerStartTest, PortInUseIsUnavailableNamingTheAddress) {
  MetricsHttpServerOptions options;
  auto first = MetricsHttpServer::Start(options);
  ASSERT_TRUE(first.ok()) << first.status();
  options.listen_address = (*first)->listening_address();
  auto second = MetricsHttpServer::Start(options);
  EXPECT_EQ(second.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(options.listen_address), std::string::npos)
      << second.status();
}

TEST(MetricsHttpServerStartTest, EmptyHostListensOnEveryInterfaceAndNoReadyCallbackIsReady) {
  MetricsHttpServerOptions options;
  options.listen_address = ":0";
  auto s = MetricsHttpServer::Start(options);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->listening_address(), "0.0.0.0:" + std::to_string((*s)->port()));
  EXPECT_EQ(StatusOf(Get((*s)->port(), "/readyz")), 200);
  // No collectable: an empty exposition.
  const std::string r = Get((*s)->port(), "/metrics");
  EXPECT_EQ(StatusOf(r), 200);
  EXPECT_EQ(BodyOf(r), "");
}

}  // namespace
}  // namespace qforge

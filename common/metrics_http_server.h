// MetricsHttpServer: the small HTTP/1.1 server behind every qforge metrics port (coordinator
// and worker). It replaces prometheus-cpp's Exposer, whose civetweb runs its threads on a fixed
// ~100 KiB stack that the static TLS of OpenBLAS and the CUDA libraries leaves too small (any
// request but /metrics segfaulted the coordinator; the worker could not even start it).
//
// Endpoints (GET only; the query string is ignored):
//   /metrics  200, the collectables in Prometheus text format 0.0.4
//   /healthz  200 "ok" while the process serves (liveness)
//   /readyz   200 "ready" when `ready()` returns true (or no callback is set), else 503
//             "not ready" (readiness: a probe may take traffic away without a restart)
// Anything else: 404 for an unknown path, 405 (with `Allow: GET`) for another method, 400 for
// a malformed request line, 431 for a request head above `max_request_bytes`, 408 when the
// head does not arrive within `request_timeout`, 505 for an HTTP version other than 1.0/1.1,
// Every response carries `Connection: close` and a Content-Length; the connection is closed
// after it.
//
// Threads: one accept thread plus one short-lived thread per connection (at most
// max_connections at a time; further clients wait in the listen backlog), each with the
// default (large) stack. Every read and write is bounded by request_timeout, so a slow or
// silent client cannot hold a thread for longer.
//
// Thread-safety: Start() returns a running server; Stop() (and the destructor) may be called
// from any thread once, and returns when no handler runs any more. `ready` and the
// collectable are called from handler threads, concurrently.
#ifndef QFORGE_COMMON_METRICS_HTTP_SERVER_H_
#define QFORGE_COMMON_METRICS_HTTP_SERVER_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"

namespace qforge {

struct MetricsHttpServerOptions {
  // "host:port" to listen on: an IPv4 address, a name ("localhost"), "[v6]" or an empty host
  // (every interface, "0.0.0.0"); port 0 picks a free port (see listening_address()).
  std::string listen_address = "127.0.0.1:0";
  // What /metrics serves: the families of `collectable` and then of each of `collectables`
  // (nulls are skipped). None: /metrics answers an empty exposition.
  std::shared_ptr<prometheus::Collectable> collectable;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectables;
  // /readyz's answer. Empty: always ready.
  std::function<bool()> ready;
  // Largest request head (request line + headers) accepted; larger ones get 431.
  size_t max_request_bytes = 8192;
  // Bound on receiving a request head and on sending the response, each.
  std::chrono::milliseconds request_timeout{5000};
  // Requests served at the same time; more wait in the listen backlog.
  int max_connections = 8;
};

class MetricsHttpServer {
 public:
  // Binds, listens and starts the accept thread. INVALID_ARGUMENT for a malformed
  // listen_address (message names it and the expected form), UNAVAILABLE when the address
  // cannot be resolved or bound (message names the address and the system error).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(MetricsHttpServerOptions options);

  ~MetricsHttpServer();  // Stop()
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // The bound "host:port": the host as given ("0.0.0.0" for an empty one), the real port.
  const std::string& listening_address() const { return listening_address_; }
  int port() const { return port_; }

  // Closes the listening socket, wakes handlers blocked on a client, waits for them. Idempotent.
  void Stop();

  // The full response (status line, headers, body) to one request head, as the server sends
  // it; exposed for tests. `head` is everything up to and including the blank line.
  std::string Respond(std::string_view head) const;

 private:
  explicit MetricsHttpServer(MetricsHttpServerOptions options);
  void AcceptLoop();
  void Serve(int fd);
  // Reads a request head into *head within the deadline. Returns the HTTP status to answer
  // with when it cannot (0 on success).
  int ReadHead(int fd, std::chrono::steady_clock::time_point deadline, std::string* head) const;
  bool WriteAll(int fd, std::string_view data, std::chrono::steady_clock::time_point deadline) const;
  // Waits until `fd` is ready for `events` or the deadline or Stop(); false unless ready.
  bool WaitFor(int fd, short events, std::chrono::steady_clock::time_point deadline) const;

  const MetricsHttpServerOptions options_;
  int listen_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};  // written once by Stop(): wakes every poll()
  std::string listening_address_;
  int port_ = 0;
  std::thread accept_thread_;
  std::atomic<bool> stopping_{false};

  std::mutex mu_;
  std::condition_variable idle_cv_;
  int active_ = 0;  // handler threads running; guarded by mu_
};

// The text of a response with `status` (200, 404, ...), a Content-Type and a body;
// `Connection: close` and Content-Length included. Exposed for tests.
std::string HttpResponse(int status, std::string_view content_type, std::string_view body,
                         std::string_view extra_headers = "");

}  // namespace qforge

#endif  // QFORGE_COMMON_METRICS_HTTP_SERVER_H_

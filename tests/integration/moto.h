// moto_server for tests: a real S3 endpoint on loopback, started on a free port (suites skip,
// saying so, when moto_server is not on PATH). The server runs with tests/integration/
// moto_shim on PYTHONPATH, so that it verifies SigV4 signatures against the URL as sent
// (moto_shim/sitecustomize.py says why). Also: a TCP proxy in front of it, for tests that take
// the endpoint away and bring it back (moto keeps its objects in memory, so the proxy is what
// stops), and helpers that create signing credentials.
// Thread-compatible; one object per server.
#ifndef QFORGE_TESTS_INTEGRATION_MOTO_H_
#define QFORGE_TESTS_INTEGRATION_MOTO_H_

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/integration/subprocess.h"

namespace qforge::testing {

// Whether `name` is an executable on PATH.
bool OnPath(const std::string& name);
// A port on 127.0.0.1 that was free a moment ago.
int FreeLoopbackPort();
// Whether something accepts connections on 127.0.0.1:port.
bool PortAnswers(int port);

// The reason S3 tests skip ("" when moto_server is available).
std::string MotoUnavailableReason();

class MotoServer {
 public:
  // Starts moto_server on a free port with the extra environment (KEY=VALUE) and waits up to
  // 30 s for it to answer. `env` may set INITIAL_NO_AUTH_ACTION_COUNT to turn signature
  // checks on after that many requests.
  explicit MotoServer(std::vector<std::string> env = {});
  ~MotoServer();  // SIGKILLs it
  MotoServer(const MotoServer&) = delete;
  MotoServer& operator=(const MotoServer&) = delete;

  bool ready() const { return PortAnswers(port_); }
  int port() const { return port_; }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::string log() const;

  // With signature checks on (INITIAL_NO_AUTH_ACTION_COUNT=3 in `env`): creates an IAM user
  // allowed everything and returns its access key id and secret through the first three
  // (unchecked) requests. Empty strings on failure.
  bool CreateSigningUser(std::string* access_key_id, std::string* secret_access_key);

 private:
  std::string dir_;
  int port_ = 0;
  std::unique_ptr<Subprocess> process_;
};

// Forwards 127.0.0.1:<port()> to 127.0.0.1:<target_port>. Stop() closes the listener and
// every open connection (clients see refused connections and resets); Start() listens again
// on the same port.
class TcpProxy {
 public:
  explicit TcpProxy(int target_port);
  ~TcpProxy();
  TcpProxy(const TcpProxy&) = delete;
  TcpProxy& operator=(const TcpProxy&) = delete;

  int port() const { return port_; }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  bool Start();
  void Stop();
  // Connections accepted so far.
  int connections() const { return connections_.load(); }

 private:
  void Accept(int listen_fd);

  const int target_port_;
  int port_ = 0;
  std::mutex mu_;
  int listen_fd_ = -1;                 // guarded by mu_
  std::vector<int> open_fds_;          // guarded by mu_
  std::vector<std::thread> threads_;   // guarded by mu_
  std::atomic<int> connections_{0};
};

}  // namespace qforge::testing

#endif  // QFORGE_TESTS_INTEGRATION_MOTO_H_

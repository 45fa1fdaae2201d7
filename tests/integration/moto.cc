#include "tests/integration/moto.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>

#ifndef QFORGE_MOTO_SHIM_DIR
#error "QFORGE_MOTO_SHIM_DIR must name tests/integration/moto_shim"
#endif

namespace qforge::testing {
namespace {

using namespace std::chrono_literals;

sockaddr_in Loopback(int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  return addr;
}

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = Loopback(port);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// One request to moto's IAM API, routed by the credential scope of a dummy Authorization
// header (moto does not check it during its INITIAL_NO_AUTH_ACTION_COUNT requests).
std::string IamCall(int port, const std::string& form) {
  const int fd = Connect(port);
  if (fd < 0) return "";
  const std::string req =
      "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
      "Content-Type: application/x-www-form-urlencoded\r\n"
      "Authorization: AWS4-HMAC-SHA256 Credential=AKIAX/20250101/us-east-1/iam/aws4_request, "
      "SignedHeaders=host, Signature=00\r\nContent-Length: " +
      std::to_string(form.size()) + "\r\n\r\n" + form;
  (void)!send(fd, req.data(), req.size(), MSG_NOSIGNAL);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

std::string XmlField(const std::string& xml, const std::string& name) {
  const size_t a = xml.find("<" + name + ">");
  const size_t b = xml.find("</" + name + ">");
  if (a == std::string::npos || b == std::string::npos) return "";
  return xml.substr(a + name.size() + 2, b - a - name.size() - 2);
}

}  // namespace

bool OnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) return false;
  const std::string p = path;
  for (size_t start = 0; start <= p.size();) {
    size_t end = p.find(':', start);
    if (end == std::string::npos) end = p.size();
    const std::string candidate = p.substr(start, end - start) + "/" + name;
    if (access(candidate.c_str(), X_OK) == 0) return true;
    start = end + 1;
  }
  return false;
}

int FreeLoopbackPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = Loopback(0);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

bool PortAnswers(int port) {
  const int fd = Connect(port);
  if (fd < 0) return false;
  close(fd);
  return true;
}

std::string MotoUnavailableReason() {
  return OnPath("moto_server") ? "" : "moto_server is not on PATH; S3 tests skipped";
}

MotoServer::MotoServer(std::vector<std::string> env) {
  char tmpl[] = "/tmp/qforge-moto-XXXXXX";
  dir_ = mkdtemp(tmpl) != nullptr ? tmpl : "/tmp";
  port_ = FreeLoopbackPort();
  // Through env(1): PYTHONPATH replaces any inherited value (a duplicate entry appended to
  // the environment would lose to the inherited one).
  std::vector<std::string> argv = {"/usr/bin/env",
                                   std::string("PYTHONPATH=") + QFORGE_MOTO_SHIM_DIR};
  for (std::string& e : env) argv.push_back(std::move(e));
  for (const char* a : {"moto_server", "-H", "127.0.0.1", "-p"}) argv.emplace_back(a);
  argv.push_back(std::to_string(port_));
  process_ = std::make_unique<Subprocess>(argv, dir_ + "/moto");
  for (int i = 0; i < 300 && !PortAnswers(port_); ++i) std::this_thread::sleep_for(100ms);
}

MotoServer::~MotoServer() {
  process_->Signal(SIGKILL);
  process_->Wait(10s);
}

std::string MotoServer::log() const { return process_->Stderr(); }

bool MotoServer::CreateSigningUser(std::string* access_key_id, std::string* secret_access_key) {
  if (IamCall(port_, "Action=CreateUser&UserName=u&Version=2010-05-08")
          .find("CreateUserResponse") == std::string::npos) {
    return false;
  }
  if (IamCall(port_,
              "Action=PutUserPolicy&UserName=u&PolicyName=all&PolicyDocument=%7B%22Version%22%3A"
              "%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect%22%3A%22Allow%22%2C%22Action"
              "%22%3A%22*%22%2C%22Resource%22%3A%22*%22%7D%5D%7D&Version=2010-05-08")
          .find("PutUserPolicyResponse") == std::string::npos) {
    return false;
  }
  const std::string key = IamCall(port_, "Action=CreateAccessKey&UserName=u&Version=2010-05-08");
  *access_key_id = XmlField(key, "AccessKeyId");
  *secret_access_key = XmlField(key, "SecretAccessKey");
  return !access_key_id->empty() && !secret_access_key->empty();
}

TcpProxy::TcpProxy(int target_port) : target_port_(target_port) {
  port_ = FreeLoopbackPort();
  Start();
}

TcpProxy::~TcpProxy() { Stop(); }

bool TcpProxy::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (listen_fd_ >= 0) return true;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr = Loopback(port_);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || listen(fd, 64) != 0) {
    close(fd);
    return false;
  }
  listen_fd_ = fd;
  threads_.emplace_back([this, fd] { Accept(fd); });
  return true;
}

void TcpProxy::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (listen_fd_ >= 0) shutdown(listen_fd_, SHUT_RDWR);
  }
  // Until no thread is left: the acceptor may start a pump just before it sees the shutdown.
  for (;;) {
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : open_fds_) shutdown(fd, SHUT_RDWR);
      threads.swap(threads_);
    }
    if (threads.empty()) break;
    for (std::thread& t : threads) t.join();
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
  for (int fd : open_fds_) close(fd);
  open_fds_.clear();
}

void TcpProxy::Accept(int listen_fd) {
  for (;;) {
    const int client = accept(listen_fd, nullptr, nullptr);
    if (client < 0) return;
    const int server = Connect(target_port_);
    std::lock_guard<std::mutex> lock(mu_);
    if (server < 0) {
      close(client);
      continue;
    }
    ++connections_;
    open_fds_.push_back(client);
    open_fds_.push_back(server);
    // Pumps both directions until either side closes (or Stop shuts both down).
    threads_.emplace_back([client, server] {
      pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
      char buf[1 << 16];
      for (;;) {
        if (poll(fds, 2, 1000) < 0) return;
        for (int i = 0; i < 2; ++i) {
          if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
          const ssize_t n = recv(fds[i].fd, buf, sizeof buf, 0);
          if (n <= 0) {
            shutdown(client, SHUT_RDWR);
            shutdown(server, SHUT_RDWR);
            return;
          }
          const int to = fds[1 - i].fd;
          for (ssize_t off = 0; off < n;) {
            const ssize_t w = send(to, buf + off, static_cast<size_t>(n - off), MSG_NOSIGNAL);
            if (w <= 0) {
              shutdown(client, SHUT_RDWR);
              shutdown(server, SHUT_RDWR);
              return;
            }
            off += w;
          }
        }
      }
    });
  }
}

}  // namespace qforge::testing

#include "common/metrics_http_server.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace qforge {
namespace {

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
  }
}

constexpr std::string_view kTextPlain = "text/plain; charset=utf-8";

std::string Plain(int status, std::string_view body, std::string_view extra_headers = "") {
  return HttpResponse(status, kTextPlain, absl::StrCat(std::string(body), "\n"), extra_headers);
}

bool IsTokenChar(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

// Splits "host:port" (host may be "[v6]" or empty). False when malformed.
bool SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return false;
  std::string h = address.substr(0, colon);
  const std::string p = address.substr(colon + 1);
  if (!h.empty() && h.front() == '[') {
    if (h.size() < 2 || h.back() != ']') return false;
    h = h.substr(1, h.size() - 2);
  } else if (h.find(':') != std::string::npos) {
    return false;  // a bare IPv6 address needs brackets
  }
  int value = 0;
  if (p.empty() || !absl::SimpleAtoi(p, &value) || value < 0 || value > 65535) return false;
  *host = h;
  *port = value;
  return true;
}

}  // namespace

std::string HttpResponse(int status, std::string_view content_type, std::string_view body,
                         std::string_view extra_headers) {
  std::string out = absl::StrCat("HTTP/1.1 ", status, " ", Reason(status), "\r\n");
  absl::StrAppend(&out, "Content-Type: ", std::string(content_type), "\r\n");
  absl::StrAppend(&out, "Content-Length: ", body.size(), "\r\n");
  absl::StrAppend(&out, std::string(extra_headers));
  absl::StrAppend(&out, "Connection: close\r\n\r\n");
  out.append(body.data(), body.size());
  return out;
}

MetricsHttpServer::MetricsHttpServer(MetricsHttpServerOptions options)
    : options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    MetricsHttpServerOptions options) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(options.listen_address, &host, &port)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics listen address '", options.listen_address,
        "' is not host:port (e.g. 127.0.0.1:9464, 0.0.0.0:9464, [::]:9464; port 0 picks one)"));
  }
  if (options.max_connections < 1) options.max_connections = 1;
  std::unique_ptr<MetricsHttpServer> s(new MetricsHttpServer(std::move(options)));
  const std::string& address = s->options_.listen_address;

  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port_text = std::to_string(port);
  const int gai = getaddrinfo(host.empty() ? nullptr : host.c_str(), port_text.c_str(), &hints,
                              &found);
  if (gai != 0 || found == nullptr) {
    return absl::UnavailableError(absl::StrCat("metrics: cannot resolve '", address,
                                               "': ", gai_strerror(gai)));
  }
  // Prefer IPv4 for an empty host (getaddrinfo may list :: first); else the first that binds.
  std::vector<addrinfo*> candidates;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    if (host.empty() && a->ai_family == AF_INET) candidates.insert(candidates.begin(), a);
    else candidates.push_back(a);
  }
  std::string error = "no address";
  for (addrinfo* a : candidates) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 64) != 0) {
      error = std::strerror(errno);
      close(fd);
      continue;
    }
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
    s->port_ = bound.ss_family == AF_INET6
                   ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                   : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    s->listen_fd_ = fd;
    break;
  }
  freeaddrinfo(found);
  if (s->listen_fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", address, ": ", error));
  }
  if (pipe2(s->wake_pipe_, O_CLOEXEC) != 0) {
    return absl::UnavailableError(absl::StrCat("metrics: pipe: ", std::strerror(errno)));
  }
  const size_t colon = address.rfind(':');
  const std::string shown_host = colon == 0 ? "0.0.0.0" : address.substr(0, colon);
  s->listening_address_ = absl::StrCat(shown_host, ":", s->port_);
  s->accept_thread_ = std::thread([raw = s.get()] { raw->AcceptLoop(); });
  return s;
}

MetricsHttpServer::~MetricsHttpServer() {
  Stop();
  for (int fd : wake_pipe_) {
    if (fd >= 0) close(fd);
  }
}

void MetricsHttpServer::Stop() {
  if (!stopping_.exchange(true) && wake_pipe_[1] >= 0) {
    const char b = 1;
    (void)!write(wake_pipe_[1], &b, 1);  // never drained: every later poll() wakes too
  }
  {
    std::lock_guard<std::mutex> lock(mu_);  // wakes an accept loop waiting for a slot
  }
  idle_cv_.notify_all();
  if (accept_thread_.joinable()) accept_thread_.join();
  if (listen_fd_ >= 0) {
    close(listen_fd_);
    listen_fd_ = -1;
  }
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [this] { return active_ == 0; });
}

bool MetricsHttpServer::WaitFor(int fd, short events,
                                std::chrono::steady_clock::time_point deadline) const {
  for (;;) {
    if (stopping_.load()) return false;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd fds[2] = {{fd, events, 0}, {wake_pipe_[0], POLLIN, 0}};
    const int n = poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (fds[1].revents & POLLIN) != 0) return false;
    if (n > 0 && fds[0].revents != 0) return true;
  }
}

void MetricsHttpServer::AcceptLoop() {
  while (!stopping_.load()) {
    {
      // At max_connections, further clients wait in the listen backlog for a free slot
      // (every handler ends within two request_timeouts).
      std::unique_lock<std::mutex> lock(mu_);
      idle_cv_.wait(lock, [this] { return active_ < options_.max_connections || stopping_.load(); });
    }
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    const int n = poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if ((fds[1].revents & POLLIN) != 0) return;
    if ((fds[0].revents & POLLIN) == 0) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      // EMFILE and friends: back off briefly instead of spinning.
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
        pollfd w = {wake_pipe_[0], POLLIN, 0};
        poll(&w, 1, 100);
      }
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++active_;
    }
    try {
      std::thread([this, fd] {
        Serve(fd);
        close(fd);
        std::lock_guard<std::mutex> lock(mu_);
        --active_;
        idle_cv_.notify_all();
      }).detach();
    } catch (const std::system_error&) {  // no thread available: refuse this one
      close(fd);
      std::lock_guard<std::mutex> lock(mu_);
      --active_;
      idle_cv_.notify_all();
    }
  }
}

int MetricsHttpServer::ReadHead(int fd, std::chrono::steady_clock::time_point deadline,
                                std::string* head) const {
  char buf[1024];
  for (;;) {
    // The end of the head: a blank line (CRLF CRLF, or bare LF LF from lenient clients).
    size_t end = head->find("\r\n\r\n");
    if (end != std::string::npos) {
      head->resize(end + 4);
      return 0;
    }
    end = head->find("\n\n");
    if (end != std::string::npos) {
      head->resize(end + 2);
      return 0;
    }
    if (head->size() > options_.max_request_bytes) return 431;
    if (!WaitFor(fd, POLLIN, deadline)) return 408;
    const ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0) return head->empty() ? -1 : 400;  // closed before a full head
    head->append(buf, static_cast<size_t>(n));
  }
}

bool MetricsHttpServer::WriteAll(int fd, std::string_view data,
                                 std::chrono::steady_clock::time_point deadline) const {
  while (!data.empty()) {
    const ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!WaitFor(fd, POLLOUT, deadline)) return false;
      continue;
    }
    return false;
  }
  return true;
}

void MetricsHttpServer::Serve(int fd) {
  std::string head;
  const auto read_deadline = std::chrono::steady_clock::now() + options_.request_timeout;
  const int error = ReadHead(fd, read_deadline, &head);
  std::string response;
  if (error < 0) return;  // connected and closed without a byte (a TCP probe)
  if (error == 431) {
    response = Plain(431, absl::StrCat("request head larger than ", options_.max_request_bytes,
                                       " bytes"));
  } else if (error == 408) {
    if (stopping_.load()) return;
    response = Plain(408, "request not received in time");
  } else if (error != 0) {
    response = Plain(400, "malformed request");
  } else {
    response = Respond(head);
  }
  const auto write_deadline = std::chrono::steady_clock::now() + options_.request_timeout;
  if (!WriteAll(fd, response, write_deadline)) return;
  // Lingering close: closing with unread request bytes (an oversized head, a body) would
  // reset the connection and could destroy the response before the client reads it. Send
  // FIN, then read and drop what the client still sends until it closes (bounded).
  shutdown(fd, SHUT_WR);
  const auto drain_deadline =
      std::chrono::steady_clock::now() + std::min<std::chrono::milliseconds>(
                                             options_.request_timeout, std::chrono::seconds(1));
  char sink[4096];
  size_t drained = 0;
  while (drained < (1u << 20) && WaitFor(fd, POLLIN, drain_deadline)) {
    const ssize_t n = recv(fd, sink, sizeof sink, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0) break;
    drained += static_cast<size_t>(n);
  }
}

std::string MetricsHttpServer::Respond(std::string_view head) const {
  const size_t eol = head.find('\n');
  std::string_view line = head.substr(0, eol);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  // request-line = method SP request-target SP HTTP-version
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp1 == std::string_view::npos || sp2 == std::string_view::npos || sp1 == 0 ||
      sp2 == sp1 + 1 || line.find(' ', sp2 + 1) != std::string_view::npos) {
    return Plain(400, "malformed request line (expected: GET /path HTTP/1.1)");
  }
  const std::string_view method = line.substr(0, sp1);
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string_view version = line.substr(sp2 + 1);
  for (char c : method) {
    if (!IsTokenChar(c)) return Plain(400, "malformed request method");
  }
  for (char c : target) {
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7f) {
      return Plain(400, "malformed request target");
    }
  }
  if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || version[6] != '.' ||
      version[5] < '0' || version[5] > '9' || version[7] < '0' || version[7] > '9') {
    return Plain(400, "malformed HTTP version");
  }
  if (version != "HTTP/1.1" && version != "HTTP/1.0") {
    return Plain(505, "only HTTP/1.0 and HTTP/1.1 are served");
  }
  if (target.empty() || target.front() != '/') {
    return Plain(400, "request target must be a path beginning with '/'");
  }
  if (const size_t q = target.find('?'); q != std::string_view::npos) target = target.substr(0, q);

  const bool known = target == "/metrics" || target == "/healthz" || target == "/readyz";
  if (method != "GET") {
    return Plain(405, "method not allowed; use GET", "Allow: GET\r\n");
  }
  if (!known) {
    return Plain(404, "not found; this port serves /metrics, /healthz and /readyz");
  }
  if (target == "/healthz") return Plain(200, "ok");
  if (target == "/readyz") {
    const bool ready = !options_.ready || options_.ready();
    return ready ? Plain(200, "ready") : Plain(503, "not ready");
  }
  std::vector<prometheus::MetricFamily> families;
  auto add = [&families](const std::shared_ptr<prometheus::Collectable>& c) {
    if (c == nullptr) return;
    std::vector<prometheus::MetricFamily> more = c->Collect();
    families.insert(families.end(), std::make_move_iterator(more.begin()),
                    std::make_move_iterator(more.end()));
  };
  add(options_.collectable);
  for (const auto& c : options_.collectables) add(c);
  const std::string body = prometheus::TextSerializer().Serialize(families);
  return HttpResponse(200, "text/plain; version=0.0.4; charset=utf-8", body);
}

}  // namespace qforge

// How the `qforge` CLI reaches the coordinator: endpoint and token from flags, the environment
// (QFORGE_ENDPOINT, QFORGE_TOKEN) or a config file ($XDG_CONFIG_HOME/qforge/config.json, else
// ~/.config/qforge/config.json: {"endpoint": "host:port", "token": "...", "tls_ca": "ca.pem"}),
// in that order of
// precedence; default endpoint 127.0.0.1:50051. Every unary call gets a deadline and the
// `authorization: Bearer <token>` metadata.
// Thread-safety: a Connection may be shared by threads (gRPC stubs are thread-safe).
#ifndef QFORGE_CLIENT_CONNECTION_H_
#define QFORGE_CLIENT_CONNECTION_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "common/tls.h"
#include "qforge/v1/job_service.grpc.pb.h"

namespace qforge::cli {

inline constexpr char kDefaultEndpoint[] = "127.0.0.1:50051";

struct ClientConfig {
  std::string endpoint = kDefaultEndpoint;
  std::string token;               // empty: no authorization metadata
  int64_t timeout_ms = 30'000;     // deadline of unary calls
  std::string endpoint_source;     // "flag", "env", "config", "default" (for messages)
  // TLS (common/tls.h): flags > QFORGE_TLS_CA / QFORGE_TLS_CERT / QFORGE_TLS_KEY > the config
  // file's "tls_ca", "tls_cert", "tls_key"; all empty: plaintext.
  TlsOptions tls;
};

// Reads the environment through `getenv` (tests inject one).
using GetEnvFn = std::function<const char*(const char*)>;

// $XDG_CONFIG_HOME/qforge/config.json, else $HOME/.config/qforge/config.json ("" without HOME).
std::string DefaultConfigPath(const GetEnvFn& getenv);

// Resolves endpoint and token: flag (non-empty) > environment > config file > default. A
// missing config file is fine; an unreadable or malformed one is INVALID_ARGUMENT naming it.
// The endpoint may be written "host:port", "http://host:port" or "grpc://host:port".
absl::StatusOr<ClientConfig> ResolveClientConfig(const std::string& flag_endpoint,
                                                 const std::string& flag_token,
                                                 const GetEnvFn& getenv,
                                                 const std::string& config_path);

class Connection {
 public:
  // `credentials`: ChannelCredentialsFor(config.tls) (null: plaintext).
  explicit Connection(ClientConfig config,
                      std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr);

  v1::JobService::StubInterface& jobs() { return *stub_; }
  const ClientConfig& config() const { return config_; }

  // Sets the bearer token and, for unary calls (`stream` false), the deadline.
  void Prepare(grpc::ClientContext* ctx, bool stream = false) const;

 private:
  ClientConfig config_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::JobService::StubInterface> stub_;
};

// A fresh random (version 4) UUID, e.g. "1b4e28ba-2fa1-41d2-883f-0016d3cca427".
std::string NewUuid();

}  // namespace qforge::cli

#endif  // QFORGE_CLIENT_CONNECTION_H_

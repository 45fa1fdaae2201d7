// TLS for the gRPC edges: the coordinator serves JobService and WorkerService over TLS
// (--tls-cert/--tls-key) and, with --tls-ca, requires workers to present a client
// certificate signed by that CA (mutual TLS; clients of JobService may present none). The
// worker and the CLI verify the coordinator with --tls-ca and present --tls-cert/--tls-key
// when given. Certificates and keys are PEM files, read once at start.
//
// Errors name the flag and the file and say what to fix ("--tls-key /etc/q/key.pem: not a
// PEM private key"); nothing here logs or returns key material.
//
// Thread-safety: the functions are thread-safe; credentials objects are immutable.
#ifndef QFORGE_COMMON_TLS_H_
#define QFORGE_COMMON_TLS_H_

#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qforge {

// The three flags, as paths ("" = not given).
struct TlsOptions {
  std::string cert;  // PEM certificate chain (server: its own; client: its client certificate)
  std::string key;   // PEM private key of `cert`
  std::string ca;    // PEM CA bundle (server: verifies client certificates; client: the server)

  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

// The PEM files of `options`, read and checked: cert and key come together; each file
// exists, is readable, at most 1 MiB, and holds the expected PEM block.
struct TlsMaterial {
  std::string cert_pem, key_pem, ca_pem;
};
absl::StatusOr<TlsMaterial> LoadTlsMaterial(const TlsOptions& options);

// Server credentials: insecure when `options` is empty; TLS with cert and key (both
// required); with ca, client certificates are requested and, when presented, verified
// against it (RequireVerifiedClientCertificate then tells who presented one).
// INVALID_ARGUMENT naming the flag for a missing or malformed file, or a ca without a cert.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFor(
    const TlsOptions& options);

// Channel credentials: insecure when `options` is empty; else TLS verifying the server with
// ca (or the system roots when ca is ""), presenting cert and key when given.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(
    const TlsOptions& options);

// OK when the call's peer presented a client certificate the server verified (mutual TLS);
// UNAUTHENTICATED saying what to pass otherwise. `what` names the service in the message.
absl::Status RequireVerifiedClientCertificate(const grpc::ServerContextBase& context,
                                              absl::string_view what);

// A hint for a failed call's message: with TLS off, that the coordinator may serve TLS
// (pass --tls-ca); with TLS on, that the handshake may have failed (wrong CA, a plaintext
// server, a name not in the certificate). "" when the message shows neither.
std::string TlsHint(const std::string& grpc_message, bool tls_enabled);

}  // namespace qforge

#endif  // QFORGE_COMMON_TLS_H_

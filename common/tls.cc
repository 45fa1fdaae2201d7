#include "common/tls.h"

#include <fstream>
#include <sstream>
#include <system_error>
#include <filesystem>

#include <grpcpp/security/auth_context.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace qforge {
namespace {

constexpr uint64_t kMaxPemBytes = 1 << 20;

// The file at `path` for `flag`, checked to hold a PEM block whose header contains `marker`
// ("CERTIFICATE", "PRIVATE KEY").
absl::StatusOr<std::string> ReadPem(const std::string& flag, const std::string& path,
                                    const std::string& marker, const std::string& what) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": the file does not exist; give the path of ", what));
  }
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": not a readable file (", ec.message(), ")"));
  }
  if (size > kMaxPemBytes) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": ", size,
                                                   " bytes is too large for PEM (at most ",
                                                   kMaxPemBytes, ")"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, ": cannot be read (check its permissions)"));
  }
  std::ostringstream text;
  text << in.rdbuf();
  std::string pem = text.str();
  const size_t begin = pem.find("-----BEGIN ");
  const size_t header_end = begin == std::string::npos ? begin : pem.find("-----", begin + 11);
  if (begin == std::string::npos || header_end == std::string::npos ||
      pem.substr(begin, header_end - begin).find(marker) == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": not a PEM file holding ",
                                                   what, " (no '-----BEGIN ...", marker,
                                                   "-----' block)"));
  }
  return pem;
}

}  // namespace

absl::StatusOr<TlsMaterial> LoadTlsMaterial(const TlsOptions& options) {
  if (options.cert.empty() != options.key.empty()) {
    return absl::InvalidArgumentError(
        options.cert.empty()
            ? "--tls-key is given without --tls-cert: give both (the certificate and its key)"
            : "--tls-cert is given without --tls-key: give both (the certificate and its key)");
  }
  TlsMaterial m;
  if (!options.cert.empty()) {
    auto cert = ReadPem("--tls-cert", options.cert, "CERTIFICATE", "a certificate");
    if (!cert.ok()) return cert.status();
    auto key = ReadPem("--tls-key", options.key, "PRIVATE KEY", "a private key");
    if (!key.ok()) return key.status();
    m.cert_pem = *std::move(cert);
    m.key_pem = *std::move(key);
  }
  if (!options.ca.empty()) {
    auto ca = ReadPem("--tls-ca", options.ca, "CERTIFICATE", "CA certificates");
    if (!ca.ok()) return ca.status();
    m.ca_pem = *std::move(ca);
  }
  return m;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFor(
    const TlsOptions& options) {
  if (!options.enabled()) return grpc::InsecureServerCredentials();
  if (options.cert.empty()) {
    return absl::InvalidArgumentError(
        "--tls-ca is given without --tls-cert and --tls-key: a TLS server needs its own "
        "certificate and key");
  }
  auto m = LoadTlsMaterial(options);
  if (!m.ok()) return m.status();
  grpc::SslServerCredentialsOptions ssl(
      m->ca_pem.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                        : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = m->ca_pem;
  ssl.pem_key_cert_pairs.push_back({m->key_pem, m->cert_pem});
  return grpc::SslServerCredentials(ssl);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(
    const TlsOptions& options) {
  if (!options.enabled()) return grpc::InsecureChannelCredentials();
  auto m = LoadTlsMaterial(options);
  if (!m.ok()) return m.status();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = m->ca_pem;  // "": the system's roots
  ssl.pem_private_key = m->key_pem;
  ssl.pem_cert_chain = m->cert_pem;
  return grpc::SslCredentials(ssl);
}

absl::Status RequireVerifiedClientCertificate(const grpc::ServerContextBase& context,
                                              absl::string_view what) {
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  // With GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY a presented certificate that does
  // not verify fails the handshake, so a peer certificate here is a verified one.
  if (auth != nullptr && !auth->FindPropertyValues("x509_pem_cert").empty()) {
    return absl::OkStatus();
  }
  return absl::UnauthenticatedError(absl::StrCat(
      std::string(what),
      " requires mutual TLS: the caller presented no client certificate; start the worker "
      "with --tls-cert and --tls-key (a certificate signed by the coordinator's --tls-ca) and "
      "--tls-ca"));
}

std::string TlsHint(const std::string& grpc_message, bool tls_enabled) {
  if (tls_enabled) {
    if (absl::StrContains(grpc_message, "ssl") || absl::StrContains(grpc_message, "SSL") ||
        absl::StrContains(grpc_message, "handshake") ||
        absl::StrContains(grpc_message, "failed to connect") ||
        absl::StrContains(grpc_message, "Socket closed")) {
      return "the TLS handshake may have failed: check that the coordinator serves TLS, that "
             "--tls-ca holds the CA that signed its certificate, and that the endpoint's host "
             "name is in the certificate";
    }
    return "";
  }
  if (absl::StrContains(grpc_message, "Socket closed") ||
      absl::StrContains(grpc_message, "failed to connect") ||
      absl::StrContains(grpc_message, "Connection reset") ||
      absl::StrContains(grpc_message, "connection attempt timed out") ||
      absl::StrContains(grpc_message, "Deadline Exceeded")) {
    return "if the coordinator serves TLS, pass --tls-ca CA.pem (or set QFORGE_TLS_CA)";
  }
  return "";
}

}  // namespace qforge

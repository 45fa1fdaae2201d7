// Bearer-token authentication of the coordinator's RPCs.
//
// Callers send `authorization: Bearer <token>` metadata (FACTS.md: call credentials are dropped
// on insecure channels, so the token travels as plain metadata and is checked by each handler).
// Two kinds of token exist:
//   - client tokens, from the tokens file (`--tokens-file`): one `<token> <tenant>` pair per
//     line, optionally followed by `allow-root=/abs/dir` fields (file:// directories that
//     tenant's jobs may read and write, besides the coordinator's shared --allow-root ones;
//     docs/operations.md "File access"); `#` starts a comment, blank lines are ignored. A
//     client token may call JobService only, and its tenant scopes every job it sees.
//   - the worker token (`--worker-token`): may call WorkerService only.
// With no client token and no worker token configured, authentication is off (the embedded
// default): every call is accepted and the tenant is "". As soon as either is configured,
// every JobService and WorkerService call must carry a valid token of the right kind. The
// gRPC health service is never authenticated (Kubernetes probes carry no metadata).
//
// Errors: UNAUTHENTICATED for a missing, malformed or unknown token (the message never echoes
// the token); PERMISSION_DENIED for a valid token of the wrong kind (a client token on
// WorkerService, the worker token on JobService). Loading: INVALID_ARGUMENT naming the file
// and line, NOT_FOUND / PERMISSION_DENIED when the file cannot be read.
//
// Tokens are kept only as SHA-256 digests, so lookups do not compare secrets byte by byte.
//
// Thread-safety: an Authenticator is immutable after construction; all const methods may be
// called concurrently.
#ifndef QFORGE_SERVER_AUTH_H_
#define QFORGE_SERVER_AUTH_H_

#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/server_context.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qforge {

class Authenticator {
 public:
  // Authentication off.
  Authenticator() = default;

  // `client_tokens`: token -> tenant (tenants non-empty); `worker_token` may be empty (no
  // worker token). INVALID_ARGUMENT for an empty token or tenant, or when the worker token is
  // also a client token.
  static absl::StatusOr<Authenticator> Create(const std::map<std::string, std::string>& client_tokens,
                                              std::string_view worker_token);

  // From the coordinator's flags: `tokens_file` ("" = none) and `worker_token` ("" = none).
  // A tokens file that exists but holds no token is an error (INVALID_ARGUMENT), so that a
  // truncated file cannot silently switch authentication off.
  static absl::StatusOr<Authenticator> FromFlags(std::string_view tokens_file,
                                                 std::string_view worker_token);

  // A parsed tokens file: token -> tenant, and tenant -> its allow-root directories (the
  // union over the tenant's lines, lexically normalized absolute paths).
  struct TokensFile {
    std::map<std::string, std::string> tokens;
    std::map<std::string, std::vector<std::string>> tenant_roots;
  };
  // Parses the text of a tokens file; `source` names it in error messages. Each non-comment
  // line holds whitespace-separated fields `<token> <tenant> [allow-root=/abs/dir ...]`;
  // tenants are 1..128 characters of [A-Za-z0-9._-] other than "." and "..". INVALID_ARGUMENT
  // "<source>:<line>: ..." for a malformed line, a duplicate token or an allow-root that is
  // not an absolute path.
  static absl::StatusOr<TokensFile> ParseTokensFile(std::string_view text,
                                                    std::string_view source);
  // ParseTokensFile's tokens.
  static absl::StatusOr<std::map<std::string, std::string>> ParseTokens(std::string_view text,
                                                                        std::string_view source);

  // Every tenant of a client token, with its allow-root directories from the tokens file
  // (empty when it has none).
  const std::map<std::string, std::vector<std::string>>& tenants() const { return tenants_; }

  bool enabled() const { return !client_tokens_.empty() || !worker_token_digest_.empty(); }
  size_t num_client_tokens() const { return client_tokens_.size(); }
  bool has_worker_token() const { return !worker_token_digest_.empty(); }

  // `authorization` is the value of the `authorization` metadata (nullopt when absent).
  // Returns the caller's tenant ("" when authentication is off).
  absl::StatusOr<std::string> AuthenticateClient(
      std::optional<std::string_view> authorization) const;
  absl::Status AuthenticateWorker(std::optional<std::string_view> authorization) const;

  // The same, reading the metadata of a gRPC call (UNAUTHENTICATED when the header is
  // repeated).
  absl::StatusOr<std::string> AuthenticateClient(const grpc::ServerContextBase& context) const;
  absl::Status AuthenticateWorker(const grpc::ServerContextBase& context) const;

  // The value of `authorization` metadata in `context`: nullopt when absent,
  // UNAUTHENTICATED when present more than once.
  static absl::StatusOr<std::optional<std::string_view>> AuthorizationHeader(
      const grpc::ServerContextBase& context);

 private:
  enum class Kind { kClient, kWorker };
  // Digest of the bearer token in `authorization`, or UNAUTHENTICATED.
  static absl::StatusOr<std::string> TokenDigest(std::optional<std::string_view> authorization);
  // Classifies a digest: nullopt when unknown.
  std::optional<Kind> Classify(const std::string& digest, std::string* tenant) const;

  std::map<std::string, std::string> client_tokens_;  // sha256(token) hex -> tenant
  std::string worker_token_digest_;                   // sha256(worker token) hex, or ""
  std::map<std::string, std::vector<std::string>> tenants_;  // tenant -> allow-root dirs
};

}  // namespace qforge

#endif  // QFORGE_SERVER_AUTH_H_

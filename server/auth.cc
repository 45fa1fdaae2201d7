#include "server/auth.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"

namespace qforge {
namespace {

constexpr size_t kMaxTenantChars = 128;
constexpr size_t kMaxTokenChars = 4096;
constexpr char kExpectedHeader[] = "expected metadata 'authorization: Bearer <token>'";

// Debian's abseil has its own string_view, so the few string helpers needed here work on
// std::string_view directly.
bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v'; }

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

std::vector<std::string_view> Fields(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    while (i < s.size() && IsSpace(s[i])) ++i;
    size_t j = i;
    while (j < s.size() && !IsSpace(s[j])) ++j;
    if (j > i) out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

bool ValidTenant(std::string_view tenant) {
  if (tenant.empty() || tenant.size() > kMaxTenantChars) return false;
  // A tenant names a directory of the store root (docs/operations.md "File access").
  if (tenant == "." || tenant == "..") return false;
  for (char c : tenant) {
    const bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<Authenticator> Authenticator::Create(
    const std::map<std::string, std::string>& client_tokens, std::string_view worker_token) {
  Authenticator auth;
  for (const auto& [token, tenant] : client_tokens) {
    if (token.empty()) return absl::InvalidArgumentError("client token: empty token");
    if (!ValidTenant(tenant)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "client token: tenant '", tenant, "' must be 1..", kMaxTenantChars,
          " characters of [A-Za-z0-9._-]"));
    }
    auth.client_tokens_.emplace(Sha256Hex(token), tenant);
    auth.tenants_[tenant];
  }
  if (!worker_token.empty()) {
    auth.worker_token_digest_ = Sha256Hex(worker_token);
    if (auth.client_tokens_.count(auth.worker_token_digest_) != 0) {
      return absl::InvalidArgumentError(
          "worker token: the same token is also a client token; give workers their own token");
    }
  }
  return auth;
}

absl::StatusOr<Authenticator::TokensFile> Authenticator::ParseTokensFile(
    std::string_view text, std::string_view source) {
  constexpr std::string_view kAllowRoot = "allow-root=";
  TokensFile out;
  std::map<std::string, int> first_line;
  int line_no = 0;
  while (!text.empty()) {
    ++line_no;
    const size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
    if (const size_t hash = line.find('#'); hash != std::string_view::npos) {
      line = line.substr(0, hash);
    }
    std::vector<std::string_view> fields = Fields(line);
    if (fields.empty()) continue;
    const std::string where = absl::StrCat(std::string(source), ":", line_no, ": ");
    size_t extra_roots = 0;
    for (size_t i = 2; i < fields.size(); ++i) {
      if (fields[i].substr(0, kAllowRoot.size()) == kAllowRoot) ++extra_roots;
    }
    if (fields.size() < 2 || fields.size() != 2 + extra_roots) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "expected two fields '<token> <tenant>', found ", fields.size(),
          " (fields after the tenant must be allow-root=/absolute/dir)"));
    }
    if (fields[0].size() > kMaxTokenChars) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "token longer than ", kMaxTokenChars, " characters"));
    }
    if (!ValidTenant(fields[1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "tenant '", std::string(fields[1]), "' must be 1..", kMaxTenantChars,
          " characters of [A-Za-z0-9._-], not '.' or '..'"));
    }
    std::string token(fields[0]);
    if (auto it = first_line.find(token); it != first_line.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "duplicate token (first given on line ", it->second, ")"));
    }
    const std::string tenant(fields[1]);
    std::vector<std::string>& roots = out.tenant_roots[tenant];
    for (size_t i = 2; i < fields.size(); ++i) {
      const std::string_view dir = fields[i].substr(kAllowRoot.size());
      if (dir.empty() || dir.front() != '/') {
        return absl::InvalidArgumentError(absl::StrCat(
            where, "allow-root '", std::string(dir), "' is not an absolute directory path"));
      }
      const std::string normal = std::filesystem::path(std::string(dir)).lexically_normal();
      if (std::find(roots.begin(), roots.end(), normal) == roots.end()) roots.push_back(normal);
    }
    first_line.emplace(token, line_no);
    out.tokens.emplace(std::move(token), tenant);
  }
  return out;
}

absl::StatusOr<std::map<std::string, std::string>> Authenticator::ParseTokens(
    std::string_view text, std::string_view source) {
  auto parsed = ParseTokensFile(text, source);
  if (!parsed.ok()) return parsed.status();
  return std::move(parsed->tokens);
}

absl::StatusOr<Authenticator> Authenticator::FromFlags(std::string_view tokens_file,
                                                       std::string_view worker_token) {
  std::map<std::string, std::string> tokens;
  std::map<std::string, std::vector<std::string>> roots;
  const std::string file(tokens_file);
  if (!file.empty()) {
    std::ifstream in{file, std::ios::binary};
    if (!in) {
      return absl::NotFoundError(
          absl::StrCat("--tokens-file ", file, ": cannot be opened for reading"));
    }
    std::stringstream buffer;
    buffer << in.rdbuf();
    if (in.bad()) {
      return absl::UnavailableError(absl::StrCat("--tokens-file ", file, ": read error"));
    }
    auto parsed = ParseTokensFile(buffer.str(), file);
    if (!parsed.ok()) return parsed.status();
    if (parsed->tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tokens-file ", file,
          ": holds no '<token> <tenant>' line; drop the flag to run without authentication"));
    }
    tokens = std::move(parsed->tokens);
    roots = std::move(parsed->tenant_roots);
  }
  auto auth = Create(tokens, worker_token);
  if (!auth.ok()) return auth.status();
  for (auto& [tenant, dirs] : roots) auth->tenants_[tenant] = std::move(dirs);
  return auth;
}

absl::StatusOr<std::string> Authenticator::TokenDigest(
    std::optional<std::string_view> authorization) {
  if (!authorization.has_value()) {
    return absl::UnauthenticatedError(absl::StrCat("missing credentials: ", kExpectedHeader));
  }
  std::string_view value = Trim(*authorization);
  constexpr std::string_view kScheme = "bearer";
  if (value.size() <= kScheme.size() || !EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme) ||
      !IsSpace(value[kScheme.size()])) {
    return absl::UnauthenticatedError(
        absl::StrCat("malformed authorization metadata: ", kExpectedHeader));
  }
  std::string_view token = Trim(value.substr(kScheme.size()));
  if (token.empty() || token.size() > kMaxTokenChars) {
    return absl::UnauthenticatedError(
        absl::StrCat("malformed authorization metadata: ", kExpectedHeader));
  }
  return Sha256Hex(token);
}

std::optional<Authenticator::Kind> Authenticator::Classify(const std::string& digest,
                                                           std::string* tenant) const {
  if (!worker_token_digest_.empty() && digest == worker_token_digest_) return Kind::kWorker;
  if (auto it = client_tokens_.find(digest); it != client_tokens_.end()) {
    *tenant = it->second;
    return Kind::kClient;
  }
  return std::nullopt;
}

absl::StatusOr<std::string> Authenticator::AuthenticateClient(
    std::optional<std::string_view> authorization) const {
  if (!enabled()) return std::string();
  auto digest = TokenDigest(authorization);
  if (!digest.ok()) return digest.status();
  std::string tenant;
  const std::optional<Kind> kind = Classify(*digest, &tenant);
  if (!kind.has_value()) return absl::UnauthenticatedError("unknown token");
  if (*kind != Kind::kClient) {
    return absl::PermissionDeniedError(
        "the worker token may call qforge.v1.WorkerService only, not qforge.v1.JobService");
  }
  return tenant;
}

absl::Status Authenticator::AuthenticateWorker(
    std::optional<std::string_view> authorization) const {
  if (!enabled()) return absl::OkStatus();
  auto digest = TokenDigest(authorization);
  if (!digest.ok()) return digest.status();
  std::string tenant;
  const std::optional<Kind> kind = Classify(*digest, &tenant);
  if (!kind.has_value()) return absl::UnauthenticatedError("unknown token");
  if (*kind != Kind::kWorker) {
    return absl::PermissionDeniedError(
        "a client token may call qforge.v1.JobService only, not qforge.v1.WorkerService");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<std::string_view>> Authenticator::AuthorizationHeader(
    const grpc::ServerContextBase& context) {
  const auto& metadata = context.client_metadata();
  auto [begin, end] = metadata.equal_range("authorization");
  if (begin == end) return std::optional<std::string_view>();
  if (std::next(begin) != end) {
    return absl::UnauthenticatedError("authorization metadata given more than once");
  }
  return std::optional<std::string_view>(
      std::string_view(begin->second.data(), begin->second.size()));
}

absl::StatusOr<std::string> Authenticator::AuthenticateClient(
    const grpc::ServerContextBase& context) const {
  if (!enabled()) return std::string();
  auto header = AuthorizationHeader(context);
  if (!header.ok()) return header.status();
  return AuthenticateClient(*header);
}

absl::Status Authenticator::AuthenticateWorker(const grpc::ServerContextBase& context) const {
  if (!enabled()) return absl::OkStatus();
  auto header = AuthorizationHeader(context);
  if (!header.ok()) return header.status();
  return AuthenticateWorker(*header);
}

}  // namespace qforge

#include "common/uri.h"

#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace qforge {
namespace {

// `s3://b/p/k.safetensors?endpoint=e` -> {store "s3://b/p?endpoint=e", key "k.safetensors"}:
// the query (endpoint, region) belongs to the store.
absl::StatusOr<ObjectUri> SplitS3ObjectUri(std::string_view uri) {
  std::string_view path = uri.substr(5);
  std::string_view query;
  if (const size_t q = path.find('?'); q != std::string_view::npos) {
    query = path.substr(q);
    path = path.substr(0, q);
  }
  const size_t slash = path.rfind('/');
  if (path.empty() || path.back() == '/' || slash == std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "object URI '", std::string(uri), "' names a bucket or directory, expected an object "
        "(s3://bucket/path/file)"));
  }
  ObjectUri out;
  out.store_uri = absl::StrCat("s3://", std::string(path.substr(0, slash)), std::string(query));
  out.key = std::string(path.substr(slash + 1));
  return out;
}

}  // namespace

absl::StatusOr<ObjectUri> SplitObjectUri(std::string_view uri) {
  if (uri.empty()) return absl::InvalidArgumentError("empty object URI");
  std::string_view scheme_prefix;
  std::string_view path = uri;
  const size_t scheme_end = uri.find("://");
  if (uri.substr(0, 5) == "s3://") return SplitS3ObjectUri(uri);
  if (scheme_end != std::string_view::npos) {
    if (uri.substr(0, scheme_end) != "file") {
      return absl::InvalidArgumentError(absl::StrCat("unsupported URI scheme '",
                                                     std::string(uri.substr(0, scheme_end)),
                                                     "' in '", std::string(uri),
                                                     "' (supported: file://, s3://, or a plain path)"));
    }
    scheme_prefix = uri.substr(0, scheme_end + 3);
    path = uri.substr(scheme_end + 3);
  }
  if (path.empty() || path.back() == '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("object URI '", std::string(uri), "' names a directory, expected a file"));
  }
  const size_t slash = path.rfind('/');
  ObjectUri out;
  if (slash == std::string_view::npos) {
    out.store_uri = ".";
    out.key = std::string(path);
  } else {
    std::string_view dir = path.substr(0, slash);
    out.store_uri = std::string(scheme_prefix) + (dir.empty() ? std::string("/") : std::string(dir));
    out.key = std::string(path.substr(slash + 1));
  }
  return out;
}

absl::StatusOr<std::string> AbsoluteLocalUri(std::string_view uri) {
  if (uri.empty() || uri.find("://") != std::string_view::npos || uri.front() == '/') {
    return std::string(uri);
  }
  std::error_code ec;
  const std::filesystem::path cwd = std::filesystem::current_path(ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot make the relative path '", std::string(uri),
                                            "' absolute: the working directory is unreadable (",
                                            ec.message(), ")"));
  }
  std::string out = (cwd / std::filesystem::path(std::string(uri))).lexically_normal().string();
  // "." and "a/.." normalize to "<dir>/": drop that '/', keep one the caller wrote.
  if (uri.back() != '/') {
    while (out.size() > 1 && out.back() == '/') out.pop_back();
  }
  return out;
}

}  // namespace qforge

#include "server/file_uri_access.h"

#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/local_store.h"
#include "job/staging_layout.h"

namespace qforge {
namespace {

namespace fs = std::filesystem;

absl::Status NotEmpty(const std::string& output_uri) {
  return absl::InvalidArgumentError(absl::StrCat(
      "spec.output_uri: ", output_uri,
      " is not empty (it holds objects other than qforge staging files); give an empty or new "
      "output prefix"));
}

absl::Status OutputError(const std::string& output_uri, const absl::Status& s) {
  const std::string msg = absl::StrCat("spec.output_uri: ", output_uri, ": ", s.message());
  if (absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s)) return absl::Status(s.code(), msg);
  return absl::InvalidArgumentError(msg);
}

}  // namespace

std::optional<std::string> LocalDirectoryOfUri(std::string_view uri) {
  const size_t scheme_end = uri.find("://");
  if (scheme_end == std::string_view::npos) return std::string(uri);
  if (uri.substr(0, scheme_end) != "file") return std::nullopt;
  std::string_view rest = uri.substr(scheme_end + 3);
  if (rest.substr(0, 9) == "localhost") rest.remove_prefix(9);
  return std::string(rest);
}

StoreOpener NonCreatingOpener(StoreOpener inner) {
  return [inner = std::move(inner)](
             std::string_view uri) -> absl::StatusOr<std::unique_ptr<ObjectStore>> {
    if (std::optional<std::string> dir = LocalDirectoryOfUri(uri); dir && !dir->empty()) {
      std::error_code ec;
      const fs::file_status st = fs::status(*dir, ec);
      if (!fs::exists(st)) {
        return absl::NotFoundError(absl::StrCat(std::string(uri), ": the directory does not exist; check the path, or create it first"));
      }
      if (!fs::is_directory(st)) {
        return absl::InvalidArgumentError(absl::StrCat(std::string(uri), ": not a directory"));
      }
    }
    return inner(uri);
  };
}

absl::Status CheckOutputEmpty(const StoreOpener& open_store, const std::string& output_uri) {
  if (output_uri.empty()) return absl::OkStatus();
  if (std::optional<std::string> dir = LocalDirectoryOfUri(output_uri); dir && !dir->empty()) {
    std::error_code ec;
    const fs::file_status st = fs::status(*dir, ec);
    if (!fs::exists(st)) return absl::OkStatus();  // created when the job writes
    if (!fs::is_directory(st)) return NotEmpty(output_uri);
    // Depth-first, links not followed; stops at the first object that is not staging.
    fs::recursive_directory_iterator it(*dir, fs::directory_options::none, ec);
    if (ec) {
      return OutputError(output_uri, absl::PermissionDeniedError(absl::StrCat(
                                         "cannot list the directory: ", ec.message())));
    }
    for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (ec) {
        return OutputError(output_uri, absl::PermissionDeniedError(absl::StrCat(
                                           "cannot list the directory: ", ec.message())));
      }
      const fs::path& p = it->path();
      if (it.depth() == 0 && p.filename() == kStagingRoot) {
        it.disable_recursion_pending();
        continue;
      }
      std::error_code type_ec;
      if (it->is_directory(type_ec) && !it->is_symlink(type_ec)) continue;
      if (LocalStore::IsTempFileName(p.filename().string())) continue;
      return NotEmpty(output_uri);
    }
    if (ec) {
      return OutputError(output_uri, absl::PermissionDeniedError(absl::StrCat(
                                         "cannot list the directory: ", ec.message())));
    }
    return absl::OkStatus();
  }
  auto store = open_store(output_uri);
  if (!store.ok()) return OutputError(output_uri, store.status());
  auto listing = (*store)->List("");
  if (!listing.ok()) return OutputError(output_uri, listing.status());
  for (const ObjectInfo& o : *listing) {
    if (!IsStagingKey(o.key)) return NotEmpty(output_uri);
  }
  return absl::OkStatus();
}

}  // namespace qforge

// Store-independent parts of the ObjectStore contract: key validation, key joining,
// ReadAll and the URI dispatch of OpenObjectStore.
#include "common/object_store.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/absl_compat.h"
#include "common/fault_point.h"
#include "common/local_store.h"
#include "common/s3_settings.h"
#include "common/s3_store.h"
#include "base/status_macros.h"

namespace qforge {
namespace {

constexpr size_t kMaxKeyBytes = 1024;

// Decodes one UTF-8 sequence starting at s[i]. Returns its length (1..4) and the code point
// in *cp, or 0 if the bytes are not a well-formed, shortest-form encoding of a Unicode scalar
// value (rejects overlong forms, surrogates and values above U+10FFFF).
size_t DecodeUtf8(std::string_view s, size_t i, uint32_t* cp) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b0 = byte(i);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t len;
  uint32_t min;
  uint32_t value;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, min = 0x80, value = b0 & 0x1Fu;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, min = 0x800, value = b0 & 0x0Fu;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, min = 0x10000, value = b0 & 0x07u;
  } else {
    return 0;  // continuation byte or 0xF8..0xFF in lead position
  }
  if (i + len > s.size()) return 0;
  for (size_t k = 1; k < len; ++k) {
    const unsigned char b = byte(i + k);
    if ((b & 0xC0) != 0x80) return 0;
    value = (value << 6) | (b & 0x3Fu);
  }
  if (value < min || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return 0;
  *cp = value;
  return len;
}

absl::Status KeyError(std::string_view key, std::string_view rule) {
  // The key may hold control characters or invalid UTF-8: quote it C-escaped.
  return absl::InvalidArgumentError(
      absl::StrFormat("invalid object key \"%s\": %s", absl::CHexEscape(Sv(key)), rule));
}

}  // namespace

absl::Status ValidateObjectKey(std::string_view key) {
  if (key.empty()) return absl::InvalidArgumentError("invalid object key \"\": the key is empty");
  if (key.size() > kMaxKeyBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("invalid object key \"%s...\": %d bytes, the limit is %d",
                        absl::CHexEscape(Sv(key.substr(0, 64))), key.size(), kMaxKeyBytes));
  }
  for (size_t i = 0; i < key.size();) {
    uint32_t cp = 0;
    const size_t len = DecodeUtf8(key, i, &cp);
    if (len == 0) return KeyError(key, Cat("not valid UTF-8 at byte ", i));
    if (cp < 0x20 || cp == 0x7F || (cp >= 0x80 && cp <= 0x9F)) {
      return KeyError(key, absl::StrFormat("control character U+%04X at byte %d", cp, i));
    }
    if (cp == '\\') return KeyError(key, Cat("backslash at byte ", i));
    i += len;
  }
  if (key.front() == '/') return KeyError(key, "keys are relative: no leading '/'");
  if (key.back() == '/') return KeyError(key, "a trailing '/' names a directory, not an object");
  size_t start = 0;
  while (start <= key.size()) {
    size_t end = key.find('/', start);
    if (end == std::string_view::npos) end = key.size();
    const std::string_view segment = key.substr(start, end - start);
    if (segment.empty()) {
      return KeyError(key, Cat("empty path segment ('//') at byte ", start));
    }
    if (segment == "." || segment == "..") {
      return KeyError(key, Cat("'", segment, "' path segment at byte ", start));
    }
    start = end + 1;
  }
  return absl::OkStatus();
}

std::string JoinKey(std::string_view a, std::string_view b) {
  while (!a.empty() && a.back() == '/') a.remove_suffix(1);
  while (!b.empty() && b.front() == '/') b.remove_prefix(1);
  if (a.empty()) return std::string(b);
  if (b.empty()) return std::string(a);
  return Cat(a, "/", b);
}

absl::Status ObjectStore::Rename(std::string_view from, std::string_view to) {
  return absl::UnimplementedError(Cat("cannot rename object '", from, "' to '", to, "' in ",
                                      uri(), ": this store has no atomic rename"));
}

absl::Status ObjectStore::Copy(std::string_view from, std::string_view to) {
  return absl::UnimplementedError(Cat("cannot copy object '", from, "' to '", to, "' in ",
                                      uri(), ": this store has no server-side copy"));
}

absl::StatusOr<std::string> ObjectStore::ReadAll(std::string_view key) {
  // Stat, read, and stat again: a concurrent replacement between the calls would otherwise
  // yield a prefix of a longer new version. A read is retried while the size keeps changing.
  constexpr int kAttempts = 4;
  uint64_t last_size = 0;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    QF_ASSIGN_OR_RETURN(ObjectInfo before, Stat(key));
    last_size = before.size;
    std::string out;
    absl::Status s = ReadRange(key, 0, before.size, &out);
    if (absl::IsOutOfRange(s) || absl::IsDataLoss(s)) continue;  // shrank meanwhile
    QF_RETURN_IF_ERROR(s);
    QF_ASSIGN_OR_RETURN(ObjectInfo after, Stat(key));
    if (after.size == before.size) return out;
  }
  return absl::DataLossError(Cat("object '", key, "' in ", uri(),
                                 " kept changing size while being read (", kAttempts,
                                 " attempts, last size ", last_size, " bytes)"));
}

namespace {

absl::StatusOr<std::unique_ptr<ObjectStore>> OpenUnwrapped(std::string_view uri,
                                                           const S3Options& s3) {
  if (uri.empty()) return absl::InvalidArgumentError("empty object store URI");
  const size_t scheme_end = uri.find("://");
  if (scheme_end == std::string_view::npos) {
    // A plain path (absolute or relative to the working directory).
    QF_ASSIGN_OR_RETURN(std::unique_ptr<LocalStore> store, LocalStore::Open(uri));
    return std::unique_ptr<ObjectStore>(std::move(store));
  }
  const std::string_view scheme = uri.substr(0, scheme_end);
  if (scheme == "s3") {
    QF_ASSIGN_OR_RETURN(std::unique_ptr<S3Store> store, S3Store::Open(uri, s3));
    return std::unique_ptr<ObjectStore>(std::move(store));
  }
  if (scheme != "file") {
    return absl::InvalidArgumentError(
        Cat("unsupported object store URI scheme '", scheme, "' in '", uri,
            "': supported are file:///absolute/dir, s3://bucket/prefix and plain local paths"));
  }
  std::string_view rest = uri.substr(scheme_end + 3);
  // file://localhost/abs is the same as file:///abs (RFC 8089); other hosts are not local.
  if (rest.substr(0, 9) == "localhost") rest.remove_prefix(9);
  if (rest.empty() || rest.front() != '/') {
    return absl::InvalidArgumentError(Cat(
        "malformed file URI '", uri,
        "': expected file:///absolute/dir (an empty or 'localhost' host and an absolute path)"));
  }
  if (rest.find_first_of("?#") != std::string_view::npos) {
    return absl::InvalidArgumentError(
        Cat("malformed file URI '", uri, "': file URIs take no query or fragment ('?', '#')"));
  }
  QF_ASSIGN_OR_RETURN(std::unique_ptr<LocalStore> store, LocalStore::Open(rest));
  return std::unique_ptr<ObjectStore>(std::move(store));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ObjectStore>> OpenObjectStore(std::string_view uri) {
  if (StartsWith(uri, "s3://")) {
    QF_ASSIGN_OR_RETURN(S3Options s3, ResolveS3Options(S3Settings{}));
    return OpenObjectStore(uri, s3);
  }
  return OpenObjectStore(uri, S3Options{});
}

absl::StatusOr<std::unique_ptr<ObjectStore>> OpenObjectStore(std::string_view uri,
                                                             const S3Options& s3) {
  QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectStore> store, OpenUnwrapped(uri, s3));
  return WrapStoreForFaults(std::move(store));  // the store itself outside fault tests
}

}  // namespace qforge

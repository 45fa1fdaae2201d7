#include "common/object_digest.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/sha256.h"

namespace qforge {

bool IsSha256Hex(std::string_view hex) {
  if (hex.size() != 64) return false;
  return std::all_of(hex.begin(), hex.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

absl::StatusOr<ObjectDigest> DigestObject(ObjectStore& store, std::string_view key,
                                          uint64_t chunk_bytes) {
  chunk_bytes = std::max<uint64_t>(1, chunk_bytes);
  QF_ASSIGN_OR_RETURN(ObjectInfo before, store.Stat(key));
  Sha256 hash;
  std::string buf;
  for (uint64_t off = 0; off < before.size; off += chunk_bytes) {
    const uint64_t n = std::min(chunk_bytes, before.size - off);
    absl::Status s = store.ReadRange(key, off, n, &buf);
    if (absl::IsOutOfRange(s)) {
      return absl::DataLossError(Cat("object '", key, "' in ", store.uri(),
                                     " shrank while it was being hashed (", before.size,
                                     " bytes at the start): ", s.message()));
    }
    QF_RETURN_IF_ERROR(s);
    hash.Update(buf);
  }
  QF_ASSIGN_OR_RETURN(ObjectInfo after, store.Stat(key));
  if (after.size != before.size) {
    return absl::DataLossError(Cat("object '", key, "' in ", store.uri(),
                                   " changed size while it was being hashed (", before.size,
                                   " bytes, then ", after.size, ")"));
  }
  return ObjectDigest{before.size, hash.HexDigest()};
}

absl::Status VerifyObjectDigest(ObjectStore& store, std::string_view key,
                                const ObjectDigest& expected, uint64_t chunk_bytes) {
  if (!IsSha256Hex(expected.sha256)) {
    return absl::InvalidArgumentError(
        Cat("the expected sha256 of object '", key, "' ('", expected.sha256.substr(0, 80),
            "') is not 64 lowercase hex digits"));
  }
  QF_ASSIGN_OR_RETURN(ObjectInfo info, store.Stat(key));
  if (info.size != expected.size) {
    return absl::DataLossError(Cat("object '", key, "' in ", store.uri(), " holds ", info.size,
                                   " bytes, but ", expected.size, " were reported for it"));
  }
  QF_ASSIGN_OR_RETURN(ObjectDigest actual, DigestObject(store, key, chunk_bytes));
  if (actual.size != expected.size || actual.sha256 != expected.sha256) {
    return absl::DataLossError(Cat("object '", key, "' in ", store.uri(), " has sha256 ",
                                   actual.sha256, " (", actual.size, " bytes), but ",
                                   expected.sha256, " (", expected.size,
                                   " bytes) was reported for it: it changed after it was written"));
  }
  return absl::OkStatus();
}

}  // namespace qforge

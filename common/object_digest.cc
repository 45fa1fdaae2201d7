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

namespace {

// Hashes the `size` bytes of `key` (its size from a Stat just before) in reads of at most
// `chunk_bytes` and checks with a second Stat that the size still holds (DigestObject's
// contract).
absl::StatusOr<ObjectDigest> HashObject(ObjectStore& store, std::string_view key, uint64_t size,
                                        uint64_t chunk_bytes) {
  chunk_bytes = std::max<uint64_t>(1, chunk_bytes);
  Sha256 hash;
  std::string buf;
  for (uint64_t off = 0; off < size; off += chunk_bytes) {
    const uint64_t n = std::min(chunk_bytes, size - off);
    absl::Status s = store.ReadRange(key, off, n, &buf);
    if (absl::IsOutOfRange(s)) {
      return absl::DataLossError(Cat("object '", key, "' in ", store.uri(),
                                     " shrank while it was being hashed (", size,
                                     " bytes at the start): ", s.message()));
    }
    QF_RETURN_IF_ERROR(s);
    hash.Update(buf);
  }
  QF_ASSIGN_OR_RETURN(ObjectInfo after, store.Stat(key));
  if (after.size != size) {
    return absl::DataLossError(Cat("object '", key, "' in ", store.uri(),
                                   " changed size while it was being hashed (", size,
                                   " bytes, then ", after.size, ")"));
  }
  return ObjectDigest{size, hash.HexDigest()};
}

}  // namespace

absl::StatusOr<ObjectDigest> DigestObject(ObjectStore& store, std::string_view key,
                                          uint64_t chunk_bytes) {
  QF_ASSIGN_OR_RETURN(ObjectInfo before, store.Stat(key));
  return HashObject(store, key, before.size, chunk_bytes);
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
  QF_ASSIGN_OR_RETURN(ObjectDigest actual, HashObject(store, key, info.size, chunk_bytes));
  if (actual.size != expected.size || actual.sha256 != expected.sha256) {
    return absl::DataLossError(Cat("object '", key, "' in ", store.uri(), " has sha256 ",
                                   actual.sha256, " (", actual.size, " bytes), but ",
                                   expected.sha256, " (", expected.size,
                                   " bytes) was reported for it: it changed after it was written"));
  }
  return absl::OkStatus();
}

}  // namespace qforge

// Size and SHA-256 of a stored object, computed by streaming it through a bounded buffer
// (memory: one chunk, whatever the object's size), and the check of an object against the
// digest its writer reported. The coordinator uses them to verify a staged output before it
// accepts a task's completion, the assembler again before it copies a staged layer.
//
// Thread-safety: pure functions over a store (as thread-safe as the store).
#ifndef QFORGE_COMMON_OBJECT_DIGEST_H_
#define QFORGE_COMMON_OBJECT_DIGEST_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"

namespace qforge {

struct ObjectDigest {
  uint64_t size = 0;   // bytes
  std::string sha256;  // lowercase hex, 64 characters
};

// Streams `key` of `store` in reads of at most `chunk_bytes` (>= 1) and hashes it. The size
// is taken by Stat before the read and must still hold after it: an object that changes size
// meanwhile is DATA_LOSS (as is a read that runs past its end). The store's errors otherwise
// (NOT_FOUND naming the key, UNAVAILABLE, ...).
absl::StatusOr<ObjectDigest> DigestObject(ObjectStore& store, std::string_view key,
                                          uint64_t chunk_bytes = 8ull << 20);

// Checks `key` of `store` against `expected`: its size first (Stat, no read when it differs),
// then its streamed SHA-256. DATA_LOSS naming the key, the store and both values when they
// differ; INVALID_ARGUMENT when expected.sha256 is not 64 lowercase hex digits; the store's
// errors (DigestObject) otherwise.
absl::Status VerifyObjectDigest(ObjectStore& store, std::string_view key,
                                const ObjectDigest& expected, uint64_t chunk_bytes = 8ull << 20);

// Whether `hex` is a SHA-256 digest as ObjectDigest holds it (64 lowercase hex digits).
bool IsSha256Hex(std::string_view hex);

}  // namespace qforge

#endif  // QFORGE_COMMON_OBJECT_DIGEST_H_

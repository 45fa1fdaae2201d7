// ObjectStore: qforge's one interface to bytes at rest (our leveldb `Env`).
//
// A store is rooted at a URI (`file:///abs/dir`, `s3://bucket/prefix?endpoint=...`); keys
// are relative to that root, '/'-separated, validated by ValidateObjectKey before any I/O.
// Implementations: LocalStore (file://, local_store.h), S3Store (s3://, s3_store.h), MemStore
// (mem_store.h, tests), ForwardingStore (a wrapper base so tests override one call for fault
// injection).
//
// Error codes: NOT_FOUND (no such key), INVALID_ARGUMENT (bad key or URI), OUT_OF_RANGE
// (a read past the end of an object), UNAVAILABLE (I/O errors that a retry may fix),
// DATA_LOSS (an object changed size while being read), UNIMPLEMENTED (an optional call,
// Rename or Copy, that this store lacks), INTERNAL (everything else); S3Store adds
// PERMISSION_DENIED and UNAUTHENTICATED.
// Every message names the key (and store root) it concerns.
//
// Thread-safety: all methods of every implementation may be called concurrently.
// A put is atomic: readers see either the old object or the whole new one, never a prefix.
#ifndef QFORGE_COMMON_OBJECT_STORE_H_
#define QFORGE_COMMON_OBJECT_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qforge {

struct S3Options;  // s3_client.h

struct ObjectInfo {
  std::string key;    // relative to the store root
  uint64_t size = 0;  // bytes
  // Changes whenever the object is rewritten (set by Stat; List may leave it ""): file://
  // "mtime:<ns>.<inode>", s3:// "etag:<ETag>"; "" when the store cannot
  // tell. Pinned at submit for source shards and checked by workers before they read.
  std::string version;
};

// A streaming put. Bytes appended are invisible until Close() succeeds, at which point the
// whole object appears atomically under its key (replacing any older object). Destroying a
// writer without a successful Close() discards everything (no partial object, no temp file).
class ObjectWriter {
 public:
  virtual ~ObjectWriter() = default;
  virtual absl::Status Append(std::string_view data) = 0;
  // Publishes the object. After Close (successful or not) the writer accepts no more calls.
  virtual absl::Status Close() = 0;
  // Bytes appended so far.
  virtual uint64_t bytes_written() const = 0;
};

class ObjectStore {
 public:
  virtual ~ObjectStore() = default;

  // The URI this store is rooted at, for messages and manifests.
  virtual std::string uri() const = 0;

  virtual absl::StatusOr<ObjectInfo> Stat(std::string_view key) = 0;

  // Reads bytes [offset, offset + length) of `key` into *out (replacing its contents).
  // OUT_OF_RANGE if offset + length exceeds the object's size (nothing partial is returned).
  virtual absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                                 std::string* out) = 0;

  // Atomically creates or replaces `key` with `data`.
  virtual absl::Status Put(std::string_view key, std::string_view data) = 0;

  // Starts a streaming put of `key` (see ObjectWriter).
  virtual absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) = 0;

  // All objects whose key starts with `prefix` (a plain string prefix, "" lists everything),
  // sorted by key. Temporary files of in-flight puts are never listed.
  virtual absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) = 0;

  // Removes `key`. Deleting a key that does not exist is OK (idempotent).
  virtual absl::Status Delete(std::string_view key) = 0;

  // Removes every object whose key starts with `prefix` (a plain string prefix, as List), the
  // leftovers of interrupted puts to such keys (LocalStore: the temp files of a writer that was
  // killed before Close), and the directories this leaves empty. Idempotent: OK when nothing
  // matches. INVALID_ARGUMENT for an empty prefix (it would empty the store). An object put
  // under the prefix while this runs may survive.
  virtual absl::Status DeletePrefix(std::string_view prefix) = 0;

  // Whether Rename is available: an atomic move of one object inside this store (LocalStore:
  // rename(2); MemStore). Stores without it (object stores such as S3 have only copy +
  // delete) answer false, and their Rename is UNIMPLEMENTED; callers that publish by rename
  // fall back to writing in place with a marker written last.
  virtual bool SupportsRename() const { return false; }

  // Atomically moves object `from` to key `to`, replacing any object at `to`: readers see the
  // old `to` (or nothing) or the whole moved object, never a prefix; `from` is gone after a
  // successful call. Missing parent "directories" of `to` are created, and those `from` leaves
  // empty are removed (as Delete does). NOT_FOUND when `from` is no object; INVALID_ARGUMENT
  // for a bad key; FAILED_PRECONDITION when `to` collides with a directory (or a parent of it
  // is an object); UNIMPLEMENTED where SupportsRename() is false; I/O errors as for Put.
  virtual absl::Status Rename(std::string_view from, std::string_view to);

  // Whether Copy is a server-side copy (S3: CopyObject / UploadPartCopy; the bytes do not pass
  // through this process). Stores with Rename answer false: they publish by rename.
  virtual bool SupportsCopy() const { return false; }

  // Copies object `from` to key `to` inside this store, replacing any object at `to`: readers
  // see the old `to` (or nothing) or the whole copy, never a prefix; `from` stays. NOT_FOUND
  // when `from` is no object; UNIMPLEMENTED where SupportsCopy() is false; I/O errors as for
  // Put.
  virtual absl::Status Copy(std::string_view from, std::string_view to);

  // Convenience: the whole object.
  absl::StatusOr<std::string> ReadAll(std::string_view key);
};

// Checks that `key` is a valid relative object key: non-empty, at most 1024 bytes, valid
// UTF-8 without control characters or backslashes, no leading or trailing '/', no empty
// segment ("a//b"), no "." or ".." segment. INVALID_ARGUMENT naming the key and the rule.
absl::Status ValidateObjectKey(std::string_view key);

// Joins key segments with '/', ignoring empty parts ("a/", "b" -> "a/b"); does not validate.
std::string JoinKey(std::string_view a, std::string_view b);

// Opens the store rooted at `uri`. Supported: `file:///absolute/dir` (the directory is
// created if missing), a plain absolute or relative path (treated as file://) and
// `s3://bucket/prefix[?endpoint=...&region=...]` (S3Store, s3_store.h) with `s3` as the S3
// options below the URI's parameters (the caller resolved them with ResolveS3Options,
// s3_settings.h). The one-argument form resolves them from the environment alone.
// INVALID_ARGUMENT for an unsupported scheme or malformed URI.
absl::StatusOr<std::unique_ptr<ObjectStore>> OpenObjectStore(std::string_view uri);
absl::StatusOr<std::unique_ptr<ObjectStore>> OpenObjectStore(std::string_view uri,
                                                             const S3Options& s3);

}  // namespace qforge

#endif  // QFORGE_COMMON_OBJECT_STORE_H_

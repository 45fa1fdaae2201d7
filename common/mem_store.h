// MemStore: an in-memory ObjectStore for tests (and leveldb's NewMemEnv in spirit).
//
// Semantics match LocalStore, so code tested against it behaves the same on disk: keys are
// checked with ValidateObjectKey; a key cannot be both an object and a "directory" of other
// objects (Put("a/b") while "a" exists, or Put("a") while "a/b" exists, is
// FAILED_PRECONDITION, as it is on a filesystem); writers publish atomically on Close() and
// leave nothing behind when destroyed unclosed; List is sorted by key; Delete is idempotent;
// Rename is atomic (one lock).
// uri() is `mem://<name>`. Objects live as long as the store.
//
// Thread-safety: all methods may be called concurrently (one mutex guards the map). An
// ObjectWriter is used by one thread at a time and must not outlive its store.
#ifndef QFORGE_COMMON_MEM_STORE_H_
#define QFORGE_COMMON_MEM_STORE_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"

namespace qforge {

class MemStore final : public ObjectStore {
 public:
  explicit MemStore(std::string name = "test") : name_(std::move(name)) {}

  std::string uri() const override { return "mem://" + name_; }
  absl::StatusOr<ObjectInfo> Stat(std::string_view key) override;
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override;
  absl::Status Put(std::string_view key, std::string_view data) override;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override;
  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override;
  absl::Status Delete(std::string_view key) override;
  absl::Status DeletePrefix(std::string_view prefix) override;
  bool SupportsRename() const override { return true; }
  absl::Status Rename(std::string_view from, std::string_view to) override;

  // Number of objects and their total size (for tests that check nothing leaked).
  size_t object_count() const;
  uint64_t total_bytes() const;

 private:
  // Inserts or replaces `key` (already validated), checking key/directory collisions.
  absl::Status Publish(const std::string& key, std::string data);
  // FAILED_PRECONDITION when `key` cannot be an object: a parent is an object, or objects
  // lie below `key/`.
  absl::Status CheckCollisionLocked(const std::string& key) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string name_;
  mutable std::mutex mu_;
  std::map<std::string, std::string, std::less<>> objects_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qforge

#endif  // QFORGE_COMMON_MEM_STORE_H_

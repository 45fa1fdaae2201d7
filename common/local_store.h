// LocalStore: the ObjectStore over a local directory (`file:///abs/dir`), the embedded
// default of the coordinator and the worker.
//
// Layout: key "a/b/c" is the file <root>/a/b/c. Every key is checked with ValidateObjectKey
// before any I/O, and its resolved path must stay under the root: a key whose existing
// parent directories (or the object itself, for reads) resolve through a symbolic link to a
// place outside the root is refused with PERMISSION_DENIED. This is a best-effort check
// (realpath of what exists at call time), not a defence against a concurrent attacker who
// can rewrite the root's directories.
//
// Writes: Put and NewWriter write `.<name>.tmp-<16 hex>` in the target's directory, fsync
// it, and rename it over the target, so readers see the old object or the whole new one.
// Parent directories are created as needed. Temp files are never listed; a crashed process
// can leave one behind (they are safe to delete; List skips them).
//
// List walks the directory tree under the prefix's directory part, sorted by key, skipping
// temp files, names that are not valid keys, and symbolic links to directories (they are
// not followed, so a link cycle cannot make List loop); links to files inside the root are
// listed. Delete is idempotent and removes directories it leaves empty, up to (excluding)
// the root, so deleting every object under a prefix leaves no directories behind.
//
// Errors: errno is mapped to canonical codes: ENOENT/ENOTDIR/EISDIR on reads -> NOT_FOUND,
// EACCES/EPERM/EROFS -> PERMISSION_DENIED, ENOSPC/EDQUOT/EMFILE/ENFILE/ENOMEM ->
// RESOURCE_EXHAUSTED, EIO/EAGAIN/EINTR/ESTALE/ETIMEDOUT/EBUSY -> UNAVAILABLE,
// ENAMETOOLONG -> INVALID_ARGUMENT, a key colliding with a directory (or a parent that is
// an object) on writes -> FAILED_PRECONDITION, anything else INTERNAL. Messages name the
// key, the path and the operation.
//
// Thread-safety: all methods may be called concurrently (the store holds no mutable
// state). An ObjectWriter is used by one thread at a time.
#ifndef QFORGE_COMMON_LOCAL_STORE_H_
#define QFORGE_COMMON_LOCAL_STORE_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"

namespace qforge {

struct LocalStoreOptions {
  // fsync the data before the rename that publishes an object, and the directory after it.
  // Turning it off trades durability across a power loss for speed (tests, scratch stores);
  // atomicity towards readers is kept either way.
  bool sync = true;
  // Create the root directory (and its parents) when it does not exist.
  bool create_root = true;
};

class LocalStore final : public ObjectStore {
 public:
  // Opens the store rooted at `root_dir` (absolute, or relative to the working directory).
  // The root is made absolute and canonical (symbolic links resolved), so uri() is
  // `file://<canonical root>`. NOT_FOUND if the root is missing and create_root is false;
  // FAILED_PRECONDITION if it is not a directory; errno-mapped codes otherwise.
  static absl::StatusOr<std::unique_ptr<LocalStore>> Open(std::string_view root_dir,
                                                          LocalStoreOptions options = {});

  ~LocalStore() override;

  // The canonical absolute root directory (no trailing '/', except for "/" itself).
  const std::string& root() const { return root_; }

  std::string uri() const override;
  absl::StatusOr<ObjectInfo> Stat(std::string_view key) override;
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override;
  absl::Status Put(std::string_view key, std::string_view data) override;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override;
  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override;
  absl::Status Delete(std::string_view key) override;
  // Also removes the temp files (`.<name>.tmp-<16 hex>`) of puts to keys under `prefix` that a
  // killed writer left behind, then the directories left empty up to (excluding) the root.
  absl::Status DeletePrefix(std::string_view prefix) override;
  // rename(2) of `from`'s file over `to`'s (an object: a regular file or a symbolic link;
  // a directory is NOT_FOUND), with `to`'s parent directories created first and `from`'s
  // left empty removed; with options.sync both directories are fsynced after it.
  bool SupportsRename() const override { return true; }
  absl::Status Rename(std::string_view from, std::string_view to) override;

  // True for the names of LocalStore temp files (`.<name>.tmp-<16 hex digits>`).
  static bool IsTempFileName(std::string_view basename);

 private:
  LocalStore(std::string root, int root_fd, LocalStoreOptions options)
      : root_(std::move(root)), root_fd_(root_fd), options_(options) {}

  // Reads (Stat, ReadRange): opens `key` (validated) with `flags`, resolved by the kernel
  // inside the root in one call (openat2 RESOLVE_BENEATH from root_fd_: a path that
  // leaves the root fails instead of being followed), the descriptor or -errno. -EXDEV
  // also for an absolute link that points back inside the root, and -ENOSYS where openat2
  // is missing: the caller then decides by Resolve, as before.
  int OpenBeneath(std::string_view key, int flags) const;

  // Validates `key` and returns <root>/<key>. With `check_object`, the object's own path is
  // also resolved (reads: a symlink leaving the root is refused); otherwise only the
  // deepest existing ancestor directory is (writes and deletes replace or remove the link
  // itself, never its target).
  absl::StatusOr<std::string> Resolve(std::string_view key, bool check_object) const;
  // PERMISSION_DENIED unless the canonical form of `path` is the root or below it.
  absl::Status CheckInsideRoot(std::string_view key, const std::string& path) const;
  // Creates the directories between the root and `path`'s parent.
  absl::Status MakeParents(std::string_view key, const std::string& path) const;
  // Removes `dir` and its parents while they are empty, stopping at the root.
  void RemoveEmptyDirs(std::string dir) const;
  // DeletePrefix's walk of `dir` (the directory of key `key_dir`).
  absl::Status DeleteUnder(const std::string& dir, const std::string& key_dir,
                           std::string_view prefix) const;
  absl::Status Walk(const std::string& dir, const std::string& key_dir, std::string_view prefix,
                    std::vector<ObjectInfo>* out) const;

  friend class LocalObjectWriter;

  const std::string root_;
  const int root_fd_;  // O_PATH descriptor of root_; -1 when it could not be opened
  const LocalStoreOptions options_;
};

}  // namespace qforge

#endif  // QFORGE_COMMON_LOCAL_STORE_H_

// SqliteStateStore: the StateStore of one coordinator, in a SQLite file (embedded default:
// ./qforge-data/state.db). WAL journal (readers never block the writer), synchronous=NORMAL
// (a committed transition survives a process crash; the last ones may be lost on power
// failure), a busy timeout instead of immediate SQLITE_BUSY, foreign keys on.
//
// Schema: versioned by the one-row table `schema_version`; Open applies the missing
// migrations in order, each in its own transaction, and refuses (FAILED_PRECONDITION) a
// database whose version is newer than this binary knows. Tables: jobs, tasks, workers,
// events; the v1 messages are stored as serialized protobuf blobs next to the columns that
// are indexed or queried.
//
// WAL does not work on network filesystems: keep the file on a local or block volume.
//
// Thread-safety: thread-safe (one connection guarded by a mutex).
#ifndef QFORGE_SERVER_SQLITE_STATE_STORE_H_
#define QFORGE_SERVER_SQLITE_STATE_STORE_H_

#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/state_store.h"

struct sqlite3;
struct sqlite3_stmt;

namespace qforge {

struct SqliteStateStoreOptions {
  int busy_timeout_ms = 5000;  // wait this long for a lock held by another connection
  bool create_parent_dirs = true;  // create the file's directory when missing
};

class SqliteStateStore final : public StateStore {
 public:
  // The schema version this binary writes.
  static constexpr int kSchemaVersion = 4;

  // Opens (creating if missing) the database at `path` and migrates it.
  // UNAVAILABLE when it cannot be opened or is locked, FAILED_PRECONDITION for a newer
  // schema, INTERNAL for a failed migration. Messages name the path.
  static absl::StatusOr<std::unique_ptr<SqliteStateStore>> Open(
      std::string_view path, const SqliteStateStoreOptions& options = {});
  ~SqliteStateStore() override;

  SqliteStateStore(const SqliteStateStore&) = delete;
  SqliteStateStore& operator=(const SqliteStateStore&) = delete;

  absl::StatusOr<StateSnapshot> Load() override;
  absl::Status Apply(const StateMutation& mutation) override;
  absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(std::string_view job_id,
                                                       int64_t after_sequence,
                                                       int max_events) override;
  absl::StatusOr<std::vector<TaskRecord>> ReadTasks(std::string_view job_id) override;

  // The schema version found in the file after Open (kSchemaVersion).
  absl::StatusOr<int> SchemaVersion();
  const std::string& path() const { return path_; }

 private:
  SqliteStateStore(std::string path, sqlite3* db) : path_(std::move(path)), db_(db) {}
  absl::Status Migrate() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ApplyLocked(const StateMutation& mutation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string path_;
  absl::Mutex mu_;
  sqlite3* const db_ ABSL_GUARDED_BY(mu_);
  // Apply's statements, prepared once (keyed by their SQL constants); finalized on close.
  std::map<const char*, sqlite3_stmt*> statements_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qforge

#endif  // QFORGE_SERVER_SQLITE_STATE_STORE_H_

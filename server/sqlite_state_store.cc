#include "server/sqlite_state_store.h"

#include <sqlite3.h>

#include <filesystem>
#include <map>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"

namespace qforge {
namespace {

// Migration i (0-based) takes the schema from version i to i + 1. Append only: a released
// migration is never edited.
constexpr const char* kMigrations[] = {
    // v1: jobs, tasks, workers, events.
    R"sql(
CREATE TABLE jobs (
  id         TEXT PRIMARY KEY,
  tenant     TEXT NOT NULL,
  request_id TEXT NOT NULL,
  state      INTEGER NOT NULL,
  create_ms  INTEGER NOT NULL,
  settled    INTEGER NOT NULL,
  job        BLOB NOT NULL            -- qforge.v1.Job
);
CREATE UNIQUE INDEX jobs_by_request ON jobs(tenant, request_id) WHERE request_id <> '';
CREATE INDEX jobs_by_tenant ON jobs(tenant, create_ms);
CREATE TABLE tasks (
  id              TEXT PRIMARY KEY,
  job_id          TEXT NOT NULL REFERENCES jobs(id),
  ordinal         INTEGER NOT NULL,
  kind            INTEGER NOT NULL,
  state           INTEGER NOT NULL,
  attempt         INTEGER NOT NULL,
  memory_bytes    INTEGER NOT NULL,
  backends        TEXT NOT NULL,     -- comma-separated
  worker_id       TEXT NOT NULL,
  lease_token     TEXT NOT NULL,
  lease_expiry_ms INTEGER NOT NULL,
  not_before_ms   INTEGER NOT NULL,
  create_ms       INTEGER NOT NULL,
  queued_ms       INTEGER NOT NULL,
  start_ms        INTEGER NOT NULL,
  end_ms          INTEGER NOT NULL,
  staging_key     TEXT NOT NULL,
  output_key      TEXT NOT NULL,
  output_sha256   TEXT NOT NULL,
  output_bytes    INTEGER NOT NULL,
  layer           BLOB NOT NULL,     -- qforge.v1.LayerInput
  metrics         BLOB NOT NULL,     -- qforge.v1.TaskMetrics
  error           BLOB NOT NULL      -- qforge.v1.ErrorInfo
);
CREATE INDEX tasks_by_job ON tasks(job_id, ordinal);
CREATE TABLE workers (
  id              TEXT PRIMARY KEY,
  registration    BLOB NOT NULL,     -- qforge.v1.RegisterWorkerRequest
  registered_ms   INTEGER NOT NULL,
  last_seen_ms    INTEGER NOT NULL,
  tasks_completed INTEGER NOT NULL,
  tasks_failed    INTEGER NOT NULL
);
CREATE TABLE events (
  job_id   TEXT NOT NULL REFERENCES jobs(id),
  sequence INTEGER NOT NULL,
  time_ms  INTEGER NOT NULL,
  event    BLOB NOT NULL,            -- qforge.v1.JobEvent
  PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
)sql",
    // v2: the device-memory estimate of a QUANTIZE task (0 in rows written by v1; the
    // JobManager recomputes those when it loads them).
    R"sql(
ALTER TABLE tasks ADD COLUMN gpu_memory_bytes INTEGER NOT NULL DEFAULT 0;
)sql",
    // v3: a CALIBRATE or REDUCE task's inputs (qforge.v1.CalibrationWork; empty in rows
    // written before, which decode as an empty message).
    R"sql(
ALTER TABLE tasks ADD COLUMN calibration BLOB NOT NULL DEFAULT x'';
)sql",
    // v4: an EVALUATE or EVAL_REDUCE task's inputs (qforge.v1.EvaluationWork; empty in rows
    // written before, which decode as an empty message).
    R"sql(
ALTER TABLE tasks ADD COLUMN evaluation BLOB NOT NULL DEFAULT x'';
)sql",
};
static_assert(sizeof(kMigrations) / sizeof(kMigrations[0]) == SqliteStateStore::kSchemaVersion,
              "one migration per schema version");

absl::Status SqliteError(sqlite3* db, int rc, std::string_view what, std::string_view path) {
  const std::string msg = absl::StrCat("SQLite state store ", std::string(path), ": ",
                                       std::string(what), ": ",
                                       db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc),
                                       " (code ", rc, ")");
  switch (rc & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_PROTOCOL:
    case SQLITE_READONLY:
      return absl::UnavailableError(msg);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(msg);
    default:
      return absl::InternalError(msg);
  }
}

// A prepared statement; finalized on destruction, or, when it comes from `cache` (the
// store's statements by SQL text pointer: the constants of this file), reset and kept for
// the next transition.
class Stmt {
 public:
  Stmt(sqlite3* db, std::string_view path,
       std::map<const char*, sqlite3_stmt*>* cache = nullptr)
      : db_(db), path_(path), cache_(cache) {}
  ~Stmt() {
    if (cache_ == nullptr) {
      sqlite3_finalize(stmt_);
    } else if (stmt_ != nullptr) {
      sqlite3_reset(stmt_);
      sqlite3_clear_bindings(stmt_);
    }
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  absl::Status Prepare(const char* sql) {
    sql_ = sql;
    if (cache_ != nullptr) {
      auto it = cache_->find(sql);
      if (it != cache_->end()) {
        stmt_ = it->second;
        return absl::OkStatus();
      }
    }
    const int rc = sqlite3_prepare_v3(db_, sql, -1,
                                      cache_ != nullptr ? SQLITE_PREPARE_PERSISTENT : 0, &stmt_,
                                      nullptr);
    if (rc != SQLITE_OK) return SqliteError(db_, rc, absl::StrCat("preparing ", sql), path_);
    if (cache_ != nullptr) cache_->emplace(sql, stmt_);
    return absl::OkStatus();
  }
  void Bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }
  void Bind(int i, std::string_view v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  void BindBlob(int i, const std::string& v) {
    sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  // SQLITE_ROW -> true, SQLITE_DONE -> false.
  absl::StatusOr<bool> Step() {
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return SqliteError(db_, rc, absl::StrCat("executing ", FirstLine(sql_)), path_);
  }
  absl::Status Run() {
    QF_ASSIGN_OR_RETURN(bool row, Step());
    (void)row;
    return absl::OkStatus();
  }
  // Makes the statement runnable again with new bindings.
  absl::Status Reset() {
    sqlite3_reset(stmt_);  // its result repeats the last Step's, already reported
    sqlite3_clear_bindings(stmt_);
    return absl::OkStatus();
  }
  int64_t Int(int col) { return sqlite3_column_int64(stmt_, col); }
  std::string Text(int col) {
    const unsigned char* p = sqlite3_column_text(stmt_, col);
    return p == nullptr ? std::string()
                        : std::string(reinterpret_cast<const char*>(p),
                                      static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
  }
  std::string Blob(int col) {
    const void* p = sqlite3_column_blob(stmt_, col);
    return p == nullptr ? std::string()
                        : std::string(static_cast<const char*>(p),
                                      static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
  }

 private:
  static std::string FirstLine(const char* sql) {
    std::string s(sql);
    while (!s.empty() && (s.front() == '\n' || s.front() == ' ')) s.erase(0, 1);
    const size_t nl = s.find('\n');
    return nl == std::string::npos ? s : s.substr(0, nl);
  }
  sqlite3* db_;
  std::string path_;
  std::map<const char*, sqlite3_stmt*>* cache_;
  const char* sql_ = "";
  sqlite3_stmt* stmt_ = nullptr;
};

absl::Status Exec(sqlite3* db, const char* sql, std::string_view path) {
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql, nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    sqlite3_free(err);  // sqlite3_errmsg below says the same
    return SqliteError(db, rc, absl::StrCat("executing '", std::string(sql).substr(0, 60), "'"),
                       path);
  }
  return absl::OkStatus();
}

// Rolls back an open transaction unless Commit() succeeded.
class Transaction {
 public:
  Transaction(sqlite3* db, std::string_view path) : db_(db), path_(path) {}
  ~Transaction() {
    if (open_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  absl::Status Begin(bool immediate) {
    QF_RETURN_IF_ERROR(Exec(db_, immediate ? "BEGIN IMMEDIATE" : "BEGIN", path_));
    open_ = true;
    return absl::OkStatus();
  }
  absl::Status Commit() {
    QF_RETURN_IF_ERROR(Exec(db_, "COMMIT", path_));
    open_ = false;
    return absl::OkStatus();
  }

 private:
  sqlite3* db_;
  std::string path_;
  bool open_ = false;
};

template <typename Message>
absl::Status ParseBlob(const std::string& blob, Message* m, std::string_view table,
                       std::string_view id, std::string_view path) {
  if (!m->ParseFromString(blob)) {
    return absl::DataLossError(absl::StrCat("SQLite state store ", std::string(path), ": row '",
                                            std::string(id), "' of table ", std::string(table),
                                            " holds an undecodable ", m->GetTypeName()));
  }
  return absl::OkStatus();
}

constexpr const char* kUpsertJob = R"sql(
INSERT INTO jobs (id, tenant, request_id, state, create_ms, settled, job)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
ON CONFLICT(id) DO UPDATE SET tenant = excluded.tenant, request_id = excluded.request_id,
  state = excluded.state, create_ms = excluded.create_ms, settled = excluded.settled,
  job = excluded.job)sql";

constexpr const char* kUpsertTask = R"sql(
INSERT INTO tasks (id, job_id, ordinal, kind, state, attempt, memory_bytes, backends, worker_id,
  lease_token, lease_expiry_ms, not_before_ms, create_ms, queued_ms, start_ms, end_ms,
  staging_key, output_key, output_sha256, output_bytes, layer, metrics, error, gpu_memory_bytes,
  calibration, evaluation)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
  ?20, ?21, ?22, ?23, ?24, ?25, ?26)
ON CONFLICT(id) DO UPDATE SET job_id = excluded.job_id, ordinal = excluded.ordinal,
  kind = excluded.kind, state = excluded.state, attempt = excluded.attempt,
  memory_bytes = excluded.memory_bytes, backends = excluded.backends,
  worker_id = excluded.worker_id, lease_token = excluded.lease_token,
  lease_expiry_ms = excluded.lease_expiry_ms, not_before_ms = excluded.not_before_ms,
  create_ms = excluded.create_ms, queued_ms = excluded.queued_ms, start_ms = excluded.start_ms,
  end_ms = excluded.end_ms, staging_key = excluded.staging_key,
  output_key = excluded.output_key, output_sha256 = excluded.output_sha256,
  output_bytes = excluded.output_bytes, layer = excluded.layer, metrics = excluded.metrics,
  error = excluded.error, gpu_memory_bytes = excluded.gpu_memory_bytes,
  calibration = excluded.calibration, evaluation = excluded.evaluation)sql";

constexpr const char* kUpsertWorker = R"sql(
INSERT INTO workers (id, registration, registered_ms, last_seen_ms, tasks_completed, tasks_failed)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT(id) DO UPDATE SET registration = excluded.registration,
  registered_ms = excluded.registered_ms, last_seen_ms = excluded.last_seen_ms,
  tasks_completed = excluded.tasks_completed, tasks_failed = excluded.tasks_failed)sql";

constexpr const char* kInsertEvent =
    "INSERT INTO events (job_id, sequence, time_ms, event) VALUES (?1, ?2, ?3, ?4)";

// The columns ReadTaskRow parses, in its order.
#define QF_TASK_COLUMNS                                                                        \
  "id, job_id, ordinal, kind, state, attempt, memory_bytes, backends, worker_id, lease_token, " \
  "lease_expiry_ms, not_before_ms, create_ms, queued_ms, start_ms, end_ms, staging_key, "       \
  "output_key, output_sha256, output_bytes, layer, metrics, error, gpu_memory_bytes, "          \
  "calibration, evaluation"

constexpr const char* kSelectTasks =
    "SELECT " QF_TASK_COLUMNS
    " FROM tasks WHERE job_id IN (SELECT id FROM jobs WHERE settled = 0) ORDER BY job_id, ordinal";
constexpr const char* kSelectTasksOfJob =
    "SELECT " QF_TASK_COLUMNS " FROM tasks WHERE job_id = ?1 ORDER BY ordinal";
#undef QF_TASK_COLUMNS

// One row of a kSelectTasks / kSelectTasksOfJob query.
absl::StatusOr<TaskRecord> ReadTaskRow(Stmt& q, const std::string& path) {
  TaskRecord t;
  t.id = q.Text(0);
  t.job_id = q.Text(1);
  t.ordinal = static_cast<int32_t>(q.Int(2));
  t.kind = static_cast<v1::TaskKind>(q.Int(3));
  t.state = static_cast<v1::TaskState>(q.Int(4));
  t.attempt = static_cast<int32_t>(q.Int(5));
  t.memory_bytes = static_cast<uint64_t>(q.Int(6));
  const std::string backends = q.Text(7);
  if (!backends.empty()) t.backends = absl::StrSplit(backends, ',');
  t.worker_id = q.Text(8);
  t.lease_token = q.Text(9);
  t.lease_expiry_ms = q.Int(10);
  t.not_before_ms = q.Int(11);
  t.create_ms = q.Int(12);
  t.queued_ms = q.Int(13);
  t.start_ms = q.Int(14);
  t.end_ms = q.Int(15);
  t.staging_key = q.Text(16);
  t.output_key = q.Text(17);
  t.output_sha256 = q.Text(18);
  t.output_bytes = static_cast<uint64_t>(q.Int(19));
  QF_RETURN_IF_ERROR(ParseBlob(q.Blob(20), &t.layer, "tasks", t.id, path));
  QF_RETURN_IF_ERROR(ParseBlob(q.Blob(21), &t.metrics, "tasks", t.id, path));
  QF_RETURN_IF_ERROR(ParseBlob(q.Blob(22), &t.error, "tasks", t.id, path));
  t.gpu_memory_bytes = static_cast<uint64_t>(q.Int(23));
  QF_RETURN_IF_ERROR(ParseBlob(q.Blob(24), &t.calibration, "tasks", t.id, path));
  QF_RETURN_IF_ERROR(ParseBlob(q.Blob(25), &t.evaluation, "tasks", t.id, path));
  return t;
}
}  // namespace

absl::StatusOr<std::unique_ptr<SqliteStateStore>> SqliteStateStore::Open(
    std::string_view path, const SqliteStateStoreOptions& options) {
  const std::string p(path);
  if (p.empty()) return absl::InvalidArgumentError("SQLite state store: empty database path");
  if (options.create_parent_dirs && p != ":memory:") {
    const std::filesystem::path parent = std::filesystem::path(p).parent_path();
    if (!parent.empty()) {
      std::error_code ec;
      std::filesystem::create_directories(parent, ec);
      if (ec) {
        return absl::UnavailableError(absl::StrCat("SQLite state store ", p,
                                                   ": cannot create directory ",
                                                   parent.string(), ": ", ec.message()));
      }
    }
  }
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(
      p.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    absl::Status s = SqliteError(db, rc, "opening the database", p);
    sqlite3_close(db);
    return s;
  }
  std::unique_ptr<SqliteStateStore> store(new SqliteStateStore(p, db));
  absl::MutexLock lock(&store->mu_);
  sqlite3_busy_timeout(db, options.busy_timeout_ms);
  sqlite3_extended_result_codes(db, 1);
  {
    // journal_mode answers the mode in effect; "memory" for an in-memory database.
    Stmt wal(db, p);
    QF_RETURN_IF_ERROR(wal.Prepare("PRAGMA journal_mode=WAL"));
    QF_ASSIGN_OR_RETURN(bool row, wal.Step());
    const std::string mode = row ? wal.Text(0) : "";
    if (mode != "wal" && mode != "memory") {
      return absl::UnavailableError(absl::StrCat("SQLite state store ", p,
                                                 ": cannot switch to WAL journal (mode '", mode,
                                                 "'); is the file on a network filesystem?"));
    }
  }
  QF_RETURN_IF_ERROR(Exec(db, "PRAGMA synchronous=NORMAL", p));
  QF_RETURN_IF_ERROR(Exec(db, "PRAGMA foreign_keys=ON", p));
  QF_RETURN_IF_ERROR(store->Migrate());
  return store;
}

SqliteStateStore::~SqliteStateStore() {
  absl::MutexLock lock(&mu_);
  for (auto& [sql, stmt] : statements_) sqlite3_finalize(stmt);
  sqlite3_close_v2(db_);
}

absl::Status SqliteStateStore::Migrate() {
  QF_RETURN_IF_ERROR(
      Exec(db_, "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", path_));
  for (;;) {
    Transaction txn(db_, path_);
    QF_RETURN_IF_ERROR(txn.Begin(/*immediate=*/true));
    int64_t stored = 0;
    bool have_row = false;
    {
      Stmt q(db_, path_);
      QF_RETURN_IF_ERROR(q.Prepare("SELECT version FROM schema_version"));
      QF_ASSIGN_OR_RETURN(have_row, q.Step());
      if (have_row) stored = q.Int(0);
    }
    if (!have_row) {
      QF_RETURN_IF_ERROR(Exec(db_, "INSERT INTO schema_version (version) VALUES (0)", path_));
    }
    if (stored < 0) {
      return absl::DataLossError(absl::StrCat(
          "SQLite state store ", path_, ": schema version ", stored,
          " is not a version any coordinator writes; restore the database from a backup"));
    }
    if (stored > kSchemaVersion) {
      return absl::FailedPreconditionError(absl::StrCat(
          "SQLite state store ", path_, ": schema version ", stored,
          " is newer than this coordinator's (", kSchemaVersion,
          "); run the newer coordinator or restore an older database"));
    }
    const int version = static_cast<int>(stored);
    if (version == kSchemaVersion) return txn.Commit();
    absl::Status s = Exec(db_, kMigrations[version], path_);
    if (!s.ok()) {
      return absl::InternalError(absl::StrCat("migration to schema version ", version + 1,
                                              " failed: ", std::string(s.message())));
    }
    Stmt set(db_, path_);
    QF_RETURN_IF_ERROR(set.Prepare("UPDATE schema_version SET version = ?1"));
    set.Bind(1, int64_t{version + 1});
    QF_RETURN_IF_ERROR(set.Run());
    QF_RETURN_IF_ERROR(txn.Commit());
  }
}

absl::StatusOr<int> SqliteStateStore::SchemaVersion() {
  absl::MutexLock lock(&mu_);
  Stmt q(db_, path_);
  QF_RETURN_IF_ERROR(q.Prepare("SELECT version FROM schema_version"));
  QF_ASSIGN_OR_RETURN(bool row, q.Step());
  if (!row) return absl::InternalError("schema_version has no row");
  return static_cast<int>(q.Int(0));
}

absl::StatusOr<StateSnapshot> SqliteStateStore::Load() {
  absl::MutexLock lock(&mu_);
  StateSnapshot snap;
  Transaction txn(db_, path_);  // one consistent read
  QF_RETURN_IF_ERROR(txn.Begin(/*immediate=*/false));
  {
    Stmt q(db_, path_);
    QF_RETURN_IF_ERROR(q.Prepare("SELECT id, settled, job FROM jobs ORDER BY create_ms, id"));
    for (;;) {
      QF_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      JobRecord r;
      r.settled = q.Int(1) != 0;
      QF_RETURN_IF_ERROR(ParseBlob(q.Blob(2), &r.job, "jobs", q.Text(0), path_));
      snap.jobs.push_back(std::move(r));
    }
  }
  {
    Stmt q(db_, path_);
    QF_RETURN_IF_ERROR(q.Prepare(kSelectTasks));
    for (;;) {
      QF_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      QF_ASSIGN_OR_RETURN(TaskRecord t, ReadTaskRow(q, path_));
      snap.tasks.push_back(std::move(t));
    }
  }
  {
    Stmt q(db_, path_);
    QF_RETURN_IF_ERROR(q.Prepare(
        "SELECT id, registration, registered_ms, last_seen_ms, tasks_completed, tasks_failed "
        "FROM workers ORDER BY id"));
    for (;;) {
      QF_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      WorkerRecord w;
      w.id = q.Text(0);
      QF_RETURN_IF_ERROR(ParseBlob(q.Blob(1), &w.registration, "workers", w.id, path_));
      w.registered_ms = q.Int(2);
      w.last_seen_ms = q.Int(3);
      w.tasks_completed = static_cast<int32_t>(q.Int(4));
      w.tasks_failed = static_cast<int32_t>(q.Int(5));
      snap.workers.push_back(std::move(w));
    }
  }
  {
    Stmt q(db_, path_);
    QF_RETURN_IF_ERROR(q.Prepare("SELECT job_id, MAX(sequence) FROM events GROUP BY job_id"));
    for (;;) {
      QF_ASSIGN_OR_RETURN(bool row, q.Step());
      if (!row) break;
      snap.last_event_sequence[q.Text(0)] = q.Int(1);
    }
  }
  QF_RETURN_IF_ERROR(txn.Commit());
  return snap;
}

absl::Status SqliteStateStore::Apply(const StateMutation& mutation) {
  if (mutation.empty()) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  return ApplyLocked(mutation);
}

absl::Status SqliteStateStore::ApplyLocked(const StateMutation& m) {
  Transaction txn(db_, path_);
  QF_RETURN_IF_ERROR(txn.Begin(/*immediate=*/true));
  if (!m.jobs.empty()) {
    Stmt s(db_, path_, &statements_);
    QF_RETURN_IF_ERROR(s.Prepare(kUpsertJob));
    for (const JobRecord& r : m.jobs) {
      s.Bind(1, r.job.id());
      s.Bind(2, r.job.tenant());
      s.Bind(3, r.job.request_id());
      s.Bind(4, int64_t{r.job.state()});
      s.Bind(5, r.job.create_time_unix_ms());
      s.Bind(6, int64_t{r.settled ? 1 : 0});
      s.BindBlob(7, r.job.SerializeAsString());
      QF_RETURN_IF_ERROR(s.Run());
      QF_RETURN_IF_ERROR(s.Reset());
    }
  }
  if (!m.tasks.empty()) {
    Stmt s(db_, path_, &statements_);
    QF_RETURN_IF_ERROR(s.Prepare(kUpsertTask));
    for (const TaskRecord& t : m.tasks) {
      s.Bind(1, t.id);
      s.Bind(2, t.job_id);
      s.Bind(3, int64_t{t.ordinal});
      s.Bind(4, int64_t{t.kind});
      s.Bind(5, int64_t{t.state});
      s.Bind(6, int64_t{t.attempt});
      s.Bind(7, static_cast<int64_t>(t.memory_bytes));
      s.Bind(8, absl::StrJoin(t.backends, ","));
      s.Bind(9, t.worker_id);
      s.Bind(10, t.lease_token);
      s.Bind(11, t.lease_expiry_ms);
      s.Bind(12, t.not_before_ms);
      s.Bind(13, t.create_ms);
      s.Bind(14, t.queued_ms);
      s.Bind(15, t.start_ms);
      s.Bind(16, t.end_ms);
      s.Bind(17, t.staging_key);
      s.Bind(18, t.output_key);
      s.Bind(19, t.output_sha256);
      s.Bind(20, static_cast<int64_t>(t.output_bytes));
      s.BindBlob(21, t.layer.SerializeAsString());
      s.BindBlob(22, t.metrics.SerializeAsString());
      s.BindBlob(23, t.error.SerializeAsString());
      s.Bind(24, static_cast<int64_t>(t.gpu_memory_bytes));
      s.BindBlob(25, t.calibration.SerializeAsString());
      s.BindBlob(26, t.evaluation.SerializeAsString());
      QF_RETURN_IF_ERROR(s.Run());
      QF_RETURN_IF_ERROR(s.Reset());
    }
  }
  if (!m.workers.empty()) {
    Stmt s(db_, path_, &statements_);
    QF_RETURN_IF_ERROR(s.Prepare(kUpsertWorker));
    for (const WorkerRecord& w : m.workers) {
      s.Bind(1, w.id);
      s.BindBlob(2, w.registration.SerializeAsString());
      s.Bind(3, w.registered_ms);
      s.Bind(4, w.last_seen_ms);
      s.Bind(5, int64_t{w.tasks_completed});
      s.Bind(6, int64_t{w.tasks_failed});
      QF_RETURN_IF_ERROR(s.Run());
      QF_RETURN_IF_ERROR(s.Reset());
    }
  }
  if (!m.events.empty()) {
    Stmt s(db_, path_, &statements_);
    QF_RETURN_IF_ERROR(s.Prepare(kInsertEvent));
    for (const v1::JobEvent& e : m.events) {
      s.Bind(1, e.job_id());
      s.Bind(2, e.sequence());
      s.Bind(3, e.time_unix_ms());
      s.BindBlob(4, e.SerializeAsString());
      QF_RETURN_IF_ERROR(s.Run());
      QF_RETURN_IF_ERROR(s.Reset());
    }
  }
  for (const std::string& id : m.deleted_job_ids) {
    for (const char* sql : {"DELETE FROM events WHERE job_id = ?1",
                            "DELETE FROM tasks WHERE job_id = ?1", "DELETE FROM jobs WHERE id = ?1"}) {
      Stmt s(db_, path_, &statements_);
      QF_RETURN_IF_ERROR(s.Prepare(sql));
      s.Bind(1, id);
      QF_RETURN_IF_ERROR(s.Run());
    }
  }
  return txn.Commit();
}

absl::StatusOr<std::vector<TaskRecord>> SqliteStateStore::ReadTasks(std::string_view job_id) {
  std::vector<TaskRecord> out;
  absl::MutexLock lock(&mu_);
  Stmt q(db_, path_);
  QF_RETURN_IF_ERROR(q.Prepare(kSelectTasksOfJob));
  q.Bind(1, job_id);
  for (;;) {
    QF_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    QF_ASSIGN_OR_RETURN(TaskRecord t, ReadTaskRow(q, path_));
    out.push_back(std::move(t));
  }
  return out;
}

absl::StatusOr<std::vector<v1::JobEvent>> SqliteStateStore::ReadEvents(std::string_view job_id,
                                                                       int64_t after_sequence,
                                                                       int max_events) {
  std::vector<v1::JobEvent> out;
  if (max_events <= 0) return out;
  absl::MutexLock lock(&mu_);
  Stmt q(db_, path_);
  QF_RETURN_IF_ERROR(q.Prepare(
      "SELECT sequence, event FROM events WHERE job_id = ?1 AND sequence > ?2 "
      "ORDER BY sequence LIMIT ?3"));
  q.Bind(1, job_id);
  q.Bind(2, after_sequence);
  q.Bind(3, int64_t{max_events});
  for (;;) {
    QF_ASSIGN_OR_RETURN(bool row, q.Step());
    if (!row) break;
    v1::JobEvent e;
    QF_RETURN_IF_ERROR(ParseBlob(q.Blob(1), &e, "events",
                                 absl::StrCat(std::string(job_id), "#", q.Int(0)), path_));
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace qforge

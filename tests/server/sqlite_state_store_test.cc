// server/sqlite_state_store.h: round trips, atomic transitions, schema versioning and the
// migration of a database an older coordinator wrote.
#include "server/sqlite_state_store.h"

#include <sqlite3.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "gtest/gtest.h"

namespace qforge {
namespace {

class SqliteStateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qforge-sqlite-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/sub/state.db";  // the directory is created on open
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<SqliteStateStore> OpenStore() {
    auto s = SqliteStateStore::Open(path_);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  static JobRecord Job(const std::string& id, v1::JobState state, const std::string& rid = "") {
    JobRecord r;
    r.job.set_id(id);
    r.job.set_tenant("t1");
    r.job.set_state(state);
    r.job.set_request_id(rid);
    r.job.set_create_time_unix_ms(1000);
    r.job.mutable_spec()->set_model_uri("/m");
    r.job.mutable_spec()->mutable_gptq()->set_bits(3);
    return r;
  }
  static TaskRecord Task(const std::string& id, const std::string& job, int ordinal) {
    TaskRecord t;
    t.id = id;
    t.job_id = job;
    t.ordinal = ordinal;
    t.kind = v1::TASK_KIND_QUANTIZE;
    t.state = v1::TASK_STATE_RUNNING;
    t.attempt = 2;
    t.layer.set_module("model.layers.0.mlp.down_proj");
    t.layer.set_byte_offset(123456789012ull);
    t.layer.set_byte_length(4096);
    t.memory_bytes = uint64_t{5} << 40;
    t.gpu_memory_bytes = uint64_t{3} << 30;
    t.backends = {"cpu", "cuda"};
    t.worker_id = "w-1";
    t.lease_token = "00ff";
    t.lease_expiry_ms = 1'700'000'030'000;
    t.not_before_ms = 7;
    t.create_ms = 1;
    t.queued_ms = 2;
    t.start_ms = 3;
    t.end_ms = 4;
    t.staging_key = ".qforge-staging/j/t/2/layer.safetensors";
    t.output_sha256 = "ab";
    t.output_bytes = 99;
    t.metrics.set_relative_error(0.25);
    t.error.set_code(14);
    t.error.set_reason("LEASE_EXPIRED");
    return t;
  }
  static v1::JobEvent Event(const std::string& job, int64_t seq) {
    v1::JobEvent e;
    e.set_job_id(job);
    e.set_sequence(seq);
    e.set_time_unix_ms(100 + seq);
    e.set_message("event " + std::to_string(seq));
    return e;
  }

  std::string dir_, path_;
};

TEST_F(SqliteStateStoreTest, RoundTripsRecordsAndEventsAcrossReopen) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    auto version = store->SchemaVersion();
    ASSERT_TRUE(version.ok());
    EXPECT_EQ(*version, SqliteStateStore::kSchemaVersion);
    StateMutation m;
    m.jobs = {Job("j1", v1::JOB_STATE_QUANTIZING, "req-1")};
    m.tasks = {Task("j1-q1", "j1", 1), Task("j1-q0", "j1", 0)};
    WorkerRecord w;
    w.id = "w-1";
    w.registration.set_hostname("host");
    w.registration.add_backends("cpu");
    w.registration.set_memory_budget_bytes(1 << 30);
    w.registered_ms = 5;
    w.last_seen_ms = 6;
    w.tasks_completed = 3;
    w.tasks_failed = 1;
    m.workers = {w};
    for (int i = 1; i <= 5; ++i) m.events.push_back(Event("j1", i));
    ASSERT_TRUE(store->Apply(m).ok());
    // An upsert replaces the row.
    StateMutation m2;
    m2.jobs = {Job("j1", v1::JOB_STATE_ASSEMBLING, "req-1")};
    m2.events = {Event("j1", 6)};
    ASSERT_TRUE(store->Apply(m2).ok());
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto snap = store->Load();
  ASSERT_TRUE(snap.ok()) << snap.status();
  ASSERT_EQ(snap->jobs.size(), 1u);
  EXPECT_EQ(snap->jobs[0].job.state(), v1::JOB_STATE_ASSEMBLING);
  EXPECT_EQ(snap->jobs[0].job.request_id(), "req-1");
  EXPECT_EQ(snap->jobs[0].job.spec().gptq().bits(), 3);
  ASSERT_EQ(snap->tasks.size(), 2u);
  const TaskRecord& t = snap->tasks[0];  // ordered by ordinal
  const TaskRecord expect = Task("j1-q0", "j1", 0);
  EXPECT_EQ(t.id, expect.id);
  EXPECT_EQ(t.state, expect.state);
  EXPECT_EQ(t.attempt, 2);
  EXPECT_EQ(t.layer.byte_offset(), 123456789012ull);
  EXPECT_EQ(t.memory_bytes, uint64_t{5} << 40);
  EXPECT_EQ(t.gpu_memory_bytes, uint64_t{3} << 30);
  EXPECT_EQ(t.backends, (std::vector<std::string>{"cpu", "cuda"}));
  EXPECT_EQ(t.lease_token, "00ff");
  EXPECT_EQ(t.lease_expiry_ms, expect.lease_expiry_ms);
  EXPECT_EQ(t.not_before_ms, 7);
  EXPECT_EQ(t.staging_key, expect.staging_key);
  EXPECT_EQ(t.output_bytes, 99u);
  EXPECT_DOUBLE_EQ(t.metrics.relative_error(), 0.25);
  EXPECT_EQ(t.error.reason(), "LEASE_EXPIRED");
  EXPECT_EQ(snap->tasks[1].id, "j1-q1");
  ASSERT_EQ(snap->workers.size(), 1u);
  EXPECT_EQ(snap->workers[0].registration.hostname(), "host");
  EXPECT_EQ(snap->workers[0].tasks_completed, 3);
  EXPECT_EQ(snap->last_event_sequence.at("j1"), 6);

  auto events = store->ReadEvents("j1", 2, 3);
  ASSERT_TRUE(events.ok());
  ASSERT_EQ(events->size(), 3u);
  EXPECT_EQ((*events)[0].sequence(), 3);
  EXPECT_EQ((*events)[2].sequence(), 5);
  EXPECT_EQ((*events)[2].message(), "event 5");
  EXPECT_TRUE(store->ReadEvents("j1", 6, 10)->empty());
  EXPECT_TRUE(store->ReadEvents("unknown", 0, 10)->empty());
  EXPECT_TRUE(store->ReadEvents("j1", 0, 0)->empty());
}

TEST_F(SqliteStateStoreTest, AMutationIsAllOrNothing) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  StateMutation m;
  m.jobs = {Job("j1", v1::JOB_STATE_QUEUED)};
  m.tasks = {Task("j1-q0", "j1", 0)};
  m.events = {Event("j1", 1)};
  ASSERT_TRUE(store->Apply(m).ok());

  // A transition whose last write fails (event 1 exists) leaves nothing of it behind.
  StateMutation bad;
  bad.jobs = {Job("j1", v1::JOB_STATE_FAILED)};
  TaskRecord t = Task("j1-q0", "j1", 0);
  t.state = v1::TASK_STATE_FAILED;
  bad.tasks = {t};
  bad.events = {Event("j1", 2), Event("j1", 1)};
  absl::Status s = store->Apply(bad);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find(path_), std::string::npos) << s;

  // A task of an unknown job violates the foreign key: refused as a whole too.
  StateMutation orphan;
  orphan.tasks = {Task("x-q0", "no-such-job", 0)};
  EXPECT_FALSE(store->Apply(orphan).ok());

  auto snap = store->Load();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ(snap->jobs[0].job.state(), v1::JOB_STATE_QUEUED);
  ASSERT_EQ(snap->tasks.size(), 1u);
  EXPECT_EQ(snap->tasks[0].state, v1::TASK_STATE_RUNNING);
  EXPECT_EQ(snap->last_event_sequence.at("j1"), 1);

  // Two jobs of one tenant cannot share a request id.
  StateMutation dup;
  dup.jobs = {Job("j2", v1::JOB_STATE_QUEUED, "r"), Job("j3", v1::JOB_STATE_QUEUED, "r")};
  EXPECT_FALSE(store->Apply(dup).ok());
  EXPECT_EQ(store->Load()->jobs.size(), 1u);
}

TEST_F(SqliteStateStoreTest, TasksOfSettledJobsAreNotLoaded) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  StateMutation m;
  JobRecord done = Job("done", v1::JOB_STATE_SUCCEEDED);
  done.settled = true;
  done.job.mutable_tasks()->set_total(2);
  m.jobs = {done, Job("live", v1::JOB_STATE_QUANTIZING)};
  m.tasks = {Task("done-q0", "done", 0), Task("live-q0", "live", 0)};
  ASSERT_TRUE(store->Apply(m).ok());
  auto snap = store->Load();
  ASSERT_TRUE(snap.ok());
  ASSERT_EQ(snap->jobs.size(), 2u);
  ASSERT_EQ(snap->tasks.size(), 1u);
  EXPECT_EQ(snap->tasks[0].id, "live-q0");
  for (const JobRecord& r : snap->jobs) {
    if (r.job.id() == "done") {
      EXPECT_TRUE(r.settled);
      EXPECT_EQ(r.job.tasks().total(), 2);
    }
  }
}

TEST_F(SqliteStateStoreTest, UsesWalAndRefusesANewerSchema) {
  ASSERT_NE(OpenStore(), nullptr);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)), "wal");
  sqlite3_finalize(st);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE schema_version SET version = 99", nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto s = SqliteStateStore::Open(path_);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("schema version 99"), std::string::npos) << s.status();
}

// A corrupted version (negative, or beyond int) is refused with a message, never used to
// pick a migration.
TEST_F(SqliteStateStoreTest, RefusesAVersionNoCoordinatorWrites) {
  for (const char* version : {"-1", "4294967297"}) {
    std::filesystem::remove_all(dir_ + "/sub");
    ASSERT_NE(OpenStore(), nullptr);
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    const std::string sql = std::string("UPDATE schema_version SET version = ") + version;
    ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
    auto s = SqliteStateStore::Open(path_);
    ASSERT_FALSE(s.ok()) << version;
    EXPECT_NE(s.status().message().find(std::string("schema version ") + version),
              std::string::npos)
        << s.status();
  }
}

// The schema a version-1 coordinator created (server/sqlite_state_store.cc, migration 1),
// verbatim, with the row it would have written for a running QUANTIZE task.
constexpr char kSchemaV1[] = R"sql(
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE jobs (
  id         TEXT PRIMARY KEY,
  tenant     TEXT NOT NULL,
  request_id TEXT NOT NULL,
  state      INTEGER NOT NULL,
  create_ms  INTEGER NOT NULL,
  settled    INTEGER NOT NULL,
  job        BLOB NOT NULL
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
  backends        TEXT NOT NULL,
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
  layer           BLOB NOT NULL,
  metrics         BLOB NOT NULL,
  error           BLOB NOT NULL
);
CREATE INDEX tasks_by_job ON tasks(job_id, ordinal);
CREATE TABLE workers (
  id              TEXT PRIMARY KEY,
  registration    BLOB NOT NULL,
  registered_ms   INTEGER NOT NULL,
  last_seen_ms    INTEGER NOT NULL,
  tasks_completed INTEGER NOT NULL,
  tasks_failed    INTEGER NOT NULL
);
CREATE TABLE events (
  job_id   TEXT NOT NULL REFERENCES jobs(id),
  sequence INTEGER NOT NULL,
  time_ms  INTEGER NOT NULL,
  event    BLOB NOT NULL,
  PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
INSERT INTO jobs VALUES ('j1', 't1', '', 3, 1000, 0, x'');
INSERT INTO tasks VALUES ('j1-q0', 'j1', 0, 2, 3, 2, 5497558138880, 'cpu,cuda', 'w-1', '00ff',
  1700000030000, 7, 1, 2, 3, 4, '.qforge-staging/j/t/2/layer.safetensors', '', 'ab', 99, x'',
  x'', x'');
INSERT INTO events VALUES ('j1', 1, 101, x'');
)sql";

TEST_F(SqliteStateStoreTest, MigratesAVersion1DatabaseAndKeepsItsRows) {
  std::filesystem::create_directories(dir_ + "/sub");
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    EXPECT_EQ(sqlite3_exec(db, kSchemaV1, nullptr, nullptr, &err), SQLITE_OK) << err;
    sqlite3_free(err);
    sqlite3_close(db);
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto version = store->SchemaVersion();
  ASSERT_TRUE(version.ok());
  EXPECT_EQ(*version, 4);
  EXPECT_EQ(SqliteStateStore::kSchemaVersion, 4);

  // The old row loads unchanged, without a device-memory estimate or calibration work.
  auto snap = store->Load();
  ASSERT_TRUE(snap.ok()) << snap.status();
  ASSERT_EQ(snap->tasks.size(), 1u);
  const TaskRecord expect = Task("j1-q0", "j1", 0);
  const TaskRecord& t = snap->tasks[0];
  EXPECT_EQ(t.id, expect.id);
  EXPECT_EQ(t.kind, v1::TASK_KIND_QUANTIZE);
  EXPECT_EQ(t.state, v1::TASK_STATE_RUNNING);
  EXPECT_EQ(t.attempt, 2);
  EXPECT_EQ(t.memory_bytes, expect.memory_bytes);
  EXPECT_EQ(t.gpu_memory_bytes, 0u);
  EXPECT_EQ(t.calibration.ByteSizeLong(), 0u);
  EXPECT_EQ(t.evaluation.ByteSizeLong(), 0u);
  EXPECT_EQ(t.backends, expect.backends);
  EXPECT_EQ(t.lease_token, expect.lease_token);
  EXPECT_EQ(t.lease_expiry_ms, expect.lease_expiry_ms);
  EXPECT_EQ(t.staging_key, expect.staging_key);
  EXPECT_EQ(t.output_bytes, 99u);
  EXPECT_EQ(snap->last_event_sequence.at("j1"), 1);

  // The new columns are written and read back from now on; reopening migrates nothing more.
  TaskRecord updated = t;
  updated.gpu_memory_bytes = uint64_t{3} << 33;
  updated.calibration.set_dataset_sha256("ab12");
  updated.calibration.set_sample_begin(4);
  updated.calibration.set_sample_end(8);
  updated.calibration.add_partial_keys(".qforge-staging/j1/j1-c00000/0/p");
  StateMutation m;
  m.tasks = {updated};
  m.events = {Event("j1", 2)};
  ASSERT_TRUE(store->Apply(m).ok());
  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(*store->SchemaVersion(), 4);
  snap = store->Load();
  ASSERT_TRUE(snap.ok()) << snap.status();
  ASSERT_EQ(snap->tasks.size(), 1u);
  EXPECT_EQ(snap->tasks[0].gpu_memory_bytes, uint64_t{3} << 33);
  EXPECT_EQ(snap->tasks[0].calibration.dataset_sha256(), "ab12");
  EXPECT_EQ(snap->tasks[0].calibration.sample_begin(), 4);
  EXPECT_EQ(snap->tasks[0].calibration.sample_end(), 8);
  ASSERT_EQ(snap->tasks[0].calibration.partial_keys_size(), 1);
  EXPECT_EQ(snap->tasks[0].memory_bytes, expect.memory_bytes);
}

// A version-3 database (the v1 schema plus migrations 2 and 3, verbatim) with a running
// REDUCE task of a calibrating job.
constexpr char kSchemaV3Steps[] = R"sql(
ALTER TABLE tasks ADD COLUMN gpu_memory_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN calibration BLOB NOT NULL DEFAULT x'';
UPDATE schema_version SET version = 3;
)sql";

TEST_F(SqliteStateStoreTest, MigratesAVersion3DatabaseToEvaluationWork) {
  std::filesystem::create_directories(dir_ + "/sub");
  v1::CalibrationWork work;
  work.set_model_uri("/m");
  work.set_dataset_sha256("cd34");
  work.add_partial_keys(".qforge-staging/j1/j1-c00000/0/p");
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    EXPECT_EQ(sqlite3_exec(db, kSchemaV1, nullptr, nullptr, &err), SQLITE_OK) << err;
    sqlite3_free(err);
    EXPECT_EQ(sqlite3_exec(db, kSchemaV3Steps, nullptr, nullptr, &err), SQLITE_OK) << err;
    sqlite3_free(err);
    // The task row as a version-3 coordinator wrote it: a REDUCE with its calibration work.
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db,
                                 "UPDATE tasks SET kind = 4, gpu_memory_bytes = 77, "
                                 "calibration = ?1 WHERE id = 'j1-q0'",
                                 -1, &st, nullptr),
              SQLITE_OK);
    const std::string blob = work.SerializeAsString();
    sqlite3_bind_blob(st, 1, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
    EXPECT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(*store->SchemaVersion(), 4);
  auto snap = store->Load();
  ASSERT_TRUE(snap.ok()) << snap.status();
  ASSERT_EQ(snap->tasks.size(), 1u);
  const TaskRecord& t = snap->tasks[0];
  EXPECT_EQ(t.kind, v1::TASK_KIND_REDUCE);
  EXPECT_EQ(t.gpu_memory_bytes, 77u);
  EXPECT_EQ(t.calibration.dataset_sha256(), "cd34");
  ASSERT_EQ(t.calibration.partial_keys_size(), 1);
  EXPECT_EQ(t.evaluation.ByteSizeLong(), 0u) << "rows written before v4 have no evaluation";

  // An EVAL_REDUCE with its evaluation work is written and read back.
  TaskRecord eval = t;
  eval.id = "j1-eval-reduce";
  eval.ordinal = 1;
  eval.kind = v1::TASK_KIND_EVAL_REDUCE;
  eval.calibration.Clear();
  eval.evaluation.set_reference_model_uri("/m");
  eval.evaluation.set_candidate_model_uri("/out");
  eval.evaluation.set_dataset_uri("/d/eval.jsonl");
  eval.evaluation.set_dataset_sha256("ef56");
  eval.evaluation.set_samples(12);
  eval.evaluation.set_seq_len(32);
  eval.evaluation.add_partial_keys(".qforge-staging/j1/j1-e00000/0/evaluation.partial.json");
  eval.evaluation.add_partial_keys(".qforge-staging/j1/j1-e00001/0/evaluation.partial.json");
  StateMutation m;
  m.tasks = {eval};
  m.events = {Event("j1", 2)};
  ASSERT_TRUE(store->Apply(m).ok());
  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  snap = store->Load();
  ASSERT_TRUE(snap.ok()) << snap.status();
  ASSERT_EQ(snap->tasks.size(), 2u);
  const TaskRecord& back = snap->tasks[1];
  EXPECT_EQ(back.id, "j1-eval-reduce");
  EXPECT_EQ(back.kind, v1::TASK_KIND_EVAL_REDUCE);
  EXPECT_EQ(back.evaluation.candidate_model_uri(), "/out");
  EXPECT_EQ(back.evaluation.dataset_sha256(), "ef56");
  EXPECT_EQ(back.evaluation.samples(), 12);
  EXPECT_EQ(back.evaluation.seq_len(), 32);
  ASSERT_EQ(back.evaluation.partial_keys_size(), 2);
  EXPECT_EQ(back.evaluation.partial_keys(1),
            ".qforge-staging/j1/j1-e00001/0/evaluation.partial.json");
  EXPECT_EQ(back.calibration.ByteSizeLong(), 0u);
  EXPECT_EQ(snap->tasks[0].calibration.dataset_sha256(), "cd34");
}

TEST_F(SqliteStateStoreTest, NotADatabaseIsReported) {
  std::filesystem::create_directories(dir_ + "/sub");
  {
    FILE* f = std::fopen(path_.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("this is not a database file, just some text of sufficient length.......", f);
    std::fclose(f);
  }
  auto s = SqliteStateStore::Open(path_);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find(path_), std::string::npos) << s.status();
}

}  // namespace
}  // namespace qforge

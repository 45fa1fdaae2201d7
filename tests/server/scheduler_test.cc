// server/scheduler.h: the scheduling decisions on hand-built records, with the time from a
// FakeClock: ordering, CPU and GPU memory budgets, backends, retry backoff, lease expiry,
// lost workers and fencing.
#include "server/scheduler.h"

#include <deque>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "server/clock.h"

namespace qforge {
namespace {

SchedulerPolicy Policy() {
  SchedulerPolicy p;
  p.lease_duration_ms = 10'000;
  p.worker_lost_after_ms = 30'000;
  p.retry_initial_backoff_ms = 1'000;
  p.retry_backoff_multiplier = 2.0;
  p.retry_max_backoff_ms = 5'000;
  return p;
}

WorkerRecord Worker(std::vector<std::string> backends, uint64_t budget = 0) {
  WorkerRecord w;
  w.id = "w-1";
  for (const std::string& b : backends) w.registration.add_backends(b);
  w.registration.set_memory_budget_bytes(budget);
  return w;
}

TaskRecord QueuedTask(const std::string& id, uint64_t cpu_bytes = 1000,
                      uint64_t gpu_bytes = 500) {
  TaskRecord t;
  t.id = id;
  t.kind = v1::TASK_KIND_QUANTIZE;
  t.state = v1::TASK_STATE_QUEUED;
  t.memory_bytes = cpu_bytes;
  t.gpu_memory_bytes = gpu_bytes;
  t.backends = {"cpu", "cuda"};
  return t;
}

// Jobs and their tasks, owned here; Jobs() lends them to the scheduler.
class Queue {
 public:
  // Adds a job with `tasks` QUANTIZE tasks named "<id>-q<i>" and returns its record.
  v1::Job& AddJob(const std::string& id, int priority, int64_t create_ms, int tasks,
                  v1::JobState state = v1::JOB_STATE_QUEUED) {
    Entry& e = entries_.emplace_back();
    e.job.set_id(id);
    e.job.set_state(state);
    e.job.set_create_time_unix_ms(create_ms);
    e.job.mutable_spec()->set_priority(priority);
    for (int i = 0; i < tasks; ++i) e.tasks.push_back(QueuedTask(id + "-q" + std::to_string(i)));
    return e.job;
  }
  std::deque<TaskRecord>& TasksOf(const std::string& job_id) {
    for (Entry& e : entries_) {
      if (e.job.id() == job_id) return e.tasks;
    }
    ADD_FAILURE() << "no job " << job_id;
    return entries_.front().tasks;
  }
  TaskRecord& Find(const std::string& task_id) {
    for (Entry& e : entries_) {
      for (TaskRecord& t : e.tasks) {
        if (t.id == task_id) return t;
      }
    }
    ADD_FAILURE() << "no task " << task_id;
    return entries_.front().tasks.front();
  }
  std::vector<SchedulableJob> Jobs() const {
    std::vector<SchedulableJob> out;
    for (const Entry& e : entries_) {
      SchedulableJob& j = out.emplace_back();
      j.job = &e.job;
      e.refs.clear();
      for (const TaskRecord& t : e.tasks) e.refs.push_back(&t);
      j.tasks = &e.refs;
    }
    return out;
  }
  // Picks for `worker` until nothing is left, marking each pick RUNNING; the ids in order.
  std::vector<std::string> Drain(const Scheduler& s, const WorkerRecord& worker, int64_t now) {
    std::vector<std::string> ids;
    while (const TaskRecord* t = s.PickTask(worker, Jobs(), now)) {
      ids.push_back(t->id);
      Find(t->id).state = v1::TASK_STATE_RUNNING;
    }
    return ids;
  }

 private:
  struct Entry {
    v1::Job job;
    std::deque<TaskRecord> tasks;  // stable addresses
    mutable std::vector<const TaskRecord*> refs;  // lent by Jobs()
  };
  std::deque<Entry> entries_;
};

TEST(SchedulerTest, OrdersByPriorityThenCreateTimeThenIdAndTasksInPlanOrder) {
  FakeClock clock;
  const Scheduler s(Policy());
  Queue q;
  const int64_t t0 = clock.NowMs();
  q.AddJob("job-b", 0, t0, 2);
  q.AddJob("job-a", 0, t0, 1);  // same priority and time as job-b: the id decides
  q.AddJob("job-old", 0, t0 - 1, 1);
  q.AddJob("job-urgent", 7, t0 + 5, 2, v1::JOB_STATE_QUANTIZING);
  q.AddJob("job-negative", -1, t0 - 100, 1);
  // Jobs that are not runnable keep their tasks, whatever their priority.
  q.AddJob("job-assembling", 9, t0, 1, v1::JOB_STATE_ASSEMBLING);
  q.AddJob("job-cancelling", 9, t0, 1, v1::JOB_STATE_CANCELLING);
  q.AddJob("job-failed", 9, t0, 1, v1::JOB_STATE_FAILED);

  const std::vector<std::string> order = q.Drain(s, Worker({"cpu"}), clock.NowMs());
  EXPECT_EQ(order, (std::vector<std::string>{"job-urgent-q0", "job-urgent-q1", "job-old-q0",
                                             "job-a-q0", "job-b-q0", "job-b-q1",
                                             "job-negative-q0"}));
}

// Issue 18 item 6: at equal priority, tenants share the workers; an older job with 100
// queued tasks does not make another tenant's 5 wait until all of its tasks have run.
TEST(SchedulerTest, TenantsAtEqualPriorityShareTheWorkers) {
  FakeClock clock;
  const Scheduler s(Policy());
  Queue q;
  const int64_t t0 = clock.NowMs();
  q.AddJob("job-big", 0, t0 - 1000, 100).set_tenant("alice");
  q.AddJob("job-small", 0, t0, 5).set_tenant("bob");
  const std::vector<std::string> order = q.Drain(s, Worker({"cpu"}), clock.NowMs());
  ASSERT_EQ(order.size(), 105u);
  // Alternating while both have work: bob's 5 tasks are all among the first 10 picks.
  const std::vector<std::string> first(order.begin(), order.begin() + 10);
  EXPECT_EQ(first, (std::vector<std::string>{"job-big-q0", "job-small-q0", "job-big-q1",
                                             "job-small-q1", "job-big-q2", "job-small-q2",
                                             "job-big-q3", "job-small-q3", "job-big-q4",
                                             "job-small-q4"}));

  // Shares are what runs now: alice runs 2 and bob none, so bob goes first though alice's
  // job is older; once hers have finished, the shares are equal and the older job goes first.
  Queue q2;
  q2.AddJob("job-big", 0, t0 - 1000, 4).set_tenant("alice");
  q2.AddJob("job-small", 0, t0, 2).set_tenant("bob");
  q2.Find("job-big-q0").state = v1::TASK_STATE_RUNNING;
  q2.Find("job-big-q1").state = v1::TASK_STATE_RUNNING;
  const TaskRecord* next = s.PickTask(Worker({"cpu"}), q2.Jobs(), clock.NowMs());
  ASSERT_NE(next, nullptr);
  EXPECT_EQ(next->id, "job-small-q0");
  q2.Find("job-big-q0").state = v1::TASK_STATE_SUCCEEDED;
  q2.Find("job-big-q1").state = v1::TASK_STATE_SUCCEEDED;
  next = s.PickTask(Worker({"cpu"}), q2.Jobs(), clock.NowMs());
  ASSERT_NE(next, nullptr);
  EXPECT_EQ(next->id, "job-big-q2");  // equal shares (0 running each): the older job first

  // Priority still comes first: a higher-priority job of a busy tenant goes ahead.
  Queue q3;
  q3.AddJob("job-urgent", 5, t0, 2).set_tenant("alice");
  q3.AddJob("job-other", 0, t0 - 1000, 2).set_tenant("bob");
  EXPECT_EQ(q3.Drain(s, Worker({"cpu"}), clock.NowMs()),
            (std::vector<std::string>{"job-urgent-q0", "job-urgent-q1", "job-other-q0",
                                      "job-other-q1"}));
}

TEST(SchedulerTest, PicksOnlyQueuedQuantizeTasksWhoseBackoffHasElapsed) {
  FakeClock clock;
  const Scheduler s(Policy());
  Queue q;
  q.AddJob("job", 0, clock.NowMs(), 4);
  std::deque<TaskRecord>& tasks = q.TasksOf("job");
  tasks[0].state = v1::TASK_STATE_SUCCEEDED;
  tasks[1].not_before_ms = clock.NowMs() + 1'500;  // a retry still backing off
  tasks[2].state = v1::TASK_STATE_RUNNING;
  tasks[3].kind = v1::TASK_KIND_ASSEMBLE;  // the coordinator's own
  tasks[3].backends.clear();
  const WorkerRecord w = Worker({"cpu"});
  EXPECT_EQ(s.PickTask(w, q.Jobs(), clock.NowMs()), nullptr);
  clock.AdvanceMs(1'499);
  EXPECT_EQ(s.PickTask(w, q.Jobs(), clock.NowMs()), nullptr);
  clock.AdvanceMs(1);
  const TaskRecord* t = s.PickTask(w, q.Jobs(), clock.NowMs());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t, &tasks[1]);  // the very record that was passed in
}

TEST(SchedulerTest, CpuBudgetsCompareHostBytesAndCudaOnlyBudgetsDeviceBytes) {
  const TaskRecord t = QueuedTask("t", /*cpu_bytes=*/1000, /*gpu_bytes=*/500);
  struct Case {
    std::vector<std::string> backends;
    uint64_t budget;
    uint64_t needed;
    bool fits;
  };
  const Case cases[] = {
      {{"cpu"}, 0, 1000, true},             // no limit
      {{"cpu"}, 999, 1000, false},
      {{"cpu"}, 1000, 1000, true},          // exactly the estimate
      {{"cuda"}, 499, 500, false},          // device memory: the GPU estimate
      {{"cuda"}, 500, 500, true},
      {{"cuda"}, 0, 1000, true},            // no budget: nothing to compare
      {{"cpu", "cuda"}, 999, 1000, false},  // may run on the CPU: host memory
      {{"cuda", "cpu"}, 1000, 1000, true},
  };
  for (const Case& c : cases) {
    const WorkerRecord w = Worker(c.backends, c.budget);
    SCOPED_TRACE(testing::Message() << w.registration.ShortDebugString());
    EXPECT_EQ(Scheduler::MemoryNeeded(w, t), c.needed);
    EXPECT_EQ(Scheduler::FitsWorker(w, t), c.fits);
  }

  // A task that fits no budget is passed over for a later one that does.
  FakeClock clock;
  const Scheduler s(Policy());
  Queue q;
  q.AddJob("job", 0, clock.NowMs(), 2);
  q.TasksOf("job")[0].gpu_memory_bytes = 4096;
  q.TasksOf("job")[1].memory_bytes = 4096;  // the GPU estimate stays 500
  EXPECT_EQ(q.Drain(s, Worker({"cuda"}, 1024), clock.NowMs()),
            (std::vector<std::string>{"job-q1"}));
  EXPECT_EQ(q.Drain(s, Worker({"cpu"}, 1024), clock.NowMs()),
            (std::vector<std::string>{"job-q0"}));
}

TEST(SchedulerTest, AWorkerGetsOnlyTasksOneOfItsBackendsCanRun) {
  TaskRecord t = QueuedTask("t");
  t.backends = {"cuda"};
  EXPECT_FALSE(Scheduler::FitsWorker(Worker({"cpu"}), t));
  EXPECT_FALSE(Scheduler::FitsWorker(Worker({"tpu", "cpu"}), t));
  EXPECT_TRUE(Scheduler::FitsWorker(Worker({"tpu", "cuda"}), t));
  t.backends.clear();  // ASSEMBLE: no worker runs it
  EXPECT_FALSE(Scheduler::FitsWorker(Worker({"cpu", "cuda"}), t));

  FakeClock clock;
  const Scheduler s(Policy());
  Queue q;
  q.AddJob("job", 0, clock.NowMs(), 1);
  EXPECT_TRUE(q.Drain(s, Worker({"tpu"}), clock.NowMs()).empty());
  EXPECT_EQ(q.Drain(s, Worker({"tpu", "cpu"}), clock.NowMs()),
            (std::vector<std::string>{"job-q0"}));
}

TEST(SchedulerTest, RetryBackoffGrowsGeometricallyUpToTheCap) {
  const Scheduler s(Policy());  // 1 s, ×2, at most 5 s
  EXPECT_EQ(s.RetryBackoffMs(0), 1'000);
  EXPECT_EQ(s.RetryBackoffMs(1), 2'000);
  EXPECT_EQ(s.RetryBackoffMs(2), 4'000);
  EXPECT_EQ(s.RetryBackoffMs(3), 5'000);
  EXPECT_EQ(s.RetryBackoffMs(30), 5'000);

  SchedulerPolicy shrinking = Policy();
  shrinking.retry_backoff_multiplier = 0.5;  // counts as 1: never shorter than the first
  EXPECT_EQ(Scheduler(shrinking).RetryBackoffMs(4), 1'000);

  FakeClock clock;
  TaskRecord t = QueuedTask("t");
  t.attempt = 1;
  RetryDecision d = s.DecideRetry(t, /*max_attempts=*/3, /*retryable=*/true, clock.NowMs());
  EXPECT_TRUE(d.retry);
  EXPECT_EQ(d.backoff_ms, 2'000);
  EXPECT_EQ(d.not_before_ms, clock.NowMs() + 2'000);
  // The last attempt, a non-retryable error, or a budget below one: no retry.
  t.attempt = 2;
  EXPECT_FALSE(s.DecideRetry(t, 3, true, clock.NowMs()).retry);
  t.attempt = 0;
  EXPECT_FALSE(s.DecideRetry(t, 3, false, clock.NowMs()).retry);
  EXPECT_FALSE(s.DecideRetry(t, 0, true, clock.NowMs()).retry);
  EXPECT_TRUE(s.DecideRetry(t, 2, true, clock.NowMs()).retry);
}

TEST(SchedulerTest, LeasesExpireAfterTheirDurationUnlessRenewed) {
  FakeClock clock;
  const Scheduler s(Policy());
  TaskRecord t = QueuedTask("t");
  t.state = v1::TASK_STATE_RUNNING;
  t.lease_expiry_ms = s.LeaseExpiry(clock.NowMs());
  EXPECT_EQ(t.lease_expiry_ms, clock.NowMs() + 10'000);
  clock.AdvanceMs(9'999);
  EXPECT_FALSE(s.LeaseExpired(t, clock.NowMs()));
  t.lease_expiry_ms = s.LeaseExpiry(clock.NowMs());  // a heartbeat renews it
  clock.AdvanceMs(9'999);
  EXPECT_FALSE(s.LeaseExpired(t, clock.NowMs()));
  clock.AdvanceMs(1);
  EXPECT_TRUE(s.LeaseExpired(t, clock.NowMs()));
  // Only a running worker task (CALIBRATE, REDUCE, QUANTIZE) holds a worker's lease.
  t.kind = v1::TASK_KIND_CALIBRATE;
  EXPECT_TRUE(s.LeaseExpired(t, clock.NowMs()));
  t.kind = v1::TASK_KIND_REDUCE;
  EXPECT_TRUE(s.LeaseExpired(t, clock.NowMs()));
  t.state = v1::TASK_STATE_QUEUED;
  EXPECT_FALSE(s.LeaseExpired(t, clock.NowMs()));
  t.state = v1::TASK_STATE_RUNNING;
  t.kind = v1::TASK_KIND_ASSEMBLE;
  EXPECT_FALSE(s.LeaseExpired(t, clock.NowMs()));
}

// A calibrated job's plan: CALIBRATE × 3, REDUCE (PENDING), QUANTIZE × 2 (PENDING),
// ASSEMBLE (PENDING), as the planner leaves it.
v1::Job& AddCalibratedJob(Queue& q, const std::string& id, int64_t create_ms,
                          v1::JobState state = v1::JOB_STATE_QUEUED) {
  v1::Job& job = q.AddJob(id, 0, create_ms, 0, state);
  std::deque<TaskRecord>& tasks = q.TasksOf(id);
  for (int i = 0; i < 3; ++i) {
    TaskRecord t = QueuedTask(id + "-c" + std::to_string(i), 4000, 0);
    t.kind = v1::TASK_KIND_CALIBRATE;
    tasks.push_back(t);
  }
  TaskRecord reduce = QueuedTask(id + "-reduce", 2000, 0);
  reduce.kind = v1::TASK_KIND_REDUCE;
  reduce.state = v1::TASK_STATE_PENDING;
  tasks.push_back(reduce);
  for (int i = 0; i < 2; ++i) {
    TaskRecord t = QueuedTask(id + "-q" + std::to_string(i));
    t.state = v1::TASK_STATE_PENDING;
    tasks.push_back(t);
  }
  TaskRecord assemble = QueuedTask(id + "-assemble");
  assemble.kind = v1::TASK_KIND_ASSEMBLE;
  assemble.state = v1::TASK_STATE_PENDING;
  assemble.backends.clear();
  tasks.push_back(assemble);
  return job;
}

TEST(SchedulerTest, CalibrationStagesAreLeasedInOrderAsTheirTasksBecomeQueued) {
  FakeClock clock;
  const Scheduler s(Policy());
  Queue q;
  v1::Job& job = AddCalibratedJob(q, "job", clock.NowMs());
  std::deque<TaskRecord>& tasks = q.TasksOf("job");
  const WorkerRecord w = Worker({"cpu"});
  // Only the CALIBRATE shards are queued: nothing else is leased, whatever the order.
  EXPECT_EQ(q.Drain(s, w, clock.NowMs()),
            (std::vector<std::string>{"job-c0", "job-c1", "job-c2"}));
  // The job is CALIBRATING now; shard 1's lease expired and it waits out its backoff.
  tasks[1].state = v1::TASK_STATE_QUEUED;
  tasks[1].attempt = 1;
  tasks[1].not_before_ms = clock.NowMs() + 1'000;
  tasks[0].state = tasks[2].state = v1::TASK_STATE_SUCCEEDED;
  job.set_state(v1::JOB_STATE_CALIBRATING);
  EXPECT_EQ(s.PickTask(w, q.Jobs(), clock.NowMs()), nullptr);
  clock.AdvanceMs(1'000);
  EXPECT_EQ(q.Drain(s, w, clock.NowMs()), (std::vector<std::string>{"job-c1"}));
  // Every shard done: the JobManager queues the REDUCE, which is leased like any task.
  tasks[1].state = v1::TASK_STATE_SUCCEEDED;
  tasks[3].state = v1::TASK_STATE_QUEUED;
  EXPECT_EQ(q.Drain(s, w, clock.NowMs()), (std::vector<std::string>{"job-reduce"}));
  // REDUCE done: QUANTIZE tasks are queued (the job QUANTIZING); ASSEMBLE never goes out.
  tasks[3].state = v1::TASK_STATE_SUCCEEDED;
  tasks[4].state = tasks[5].state = v1::TASK_STATE_QUEUED;
  tasks[6].state = v1::TASK_STATE_QUEUED;
  job.set_state(v1::JOB_STATE_QUANTIZING);
  EXPECT_EQ(q.Drain(s, w, clock.NowMs()), (std::vector<std::string>{"job-q0", "job-q1"}));
}

TEST(SchedulerTest, CalibrationTasksObeyBackendsAndMemoryBudgets) {
  FakeClock clock;
  const Scheduler s(Policy());
  Queue q;
  AddCalibratedJob(q, "job", clock.NowMs(), v1::JOB_STATE_CALIBRATING);
  std::deque<TaskRecord>& tasks = q.TasksOf("job");
  tasks[1].state = tasks[2].state = v1::TASK_STATE_SUCCEEDED;
  // 4000 host bytes: a CPU worker with 3999 is skipped, one with 4000 gets it.
  EXPECT_EQ(s.PickTask(Worker({"cpu"}, 3999), q.Jobs(), clock.NowMs()), nullptr);
  EXPECT_EQ(s.PickTask(Worker({"metal"}), q.Jobs(), clock.NowMs()), nullptr);
  const TaskRecord* t = s.PickTask(Worker({"cpu"}, 4000), q.Jobs(), clock.NowMs());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->id, "job-c0");
  // A CUDA-only budget compares the device estimate (0 here: fits any budget).
  t = s.PickTask(Worker({"cuda"}, 1), q.Jobs(), clock.NowMs());
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->id, "job-c0");
}

TEST(SchedulerTest, AWorkerSilentForLongerThanTheLimitIsLost) {
  FakeClock clock;
  const Scheduler s(Policy());
  WorkerRecord w = Worker({"cpu"});
  w.last_seen_ms = clock.NowMs();
  clock.AdvanceMs(30'000);
  EXPECT_FALSE(s.WorkerLost(w, clock.NowMs()));
  clock.AdvanceMs(1);
  EXPECT_TRUE(s.WorkerLost(w, clock.NowMs()));
  w.last_seen_ms = clock.NowMs();  // any call counts
  EXPECT_FALSE(s.WorkerLost(w, clock.NowMs()));
}

TEST(SchedulerTest, FencingAcceptsOnlyTheCurrentAttemptsToken) {
  TaskRecord t = QueuedTask("t");
  t.state = v1::TASK_STATE_RUNNING;
  t.attempt = 0;
  t.lease_token = "token-attempt-0";
  EXPECT_EQ(Scheduler::CheckLease(t, "token-attempt-0"), LeaseCheck::kHeld);
  EXPECT_EQ(Scheduler::CheckLease(t, "token-attempt-9"), LeaseCheck::kStale);
  EXPECT_EQ(Scheduler::CheckLease(t, ""), LeaseCheck::kStale);

  // The lease expired and the next attempt got a new token: the old holder is fenced off.
  t.attempt = 1;
  t.lease_token = "token-attempt-1";
  EXPECT_EQ(Scheduler::CheckLease(t, "token-attempt-0"), LeaseCheck::kStale);
  EXPECT_EQ(Scheduler::CheckLease(t, "token-attempt-1"), LeaseCheck::kHeld);

  // Completed: the same token repeats an accepted completion, another one is stale.
  t.state = v1::TASK_STATE_SUCCEEDED;
  EXPECT_EQ(Scheduler::CheckLease(t, "token-attempt-1"), LeaseCheck::kAlreadySucceeded);
  EXPECT_EQ(Scheduler::CheckLease(t, "token-attempt-0"), LeaseCheck::kStale);

  // Requeued or stopped: no token holds it, not even its last one.
  for (v1::TaskState state : {v1::TASK_STATE_QUEUED, v1::TASK_STATE_FAILED,
                              v1::TASK_STATE_CANCELLED}) {
    t.state = state;
    EXPECT_EQ(Scheduler::CheckLease(t, "token-attempt-1"), LeaseCheck::kStale)
        << v1::TaskState_Name(state);
  }
  // A task never leased has no token; an empty one does not match it.
  TaskRecord fresh = QueuedTask("fresh");
  fresh.state = v1::TASK_STATE_RUNNING;
  EXPECT_EQ(Scheduler::CheckLease(fresh, ""), LeaseCheck::kStale);
}

}  // namespace
}  // namespace qforge

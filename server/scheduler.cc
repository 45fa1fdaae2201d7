#include "server/scheduler.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string_view>

namespace qforge {
namespace {

bool HasBackend(const WorkerRecord& worker, std::string_view backend) {
  const auto& offered = worker.registration.backends();
  return std::find(offered.begin(), offered.end(), backend) != offered.end();
}

bool Runnable(v1::JobState s) {
  return s == v1::JOB_STATE_QUEUED || s == v1::JOB_STATE_CALIBRATING ||
         s == v1::JOB_STATE_QUANTIZING || s == v1::JOB_STATE_EVALUATING;
}

}  // namespace

uint64_t Scheduler::MemoryNeeded(const WorkerRecord& worker, const TaskRecord& task) {
  const bool device_budget = worker.registration.memory_budget_bytes() != 0 &&
                             HasBackend(worker, "cuda") && !HasBackend(worker, "cpu");
  return device_budget ? task.gpu_memory_bytes : task.memory_bytes;
}

bool Scheduler::FitsWorker(const WorkerRecord& worker, const TaskRecord& task) {
  const uint64_t budget = worker.registration.memory_budget_bytes();
  if (budget != 0 && MemoryNeeded(worker, task) > budget) return false;
  return std::any_of(task.backends.begin(), task.backends.end(),
                     [&](const std::string& b) { return HasBackend(worker, b); });
}

const TaskRecord* Scheduler::PickTask(const WorkerRecord& worker,
                                      const std::vector<SchedulableJob>& jobs,
                                      int64_t now) const {
  // Fair share between tenants: each tenant's tasks running on workers now.
  std::map<std::string_view, int64_t> running;
  std::vector<const SchedulableJob*> order;
  for (const SchedulableJob& j : jobs) {
    int64_t& n = running[j.job->tenant()];
    for (const TaskRecord* t : *j.tasks) {
      if (t->state == v1::TASK_STATE_RUNNING && RunsOnWorkers(t->kind)) ++n;
    }
    if (Runnable(j.job->state())) order.push_back(&j);
  }
  std::sort(order.begin(), order.end(), [&running](const SchedulableJob* a,
                                                   const SchedulableJob* b) {
    const v1::Job& x = *a->job;
    const v1::Job& y = *b->job;
    if (x.spec().priority() != y.spec().priority()) {
      return x.spec().priority() > y.spec().priority();
    }
    if (x.tenant() != y.tenant()) {
      const int64_t rx = running.at(x.tenant()), ry = running.at(y.tenant());
      if (rx != ry) return rx < ry;
    }
    if (x.create_time_unix_ms() != y.create_time_unix_ms()) {
      return x.create_time_unix_ms() < y.create_time_unix_ms();
    }
    return x.id() < y.id();
  });
  for (const SchedulableJob* j : order) {
    for (const TaskRecord* t : *j->tasks) {
      if (!RunsOnWorkers(t->kind) || t->state != v1::TASK_STATE_QUEUED) continue;
      if (t->not_before_ms > now) continue;
      if (FitsWorker(worker, *t)) return t;
    }
  }
  return nullptr;
}

bool Scheduler::RunsOnWorkers(v1::TaskKind kind) {
  return kind == v1::TASK_KIND_CALIBRATE || kind == v1::TASK_KIND_REDUCE ||
         kind == v1::TASK_KIND_QUANTIZE || kind == v1::TASK_KIND_EVALUATE ||
         kind == v1::TASK_KIND_EVAL_REDUCE;
}

bool Scheduler::LeaseExpired(const TaskRecord& task, int64_t now) const {
  return RunsOnWorkers(task.kind) && task.state == v1::TASK_STATE_RUNNING &&
         task.lease_expiry_ms <= now;
}

bool Scheduler::WorkerLost(const WorkerRecord& worker, int64_t now) const {
  return now - worker.last_seen_ms > policy_.worker_lost_after_ms;
}

int64_t Scheduler::RetryBackoffMs(int32_t attempt) const {
  double backoff = static_cast<double>(policy_.retry_initial_backoff_ms) *
                   std::pow(std::max(1.0, policy_.retry_backoff_multiplier), attempt);
  backoff = std::min(backoff, static_cast<double>(policy_.retry_max_backoff_ms));
  return static_cast<int64_t>(backoff);
}

RetryDecision Scheduler::DecideRetry(const TaskRecord& task, int max_attempts, bool retryable,
                                     int64_t now) const {
  RetryDecision d;
  d.retry = retryable && task.attempt + 1 < std::max(1, max_attempts);
  if (d.retry) {
    d.backoff_ms = RetryBackoffMs(task.attempt);
    d.not_before_ms = now + d.backoff_ms;
  }
  return d;
}

LeaseCheck Scheduler::CheckLease(const TaskRecord& task, std::string_view lease_token) {
  if (lease_token.empty() || task.lease_token != lease_token) return LeaseCheck::kStale;
  if (task.state == v1::TASK_STATE_RUNNING) return LeaseCheck::kHeld;
  if (task.state == v1::TASK_STATE_SUCCEEDED) return LeaseCheck::kAlreadySucceeded;
  return LeaseCheck::kStale;
}

}  // namespace qforge

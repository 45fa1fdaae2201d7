#include "server/rpc_job_service.h"

#include <algorithm>
#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/grpc_status.h"

namespace qforge {
namespace {

// A reactor that answers a unary call with `status` at once.
grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* context,
                                    const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// A stream that ends with `status` before writing anything.
class FinishedWriteReactor final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  explicit FinishedWriteReactor(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

// WatchJob: long-poll slices of JobManager::WatchEvents on the executor, then one StartWrite
// at a time. Exactly one of {a queued fetch, an outstanding write} exists at any moment until
// Finish, which is called exactly once; gRPC calls OnDone after Finish and deletes us.
class WatchJobReactor final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  WatchJobReactor(JobManager* manager, LongPollExecutor* executor, const RpcServiceOptions& options,
                  grpc::CallbackServerContext* context, std::string tenant, std::string job_id,
                  int64_t after_sequence, bool history_only)
      : manager_(manager),
        executor_(executor),
        options_(options),
        context_(context),
        tenant_(std::move(tenant)),
        job_id_(std::move(job_id)),
        history_only_(history_only),
        after_sequence_(after_sequence) {
    ScheduleFetch();
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      // The stream broke (client gone or cancelled); nothing more can be written.
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "WatchJob: the stream was closed"));
      return;
    }
    after_sequence_ = batch_[next_ - 1].sequence();
    WriteNextOrFetch();
  }

  void OnCancel() override { cancelled_.store(true); }
  void OnDone() override { delete this; }

 private:
  void ScheduleFetch() {
    executor_->Submit([this] { Fetch(); });
  }

  void Fetch() {
    if (cancelled_.load() || context_->IsCancelled()) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "WatchJob: cancelled by the caller"));
      return;
    }
    const bool draining = executor_->draining();
    bool job_finished = false;
    // Never waits here: with nothing new the stream registers for the job's next event
    // (JobManager::NotifyOnEvents) and holds no thread meanwhile.
    absl::StatusOr<std::vector<v1::JobEvent>> events = manager_->WatchEvents(
        tenant_, job_id_, after_sequence_, options_.watch_batch_events, /*wait_ms=*/0,
        &job_finished);
    if (!events.ok()) {
      Finish(ToGrpcStatus(events.status()));
      return;
    }
    if (events->empty()) {
      if (job_finished || history_only_) {
        Finish(grpc::Status::OK);
      } else if (draining) {
        Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            absl::StrCat("the coordinator is shutting down; resume watching job ",
                                         job_id_, " with after_sequence=", after_sequence_)));
      } else {
        // Woken by the next event, or after a slice to notice a departed caller or a drain.
        manager_->NotifyOnEvents(job_id_, after_sequence_, options_.poll_slice_ms,
                                 [this] { ScheduleFetch(); });
      }
      return;
    }
    batch_ = *std::move(events);
    next_ = 0;
    job_finished_ = job_finished;
    WriteNextOrFetch();
  }

  void WriteNextOrFetch() {
    if (next_ < batch_.size()) {
      StartWrite(&batch_[next_++]);
      return;
    }
    if (job_finished_) {
      Finish(grpc::Status::OK);
      return;
    }
    ScheduleFetch();
  }

  JobManager* const manager_;
  LongPollExecutor* const executor_;
  const RpcServiceOptions options_;
  grpc::CallbackServerContext* const context_;
  const std::string tenant_;
  const std::string job_id_;
  const bool history_only_;  // end once the recorded events are sent
  // Only touched by whoever holds the single pending step (fetch or write completion).
  int64_t after_sequence_;
  std::vector<v1::JobEvent> batch_;
  size_t next_ = 0;
  bool job_finished_ = false;
  std::atomic<bool> cancelled_{false};
};

}  // namespace

JobServiceImpl::JobServiceImpl(JobManager* manager, const Authenticator* auth,
                               LongPollExecutor* executor, RpcServiceOptions options)
    : manager_(manager), auth_(auth), executor_(executor), options_(options) {}

grpc::ServerUnaryReactor* JobServiceImpl::SubmitJob(grpc::CallbackServerContext* context,
                                                    const v1::SubmitJobRequest* request,
                                                    v1::Job* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Planning reads model headers from the (possibly remote) store: off the callback thread.
  executor_->Submit([this, reactor, request, response, tenant = *std::move(tenant)] {
    absl::StatusOr<v1::Job> job = manager_->SubmitJob(tenant, *request);
    if (job.ok()) *response = *std::move(job);
    reactor->Finish(ToGrpcStatus(job.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* JobServiceImpl::GetJob(grpc::CallbackServerContext* context,
                                                 const v1::GetJobRequest* request,
                                                 v1::Job* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  absl::StatusOr<v1::Job> job = manager_->GetJob(*tenant, request->id());
  if (job.ok()) *response = *std::move(job);
  return FinishNow(context, ToGrpcStatus(job.status()));
}

grpc::ServerUnaryReactor* JobServiceImpl::GetJobReport(grpc::CallbackServerContext* context,
                                                       const v1::GetJobReportRequest* request,
                                                       v1::JobReport* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // Reads the job's manifest from the (possibly remote) store: off the callback thread.
  executor_->Submit([this, reactor, request, response, tenant = *std::move(tenant)] {
    absl::StatusOr<v1::JobReport> report = manager_->GetJobReport(tenant, request->id());
    if (report.ok()) *response = *std::move(report);
    reactor->Finish(ToGrpcStatus(report.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* JobServiceImpl::ListJobs(grpc::CallbackServerContext* context,
                                                   const v1::ListJobsRequest* request,
                                                   v1::ListJobsResponse* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  absl::StatusOr<v1::ListJobsResponse> jobs = manager_->ListJobs(*tenant, *request);
  if (jobs.ok()) *response = *std::move(jobs);
  return FinishNow(context, ToGrpcStatus(jobs.status()));
}

grpc::ServerUnaryReactor* JobServiceImpl::CancelJob(grpc::CallbackServerContext* context,
                                                    const v1::CancelJobRequest* request,
                                                    v1::Job* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  absl::StatusOr<v1::Job> job = manager_->CancelJob(*tenant, request->id());
  if (job.ok()) *response = *std::move(job);
  return FinishNow(context, ToGrpcStatus(job.status()));
}

grpc::ServerWriteReactor<v1::JobEvent>* JobServiceImpl::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return new FinishedWriteReactor(ToGrpcStatus(tenant.status()));
  return new WatchJobReactor(manager_, executor_, options_, context, *std::move(tenant),
                             request->id(), request->after_sequence(),
                             request->history_only());
}

grpc::ServerUnaryReactor* JobServiceImpl::ListLayers(grpc::CallbackServerContext* context,
                                                     const v1::ListLayersRequest* request,
                                                     v1::ListLayersResponse* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  // A finished job's tasks are read from the database: off the callback thread.
  executor_->Submit([this, reactor, request, response, tenant = *std::move(tenant)] {
    absl::StatusOr<v1::ListLayersResponse> layers = manager_->ListLayers(tenant, *request);
    if (layers.ok()) *response = *std::move(layers);
    reactor->Finish(ToGrpcStatus(layers.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* JobServiceImpl::DeleteJob(grpc::CallbackServerContext* context,
                                                    const v1::DeleteJobRequest* request,
                                                    v1::DeleteJobResponse* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  return FinishNow(context, ToGrpcStatus(manager_->DeleteJob(*tenant, request->id())));
}

grpc::ServerUnaryReactor* JobServiceImpl::ListWorkers(grpc::CallbackServerContext* context,
                                                      const v1::ListWorkersRequest* request,
                                                      v1::ListWorkersResponse* response) {
  absl::StatusOr<std::string> tenant = auth_->AuthenticateClient(*context);
  if (!tenant.ok()) return FinishNow(context, ToGrpcStatus(tenant.status()));
  for (v1::WorkerInfo& w : manager_->ListWorkers(*tenant)) *response->add_workers() = std::move(w);
  return FinishNow(context, ToGrpcStatus(absl::OkStatus()));
}

}  // namespace qforge

#include "server/rpc_worker_service.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <utility>

#include "base/status_macros.h"
#include "common/tls.h"
#include "server/grpc_status.h"

namespace qforge {
namespace {

grpc::ServerUnaryReactor* FinishNow(grpc::CallbackServerContext* context,
                                    const grpc::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

}  // namespace

// One AcquireTask long-poll in flight; owned by the chain of executor slices, deleted by the
// slice that finishes the call.
struct WorkerServiceImpl::AcquireCall {
  grpc::CallbackServerContext* context;
  grpc::ServerUnaryReactor* reactor;
  const v1::AcquireTaskRequest* request;
  v1::AcquireTaskResponse* response;
  std::chrono::steady_clock::time_point give_up;  // answer empty from here on
  bool tried = false;                              // at least one attempt made
};

WorkerServiceImpl::WorkerServiceImpl(JobManager* manager, const Authenticator* auth,
                                     LongPollExecutor* executor, RpcServiceOptions options)
    : manager_(manager), auth_(auth), executor_(executor), options_(options) {}

absl::Status WorkerServiceImpl::Authenticate(const grpc::ServerContextBase& context) const {
  if (options_.require_worker_certificate) {
    QF_RETURN_IF_ERROR(RequireVerifiedClientCertificate(context, "WorkerService"));
  }
  return auth_->AuthenticateWorker(context);
}

grpc::ServerUnaryReactor* WorkerServiceImpl::RegisterWorker(
    grpc::CallbackServerContext* context, const v1::RegisterWorkerRequest* request,
    v1::RegisterWorkerResponse* response) {
  if (absl::Status s = Authenticate(*context); !s.ok()) {
    return FinishNow(context, ToGrpcStatus(s));
  }
  absl::StatusOr<v1::RegisterWorkerResponse> r = manager_->RegisterWorker(*request);
  if (r.ok()) *response = *std::move(r);
  return FinishNow(context, ToGrpcStatus(r.status()));
}

grpc::ServerUnaryReactor* WorkerServiceImpl::AcquireTask(grpc::CallbackServerContext* context,
                                                         const v1::AcquireTaskRequest* request,
                                                         v1::AcquireTaskResponse* response) {
  if (absl::Status s = Authenticate(*context); !s.ok()) {
    return FinishNow(context, ToGrpcStatus(s));
  }
  using std::chrono::milliseconds;
  const auto now_steady = std::chrono::steady_clock::now();
  int64_t wait_ms = std::clamp<int64_t>(request->wait_ms(), 0, options_.max_acquire_wait_ms);
  // Answer before the caller's deadline (infinite when unset) so the reply is not lost.
  const auto deadline = context->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    const int64_t to_deadline = std::chrono::duration_cast<milliseconds>(
                                    deadline - std::chrono::system_clock::now())
                                    .count();
    wait_ms = std::min(wait_ms, std::max<int64_t>(0, to_deadline - options_.deadline_margin_ms));
  }
  auto* call = new AcquireCall{context, context->DefaultReactor(), request, response,
                               now_steady + milliseconds(wait_ms)};
  grpc::ServerUnaryReactor* reactor = call->reactor;
  executor_->Submit([this, call] { PollAcquire(call); });
  return reactor;
}

void WorkerServiceImpl::PollAcquire(AcquireCall* call) {
  auto finish = [call](const grpc::Status& status) {
    grpc::ServerUnaryReactor* reactor = call->reactor;
    delete call;
    reactor->Finish(status);
  };
  if (call->context->IsCancelled()) {
    // Nobody would receive a task leased now.
    finish(grpc::Status(grpc::StatusCode::CANCELLED, "AcquireTask: cancelled by the caller"));
    return;
  }
  const auto now = std::chrono::steady_clock::now();
  int64_t remaining_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(call->give_up - now).count();
  if (executor_->draining()) remaining_ms = 0;  // shutting down: one last non-blocking try
  if (call->tried && remaining_ms <= 0) {
    finish(grpc::Status::OK);  // empty response: no task in time
    return;
  }
  call->tried = true;
  // Never waits here: with nothing to lease the call registers for new work
  // (JobManager::NotifyOnWork) and holds no thread meanwhile. The generation is read first,
  // so that work queued during the attempt wakes it at once.
  const uint64_t generation = manager_->WorkGeneration();
  v1::AcquireTaskRequest attempt = *call->request;
  attempt.set_wait_ms(0);
  absl::StatusOr<std::optional<v1::Task>> task = manager_->AcquireTask(attempt);
  if (!task.ok()) {
    finish(ToGrpcStatus(task.status()));
    return;
  }
  if (task->has_value()) {
    *call->response->mutable_task() = std::move(**task);
    finish(grpc::Status::OK);
    return;
  }
  if (std::chrono::steady_clock::now() >= call->give_up || executor_->draining()) {
    finish(grpc::Status::OK);  // empty response: no task in time
    return;
  }
  // Until new work, the end of the wait, or a slice (to notice a departed caller or a drain).
  const int64_t wait_ms = std::clamp<int64_t>(remaining_ms, 0, options_.poll_slice_ms);
  manager_->NotifyOnWork(generation, wait_ms,
                         [this, call] { executor_->Submit([this, call] { PollAcquire(call); }); });
}

grpc::ServerUnaryReactor* WorkerServiceImpl::Heartbeat(grpc::CallbackServerContext* context,
                                                       const v1::HeartbeatRequest* request,
                                                       v1::HeartbeatResponse* response) {
  if (absl::Status s = Authenticate(*context); !s.ok()) {
    return FinishNow(context, ToGrpcStatus(s));
  }
  absl::StatusOr<v1::HeartbeatResponse> r = manager_->Heartbeat(*request);
  if (r.ok()) *response = *std::move(r);
  return FinishNow(context, ToGrpcStatus(r.status()));
}

grpc::ServerUnaryReactor* WorkerServiceImpl::CompleteTask(grpc::CallbackServerContext* context,
                                                          const v1::CompleteTaskRequest* request,
                                                          v1::CompleteTaskResponse* response) {
  if (absl::Status s = Authenticate(*context); !s.ok()) {
    return FinishNow(context, ToGrpcStatus(s));
  }
  // CompleteTask hashes the staged object (streaming, possibly hundreds of MB): never on a
  // callback thread. The reactor is finished from the executor.
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  executor_->Submit([this, reactor, request, response] {
    reactor->Finish(ToGrpcStatus(manager_->CompleteTask(*request, response)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* WorkerServiceImpl::FailTask(grpc::CallbackServerContext* context,
                                                      const v1::FailTaskRequest* request,
                                                      v1::FailTaskResponse* response) {
  if (absl::Status s = Authenticate(*context); !s.ok()) {
    return FinishNow(context, ToGrpcStatus(s));
  }
  return FinishNow(context, ToGrpcStatus(manager_->FailTask(*request)));
}

}  // namespace qforge

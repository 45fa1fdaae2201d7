// WorkerServiceImpl: the gRPC edge of qforge.v1.WorkerService
// (proto/qforge/v1/worker_service.proto). It only translates: checks the worker token
// (server/auth.h), calls the JobManager and converts its absl::Status with ToGrpcStatus
// (server/grpc_status.h).
//
// AcquireTask is a long-poll: the wait is min(request.wait_ms, max_acquire_wait_ms, the
// caller's deadline - deadline_margin_ms); it is served by slices of at most poll_slice_ms
// on the LongPollExecutor, so no gRPC callback thread blocks, and answers an empty
// AcquireTaskResponse when the wait passes with no task (also when the coordinator begins
// shutting down). wait_ms <= 0 tries once without waiting. A caller that cancels stops being
// polled for within one slice. CompleteTask, which reads and hashes the staged output, runs
// on the executor too. RegisterWorker, Heartbeat and FailTask run inline on the callback
// threads.
//
// Thread-safety: a gRPC service; `manager`, `auth` and `executor` must outlive the server
// the service is registered with.
#ifndef QFORGE_SERVER_RPC_WORKER_SERVICE_H_
#define QFORGE_SERVER_RPC_WORKER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include "qforge/v1/worker_service.grpc.pb.h"
#include "server/auth.h"
#include "server/job_manager.h"
#include "server/long_poll_executor.h"
#include "server/rpc_options.h"

namespace qforge {

class WorkerServiceImpl final : public v1::WorkerService::CallbackService {
 public:
  WorkerServiceImpl(JobManager* manager, const Authenticator* auth, LongPollExecutor* executor,
                    RpcServiceOptions options = {});

  grpc::ServerUnaryReactor* RegisterWorker(grpc::CallbackServerContext* context,
                                           const v1::RegisterWorkerRequest* request,
                                           v1::RegisterWorkerResponse* response) override;
  grpc::ServerUnaryReactor* AcquireTask(grpc::CallbackServerContext* context,
                                        const v1::AcquireTaskRequest* request,
                                        v1::AcquireTaskResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* CompleteTask(grpc::CallbackServerContext* context,
                                         const v1::CompleteTaskRequest* request,
                                         v1::CompleteTaskResponse* response) override;
  grpc::ServerUnaryReactor* FailTask(grpc::CallbackServerContext* context,
                                     const v1::FailTaskRequest* request,
                                     v1::FailTaskResponse* response) override;

 private:
  struct AcquireCall;
  void PollAcquire(AcquireCall* call);
  // The caller is a worker: a verified client certificate when
  // options_.require_worker_certificate (mutual TLS), then the worker token.
  absl::Status Authenticate(const grpc::ServerContextBase& context) const;

  JobManager* const manager_;
  const Authenticator* const auth_;
  LongPollExecutor* const executor_;
  const RpcServiceOptions options_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_RPC_WORKER_SERVICE_H_

// JobServiceImpl: the gRPC edge of qforge.v1.JobService (proto/qforge/v1/job_service.proto).
// It only translates: authenticates the caller (server/auth.h) to a tenant, calls the
// JobManager, and converts its absl::Status with ToGrpcStatus (server/grpc_status.h).
//
// Threading: GetJob, ListJobs, CancelJob and ListWorkers run inline on gRPC's callback
// threads (in-memory state plus one SQLite transaction). SubmitJob reads safetensors headers
// from the object store, which may be remote, so it runs on the LongPollExecutor, and so does
// GetJobReport (it reads the manifest). WatchJob is
// a ServerWriteReactor: a fetch on the executor (WatchEvents without waiting) writes what is
// new one event at a time; with nothing new it registers for the job's next event
// (JobManager::NotifyOnEvents) and holds no thread until then, so open streams cost no
// threads (500 streams: ServiceTest.FiveHundredOpenStreamsDoNotSlowAJob). It ends with OK after the job's terminal event, and is resumable: a caller
// that reconnects with after_sequence = the last sequence it saw gets exactly the rest. When
// the coordinator shuts down an open stream ends with UNAVAILABLE. With history_only it
// sends the events recorded so far and ends OK. ListLayers runs on the executor (a finished
// job's tasks are read from the database); DeleteJob inline (one transaction).
//
// Thread-safety: a gRPC service; `manager`, `auth` and `executor` must outlive the server
// the service is registered with.
#ifndef QFORGE_SERVER_RPC_JOB_SERVICE_H_
#define QFORGE_SERVER_RPC_JOB_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include "qforge/v1/job_service.grpc.pb.h"
#include "server/auth.h"
#include "server/job_manager.h"
#include "server/long_poll_executor.h"
#include "server/rpc_options.h"

namespace qforge {

class JobServiceImpl final : public v1::JobService::CallbackService {
 public:
  JobServiceImpl(JobManager* manager, const Authenticator* auth, LongPollExecutor* executor,
                 RpcServiceOptions options = {});

  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const v1::SubmitJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request, v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJobReport(grpc::CallbackServerContext* context,
                                         const v1::GetJobReportRequest* request,
                                         v1::JobReport* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest* request,
                                     v1::ListJobsResponse* response) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(grpc::CallbackServerContext* context,
                                                   const v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* ListWorkers(grpc::CallbackServerContext* context,
                                        const v1::ListWorkersRequest* request,
                                        v1::ListWorkersResponse* response) override;
  grpc::ServerUnaryReactor* ListLayers(grpc::CallbackServerContext* context,
                                       const v1::ListLayersRequest* request,
                                       v1::ListLayersResponse* response) override;
  grpc::ServerUnaryReactor* DeleteJob(grpc::CallbackServerContext* context,
                                      const v1::DeleteJobRequest* request,
                                      v1::DeleteJobResponse* response) override;

 private:
  JobManager* const manager_;
  const Authenticator* const auth_;
  LongPollExecutor* const executor_;
  const RpcServiceOptions options_;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_RPC_JOB_SERVICE_H_

// Tuning of the coordinator's gRPC adapters (server/rpc_job_service.h,
// server/rpc_worker_service.h). Defaults suit production; tests shorten them.
#ifndef QFORGE_SERVER_RPC_OPTIONS_H_
#define QFORGE_SERVER_RPC_OPTIONS_H_

#include <cstdint>

namespace qforge {

struct RpcServiceOptions {
  // Longest a waiting long-poll (AcquireTask, WatchJob) stays registered without news
  // before it checks again: the delay with which it notices that its caller went away or
  // that the server is draining. Waiting holds no thread (JobManager::NotifyOnWork/Events).
  int64_t poll_slice_ms = 1'000;
  // Cap on AcquireTask's wait_ms (JobManagerOptions::max_acquire_wait_ms should agree).
  int64_t max_acquire_wait_ms = 30'000;
  // A long-poll answers this long before the caller's deadline, so the reply arrives in time.
  int64_t deadline_margin_ms = 500;
  // Events fetched per WatchEvents call of a WatchJob stream.
  int watch_batch_events = 128;
  // Mutual TLS (common/tls.h): every WorkerService call must come with a client certificate
  // the server verified against --tls-ca; UNAUTHENTICATED otherwise.
  bool require_worker_certificate = false;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_RPC_OPTIONS_H_

// Tuning of the coordinator's gRPC adapters (server/rpc_job_service.h,
// server/rpc_worker_service.h). Defaults suit production; tests shorten them.
#ifndef QFORGE_SERVER_RPC_OPTIONS_H_
#define QFORGE_SERVER_RPC_OPTIONS_H_

#include <cstdint>

namespace qforge {

struct RpcServiceOptions {
  // Longest single blocking JobManager call of a long-poll (AcquireTask, WatchJob): the
  // unit of sharing of the LongPollExecutor, and the delay with which a long-poll notices
  // that its caller went away.
  int64_t poll_slice_ms = 1'000;
  // Cap on AcquireTask's wait_ms (JobManagerOptions::max_acquire_wait_ms should agree).
  int64_t max_acquire_wait_ms = 30'000;
  // A long-poll answers this long before the caller's deadline, so the reply arrives in time.
  int64_t deadline_margin_ms = 500;
  // Events fetched per WatchEvents call of a WatchJob stream.
  int watch_batch_events = 128;
};

}  // namespace qforge

#endif  // QFORGE_SERVER_RPC_OPTIONS_H_

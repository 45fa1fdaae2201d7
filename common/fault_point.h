// Fault points: the named steps of the coordinator and the worker where the fault-matrix
// tests (tests/faults/) inject a fault, and the hook through which they wrap every object
// store a process opens (OpenObjectStore).
//
// In every release binary these are no-ops: FaultPoint returns OK, FaultHooksEnabled false
// and WrapStoreForFaults its argument (weak definitions in common/fault_point.cc). Only the
// test binaries qforge-coordinator-faults and qforge-worker-faults link
// tests/faults/fault_injector.cc, whose definitions replace these and follow the plan in
// the QFORGE_FAULTS environment variable (kill the process with SIGKILL, return an error,
// or sleep, at a named point). No release binary reads QFORGE_FAULTS.
//
// Names are dotted, "<where>.<step>[.<detail>]": "worker.quantize.fetch",
// "coordinator.persist.before.task.QUANTIZE.SUCCEEDED", "assemble.written", ... The list,
// and what each fault means to a job, is in docs/operations.md ("Failure semantics").
//
// Thread-safety: all three may be called from any thread.
#ifndef QFORGE_COMMON_FAULT_POINT_H_
#define QFORGE_COMMON_FAULT_POINT_H_

#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "common/object_store.h"

namespace qforge {

// OK, or the error a test injects at step `name`. The caller handles it exactly as it would
// the same error of the step itself (it must not be a new failure mode). A test may also
// stop the process here with SIGKILL, or delay it.
absl::Status FaultPoint(std::string_view name);

// Whether fault hooks are linked in (false in release binaries): lets a caller skip
// building a point's name when nobody listens.
bool FaultHooksEnabled();

// `store` itself, or (fault tests) a wrapper whose calls may fail, sleep or kill the process.
std::unique_ptr<ObjectStore> WrapStoreForFaults(std::unique_ptr<ObjectStore> store);

}  // namespace qforge

#endif  // QFORGE_COMMON_FAULT_POINT_H_

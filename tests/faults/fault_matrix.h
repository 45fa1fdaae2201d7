// The fault matrix (issue 18): one cell per (participant, step, fault) — a worker or the
// coordinator killed with SIGKILL, or given an injected error, at each step of a job, the
// object store failing on read, write and list, a slow store — and the harness that runs a
// cell with real processes on loopback (ServiceCluster: the test-only binaries
// qforge-coordinator-faults and qforge-worker-faults, whose fault plan is QFORGE_FAULTS;
// common/fault_point.h, tests/faults/fault_injector.cc) and checks what must hold whatever
// the fault:
//  - the job ends SUCCEEDED with an artifact byte-identical to an undisturbed run (every
//    file but the manifest, whose job id and times differ), or, where the fault is
//    permanent, FAILED with the expected reason and no artifact;
//  - the fault was reached (its "qforge-fault: fired" line), else the cell tested nothing;
//  - no task completed twice in the manifest (one entry per layer, each task id once);
//  - no staging object and no store temp file left in the output;
//  - never a final object without the manifest: checked whenever a killed process is dead
//    (before the harness restarts it) and at the end. The one documented exception is a
//    coordinator killed between the renames of the publication (cell
//    coordinator.kill.assemble_publishing), where the files renamed so far stay without the
//    manifest until the restarted coordinator assembles again (docs/operations.md).
// A killed process is restarted without faults (the coordinator on the same address).
// Used by fault_matrix_test.cc (every cell once) and qforge-fault-soak (random cells).
//
// Thread-compatible; one FaultHarness per thread.
#ifndef QFORGE_TESTS_FAULTS_FAULT_MATRIX_H_
#define QFORGE_TESTS_FAULTS_FAULT_MATRIX_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"

namespace qforge::testing {

enum class FaultTarget { kWorker, kCoordinator, kBoth };

struct FaultCell {
  std::string name;    // "<participant>.<fault>.<step>", e.g. "worker.kill.solve"
  FaultTarget target;  // which process gets the plan
  std::string plan;    // its QFORGE_FAULTS (tests/faults/fault_injector.cc)
  // Empty: the job must SUCCEED. Otherwise the fault is permanent: the job must FAIL with
  // this Job.error.reason.
  std::string failure_reason;
};

// Every cell of the matrix, in a fixed order.
const std::vector<FaultCell>& FaultCells();

struct CellResult {
  std::string outcome;   // "SUCCEEDED", "FAILED:<reason>", "CANCELLED", "TIMEOUT", "SETUP"
  bool fired = false;    // the fault was reached
  int restarts = 0;      // processes the harness restarted after a kill
  int64_t retries = 0;   // the job's task retries
  std::vector<std::string> violations;  // broken expectations; empty: the cell passed
  std::string logs;      // where the processes' logs are (kept when the cell failed)
};

class FaultHarness {
 public:
  // `bin_dir`: the build tree (server/, worker/, client/, tools/, tests/faults/).
  explicit FaultHarness(std::string bin_dir);
  ~FaultHarness();

  // Generates the model (1 decoder layer, 7 linear layers) and runs it once undisturbed:
  // the baseline every cell is compared with.
  absl::Status Prepare();

  // Runs `cell` on a fresh coordinator, worker and state (same model).
  CellResult Run(const FaultCell& cell);

 private:
  std::string bin_, dir_, model_;
  std::map<std::string, std::string> baseline_;  // relative path -> sha256 (no manifest)
  size_t baseline_layers_ = 0;
  int runs_ = 0;
};

}  // namespace qforge::testing

#endif  // QFORGE_TESTS_FAULTS_FAULT_MATRIX_H_

// qforge-fault-soak: runs N cells of the fault matrix (tests/faults/fault_matrix.h) chosen at
// random (seeded), each with real processes on loopback, and prints how often each cell ended
// in each outcome and how many broke an invariant. Exit status 1 when any run broke one.
//
//   qforge-fault-soak --runs 1000 [--seed S] [--bin-dir BUILD]   # the documented soak
//   qforge-fault-soak --runs 5                                   # ctest fault_soak_short
//
// docs/operations.md ("Failure semantics") records a long run's counts.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>

#include "tests/faults/fault_matrix.h"

int main(int argc, char** argv) {
  using qforge::testing::CellResult;
  using qforge::testing::FaultCell;
  int runs = 5;
  unsigned seed = std::random_device{}();
  std::string bin = QFORGE_BIN_DIR;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      runs = std::atoi(argv[++i]);
    } else if (a == "--seed" && i + 1 < argc) {
      seed = static_cast<unsigned>(std::strtoul(argv[++i], nullptr, 10));
    } else if (a == "--bin-dir" && i + 1 < argc) {
      bin = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: qforge-fault-soak [--runs N] [--seed S] [--bin-dir BUILD_DIR]\n");
      return 2;
    }
  }
  if (runs <= 0) {
    std::fprintf(stderr, "qforge-fault-soak: --runs must be positive\n");
    return 2;
  }
  qforge::testing::FaultHarness harness(bin);
  if (absl::Status s = harness.Prepare(); !s.ok()) {
    std::fprintf(stderr, "qforge-fault-soak: %s\n", s.ToString().c_str());
    return 1;
  }
  const std::vector<FaultCell>& cells = qforge::testing::FaultCells();
  std::mt19937 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, cells.size() - 1);
  std::printf("qforge-fault-soak: %d runs, seed %u, %zu cells\n", runs, seed, cells.size());
  std::map<std::string, std::map<std::string, int>> outcomes;  // cell -> outcome -> runs
  std::map<std::string, int> broken;                           // cell -> runs with violations
  int total_broken = 0;
  for (int i = 0; i < runs; ++i) {
    const FaultCell& cell = cells[pick(rng)];
    const CellResult r = harness.Run(cell);
    ++outcomes[cell.name][r.outcome];
    if (!r.violations.empty()) {
      ++broken[cell.name];
      ++total_broken;
      std::printf("run %d %s: %s\n", i + 1, cell.name.c_str(), r.outcome.c_str());
      for (const std::string& v : r.violations) std::printf("  violation: %s\n", v.c_str());
      std::printf("  logs: %s\n", r.logs.c_str());
    }
    std::fflush(stdout);
  }
  std::printf("\n%-48s %-32s %6s %8s\n", "cell", "outcome", "runs", "broken");
  for (const auto& [cell, by_outcome] : outcomes) {
    for (const auto& [outcome, n] : by_outcome) {
      std::printf("%-48s %-32s %6d %8d\n", cell.c_str(), outcome.c_str(), n,
                  broken.count(cell) ? broken[cell] : 0);
    }
  }
  std::printf("\n%d runs, %d broke an invariant\n", runs, total_broken);
  return total_broken == 0 ? 0 : 1;
}

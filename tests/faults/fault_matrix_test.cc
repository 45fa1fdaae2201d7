// The fault matrix (tests/faults/fault_matrix.h) as one GoogleTest case per cell: each runs a
// job with real processes on loopback under one fault and checks the outcome, the artifact
// against an undisturbed run (computed once per process), the manifest, staging and temp
// files, and that no final file ever shows without the manifest.
#include <algorithm>
#include <cstdio>
#include <string>

#include "gtest/gtest.h"
#include "tests/faults/fault_matrix.h"

namespace qforge::testing {
namespace {

class FaultMatrixTest : public ::testing::TestWithParam<FaultCell> {
 protected:
  static void SetUpTestSuite() {
    harness_ = new FaultHarness(QFORGE_BIN_DIR);
    prepared_ = new absl::Status(harness_->Prepare());
  }
  static void TearDownTestSuite() {
    delete harness_;
    delete prepared_;
    harness_ = nullptr;
    prepared_ = nullptr;
  }
  static FaultHarness* harness_;
  static absl::Status* prepared_;
};

FaultHarness* FaultMatrixTest::harness_ = nullptr;
absl::Status* FaultMatrixTest::prepared_ = nullptr;

TEST_P(FaultMatrixTest, EndsAsExpectedWithNothingLeftOrDoubled) {
  ASSERT_TRUE(prepared_->ok()) << *prepared_;
  const FaultCell& cell = GetParam();
  const CellResult r = harness_->Run(cell);
  for (const std::string& v : r.violations) ADD_FAILURE() << cell.name << ": " << v;
  EXPECT_TRUE(r.fired) << cell.name;
  EXPECT_EQ(r.outcome, cell.failure_reason.empty() ? "SUCCEEDED" : "FAILED:" + cell.failure_reason);
  if (HasFailure()) std::fprintf(stderr, "logs of %s: %s\n", cell.name.c_str(), r.logs.c_str());
  std::fprintf(stderr, "cell %s: %s, %d restart(s), %lld retries\n", cell.name.c_str(),
               r.outcome.c_str(), r.restarts, static_cast<long long>(r.retries));
}

std::string CellTestName(const ::testing::TestParamInfo<FaultCell>& info) {
  std::string name = info.param.name;
  std::replace(name.begin(), name.end(), '.', '_');
  return name;
}

INSTANTIATE_TEST_SUITE_P(Cells, FaultMatrixTest, ::testing::ValuesIn(FaultCells()),
                         CellTestName);

}  // namespace
}  // namespace qforge::testing

// Test helper for the progress contract of quant/progress.h, shared by the CPU and CUDA
// solver tests: a SolveProgress that records every fraction it is called with and can answer
// false at a chosen call, the check of a successful solve's sequence, and VPTQ options that go
// through every reporting stage.
// Thread-safety: a ProgressRecorder belongs to one test (the solvers call it on one thread).
#ifndef QFORGE_TESTS_QUANT_PROGRESS_RECORDER_H_
#define QFORGE_TESTS_QUANT_PROGRESS_RECORDER_H_

#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

#include "quant/progress.h"
#include "quant/vptq.h"

namespace qforge::quant {

class ProgressRecorder {
 public:
  // stop_at: the 1-based call that answers false (0: every call answers true).
  explicit ProgressRecorder(size_t stop_at = 0) : stop_at_(stop_at) {}

  // The callback to put into a solver's options; this recorder must outlive the solve.
  SolveProgress Callback() {
    return [this](double fraction) {
      calls_.push_back(fraction);
      return calls_.size() != stop_at_;
    };
  }

  const std::vector<double>& calls() const { return calls_; }

 private:
  size_t stop_at_;
  std::vector<double> calls_;
};

// The sequence of a successful solve: at least one call, every fraction in [0, 1],
// nondecreasing, the last exactly 1.0.
inline ::testing::AssertionResult IsCompleteProgress(const std::vector<double>& calls) {
  if (calls.empty()) return ::testing::AssertionFailure() << "no progress call";
  for (size_t i = 0; i < calls.size(); ++i) {
    if (!(calls[i] >= 0.0 && calls[i] <= 1.0)) {
      return ::testing::AssertionFailure() << "call " << i << " reports " << calls[i];
    }
    if (i > 0 && calls[i] < calls[i - 1]) {
      return ::testing::AssertionFailure()
             << "call " << i << " reports " << calls[i] << " after " << calls[i - 1];
    }
  }
  if (calls.back() != 1.0) {
    return ::testing::AssertionFailure() << "the last call reports " << calls.back() << ", not 1";
  }
  return ::testing::AssertionSuccess();
}

// Every reporting stage of a VPTQ solve: outlier codebook, two groups, residual codebooks, the
// k-means-only pass of report_phase_errors; lazy blocks of 32 columns.
inline VptqOptions EveryStageVptq() {
  VptqOptions o;
  o.vector_len = 8;
  o.num_centroids = 32;
  o.num_res_centroids = 8;
  o.outlier_size = 16;
  o.outlier_vector_len = 4;
  o.outlier_num_centroids = 16;
  o.group_num = 2;
  o.block_size = 32;
  o.kmeans_iterations = 6;
  o.report_phase_errors = true;
  return o;
}

}  // namespace qforge::quant

#endif  // QFORGE_TESTS_QUANT_PROGRESS_RECORDER_H_

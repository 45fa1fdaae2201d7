// Test helper for the progress contract of worker/quant/progress.h, shared by the CPU and CUDA
// solver tests: a SolveProgress that records every fraction it is called with and can answer
// false at a chosen call, and the check of a successful solve's sequence.
// Thread-safety: a ProgressRecorder belongs to one test (the solvers call it on one thread).
#ifndef QFORGE_TESTS_QUANT_PROGRESS_RECORDER_H_
#define QFORGE_TESTS_QUANT_PROGRESS_RECORDER_H_

#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

#include "worker/quant/progress.h"

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

}  // namespace qforge::quant

#endif  // QFORGE_TESTS_QUANT_PROGRESS_RECORDER_H_

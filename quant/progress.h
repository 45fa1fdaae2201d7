// Progress reporting and cooperative cancellation of a solve: the callback every solver of the
// quantization core (GPTQ and VPTQ on the CPU and on CUDA, KMeans()) takes in its options.
//
//   GptqOptions o;
//   o.progress = [&](double fraction) { ShowProgress(fraction); return !cancel_requested; };
//
// Contract of a solver towards the callback:
//  - It is called on the thread that called the solver (never concurrently with itself), at
//    safe points between units of work: after a lazy column block, a Lloyd step, and so on.
//  - `fraction` is the share of the call's work done so far: in [0, 1], nondecreasing over one
//    call, and the last call of a successful solve passes exactly 1.0. The fraction weighs
//    the units by an a-priori work estimate (each solver's header says which); it is not a
//    time estimate. Work that follows the last call (output-error metrics) is not counted.
//  - Returning true goes on. Returning false asks the solver to stop: it returns CANCELLED
//    right there, with a message "... cancelled ..." naming where it stopped (the block, the
//    Lloyd step, the stage), computes no result and releases everything it allocated. The
//    callback is not called again after it returned false. A false return at the final 1.0
//    call also cancels.
//  - An empty callback is never called and costs one test per safe point.
// The callback must not throw. It is called O(blocks + Lloyd steps) times per solve; each
// call should be cheap (a mutex and a store, not I/O).
#ifndef QFORGE_QUANT_PROGRESS_H_
#define QFORGE_QUANT_PROGRESS_H_

#include <functional>

namespace qforge::quant {

// fraction in [0, 1]; returns false to cancel the solve (see above).
using SolveProgress = std::function<bool(double fraction)>;

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_PROGRESS_H_

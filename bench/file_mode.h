// qforge-bench's file mode: quantizes one layer read from a safetensors file and prints one
// JSON line, so any external implementation can be compared on the same layer. Reads files
// through common/ (object stores, safetensors), so it is compiled only in full builds
// (qforge-bench then defines QFORGE_BENCH_FILE_MODE). Thread-safety: one call at a time.
#ifndef QFORGE_BENCH_FILE_MODE_H_
#define QFORGE_BENCH_FILE_MODE_H_

#include "bench/bench_config.h"
#include "base/status.h"

namespace qforge::bench {

// Reads `weight` (f32 [out, in]) and `hessian` (f32 [in, in]) from the object URI f.input,
// runs f.method with the method flags on `device` (max(1, f.repeats) timed runs after the
// device's warm-up runs), writes `dequantized` (f32 [out, in]) to f.output when it is not
// empty, and prints one JSON line on stdout: the method options, the losses, the median
// solver time, rows/cols, the output path and the device. INVALID_ARGUMENT when the file
// lacks the two tensors or their shapes disagree; otherwise the store's or solver's error.
qforge::Status RunFileMode(const Flags& f, const Device& device);

}  // namespace qforge::bench

#endif  // QFORGE_BENCH_FILE_MODE_H_

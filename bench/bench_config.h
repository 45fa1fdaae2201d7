// What one qforge-bench run is configured with: the command-line flags, the device they
// select, and the solver options derived from them. Shared by the synthetic mode
// (qforge_bench.cc), the file mode (file_mode.cc) and the calibrate mode (calibrate_mode.cc);
// depends only on the quantization core and nlohmann-json, so it builds in core-only
// configurations. Thread-safety: plain values and free functions.
#ifndef QFORGE_BENCH_BENCH_CONFIG_H_
#define QFORGE_BENCH_BENCH_CONFIG_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "quant/cuda/backends.h"
#include "quant/gptq.h"
#include "base/status.h"
#include "quant/vptq.h"

namespace qforge::bench {

struct Flags {
  std::string input, output, device = "cpu", method = "gptq";
  std::string mode = "quantize";  // "quantize" (synthetic or file), "calibrate" or "evaluate"
  int64_t rows = 4096, cols = 4096, samples = 4096;
  // Calibrate mode: one decoder layer of these shapes (7B proportions by default); `samples`
  // and seq_len are the calibration batch (calibrate_mode.h gives their device defaults).
  int64_t hidden = 4096, intermediate = 11008, heads = 32, kv_heads = 0, head_dim = 0;
  int64_t seq_len = 0;
  // Evaluate mode: decoder layers and vocabulary of the generated model (hidden etc. above;
  // bench/evaluate_mode.h gives the defaults).
  int64_t layers = 4, vocab = 32000;
  uint64_t seed = 0;
  int repeats = 3;
  // GPTQ options (file mode, or a single synthetic config when --bits is given).
  int bits = 0;
  int group_size = 128;
  bool asym = false, act_order = false, static_groups = false, mse = false;
  double damp = 0.01;
  // VPTQ options (file mode, or a single synthetic config when --centroids is given).
  int vector_len = 8;
  int64_t centroids = 0, res_centroids = 0, outlier_size = 0;
  int group_num = 1, kmeans_iters = 100;
};

// The backend --device selects: the CPU, or one GPU through its context.
struct Device {
  std::string name;                        // "cpu" or "cuda:N", as given
  std::shared_ptr<quant::GpuContext> gpu;  // null on the CPU
  std::string gpu_name;                    // "NVIDIA H100 80GB HBM3"; empty on the CPU

  bool is_gpu() const { return gpu != nullptr; }
  // Untimed runs before the timed repeats of each configuration.
  int warmup_runs() const { return is_gpu() ? 1 : 0; }
};

// `name` is "cpu" or "cuda:N" (N a device index; the CLI validator guarantees the form).
// UNAVAILABLE with the driver's reason when the GPU cannot be used (no driver, no such
// device, a binary built without CUDA).
qforge::StatusOr<Device> OpenDevice(const std::string& name);

// The CPU or CUDA solver for `d`; errors only on the GPU (those of the CUDA factories).
qforge::StatusOr<std::unique_ptr<quant::GptqSolver>> MakeGptqSolver(const Device& d);
qforge::StatusOr<std::unique_ptr<quant::VptqSolver>> MakeVptqSolver(const Device& d);

// Adds the device fields every JSON line carries: "device", and "gpu" on a GPU.
void AddDevice(const Device& d, nlohmann::json& j);

// The solver options the method flags ask for (--bits 0 means 4; --centroids 0 means 65536).
quant::GptqOptions GptqFromFlags(const Flags& f);
quant::VptqOptions VptqFromFlags(const Flags& f);

// The median (the upper one for an even count) of `v`; 0 when empty.
double Median(std::vector<double> v);

}  // namespace qforge::bench

#endif  // QFORGE_BENCH_BENCH_CONFIG_H_

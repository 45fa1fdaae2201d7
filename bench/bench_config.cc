#include "bench/bench_config.h"

#include <algorithm>

#include "base/status_macros.h"

namespace qforge::bench {

qforge::StatusOr<Device> OpenDevice(const std::string& name) {
  Device d;
  d.name = name;
  if (name == "cpu") return d;
  quant::GpuContextOptions options;
  options.device = std::stoi(name.substr(5));  // the CLI check guarantees "cuda:<digits>"
  QF_ASSIGN_OR_RETURN(d.gpu, quant::CreateGpuContext(options));
  d.gpu_name = quant::GpuContextDeviceName(d.gpu.get());
  return d;
}

qforge::StatusOr<std::unique_ptr<quant::GptqSolver>> MakeGptqSolver(const Device& d) {
  if (!d.is_gpu()) return quant::NewCpuGptqSolver();
  return quant::NewCudaGptqSolver(d.gpu);
}

qforge::StatusOr<std::unique_ptr<quant::VptqSolver>> MakeVptqSolver(const Device& d) {
  if (!d.is_gpu()) return quant::NewCpuVptqSolver();
  return quant::NewCudaVptqSolver(d.gpu);
}

void AddDevice(const Device& d, nlohmann::json& j) {
  j["device"] = d.name;
  if (d.is_gpu()) j["gpu"] = d.gpu_name;
}

quant::GptqOptions GptqFromFlags(const Flags& f) {
  quant::GptqOptions o;
  o.bits = f.bits == 0 ? 4 : f.bits;
  o.group_size = f.group_size;
  o.sym = !f.asym;
  o.act_order = f.act_order;
  o.static_groups = f.static_groups;
  o.mse = f.mse;
  o.damp_percent = f.damp;
  return o;
}

quant::VptqOptions VptqFromFlags(const Flags& f) {
  quant::VptqOptions o;
  o.vector_len = f.vector_len;
  o.num_centroids = f.centroids == 0 ? 65536 : f.centroids;
  o.num_res_centroids = f.res_centroids;
  o.outlier_size = f.outlier_size;
  o.group_num = f.group_num;
  o.kmeans_iterations = f.kmeans_iters;
  o.damp_percent = f.damp;
  o.report_phase_errors = true;
  return o;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace qforge::bench

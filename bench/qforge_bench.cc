// qforge-bench: solver benchmarks.
//
// Synthetic mode (default): a heavy-tailed layer (default 4096×4096, H from 4096 samples with
// outlier channels); GPTQ 4-bit g128 and 3-bit g128, act-order off and on; prints the median
// solver time over --repeats runs, the proxy loss, the relative output error
// tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), and the output error relative to round-to-nearest on the same grid.
//
// File mode: `--input F.safetensors` holding `weight` (f32 [out, in]) and `hessian` (f32
// [in, in]) plus the method options; writes `--output G.safetensors` holding `dequantized`
// (f32 [out, in]) and prints one JSON line with the losses and the solver time, so any
// external implementation can be compared on the same layer.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <tuple>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "common/status_macros.h"
#include "common/uri.h"
#include "nlohmann/json.hpp"
#include "worker/quant/gptq.h"
#include "worker/quant/linalg.h"
#include "worker/quant/synthetic.h"
#include "worker/quant/vptq.h"
#include "worker/quant_status_bridge.h"

namespace qforge {
namespace {

struct Flags {
  std::string input, output, device = "cpu", method = "gptq";
  int64_t rows = 4096, cols = 4096, samples = 4096;
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

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
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

// VPTQ configurations of the issue (or the one given), each with its phase times, then GPTQ
// 2- and 3-bit g128 act-order on the same layer for comparison.
absl::Status RunSyntheticVptq(const Flags& f, const quant::SyntheticLayer& layer) {
  std::vector<quant::VptqOptions> configs;
  if (f.centroids != 0) {
    configs.push_back(VptqFromFlags(f));
  } else {
    for (auto [v, k, kr] : {std::tuple<int, int64_t, int64_t>{8, 65536, 256}, {8, 65536, 0},
                            {6, 4096, 0}}) {
      Flags g = f;
      g.vector_len = v;
      g.centroids = k;
      g.res_centroids = kr;
      configs.push_back(VptqFromFlags(g));
    }
  }
  auto solver = quant::NewCpuVptqSolver();
  std::printf("%-22s %6s %9s %9s %9s %9s %9s %11s %11s %11s\n", "config", "bpw", "total_s",
              "kmeans_s", "pass1_s", "res_km_s", "pass2_s", "rel_kmeans", "rel_pass1", "rel_final");
  for (const quant::VptqOptions& o : configs) {
    std::vector<double> times;
    quant::VptqResult r;
    for (int rep = 0; rep < f.repeats; ++rep) {
      QF_ASSIGN_OR_RETURN(r, ToAbslStatusOr(solver->Quantize(layer.weight, layer.hessian, o)));
      times.push_back(r.timings.total_seconds);
    }
    const std::string name = absl::StrCat("vptq v", o.vector_len, " k", o.num_centroids,
                                          o.num_res_centroids ? absl::StrCat(" r", o.num_res_centroids)
                                                              : std::string());
    const double e = r.weight_energy;
    std::printf("%-22s %6.3f %9.2f %9.2f %9.2f %9.2f %9.2f %11.4e %11.4e %11.4e\n", name.c_str(),
                quant::VptqBitsPerWeight(r), Median(times), r.timings.kmeans_seconds,
                r.timings.first_pass_seconds, r.timings.residual_kmeans_seconds,
                r.timings.second_pass_seconds, r.kmeans_output_error / e,
                (r.first_pass_output_error >= 0 ? r.first_pass_output_error : r.output_error) / e,
                r.output_error / e);
    nlohmann::json j = {{"method", "vptq"},
                        {"device", f.device},
                        {"rows", f.rows},
                        {"cols", f.cols},
                        {"vector_len", o.vector_len},
                        {"num_centroids", o.num_centroids},
                        {"num_res_centroids", o.num_res_centroids},
                        {"bits_per_weight", quant::VptqBitsPerWeight(r)},
                        {"median_seconds", Median(times)},
                        {"kmeans_seconds", r.timings.kmeans_seconds},
                        {"first_pass_seconds", r.timings.first_pass_seconds},
                        {"residual_kmeans_seconds", r.timings.residual_kmeans_seconds},
                        {"second_pass_seconds", r.timings.second_pass_seconds},
                        {"kmeans_iterations_max", r.kmeans_iterations_max},
                        {"relative_error", r.output_error / e},
                        {"relative_error_kmeans_only", r.kmeans_output_error / e},
                        {"threads", quant::NumThreads()}};
    std::fprintf(stderr, "%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  auto gptq = quant::NewCpuGptqSolver();
  for (int bits : {2, 3}) {
    quant::GptqOptions o;
    o.bits = bits;
    o.group_size = 128;
    o.act_order = true;
    auto t = std::chrono::steady_clock::now();
    QF_ASSIGN_OR_RETURN(quant::GptqResult r,
                        ToAbslStatusOr(gptq->Quantize(layer.weight, layer.hessian, o)));
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    // bits + fp16 scale and packed zero per group + int32 g_idx per input column.
    const double bpw = bits + (16.0 + bits) / 128 + 32.0 / static_cast<double>(f.rows);
    std::printf("%-22s %6.3f %9.2f %9s %9s %9s %9s %11s %11s %11.4e\n",
                absl::StrCat("gptq ", bits, "b g128 act").c_str(), bpw, secs, "-", "-", "-", "-",
                "-", "-", r.output_error / r.weight_energy);
  }
  return absl::OkStatus();
}

absl::Status RunSynthetic(const Flags& f) {
  std::fprintf(stderr, "generating %lldx%lld layer, H from %lld samples (seed %llu)...\n",
               static_cast<long long>(f.rows), static_cast<long long>(f.cols),
               static_cast<long long>(f.samples), static_cast<unsigned long long>(f.seed));
  auto t0 = std::chrono::steady_clock::now();
  quant::SyntheticLayer layer = quant::MakeSyntheticLayer(f.rows, f.cols, f.samples, f.seed);
  std::fprintf(stderr, "  generated in %.1f s; %d threads\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
               quant::NumThreads());
  if (f.method == "vptq") return RunSyntheticVptq(f, layer);
  std::vector<quant::GptqOptions> configs;
  if (f.bits != 0) {
    configs.push_back(GptqFromFlags(f));
  } else {
    for (int bits : {4, 3}) {
      for (bool act : {false, true}) {
        quant::GptqOptions o;
        o.bits = bits;
        o.group_size = 128;
        o.act_order = act;
        configs.push_back(o);
      }
    }
  }
  auto solver = quant::NewCpuGptqSolver();
  std::printf("%-26s %10s %12s %12s %10s\n", "config", "median_s", "proxy_loss", "rel_error",
              "vs_rtn");
  for (const quant::GptqOptions& o : configs) {
    std::vector<double> times;
    quant::GptqResult last;
    for (int r = 0; r < f.repeats; ++r) {
      auto t = std::chrono::steady_clock::now();
      QF_ASSIGN_OR_RETURN(last, ToAbslStatusOr(solver->Quantize(layer.weight, layer.hessian, o)));
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
    }
    QF_ASSIGN_OR_RETURN(quant::GptqResult rtn,
                        ToAbslStatusOr(quant::QuantizeRtn(layer.weight, layer.hessian, o)));
    const std::string name = absl::StrCat("gptq ", o.bits, "b g", o.group_size,
                                          o.sym ? " sym" : " asym", o.act_order ? " act" : "");
    const double rel = last.output_error / last.weight_energy;
    std::printf("%-26s %10.3f %12.5g %12.4e %10.4f\n", name.c_str(), Median(times),
                last.proxy_loss, rel, last.output_error / rtn.output_error);
    nlohmann::json j = {{"method", "gptq"},       {"device", f.device},
                        {"rows", f.rows},         {"cols", f.cols},
                        {"samples", f.samples},   {"bits", o.bits},
                        {"group_size", o.group_size}, {"act_order", o.act_order},
                        {"sym", o.sym},           {"repeats", f.repeats},
                        {"median_seconds", Median(times)}, {"proxy_loss", last.proxy_loss},
                        {"relative_error", rel},
                        {"rtn_relative_error", rtn.output_error / rtn.weight_energy},
                        {"error_vs_rtn", last.output_error / rtn.output_error},
                        {"threads", quant::NumThreads()}};
    std::fprintf(stderr, "%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  return absl::OkStatus();
}

absl::Status RunFile(const Flags& f) {
  QF_ASSIGN_OR_RETURN(ObjectUri in, SplitObjectUri(f.input));
  QF_ASSIGN_OR_RETURN(auto in_store, OpenObjectStore(in.store_uri));
  QF_ASSIGN_OR_RETURN(SafetensorsHeader header, ReadSafetensorsHeader(*in_store, in.key));
  const TensorInfo* w_info = header.Find("weight");
  const TensorInfo* h_info = header.Find("hessian");
  if (w_info == nullptr || h_info == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(f.input, " must hold tensors 'weight' [out, in] and 'hessian' [in, in]"));
  }
  if (w_info->shape.size() != 2 || h_info->shape.size() != 2 ||
      h_info->shape[0] != w_info->shape[1] || h_info->shape[1] != w_info->shape[1]) {
    return absl::InvalidArgumentError(absl::StrCat(
        f.input, ": 'weight' must be [out, in] and 'hessian' [in, in] with the same in"));
  }
  quant::Matrix w, h;
  w.rows = w_info->shape[0];
  w.cols = w_info->shape[1];
  h.rows = h.cols = w.cols;
  QF_ASSIGN_OR_RETURN(w.data, ReadTensorAsF32(*in_store, in.key, header, *w_info));
  QF_ASSIGN_OR_RETURN(h.data, ReadTensorAsF32(*in_store, in.key, header, *h_info));

  std::vector<double> times;
  quant::Matrix deq;
  nlohmann::json j;
  if (f.method == "vptq") {
    const quant::VptqOptions o = VptqFromFlags(f);
    auto solver = quant::NewCpuVptqSolver();
    quant::VptqResult result;
    for (int r = 0; r < std::max(1, f.repeats); ++r) {
      QF_ASSIGN_OR_RETURN(result, ToAbslStatusOr(solver->Quantize(w, h, o)));
      times.push_back(result.timings.total_seconds);
    }
    deq = result.dequantized;
    j = {{"method", "vptq"},
         {"vector_len", o.vector_len},
         {"num_centroids", o.num_centroids},
         {"num_res_centroids", o.num_res_centroids},
         {"bits_per_weight", quant::VptqBitsPerWeight(result)},
         {"proxy_loss", result.proxy_loss},
         {"output_error", result.output_error},
         {"relative_error", result.output_error / result.weight_energy}};
  } else {
    const quant::GptqOptions o = GptqFromFlags(f);
    auto solver = quant::NewCpuGptqSolver();
    quant::GptqResult result;
    for (int r = 0; r < std::max(1, f.repeats); ++r) {
      auto t = std::chrono::steady_clock::now();
      QF_ASSIGN_OR_RETURN(result, ToAbslStatusOr(solver->Quantize(w, h, o)));
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
    }
    deq = quant::DequantizeGptq(result);
    j = {{"method", "gptq"},
         {"bits", o.bits},
         {"group_size", o.group_size},
         {"sym", o.sym},
         {"act_order", o.act_order},
         {"static_groups", o.static_groups},
         {"proxy_loss", result.proxy_loss},
         {"output_error", result.output_error},
         {"relative_error", result.output_error / result.weight_energy}};
  }
  if (!f.output.empty()) {
    QF_ASSIGN_OR_RETURN(ObjectUri out, SplitObjectUri(f.output));
    QF_ASSIGN_OR_RETURN(auto out_store, OpenObjectStore(out.store_uri));
    QF_ASSIGN_OR_RETURN(auto writer, SafetensorsWriter::Create(
                                         *out_store, out.key,
                                         {{"dequantized", DType::kF32, {deq.rows, deq.cols}}}));
    QF_RETURN_IF_ERROR(writer->WriteTensorData(
        "dequantized", std::string_view(reinterpret_cast<const char*>(deq.data.data()),
                                        deq.data.size() * sizeof(float))));
    QF_RETURN_IF_ERROR(writer->Finish());
  }
  j["device"] = f.device;
  j["rows"] = w.rows;
  j["cols"] = w.cols;
  j["solver_seconds"] = Median(times);
  j["output"] = f.output;
  std::printf("%s\n", j.dump().c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  qforge::Flags f;
  CLI::App app{"qforge-bench: GPTQ/VPTQ solver benchmarks (synthetic layers or a layer file)"};
  app.add_option("--input", f.input, "layer file: safetensors with 'weight' [out,in] and 'hessian' [in,in]");
  app.add_option("--output", f.output, "file mode: write 'dequantized' [out,in] here");
  app.add_option("--device", f.device, "cpu (cuda:N with the CUDA backend)")->check(CLI::IsMember({"cpu"}));
  app.add_option("--method", f.method, "gptq or vptq")->check(CLI::IsMember({"gptq", "vptq"}));
  app.add_option("--vector-len", f.vector_len, "VPTQ: vector length");
  app.add_option("--centroids", f.centroids, "VPTQ: codebook entries (synthetic: run only this config)");
  app.add_option("--res-centroids", f.res_centroids, "VPTQ: residual codebook entries (0 = none)");
  app.add_option("--outlier-size", f.outlier_size, "VPTQ: outlier columns");
  app.add_option("--group-num", f.group_num, "VPTQ: column groups");
  app.add_option("--kmeans-iters", f.kmeans_iters, "VPTQ: k-means iterations");
  app.add_option("--rows", f.rows, "synthetic: out_features");
  app.add_option("--cols", f.cols, "synthetic: in_features");
  app.add_option("--samples", f.samples, "synthetic: activation samples for H");
  app.add_option("--seed", f.seed, "synthetic: seed");
  app.add_option("--repeats", f.repeats, "runs per configuration (median reported)");
  app.add_option("--bits", f.bits, "2, 3, 4 or 8 (synthetic: run only this config)")
      ->check(CLI::IsMember({2, 3, 4, 8}));
  app.add_option("--group-size", f.group_size, "group size, -1 = per channel");
  app.add_flag("--asym", f.asym, "asymmetric");
  app.add_flag("--act-order,--desc-act", f.act_order, "act-order");
  app.add_flag("--static-groups", f.static_groups, "static groups");
  app.add_flag("--mse", f.mse, "MSE grid search for scales");
  app.add_option("--damp", f.damp, "damping fraction");
  CLI11_PARSE(app, argc, argv);
  absl::Status s = f.input.empty() ? qforge::RunSynthetic(f) : qforge::RunFile(f);
  if (!s.ok()) {
    std::fprintf(stderr, "qforge-bench: %s\n", s.ToString().c_str());
    return absl::IsInvalidArgument(s) ? 2 : 1;
  }
  return 0;
}

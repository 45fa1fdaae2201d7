// qforge-bench: solver benchmarks.
//
// Synthetic mode (default): a heavy-tailed layer (default 4096×4096, H from 4096 samples with
// outlier channels); GPTQ 4-bit g128 and 3-bit g128, act-order off and on; prints the median
// solver time over --repeats runs, the proxy loss, the relative output error
// tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), and the output error relative to round-to-nearest on the same grid.
//
// File mode (full builds only): `--input F.safetensors` holding `weight` (f32 [out, in]) and
// `hessian` (f32 [in, in]) plus the method options; writes `--output G.safetensors` holding
// `dequantized` (f32 [out, in]) and prints one JSON line with the losses and the solver time,
// so any external implementation can be compared on the same layer. In a core-only build
// --input is refused ("file mode needs the full build", exit 2).
//
// --device cpu (default) or cuda:N runs both methods on that backend; on a GPU every
// configuration gets one untimed warm-up run first (CUDA context, library heuristics, the
// allocator's pool), and the JSON names the GPU.
//
// Calibrate mode (`--mode calibrate`, bench/calibrate_mode.h): the calibration forward pass
// over one decoder layer of --hidden/--intermediate/--heads/--kv-heads (7B proportions by
// default) with random weights, --samples × --seq-len tokens (default 2 × 512 on the CPU,
// 128 × 2048 on a GPU); one JSON line with tokens/s, GFLOP/s and peak RSS.
//
// Evaluate mode (`--mode evaluate`, bench/evaluate_mode.h, full builds only): the EVALUATE step
// (job/evaluation.h) of a generated model's GPTQ 4-bit artifact against the model, --layers
// decoder layers, --vocab tokens, --samples × --seq-len tokens (default 4 × 512); one JSON
// line with evaluation tokens/s.
//
// Synthetic mode needs only the quantization core, CLI11 and nlohmann-json, so qforge-bench
// builds in core-only configurations (the lent GPU machines); file mode (bench/file_mode.h)
// reads files through common/ and is compiled in only when common/ is built
// (QFORGE_BENCH_FILE_MODE).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "CLI/CLI.hpp"
#include "bench/bench_config.h"
#include "bench/calibrate_mode.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "quant/gptq.h"
#include "quant/linalg.h"
#include "base/status.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"
#ifdef QFORGE_BENCH_FILE_MODE
#include "bench/file_mode.h"
#endif
#ifdef QFORGE_BENCH_EVALUATE_MODE
#include "bench/evaluate_mode.h"
#endif

namespace qforge::bench {
namespace {

// VPTQ configurations of the issue (or the one given), each with its phase times, then GPTQ
// 2- and 3-bit g128 act-order on the same layer for comparison.
qforge::Status RunSyntheticVptq(const Flags& f, const Device& device,
                               const quant::SyntheticLayer& layer) {
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
  QF_ASSIGN_OR_RETURN(std::unique_ptr<quant::VptqSolver> solver, MakeVptqSolver(device));
  std::printf("%-22s %6s %9s %9s %9s %9s %9s %11s %11s %11s\n", "config", "bpw", "total_s",
              "kmeans_s", "pass1_s", "res_km_s", "pass2_s", "rel_kmeans", "rel_pass1", "rel_final");
  for (const quant::VptqOptions& o : configs) {
    std::vector<double> times;
    quant::VptqResult r;
    for (int rep = -device.warmup_runs(); rep < f.repeats; ++rep) {
      QF_ASSIGN_OR_RETURN(r, solver->Quantize(layer.weight, layer.hessian, o));
      if (rep >= 0) times.push_back(r.timings.total_seconds);
    }
    const std::string name =
        "vptq v" + std::to_string(o.vector_len) + " k" + std::to_string(o.num_centroids) +
        (o.num_res_centroids ? " r" + std::to_string(o.num_res_centroids) : std::string());
    const double e = r.weight_energy;
    std::printf("%-22s %6.3f %9.2f %9.2f %9.2f %9.2f %9.2f %11.4e %11.4e %11.4e\n", name.c_str(),
                quant::VptqBitsPerWeight(r), Median(times), r.timings.kmeans_seconds,
                r.timings.first_pass_seconds, r.timings.residual_kmeans_seconds,
                r.timings.second_pass_seconds, r.kmeans_output_error / e,
                (r.first_pass_output_error >= 0 ? r.first_pass_output_error : r.output_error) / e,
                r.output_error / e);
    nlohmann::json j = {{"method", "vptq"},
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
    AddDevice(device, j);
    std::fprintf(stderr, "%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  QF_ASSIGN_OR_RETURN(std::unique_ptr<quant::GptqSolver> gptq, MakeGptqSolver(device));
  for (int bits : {2, 3}) {
    quant::GptqOptions o;
    o.bits = bits;
    o.group_size = 128;
    o.act_order = true;
    for (int rep = 0; rep < device.warmup_runs(); ++rep) {
      QF_RETURN_IF_ERROR(gptq->Quantize(layer.weight, layer.hessian, o).status());
    }
    auto t = std::chrono::steady_clock::now();
    QF_ASSIGN_OR_RETURN(quant::GptqResult r, gptq->Quantize(layer.weight, layer.hessian, o));
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    // bits + fp16 scale and packed zero per group + int32 g_idx per input column.
    const double bpw = bits + (16.0 + bits) / 128 + 32.0 / static_cast<double>(f.rows);
    std::printf("%-22s %6.3f %9.2f %9s %9s %9s %9s %11s %11s %11.4e\n",
                ("gptq " + std::to_string(bits) + "b g128 act").c_str(), bpw, secs, "-", "-", "-",
                "-", "-", "-", r.output_error / r.weight_energy);
  }
  return qforge::OkStatus();
}

qforge::Status RunSynthetic(const Flags& f, const Device& device) {
  std::fprintf(stderr, "generating %lldx%lld layer, H from %lld samples (seed %llu)...\n",
               static_cast<long long>(f.rows), static_cast<long long>(f.cols),
               static_cast<long long>(f.samples), static_cast<unsigned long long>(f.seed));
  auto t0 = std::chrono::steady_clock::now();
  quant::SyntheticLayer layer = quant::MakeSyntheticLayer(f.rows, f.cols, f.samples, f.seed);
  std::fprintf(stderr, "  generated in %.1f s; %d threads\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
               quant::NumThreads());
  if (f.method == "vptq") return RunSyntheticVptq(f, device, layer);
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
  QF_ASSIGN_OR_RETURN(std::unique_ptr<quant::GptqSolver> solver, MakeGptqSolver(device));
  std::printf("%-26s %10s %12s %12s %10s\n", "config", "median_s", "proxy_loss", "rel_error",
              "vs_rtn");
  for (const quant::GptqOptions& o : configs) {
    std::vector<double> times;
    quant::GptqResult last;
    for (int r = -device.warmup_runs(); r < f.repeats; ++r) {
      auto t = std::chrono::steady_clock::now();
      QF_ASSIGN_OR_RETURN(last, solver->Quantize(layer.weight, layer.hessian, o));
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
      if (r >= 0) times.push_back(secs);
    }
    QF_ASSIGN_OR_RETURN(quant::GptqResult rtn,
                        quant::QuantizeRtn(layer.weight, layer.hessian, o));
    const std::string name = "gptq " + std::to_string(o.bits) + "b g" +
                             std::to_string(o.group_size) + (o.sym ? " sym" : " asym") +
                             (o.act_order ? " act" : "");
    const double rel = last.output_error / last.weight_energy;
    std::printf("%-26s %10.3f %12.5g %12.4e %10.4f\n", name.c_str(), Median(times),
                last.proxy_loss, rel, last.output_error / rtn.output_error);
    nlohmann::json j = {{"method", "gptq"},       {"rows", f.rows},
                        {"cols", f.cols},
                        {"samples", f.samples},   {"bits", o.bits},
                        {"group_size", o.group_size}, {"act_order", o.act_order},
                        {"sym", o.sym},           {"repeats", f.repeats},
                        {"median_seconds", Median(times)}, {"proxy_loss", last.proxy_loss},
                        {"relative_error", rel},
                        {"rtn_relative_error", rtn.output_error / rtn.weight_energy},
                        {"error_vs_rtn", last.output_error / rtn.output_error},
                        {"prepare_seconds", last.prepare_seconds},
                        {"sweep_seconds", last.sweep_seconds},
                        {"metrics_seconds", last.metrics_seconds},
                        {"threads", quant::NumThreads()}};
    AddDevice(device, j);
    std::fprintf(stderr, "%s\n", j.dump().c_str());
    std::fflush(stdout);
  }
  return qforge::OkStatus();
}

}  // namespace
}  // namespace qforge::bench

int main(int argc, char** argv) {
  qforge::bench::Flags f;
  CLI::App app{"qforge-bench: GPTQ/VPTQ solver benchmarks (synthetic layers or a layer file)"};
  app.add_option("--input", f.input, "layer file: safetensors with 'weight' [out,in] and 'hessian' [in,in]");
  app.add_option("--output", f.output, "file mode: write 'dequantized' [out,in] here");
  app.add_option("--device", f.device, "cpu, or cuda:N for the CUDA backends on GPU N")
      ->check(CLI::Validator(
          [](std::string& v) -> std::string {
            const bool cuda = v.size() > 5 && v.compare(0, 5, "cuda:") == 0 && v.size() <= 9 &&
                              std::all_of(v.begin() + 5, v.end(),
                                          [](char c) { return c >= '0' && c <= '9'; });
            return v == "cpu" || cuda ? std::string() : "must be cpu or cuda:N, got " + v;
          },
          "cpu|cuda:N"));
  app.add_option("--mode", f.mode,
                 "quantize (the solvers; default), calibrate (the forward pass) or evaluate "
                 "(the EVALUATE step; full builds)")
      ->check(CLI::IsMember({"quantize", "calibrate", "evaluate"}));
  app.add_option("--layers", f.layers, "evaluate: decoder layers of the generated model");
  app.add_option("--vocab", f.vocab, "evaluate: vocabulary size of the generated model");
  app.add_option("--hidden", f.hidden, "calibrate: hidden_size");
  app.add_option("--intermediate", f.intermediate, "calibrate: intermediate_size");
  app.add_option("--heads", f.heads, "calibrate: attention heads");
  app.add_option("--kv-heads", f.kv_heads, "calibrate: KV heads (default: --heads)");
  app.add_option("--head-dim", f.head_dim, "calibrate: head_dim (default: hidden / heads)");
  app.add_option("--seq-len", f.seq_len, "calibrate: tokens per sample (default 512 CPU, 2048 GPU)");
  app.add_option("--method", f.method, "gptq or vptq")->check(CLI::IsMember({"gptq", "vptq"}));
  app.add_option("--vector-len", f.vector_len, "VPTQ: vector length");
  app.add_option("--centroids", f.centroids, "VPTQ: codebook entries (synthetic: run only this config)");
  app.add_option("--res-centroids", f.res_centroids, "VPTQ: residual codebook entries (0 = none)");
  app.add_option("--outlier-size", f.outlier_size, "VPTQ: outlier columns");
  app.add_option("--group-num", f.group_num, "VPTQ: column groups");
  app.add_option("--kmeans-iters", f.kmeans_iters, "VPTQ: k-means iterations");
  app.add_option("--rows", f.rows, "synthetic: out_features");
  app.add_option("--cols", f.cols, "synthetic: in_features");
  app.add_option("--samples", f.samples,
                 "synthetic: activation samples for H; calibrate: samples (default 2 CPU, 128 GPU)");
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
  const bool calibrate = f.mode == "calibrate";
  const bool evaluate = f.mode == "evaluate";
  if ((calibrate || evaluate) && app.count("--samples") == 0) f.samples = 0;  // the mode's default
  if (evaluate) {
    if (app.count("--hidden") == 0) f.hidden = 1024;
    if (app.count("--intermediate") == 0) f.intermediate = 2816;
    if (app.count("--heads") == 0) f.heads = 16;
    if (app.count("--kv-heads") == 0) f.kv_heads = 4;
    if (app.count("--repeats") == 0) f.repeats = 1;
  }
#ifndef QFORGE_BENCH_EVALUATE_MODE
  if (evaluate) {
    std::fprintf(stderr, "qforge-bench: --mode evaluate needs the full build (job/)\n");
    return 2;
  }
#endif
  if (calibrate && !f.input.empty()) {
    std::fprintf(stderr, "qforge-bench: --input is for the quantize mode, not --mode calibrate\n");
    return 2;
  }
#ifndef QFORGE_BENCH_FILE_MODE
  if (!f.input.empty()) {
    std::fprintf(stderr,
                 "qforge-bench: --input: file mode needs the full build (this binary was built "
                 "with QFORGE_CORE_ONLY=ON); only the synthetic mode is available\n");
    return 2;
  }
#endif
  qforge::StatusOr<qforge::bench::Device> device = qforge::bench::OpenDevice(f.device);
  if (!device.ok()) {
    std::fprintf(stderr, "qforge-bench: --device %s: %s\n", f.device.c_str(),
                 device.status().ToString().c_str());
    return 1;
  }
  if (device->is_gpu()) {
    std::fprintf(stderr, "device %s: %s\n", f.device.c_str(), device->gpu_name.c_str());
  }
#ifdef QFORGE_BENCH_EVALUATE_MODE
  if (evaluate) {
    const qforge::Status s = qforge::bench::RunEvaluateMode(f, *device);
    if (!s.ok()) {
      std::fprintf(stderr, "qforge-bench: --mode evaluate on --device %s: %s\n",
                   f.device.c_str(), s.ToString().c_str());
      return s.code() == qforge::StatusCode::kInvalidArgument ? 2 : 1;
    }
    return 0;
  }
#endif
  if (calibrate) {
    const qforge::Status s = qforge::bench::RunCalibrateMode(f, *device);
    if (!s.ok()) {
      std::fprintf(stderr, "qforge-bench: --mode calibrate on --device %s: %s\n",
                   f.device.c_str(), s.ToString().c_str());
      return s.code() == qforge::StatusCode::kInvalidArgument ? 2 : 1;
    }
    return 0;
  }
#ifdef QFORGE_BENCH_FILE_MODE
  const qforge::Status s = f.input.empty() ? qforge::bench::RunSynthetic(f, *device)
                                                  : qforge::bench::RunFileMode(f, *device);
#else
  const qforge::Status s = qforge::bench::RunSynthetic(f, *device);
#endif
  if (!s.ok()) {
    std::fprintf(stderr, "qforge-bench: %s\n", s.ToString().c_str());
    return s.code() == qforge::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

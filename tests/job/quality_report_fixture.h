// A qforge_manifest.json as the assembler writes it (docs/FORMATS.md §6) for the quality
// report's tests: `layers` decoder layers of a Llama-style model, seven GPTQ 4-bit g128
// linear modules each, with known errors, sizes, bytes and timings, and an evaluation
// "quality" object as QualityMetricsToJson writes it (job/evaluation.h).
#ifndef QFORGE_TESTS_JOB_QUALITY_REPORT_FIXTURE_H_
#define QFORGE_TESTS_JOB_QUALITY_REPORT_FIXTURE_H_

#include <cmath>
#include <cstdint>
#include <string>

#include "nlohmann/json.hpp"

namespace qforge::testing {

inline const char* const kReportModules[] = {"self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj", "self_attn.o_proj",
                                             "mlp.gate_proj",    "mlp.up_proj",
                                             "mlp.down_proj"};

inline std::string ReportModuleName(int layer, int m) {
  return "model.layers." + std::to_string(layer) + "." + kReportModules[m];
}

// Calibration relative error of module m of layer l: 10^-(4 - 0.1 l) · (m + 1); the
// evaluation's is twice it (so the two are told apart).
inline double ReportCalibrationError(int layer, int m) {
  return std::pow(10.0, -4.0 + 0.1 * layer) * (m + 1);
}

inline nlohmann::json ReportManifest(int layers) {
  nlohmann::json l = nlohmann::json::object();
  nlohmann::json modules = nlohmann::json::array();
  for (int layer = 0; layer < layers; ++layer) {
    for (int m = 0; m < 7; ++m) {
      const int64_t out = m >= 4 && m != 6 ? 512 : 256, in = m == 6 ? 512 : 256;
      const double rel = ReportCalibrationError(layer, m);
      // qweight in·out/2 bytes (4-bit), qzeros out/2 per group row, scales 2·out per group,
      // g_idx 4·in.
      const int64_t groups = in / 128;
      const int64_t bytes = in * out / 2 + groups * out / 2 + groups * out * 2 + 4 * in;
      l[ReportModuleName(layer, m)] = {
          {"out_features", out},        {"in_features", in},
          {"proxy_loss", 0.5},          {"output_error", rel * 100},
          {"weight_energy", 100.0},     {"relative_error", rel},
          {"damp_percent_used", 0.01},  {"read_seconds", 0.25},
          {"solve_seconds", 1.25},      {"write_seconds", 0.0},
          {"bytes_read", 1000},         {"bytes_written", bytes},
          {"bits_per_weight", 0.0},     {"method", "gptq"},
          {"bits", 4},                  {"group_size", 128},
          {"solver", "cpu"},            {"attempt", 0}};
      modules.push_back({{"module", ReportModuleName(layer, m)},
                         {"layer", layer},
                         {"relative_error", 2 * rel}});
    }
  }
  return {
      {"qforge_version", "0.15.0"},
      {"created_at", "2026-12-05T05:00:00Z"},
      {"format", "gptq"},
      {"spec",
       {{"job_id", "job-7f3a"}, {"model_uri", "file:///models/tiny-llama"}, {"method", "GPTQ"}}},
      {"quantization_config",
       {{"quant_method", "gptq"}, {"bits", 4}, {"group_size", 128}, {"desc_act", false}}},
      {"source", {{"uri", "file:///models/tiny-llama"}, {"shards", nlohmann::json::array()}}},
      {"tensors", nlohmann::json::object()},
      {"layers", l},
      {"totals", {{"tensors_quantized", 7 * layers}, {"tensors_copied", 3}, {"files", 4}}},
      {"calibration",
       {{"dataset_uri", "file:///data/calib.safetensors"}, {"samples", 16}, {"seq_len", 64},
        {"tokens", 1024}, {"seconds", 12.34}}},
      {"quality",
       {{"samples", 8},
        {"tokens", 504},
        {"ppl_reference", 7.1129},
        {"ppl_candidate", 7.9951},
        {"ppl_increase_pct", 12.4029},
        {"mean_kl", 0.08123},
        {"top1_agreement", 0.9375},
        {"seconds", 4.56},
        {"dataset_uri", "file:///data/eval.jsonl"},
        {"modules", modules}}},
      {"quality_gate", "none"},
  };
}

}  // namespace qforge::testing

#endif  // QFORGE_TESTS_JOB_QUALITY_REPORT_FIXTURE_H_

// Shared by the evaluation tests (tests/job/evaluation_test.cc, cuda_evaluation_test.cc): the
// generated model's shape, directories opened as an EVALUATE task opens them, token data sampled
// from the model itself, one shard's evaluation, and GPTQ / VPTQ artifacts written by the job/
// pipeline (calibration → layer runner → assembler). Header-only. Thread-safety: plain functions.
#ifndef QFORGE_TESTS_JOB_EVALUATION_TESTUTIL_H_
#define QFORGE_TESTS_JOB_EVALUATION_TESTUTIL_H_

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/hessian_file.h"
#include "common/mem_store.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "job/assembler.h"
#include "job/calibration.h"
#include "job/calibration_data.h"
#include "job/evaluation.h"
#include "job/layer_runner.h"
#include "job/layer_selection.h"
#include "quant/gptq.h"
#include "quant/layer_quantizer.h"
#include "quant/vptq.h"
#include "tests/job/tiny_model.h"
#include "tests/quant/decoder_ref.h"

namespace qforge::job_testing {

// Top-2 logit margins below this count as near-ties (float32 rounding may flip the argmax).
inline constexpr double kTieMargin = 1e-4;
inline constexpr int64_t kEvalSamples = 6, kEvalSeqLen = 16;

// GPTQ-packable shapes (inputs % 32, outputs % 8 and % 32 for 3 bits).
inline ModelSpec EvalSpec() {
  ModelSpec s;
  s.hidden = 64;
  s.heads = 4;
  s.kv_heads = 2;
  s.intermediate = 128;
  s.layers = 2;
  s.vocab = 96;
  s.random_final_norm = true;
  s.seed = 5;
  return s;
}

// A model directory opened as an EVALUATE task opens it.
struct Directory {
  ObjectStore* store = nullptr;
  SafetensorsModel model;
  DecoderModelConfig config;
  ModelQuantization quantization;
};

inline Directory OpenDirectory(ObjectStore& store) {
  Directory d;
  d.store = &store;
  auto m = SafetensorsModel::Open(store, "");
  EXPECT_TRUE(m.ok()) << m.status();
  if (m.ok()) d.model = *std::move(m);
  auto c = ReadDecoderModelConfig(store, "");
  EXPECT_TRUE(c.ok()) << c.status();
  if (c.ok()) d.config = *std::move(c);
  auto q = ReadModelQuantization(store, "");
  EXPECT_TRUE(q.ok()) << q.status();
  if (q.ok()) d.quantization = *std::move(q);
  return d;
}

inline absl::StatusOr<EvaluationShardOutcome> Evaluate(Directory& ref, Directory& cand,
                                                const CalibrationData& d, int64_t begin,
                                                int64_t end, ObjectStore& out,
                                                const std::string& key,
                                                uint64_t spill_above = kDefaultSpillAboveBytes,
                                                std::function<bool(double)> progress = {},
                                                quant::DecoderForward* device_forward = nullptr) {
  std::unique_ptr<quant::DecoderForward> cpu = quant::NewCpuDecoderForward();
  quant::DecoderForward* forward = device_forward != nullptr ? device_forward : cpu.get();
  EvaluationShardJob job;
  job.reference_store = ref.store;
  job.reference_model = &ref.model;
  job.reference_config = &ref.config;
  job.candidate_store = cand.store;
  job.candidate_model = &cand.model;
  job.candidate_config = &cand.config;
  job.candidate_quantization = &cand.quantization;
  job.data = &d;
  job.sample_begin = begin;
  job.sample_end = end;
  job.forward = forward;
  job.out_store = &out;
  job.staged_key = key;
  job.spill_above_bytes = spill_above;
  job.progress = std::move(progress);
  return RunEvaluationShard(job);
}


inline std::vector<double> RefLogProbs(const quant::DecoderConfig& c, const std::vector<float>& norm,
                                const std::vector<float>& head, const double* x, bool* near_tie,
                                int64_t* argmax) {
  const int64_t H = c.hidden_size, V = c.vocab_size;
  double ss = 0;
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(H) + c.rms_norm_eps);
  std::vector<double> y(static_cast<size_t>(H)), l(static_cast<size_t>(V));
  for (int64_t i = 0; i < H; ++i) y[i] = static_cast<double>(norm[i]) * x[i] * inv;
  for (int64_t v = 0; v < V; ++v) {
    double s = 0;
    for (int64_t i = 0; i < H; ++i) s += static_cast<double>(head[v * H + i]) * y[i];
    l[v] = s;
  }
  std::vector<double> sorted = l;
  std::sort(sorted.rbegin(), sorted.rend());
  if (sorted[0] - sorted[1] < kTieMargin) *near_tie = true;
  *argmax = std::max_element(l.begin(), l.end()) - l.begin();
  double z = 0;
  for (double v : l) z += std::exp(v - sorted[0]);
  const double lse = sorted[0] + std::log(z);
  for (double& v : l) v -= lse;
  return l;
}

// Token sequences sampled from the model itself (float64 forward, ancestral sampling): on such
// data the expected NLL increase of a candidate is its KL divergence from the model, so
// perplexity moves with quality (uniform random tokens would make it noise).
inline std::vector<int64_t> SampleIds(const TinyModel& m, int64_t samples, int64_t seq_len,
                               uint64_t seed) {
  const quant::DecoderConfig& c = m.config;
  const int64_t H = c.hidden_size;
  std::mt19937_64 rng(seed);
  std::vector<int64_t> ids;
  for (int64_t s = 0; s < samples; ++s) {
    std::vector<int64_t> seq = {static_cast<int64_t>(rng() % static_cast<uint64_t>(c.vocab_size))};
    while (static_cast<int64_t>(seq.size()) < seq_len) {
      const int64_t t = static_cast<int64_t>(seq.size());
      std::vector<double> x(static_cast<size_t>(t * H));
      for (int64_t i = 0; i < t; ++i) {
        for (int64_t h = 0; h < H; ++h) x[i * H + h] = m.embed[seq[i] * H + h];
      }
      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        quant::testing::RefDecoderLayer(c, m.layers[l], 1, t, nullptr, x, nullptr);
      }
      bool tie = false;
      int64_t top = 0;
      const std::vector<double> lp = RefLogProbs(c, m.norm, m.lm_head, &x[(t - 1) * H], &tie, &top);
      std::vector<double> p(lp.size());
      for (size_t v = 0; v < lp.size(); ++v) p[v] = std::exp(lp[v]);
      std::discrete_distribution<int64_t> pick(p.begin(), p.end());
      seq.push_back(pick(rng));
    }
    ids.insert(ids.end(), seq.begin(), seq.end());
  }
  return ids;
}

// Evaluation tokens: kEvalSamples × kEvalSeqLen with padding at the end of samples 1 and 4.
inline CalibrationData EvalData(TinyModel& m, uint64_t seed = 77) {
  const int64_t n = kEvalSamples * kEvalSeqLen;
  std::vector<uint8_t> mask(static_cast<size_t>(n), 1);
  for (int64_t t = 11; t < kEvalSeqLen; ++t) mask[1 * kEvalSeqLen + t] = 0;
  for (int64_t t = 5; t < kEvalSeqLen; ++t) mask[4 * kEvalSeqLen + t] = 0;
  WriteTokenFile(*m.store, "eval.safetensors", SampleIds(m, kEvalSamples, kEvalSeqLen, seed), kEvalSamples,
                 kEvalSeqLen, DType::kI32, mask);
  auto d = LoadCalibrationData(*m.store, "eval.safetensors", {}, m.config, "--eval");
  EXPECT_TRUE(d.ok()) << d.status();
  return d.ok() ? *std::move(d) : CalibrationData();
}

// ---------------------------------------------------------------------------------------
// Artifacts written by the job/ pipeline.

// Calibration on other tokens than the evaluation's, then every decoder projection quantized
// by the CPU layer quantizers and assembled into `out`.
inline void BuildArtifact(TinyModel& m, const quant::QuantizeOptions& options, ArtifactMethod method,
                   const GptqQuantizeConfig& gptq, MemStore& out) {
  WriteTokenFile(*m.store, "calib.safetensors", RandomIds(8 * 32, m.spec.vocab, 4242), 8, 32,
                 DType::kI32);
  auto data = LoadCalibrationData(*m.store, "calib.safetensors", {}, m.config, "--calibration");
  ASSERT_TRUE(data.ok()) << data.status();
  auto opened = job_testing::Open(m);
  MemStore scratch("scratch");
  std::unique_ptr<quant::DecoderForward> forward = quant::NewCpuDecoderForward();
  CalibrationShardJob cal;
  cal.model_store = m.store.get();
  cal.model = &opened.model;
  cal.model_config = &opened.config;
  cal.data = &*data;
  cal.sample_begin = 0;
  cal.sample_end = data->samples;
  cal.forward = forward.get();
  cal.out_store = &scratch;
  cal.staged_key = "partial.safetensors";
  ASSERT_TRUE(RunCalibrationShard(cal).ok());
  ReduceJob reduce;
  reduce.in_store = &scratch;
  reduce.partial_keys = {"partial.safetensors"};
  reduce.out_store = &scratch;
  reduce.out_key = "hessians.safetensors";
  ASSERT_TRUE(ReduceHessians(reduce).ok());
  auto hessians = HessianFile::Open(scratch, "hessians.safetensors");
  ASSERT_TRUE(hessians.ok()) << hessians.status();

  auto layers = SelectLayers(opened.model, LayerSelection{});
  ASSERT_TRUE(layers.ok()) << layers.status();
  ASSERT_EQ(layers->size(), 14u);
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  const char* name = method == ArtifactMethod::kGptq ? "gptq" : "vptq";
  std::vector<StagedLayer> staged;
  for (const PlannedLayer& l : *layers) {
    LayerJob job;
    job.module = l.module;
    job.model_store = m.store.get();
    job.weight = *LocateTensor(opened.model, l.weight);
    job.hessian_store = &scratch;
    job.hessians = &*hessians;
    job.options = options;
    job.out_store = &scratch;
    job.staged_key = "staging/" + l.module + ".safetensors";
    auto outcome = RunLayer(job, *quantizers.Find(name));
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    staged.push_back({l.module, job.staged_key, {}});
  }
  AssembleRequest req;
  req.method = method;
  req.model_store = m.store.get();
  req.model = &opened.model;
  req.staging_store = &scratch;
  req.layers = staged;
  req.output_store = &out;
  req.config = gptq;
  req.qforge_version = "test";
  auto assembled = AssembleArtifact(req);
  ASSERT_TRUE(assembled.ok()) << assembled.status();
  ASSERT_EQ(assembled->tensors_quantized, 14);
}

inline quant::QuantizeOptions GptqOptions(int bits) {
  quant::GptqOptions o;
  o.bits = bits;
  o.group_size = 32;
  o.act_order = true;
  o.v1_zero_compat = true;
  return quant::GptqLayerOptions{o};
}

inline GptqQuantizeConfig GptqConfig(int bits) {
  GptqQuantizeConfig c;
  c.bits = bits;
  c.group_size = 32;
  c.desc_act = true;
  return c;
}

inline quant::QuantizeOptions VptqOptions() {
  quant::VptqOptions o;
  o.vector_len = 4;
  o.num_centroids = 256;
  o.num_res_centroids = 4;
  o.kmeans_iterations = 20;
  o.param_dtype = quant::VptqParamDtype::kFloat32;
  return quant::VptqLayerOptions{o};
}

}  // namespace qforge::job_testing

#endif  // QFORGE_TESTS_JOB_EVALUATION_TESTUTIL_H_

#include "bench/evaluate_mode.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "base/float16.h"
#include "base/status_macros.h"
#include "common/mem_store.h"
#include "common/safetensors.h"
#include "common/status_bridge.h"
#include "job/assembler.h"
#include "job/calibration_data.h"
#include "job/decoder_model.h"
#include "job/evaluation.h"
#include "job/layer_runner.h"
#include "job/layer_selection.h"
#include "nlohmann/json.hpp"
#include "quant/cuda/backends.h"
#include "quant/decoder.h"
#include "quant/gptq.h"
#include "quant/layer_quantizer.h"
#include "quant/linalg.h"

namespace qforge::bench {
namespace {

using Clock = std::chrono::steady_clock;

std::string Bf16Bytes(int64_t n, float scale, std::mt19937_64& rng, float offset = 0.0f) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::string out(static_cast<size_t>(n) * 2, '\0');
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = FloatToBFloat16(offset + scale * d(rng));
    std::memcpy(&out[static_cast<size_t>(i) * 2], &h, 2);
  }
  return out;
}

double PeakRssMiB() {
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

absl::Status RunEvaluate(const Flags& f, const Device& device) {
  const int64_t H = f.hidden, I = f.intermediate, heads = f.heads;
  const int64_t kv = f.kv_heads > 0 ? f.kv_heads : heads;
  const int64_t hd = f.head_dim > 0 ? f.head_dim : H / std::max<int64_t>(heads, 1);
  const int64_t layers = f.layers, V = f.vocab;
  const int64_t samples = f.samples > 0 ? f.samples : 4, L = f.seq_len > 0 ? f.seq_len : 512;
  if (H <= 0 || I <= 0 || heads <= 0 || layers <= 0 || V <= 0) {
    return absl::InvalidArgumentError(
        "--mode evaluate: --hidden, --intermediate, --heads, --layers and --vocab must be positive");
  }

  // 1. The model (BF16, in memory).
  MemStore model_store("bench-model");
  std::mt19937_64 rng(f.seed + 1);
  std::vector<std::pair<TensorSpec, std::string>> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float scale,
                 float offset = 0.0f) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    tensors.push_back({{name, DType::kBF16, shape}, Bf16Bytes(n, scale, rng, offset)});
  };
  const float sh = 1.0f / std::sqrt(static_cast<float>(H));
  add("model.embed_tokens.weight", {V, H}, 1.0f);
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {H}, 0.1f, 1.0f);
    add(p + "self_attn.q_proj.weight", {heads * hd, H}, 1.5f * sh);
    add(p + "self_attn.k_proj.weight", {kv * hd, H}, 1.5f * sh);
    add(p + "self_attn.v_proj.weight", {kv * hd, H}, sh);
    add(p + "self_attn.o_proj.weight", {H, heads * hd}, sh);
    add(p + "post_attention_layernorm.weight", {H}, 0.1f, 1.0f);
    add(p + "mlp.gate_proj.weight", {I, H}, sh);
    add(p + "mlp.up_proj.weight", {I, H}, sh);
    add(p + "mlp.down_proj.weight", {H, I}, 1.0f / std::sqrt(static_cast<float>(I)));
  }
  add("model.norm.weight", {H}, 0.1f, 1.0f);
  add("lm_head.weight", {V, H}, 0.5f * sh);
  std::vector<TensorSpec> specs;
  for (const auto& t : tensors) specs.push_back(t.first);
  {
    auto writer = ShardedSafetensorsWriter::Create(model_store, "", specs, uint64_t{2} << 30);
    QF_RETURN_IF_ERROR(writer.status());
    for (const auto& t : tensors) {
      QF_RETURN_IF_ERROR((*writer)->WriteTensorData(t.first.name, t.second));
    }
    QF_RETURN_IF_ERROR((*writer)->Finish());
  }
  tensors.clear();
  const nlohmann::json config = {{"architectures", {"LlamaForCausalLM"}},
                                 {"model_type", "llama"},
                                 {"hidden_size", H},
                                 {"intermediate_size", I},
                                 {"num_attention_heads", heads},
                                 {"num_key_value_heads", kv},
                                 {"head_dim", hd},
                                 {"num_hidden_layers", layers},
                                 {"vocab_size", V},
                                 {"max_position_embeddings", std::max<int64_t>(L, 4096)},
                                 {"rms_norm_eps", 1e-5},
                                 {"rope_theta", 10000.0},
                                 {"hidden_act", "silu"},
                                 {"tie_word_embeddings", false}};
  QF_RETURN_IF_ERROR(model_store.Put("config.json", config.dump(2)));
  auto model = SafetensorsModel::Open(model_store, "");
  QF_RETURN_IF_ERROR(model.status());

  // 2. Its GPTQ 4-bit g128 artifact (identity Hessians: what is timed is the evaluation).
  const auto t_quant = Clock::now();
  MemStore artifact("bench-artifact"), staging("bench-staging");
  auto planned = SelectLayers(*model, LayerSelection{});
  QF_RETURN_IF_ERROR(planned.status());
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  quant::GptqOptions gptq;
  gptq.bits = 4;
  gptq.group_size = 128;
  std::vector<StagedLayer> staged;
  for (const PlannedLayer& l : *planned) {
    LayerJob job;
    job.module = l.module;
    job.model_store = &model_store;
    auto loc = LocateTensor(*model, l.weight);
    QF_RETURN_IF_ERROR(loc.status());
    job.weight = *loc;
    job.options = quant::GptqLayerOptions{gptq};
    job.out_store = &staging;
    job.staged_key = "staging/" + l.module;
    QF_RETURN_IF_ERROR(RunLayer(job, *quantizers.Find("gptq")).status());
    staged.push_back({l.module, job.staged_key, {}});
  }
  AssembleRequest req;
  req.model_store = &model_store;
  req.model = &*model;
  req.staging_store = &staging;
  req.layers = staged;
  req.output_store = &artifact;
  req.config.bits = 4;
  req.config.group_size = 128;
  req.hash_source_shards = false;
  QF_RETURN_IF_ERROR(AssembleArtifact(req).status());
  const double quantize_seconds = std::chrono::duration<double>(Clock::now() - t_quant).count();
  auto candidate = SafetensorsModel::Open(artifact, "");
  QF_RETURN_IF_ERROR(candidate.status());
  auto ref_config = ReadDecoderModelConfig(model_store, "");
  QF_RETURN_IF_ERROR(ref_config.status());
  auto cand_config = ReadDecoderModelConfig(artifact, "");
  QF_RETURN_IF_ERROR(cand_config.status());
  auto quantization = ReadModelQuantization(artifact, "");
  QF_RETURN_IF_ERROR(quantization.status());

  // 3. Tokens.
  CalibrationData data;
  data.samples = samples;
  data.seq_len = L;
  data.ids.resize(static_cast<size_t>(samples * L));
  for (int32_t& id : data.ids) id = static_cast<int32_t>(rng() % static_cast<uint64_t>(V));
  data.tokens = samples * L;

  // 4. The timed evaluations.
  std::unique_ptr<quant::DecoderForward> forward;
  if (device.is_gpu()) {
    QF_ASSIGN_OR_RETURN(forward, ToAbslStatusOr(quant::NewCudaDecoderForward(device.gpu)));
  } else {
    forward = quant::NewCpuDecoderForward();
  }
  MemStore out("bench-out");
  EvaluationShardJob job;
  job.reference_store = &model_store;
  job.reference_model = &*model;
  job.reference_config = &*ref_config;
  job.candidate_store = &artifact;
  job.candidate_model = &*candidate;
  job.candidate_config = &*cand_config;
  job.candidate_quantization = &*quantization;
  job.data = &data;
  job.sample_begin = 0;
  job.sample_end = samples;
  job.forward = forward.get();
  job.out_store = &out;
  job.staged_key = kEvaluationPartialName;
  std::vector<double> times;
  EvaluationShardOutcome last;
  for (int rep = 0; rep < std::max(1, f.repeats); ++rep) {
    const auto t0 = Clock::now();
    auto outcome = RunEvaluationShard(job);
    QF_RETURN_IF_ERROR(outcome.status());
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    last = *std::move(outcome);
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  const QualityMetrics m = MetricsFromSums(last.sums);
  const nlohmann::json line = {
      {"mode", "evaluate"},
      {"device", device.is_gpu() ? device.gpu_name : std::string("cpu")},
      {"threads", quant::NumThreads()},
      {"hidden", H},
      {"intermediate", I},
      {"heads", heads},
      {"kv_heads", kv},
      {"head_dim", hd},
      {"layers", layers},
      {"vocab", V},
      {"samples", samples},
      {"seq_len", L},
      {"tokens", samples * L},
      {"predicted_tokens", m.tokens},
      {"repeats", times.size()},
      {"seconds_median", median},
      {"tokens_per_s", static_cast<double>(samples * L) / median},
      {"forward_seconds", last.forward_seconds},
      {"head_and_module_error_seconds", last.head_seconds},
      {"read_seconds", last.read_seconds},
      {"quantize_seconds_untimed", quantize_seconds},
      {"ppl_reference", m.ppl_reference},
      {"ppl_candidate", m.ppl_candidate},
      {"mean_kl", m.mean_kl},
      {"peak_rss_mib", PeakRssMiB()}};
  std::printf("%s\n", line.dump().c_str());
  return absl::OkStatus();
}

}  // namespace

qforge::Status RunEvaluateMode(const Flags& f, const Device& device) {
  const absl::Status s = RunEvaluate(f, device);
  if (s.ok()) return qforge::OkStatus();
  // The codes share absl's numbering (base/status.h).
  return qforge::Status(static_cast<qforge::StatusCode>(static_cast<int>(s.code())),
                        std::string(s.message()));
}

}  // namespace qforge::bench

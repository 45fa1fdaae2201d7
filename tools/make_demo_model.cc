// qforge-make-demo-model: writes a small Llama-shaped model (safetensors, sharded, with
// config.json) and a Hessian file for its linear layers, for the demo and the tests.
//
// Proportions follow Llama-2-7B scaled down (hidden 512, intermediate 1408 = 2.75×hidden, the
// multiple of 128 nearest to Llama's 2.6875× so that group size 128 divides every layer;
// head_dim 64, grouped-query attention). Weights are heavy-tailed (Student-t, ν = 4). Hessians
// are H = 2/n Σ x xᵀ over synthetic activations with correlated channels (a low-rank latent
// part), heavy-tailed noise and a few outlier channels, which is what makes GPTQ's error
// feedback matter. Deterministic for a given --seed.
//
// --calibration-out URI also writes demo calibration token data: a safetensors file with
// "input_ids" I64 [--calib-samples, --calib-seq-len], ids drawn from a Zipf-like
// distribution over the vocabulary (a few frequent tokens, a long tail, as in text), from
// the same seed; what `qforge-quantize --calibration` and `qforge submit --calibration` take.
// --eval-out URI writes evaluation token data the same way (same token distribution, other
// draws: held-out text), what `--eval` takes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/hessian_file.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "common/uri.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "base/float16.h"
#include "quant/hessian.h"
#include "quant/synthetic.h"
#include "common/status_bridge.h"

namespace qforge {
namespace {

struct Shape {
  int layers = 4;
  int64_t hidden = 512;
  int64_t intermediate = 1408;
  int heads = 8;
  int kv_heads = 2;
  int64_t vocab = 4096;
  int64_t samples = 1024;
  uint64_t seed = 0;
  std::string dtype = "bf16";
  uint64_t max_shard_bytes = 16ull << 20;
  std::string calibration_out;  // "" = no calibration data
  int64_t calib_samples = 32;
  int64_t calib_seq_len = 256;
  std::string eval_out;         // "" = no evaluation data
  int64_t eval_samples = 16;
  int64_t eval_seq_len = 256;
};

// Token ids [samples, seq_len] as I64 safetensors at `uri`: Zipf-like (p(rank r) ∝ 1/(r+1)^1.1)
// over a seeded random permutation of the vocabulary (the same for every file of a seed).
// held_out: the draws come from a second generator, so the file shares the calibration
// data's distribution but not its tokens.
absl::Status WriteTokenData(const std::string& uri, const Shape& s, int64_t samples,
                            int64_t seq_len, bool held_out, const char* what) {
  if (samples <= 0 || seq_len <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("demo ", what, " data: samples and seq_len must be positive"));
  }
  QF_ASSIGN_OR_RETURN(ObjectUri ou, SplitObjectUri(uri));
  QF_ASSIGN_OR_RETURN(auto store, OpenObjectStore(ou.store_uri));
  quant::Rng permutation_rng(s.seed ^ 0xca11b4a7e5eedull);
  quant::Rng held_out_rng(s.seed ^ 0xe7a1da7a5eedull);
  quant::Rng& rng = permutation_rng;
  std::vector<int64_t> token(static_cast<size_t>(s.vocab));
  for (int64_t i = 0; i < s.vocab; ++i) token[i] = i;
  for (int64_t i = s.vocab - 1; i > 0; --i) {
    std::swap(token[i], token[rng.NextU64() % static_cast<uint64_t>(i + 1)]);
  }
  quant::Rng& draw = held_out ? held_out_rng : permutation_rng;
  std::vector<double> cdf(static_cast<size_t>(s.vocab));
  double total = 0;
  for (int64_t r = 0; r < s.vocab; ++r) cdf[r] = total += std::pow(static_cast<double>(r + 1), -1.1);
  const int64_t n = samples * seq_len;
  std::string bytes(static_cast<size_t>(n) * 8, '\0');
  for (int64_t i = 0; i < n; ++i) {
    const double u = draw.Uniform() * total;
    const int64_t r = std::min<int64_t>(
        s.vocab - 1, std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
    std::memcpy(&bytes[static_cast<size_t>(i) * 8], &token[r], 8);
  }
  QF_ASSIGN_OR_RETURN(auto writer,
                      SafetensorsWriter::Create(*store, ou.key,
                                                {{"input_ids", DType::kI64,
                                                  {samples, seq_len}}}));
  QF_RETURN_IF_ERROR(writer->WriteTensorData("input_ids", bytes));
  QF_RETURN_IF_ERROR(writer->Finish());
  std::printf("demo %s data: %lld samples x %lld tokens -> %s\n", what,
              static_cast<long long>(samples), static_cast<long long>(seq_len), uri.c_str());
  return absl::OkStatus();
}

std::string Encode(const std::vector<float>& v, DType dtype) {
  std::string out(v.size() * 2, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    uint16_t h = dtype == DType::kBF16 ? qforge::FloatToBFloat16(v[i]) : qforge::FloatToHalf(v[i]);
    std::memcpy(&out[2 * i], &h, 2);
  }
  return out;
}

// Activations [samples, in]: latent factors (rank 16) + Student-t noise + outlier channels.
qforge::Matrix MakeHessian(int64_t in, int64_t samples, quant::Rng& rng) {
  const int rank = 16;
  std::vector<float> mix(static_cast<size_t>(rank * in));
  for (float& m : mix) m = static_cast<float>(rng.Normal());
  std::vector<float> outlier(static_cast<size_t>(in), 1.0f);
  for (int k = 0; k < 6; ++k) outlier[rng.NextU64() % in] = static_cast<float>(10 + 40 * rng.Uniform());
  quant::HessianAccumulator acc(in);
  const int64_t batch = 64;
  std::vector<float> x(static_cast<size_t>(batch * in));
  for (int64_t s = 0; s < samples; s += batch) {
    const int64_t b = std::min(batch, samples - s);
    for (int64_t r = 0; r < b; ++r) {
      float z[rank];
      for (int k = 0; k < rank; ++k) z[k] = static_cast<float>(rng.Normal());
      for (int64_t c = 0; c < in; ++c) {
        float v = 0.5f * static_cast<float>(rng.StudentT(4.0));
        for (int k = 0; k < rank; ++k) v += 0.25f * z[k] * mix[k * in + c];
        x[r * in + c] = v * outlier[c];
      }
    }
    (void)acc.Add(x.data(), b);
  }
  return acc.HessianF32();
}

absl::Status Run(const std::string& out_uri, const Shape& s) {
  if (s.hidden % s.heads != 0 || s.heads % s.kv_heads != 0) {
    return absl::InvalidArgumentError("hidden must divide by heads and heads by kv_heads");
  }
  const DType dtype = s.dtype == "f16" ? DType::kF16 : DType::kBF16;
  const int64_t head_dim = s.hidden / s.heads;
  const int64_t kv_dim = head_dim * s.kv_heads;
  QF_ASSIGN_OR_RETURN(auto store, OpenObjectStore(out_uri));

  struct Gen {
    std::string name;
    std::vector<int64_t> shape;
    float scale;  // 0 = norm weight (ones)
  };
  std::vector<Gen> gens;
  gens.push_back({"model.embed_tokens.weight", {s.vocab, s.hidden}, 0.02f});
  for (int i = 0; i < s.layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    gens.push_back({p + "input_layernorm.weight", {s.hidden}, 0.0f});
    gens.push_back({p + "self_attn.q_proj.weight", {s.hidden, s.hidden}, 0.02f});
    gens.push_back({p + "self_attn.k_proj.weight", {kv_dim, s.hidden}, 0.02f});
    gens.push_back({p + "self_attn.v_proj.weight", {kv_dim, s.hidden}, 0.02f});
    gens.push_back({p + "self_attn.o_proj.weight", {s.hidden, s.hidden}, 0.02f});
    gens.push_back({p + "post_attention_layernorm.weight", {s.hidden}, 0.0f});
    gens.push_back({p + "mlp.gate_proj.weight", {s.intermediate, s.hidden}, 0.02f});
    gens.push_back({p + "mlp.up_proj.weight", {s.intermediate, s.hidden}, 0.02f});
    gens.push_back({p + "mlp.down_proj.weight", {s.hidden, s.intermediate}, 0.015f});
  }
  gens.push_back({"model.norm.weight", {s.hidden}, 0.0f});
  gens.push_back({"lm_head.weight", {s.vocab, s.hidden}, 0.02f});

  std::vector<TensorSpec> specs;
  for (const Gen& g : gens) specs.push_back({g.name, dtype, g.shape});
  QF_ASSIGN_OR_RETURN(auto writer,
                      ShardedSafetensorsWriter::Create(*store, "", specs, s.max_shard_bytes));
  quant::Rng rng(s.seed);
  for (const Gen& g : gens) {
    int64_t n = 1;
    for (int64_t d : g.shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) {
      x = g.scale == 0.0f ? 1.0f + 0.05f * static_cast<float>(rng.Normal())
                          : g.scale * static_cast<float>(rng.StudentT(4.0));
    }
    QF_RETURN_IF_ERROR(writer->WriteTensorData(g.name, Encode(v, dtype)));
  }
  QF_RETURN_IF_ERROR(writer->Finish());

  nlohmann::json config = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", s.hidden},
      {"intermediate_size", s.intermediate},
      {"num_attention_heads", s.heads},
      {"num_key_value_heads", s.kv_heads},
      {"num_hidden_layers", s.layers},
      {"vocab_size", s.vocab},
      {"max_position_embeddings", 4096},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"hidden_act", "silu"},
      {"tie_word_embeddings", false},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"torch_dtype", dtype == DType::kBF16 ? "bfloat16" : "float16"},
      {"transformers_version", "4.48.0"},
  };
  QF_RETURN_IF_ERROR(store->Put("config.json", config.dump(2) + "\n"));
  nlohmann::json gen_config = {{"bos_token_id", 1}, {"eos_token_id", 2}, {"do_sample", false}};
  QF_RETURN_IF_ERROR(store->Put("generation_config.json", gen_config.dump(2) + "\n"));

  // Hessians: one per distinct layer input; q/k/v and gate/up share theirs through aliases.
  std::vector<qforge::Matrix> hs;
  std::vector<HessianEntry> entries;
  std::map<std::string, std::string> aliases;
  hs.reserve(static_cast<size_t>(4 * s.layers));
  for (int i = 0; i < s.layers; ++i) {
    const std::string p = absl::StrCat("model.layers.", i, ".");
    const std::pair<std::string, int64_t> inputs[] = {{p + "self_attn.q_proj", s.hidden},
                                                      {p + "self_attn.o_proj", s.hidden},
                                                      {p + "mlp.gate_proj", s.hidden},
                                                      {p + "mlp.down_proj", s.intermediate}};
    for (const auto& [module, in] : inputs) {
      hs.push_back(MakeHessian(in, s.samples, rng));
      entries.push_back({module, hs.back().data.data(), in});
    }
    aliases[p + "self_attn.k_proj"] = p + "self_attn.q_proj";
    aliases[p + "self_attn.v_proj"] = p + "self_attn.q_proj";
    aliases[p + "mlp.up_proj"] = p + "mlp.gate_proj";
  }
  QF_RETURN_IF_ERROR(WriteHessianFile(*store, "hessians.safetensors", entries, aliases, s.samples));

  std::printf("demo model: %d layers, hidden %lld, intermediate %lld, %s, %zu shard(s), "
              "Hessians from %lld samples -> %s\n",
              s.layers, static_cast<long long>(s.hidden), static_cast<long long>(s.intermediate),
              DTypeName(dtype), writer->shard_keys().size(), static_cast<long long>(s.samples),
              out_uri.c_str());
  if (!s.calibration_out.empty()) {
    QF_RETURN_IF_ERROR(WriteTokenData(s.calibration_out, s, s.calib_samples, s.calib_seq_len,
                                      /*held_out=*/false, "calibration"));
  }
  if (!s.eval_out.empty()) {
    QF_RETURN_IF_ERROR(WriteTokenData(s.eval_out, s, s.eval_samples, s.eval_seq_len,
                                      /*held_out=*/true, "evaluation"));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  qforge::Shape s;
  std::string out;
  CLI::App app{"qforge-make-demo-model: a small Llama-shaped safetensors model + Hessians"};
  app.set_version_flag("--version", QFORGE_VERSION);
  app.add_option("--output", out, "output directory URI")->required();
  app.add_option("--layers", s.layers, "decoder layers");
  app.add_option("--hidden", s.hidden, "hidden size");
  app.add_option("--intermediate", s.intermediate, "MLP intermediate size");
  app.add_option("--heads", s.heads, "attention heads");
  app.add_option("--kv-heads", s.kv_heads, "key/value heads");
  app.add_option("--vocab", s.vocab, "vocabulary size");
  app.add_option("--samples", s.samples, "activation samples per Hessian");
  app.add_option("--seed", s.seed, "random seed");
  app.add_option("--dtype", s.dtype, "bf16 or f16")->check(CLI::IsMember({"bf16", "f16"}));
  app.add_option("--max-shard-bytes", s.max_shard_bytes, "largest shard");
  app.add_option("--calibration-out", s.calibration_out,
                 "also write demo calibration token data (safetensors input_ids I64) to this URI");
  app.add_option("--calib-samples", s.calib_samples, "calibration data: samples");
  app.add_option("--calib-seq-len", s.calib_seq_len, "calibration data: tokens per sample");
  app.add_option("--eval-out", s.eval_out,
                 "also write held-out evaluation token data (same distribution, other draws)");
  app.add_option("--eval-samples", s.eval_samples, "evaluation data: samples");
  app.add_option("--eval-seq-len", s.eval_seq_len, "evaluation data: tokens per sample");
  CLI11_PARSE(app, argc, argv);
  absl::Status st = qforge::Run(out, s);
  if (!st.ok()) {
    std::fprintf(stderr, "qforge-make-demo-model: %s\n", st.ToString().c_str());
    return 1;
  }
  return 0;
}

// The LayerQuantizer interface (quant/layer_quantizer.h): GPTQ and VPTQ through it give exactly
// the tensors and figures of their solver plus their packer on a synthetic layer; another
// method's options, missing inputs and layers the checkpoint cannot hold are refused before
// any solving; progress reaches the solver and can cancel it; the per-device set looks the
// quantizers up by method; the VPTQ layer config JSON is the loader's entry.
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "quant/gptq.h"
#include "quant/gptq_layer_quantizer.h"
#include "quant/gptq_pack.h"
#include "quant/layer_quantizer.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"
#include "quant/vptq_layer_quantizer.h"
#include "quant/vptq_pack.h"
#include "tests/quant/cached_layers.h"

namespace qforge::quant {
namespace {

template <typename T>
std::vector<uint8_t> BytesOf(const std::vector<T>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

LayerInput InputOf(const SyntheticLayer& l, WeightDtype dtype = WeightDtype::kFloat16,
                   bool has_bias = false) {
  LayerInput in;
  in.weight = &l.weight;
  in.hessian = &l.hessian;
  in.weight_dtype = dtype;
  in.has_bias = has_bias;
  return in;
}

// Counts the calls that reach the wrapped solver.
template <typename Solver, typename Options, typename Result>
class CountingSolver final : public Solver {
 public:
  explicit CountingSolver(std::unique_ptr<Solver> inner) : inner_(std::move(inner)) {}
  const char* backend() const override { return inner_->backend(); }
  StatusOr<Result> Quantize(const Matrix& w, const Matrix& h, const Options& o) override {
    ++calls;
    return inner_->Quantize(w, h, o);
  }
  int calls = 0;

 private:
  std::unique_ptr<Solver> inner_;
};
using CountingGptq = CountingSolver<GptqSolver, GptqOptions, GptqResult>;
using CountingVptq = CountingSolver<VptqSolver, VptqOptions, VptqResult>;

VptqOptions SmallVptq() {
  VptqOptions o;
  o.vector_len = 4;
  o.num_centroids = 256;
  o.num_res_centroids = 4;
  o.kmeans_iterations = 5;
  return o;
}

TEST(LayerQuantizerTest, GptqEqualsTheSolverAndThePacker) {
  const SyntheticLayer& l = Layer(64, 256, 512, 5);
  for (const bool v2 : {false, true}) {
    SCOPED_TRACE(v2 ? "gptq_v2 asym" : "gptq v1 sym act-order");
    GptqLayerOptions options;
    options.solver.bits = v2 ? 3 : 4;
    options.solver.group_size = 64;
    options.solver.act_order = !v2;
    options.solver.sym = !v2;
    options.solver.v1_zero_compat = !v2;
    options.format = v2 ? GptqCheckpointFormat::kV2 : GptqCheckpointFormat::kV1;
    auto quantizer = NewGptqLayerQuantizer(NewCpuGptqSolver());
    EXPECT_STREQ(quantizer->method(), "gptq");
    EXPECT_STREQ(quantizer->backend(), "cpu");
    auto q = quantizer->Quantize(InputOf(l), options, nullptr);
    ASSERT_TRUE(q.ok()) << q.status().ToString();

    auto r = NewCpuGptqSolver()->Quantize(l.weight, l.hessian, options.solver);
    ASSERT_TRUE(r.ok());
    auto packed = PackGptqLayer(r->codes.data(), r->scales.data(), r->zeros.data(),
                                r->g_idx.data(), r->bits, 64, 256, r->num_groups, options.format);
    ASSERT_TRUE(packed.ok());
    const int64_t bits = options.solver.bits;
    const std::vector<QuantizedTensor> expected = {
        {"g_idx", "I32", {256}, BytesOf(packed->g_idx)},
        {"qweight", "I32", {256 * bits / 32, 64}, BytesOf(packed->qweight)},
        {"qzeros", "I32", {r->num_groups, 64 * bits / 32}, BytesOf(packed->qzeros)},
        {"scales", "F16", {r->num_groups, 64}, BytesOf(packed->scales)},
    };
    ASSERT_EQ(q->tensors.size(), expected.size());
    for (size_t i = 0; i < expected.size(); ++i) {
      EXPECT_EQ(q->tensors[i].suffix, expected[i].suffix);
      EXPECT_EQ(q->tensors[i].suffix, kGptqTensorSuffixes[i]);
      EXPECT_EQ(q->tensors[i].dtype, expected[i].dtype) << expected[i].suffix;
      EXPECT_EQ(q->tensors[i].shape, expected[i].shape) << expected[i].suffix;
      EXPECT_TRUE(q->tensors[i].bytes == expected[i].bytes) << expected[i].suffix;
    }
    EXPECT_TRUE(q->layer_config.empty());
    EXPECT_EQ(q->stats.proxy_loss, r->proxy_loss);
    EXPECT_EQ(q->stats.output_error_f32, r->output_error);
    EXPECT_EQ(q->stats.weight_energy, r->weight_energy);
    EXPECT_EQ(q->stats.damp_percent_used, r->damp_percent_used);
    // Stored bits per weight: b-bit codes, per group and row a b-bit zero and an fp16
    // scale, and one int32 g_idx entry per input column (spread over the rows).
    EXPECT_DOUBLE_EQ(q->stats.bits_per_weight,
                     bits + r->num_groups * (bits + 16.0) / 256 + 32.0 / 64);
  }
}

TEST(LayerQuantizerTest, VptqEqualsTheSolverAndThePackerInTheWeightsDtype) {
  const SyntheticLayer& l = Layer(64, 128, 256, 9);
  for (const WeightDtype dtype : {WeightDtype::kBFloat16, WeightDtype::kFloat32}) {
    const bool bf16 = dtype == WeightDtype::kBFloat16;
    SCOPED_TRACE(bf16 ? "bf16 weight, with bias" : "f32 weight, no bias");
    auto quantizer = NewVptqLayerQuantizer(NewCpuVptqSolver());
    EXPECT_STREQ(quantizer->method(), "vptq");
    auto q = quantizer->Quantize(InputOf(l, dtype, /*has_bias=*/bf16),
                                 VptqLayerOptions{SmallVptq()}, nullptr);
    ASSERT_TRUE(q.ok()) << q.status().ToString();

    VptqOptions o = SmallVptq();
    o.param_dtype = bf16 ? VptqParamDtype::kBFloat16 : VptqParamDtype::kFloat16;
    auto r = NewCpuVptqSolver()->Quantize(l.weight, l.hessian, o);
    ASSERT_TRUE(r.ok());
    auto packed = PackVptqLayer(*r, bf16 ? VptqModelDtype::kBFloat16 : VptqModelDtype::kFloat16);
    ASSERT_TRUE(packed.ok());
    packed->config.bias = bf16;
    ASSERT_EQ(q->tensors.size(), packed->tensors.size());
    for (size_t i = 0; i < packed->tensors.size(); ++i) {
      const VptqTensor& e = packed->tensors[i];
      EXPECT_EQ(q->tensors[i].suffix, e.suffix);
      EXPECT_EQ(q->tensors[i].dtype, e.dtype) << e.suffix;
      EXPECT_EQ(q->tensors[i].shape, e.shape) << e.suffix;
      EXPECT_TRUE(q->tensors[i].bytes == e.bytes) << e.suffix;
    }
    EXPECT_EQ(q->tensors[0].dtype, bf16 ? "BF16" : "F16");
    EXPECT_EQ(q->layer_config, VptqLayerConfigJson(packed->config));
    EXPECT_NE(q->layer_config.find(bf16 ? "\"bias\":true" : "\"bias\":false"), std::string::npos);
    EXPECT_EQ(q->stats.proxy_loss, r->proxy_loss);
    EXPECT_EQ(q->stats.output_error_f32, r->output_error);
    EXPECT_EQ(q->stats.weight_energy, r->weight_energy);
    EXPECT_EQ(q->stats.damp_percent_used, r->damp_percent_used);
    EXPECT_EQ(q->stats.bits_per_weight, VptqBitsPerWeight(*r));
  }
}

TEST(LayerQuantizerTest, AnotherMethodsOptionsAreInvalidArguments) {
  const SyntheticLayer& l = Layer(64, 128, 256, 9);
  auto gptq = std::make_unique<CountingGptq>(NewCpuGptqSolver());
  auto vptq = std::make_unique<CountingVptq>(NewCpuVptqSolver());
  CountingGptq* gptq_solver = gptq.get();
  CountingVptq* vptq_solver = vptq.get();
  auto g = NewGptqLayerQuantizer(std::move(gptq));
  auto v = NewVptqLayerQuantizer(std::move(vptq));

  auto s = g->Quantize(InputOf(l), VptqLayerOptions{}, nullptr).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'vptq'"), std::string::npos) << s.ToString();
  s = v->Quantize(InputOf(l), GptqLayerOptions{}, nullptr).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'gptq'"), std::string::npos) << s.ToString();

  // Missing inputs.
  LayerInput no_hessian = InputOf(l);
  no_hessian.hessian = nullptr;
  EXPECT_EQ(g->Quantize(no_hessian, GptqLayerOptions{}, nullptr).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(v->Quantize(no_hessian, VptqLayerOptions{}, nullptr).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(gptq_solver->calls, 0);
  EXPECT_EQ(vptq_solver->calls, 0);
}

TEST(LayerQuantizerTest, LayersTheCheckpointCannotHoldAreRefusedBeforeSolving) {
  auto gptq = std::make_unique<CountingGptq>(NewCpuGptqSolver());
  CountingGptq* gptq_solver = gptq.get();
  auto g = NewGptqLayerQuantizer(std::move(gptq));
  // in_features 48 is not a multiple of 32: no GPTQ checkpoint holds it.
  const SyntheticLayer& odd = Layer(64, 48, 128, 3);
  GptqLayerOptions gopt;
  gopt.solver.group_size = -1;
  auto s = g->Quantize(InputOf(odd), gopt, nullptr).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("in_features"), std::string::npos) << s.ToString();
  EXPECT_EQ(gptq_solver->calls, 0);

  auto vptq = std::make_unique<CountingVptq>(NewCpuVptqSolver());
  CountingVptq* vptq_solver = vptq.get();
  auto v = NewVptqLayerQuantizer(std::move(vptq));
  // 1000 centroids: not an index width the vptq kernels take.
  VptqLayerOptions vopt{SmallVptq()};
  vopt.solver.num_centroids = 1000;
  s = v->Quantize(InputOf(Layer(64, 128, 256, 9)), vopt, nullptr).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(vptq_solver->calls, 0);
}

TEST(LayerQuantizerTest, ProgressReachesTheSolverAndCancels) {
  const SyntheticLayer& l = Layer(64, 256, 512, 5);
  const LayerQuantizerSet set = NewCpuLayerQuantizers();
  const QuantizeOptions each[] = {GptqLayerOptions{}, VptqLayerOptions{SmallVptq()}};
  for (const QuantizeOptions& options : each) {
    SCOPED_TRACE(QuantizeMethod(options));
    std::vector<double> fractions;
    auto q = set.For(options)->Quantize(InputOf(l), options, [&](double f) {
      fractions.push_back(f);
      return true;
    });
    ASSERT_TRUE(q.ok()) << q.status().ToString();
    ASSERT_FALSE(fractions.empty());
    EXPECT_EQ(fractions.back(), 1.0);

    int calls = 0;
    auto cancelled = set.For(options)->Quantize(InputOf(l), options, [&](double) {
      ++calls;
      return false;
    });
    EXPECT_EQ(cancelled.status().code(), StatusCode::kCancelled) << cancelled.status().ToString();
    EXPECT_EQ(calls, 1);
  }
}

TEST(LayerQuantizerTest, TheSetLooksQuantizersUpByMethod) {
  LayerQuantizerSet set = NewCpuLayerQuantizers();
  EXPECT_STREQ(set.backend(), "cpu");
  ASSERT_NE(set.Find("gptq"), nullptr);
  ASSERT_NE(set.Find("vptq"), nullptr);
  EXPECT_STREQ(set.Find("gptq")->method(), "gptq");
  EXPECT_STREQ(set.Find("vptq")->method(), "vptq");
  EXPECT_EQ(set.Find("awq"), nullptr);
  EXPECT_EQ(set.For(VptqLayerOptions{}), set.Find("vptq"));
  EXPECT_EQ(set.For(GptqLayerOptions{}), set.Find("gptq"));
  EXPECT_STREQ(QuantizeMethod(QuantizeOptions{}), "gptq");

  // Adding a quantizer of a method the set has replaces it.
  LayerQuantizer* before = set.Find("gptq");
  set.Add(NewGptqLayerQuantizer(NewCpuGptqSolver()));
  EXPECT_NE(set.Find("gptq"), before);
  EXPECT_NE(set.Find("vptq"), nullptr);
  EXPECT_STREQ(LayerQuantizerSet().backend(), "none");
}

TEST(LayerQuantizerTest, VptqLayerConfigJsonIsTheLoadersEntry) {
  VptqLayerConfig c;
  c.vector_lens = {4, 8};
  c.num_centroids = {16, 4096};
  c.num_res_centroids = {-1, 256};
  c.group_num = 2;
  c.group_size = 120;
  c.outlier_size = 16;
  c.enable_perm = false;
  c.in_features = 256;
  c.out_features = 64;
  c.bias = true;
  EXPECT_EQ(VptqLayerConfigJson(c),
            "{\"bias\":true,\"enable_norm\":true,\"enable_perm\":false,\"group_num\":2,"
            "\"group_size\":120,\"in_features\":256,\"indices_as_float\":false,"
            "\"is_indice_packed\":true,\"num_centroids\":[16,4096],"
            "\"num_res_centroids\":[-1,256],\"out_features\":64,\"outlier_size\":16,"
            "\"vector_lens\":[4,8]}");
}

}  // namespace
}  // namespace qforge::quant

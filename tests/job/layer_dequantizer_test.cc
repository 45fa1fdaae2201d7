// The loaders' view of a quantized layer (job/layer_dequantizer.h): GPTQ (v1 and v2) and VPTQ
// tensors staged by the CPU quantizers are decoded with the published formulas, and the
// relative output error of the decoded weight under the layer's Hessian is the quantizer's own
// figure; a missing or ill-typed tensor and a malformed VPTQ config are refused by name.
#include "job/layer_dequantizer.h"

#include <cmath>
#include <string>

#include "common/mem_store.h"
#include "gtest/gtest.h"
#include "job/staged_layer.h"
#include "quant/gptq.h"
#include "quant/layer_quantizer.h"
#include "quant/synthetic.h"

namespace qforge {
namespace {

constexpr char kModule[] = "model.layers.0.mlp.down_proj";

struct Staged {
  MemStore store;
  std::string key = "staged/layer.safetensors";
  quant::QuantizedLayer layer;
  StagedLayerObject object;
};

// Quantizes `l` with the CPU quantizer of `options` and stages it in a MemStore.
void Stage(const quant::SyntheticLayer& l, const quant::QuantizeOptions& options, Staged* s) {
  quant::LayerQuantizerSet set = quant::NewCpuLayerQuantizers();
  quant::LayerQuantizer* q = set.For(options);
  ASSERT_NE(q, nullptr);
  quant::LayerInput in;
  in.weight = &l.weight;
  in.hessian = &l.hessian;
  auto layer = q->Quantize(in, options, {});
  ASSERT_TRUE(layer.ok()) << layer.status().ToString();
  s->layer = std::move(*layer);
  LayerOutcome outcome;
  outcome.module = kModule;
  outcome.out_features = l.weight.rows;
  outcome.in_features = l.weight.cols;
  ASSERT_TRUE(WriteStagedLayer(s->store, s->key, outcome, s->layer).ok());
  auto object = ReadStagedLayer(s->store, s->key, kModule);
  ASSERT_TRUE(object.ok()) << object.status();
  s->object = std::move(*object);
}

QuantizedModuleSource SourceOf(Staged& s) {
  return QuantizedModuleSource{&s.store, s.key, &s.object.header, kModule};
}

// The decoded weight's relative output error equals the quantizer's figure and is a real
// quantization error (neither 0 nor ~1). Bound: `tolerance` relative (VPTQ 1e-6: both use the
// 16-bit codebooks the checkpoint holds; GPTQ 1e-3: the solver's figure uses its float32
// scales, the checkpoint float16 ones, 2^-11 relative each).
void ExpectQuantizerFigure(const quant::SyntheticLayer& l, const Matrix& w_hat,
                           const quant::QuantizedLayer& layer, double tolerance) {
  ASSERT_EQ(w_hat.rows, l.weight.rows);
  ASSERT_EQ(w_hat.cols, l.weight.cols);
  const double rel = quant::OutputError(l.weight, w_hat, l.hessian) /
                     quant::WeightEnergy(l.weight, l.hessian);
  const double expected = layer.stats.output_error_f32 / layer.stats.weight_energy;
  EXPECT_GT(rel, 1e-5);
  EXPECT_LT(rel, 0.5);
  EXPECT_NEAR(rel, expected, tolerance * expected);
}

TEST(LayerDequantizerTest, GptqV1AndV2DecodeToTheQuantizersWeights) {
  const quant::SyntheticLayer l = quant::MakeSyntheticLayer(64, 256, 512, 3);
  for (const bool v2 : {false, true}) {
    SCOPED_TRACE(v2 ? "gptq_v2 3-bit asym" : "gptq v1 4-bit sym act-order");
    quant::GptqLayerOptions o;
    o.solver.bits = v2 ? 3 : 4;
    o.solver.group_size = 64;
    o.solver.sym = !v2;
    o.solver.act_order = !v2;
    o.format = v2 ? quant::GptqCheckpointFormat::kV2 : quant::GptqCheckpointFormat::kV1;
    Staged s;
    Stage(l, o, &s);
    auto w = DequantizeGptqModule(SourceOf(s), 64, 256, o.format);
    ASSERT_TRUE(w.ok()) << w.status();
    ExpectQuantizerFigure(l, *w, s.layer, 1e-3);
  }
}

TEST(LayerDequantizerTest, VptqDecodesToTheQuantizersWeights) {
  const quant::SyntheticLayer l = quant::MakeSyntheticLayer(64, 128, 512, 4);
  quant::VptqLayerOptions o;
  o.solver.vector_len = 4;
  o.solver.num_centroids = 256;
  o.solver.num_res_centroids = 4;
  o.solver.kmeans_iterations = 5;
  Staged s;
  Stage(l, o, &s);
  auto w = DequantizeVptqModule(SourceOf(s), nlohmann::json::parse(s.layer.layer_config));
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectQuantizerFigure(l, *w, s.layer, 1e-6);
}

TEST(LayerDequantizerTest, RefusesMissingTensorsWrongShapesAndBadConfigs) {
  const quant::SyntheticLayer l = quant::MakeSyntheticLayer(64, 256, 512, 5);
  quant::GptqLayerOptions o;
  Staged s;
  Stage(l, o, &s);
  // An in_features the packed rows cannot hold (256 · 4 / 32 rows are not a multiple of 200 / 32).
  auto w = DequantizeGptqModule(SourceOf(s), 64, 200, o.format);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("qweight"), std::string::npos) << w.status();
  // A module the object does not hold.
  QuantizedModuleSource other = SourceOf(s);
  other.module = "model.layers.1.mlp.down_proj";
  w = DequantizeGptqModule(other, 64, 256, o.format);
  ASSERT_FALSE(w.ok());
  EXPECT_NE(w.status().message().find("model.layers.1.mlp.down_proj.qweight' is missing"),
            std::string::npos)
      << w.status();
  // VPTQ configs: not an object, a missing field, a field of the wrong type.
  EXPECT_FALSE(VptqLayerConfigFromJson(nlohmann::json::array()).ok());
  nlohmann::json c = {{"vector_lens", {-1, 4}}, {"num_centroids", {-1, 256}},
                      {"num_res_centroids", {-1, -1}}, {"group_num", 1}, {"group_size", 128},
                      {"outlier_size", 0}, {"in_features", 128}, {"out_features", 64},
                      {"indices_as_float", false}, {"is_indice_packed", true},
                      {"enable_norm", true}, {"enable_perm", true}, {"bias", false}};
  EXPECT_TRUE(VptqLayerConfigFromJson(c).ok()) << VptqLayerConfigFromJson(c).status();
  nlohmann::json missing = c;
  missing.erase("group_size");
  auto bad = VptqLayerConfigFromJson(missing);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'group_size'"), std::string::npos) << bad.status();
  nlohmann::json typed = c;
  typed["enable_norm"] = "yes";
  bad = VptqLayerConfigFromJson(typed);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'enable_norm'"), std::string::npos) << bad.status();
  // GPTQ tensors read as VPTQ: the VPTQ decoder names the tensor it lacks.
  auto as_vptq = DequantizeVptqModule(SourceOf(s), c);
  ASSERT_FALSE(as_vptq.ok());
}

}  // namespace
}  // namespace qforge

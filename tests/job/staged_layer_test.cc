// The staged-layer format (job/staged_layer.h) and RunLayer (job/layer_runner.h): what the
// writer stages the reader reads back (tensors, outcome, layer config) under the metadata keys
// earlier versions wrote; the hand-written VPTQ config JSON is byte-for-byte nlohmann's dump;
// RunLayer stages a layer through any quantizer and names the layer in the quantizer's errors.
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/local_store.h"
#include "common/mem_store.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "job/layer_runner.h"
#include "job/staged_layer.h"
#include "job/staging_layout.h"
#include "nlohmann/json.hpp"
#include "base/float16.h"
#include "quant/layer_quantizer.h"
#include "quant/synthetic.h"
#include "quant/vptq_layer_quantizer.h"
#include "quant/vptq_pack.h"

namespace qforge {
namespace {

constexpr char kModule[] = "model.layers.0.mlp.up_proj";

// The JSON job/layer_runner.cc wrote with nlohmann before VptqLayerConfigJson existed.
std::string NlohmannVptqConfig(const quant::VptqLayerConfig& c) {
  nlohmann::json j = {{"vector_lens", {c.vector_lens[0], c.vector_lens[1]}},
                      {"num_centroids", {c.num_centroids[0], c.num_centroids[1]}},
                      {"num_res_centroids", {c.num_res_centroids[0], c.num_res_centroids[1]}},
                      {"group_num", c.group_num},
                      {"group_size", c.group_size},
                      {"outlier_size", c.outlier_size},
                      {"indices_as_float", c.indices_as_float},
                      {"is_indice_packed", c.is_indice_packed},
                      {"enable_norm", c.enable_norm},
                      {"enable_perm", c.enable_perm},
                      {"in_features", c.in_features},
                      {"out_features", c.out_features},
                      {"bias", c.bias}};
  return j.dump();
}

TEST(StagedLayerTest, VptqLayerConfigJsonIsNlohmannsDump) {
  quant::VptqLayerConfig plain;  // the defaults: no outliers, no residual
  plain.group_size = 4096;
  plain.in_features = 4096;
  plain.out_features = 11008;
  quant::VptqLayerConfig full;
  full.vector_lens = {6, 12};
  full.num_centroids = {65536, 8192};
  full.num_res_centroids = {-1, 32768};
  full.group_num = 4;
  full.group_size = 1000;
  full.outlier_size = 96;
  full.enable_norm = false;
  full.enable_perm = false;
  full.in_features = 4096;
  full.out_features = 1;
  full.bias = true;
  for (const quant::VptqLayerConfig& c : {plain, full}) {
    EXPECT_EQ(quant::VptqLayerConfigJson(c), NlohmannVptqConfig(c));
  }
  // And of a packed layer's config.
  auto from_options = quant::VptqConfigFromOptions(quant::VptqOptions{}, 64, 256, true);
  ASSERT_TRUE(from_options.ok());
  EXPECT_EQ(quant::VptqLayerConfigJson(*from_options), NlohmannVptqConfig(*from_options));
}

LayerOutcome SomeOutcome() {
  LayerOutcome o;
  o.module = kModule;
  o.out_features = 64;
  o.in_features = 128;
  o.proxy_loss = 0.125;
  o.output_error = 1.0 / 3.0;
  o.weight_energy = 2.5e7;
  o.relative_error = o.output_error / o.weight_energy;
  o.damp_percent_used = 0.02;
  o.read_seconds = 0.001;
  o.solve_seconds = 1.75;
  o.bits_per_weight = 2.3125;
  o.bytes_read = 1ull << 40;
  o.bytes_written = 12345;
  return o;
}

TEST(StagedLayerTest, OutcomeJsonRoundTrips) {
  const LayerOutcome o = SomeOutcome();
  const nlohmann::json j = LayerOutcomeToJson(o);
  EXPECT_FALSE(j.contains("staged_key"));
  auto back = LayerOutcomeFromJson(nlohmann::json::parse(j.dump()));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(LayerOutcomeToJson(*back).dump(), j.dump());
  EXPECT_EQ(back->bytes_read, o.bytes_read);
  EXPECT_EQ(back->output_error, o.output_error);

  nlohmann::json older = j;  // objects staged before bits_per_weight existed
  older.erase("bits_per_weight");
  back = LayerOutcomeFromJson(older);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->bits_per_weight, 0);

  nlohmann::json incomplete = j;
  incomplete.erase("proxy_loss");
  EXPECT_EQ(LayerOutcomeFromJson(incomplete).status().code(), absl::StatusCode::kInvalidArgument);
  auto not_object = LayerOutcomeFromJson(nlohmann::json::array());
  EXPECT_EQ(not_object.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(not_object.status().message().find("qforge.layer"), std::string::npos);
}

quant::QuantizedLayer SomeLayer(std::string layer_config) {
  quant::QuantizedLayer layer;
  layer.tensors.push_back({"indices", "I32", {2, 3}, std::vector<uint8_t>(24, 7)});
  layer.tensors.push_back({"centroids.weight", "BF16", {1, 4}, std::vector<uint8_t>(8, 9)});
  layer.layer_config = std::move(layer_config);
  return layer;
}

TEST(StagedLayerTest, TheReaderReadsWhatTheWriterStaged) {
  MemStore store;
  const LayerOutcome outcome = SomeOutcome();
  const std::string config = R"({"bias":false,"vector_lens":[-1,8]})";
  ASSERT_TRUE(WriteStagedLayer(store, "a/layer.safetensors", outcome, SomeLayer(config)).ok());

  // The keys and names earlier versions wrote and read.
  auto header = ReadSafetensorsHeader(store, "a/layer.safetensors");
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(header->metadata().at("qforge.layer"), LayerOutcomeToJson(outcome).dump());
  EXPECT_EQ(header->metadata().at("qforge.vptq_config"), config);
  EXPECT_NE(header->Find(std::string(kModule) + ".indices"), nullptr);
  EXPECT_EQ(header->Find(std::string(kModule) + ".centroids.weight")->dtype, DType::kBF16);

  auto object = ReadStagedLayer(store, "a/layer.safetensors", kModule);
  ASSERT_TRUE(object.ok()) << object.status();
  ASSERT_TRUE(object->outcome.has_value());
  EXPECT_EQ(LayerOutcomeToJson(*object->outcome), LayerOutcomeToJson(outcome));
  EXPECT_EQ(object->layer_config, nlohmann::json::parse(config));
  ASSERT_NE(object->FindTensor("indices"), nullptr);
  EXPECT_EQ(object->FindTensor("indices")->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(object->FindTensor("perm"), nullptr);
  ASSERT_EQ(object->Tensors().size(), 2u);
  auto bytes = ReadTensorBytes(store, "a/layer.safetensors", object->header,
                               *object->FindTensor("centroids.weight"));
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(*bytes, std::string(8, '\x09'));
  // Read for another module, the object has none of its tensors.
  auto other = ReadStagedLayer(store, "a/layer.safetensors", "model.layers.0.mlp.down_proj");
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE(other->Tensors().empty());

  // A method without a layer config writes none; an object without an outcome reads as such.
  ASSERT_TRUE(WriteStagedLayer(store, "b/layer.safetensors", outcome, SomeLayer("")).ok());
  object = ReadStagedLayer(store, "b/layer.safetensors", kModule);
  ASSERT_TRUE(object.ok());
  EXPECT_TRUE(object->layer_config.is_null());
  auto w = SafetensorsWriter::Create(store, "c/layer.safetensors", {}, {});
  ASSERT_TRUE(w.ok() && (*w)->Finish().ok());
  object = ReadStagedLayer(store, "c/layer.safetensors", kModule);
  ASSERT_TRUE(object.ok());
  EXPECT_FALSE(object->outcome.has_value());
}

// Staged objects are written by workers: metadata that is not what the writer writes (not
// JSON, the wrong JSON type, fields of the wrong type, deeply nested) reads as "no outcome" /
// "no usable config", never as a crash.
TEST(StagedLayerTest, MalformedMetadataReadsAsAbsent) {
  MemStore store;
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"not json {", "{{{"},
      {"[1, 2, 3]", "42"},
      {R"({"module": 7, "out_features": "many"})", deep},
      {deep, ""},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string key = "bad/" + std::to_string(i);
    auto w = SafetensorsWriter::Create(
        store, key, {},
        {{"qforge.layer", cases[i].first}, {"qforge.vptq_config", cases[i].second}});
    ASSERT_TRUE(w.ok() && (*w)->Finish().ok()) << i;
    auto object = ReadStagedLayer(store, key, kModule);
    ASSERT_TRUE(object.ok()) << i << ": " << object.status();
    EXPECT_FALSE(object->outcome.has_value()) << i;
    EXPECT_FALSE(object->layer_config.is_object()) << i;
  }
}

TEST(StagedLayerTest, TensorsThatDoNotMatchTheirShapeAreRefused) {
  MemStore store;
  quant::QuantizedLayer short_bytes = SomeLayer("");
  short_bytes.tensors[0].bytes.pop_back();
  auto s = WriteStagedLayer(store, "x", SomeOutcome(), short_bytes);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find(std::string(kModule) + ".indices"), std::string::npos) << s;
  quant::QuantizedLayer bad_dtype = SomeLayer("");
  bad_dtype.tensors[1].dtype = "Q4";
  EXPECT_EQ(WriteStagedLayer(store, "x", SomeOutcome(), bad_dtype).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(store.Stat("x").ok());
}

// A model with one F16 [64, 128] weight in a MemStore.
TensorLocation WriteModel(MemStore& store) {
  quant::Rng rng(11);
  std::string bytes(64 * 128 * 2, '\0');
  for (size_t i = 0; i < 64 * 128; ++i) {
    const uint16_t h = FloatToHalf(0.05f * static_cast<float>(rng.StudentT(4.0)));
    std::memcpy(&bytes[2 * i], &h, 2);
  }
  const std::vector<TensorSpec> specs = {
      {std::string(kModule) + ".weight", DType::kF16, {64, 128}}};
  auto w = SafetensorsWriter::Create(store, "model.safetensors", specs);
  EXPECT_TRUE(w.ok());
  EXPECT_TRUE((*w)->WriteTensorData(specs[0].name, bytes).ok());
  EXPECT_TRUE((*w)->Finish().ok());
  auto model = SafetensorsModel::Open(store, "");
  EXPECT_TRUE(model.ok()) << model.status();
  return *LocateTensor(*model, specs[0].name);
}

TEST(StagedLayerTest, RunLayerStagesThroughAnyQuantizerAndNamesTheLayer) {
  MemStore store;
  const quant::LayerQuantizerSet quantizers = quant::NewCpuLayerQuantizers();
  LayerJob job;
  job.module = kModule;
  job.model_store = &store;
  job.weight = WriteModel(store);
  job.out_store = &store;
  quant::VptqOptions vptq;
  vptq.vector_len = 4;
  vptq.num_centroids = 16;
  vptq.kmeans_iterations = 3;
  const quant::QuantizeOptions each[] = {quant::GptqLayerOptions{}, quant::VptqLayerOptions{vptq}};
  for (const quant::QuantizeOptions& options : each) {
    const std::string method = quant::QuantizeMethod(options);
    SCOPED_TRACE(method);
    job.options = options;
    job.staged_key = method + "/layer.safetensors";
    auto outcome = RunLayer(job, *quantizers.For(options));
    ASSERT_TRUE(outcome.ok()) << outcome.status();
    EXPECT_EQ(outcome->staged_key, job.staged_key);
    EXPECT_EQ(outcome->bytes_read, 64u * 128 * 2);  // the weight; H is the identity
    EXPECT_GT(outcome->relative_error, 0);
    auto object = ReadStagedLayer(store, job.staged_key, kModule);
    ASSERT_TRUE(object.ok()) << object.status();
    ASSERT_TRUE(object->outcome.has_value());
    EXPECT_EQ(object->outcome->proxy_loss, outcome->proxy_loss);
    EXPECT_EQ(object->outcome->write_seconds, 0);  // the header precedes the data
    uint64_t tensor_bytes = 0;
    for (const TensorInfo* t : object->Tensors()) tensor_bytes += t->num_bytes();
    EXPECT_EQ(outcome->bytes_written, tensor_bytes);
    EXPECT_EQ(object->layer_config.is_object(), method == "vptq");

    // The other method's quantizer refuses these options, naming the layer.
    quant::LayerQuantizer* other = quantizers.Find(method == "gptq" ? "vptq" : "gptq");
    job.staged_key = method + "/wrong.safetensors";
    auto wrong = RunLayer(job, *other);
    EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(wrong.status().message().rfind(std::string("layer '") + kModule + "': ", 0), 0u)
        << wrong.status();
    EXPECT_FALSE(store.Stat(job.staged_key).ok());
  }
}

}  // namespace
}  // namespace qforge

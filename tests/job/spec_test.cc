// job/spec.h: JobSpec conversion, defaults, and validation errors that name the field.
#include "job/spec.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <variant>
#include <vector>

#include "gtest/gtest.h"

namespace qforge {
namespace {

v1::JobSpec MinimalSpec() {
  v1::JobSpec s;
  s.set_model_uri("/data/model");
  s.set_output_uri("/data/out");
  s.mutable_calibration()->set_none(true);
  return s;
}

// The GPTQ options of a converted GPTQ spec, the VPTQ solver options of a VPTQ one.
quant::GptqLayerOptions& Gptq(JobConfig& c) {
  return std::get<quant::GptqLayerOptions>(c.quantize);
}
quant::VptqOptions& VptqOptionsOf(JobConfig& c) {
  return std::get<quant::VptqLayerOptions>(c.quantize).solver;
}

v1::VptqSpec* Vptq(v1::JobSpec& s) {
  s.set_method(v1::METHOD_VPTQ);
  return s.mutable_vptq();
}

TEST(SpecTest, FillsInDefaultsAndConvertsOptions) {
  auto c = ConvertJobSpec(MinimalSpec());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->spec.method(), v1::METHOD_GPTQ);
  EXPECT_EQ(c->spec.gptq().bits(), 4);
  EXPECT_EQ(c->spec.gptq().group_size(), 128);
  EXPECT_DOUBLE_EQ(c->spec.gptq().damp_percent(), 0.01);
  EXPECT_EQ(c->spec.gptq().checkpoint_format(), "gptq");
  ASSERT_EQ(c->spec.include_size(), 1);
  EXPECT_EQ(c->spec.include(0), kDefaultLayerInclude);
  EXPECT_EQ(c->spec.max_attempts(), 4);
  EXPECT_EQ(c->spec.max_shard_bytes(), kDefaultMaxShardBytes);
  EXPECT_TRUE(c->identity_hessian);
  EXPECT_EQ(Gptq(*c).solver.bits, 4);
  EXPECT_EQ(Gptq(*c).solver.group_size, 128);
  EXPECT_TRUE(Gptq(*c).solver.sym);
  EXPECT_FALSE(Gptq(*c).solver.act_order);
  EXPECT_EQ(Gptq(*c).format, quant::GptqCheckpointFormat::kV1);

  // The normalized spec converts to the same options (what the worker does with Task.spec).
  auto again = ConvertJobSpec(c->spec);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->spec.SerializeAsString(), c->spec.SerializeAsString());

  v1::JobSpec s = MinimalSpec();
  s.mutable_gptq()->set_bits(3);
  s.mutable_gptq()->set_group_size(-1);
  s.mutable_gptq()->set_asym(true);
  s.mutable_gptq()->set_desc_act(true);
  s.mutable_gptq()->set_static_groups(true);
  s.mutable_gptq()->set_mse(true);
  s.mutable_gptq()->set_damp_percent(0.1);
  s.mutable_gptq()->set_checkpoint_format("gptq_v2");
  s.mutable_calibration()->set_hessians_uri("file:///data/h.safetensors");
  s.add_exclude("lm_head");
  s.set_max_attempts(7);
  SpecOptions opts;
  opts.default_max_attempts = 2;
  c = ConvertJobSpec(s, opts);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(Gptq(*c).solver.bits, 3);
  EXPECT_EQ(Gptq(*c).solver.group_size, -1);
  EXPECT_FALSE(Gptq(*c).solver.sym);
  EXPECT_TRUE(Gptq(*c).solver.act_order);
  EXPECT_TRUE(Gptq(*c).solver.static_groups);
  EXPECT_TRUE(Gptq(*c).solver.mse);
  EXPECT_DOUBLE_EQ(Gptq(*c).solver.damp_percent, 0.1);
  EXPECT_EQ(Gptq(*c).format, quant::GptqCheckpointFormat::kV2);
  EXPECT_FALSE(Gptq(*c).solver.v1_zero_compat);
  EXPECT_FALSE(c->identity_hessian);
  EXPECT_EQ(c->hessians_uri, "file:///data/h.safetensors");
  EXPECT_EQ(c->selection.exclude, std::vector<std::string>{"lm_head"});
  EXPECT_EQ(c->max_attempts, 7);

  GptqQuantizeConfig q = QuantizeConfigForSpec(*c);
  EXPECT_EQ(q.bits, 3);
  EXPECT_EQ(q.group_size, -1);
  EXPECT_FALSE(q.sym);
  EXPECT_TRUE(q.desc_act);
  EXPECT_EQ(q.format, quant::GptqCheckpointFormat::kV2);
  // Layers are solved independently from the original Hessians: not true-sequential.
  EXPECT_FALSE(q.true_sequential);
  EXPECT_EQ(GptqQuantizeConfigJson(q).at("true_sequential"), false);

  s.set_max_attempts(0);
  c = ConvertJobSpec(s, opts);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->max_attempts, 2);
}

struct BadField {
  const char* name;
  std::function<void(v1::JobSpec&)> mutate;
  absl::StatusCode code;
  const char* expect;  // must appear in the message
};

TEST(SpecTest, RelativeLocalPathsBecomeAbsoluteOnce) {
  const std::string cwd = std::filesystem::current_path().string();
  v1::JobSpec spec = MinimalSpec();
  spec.set_model_uri("models/tiny");
  spec.set_output_uri("./out/../quantized");
  spec.mutable_calibration()->set_hessians_uri("h/hessians.safetensors");
  spec.mutable_evaluation()->set_dataset_uri("eval.jsonl");
  auto c = ConvertJobSpec(spec);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->spec.model_uri(), cwd + "/models/tiny");
  EXPECT_EQ(c->spec.output_uri(), cwd + "/quantized");
  EXPECT_EQ(c->spec.calibration().hessians_uri(), cwd + "/h/hessians.safetensors");
  EXPECT_EQ(c->hessians_uri, cwd + "/h/hessians.safetensors");
  EXPECT_EQ(c->spec.evaluation().dataset_uri(), cwd + "/eval.jsonl");
  EXPECT_EQ(c->evaluation.dataset_uri, cwd + "/eval.jsonl");

  // Converted in another working directory (a worker's), the normalized spec is unchanged.
  char tmpl[] = "/tmp/qforge-spec-cwd-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::filesystem::current_path(tmpl);
  auto again = ConvertJobSpec(c->spec);
  std::filesystem::current_path(cwd);
  std::filesystem::remove_all(tmpl);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->spec.output_uri(), cwd + "/quantized");
  EXPECT_EQ(again->spec.model_uri(), cwd + "/models/tiny");

  // Dataset calibration, an evaluation-only job's reference, and URIs that stay as given.
  v1::JobSpec data = MinimalSpec();
  data.mutable_calibration()->set_dataset_uri("tokens.safetensors");
  data.set_output_uri("file:///data/out");
  auto d = ConvertJobSpec(data);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->spec.calibration().dataset_uri(), cwd + "/tokens.safetensors");
  EXPECT_EQ(d->spec.output_uri(), "file:///data/out");
  EXPECT_EQ(d->spec.model_uri(), "/data/model");
  v1::JobSpec eval;
  eval.set_model_uri("candidate");
  eval.set_reference_model_uri("original");
  eval.mutable_evaluation()->set_dataset_uri("/data/eval.jsonl");
  auto e = ConvertJobSpec(eval);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(e->spec.reference_model_uri(), cwd + "/original");
  EXPECT_EQ(e->reference_model_uri, cwd + "/original");
  EXPECT_EQ(e->spec.output_uri(), "");
}

TEST(SpecTest, EachBadFieldIsNamed) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<BadField> cases = {
      {"bits", [](v1::JobSpec& s) { s.mutable_gptq()->set_bits(5); },
       absl::StatusCode::kInvalidArgument, "spec.gptq.bits: 5 is not one of 2, 3, 4, 8"},
      {"negative bits", [](v1::JobSpec& s) { s.mutable_gptq()->set_bits(-4); },
       absl::StatusCode::kInvalidArgument, "spec.gptq.bits: -4"},
      {"group size", [](v1::JobSpec& s) { s.mutable_gptq()->set_group_size(-2); },
       absl::StatusCode::kInvalidArgument, "spec.gptq.group_size: -2"},
      {"damping", [](v1::JobSpec& s) { s.mutable_gptq()->set_damp_percent(1.5); },
       absl::StatusCode::kInvalidArgument, "spec.gptq.damp_percent: 1.5"},
      {"negative damping", [](v1::JobSpec& s) { s.mutable_gptq()->set_damp_percent(-0.1); },
       absl::StatusCode::kInvalidArgument, "spec.gptq.damp_percent"},
      {"NaN damping", [nan](v1::JobSpec& s) { s.mutable_gptq()->set_damp_percent(nan); },
       absl::StatusCode::kInvalidArgument, "spec.gptq.damp_percent"},
      {"checkpoint format",
       [](v1::JobSpec& s) { s.mutable_gptq()->set_checkpoint_format("gptq_v3"); },
       absl::StatusCode::kInvalidArgument, "spec.gptq.checkpoint_format: 'gptq_v3'"},
      {"model", [](v1::JobSpec& s) { s.clear_model_uri(); }, absl::StatusCode::kInvalidArgument,
       "spec.model_uri: required"},
      {"output", [](v1::JobSpec& s) { s.clear_output_uri(); },
       absl::StatusCode::kInvalidArgument, "spec.output_uri: required"},
      {"control char", [](v1::JobSpec& s) { s.set_output_uri("/a\nb"); },
       absl::StatusCode::kInvalidArgument, "spec.output_uri"},
      {"calibration", [](v1::JobSpec& s) { s.clear_calibration(); },
       absl::StatusCode::kInvalidArgument, "spec.calibration: required"},
      {"calibration none false",
       [](v1::JobSpec& s) { s.mutable_calibration()->set_none(false); },
       absl::StatusCode::kInvalidArgument, "spec.calibration.none"},
      {"hessians dir",
       [](v1::JobSpec& s) { s.mutable_calibration()->set_hessians_uri("/data/h/"); },
       absl::StatusCode::kInvalidArgument, "spec.calibration.hessians_uri"},
      {"hessians scheme",
       [](v1::JobSpec& s) { s.mutable_calibration()->set_hessians_uri("gs://b/h.safetensors"); },
       absl::StatusCode::kInvalidArgument, "spec.calibration.hessians_uri"},
      {"dataset dir", [](v1::JobSpec& s) { s.mutable_calibration()->set_dataset_uri("/d/c4/"); },
       absl::StatusCode::kInvalidArgument, "spec.calibration.dataset_uri"},
      {"dataset empty", [](v1::JobSpec& s) { s.mutable_calibration()->set_dataset_uri(""); },
       absl::StatusCode::kInvalidArgument, "spec.calibration.dataset_uri: required"},
      {"negative samples",
       [](v1::JobSpec& s) {
         s.mutable_calibration()->set_dataset_uri("/d/c4.safetensors");
         s.mutable_calibration()->set_samples(-1);
       },
       absl::StatusCode::kInvalidArgument, "spec.calibration.samples: -1 is negative"},
      {"negative seq_len",
       [](v1::JobSpec& s) {
         s.mutable_calibration()->set_dataset_uri("/d/c4.safetensors");
         s.mutable_calibration()->set_seq_len(-2048);
       },
       absl::StatusCode::kInvalidArgument, "spec.calibration.seq_len: -2048"},
      {"negative shard_samples",
       [](v1::JobSpec& s) {
         s.mutable_calibration()->set_dataset_uri("/d/c4.safetensors");
         s.mutable_calibration()->set_shard_samples(-3);
       },
       absl::StatusCode::kInvalidArgument, "spec.calibration.shard_samples: -3"},
      {"samples without data", [](v1::JobSpec& s) { s.mutable_calibration()->set_samples(128); },
       absl::StatusCode::kInvalidArgument,
       "spec.calibration.samples: 128 (--calib-samples) applies only to calibration from token"},
      {"seq_len with hessians",
       [](v1::JobSpec& s) {
         s.mutable_calibration()->set_hessians_uri("/h.safetensors");
         s.mutable_calibration()->set_seq_len(512);
       },
       absl::StatusCode::kInvalidArgument, "spec.calibration.seq_len: 512 (--calib-seq-len)"},
      {"shard_samples without data",
       [](v1::JobSpec& s) { s.mutable_calibration()->set_shard_samples(8); },
       absl::StatusCode::kInvalidArgument, "spec.calibration.shard_samples"},
      {"no_cache without data", [](v1::JobSpec& s) { s.mutable_calibration()->set_no_cache(true); },
       absl::StatusCode::kInvalidArgument, "spec.calibration.no_cache: set, but"},
      {"VPTQ with a gptq block",
       [](v1::JobSpec& s) {
         s.set_method(v1::METHOD_VPTQ);
         s.mutable_gptq()->set_bits(4);
       },
       absl::StatusCode::kInvalidArgument, "spec.gptq: set, but the method is VPTQ"},
      {"VPTQ vector length", [](v1::JobSpec& s) { Vptq(s)->set_vector_len(5); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.vector_len: 5 is not one of"},
      {"VPTQ centroids not a power of two", [](v1::JobSpec& s) { Vptq(s)->set_num_centroids(1000); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.num_centroids: 1000 is not 2^b"},
      {"VPTQ centroids index width", [](v1::JobSpec& s) { Vptq(s)->set_num_centroids(512); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.num_centroids: 512"},
      {"VPTQ negative centroids", [](v1::JobSpec& s) { Vptq(s)->set_num_centroids(-4096); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.num_centroids: -4096"},
      {"VPTQ residual width", [](v1::JobSpec& s) { Vptq(s)->set_num_res_centroids(8192); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.num_res_centroids: 8192"},
      {"VPTQ residual of one", [](v1::JobSpec& s) { Vptq(s)->set_num_res_centroids(1); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.num_res_centroids: 1"},
      {"VPTQ negative outliers", [](v1::JobSpec& s) { Vptq(s)->set_outlier_size(-1); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.outlier_size: -1"},
      {"VPTQ outlier vector length",
       [](v1::JobSpec& s) {
         Vptq(s)->set_outlier_size(64);
         Vptq(s)->set_outlier_vector_len(3);
       },
       absl::StatusCode::kInvalidArgument, "spec.vptq.outlier_vector_len: 3"},
      {"VPTQ outlier vector length the GEMV kernel refuses",
       [](v1::JobSpec& s) {
         Vptq(s)->set_outlier_size(64);
         Vptq(s)->set_outlier_vector_len(8);
       },
       absl::StatusCode::kInvalidArgument, "spec.vptq.outlier_vector_len: 8 is not 4"},
      {"VPTQ vector length not a multiple of the default outlier vector length",
       [](v1::JobSpec& s) {
         Vptq(s)->set_vector_len(6);
         Vptq(s)->set_outlier_size(64);
       },
       absl::StatusCode::kInvalidArgument,
       "spec.vptq.vector_len: 6 is not a multiple of outlier_vector_len 4 (the default), but "
       "outlier_size is 64"},
      {"VPTQ residual wider than the index",
       [](v1::JobSpec& s) {
         Vptq(s)->set_num_centroids(256);
         Vptq(s)->set_num_res_centroids(1024);
       },
       absl::StatusCode::kInvalidArgument,
       "spec.vptq.num_res_centroids: 1024 is larger than num_centroids 256"},
      {"VPTQ outlier centroids",
       [](v1::JobSpec& s) {
         Vptq(s)->set_outlier_size(64);
         Vptq(s)->set_outlier_centroids(70000);
       },
       absl::StatusCode::kInvalidArgument, "spec.vptq.outlier_centroids: 70000"},
      {"VPTQ outlier options without outliers",
       [](v1::JobSpec& s) { Vptq(s)->set_outlier_centroids(256); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.outlier_centroids: set, but outlier_size is 0"},
      {"VPTQ groups with a large codebook", [](v1::JobSpec& s) { Vptq(s)->set_group_num(2); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.group_num: 2 groups need num_centroids <= 4096"},
      {"VPTQ negative groups", [](v1::JobSpec& s) { Vptq(s)->set_group_num(-2); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.group_num: -2"},
      {"VPTQ k-means iterations", [](v1::JobSpec& s) { Vptq(s)->set_kmeans_iters(-5); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.kmeans_iters: -5"},
      {"VPTQ damping", [nan](v1::JobSpec& s) { Vptq(s)->set_damp_percent(nan); },
       absl::StatusCode::kInvalidArgument, "spec.vptq.damp_percent"},
      {"unknown method", [](v1::JobSpec& s) { s.set_method(static_cast<v1::Method>(9)); },
       absl::StatusCode::kInvalidArgument, "spec.method: 9"},
      {"vptq block", [](v1::JobSpec& s) { s.mutable_vptq()->set_vector_len(8); },
       absl::StatusCode::kInvalidArgument, "spec.vptq"},
      {"include regex", [](v1::JobSpec& s) { s.add_include("(unclosed"); },
       absl::StatusCode::kInvalidArgument, "spec.include[0]: '(unclosed'"},
      {"exclude regex",
       [](v1::JobSpec& s) {
         s.add_exclude("ok");
         s.add_exclude("[z-a]");
       },
       absl::StatusCode::kInvalidArgument, "spec.exclude[1]"},
      {"empty include", [](v1::JobSpec& s) { s.add_include(""); },
       absl::StatusCode::kInvalidArgument, "spec.include[0]: empty"},
      {"attempts low", [](v1::JobSpec& s) { s.set_max_attempts(-1); },
       absl::StatusCode::kInvalidArgument, "spec.max_attempts: -1"},
      {"attempts high", [](v1::JobSpec& s) { s.set_max_attempts(101); },
       absl::StatusCode::kInvalidArgument, "spec.max_attempts: 101"},
      {"label key", [](v1::JobSpec& s) { (*s.mutable_labels())[""] = "x"; },
       absl::StatusCode::kInvalidArgument, "spec.labels: empty key"},
  };
  for (const BadField& c : cases) {
    v1::JobSpec s = MinimalSpec();
    c.mutate(s);
    absl::Status st = ConvertJobSpec(s).status();
    EXPECT_EQ(st.code(), c.code) << c.name << ": " << st;
    EXPECT_NE(st.message().find(c.expect), std::string::npos) << c.name << ": " << st;
  }
}

TEST(SpecTest, LayerChecksNameFieldAndLayer) {
  v1::JobSpec s = MinimalSpec();
  s.mutable_gptq()->set_group_size(64);
  auto c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok());
  const char* layer = "model.layers.3.mlp.down_proj";
  EXPECT_TRUE(ValidateLayerForSpec(*c, layer, 64, 128).ok());
  // A group size that does not divide in_features.
  absl::Status st = ValidateLayerForSpec(*c, layer, 64, 96);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("spec.gptq.group_size: 64 does not divide in_features 96"),
            std::string::npos)
      << st;
  EXPECT_NE(st.message().find(layer), std::string::npos) << st;
  // Larger than in_features.
  st = ValidateLayerForSpec(*c, layer, 64, 32);
  EXPECT_NE(st.message().find("spec.gptq.group_size: 64 is larger than in_features 32"),
            std::string::npos)
      << st;
  // Not packable: in_features not a multiple of 32, out_features not a multiple of 8 (4 bits).
  Gptq(*c).solver.group_size = -1;
  st = ValidateLayerForSpec(*c, layer, 64, 48);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("spec.gptq.bits"), std::string::npos) << st;
  EXPECT_NE(st.message().find("[64, 48]"), std::string::npos) << st;
  st = ValidateLayerForSpec(*c, layer, 12, 64);
  EXPECT_NE(st.message().find("out_features = 12"), std::string::npos) << st;
  // 3 bits need out_features % 32 == 0.
  Gptq(*c).solver.bits = 3;
  EXPECT_FALSE(ValidateLayerForSpec(*c, layer, 48, 64).ok());
  EXPECT_TRUE(ValidateLayerForSpec(*c, layer, 64, 64).ok());
}

TEST(SpecTest, VptqDefaultsAndOptions) {
  v1::JobSpec s = MinimalSpec();
  s.set_method(v1::METHOD_VPTQ);
  auto c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->method(), ArtifactMethod::kVptq);
  EXPECT_FALSE(c->spec.has_gptq());
  const v1::VptqSpec& v = c->spec.vptq();
  EXPECT_EQ(v.vector_len(), 8);
  EXPECT_EQ(v.num_centroids(), 65536);
  ASSERT_TRUE(std::holds_alternative<quant::VptqLayerOptions>(c->quantize));
  EXPECT_STREQ(quant::QuantizeMethod(c->quantize), "vptq");
  EXPECT_EQ(v.num_res_centroids(), 0);
  EXPECT_EQ(v.group_num(), 1);
  EXPECT_TRUE(v.has_enable_norm() && v.enable_norm());
  EXPECT_TRUE(v.has_enable_perm() && v.enable_perm());
  EXPECT_EQ(v.kmeans_iters(), 100);
  EXPECT_DOUBLE_EQ(v.damp_percent(), 0.01);
  EXPECT_EQ(VptqOptionsOf(*c).vector_len, 8);
  EXPECT_EQ(VptqOptionsOf(*c).num_centroids, 65536);
  EXPECT_EQ(VptqOptionsOf(*c).outlier_size, 0);
  // The normalized spec converts to the same (what the worker does with Task.spec).
  auto again = ConvertJobSpec(c->spec);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->spec.SerializeAsString(), c->spec.SerializeAsString());

  // Every field reaches the options; the outlier vector length defaults to 4 (the only one the
  // vptq GEMV kernel takes), the outlier codebook follows the main one.
  s = MinimalSpec();
  v1::VptqSpec* in = Vptq(s);
  in->set_vector_len(12);
  in->set_num_centroids(4096);
  in->set_num_res_centroids(256);
  in->set_outlier_size(128);
  in->set_group_num(4);
  in->set_enable_norm(false);
  in->set_enable_perm(false);
  in->set_kmeans_iters(20);
  in->set_seed(42);
  in->set_damp_percent(0.05);
  c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  const quant::VptqOptions& o = VptqOptionsOf(*c);
  EXPECT_EQ(o.vector_len, 12);
  EXPECT_EQ(o.num_centroids, 4096);
  EXPECT_EQ(o.num_res_centroids, 256);
  EXPECT_EQ(o.outlier_size, 128);
  EXPECT_EQ(o.outlier_vector_len, 4);
  EXPECT_EQ(o.outlier_num_centroids, 4096);
  EXPECT_EQ(o.group_num, 4);
  EXPECT_FALSE(o.enable_norm);
  EXPECT_FALSE(o.enable_perm);
  EXPECT_EQ(o.kmeans_iterations, 20);
  EXPECT_EQ(o.kmeans_seed, 42u);
  EXPECT_DOUBLE_EQ(o.damp_percent, 0.05);
  EXPECT_EQ(c->spec.vptq().outlier_vector_len(), 4);
  EXPECT_EQ(c->spec.vptq().outlier_centroids(), 4096);
}

TEST(SpecTest, VptqLayerChecksNameFieldAndLayer) {
  v1::JobSpec s = MinimalSpec();
  v1::VptqSpec* v = Vptq(s);
  v->set_num_centroids(4096);
  v->set_group_num(3);
  v->set_outlier_size(64);
  auto c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  const char* layer = "model.layers.0.self_attn.o_proj";
  EXPECT_TRUE(ValidateLayerForSpec(*c, layer, 128, 64 + 3 * 32).ok());
  // (in − outlier_size) not divisible by group_num.
  absl::Status st = ValidateLayerForSpec(*c, layer, 128, 64 + 100);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("spec.vptq"), std::string::npos) << st;
  EXPECT_NE(st.message().find(layer), std::string::npos) << st;
  EXPECT_NE(st.message().find("[128, 164]"), std::string::npos) << st;
  // Outliers leaving no room for the groups.
  st = ValidateLayerForSpec(*c, layer, 128, 64);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  // in_features above the int16 perm's range with enable_perm.
  s = MinimalSpec();
  Vptq(s)->set_num_centroids(4096);
  c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(ValidateLayerForSpec(*c, layer, 8, 65536).ok());
  st = ValidateLayerForSpec(*c, layer, 8, 65536 + 8);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("65536"), std::string::npos) << st;
  // Without the permutation the limit still applies: every layer stores a (then identity) perm,
  // which the vptq package's CUDA paths read (quant/vptq_pack.h VptqConfigFromResult).
  VptqOptionsOf(*c).enable_perm = false;
  st = ValidateLayerForSpec(*c, layer, 8, 65536 + 8);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("even with --no-perm"), std::string::npos) << st;
}

TEST(SpecTest, TaskMemoryCoversWeightsHessianAndCodebooks) {
  v1::JobSpec s = MinimalSpec();
  auto gptq = ConvertJobSpec(s);
  ASSERT_TRUE(gptq.ok());
  const uint64_t w_and_h = 4ull * (4096 * 4096 + 4096 * 4096);
  const uint64_t g = TaskMemoryBytes(*gptq, 4096, 4096, 3.0);
  EXPECT_GE(g, 3 * w_and_h);
  EXPECT_GT(TaskMemoryBytes(*gptq, 11008, 4096, 3.0), g);
  Vptq(s)->set_num_res_centroids(256);
  auto vptq = ConvertJobSpec(s);
  ASSERT_TRUE(vptq.ok());
  const uint64_t v = TaskMemoryBytes(*vptq, 4096, 4096, 3.0);
  EXPECT_GT(v, g);  // codebooks, indices and the dequantized copy on top
  VptqOptionsOf(*vptq).num_centroids = 4096;
  EXPECT_LT(TaskMemoryBytes(*vptq, 4096, 4096, 3.0), v);
  // The GPU estimate holds at least W and H, and grows with the layer.
  EXPECT_GT(GpuTaskMemoryBytes(*gptq, 4096, 4096), w_and_h);
  EXPECT_GT(GpuTaskMemoryBytes(*gptq, 11008, 4096), GpuTaskMemoryBytes(*gptq, 4096, 4096));
  EXPECT_GT(GpuTaskMemoryBytes(*vptq, 4096, 4096), w_and_h);
}

TEST(SpecTest, FileRootsAreEnforcedOnResolvedPaths) {
  char tmpl[] = "/tmp/qforge-spec-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string root = tmpl;
  std::filesystem::create_directories(root + "/allowed/model");
  std::filesystem::create_directories(root + "/outside");
  std::filesystem::create_directory_symlink(root + "/outside", root + "/allowed/escape");
  const std::vector<std::string> roots = {"", root + "/allowed"};
  EXPECT_TRUE(CheckUriAllowed(root + "/allowed/model", roots, "f").ok());
  EXPECT_TRUE(CheckUriAllowed("file://" + root + "/allowed/new/dir", roots, "f").ok());
  EXPECT_TRUE(CheckUriAllowed(root + "/allowed", roots, "f").ok());
  EXPECT_TRUE(CheckUriAllowed("s3://bucket/key", roots, "f").ok());
  EXPECT_TRUE(CheckUriAllowed("/anything", {}, "f").ok());
  for (const std::string& bad :
       {root + "/outside", root + "/allowed/../outside", root + "/allowedx",
        root + "/allowed/escape/m", "file://" + root + "/outside"}) {
    absl::Status st = CheckUriAllowed(bad, roots, "spec.model_uri");
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(st.message().find("spec.model_uri"), std::string::npos) << st;
    EXPECT_NE(st.message().find("outside the allowed file roots"), std::string::npos) << st;
  }
  SpecOptions opts;
  opts.allowed_file_roots = roots;
  v1::JobSpec s = MinimalSpec();
  s.set_model_uri(root + "/allowed/model");
  s.set_output_uri(root + "/allowed/out");
  EXPECT_TRUE(ConvertJobSpec(s, opts).ok());
  s.mutable_calibration()->set_hessians_uri(root + "/outside/h.safetensors");
  EXPECT_NE(ConvertJobSpec(s, opts).status().message().find("spec.calibration.hessians_uri"),
            std::string::npos);
  std::filesystem::remove_all(root);
}

TEST(SpecTest, DatasetCalibrationIsAcceptedWithItsOptions) {
  v1::JobSpec s = MinimalSpec();
  v1::CalibrationSpec* cal = s.mutable_calibration();
  cal->set_dataset_uri("file:///data/tokens.safetensors");
  auto c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->calibration.dataset_uri, "file:///data/tokens.safetensors");
  EXPECT_EQ(c->calibration.samples, 0);  // 0: the defaults stay 0 (the data decides)
  EXPECT_EQ(c->calibration.seq_len, 0);
  EXPECT_EQ(c->calibration.shard_samples, 0);
  EXPECT_FALSE(c->calibration.no_cache);
  EXPECT_FALSE(c->identity_hessian);
  EXPECT_TRUE(c->hessians_uri.empty());

  cal->set_samples(128);
  cal->set_seq_len(2048);
  cal->set_shard_samples(16);
  cal->set_no_cache(true);
  c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->calibration.samples, 128);
  EXPECT_EQ(c->calibration.seq_len, 2048);
  EXPECT_EQ(c->calibration.shard_samples, 16);
  EXPECT_TRUE(c->calibration.no_cache);
  // The normalized spec converts to the same options again (what a worker does).
  auto again = ConvertJobSpec(c->spec);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->calibration.seq_len, 2048);

  // Options of other sources stay out of the config.
  v1::JobSpec none = MinimalSpec();
  c = ConvertJobSpec(none);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->calibration.dataset_uri.empty());
}

TEST(SpecTest, DatasetAndCacheRootsAreEnforced) {
  char tmpl[] = "/tmp/qforge-spec-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string root = tmpl;
  SpecOptions opts;
  opts.allowed_file_roots = {root + "/allowed"};
  v1::JobSpec s = MinimalSpec();
  s.set_model_uri(root + "/allowed/model");
  s.set_output_uri(root + "/allowed/out");
  s.mutable_calibration()->set_dataset_uri(root + "/allowed/tokens.jsonl");
  EXPECT_TRUE(ConvertJobSpec(s, opts).ok());
  s.mutable_calibration()->set_dataset_uri(root + "/outside/tokens.jsonl");
  absl::Status st = ConvertJobSpec(s, opts).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("spec.calibration.dataset_uri"), std::string::npos) << st;
  EXPECT_NE(st.message().find("outside the allowed file roots"), std::string::npos) << st;

  // The coordinator's Hessian cache is allowed for hessians_uri (and only for it).
  const std::string entry = root + "/cache/ab/hessians.safetensors";
  s.mutable_calibration()->set_hessians_uri(entry);
  EXPECT_FALSE(ConvertJobSpec(s, opts).ok());
  opts.allowed_hessian_roots = {"file://" + root + "/cache"};
  EXPECT_TRUE(ConvertJobSpec(s, opts).ok()) << ConvertJobSpec(s, opts).status();
  s.set_output_uri(root + "/cache/out");
  EXPECT_NE(ConvertJobSpec(s, opts).status().message().find("spec.output_uri"),
            std::string::npos);
  std::filesystem::remove_all(root);
}

TEST(SpecTest, CalibrationInfoJsonHasEveryField) {
  v1::CalibrationInfo info;
  info.set_dataset_uri("/d/t.safetensors");
  info.set_dataset_sha256("ab");
  info.set_samples(128);
  info.set_seq_len(2048);
  info.set_tokens(262144);
  info.set_packed(true);
  info.set_shards(4);
  info.set_cache_hit(false);
  info.set_hessians_uri("file:///c/k/hessians.safetensors");
  info.set_model_fingerprint("cd");
  info.set_seconds(12.5);
  const nlohmann::json j = CalibrationInfoToJson(info);
  EXPECT_EQ(j["dataset_uri"], "/d/t.safetensors");
  EXPECT_EQ(j["dataset_sha256"], "ab");
  EXPECT_EQ(j["samples"], 128);  // a number, not proto JSON's string
  EXPECT_EQ(j["seq_len"], 2048);
  EXPECT_EQ(j["tokens"], 262144);
  EXPECT_EQ(j["packed"], true);
  EXPECT_EQ(j["shards"], 4);
  EXPECT_EQ(j["cache_hit"], false);
  EXPECT_EQ(j["hessians_uri"], "file:///c/k/hessians.safetensors");
  EXPECT_EQ(j["model_fingerprint"], "cd");
  EXPECT_EQ(j["seconds"], 12.5);
  EXPECT_EQ(j.size(), 11u);
}

TEST(SpecTest, ChildUriAndSpecJson) {
  EXPECT_EQ(ChildUri("/out", "m.json"), "/out/m.json");
  EXPECT_EQ(ChildUri("file:///out/", "m.json"), "file:///out/m.json");
  EXPECT_EQ(ChildUri("s3://b/p?endpoint=http://h:9000", "m.json"),
            "s3://b/p/m.json?endpoint=http://h:9000");
  v1::JobSpec s = MinimalSpec();
  s.mutable_gptq()->set_bits(8);
  nlohmann::json j = JobSpecToJson(s);
  EXPECT_EQ(j["model_uri"], "/data/model");
  EXPECT_EQ(j["gptq"]["bits"], 8);
  EXPECT_EQ(j["calibration"]["none"], true);
}

// The per-layer check refuses a layer whose packed index rows are shorter than one 32-bit word
// (the vptq torch dequant miscounts their padding), naming the field and the layer.
TEST(SpecTest, VptqLayerRefusesIndexRowsShorterThanAWord) {
  v1::JobSpec s = MinimalSpec();
  v1::VptqSpec* v = Vptq(s);
  v->set_num_centroids(4096);  // 12 index bits
  v->set_group_num(4);
  auto c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  const char* layer = "model.layers.0.mlp.down_proj";
  EXPECT_TRUE(ValidateLayerForSpec(*c, layer, 64, 4 * 3).ok());  // 3 x 12 = 36 bits
  absl::Status st = ValidateLayerForSpec(*c, layer, 64, 4 * 2);   // 2 x 12 = 24 bits
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("spec.vptq"), std::string::npos) << st;
  EXPECT_NE(st.message().find(layer), std::string::npos) << st;
  EXPECT_NE(st.message().find("group_size 2 x 12 index bits = 24 < 32"), std::string::npos) << st;
}

}  // namespace
}  // namespace qforge

namespace qforge {
namespace {

TEST(SpecTest, EvaluationIsAcceptedWithItsOptionsAndGate) {
  v1::JobSpec s = MinimalSpec();
  auto c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->evaluates());
  EXPECT_FALSE(c->evaluation_only());

  v1::EvaluationSpec* e = s.mutable_evaluation();
  e->set_dataset_uri("file:///data/eval.jsonl");
  c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->evaluates());
  EXPECT_EQ(c->evaluation.dataset_uri, "file:///data/eval.jsonl");
  EXPECT_EQ(c->evaluation.samples, 0);
  EXPECT_FALSE(c->evaluation.max_ppl_increase_pct.has_value());
  EXPECT_FALSE(c->evaluation.max_kl.has_value());
  EXPECT_EQ(c->evaluation_reference_uri(), "/data/model");

  e->set_samples(64);
  e->set_seq_len(512);
  e->set_shard_samples(8);
  e->set_allow_calibration_data(true);
  e->set_max_ppl_increase_pct(5);
  e->set_max_kl(0);  // 0 is a threshold: only identical distributions pass
  c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->evaluation.samples, 64);
  EXPECT_EQ(c->evaluation.seq_len, 512);
  EXPECT_EQ(c->evaluation.shard_samples, 8);
  EXPECT_TRUE(c->evaluation.allow_calibration_data);
  ASSERT_TRUE(c->evaluation.max_ppl_increase_pct.has_value());
  EXPECT_EQ(*c->evaluation.max_ppl_increase_pct, 5);
  ASSERT_TRUE(c->evaluation.max_kl.has_value());
  EXPECT_EQ(*c->evaluation.max_kl, 0);
  auto again = ConvertJobSpec(c->spec);  // what a worker does
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->evaluation.max_kl, c->evaluation.max_kl);
}

TEST(SpecTest, BadEvaluationFieldsAreNamed) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  struct Case {
    const char* name;
    std::function<void(v1::JobSpec&)> mutate;
    const char* expect;
  };
  auto with_data = [](v1::JobSpec& s) { s.mutable_evaluation()->set_dataset_uri("/d/e.jsonl"); };
  const std::vector<Case> cases = {
      {"negative samples",
       [&](v1::JobSpec& s) { with_data(s); s.mutable_evaluation()->set_samples(-1); },
       "spec.evaluation.samples: -1 is negative"},
      {"negative seq_len",
       [&](v1::JobSpec& s) { with_data(s); s.mutable_evaluation()->set_seq_len(-8); },
       "spec.evaluation.seq_len: -8"},
      {"negative shard size",
       [&](v1::JobSpec& s) { with_data(s); s.mutable_evaluation()->set_shard_samples(-2); },
       "spec.evaluation.shard_samples: -2"},
      {"samples without data", [](v1::JobSpec& s) { s.mutable_evaluation()->set_samples(4); },
       "spec.evaluation.samples: 4 (--eval-samples) applies only with evaluation data"},
      {"negative ppl threshold",
       [&](v1::JobSpec& s) { with_data(s); s.mutable_evaluation()->set_max_ppl_increase_pct(-1); },
       "spec.evaluation.max_ppl_increase_pct: -1 is not a finite number >= 0"},
      {"NaN ppl threshold",
       [&](v1::JobSpec& s) { with_data(s); s.mutable_evaluation()->set_max_ppl_increase_pct(nan); },
       "spec.evaluation.max_ppl_increase_pct: nan"},
      {"infinite KL threshold",
       [&](v1::JobSpec& s) { with_data(s); s.mutable_evaluation()->set_max_kl(inf); },
       "spec.evaluation.max_kl: inf is not a finite number >= 0 (--max-kld)"},
      {"negative KL threshold",
       [&](v1::JobSpec& s) { with_data(s); s.mutable_evaluation()->set_max_kl(-0.5); },
       "spec.evaluation.max_kl: -0.5"},
      {"gate without data", [](v1::JobSpec& s) { s.mutable_evaluation()->set_max_kl(0.1); },
       "spec.evaluation.max_kl: set (--max-kld), but there is no evaluation to gate"},
      {"allow without data",
       [](v1::JobSpec& s) { s.mutable_evaluation()->set_allow_calibration_data(true); },
       "spec.evaluation.allow_calibration_data"},
      {"control character",
       [](v1::JobSpec& s) { s.mutable_evaluation()->set_dataset_uri("/d/e\n.jsonl"); },
       "spec.evaluation.dataset_uri"},
      {"evaluation-only with a method",
       [&](v1::JobSpec& s) {
         with_data(s);
         s.clear_calibration();
         s.set_reference_model_uri("/data/original");
         s.set_method(v1::METHOD_VPTQ);
       },
       "spec.method: METHOD_VPTQ is set, but an evaluation-only job"},
      {"evaluation-only with calibration",
       [&](v1::JobSpec& s) {
         with_data(s);
         s.set_reference_model_uri("/data/original");
       },
       "spec.calibration: set, but an evaluation-only job"},
      {"evaluation-only with gptq options",
       [&](v1::JobSpec& s) {
         with_data(s);
         s.clear_calibration();
         s.set_reference_model_uri("/data/original");
         s.mutable_gptq()->set_bits(4);
       },
       "spec.gptq: set, but an evaluation-only job"},
      {"evaluation-only with include",
       [&](v1::JobSpec& s) {
         with_data(s);
         s.clear_calibration();
         s.set_reference_model_uri("/data/original");
         s.add_include("x");
       },
       "spec.include: set"},
      {"evaluation-only without data",
       [](v1::JobSpec& s) {
         s.clear_calibration();
         s.set_reference_model_uri("/data/original");
       },
       "spec.evaluation.dataset_uri: required for an evaluation-only job"},
  };
  for (const Case& c : cases) {
    v1::JobSpec s = MinimalSpec();
    c.mutate(s);
    absl::Status st = ConvertJobSpec(s).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_NE(st.message().find(c.expect), std::string::npos)
        << c.name << ": " << st.message() << " (expected: " << c.expect << ")";
  }
}

TEST(SpecTest, AnEvaluationOnlyJobQuantizesNothing) {
  v1::JobSpec s;
  s.set_model_uri("/data/quantized");
  s.set_reference_model_uri("/data/original");
  s.mutable_evaluation()->set_dataset_uri("/data/eval.jsonl");
  s.mutable_evaluation()->set_max_ppl_increase_pct(3);
  auto c = ConvertJobSpec(s);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->evaluation_only());
  EXPECT_TRUE(c->evaluates());
  EXPECT_EQ(c->reference_model_uri, "/data/original");
  EXPECT_EQ(c->evaluation_reference_uri(), "/data/original");
  EXPECT_EQ(c->spec.method(), v1::METHOD_UNSPECIFIED) << "the normalized spec stays method-less";
  EXPECT_TRUE(c->spec.include().empty());
  EXPECT_EQ(c->spec.max_attempts(), 4);
  EXPECT_TRUE(c->spec.output_uri().empty()) << "the output (report) is optional";
  auto again = ConvertJobSpec(c->spec);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->evaluation_only());

  // The roots apply to the reference and the evaluation data too.
  SpecOptions opts;
  opts.allowed_file_roots = {"/data"};
  EXPECT_TRUE(ConvertJobSpec(s, opts).ok());
  s.set_reference_model_uri("/elsewhere/original");
  EXPECT_NE(ConvertJobSpec(s, opts).status().message().find("spec.reference_model_uri"),
            std::string::npos);
  s.set_reference_model_uri("/data/original");
  s.mutable_evaluation()->set_dataset_uri("/elsewhere/eval.jsonl");
  EXPECT_NE(ConvertJobSpec(s, opts).status().message().find("spec.evaluation.dataset_uri"),
            std::string::npos);
}

}  // namespace
}  // namespace qforge

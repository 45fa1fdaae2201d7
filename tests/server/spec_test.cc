// server/spec.h: JobSpec conversion, defaults, and validation errors that name the field.
#include "server/spec.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
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
  EXPECT_EQ(c->options.bits, 4);
  EXPECT_EQ(c->options.group_size, 128);
  EXPECT_TRUE(c->options.sym);
  EXPECT_FALSE(c->options.act_order);
  EXPECT_EQ(c->format, quant::GptqCheckpointFormat::kV1);

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
  EXPECT_EQ(c->options.bits, 3);
  EXPECT_EQ(c->options.group_size, -1);
  EXPECT_FALSE(c->options.sym);
  EXPECT_TRUE(c->options.act_order);
  EXPECT_TRUE(c->options.static_groups);
  EXPECT_TRUE(c->options.mse);
  EXPECT_DOUBLE_EQ(c->options.damp_percent, 0.1);
  EXPECT_EQ(c->format, quant::GptqCheckpointFormat::kV2);
  EXPECT_FALSE(c->options.v1_zero_compat);
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
      {"dataset", [](v1::JobSpec& s) { s.mutable_calibration()->set_dataset_uri("/d/c4"); },
       absl::StatusCode::kUnimplemented, "spec.calibration.dataset_uri"},
      {"VPTQ", [](v1::JobSpec& s) { s.set_method(v1::METHOD_VPTQ); },
       absl::StatusCode::kUnimplemented, "VPTQ comes with its issue"},
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
  c->options.group_size = -1;
  st = ValidateLayerForSpec(*c, layer, 64, 48);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("spec.gptq.bits"), std::string::npos) << st;
  EXPECT_NE(st.message().find("[64, 48]"), std::string::npos) << st;
  st = ValidateLayerForSpec(*c, layer, 12, 64);
  EXPECT_NE(st.message().find("out_features = 12"), std::string::npos) << st;
  // 3 bits need out_features % 32 == 0.
  c->options.bits = 3;
  EXPECT_FALSE(ValidateLayerForSpec(*c, layer, 48, 64).ok());
  EXPECT_TRUE(ValidateLayerForSpec(*c, layer, 64, 64).ok());
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

}  // namespace
}  // namespace qforge

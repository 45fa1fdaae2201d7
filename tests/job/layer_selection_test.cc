// job/layer_selection.h: RE2 patterns (linear-time matching), CheckLayerPattern's limits, and
// the spec conversion refusing what RE2 cannot compile.
#include "job/layer_selection.h"

#include <cstring>
#include <string>

#include "common/mem_store.h"
#include "gtest/gtest.h"
#include "job/spec.h"

namespace qforge {
namespace {

// A one-tensor model.safetensors: `name` F32 [2, 2].
void PutModel(ObjectStore& store, const std::string& name) {
  const std::string json = "{\"" + name +
                           "\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
  std::string file(8, '\0');
  const uint64_t n = json.size();
  std::memcpy(file.data(), &n, 8);
  file += json;
  file += std::string(16, '\0');
  ASSERT_TRUE(store.Put("model.safetensors", file).ok());
}

// With std::regex (ECMAScript, backtracking) this pattern takes time exponential in the
// length of a name of [a-z_.0-9] characters and never finished on a real layer name (issue
// 18, defect 1). RE2 answers at once: nothing matches (the '!' never does).
constexpr char kCatastrophic[] = "^(([a-z_.0-9])+)+$!";

TEST(LayerSelectionTest, CatastrophicBacktrackingPatternAnswersAtOnce) {
  MemStore store;
  PutModel(store, "model.layers.0.self_attn.q_proj_and_a_long_tail_of_name_characters.weight");
  auto model = SafetensorsModel::Open(store, "");
  ASSERT_TRUE(model.ok()) << model.status();
  LayerSelection sel;
  sel.include = {kCatastrophic};
  auto layers = SelectLayers(*model, sel);
  ASSERT_FALSE(layers.ok());
  EXPECT_NE(layers.status().message().find("no tensor of the model matches"), std::string::npos)
      << layers.status();

  // The same pattern as an exclude: every name is tested against it, none is excluded.
  sel.include = {"q_proj"};
  sel.exclude = {kCatastrophic};
  layers = SelectLayers(*model, sel);
  ASSERT_TRUE(layers.ok()) << layers.status();
  EXPECT_EQ(layers->size(), 1u);

  // It is valid RE2, so the spec accepts it.
  v1::JobSpec spec;
  spec.set_model_uri("/data/model");
  spec.set_output_uri("/data/out");
  spec.mutable_calibration()->set_none(true);
  spec.add_include(kCatastrophic);
  EXPECT_TRUE(ConvertJobSpec(spec).ok());
}

TEST(LayerSelectionTest, CheckLayerPatternNamesFieldAndReason) {
  EXPECT_TRUE(CheckLayerPattern("f", R"(^model\.layers\.\d+\..*_proj\.weight$)").ok());
  EXPECT_TRUE(CheckLayerPattern("f", kDefaultLayerInclude).ok());

  struct Case {
    std::string pattern, expected;
  } cases[] = {
      {"(unclosed", "spec.include[3]: '(unclosed' is not a valid RE2 regular expression: "},
      {"(?=lookahead)", "is not a valid RE2 regular expression"},  // ECMAScript only
      {R"((a)\1)", "is not a valid RE2 regular expression"},       // backreference
      {"", "spec.include[3]: empty pattern"},
      {std::string(kMaxLayerPatternBytes + 1, 'a'), "is longer than the limit of 1024"},
      // Within the length limit, but its automaton needs far more than 1 MiB.
      {"((((((((((a{2,10}){2,10}){2,10}){2,10}){2,10}){2,10}){2,10}){2,10}){2,10}){2,10})",
       "spec.include[3]: '"},
  };
  for (const Case& c : cases) {
    absl::Status s = CheckLayerPattern("spec.include[3]", c.pattern);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.pattern.substr(0, 40);
    EXPECT_NE(s.message().find(c.expected), std::string::npos) << s;
  }

  // The spec conversion uses it: the field and index are named.
  v1::JobSpec spec;
  spec.set_model_uri("/data/model");
  spec.set_output_uri("/data/out");
  spec.mutable_calibration()->set_none(true);
  spec.add_include("ok");
  spec.add_exclude("x");
  spec.add_exclude("(?<=x)y");
  auto c = ConvertJobSpec(spec);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("spec.exclude[1]: '(?<=x)y' is not a valid RE2"),
            std::string::npos)
      << c.status();
}

}  // namespace
}  // namespace qforge

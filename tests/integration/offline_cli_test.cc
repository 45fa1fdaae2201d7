// The offline driver (qforge-quantize) as a user runs it, as a real process: a run that fails
// after it staged layers leaves no `.qforge-staging/` in the output directory, and removes an
// output directory it created itself; --no-perm / --no-norm runs succeed.
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "base/float16.h"
#include "common/local_store.h"
#include "common/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/subprocess.h"

namespace qforge {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::CommandResult;
using testing::RunCommand;

const std::string kQuantize = std::string(QFORGE_BIN_DIR) + "/tools/qforge-quantize";

// Everything under `dir` (files and directories, hidden ones too), for failure messages.
std::string Listing(const std::string& dir) {
  std::string out;
  if (!fs::exists(dir)) return "(absent)";
  for (const auto& e : fs::recursive_directory_iterator(dir)) out += fs::relative(e.path(), dir).string() + " ";
  return out;
}

class OfflineCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qforge_offline_cli_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // One 64 x 128 float16 projection (non-zero, varied values).
    auto store = LocalStore::Open(dir_ + "/model");
    ASSERT_TRUE(store.ok()) << store.status();
    const int64_t M = 64, N = 128;
    std::string bytes(static_cast<size_t>(2 * M * N), '\0');
    uint64_t state = 12345;
    for (int64_t i = 0; i < M * N; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;  // an LCG: varied values
      const float x = 0.02f * (static_cast<float>(state >> 40) / static_cast<float>(1 << 24) - 0.5f) + 0.001f;
      const uint16_t h = FloatToHalf(x);
      bytes[static_cast<size_t>(2 * i)] = static_cast<char>(h & 0xFF);
      bytes[static_cast<size_t>(2 * i + 1)] = static_cast<char>(h >> 8);
    }
    const std::vector<TensorSpec> specs = {{"model.layers.0.mlp.down_proj.weight", DType::kF16, {M, N}}};
    auto w = SafetensorsWriter::Create(**store, "model.safetensors", specs, {});
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->WriteTensorData(specs[0].name, bytes).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  void TearDown() override { fs::remove_all(dir_); }
  void PutConfig() {
    auto store = LocalStore::Open(dir_ + "/model");
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Put("config.json", R"({"model_type": "llama"})").ok());
  }
  CommandResult Quantize(const std::string& out, std::vector<std::string> extra) {
    std::vector<std::string> argv = {kQuantize, "--model", dir_ + "/model", "--output", out,
                                     "--calibration", "none", "--method", "vptq",
                                     "--vector-len", "8", "--centroids", "256",
                                     "--kmeans-iters", "3"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv, 120s, {"QFORGE_NUM_THREADS=1"});
  }
  std::string dir_;
};

TEST_F(OfflineCliTest, AFailedRunLeavesNoStagingAndRemovesTheOutputItCreated) {
  // No config.json: the layer is quantized and staged, then the assembly refuses.
  const CommandResult fresh = Quantize(dir_ + "/out", {});
  EXPECT_NE(fresh.exit_code, 0);
  EXPECT_NE(fresh.err.find("config.json"), std::string::npos) << fresh.err;
  EXPECT_NE(fresh.out.find("model.layers.0.mlp.down_proj"), std::string::npos)
      << "the layer was not quantized before the failure: " << fresh.out;
  EXPECT_FALSE(fs::exists(dir_ + "/out")) << "the run created it and left: " << Listing(dir_ + "/out");

  // An output directory the user made stays, empty.
  fs::create_directories(dir_ + "/mine");
  const CommandResult existing = Quantize(dir_ + "/mine", {});
  EXPECT_NE(existing.exit_code, 0);
  EXPECT_TRUE(fs::is_directory(dir_ + "/mine"));
  EXPECT_TRUE(fs::is_empty(dir_ + "/mine")) << Listing(dir_ + "/mine");
}

TEST_F(OfflineCliTest, NoPermAndNoNormRunsWriteLoadableArtifacts) {
  PutConfig();
  struct Case {
    const char* name;
    std::vector<std::string> flags;
    bool perm, norm;
  };
  const Case cases[] = {{"no-perm", {"--no-perm"}, false, true},
                        {"no-norm", {"--no-norm"}, true, false},
                        {"both", {"--no-perm", "--no-norm"}, false, false}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string out = dir_ + "/" + c.name;
    const CommandResult r = Quantize(out, c.flags);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_FALSE(fs::exists(out + "/.qforge-staging"));
    auto store = LocalStore::Open(out);
    ASSERT_TRUE(store.ok());
    auto header = ReadSafetensorsHeader(**store, "model.safetensors");
    ASSERT_TRUE(header.ok()) << header.status();
    const std::string m = "model.layers.0.mlp.down_proj.";
    // Identity tensors stand in for what the solve did not use (quant/vptq_pack.h
    // VptqConfigFromResult: the vptq package's CUDA paths read them for every layer).
    EXPECT_NE(header->Find(m + "perm"), nullptr);
    EXPECT_NE(header->Find(m + "weight_scale"), nullptr);
    EXPECT_NE(header->Find(m + "weight_bias"), nullptr);
    auto config = nlohmann::json::parse(*(*store)->ReadAll("config.json"));
    const auto& layer_config = config["quantization_config"]["config_for_layers"]["model.layers.0.mlp.down_proj"];
    EXPECT_EQ(layer_config["enable_perm"], true);
    EXPECT_EQ(layer_config["enable_norm"], true);
    EXPECT_NE(header->Find(m + "centroids.weight"), nullptr);
    EXPECT_NE(header->Find(m + "indices"), nullptr);
    auto manifest = nlohmann::json::parse(*(*store)->ReadAll("qforge_manifest.json"));
    const auto& layer = manifest["layers"]["model.layers.0.mlp.down_proj"];
    EXPECT_GT(layer["relative_error"].get<double>(), 0);
    EXPECT_GT(layer["relative_error_f32"].get<double>(), 0);
  }
}

}  // namespace
}  // namespace qforge

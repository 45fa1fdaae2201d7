// qforge-quantize's evaluation, as a user runs it: real processes (the demo-model generator,
// the offline driver) on real directories. --eval after assembling (quality table, manifest
// "quality" / "quality_gate", exit 3 on a failed gate with the artifact kept), the refusal of
// the calibration data, and --eval-only of an original against itself.
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/subprocess.h"

namespace qforge {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::CommandResult;
using testing::RunCommand;

const std::string kBin = QFORGE_BIN_DIR;

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str(), nullptr, false);
}

class OfflineEvaluationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/qforge-eval-it-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // The model with its calibration tokens, and held-out tokens from another seed.
    CommandResult r = RunCommand(
        {kBin + "/tools/qforge-make-demo-model", "--output", dir_ + "/model", "--layers", "2",
         "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2",
         "--vocab", "512", "--samples", "64", "--calibration-out", dir_ + "/calib.safetensors",
         "--calib-samples", "16", "--calib-seq-len", "64"},
        60s);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCommand({kBin + "/tools/qforge-make-demo-model", "--output", dir_ + "/other",
                    "--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                    "--kv-heads", "2", "--vocab", "512", "--samples", "16", "--seed", "99",
                    "--calibration-out", dir_ + "/eval.safetensors", "--calib-samples", "8",
                    "--calib-seq-len", "64"},
                   60s);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }

  CommandResult Quantize(const std::string& out, std::vector<std::string> extra) {
    std::vector<std::string> argv = {kBin + "/tools/qforge-quantize", "--model", dir_ + "/model",
                                     "--output", out, "--calibration",
                                     dir_ + "/calib.safetensors", "--bits", "4"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunCommand(argv, 120s);
  }

  std::string dir_;
};

TEST_F(OfflineEvaluationTest, GatePassesAndFailsWithTheManifestMarked) {
  const std::string out = dir_ + "/out";
  CommandResult r = Quantize(out, {"--eval", dir_ + "/eval.safetensors", "--max-kld", "1.0",
                                   "--max-ppl-increase", "50"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("perplexity, original"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("perplexity, quantized"), std::string::npos);
  EXPECT_NE(r.out.find("mean KL"), std::string::npos);
  EXPECT_NE(r.out.find("bits per weight"), std::string::npos);
  EXPECT_NE(r.out.find("quality gate: passed"), std::string::npos);
  nlohmann::json m = ReadJson(out + "/qforge_manifest.json");
  ASSERT_TRUE(m.is_object());
  EXPECT_EQ(m["quality_gate"], "passed");
  const nlohmann::json& q = m["quality"];
  EXPECT_EQ(q["samples"], 8);
  EXPECT_EQ(q["tokens"], 8 * 63);
  EXPECT_GT(q["ppl_reference"].get<double>(), 1.0);
  EXPECT_GT(q["mean_kl"].get<double>(), 0.0);
  EXPECT_LT(q["mean_kl"].get<double>(), 1.0);
  EXPECT_EQ(q["modules"].size(), 14u);
  EXPECT_GT(q["bits_per_weight"].get<double>(), 4.0);
  EXPECT_EQ(q["gate"]["passed"], true);

  // A threshold the artifact cannot meet: exit 3, the artifact stays, marked failed.
  const std::string strict = dir_ + "/strict";
  r = Quantize(strict, {"--eval", dir_ + "/eval.safetensors", "--max-kld", "0.000001"});
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("quality gate: mean KL"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("allowed 1e-06"), std::string::npos) << r.err;
  m = ReadJson(strict + "/qforge_manifest.json");
  ASSERT_TRUE(m.is_object());
  EXPECT_EQ(m["quality_gate"], "failed");
  EXPECT_EQ(m["quality"]["gate"]["passed"], false);
  EXPECT_TRUE(fs::exists(strict + "/config.json"));

  // The same artifact evaluated on its own; the original against itself.
  r = RunCommand({kBin + "/tools/qforge-quantize", "--eval-only", out, "--reference",
                  dir_ + "/model", "--eval", dir_ + "/eval.safetensors", "--max-kld", "1e-6"},
                 120s);
  EXPECT_EQ(r.exit_code, 3) << r.err;
  r = RunCommand({kBin + "/tools/qforge-quantize", "--eval-only", dir_ + "/model",
                  "--reference", dir_ + "/model", "--eval", dir_ + "/eval.safetensors",
                  "--max-kld", "0", "--max-ppl-increase", "0"},
                 120s);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("+0.00 %"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("100.00 %"), std::string::npos) << r.out;
}

TEST_F(OfflineEvaluationTest, RefusesTheCalibrationDataUnlessAllowed) {
  CommandResult r = Quantize(dir_ + "/same", {"--eval", dir_ + "/calib.safetensors"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("is the calibration data"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--eval-allow-calibration-data"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir_ + "/same/qforge_manifest.json"));  // refused before quantizing
  r = Quantize(dir_ + "/allowed",
               {"--eval", dir_ + "/calib.safetensors", "--eval-allow-calibration-data"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(ReadJson(dir_ + "/allowed/qforge_manifest.json").contains("quality"));
  // Mismatched models name the field.
  r = RunCommand({kBin + "/tools/qforge-quantize", "--eval-only", dir_ + "/allowed",
                  "--reference", dir_ + "/other", "--eval", dir_ + "/eval.safetensors"},
                 60s);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("hidden_size is 64 in the reference but 256 in the candidate"),
            std::string::npos)
      << r.err;
}

}  // namespace
}  // namespace qforge

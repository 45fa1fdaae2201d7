// The EVALUATE step with the CUDA decoder forward pass (NewCudaDecoderForward) against the same
// step with the CPU one, on GPTQ and VPTQ artifacts of a generated model: the layers run on the
// device, the candidate is decoded from the artifact on the host and the head runs on the CPU in
// both cases, so the metrics differ only by the backends' float32 rounding of the layers. Skips
// without a device; runs on the CPU emulator (tests/cuda_emu) as emulated.CudaEvaluationTest.
//
// Bounds (relative), from backends.h's 1e-4 on hidden states and 1e-5 on the Hessian sums:
//   kNllBound     the NLL sums (perplexities) of both models;
//   kKlBound      the KL sum (a small difference of logits, each off by ~1e-4 relative);
//   kModuleBound  each module's relative output error (S within 1e-5, through two layers);
//   top-1 counts within kTop1Slack positions (near-ties may flip).
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "job/evaluation.h"
#include "quant/cuda/backends.h"
#include "quant/decoder.h"
#include "tests/job/evaluation_testutil.h"

namespace qforge {
namespace {

using namespace job_testing;

constexpr double kNllBound = 1e-4;
constexpr double kKlBound = 2e-2;
constexpr double kModuleBound = 1e-3;
constexpr int64_t kTop1Slack = 2;

double Rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

TEST(CudaEvaluationTest, CudaLayersGiveTheCpuMetricsOnGptqAndVptqArtifacts) {
  auto ctx = quant::CreateGpuContext();
  if (!ctx.ok()) GTEST_SKIP() << "no usable GPU: " << ctx.status().ToString();
  auto cuda = quant::NewCudaDecoderForward(*ctx);
  ASSERT_TRUE(cuda.ok()) << cuda.status().ToString();

  std::unique_ptr<TinyModel> model = MakeModel(EvalSpec());
  MemStore gptq("gptq3"), vptq("vptq");
  BuildArtifact(*model, GptqOptions(3), ArtifactMethod::kGptq, GptqConfig(3), gptq);
  BuildArtifact(*model, VptqOptions(), ArtifactMethod::kVptq, {}, vptq);
  const CalibrationData d = EvalData(*model);
  Directory ref = OpenDirectory(*model->store);
  for (MemStore* artifact : {&gptq, &vptq}) {
    SCOPED_TRACE(artifact->uri());
    Directory cand = OpenDirectory(*artifact);
    MemStore out("out");
    auto on_cpu = Evaluate(ref, cand, d, 0, d.samples, out, "cpu.json");
    auto on_gpu = Evaluate(ref, cand, d, 0, d.samples, out, "gpu.json", kDefaultSpillAboveBytes,
                           {}, cuda->get());
    ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
    ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
    const EvaluationSums &c = on_cpu->sums, &g = on_gpu->sums;
    EXPECT_EQ(g.predicted_tokens, c.predicted_tokens);
    EXPECT_LT(Rel(g.nll_reference, c.nll_reference), kNllBound);
    EXPECT_LT(Rel(g.nll_candidate, c.nll_candidate), kNllBound);
    EXPECT_GT(c.kl, 0.0);
    EXPECT_LT(Rel(g.kl, c.kl), kKlBound) << g.kl << " vs " << c.kl;
    EXPECT_LE(std::abs(g.top1_agree - c.top1_agree), kTop1Slack);
    ASSERT_EQ(g.modules.size(), c.modules.size());
    for (size_t i = 0; i < c.modules.size(); ++i) {
      EXPECT_EQ(g.modules[i].module, c.modules[i].module);
      EXPECT_LT(Rel(g.modules[i].relative_error(), c.modules[i].relative_error()), kModuleBound)
          << c.modules[i].module;
    }
  }
}

}  // namespace
}  // namespace qforge

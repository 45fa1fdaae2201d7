// The CUDA backends under failure, on the emulated GPU (emulated_device.h), where device memory
// can be counted exactly and an allocation made to fail on demand:
//  - every cudaMallocAsync of a GPTQ and of a VPTQ solve and of a decoder forward pass, failed
//    in turn, gives RESOURCE_EXHAUSTED naming the call, and the call leaves no device memory
//    behind;
//  - a solve or forward pass cancelled at each of its progress reports gives CANCELLED and
//    leaves nothing;
//  - a device with exactly the estimated memory (CudaGptqMemoryBytes / CudaVptqMemoryBytes /
//    CudaDecoderForwardMemoryBytes, less the allowance for cuBLAS/cuSOLVER's own workspaces,
//    which the emulated libraries do not take) runs the call: the placement estimate is enough.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tests/cuda_emu/emulated_device.h"
#include "tests/quant/decoder_ref.h"
#include "tests/quant/progress_recorder.h"
#include "quant/cuda/backends.h"
#include "quant/decoder.h"
#include "quant/gptq.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"

namespace qforge::quant {
namespace {

// The part of both estimates reserved for the libraries' internal workspaces (vptq_memory.cc,
// gptq_memory.cc).
constexpr uint64_t kLibraryAllowanceBytes = uint64_t{64} << 20;

GptqOptions SmallGptq() {
  GptqOptions o;
  o.block_size = 64;
  o.group_size = 32;
  o.act_order = true;
  return o;
}

// Outliers, two groups, a residual codebook and phase errors: every buffer kind of the solver,
// made smaller (the allocation sweep runs the solve once per allocation).
VptqOptions SmallVptq() {
  VptqOptions o = EveryStageVptq();
  o.outlier_size = 8;
  o.block_size = 16;
  o.kmeans_iterations = 3;
  return o;
}

// A small Qwen-like layer (biases, q/k norms, GQA) over 3 samples of 1400 tokens with padding:
// two micro-batches (two progress reports) and every buffer kind of the forward pass.
struct SmallDecoderCall {
  DecoderConfig config;
  DecoderLayerWeights weights;
  std::vector<uint8_t> mask;
  int64_t samples = 3, seq_len = 1400;

  SmallDecoderCall() {
    config = testing::SmallDecoderConfig(16, 4, 2, 4, 24, 2048);
    config.attention_bias = true;
    config.qk_norm = true;
    weights = testing::RandomDecoderWeights(config, 3);
    mask.assign(static_cast<size_t>(samples * seq_len), 1);
    mask[5] = mask[seq_len + 7] = 0;
  }
  Status Run(DecoderForward& fwd, const std::function<bool(double)>& progress = {}) const {
    std::vector<float> hidden = testing::RandomHidden(samples * seq_len * config.hidden_size, 4);
    LayerHessianSums sums;
    sums.Reset(config);
    return fwd.ForwardLayer(config, weights, {samples, seq_len, mask.data()}, hidden.data(),
                            &sums, progress);
  }
};

class CudaFailureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    emu::SetDeviceMemoryBytes(uint64_t{80} << 30);
    auto ctx = CreateGpuContext();
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    ctx_ = *ctx;
    base_bytes_ = emu::LiveDeviceBytes();
  }
  void TearDown() override {
    emu::FailAllocation(0);
    emu::SetDeviceMemoryBytes(uint64_t{80} << 30);
  }

  // Runs `solve` once to count its allocations, then again with each allocation failing in
  // turn: every run must fail with RESOURCE_EXHAUSTED from cudaMallocAsync and return the
  // device memory to where it started.
  template <class Solve>
  void FailEachAllocation(Solve solve) {
    const int64_t before = emu::DeviceAllocations();
    ASSERT_TRUE(solve().ok());
    const int64_t allocations = emu::DeviceAllocations() - before;
    ASSERT_GT(allocations, 0);
    EXPECT_EQ(emu::LiveDeviceBytes(), base_bytes_);
    for (int64_t nth = 1; nth <= allocations; ++nth) {
      SCOPED_TRACE("allocation " + std::to_string(nth) + " of " + std::to_string(allocations));
      emu::FailAllocation(nth);
      const Status s = solve();
      emu::FailAllocation(0);
      EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
      EXPECT_NE(s.message().find("cudaMallocAsync"), std::string::npos) << s.ToString();
      EXPECT_NE(s.message().find("out of memory"), std::string::npos) << s.ToString();
      EXPECT_EQ(emu::LiveDeviceBytes(), base_bytes_);
    }
  }

  // Cancels `solve` at each of its progress reports in turn (the callback answers false).
  template <class Solve>
  void CancelAtEachReport(Solve solve) {
    int reports = 0;
    ASSERT_TRUE(solve([&](double) { return ++reports, true; }).ok());
    ASSERT_GT(reports, 1);
    for (int stop = 1; stop <= reports; ++stop) {
      SCOPED_TRACE("cancel at report " + std::to_string(stop) + " of " +
                   std::to_string(reports));
      int seen = 0;
      const Status s = solve([&](double) { return ++seen != stop; });
      EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
      EXPECT_EQ(emu::LiveDeviceBytes(), base_bytes_);
    }
  }

  std::shared_ptr<GpuContext> ctx_;
  int64_t base_bytes_ = 0;
};

TEST_F(CudaFailureTest, GptqAllocationFailuresAreReportedAndFreeEverything) {
  auto solver = NewCudaGptqSolver(ctx_);
  ASSERT_TRUE(solver.ok()) << solver.status().ToString();
  const SyntheticLayer l = MakeSyntheticLayer(96, 300, 600, 31);
  FailEachAllocation([&] { return (*solver)->Quantize(l.weight, l.hessian, SmallGptq()).status(); });
}

TEST_F(CudaFailureTest, VptqAllocationFailuresAreReportedAndFreeEverything) {
  auto solver = NewCudaVptqSolver(ctx_);
  ASSERT_TRUE(solver.ok()) << solver.status().ToString();
  const SyntheticLayer l = MakeSyntheticLayer(40, 64, 256, 43);
  FailEachAllocation([&] { return (*solver)->Quantize(l.weight, l.hessian, SmallVptq()).status(); });
}

TEST_F(CudaFailureTest, GptqCancelledAtAnyReportFreesEverything) {
  auto solver = NewCudaGptqSolver(ctx_);
  ASSERT_TRUE(solver.ok()) << solver.status().ToString();
  const SyntheticLayer l = MakeSyntheticLayer(96, 300, 600, 31);
  CancelAtEachReport([&](SolveProgress progress) {
    GptqOptions o = SmallGptq();
    o.progress = std::move(progress);
    return (*solver)->Quantize(l.weight, l.hessian, o).status();
  });
}

TEST_F(CudaFailureTest, VptqCancelledAtAnyReportFreesEverything) {
  auto solver = NewCudaVptqSolver(ctx_);
  ASSERT_TRUE(solver.ok()) << solver.status().ToString();
  const SyntheticLayer l = MakeSyntheticLayer(40, 64, 256, 43);
  CancelAtEachReport([&](SolveProgress progress) {
    VptqOptions o = SmallVptq();
    o.progress = std::move(progress);
    return (*solver)->Quantize(l.weight, l.hessian, o).status();
  });
}

TEST_F(CudaFailureTest, DecoderAllocationFailuresAreReportedAndFreeEverything) {
  auto fwd = NewCudaDecoderForward(ctx_);
  ASSERT_TRUE(fwd.ok()) << fwd.status().ToString();
  const SmallDecoderCall call;
  FailEachAllocation([&] { return call.Run(**fwd); });
}

TEST_F(CudaFailureTest, DecoderCancelledAtAnyReportFreesEverything) {
  auto fwd = NewCudaDecoderForward(ctx_);
  ASSERT_TRUE(fwd.ok()) << fwd.status().ToString();
  const SmallDecoderCall call;
  CancelAtEachReport([&](SolveProgress progress) { return call.Run(**fwd, progress); });
}

TEST_F(CudaFailureTest, DeviceWithTheEstimatedMemoryRunsTheDecoderForward) {
  auto fwd = NewCudaDecoderForward(ctx_);
  ASSERT_TRUE(fwd.ok()) << fwd.status().ToString();
  const SmallDecoderCall call;
  emu::SetDeviceMemoryBytes(static_cast<uint64_t>(base_bytes_) +
                            CudaDecoderForwardMemoryBytes(call.config, call.samples,
                                                          call.seq_len) -
                            kLibraryAllowanceBytes);
  const Status st = call.Run(**fwd);
  EXPECT_TRUE(st.ok()) << st.ToString();
}

TEST_F(CudaFailureTest, DeviceWithTheEstimatedMemoryRunsTheSolve) {
  auto gptq = NewCudaGptqSolver(ctx_);
  auto vptq = NewCudaVptqSolver(ctx_);
  ASSERT_TRUE(gptq.ok() && vptq.ok());
  const SyntheticLayer g = MakeSyntheticLayer(200, 384, 768, 5);
  const GptqOptions go = SmallGptq();
  emu::SetDeviceMemoryBytes(static_cast<uint64_t>(base_bytes_) +
                            CudaGptqMemoryBytes(g.weight.rows, g.weight.cols, go) -
                            kLibraryAllowanceBytes);
  const auto gr = (*gptq)->Quantize(g.weight, g.hessian, go);
  EXPECT_TRUE(gr.ok()) << gr.status().ToString();

  const SyntheticLayer v = MakeSyntheticLayer(128, 512, 1024, 6);
  VptqOptions vo = SmallVptq();
  vo.num_centroids = 256;
  vo.num_res_centroids = 16;
  emu::SetDeviceMemoryBytes(static_cast<uint64_t>(base_bytes_) +
                            CudaVptqMemoryBytes(v.weight.rows, v.weight.cols, vo) -
                            kLibraryAllowanceBytes);
  const auto vr = (*vptq)->Quantize(v.weight, v.hessian, vo);
  EXPECT_TRUE(vr.ok()) << vr.status().ToString();
}

}  // namespace
}  // namespace qforge::quant

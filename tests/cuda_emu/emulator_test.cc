// The CUDA emulator itself (emulated_cuda.h, emulated_lanes.cc, emulated_runtime.cc): that
// barriers, warp collectives and launch limits behave as on a GPU, that a missing barrier shows
// in the results, and that the runtime rejects bad device pointers and counts allocations. The
// GPU suites' verdicts under emulation are only as good as these.
#include "tests/cuda_emu/emulated_cuda.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "tests/cuda_emu/emulated_device.h"

namespace {

constexpr int kThreads = 256;

// Tree sum of 1..kThreads in dynamic shared memory; `barriers` false drops the __syncthreads
// a GPU needs between the steps.
void TreeSumKernel(bool barriers, float* out) {
  float* s = static_cast<float*>(emu::SharedMemory());
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t + 1);
  if (barriers) __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    if (barriers) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

TEST(CudaEmulatorTest, BarriersOrderTheBlock) {
  std::vector<float> out(3, 0.0f);
  emu::Launch(TreeSumKernel, "TreeSumKernel", 3, kThreads, kThreads * sizeof(float))(true,
                                                                                     out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (float v : out) EXPECT_EQ(v, kThreads * (kThreads + 1) / 2);
}

TEST(CudaEmulatorTest, AMissingBarrierChangesTheResult) {
  std::vector<float> out(3, 0.0f);
  emu::Launch(TreeSumKernel, "TreeSumKernel", 3, kThreads, kThreads * sizeof(float))(false,
                                                                                     out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (float v : out) EXPECT_NE(v, kThreads * (kThreads + 1) / 2);
}

// Every warp collective of the emulator against its definition, for two warps.
void WarpKernel(int* down, int* xor_out, int* broadcast, unsigned* ballot) {
  const int t = threadIdx.x;
  const int lane = t % 32;
  down[t] = __shfl_down_sync(0xffffffffu, t * 10, 3);
  xor_out[t] = __shfl_xor_sync(0xffffffffu, t * 10, 5);
  broadcast[t] = __shfl_sync(0xffffffffu, t * 10, 7);
  const unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
  if (lane == 0) ballot[t / 32] = b;
}

TEST(CudaEmulatorTest, WarpCollectivesFollowTheirDefinitions) {
  std::vector<int> down(64), xor_out(64), broadcast(64);
  std::vector<unsigned> ballot(2);
  emu::Launch(WarpKernel, "WarpKernel", 1, 64)(down.data(), xor_out.data(), broadcast.data(),
                                                ballot.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  unsigned every_third = 0;
  for (int l = 0; l < 32; l += 3) every_third |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, warp0 = t - lane;
    EXPECT_EQ(down[t], (lane + 3 < 32 ? t + 3 : t) * 10) << t;  // past the warp: own value
    EXPECT_EQ(xor_out[t], (warp0 + (lane ^ 5)) * 10) << t;
    EXPECT_EQ(broadcast[t], (warp0 + 7) * 10) << t;
  }
  EXPECT_EQ(ballot[0], every_third);
  EXPECT_EQ(ballot[1], every_third);
}

void CountKernel(int* count) { atomicAdd(count, 1); }

TEST(CudaEmulatorTest, InvalidLaunchesFailLikeTheRuntimeAndDoNotRun) {
  int count = 0;
  emu::Launch(CountKernel, "CountKernel", 1, 2048)(&count);  // > 1024 threads
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  emu::Launch(CountKernel, "CountKernel", dim3(1, 70000), 32)(&count);  // grid.y > 65535
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);  // read once, then cleared
  EXPECT_EQ(count, 0);

  // Over 48 KiB of dynamic shared memory needs the kernel's opt-in, up to 227 KiB.
  emu::Launch(CountKernel, "CountKernel", 1, 32, 64 * 1024)(&count);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(count, 0);
  ASSERT_EQ(cudaFuncSetAttribute(CountKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 64 * 1024),
            cudaSuccess);
  emu::Launch(CountKernel, "CountKernel", 2, 32, 64 * 1024)(&count);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(count, 64);
  EXPECT_EQ(cudaFuncSetAttribute(CountKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 300 * 1024),
            cudaErrorInvalidValue);
}

void EarlyExitThenWarpSyncKernel() {
  if (threadIdx.x == 5) return;
  __syncwarp();
}

TEST(CudaEmulatorDeathTest, AWarpBarrierAfterALaneExitedStops) {
  EXPECT_DEATH(emu::Launch(EarlyExitThenWarpSyncKernel, "EarlyExitThenWarpSyncKernel", 1, 32)(),
               "warp barrier with exited lanes.*EarlyExitThenWarpSyncKernel");
}

[[maybe_unused]] void ReadOnePastTheEndKernel(const float* in, int64_t n, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) out[0] += in[i];  // `<=`: the last thread reads past the buffer
}

// In a -DQFORGE_SANITIZE=address build, device memory is exactly the bytes asked for, so a
// kernel that reads past its buffer stops at that read (what compute-sanitizer memcheck reports
// on a GPU).
TEST(CudaEmulatorDeathTest, AddressSanitizerSeesAKernelReadPastItsBuffer) {
#if !defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "needs -DQFORGE_SANITIZE=address";
#else
  EXPECT_DEATH(
      {
        void* in = nullptr;
        void* out = nullptr;
        cudaMallocAsync(&in, 100 * sizeof(float), nullptr);
        cudaMallocAsync(&out, sizeof(float), nullptr);
        emu::Launch(ReadOnePastTheEndKernel, "ReadOnePastTheEndKernel", 4, 32)(
            static_cast<const float*>(in), int64_t{100}, static_cast<float*>(out));
      },
      "heap-buffer-overflow");
#endif
}

TEST(CudaEmulatorTest, RuntimeChecksDevicePointersAndCountsMemory) {
  const int64_t live = emu::LiveDeviceBytes();
  void* p = nullptr;
  ASSERT_EQ(cudaMallocAsync(&p, 1000, nullptr), cudaSuccess);
  EXPECT_EQ(emu::LiveDeviceBytes(), live + 1000);
  std::vector<char> host(2000, 1);
  EXPECT_EQ(cudaMemcpyAsync(p, host.data(), 1000, cudaMemcpyHostToDevice, nullptr), cudaSuccess);
  EXPECT_EQ(cudaMemcpyAsync(p, host.data(), 1001, cudaMemcpyHostToDevice, nullptr),
            cudaErrorInvalidValue);  // one byte past the allocation
  EXPECT_EQ(cudaMemcpyAsync(host.data(), host.data() + 1000, 10, cudaMemcpyDeviceToHost,
                            nullptr),
            cudaErrorInvalidValue);  // a host pointer as the device source
  EXPECT_EQ(cudaMemsetAsync(static_cast<char*>(p) + 500, 0, 501, nullptr), cudaErrorInvalidValue);
  ASSERT_EQ(cudaFreeAsync(p, nullptr), cudaSuccess);
  EXPECT_EQ(emu::LiveDeviceBytes(), live);
  EXPECT_EQ(cudaFreeAsync(p, nullptr), cudaErrorInvalidValue);  // freed twice

  emu::FailAllocation(2);
  void* a = nullptr;
  void* b = nullptr;
  EXPECT_EQ(cudaMallocAsync(&a, 64, nullptr), cudaSuccess);
  EXPECT_EQ(cudaMallocAsync(&b, 64, nullptr), cudaErrorMemoryAllocation);
  EXPECT_EQ(b, nullptr);
  EXPECT_EQ(cudaMallocAsync(&b, 64, nullptr), cudaSuccess);  // one failure only
  cudaFreeAsync(a, nullptr);
  cudaFreeAsync(b, nullptr);

  emu::SetDeviceMemoryBytes(static_cast<uint64_t>(live) + 4096);
  EXPECT_EQ(cudaMallocAsync(&a, 4097, nullptr), cudaErrorMemoryAllocation);
  ASSERT_EQ(cudaMallocAsync(&a, 4096, nullptr), cudaSuccess);
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  EXPECT_EQ(free_bytes, 0u);
  cudaFreeAsync(a, nullptr);
  emu::SetDeviceMemoryBytes(uint64_t{80} << 30);
}

}  // namespace

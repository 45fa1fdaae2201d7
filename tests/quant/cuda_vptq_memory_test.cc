// The CUDA VPTQ backend's device-memory estimate (CudaVptqMemoryBytes, used by the coordinator
// to place tasks on CUDA workers) against what Quantize actually holds at once: the stream-
// ordered pool's high-water mark. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "quant/cuda/backends.h"
#include "quant/synthetic.h"
#include "quant/vptq.h"

#ifdef QFORGE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace qforge::quant {
namespace {

constexpr uint64_t kLibrarySlackBytes = uint64_t{64} << 20;

struct MemoryCase {
  std::string name;
  int64_t out, in;
  VptqOptions options;
};

std::vector<MemoryCase> MemoryCases() {
  std::vector<MemoryCase> cases;
  {
    // k-means dominated: many points, a 1024-entry codebook and a residual one.
    MemoryCase c{"v8_k1024_r64", 256, 1024, {}};
    c.options.vector_len = 8;
    c.options.num_centroids = 1024;
    c.options.num_res_centroids = 64;
    c.options.kmeans_iterations = 8;
    cases.push_back(c);
  }
  {
    // Outliers (their own codebook), two groups, phase errors (the float64 metric early).
    MemoryCase c{"v6_outliers_groups_phase_errors", 300, 700, {}};
    c.options.vector_len = 6;
    c.options.num_centroids = 256;
    c.options.outlier_size = 10;
    c.options.outlier_vector_len = 4;
    c.options.outlier_num_centroids = 64;
    c.options.group_num = 2;
    c.options.report_phase_errors = true;
    c.options.kmeans_iterations = 8;
    cases.push_back(c);
  }
  {
    // Pass dominated: a wide layer, a small codebook, large lazy blocks.
    MemoryCase c{"v4_wide_block512", 128, 3000, {}};
    c.options.vector_len = 4;
    c.options.num_centroids = 64;
    c.options.block_size = 512;
    c.options.kmeans_iterations = 8;
    cases.push_back(c);
  }
  return cases;
}

TEST(CudaVptqMemoryEstimateTest, PoolHighWaterStaysUnderTheEstimate) {
#ifndef QFORGE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  auto ctx = CreateGpuContext();
  if (!ctx.ok()) GTEST_SKIP() << "no usable GPU: " << ctx.status().ToString();
  auto solver = NewCudaVptqSolver(*ctx);
  ASSERT_TRUE(solver.ok()) << solver.status().ToString();
  cudaMemPool_t pool;
  ASSERT_EQ(cudaDeviceGetDefaultMemPool(&pool, GpuContextDevice(ctx->get())), cudaSuccess);
  uint64_t seed = 70;
  for (const MemoryCase& c : MemoryCases()) {
    SCOPED_TRACE(c.name);
    const SyntheticLayer layer = MakeSyntheticLayer(c.out, c.in, 2 * c.in, ++seed);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    uint64_t high = 0;  // the attribute is a cuuint64_t; writing 0 resets the mark
    ASSERT_EQ(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), cudaSuccess);
    auto r = (*solver)->Quantize(layer.weight, layer.hessian, c.options);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), cudaSuccess);
    const uint64_t estimate = CudaVptqMemoryBytes(c.out, c.in, c.options);
    EXPECT_GT(high, 0u);
    EXPECT_LE(high, estimate);
    // Not so loose that the coordinator leaves GPUs idle: without the fixed slack for the
    // libraries' own workspaces (64 MiB, vptq_memory.cc) it is within 2x of the pool's peak
    // (1.25-1.4x measured by CPU emulation of these cases).
    EXPECT_LE(estimate - kLibrarySlackBytes, 2 * high);
    std::printf("%s: pool high-water %.1f MiB, estimate %.1f MiB\n", c.name.c_str(),
                high / 1048576.0, estimate / 1048576.0);
  }
#endif  // QFORGE_HAVE_CUDA
}

}  // namespace
}  // namespace qforge::quant

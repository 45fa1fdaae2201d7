// Device discovery: without a GPU (CI) it must answer UNAVAILABLE with a reason, never crash;
// with one, every device reports a name and memory. The CUDA layer quantizers: a build without
// CUDA says so; with a GPU there is one per method.
#include <string>

#include "gtest/gtest.h"
#include "quant/cuda/backends.h"
#include "quant/cuda/device.h"
#include "quant/layer_quantizer.h"

namespace qforge::quant {
namespace {

TEST(CudaDeviceTest, ListsDevicesOrSaysWhyNot) {
#ifdef QFORGE_HAVE_CUDA
  EXPECT_TRUE(CudaCompiledIn());
#else
  EXPECT_FALSE(CudaCompiledIn());
#endif
  auto devices = ListCudaDevices();
  if (!devices.ok()) {
    EXPECT_EQ(devices.status().code(), StatusCode::kUnavailable);
    EXPECT_FALSE(devices.status().message().empty());
    GTEST_SKIP() << "no GPU here: " << devices.status().message();
  }
  ASSERT_FALSE(devices->empty());
  for (const CudaDeviceInfo& d : *devices) {
    EXPECT_FALSE(d.name.empty());
    EXPECT_GT(d.total_memory_bytes, 0u);
    EXPECT_GE(d.compute_major, 7);
  }
}

TEST(CudaDeviceTest, FreeMemoryOfOneDeviceOrSaysWhyNot) {
  auto devices = ListCudaDevices();
  if (!devices.ok()) {
    auto free_bytes = CudaDeviceFreeMemoryBytes(0);
    ASSERT_FALSE(free_bytes.ok());
    EXPECT_EQ(free_bytes.status().code(), StatusCode::kUnavailable);
    GTEST_SKIP() << "no GPU here: " << devices.status().message();
  }
  const CudaDeviceInfo& first = devices->front();
  auto free_bytes = CudaDeviceFreeMemoryBytes(first.index);
  ASSERT_TRUE(free_bytes.ok()) << free_bytes.status().ToString();
  EXPECT_GT(*free_bytes, 0u);
  EXPECT_LE(*free_bytes, first.total_memory_bytes);
  const int past_the_end = static_cast<int>(devices->size());
  auto missing = CudaDeviceFreeMemoryBytes(past_the_end);
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(missing.status().message().find("no CUDA device " + std::to_string(past_the_end)),
            std::string::npos)
      << missing.status().message();
}

TEST(CudaLayerQuantizersTest, OnePerMethodOrSaysWhyNot) {
  auto no_context = NewCudaLayerQuantizers(nullptr);
  ASSERT_FALSE(no_context.ok());
#ifdef QFORGE_HAVE_CUDA
  EXPECT_EQ(no_context.status().code(), StatusCode::kInvalidArgument);
#else
  EXPECT_EQ(no_context.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(no_context.status().message().find("without CUDA"), std::string::npos)
      << no_context.status().message();
#endif
  auto ctx = CreateGpuContext();
  if (!ctx.ok()) GTEST_SKIP() << "no GPU context here: " << ctx.status().message();
  auto set = NewCudaLayerQuantizers(*ctx);
  ASSERT_TRUE(set.ok()) << set.status().ToString();
  EXPECT_STREQ(set->backend(), "cuda");
  for (const char* method : {"gptq", "vptq"}) {
    ASSERT_NE(set->Find(method), nullptr) << method;
    EXPECT_STREQ(set->Find(method)->method(), method);
    EXPECT_STREQ(set->Find(method)->backend(), "cuda");
  }
}

}  // namespace
}  // namespace qforge::quant

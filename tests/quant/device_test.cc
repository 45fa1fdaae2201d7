// Device discovery: without a GPU (CI) it must answer UNAVAILABLE with a reason, never crash;
// with one, every device reports a name and memory.
#include "gtest/gtest.h"
#include "worker/quant/cuda/device.h"

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

}  // namespace
}  // namespace qforge::quant

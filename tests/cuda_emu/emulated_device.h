// Controls and counters of the emulated GPU (emulated_cuda.h, emulated_runtime.cc) for tests
// that run the CUDA backends on the CPU: device-memory accounting, allocation failures on
// demand, and the number of kernel launches.
#ifndef QFORGE_TESTS_CUDA_EMU_EMULATED_DEVICE_H_
#define QFORGE_TESTS_CUDA_EMU_EMULATED_DEVICE_H_

#include <cstdint>

namespace emu {

// Bytes currently allocated with cudaMallocAsync and not yet freed.
int64_t LiveDeviceBytes();
// Successful cudaMallocAsync calls since the program started.
int64_t DeviceAllocations();
// Makes the `nth` cudaMallocAsync call from now (1 = the next one) fail with
// cudaErrorMemoryAllocation; 0 cancels a pending failure. One failure per call of this.
void FailAllocation(int64_t nth);
// The emulated device's memory (cudaMemGetInfo's total; allocations beyond it fail). Default
// 80 GiB, an H100's.
void SetDeviceMemoryBytes(uint64_t bytes);
// Kernel launches run since the program started.
int64_t KernelLaunches();

}  // namespace emu

#endif  // QFORGE_TESTS_CUDA_EMU_EMULATED_DEVICE_H_

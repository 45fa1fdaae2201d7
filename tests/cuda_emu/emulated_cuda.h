// Runs our CUDA kernels on the CPU, so the GPU test suites check the kernels' logic on machines
// without a GPU (CI). Force-included (-include) before every emulated translation unit: the .cu
// sources rewritten by rewrite_cu_for_emulator.cmake (launches `K<<<g, b, s, st>>>(a)` become
// `emu::Launch(K, "K", g, b, s, st)(a)`, `extern __shared__ T x[];` becomes a pointer into the
// emulated shared memory) and compiled as C++.
//
// Model: the blocks of a grid run one after another; the threads of a block run as coroutines
// (one stack each) that switch only at barriers (__syncthreads, __syncwarp and the warp
// collectives, which are built on __syncwarp). A barrier is released once every live thread of
// the block (or warp) has reached it; a block whose threads wait at different barriers is a
// deadlock and stops the program with the kernel's name. The order in which lanes run between
// barriers is set by QFORGE_EMU_LANE_ORDER: shuffle (the default; a fixed pseudo-random order,
// drawn anew at every barrier, the same in every run), forward or reverse. A lane that reads what
// another writes without a barrier between them then sees the write in some blocks and not in
// others, so a missing barrier changes the results. Dynamic shared memory is
// filled with NaN before every block, so reading what no thread wrote shows in the results.
// Atomics are plain read-modify-writes (lanes never run at the same time).
//
// What this does not check: timing, the memory model across blocks, out-of-bounds accesses
// inside kernels (compute-sanitizer on a GPU does), fused multiply-adds (compiled without
// contraction), the real libraries' numerics (cuBLAS/cuSOLVER are OpenBLAS/LAPACKE on host
// memory in emulated_runtime.cc).
#ifndef QFORGE_TESTS_CUDA_EMU_EMULATED_CUDA_H_
#define QFORGE_TESTS_CUDA_EMU_EMULATED_CUDA_H_

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

// Kernel-side declarations: `__shared__` arrays become function statics (one copy, shared by
// the lanes of the block that is running), launch bounds are ignored.
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;
template <class T>
inline T min(T a, T b) {
  return a < b ? a : b;
}
template <class T>
inline T max(T a, T b) {
  return a > b ? a : b;
}

namespace emu {

// The largest dynamic shared memory a kernel may request after opting in (H100: 227 KiB);
// without the opt-in attribute the limit is 48 KiB, as on the device.
constexpr size_t kMaxDynamicSharedBytes = 232448;
constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;

// Position of the running lane.
struct LanePosition {
  uint3 thread{0, 0, 0};
  uint3 block{0, 0, 0};
  dim3 block_dim;
  dim3 grid_dim;
};
extern LanePosition lane;

// The dynamic shared memory of the running block (16-byte aligned).
void* SharedMemory();

// Stops the program with `message` and the running kernel's name (an emulator-detected misuse:
// deadlock, a warp collective with a partial warp or mask).
[[noreturn]] void Fatal(const char* message);

// Barriers: the calling lane waits until every live lane of its block / warp has arrived.
void BlockBarrier();
void WarpBarrier();

// The running lane's 64-bit exchange slot in its warp (for the warp collectives).
uint64_t& WarpSlot(int lane_in_warp);
int LaneInWarp();

// Records the launch error instead of running an invalid launch; TakeLaunchError (the emulated
// cudaGetLastError) returns the first one recorded since the last call and clears it.
void SetLaunchError(cudaError_t error);
cudaError_t TakeLaunchError();
// The dynamic shared memory limit of `kernel` (cudaFuncSetAttribute raises it).
size_t DynamicSharedLimit(const void* kernel);
// Runs every block of the grid, each lane calling `body`.
void RunGrid(const char* name, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
             const std::function<void()>& body);

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t shared_bytes;
  template <typename... A>
  void operator()(A... args) const {
    if (shared_bytes > DynamicSharedLimit(reinterpret_cast<const void*>(kernel))) {
      SetLaunchError(cudaErrorInvalidValue);
      return;
    }
    RunGrid(name, grid, block, shared_bytes, [&] { kernel(args...); });
  }
};
template <typename... P>
Launcher<P...> Launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block,
                      size_t shared_bytes = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, name, grid, block, shared_bytes};
}

template <class T>
uint64_t ToBits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp exchange of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <class T>
T FromBits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
// Every lane of the warp publishes `v`; returns the value of lane `source(lane)` (its own
// value when the source lies outside the warp).
template <class T, class Source>
T WarpExchange(unsigned mask, T v, Source source) {
  if (mask != 0xffffffffu) Fatal("warp collective with a partial mask");
  const int me = LaneInWarp();
  WarpSlot(me) = ToBits(v);
  WarpBarrier();
  const int from = source(me);
  const T out = (from >= 0 && from < 32) ? FromBits<T>(WarpSlot(from)) : v;
  WarpBarrier();
  return out;
}

}  // namespace emu

#define threadIdx (emu::lane.thread)
#define blockIdx (emu::lane.block)
#define blockDim (emu::lane.block_dim)
#define gridDim (emu::lane.grid_dim)

inline void __syncthreads() { emu::BlockBarrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::Fatal("__syncwarp with a partial mask");
  emu::WarpBarrier();
}
template <class T>
T __shfl_sync(unsigned mask, T v, int source) {
  return emu::WarpExchange(mask, v, [&](int) { return source & 31; });
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  return emu::WarpExchange(mask, v, [&](int me) { return me + static_cast<int>(delta); });
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return emu::WarpExchange(mask, v, [&](int me) { return me ^ lane_mask; });
}
inline unsigned __ballot_sync(unsigned mask, bool predicate) {
  if (mask != 0xffffffffu) emu::Fatal("__ballot_sync with a partial mask");
  const int me = emu::LaneInWarp();
  emu::WarpSlot(me) = predicate ? 1 : 0;
  emu::WarpBarrier();
  unsigned bits = 0;
  for (int l = 0; l < 32; ++l) bits |= (emu::WarpSlot(l) != 0 ? 1u : 0u) << l;
  emu::WarpBarrier();
  return bits;
}

template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <class T>
T __ldg(const T* p) {
  return *p;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(emu::ToBits(x)); }
inline float __uint_as_float(unsigned u) { return emu::FromBits<float>(u); }

// The runtime's cudaFuncSetAttribute for a kernel pointer (the emulated runtime records the
// dynamic shared memory opt-in per kernel).
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#endif  // QFORGE_TESTS_CUDA_EMU_EMULATED_CUDA_H_

// What lets one definition of an arithmetic function serve both the CPU solvers (quant/*.cc,
// compiled by the C++ compiler) and the CUDA kernels (quant/cuda/*.cu, compiled by nvcc, and
// by the C++ compiler again for the CPU emulator of tests/cuda_emu), as ggml-common.h does for
// ggml: the QF_HOST_DEVICE marker and the one primitive whose rounding the compilers would
// otherwise decide differently.
//
// Rounding. nvcc contracts a * b + c into an FMA wherever it can (--fmad=true, its default).
// The host build contracts only inside the x86-64-v3 clones of QF_MULTIVERSION functions
// (quant/multiversion.h), and the emulator compiles device code with -ffp-contract=off. So a
// shared function writes every product that the CPU rounds on its own as UnfusedMul(a, b), and
// where the CPU's v3 clone fuses, the device code calls fmaf explicitly (gptq_kernels.cuh).
// Everything else shared code may use is exact or correctly rounded alike on both sides:
// + - / and comparisons, std::min/max/clamp (constexpr, so callable on the device with
// --expt-relaxed-constexpr), nearbyintf, floorf, fabsf, and std::memcpy for bit casts.
//
// Thread-safety: a macro and pure functions.
#ifndef QFORGE_QUANT_HOST_DEVICE_H_
#define QFORGE_QUANT_HOST_DEVICE_H_

// On a function defined in a header and shared by host and device code (in place of
// `inline`): __host__ __device__ under nvcc, and always inlined by both compilers, so that the
// caller's compilation (the vectorization and FMA contraction of a QF_MULTIVERSION clone, the
// kernel's register allocation) sees the body as if it were written in place.
#if defined(__CUDACC__)
#define QF_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define QF_HOST_DEVICE inline __attribute__((always_inline))
#else
#define QF_HOST_DEVICE inline
#endif

namespace qforge::quant {

// a * b. On the device rounded to float before any further use (__fmul_rn, which nvcc never
// fuses into an FMA); on the host the plain product, so that CPU code compiles exactly as it
// is written (GCC fuses it with a following add only inside an x86-64-v3 clone).
QF_HOST_DEVICE float UnfusedMul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_HOST_DEVICE_H_

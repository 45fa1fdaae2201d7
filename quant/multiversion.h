// Compile-time switches of the CPU solvers' hot loops, internal to quant/*.cc (never included
// by a public header):
//
//   QF_MULTIVERSION  on a function definition: GCC on x86-64 Linux compiles it twice, for
//                    x86-64-v3 (AVX2, FMA) and for the baseline, and picks the clone once at
//                    load time from the CPU (target_clones). Elsewhere it expands to nothing.
//                    Inside the v3 clone GCC may contract a * b + c into one FMA (its default
//                    -ffp-contract=fast), so a multiversioned function rounds differently from
//                    its baseline clone; the CUDA kernels that must match the CPU follow the v3
//                    clone (see quant/host_device.h).
//   QF_VECTOR_EXT    1 when GNU vector extensions (__attribute__((vector_size))) are available.
//
// Thread-safety: macros only.
#ifndef QFORGE_QUANT_MULTIVERSION_H_
#define QFORGE_QUANT_MULTIVERSION_H_

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define QF_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define QF_MULTIVERSION
#endif

#if defined(__GNUC__) || defined(__clang__)
#define QF_VECTOR_EXT 1
#else
#define QF_VECTOR_EXT 0
#endif

#endif  // QFORGE_QUANT_MULTIVERSION_H_

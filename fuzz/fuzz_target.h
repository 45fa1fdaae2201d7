// The libFuzzer entry point every target in fuzz/ defines. Built two ways (fuzz/CMakeLists.txt):
//   - with clang and QFORGE_FUZZ=ON: linked with -fsanitize=fuzzer (libFuzzer's main), for
//     scripts/fuzz.sh (the short run ctest runs, and the long runs docs/DEVELOPING.md records);
//   - in the normal build: linked with replay_main.cc, which feeds every file of the checked-in
//     corpus (fuzz/corpus/<target>/) through the target once (ctest fuzz_replay_<target>).
// A target returns 0 for every input; a crash, a sanitizer report, an uncaught exception or a
// failed QF_FUZZ_CHECK is a finding.
#ifndef QFORGE_FUZZ_FUZZ_TARGET_H_
#define QFORGE_FUZZ_FUZZ_TARGET_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

// An invariant of the code under test; aborts (a finding) when it does not hold.
#define QF_FUZZ_CHECK(cond)                                                          \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                  \
    }                                                                                \
  } while (0)

#endif  // QFORGE_FUZZ_FUZZ_TARGET_H_

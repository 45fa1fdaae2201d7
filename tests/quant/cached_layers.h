// Test helper shared by the CPU and CUDA solver tests: the seeded synthetic layers
// (quant/synthetic.h) are deterministic and some are large, so each is built once per
// test program. Thread-safety: none (one test thread).
#ifndef QFORGE_TESTS_QUANT_CACHED_LAYERS_H_
#define QFORGE_TESTS_QUANT_CACHED_LAYERS_H_

#include <cstdint>
#include <deque>
#include <utility>
#include <vector>

#include "quant/synthetic.h"

namespace qforge::quant {

// MakeSyntheticLayer(out, in, samples, seed), built on first use; the reference stays valid
// for the whole program.
inline const SyntheticLayer& Layer(int64_t out, int64_t in, int64_t samples, uint64_t seed) {
  static std::deque<std::pair<std::vector<uint64_t>, SyntheticLayer>> cache;  // stable refs
  const std::vector<uint64_t> key = {uint64_t(out), uint64_t(in), uint64_t(samples), seed};
  for (const auto& e : cache) {
    if (e.first == key) return e.second;
  }
  cache.emplace_back(key, MakeSyntheticLayer(out, in, samples, seed));
  return cache.back().second;
}

}  // namespace qforge::quant

#endif  // QFORGE_TESTS_QUANT_CACHED_LAYERS_H_

// Fuzz target: the Hessian file reader (common/hessian_file.h HessianFile::Open, Find, Read) on
// an arbitrary object. Invariants: every tensor of an accepted file is a square 2-D matrix that
// reads back as n·n floats, and every alias resolves to one of the file's tensors.
#include <string>

#include "common/hessian_file.h"
#include "common/mem_store.h"
#include "fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qforge::MemStore store;
  if (!store.Put("h.safetensors", std::string(reinterpret_cast<const char*>(data), size)).ok()) {
    return 0;
  }
  auto file = qforge::HessianFile::Open(store, "h.safetensors");
  if (!file.ok()) return 0;
  for (const qforge::TensorInfo& t : file->header().tensors()) {
    auto found = file->Find(t.name);
    if (!found.ok()) continue;  // not a module's tensor
    QF_FUZZ_CHECK((*found)->shape.size() == 2 && (*found)->shape[0] == (*found)->shape[1]);
    const int64_t n = (*found)->shape[0];
    auto h = file->Read(store, t.name, n);
    if (h.ok()) QF_FUZZ_CHECK(static_cast<int64_t>(h->size()) == n * n);
    // A wrong dimension is refused, never read.
    QF_FUZZ_CHECK(!file->Read(store, t.name, n + 1).ok());
  }
  for (const auto& [module, tensor] : file->aliases()) {
    QF_FUZZ_CHECK(file->Find(module).ok());
  }
  return 0;
}

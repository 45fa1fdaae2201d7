// Fuzz target: the safetensors header parser (common/safetensors.h ReadSafetensorsHeader) on an
// arbitrary object, then ranged reads of every tensor it accepted. Invariants: an accepted
// header's tensors lie inside the object and have the byte size their dtype and shape imply.
#include <string>

#include "common/mem_store.h"
#include "common/safetensors.h"
#include "fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qforge::MemStore store;
  if (!store.Put("m.safetensors", std::string(reinterpret_cast<const char*>(data), size)).ok()) {
    return 0;
  }
  auto header = qforge::ReadSafetensorsHeader(store, "m.safetensors");
  if (!header.ok()) {
    QF_FUZZ_CHECK(!header.status().message().empty());
    return 0;
  }
  for (const qforge::TensorInfo& t : header->tensors()) {
    QF_FUZZ_CHECK(t.data_end >= t.data_begin);
    QF_FUZZ_CHECK(t.num_bytes() == t.data_end - t.data_begin);
    QF_FUZZ_CHECK(header->data_offset() + t.data_end <= size);
    auto bytes = qforge::ReadTensorBytes(store, "m.safetensors", *header, t);
    QF_FUZZ_CHECK(bytes.ok());
    QF_FUZZ_CHECK(bytes->size() == t.num_bytes());
    if (t.dtype == qforge::DType::kF16 || t.dtype == qforge::DType::kBF16 ||
        t.dtype == qforge::DType::kF32 || t.dtype == qforge::DType::kF64) {
      auto values = qforge::DecodeToF32(t.dtype, *bytes, t.name);
      QF_FUZZ_CHECK(values.ok());
      QF_FUZZ_CHECK(static_cast<int64_t>(values->size()) == t.num_elements());
    }
  }
  return 0;
}

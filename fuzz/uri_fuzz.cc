// Fuzz target: URI and object-key parsing (common/uri.h SplitObjectUri, common/object_store.h
// ValidateObjectKey). Invariants: an accepted URI splits into a non-empty store and key; an
// accepted key is relative and has no ".", ".." or empty segment.
#include <algorithm>
#include <string>
#include <string_view>

#include "common/object_store.h"
#include "common/uri.h"
#include "fuzz/fuzz_target.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  auto split = qforge::SplitObjectUri(input);
  if (split.ok()) {
    QF_FUZZ_CHECK(!split->key.empty());
    QF_FUZZ_CHECK(!split->store_uri.empty());
  }
  // An accepted key is relative and walks nowhere: no leading '/', no "." or ".." segment,
  // no empty segment, no NUL.
  if (qforge::ValidateObjectKey(input).ok()) {
    QF_FUZZ_CHECK(!input.empty() && input.front() != '/');
    QF_FUZZ_CHECK(input.find('\0') == std::string_view::npos);
    size_t start = 0;
    while (start <= input.size()) {
      const size_t slash = std::min(input.find('/', start), input.size());
      const std::string_view segment = input.substr(start, slash - start);
      QF_FUZZ_CHECK(segment != "." && segment != "..");
      QF_FUZZ_CHECK(!segment.empty() || slash == input.size());
      start = slash + 1;
    }
  }
  return 0;
}

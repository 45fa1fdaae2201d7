// The release definitions of the fault hooks (common/fault_point.h): no-ops. They are weak,
// so that the fault-test binaries' definitions (tests/faults/fault_injector.cc, linked as
// an object file) replace them; no other binary defines them.
#include "common/fault_point.h"

#include <utility>

#include "absl/base/attributes.h"

namespace qforge {

ABSL_ATTRIBUTE_WEAK absl::Status FaultPoint(std::string_view) { return absl::OkStatus(); }

ABSL_ATTRIBUTE_WEAK bool FaultHooksEnabled() { return false; }

ABSL_ATTRIBUTE_WEAK std::unique_ptr<ObjectStore> WrapStoreForFaults(
    std::unique_ptr<ObjectStore> store) {
  return store;
}

}  // namespace qforge

// StoreOpener: how the coordinator's parts open the object store behind a URI (model,
// Hessian and output stores). The JobManager injects options.open_store (default
// OpenObjectStore) so that tests can substitute in-memory or fault-injecting stores.
//
// Thread-safety: an opener may be called from several threads at once.
#ifndef QFORGE_SERVER_STORE_OPENER_H_
#define QFORGE_SERVER_STORE_OPENER_H_

#include <functional>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/object_store.h"

namespace qforge {

// Opens the store rooted at `uri`; the caller owns it. Errors are the store's (UNAVAILABLE for
// transient failures, INVALID_ARGUMENT for a malformed URI, ...).
using StoreOpener =
    std::function<absl::StatusOr<std::unique_ptr<ObjectStore>>(std::string_view uri)>;

}  // namespace qforge

#endif  // QFORGE_SERVER_STORE_OPENER_H_

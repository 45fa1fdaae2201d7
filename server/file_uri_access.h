// How the coordinator touches file:// locations while it only validates a job: nothing is
// created and no directory tree is walked further than needed (issue 18, defect 2).
//  - NonCreatingOpener: a StoreOpener for reading and checking. A file:// (or plain path) URI
//    whose directory does not exist is NOT_FOUND ("does not exist") instead of being
//    created as OpenObjectStore would; other URIs go to the wrapped opener unchanged.
//  - CheckOutputEmpty: an output prefix may only hold staging objects (of jobs in flight).
//    For a local directory the walk stops at the first other object (so an output of
//    file:///usr answers at once), and the error never names what the directory holds (the
//    caller may not own it).
//
// Thread-safety: pure functions of the file system; the opener may be called concurrently
// when the wrapped one may.
#ifndef QFORGE_SERVER_FILE_URI_ACCESS_H_
#define QFORGE_SERVER_FILE_URI_ACCESS_H_

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "server/store_opener.h"

namespace qforge {

// The local directory of a file:// URI (empty or "localhost" host) or a plain path; nullopt
// for any other scheme.
std::optional<std::string> LocalDirectoryOfUri(std::string_view uri);

StoreOpener NonCreatingOpener(StoreOpener inner);

// OK when `output_uri` is "" (no output), does not exist yet, or holds nothing but staging
// objects (job/staging_layout.h) and store temp files. INVALID_ARGUMENT "spec.output_uri:
// ... is not empty ..." otherwise, naming no object. Non-local URIs are listed through
// `open_store`; its errors keep their code when transient (FieldStatus rules).
absl::Status CheckOutputEmpty(const StoreOpener& open_store, const std::string& output_uri);

}  // namespace qforge

#endif  // QFORGE_SERVER_FILE_URI_ACCESS_H_

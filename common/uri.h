// Splitting object URIs into (store root, key), for arguments that name one object rather
// than a directory (`--hessians file:///data/h.safetensors`).
// Thread-safety: pure functions.
#ifndef QFORGE_COMMON_URI_H_
#define QFORGE_COMMON_URI_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace qforge {

struct ObjectUri {
  std::string store_uri;  // what OpenObjectStore takes: the parent directory
  std::string key;        // the object's key relative to it
};

// `file:///a/b/c.safetensors` or `/a/b/c.safetensors` or `rel/c.safetensors` →
// {store "file:///a/b" (or the relative parent), key "c.safetensors"};
// `s3://b/p/c.safetensors?endpoint=e` → {store "s3://b/p?endpoint=e", key "c.safetensors"}.
// INVALID_ARGUMENT for an empty URI, one ending in '/', or an unsupported scheme.
absl::StatusOr<ObjectUri> SplitObjectUri(std::string_view uri);

// `uri` with a relative local path made absolute against the process's working directory
// (and lexically normalized: "a/./b/../c" -> "<cwd>/a/c"), so that processes started in other
// directories (workers) name the same files; every other URI comes back unchanged: an
// absolute path, `file:///abs`, another scheme (`s3://...`), "". Symbolic links are not
// resolved. INTERNAL only when the working directory cannot be read.
absl::StatusOr<std::string> AbsoluteLocalUri(std::string_view uri);

}  // namespace qforge

#endif  // QFORGE_COMMON_URI_H_

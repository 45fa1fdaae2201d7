#include "job/hidden_states.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>

#include "absl/status/status.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/status_bridge.h"

namespace qforge {

std::string SpillDirectory(const std::string& dir) {
  if (!dir.empty()) return dir;
  const char* tmp = std::getenv("TMPDIR");
  return tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
}

// An anonymous local file in `dir` (created and unlinked at once, so it disappears with the
// process), `bytes` long with its blocks reserved (so a full disk is an error here, not a
// SIGBUS later). Returns the descriptor.
absl::StatusOr<int> AnonymousFile(const std::string& dir, uint64_t bytes, std::string_view what) {
  std::string path = Cat(dir, "/qforge-", what, "-XXXXXX");
  const int fd = mkstemp(path.data());
  if (fd < 0) {
    return absl::UnavailableError(Cat("cannot create a ", what, " file in ", dir, ": ",
                                      std::strerror(errno),
                                      " (set the spill directory to a writable local disk)"));
  }
  unlink(path.c_str());
  if (bytes > 0) {
    const int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
    if (err != 0) {
      close(fd);
      return absl::ResourceExhaustedError(
          Cat("cannot reserve ", bytes, " bytes for the ", what, " file in ", dir, ": ",
              std::strerror(err), " (free local disk there or choose another spill directory)"));
    }
  }
  return fd;
}

HiddenStates::~HiddenStates() {
  if (map_ != nullptr) munmap(map_, bytes_);
}

absl::StatusOr<std::unique_ptr<HiddenStates>> HiddenStates::Create(uint64_t values,
                                                                 uint64_t spill_above,
                                                                 const std::string& spill_dir) {
  std::unique_ptr<HiddenStates> h(new HiddenStates());
  h->bytes_ = values * sizeof(float);
  if (h->bytes_ <= spill_above) {
    try {
      h->memory_.assign(static_cast<size_t>(values), 0.0f);
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError(Cat(
          "cannot allocate ", h->bytes_, " bytes of hidden states; lower the spill limit "
          "(spill_above_bytes) so they live in a mapped local file, or use smaller shards"));
    }
    h->data_ = h->memory_.data();
    return h;
  }
  const std::string dir = SpillDirectory(spill_dir);
  QF_ASSIGN_OR_RETURN(const int fd, AnonymousFile(dir, h->bytes_, "hidden-states"));
  void* p = mmap(nullptr, h->bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_errno = errno;
  close(fd);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(Cat("cannot map ", h->bytes_,
                                            " bytes of hidden states spilled to ", dir, ": ",
                                            std::strerror(map_errno)));
  }
  h->map_ = p;
  h->data_ = static_cast<float*>(p);
  return h;
}


}  // namespace qforge

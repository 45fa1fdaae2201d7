#include "common/local_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"

namespace qforge {
namespace {

constexpr size_t kMaxTempBaseBytes = 200;  // keeps temp names under NAME_MAX (255)
constexpr size_t kTempRandomHexDigits = 16;
constexpr size_t kMaxIoChunk = size_t{1} << 30;  // per read()/write() call

std::string ErrnoText(int err) { return std::error_code(err, std::generic_category()).message(); }

// Canonical code for an errno value; `write` says whether the failing call was creating
// or replacing something (ENOTDIR/EISDIR then mean a key/directory collision, not absence).
absl::StatusCode CodeForErrno(int err, bool write) {
  switch (err) {
    case ENOENT:
      return absl::StatusCode::kNotFound;
    case ENOTDIR:
    case EISDIR:
    case EEXIST:
    case ENOTEMPTY:
      return write ? absl::StatusCode::kFailedPrecondition : absl::StatusCode::kNotFound;
    case EACCES:
    case EPERM:
    case EROFS:
      return absl::StatusCode::kPermissionDenied;
    case ENOSPC:
    case EDQUOT:
    case EMFILE:
    case ENFILE:
    case ENOMEM:
    case EFBIG:
      return absl::StatusCode::kResourceExhausted;
    case EIO:
    case EAGAIN:
    case EINTR:
    case ESTALE:
    case ETIMEDOUT:
    case EBUSY:
    case ENOLINK:
    case ECONNRESET:
    case EREMOTEIO:
      return absl::StatusCode::kUnavailable;
    case ENAMETOOLONG:
      return absl::StatusCode::kInvalidArgument;
    case ELOOP:
      return absl::StatusCode::kFailedPrecondition;
    default:
      return absl::StatusCode::kInternal;
  }
}

absl::Status ErrnoStatus(int err, std::string_view op, std::string_view key, std::string_view path,
                         bool write) {
  return absl::Status(CodeForErrno(err, write),
                      Cat(op, " object '", key, "' (", path, "): ", ErrnoText(err)));
}

std::string Parent(std::string_view path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string_view::npos) return ".";
  if (slash == 0) return "/";
  return std::string(path.substr(0, slash));
}

std::string JoinPath(std::string_view dir, std::string_view name) {
  if (dir == "/") return Cat("/", name);
  return Cat(dir, "/", name);
}

bool IsUnder(std::string_view path, std::string_view root) {
  if (path == root) return true;
  if (root == "/") return StartsWith(path, "/");
  return path.size() > root.size() && StartsWith(path, root) && path[root.size()] == '/';
}

// The canonical path (symbolic links resolved) of what `path` names, as realpath(3) gives
// it; errno in *err on failure. The kernel resolves it: the path is opened with O_PATH (no
// permission on the object itself needed, nothing read) and /proc/self/fd/N read back, one
// walk of the path where realpath(3) makes a readlink call per component (a walk of each
// prefix: the coordinator checks several keys per task completion). Without /proc, for a
// name the kernel marks " (deleted)" (removed meanwhile) or one too long, realpath(3) decides.
bool RealPath(const std::string& path, std::string* out, int* err) {
  const int fd = ::open(path.c_str(), O_PATH | O_CLOEXEC);
  if (fd < 0) {
    *err = errno;
    return false;
  }
  char link[PATH_MAX + 1];
  const std::string proc = Cat("/proc/self/fd/", fd);
  const ssize_t n = ::readlink(proc.c_str(), link, sizeof(link));
  ::close(fd);
  constexpr std::string_view kDeleted = " (deleted)";
  if (n > 0 && n < static_cast<ssize_t>(sizeof(link)) && link[0] == '/') {
    const std::string_view canonical(link, static_cast<size_t>(n));
    if (canonical.size() < kDeleted.size() ||
        canonical.substr(canonical.size() - kDeleted.size()) != kDeleted) {
      out->assign(canonical);
      return true;
    }
  }
  char* resolved = ::realpath(path.c_str(), nullptr);
  if (resolved == nullptr) {
    *err = errno;
    return false;
  }
  out->assign(resolved);
  std::free(resolved);
  return true;
}

// Distinct within the process (a counter through a bijective mixer) and, with a random seed
// drawn once per process, across processes; a collision is caught by O_EXCL anyway. Seeding
// once matters: the worker runs each task on a thread of its own, and a std::random_device
// per thread costs more than the rest of naming the file.
uint64_t RandomSuffix() {
  static const uint64_t seed = [] {
    std::random_device rd;
    const uint64_t t =
        static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    return (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ t ^
           (static_cast<uint64_t>(::getpid()) << 16);
  }();
  static std::atomic<uint64_t> counter{0};
  // splitmix64's finalizer: a bijection of 64-bit values, so distinct counts give distinct names.
  uint64_t z = seed + counter.fetch_add(1, std::memory_order_relaxed) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::string TempName(std::string_view basename) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string name = ".";
  name.append(basename.substr(0, kMaxTempBaseBytes));
  name.append(".tmp-");
  uint64_t r = RandomSuffix();
  for (size_t i = 0; i < kTempRandomHexDigits; ++i, r >>= 4) name.push_back(kHex[r & 0xF]);
  return name;
}

template <typename Call>
int RetryOnEintr(const Call& call) {
  int rc;
  do {
    rc = call();
  } while (rc < 0 && errno == EINTR);
  return rc;
}

void FsyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);  // best effort: the rename itself has already happened
  ::close(fd);
}

class DirCloser {
 public:
  explicit DirCloser(DIR* d) : d_(d) {}
  ~DirCloser() {
    if (d_ != nullptr) ::closedir(d_);
  }
  DirCloser(const DirCloser&) = delete;
  DirCloser& operator=(const DirCloser&) = delete;

 private:
  DIR* d_;
};

}  // namespace

// A streaming put into a temp file next to the target, renamed over it on Close().
class LocalObjectWriter final : public ObjectWriter {
 public:
  LocalObjectWriter(const LocalStore* store, std::string key, std::string path,
                    std::string temp_path, std::string created_dir, int fd)
      : store_(store),
        key_(std::move(key)),
        path_(std::move(path)),
        temp_path_(std::move(temp_path)),
        created_dir_(std::move(created_dir)),
        fd_(fd) {}

  ~LocalObjectWriter() override {
    if (fd_ >= 0) ::close(fd_);
    if (!published_) Discard();
  }

  absl::Status Append(std::string_view data) override {
    if (closed_) return Closed("Append to");
    QF_RETURN_IF_ERROR(failure_);
    while (!data.empty()) {
      const size_t chunk = std::min(data.size(), kMaxIoChunk);
      const ssize_t n = ::write(fd_, data.data(), chunk);
      if (n < 0) {
        if (errno == EINTR) continue;
        failure_ = ErrnoStatus(errno, "cannot write", key_, temp_path_, true);
        return failure_;
      }
      data.remove_prefix(static_cast<size_t>(n));
      bytes_ += static_cast<uint64_t>(n);
    }
    return absl::OkStatus();
  }

  absl::Status Close() override {
    if (closed_) return Closed("Close");
    closed_ = true;
    QF_RETURN_IF_ERROR(failure_);
    if (store_->options_.sync && RetryOnEintr([&] { return ::fsync(fd_); }) != 0) {
      return ErrnoStatus(errno, "cannot fsync", key_, temp_path_, true);
    }
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0 && errno != EINTR) {
      return ErrnoStatus(errno, "cannot close", key_, temp_path_, true);
    }
    if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
      return ErrnoStatus(errno, "cannot publish", key_, path_, true);
    }
    published_ = true;
    if (store_->options_.sync) FsyncDir(Parent(path_));
    return absl::OkStatus();
  }

  uint64_t bytes_written() const override { return bytes_; }

 private:
  absl::Status Closed(std::string_view op) const {
    return absl::FailedPreconditionError(Cat(op, " writer of object '", key_, "' after Close()"));
  }

  void Discard() {
    ::unlink(temp_path_.c_str());
    if (created_dir_.empty()) return;
    // Remove the directories this writer created, if nothing else appeared in them.
    for (std::string dir = Parent(path_); IsUnder(dir, created_dir_); dir = Parent(dir)) {
      if (::rmdir(dir.c_str()) != 0) break;
      if (dir == created_dir_) break;
    }
  }

  const LocalStore* store_;
  const std::string key_;
  const std::string path_;
  const std::string temp_path_;
  const std::string created_dir_;  // topmost directory created for this put ("" if none)
  int fd_;
  uint64_t bytes_ = 0;
  bool closed_ = false;
  bool published_ = false;
  absl::Status failure_;  // first I/O error; the writer refuses further use after it
};

absl::StatusOr<std::unique_ptr<LocalStore>> LocalStore::Open(std::string_view root_dir,
                                                             LocalStoreOptions options) {
  if (root_dir.empty()) return absl::InvalidArgumentError("empty local store root directory");
  if (root_dir.find('\0') != std::string_view::npos) {
    return absl::InvalidArgumentError("local store root directory contains a NUL byte");
  }
  std::string path(root_dir);
  if (path.front() != '/') {
    char cwd[PATH_MAX];
    if (::getcwd(cwd, sizeof(cwd)) == nullptr) {
      return absl::Status(
          CodeForErrno(errno, false),
          Cat("cannot resolve local store root '", root_dir, "': getcwd: ", ErrnoText(errno)));
    }
    path = JoinPath(cwd, path);
  }
  std::string canonical;
  int err = 0;
  // An existing root (the usual case: the coordinator opens its staging store per task
  // completion) costs one resolution; a missing one is created first (mkdir -p).
  const bool exists = RealPath(path, &canonical, &err);
  if (!exists && options.create_root) {
    // mkdir -p, one component at a time.
    for (size_t pos = 1; pos <= path.size(); ++pos) {
      if (pos != path.size() && path[pos] != '/') continue;
      const std::string prefix = path.substr(0, pos);
      if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {
        return absl::Status(CodeForErrno(errno, true),
                            Cat("cannot create local store root '", path, "' (at '", prefix,
                                "'): ", ErrnoText(errno)));
      }
    }
  }
  if (!exists && !RealPath(path, &canonical, &err)) {
    return absl::Status(CodeForErrno(err, false),
                        Cat("cannot open local store root '", path, "': ", ErrnoText(err)));
  }
  // The root's descriptor: reads resolve keys from it (OpenBeneath).
  const int root_fd = ::open(canonical.c_str(), O_PATH | O_CLOEXEC);
  struct stat st;
  if (root_fd < 0 || ::fstat(root_fd, &st) != 0) {
    const int e = errno;
    if (root_fd >= 0) ::close(root_fd);
    return absl::Status(CodeForErrno(e, false),
                        Cat("cannot open local store root '", canonical, "': ", ErrnoText(e)));
  }
  if (!S_ISDIR(st.st_mode)) {
    ::close(root_fd);
    return absl::FailedPreconditionError(
        Cat("local store root '", canonical, "' is not a directory"));
  }
  return std::unique_ptr<LocalStore>(new LocalStore(std::move(canonical), root_fd, options));
}

LocalStore::~LocalStore() {
  if (root_fd_ >= 0) ::close(root_fd_);
}

int LocalStore::OpenBeneath(std::string_view key, int flags) const {
  if (root_fd_ < 0) return -ENOSYS;
  const std::string relative(key);
  struct open_how how;
  std::memset(&how, 0, sizeof(how));
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  for (int attempt = 0;; ++attempt) {
    const long fd = ::syscall(SYS_openat2, root_fd_, relative.c_str(), &how, sizeof(how));
    if (fd >= 0) return static_cast<int>(fd);
    // EAGAIN: a concurrent rename or mount anywhere in the system; EINTR: a signal.
    if ((errno == EAGAIN || errno == EINTR) && attempt < 16) continue;
    return -errno;
  }
}

std::string LocalStore::uri() const { return Cat("file://", root_); }

bool LocalStore::IsTempFileName(std::string_view name) {
  constexpr std::string_view kMarker = ".tmp-";
  if (name.size() < 1 + 1 + kMarker.size() + kTempRandomHexDigits || name.front() != '.') {
    return false;
  }
  const std::string_view suffix = name.substr(name.size() - kTempRandomHexDigits);
  const std::string_view marker =
      name.substr(name.size() - kTempRandomHexDigits - kMarker.size(), kMarker.size());
  if (marker != kMarker) return false;
  return std::all_of(suffix.begin(), suffix.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

absl::Status LocalStore::CheckInsideRoot(std::string_view key, const std::string& path) const {
  // Resolve the deepest part of `path` that exists; what does not exist yet cannot be a link.
  std::string p = path;
  while (true) {
    std::string canonical;
    int err = 0;
    if (RealPath(p, &canonical, &err)) {
      if (IsUnder(canonical, root_)) return absl::OkStatus();
      return absl::PermissionDeniedError(Cat("object '", key, "' (", path,
                                             ") resolves through a symbolic link to '", canonical,
                                             "', outside the store root ", root_));
    }
    if ((err != ENOENT && err != ENOTDIR) || p == root_ || !IsUnder(p, root_)) {
      return ErrnoStatus(err, "cannot resolve", key, p, false);
    }
    p = Parent(p);
  }
}

absl::StatusOr<std::string> LocalStore::Resolve(std::string_view key, bool check_object) const {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  std::string path = JoinPath(root_, key);
  QF_RETURN_IF_ERROR(CheckInsideRoot(key, check_object ? path : Parent(path)));
  return path;
}

absl::Status LocalStore::MakeParents(std::string_view key, const std::string& path) const {
  // Created one segment at a time below the root, so a segment that exists as a file is
  // reported precisely. A concurrent Delete removes the directories it leaves empty, possibly
  // one just made here before its child is: start again from the top (a few times).
  int restarts = 0;
  for (size_t pos = root_.size() + 1; pos < path.size(); ++pos) {
    if (path[pos] != '/') continue;
    const std::string dir = path.substr(0, pos);
    if (::mkdir(dir.c_str(), 0777) == 0) continue;
    int err = errno;
    if (err == EEXIST) {
      struct stat st;
      if (::stat(dir.c_str(), &st) == 0) {
        if (S_ISDIR(st.st_mode)) continue;
        return absl::FailedPreconditionError(Cat("cannot create object '", key, "': '",
                                                 dir.substr(root_.size() + 1),
                                                 "' exists and is not a directory (", dir, ")"));
      }
      err = errno;  // removed again since the mkdir
    }
    if (err == ENOENT && restarts < 16) {
      ++restarts;
      pos = root_.size();  // the loop's ++pos makes it root_.size() + 1
      continue;
    }
    return ErrnoStatus(err, "cannot create the directory for", key, dir, true);
  }
  return absl::OkStatus();
}

void LocalStore::RemoveEmptyDirs(std::string dir) const {
  while (dir != root_ && IsUnder(dir, root_)) {
    if (::rmdir(dir.c_str()) != 0) return;  // not empty (or gone): stop
    dir = Parent(dir);
  }
}

absl::StatusOr<ObjectInfo> LocalStore::Stat(std::string_view key) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  struct stat st;
  const int fd = OpenBeneath(key, O_PATH);
  if (fd >= 0) {
    const int rc = ::fstat(fd, &st);
    const int err = errno;
    ::close(fd);
    if (rc != 0) return ErrnoStatus(err, "cannot stat", key, JoinPath(root_, key), false);
  } else if (fd == -ENOENT || fd == -ENOTDIR) {
    return ErrnoStatus(-fd, "cannot stat", key, JoinPath(root_, key), false);
  } else {
    QF_ASSIGN_OR_RETURN(std::string path, Resolve(key, /*check_object=*/true));
    if (::stat(path.c_str(), &st) != 0) return ErrnoStatus(errno, "cannot stat", key, path, false);
  }
  const std::string path = JoinPath(root_, key);
  if (!S_ISREG(st.st_mode)) {
    return absl::NotFoundError(
        Cat("object '", key, "' (", path, ") is a directory or special file, not an object"));
  }
  return ObjectInfo{std::string(key), static_cast<uint64_t>(st.st_size),
                    Cat("mtime:", static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 +
                                      st.st_mtim.tv_nsec,
                        ".", static_cast<uint64_t>(st.st_ino))};
}

absl::Status LocalStore::ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                                   std::string* out) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  std::string path = JoinPath(root_, key);
  int fd = OpenBeneath(key, O_RDONLY);
  if (fd == -ENOENT || fd == -ENOTDIR) return ErrnoStatus(-fd, "cannot open", key, path, false);
  if (fd < 0) {  // leaves the root, or no openat2: decided by the canonical path
    QF_ASSIGN_OR_RETURN(path, Resolve(key, /*check_object=*/true));
    fd = RetryOnEintr([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); });
    if (fd < 0) return ErrnoStatus(errno, "cannot open", key, path, false);
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoStatus(errno, "cannot stat", key, path, false);
  if (!S_ISREG(st.st_mode)) {
    return absl::NotFoundError(
        Cat("object '", key, "' (", path, ") is a directory or special file, not an object"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (offset > size || length > size - offset) {
    return absl::OutOfRangeError(Cat("read of bytes [", offset, ", ", offset + length,
                                     ") of object '", key, "' (", path, ") is past its end (", size,
                                     " bytes)"));
  }
  try {
    out->resize(static_cast<size_t>(length));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(
        Cat("cannot allocate ", length, " bytes to read object '", key, "'"));
  } catch (const std::length_error&) {
    return absl::ResourceExhaustedError(
        Cat("cannot allocate ", length, " bytes to read object '", key, "'"));
  }
  uint64_t done = 0;
  while (done < length) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(length - done, kMaxIoChunk));
    const ssize_t n = ::pread(fd, out->data() + done, chunk, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      out->clear();
      return ErrnoStatus(err, "cannot read", key, path, false);
    }
    if (n == 0) {
      out->clear();
      return absl::DataLossError(Cat("object '", key, "' (", path,
                                     ") shrank while being read: end of file at byte ",
                                     offset + done, ", expected ", size, " bytes"));
    }
    done += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

absl::Status LocalStore::Put(std::string_view key, std::string_view data) {
  QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectWriter> writer, NewWriter(key));
  QF_RETURN_IF_ERROR(writer->Append(data));
  return writer->Close();
}

absl::StatusOr<std::unique_ptr<ObjectWriter>> LocalStore::NewWriter(std::string_view key) {
  QF_ASSIGN_OR_RETURN(std::string path, Resolve(key, /*check_object=*/false));
  const std::string dir = Parent(path);
  // The topmost missing ancestor: what a discarded writer removes again.
  std::string created_dir;
  for (std::string d = dir; d != root_ && IsUnder(d, root_); d = Parent(d)) {
    struct stat st;
    if (::lstat(d.c_str(), &st) == 0) break;
    created_dir = d;
  }
  const size_t slash = path.rfind('/');
  const std::string_view basename = std::string_view(path).substr(slash + 1);
  // When the parent directory exists (the common case: every object of a job's staging lies in
  // one directory) the temp file is created in it at once, already checked by Resolve; the
  // directories are made (and checked again) only when it is missing, or when the open finds it
  // gone or not a directory, so that MakeParents reports which segment is in the way.
  // A concurrent Delete may remove an empty directory between MakeParents and the open:
  // retry a few times; also retry the (astronomically unlikely) temp-name collision.
  bool make_parents = !created_dir.empty();
  for (int attempt = 0;; ++attempt) {
    if (make_parents) {
      QF_RETURN_IF_ERROR(MakeParents(key, path));
      // The parent exists now: check again that it resolves inside the root.
      QF_RETURN_IF_ERROR(CheckInsideRoot(key, dir));
    }
    const std::string temp_path = JoinPath(dir, TempName(basename));
    const int fd = RetryOnEintr(
        [&] { return ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666); });
    if (fd >= 0) {
      return std::unique_ptr<ObjectWriter>(new LocalObjectWriter(
          this, std::string(key), std::move(path), temp_path, created_dir, fd));
    }
    const int err = errno;
    if ((err == ENOENT || err == ENOTDIR) && !make_parents) {
      make_parents = true;
      continue;
    }
    if ((err == ENOENT || err == EEXIST) && attempt < 8) continue;
    return ErrnoStatus(err, "cannot create a temp file for", key, temp_path, true);
  }
}

absl::Status LocalStore::Walk(const std::string& dir, const std::string& key_dir,
                              std::string_view prefix, std::vector<ObjectInfo>* out) const {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT || errno == ENOTDIR) return absl::OkStatus();  // nothing (any more)
    return absl::Status(CodeForErrno(errno, false), Cat("cannot list directory '", dir, "' under ",
                                                        uri(), ": ", ErrnoText(errno)));
  }
  std::vector<std::string> names;
  {
    // Read the names first and close the directory before recursing, so a deep tree does
    // not hold one descriptor per level.
    DirCloser closer(d);
    while (true) {
      errno = 0;
      const dirent* e = ::readdir(d);
      if (e == nullptr) {
        if (errno != 0) {
          return absl::Status(
              CodeForErrno(errno, false),
              Cat("cannot list directory '", dir, "' under ", uri(), ": ", ErrnoText(errno)));
        }
        break;
      }
      const std::string_view name = e->d_name;
      if (name == "." || name == ".." || IsTempFileName(name)) continue;
      names.emplace_back(name);
    }
  }
  for (const std::string& name : names) {
    const std::string key = key_dir.empty() ? name : Cat(key_dir, "/", name);
    if (!ValidateObjectKey(key).ok()) continue;  // not something this store could have written
    const std::string path = JoinPath(dir, name);
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) continue;  // removed since readdir
    if (S_ISDIR(st.st_mode)) {
      const std::string sub = key + "/";
      if (StartsWith(sub, prefix) || StartsWith(prefix, sub)) {
        QF_RETURN_IF_ERROR(Walk(path, key, prefix, out));
      }
      continue;
    }
    if (!StartsWith(key, prefix)) continue;
    if (S_ISLNK(st.st_mode)) {
      // Listed only when it is a link to a regular file inside the root.
      if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      if (!CheckInsideRoot(key, path).ok()) continue;
    }
    if (!S_ISREG(st.st_mode)) continue;
    out->push_back(ObjectInfo{key, static_cast<uint64_t>(st.st_size)});
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ObjectInfo>> LocalStore::List(std::string_view prefix) {
  std::vector<ObjectInfo> out;
  std::string key_dir;
  const size_t slash = prefix.rfind('/');
  if (slash != std::string_view::npos) {
    // Every valid key matching the prefix lies under its directory part, which is then itself
    // a valid key; if it is not, nothing can match (and nothing outside the root is walked).
    key_dir = std::string(prefix.substr(0, slash));
    if (!ValidateObjectKey(key_dir).ok()) return out;
    const std::string dir = JoinPath(root_, key_dir);
    QF_RETURN_IF_ERROR(CheckInsideRoot(key_dir, dir));
    QF_RETURN_IF_ERROR(Walk(dir, key_dir, prefix, &out));
  } else {
    QF_RETURN_IF_ERROR(Walk(root_, "", prefix, &out));
  }
  std::sort(out.begin(), out.end(),
            [](const ObjectInfo& a, const ObjectInfo& b) { return a.key < b.key; });
  return out;
}

absl::Status LocalStore::Delete(std::string_view key) {
  QF_ASSIGN_OR_RETURN(std::string path, Resolve(key, /*check_object=*/false));
  if (::unlink(path.c_str()) != 0) {
    const int err = errno;
    // Absent, or a directory (a "prefix", not an object): nothing to delete.
    if (err == ENOENT || err == ENOTDIR || err == EISDIR) return absl::OkStatus();
    return ErrnoStatus(err, "cannot delete", key, path, true);
  }
  RemoveEmptyDirs(Parent(path));
  return absl::OkStatus();
}

absl::Status LocalStore::Rename(std::string_view from, std::string_view to) {
  QF_ASSIGN_OR_RETURN(std::string from_path, Resolve(from, /*check_object=*/false));
  QF_ASSIGN_OR_RETURN(std::string to_path, Resolve(to, /*check_object=*/false));
  struct stat st;
  if (::lstat(from_path.c_str(), &st) != 0) {
    return ErrnoStatus(errno, "cannot rename", from, from_path, false);
  }
  if (S_ISDIR(st.st_mode)) {
    return absl::NotFoundError(Cat("cannot rename object '", from, "' (", from_path,
                                   "): it is a directory, not an object"));
  }
  if (from_path == to_path) return absl::OkStatus();
  const std::string to_dir = Parent(to_path);
  // A concurrent Delete may remove an empty directory between MakeParents and the rename.
  for (int attempt = 0;; ++attempt) {
    QF_RETURN_IF_ERROR(MakeParents(to, to_path));
    QF_RETURN_IF_ERROR(CheckInsideRoot(to, to_dir));
    if (::rename(from_path.c_str(), to_path.c_str()) == 0) break;
    const int err = errno;
    if (err == ENOENT && attempt < 8 && ::lstat(from_path.c_str(), &st) == 0) continue;
    if (err == ENOENT) return ErrnoStatus(err, "cannot rename", from, from_path, false);
    return ErrnoStatus(err, Cat("cannot rename object '", from, "' to"), to, to_path, true);
  }
  if (options_.sync) {
    FsyncDir(to_dir);
    if (Parent(from_path) != to_dir) FsyncDir(Parent(from_path));
  }
  RemoveEmptyDirs(Parent(from_path));
  return absl::OkStatus();
}

absl::Status LocalStore::DeleteUnder(const std::string& dir, const std::string& key_dir,
                                     std::string_view prefix) const {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT || errno == ENOTDIR) return absl::OkStatus();  // nothing (any more)
    return absl::Status(CodeForErrno(errno, false), Cat("cannot list directory '", dir, "' under ",
                                                        uri(), ": ", ErrnoText(errno)));
  }
  std::vector<std::string> names;
  {
    DirCloser closer(d);
    while (true) {
      errno = 0;
      const dirent* e = ::readdir(d);
      if (e == nullptr) {
        if (errno != 0) {
          return absl::Status(
              CodeForErrno(errno, false),
              Cat("cannot list directory '", dir, "' under ", uri(), ": ", ErrnoText(errno)));
        }
        break;
      }
      const std::string_view name = e->d_name;
      if (name != "." && name != "..") names.emplace_back(name);
    }
  }
  for (const std::string& name : names) {
    // The key the entry is, or, for a temp file `.<name>.tmp-<hex>`, the key it was written for.
    std::string_view key_name = name;
    const bool temp = IsTempFileName(name);
    if (temp) key_name = key_name.substr(1, key_name.size() - 1 - 5 - kTempRandomHexDigits);
    const std::string key = key_dir.empty() ? std::string(key_name) : Cat(key_dir, "/", key_name);
    const std::string path = JoinPath(dir, name);
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0) continue;  // removed since readdir
    if (!temp && S_ISDIR(st.st_mode)) {
      const std::string sub = key + "/";
      if (StartsWith(sub, prefix) || StartsWith(prefix, sub)) {
        QF_RETURN_IF_ERROR(DeleteUnder(path, key, prefix));
        if (StartsWith(sub, prefix)) (void)::rmdir(path.c_str());  // fails when not empty
      }
      continue;
    }
    if (!StartsWith(key, prefix)) continue;
    // A file, or a link (the link itself goes, never its target).
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return ErrnoStatus(errno, "cannot delete", key, path, true);
    }
  }
  return absl::OkStatus();
}

absl::Status LocalStore::DeletePrefix(std::string_view prefix) {
  if (prefix.empty()) {
    return absl::InvalidArgumentError(Cat("DeletePrefix on ", uri(),
                                          ": the prefix is empty (it would delete every object)"));
  }
  const size_t slash = prefix.rfind('/');
  if (slash == std::string_view::npos) return DeleteUnder(root_, "", prefix);
  // As List: every key matching the prefix lies under its directory part.
  const std::string key_dir(prefix.substr(0, slash));
  if (!ValidateObjectKey(key_dir).ok()) return absl::OkStatus();
  const std::string dir = JoinPath(root_, key_dir);
  QF_RETURN_IF_ERROR(CheckInsideRoot(key_dir, dir));
  QF_RETURN_IF_ERROR(DeleteUnder(dir, key_dir, prefix));
  RemoveEmptyDirs(dir);
  return absl::OkStatus();
}

}  // namespace qforge

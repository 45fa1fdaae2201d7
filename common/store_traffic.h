// StoreTraffic: what a process moved through its object stores, per URI scheme ("file",
// "s3"): bytes read and written, operations and failed operations per kind of call. The
// coordinator and the worker open every store through OpenCountedObjectStore, which wraps
// the store OpenObjectStore returns in a CountingStore feeding GlobalStoreTraffic(); their
// metrics ports export the figures (common/metrics_collectors.h:
// qforge_store_{read,written}_bytes_total, qforge_store_operations_total,
// qforge_store_errors_total). Nothing here depends on Prometheus; solvers never see it.
//
// What counts:
//   read bytes     the bytes ReadRange returned (ReadAll included)
//   written bytes  the bytes of a successful Put, and every byte an ObjectWriter accepted
//   operations     every call: stat, read, put, write (one per writer: NewWriter through
//                  Close), list, delete, delete_prefix, rename
//   errors         calls that failed because the store failed (StoreFailure(code)), not
//                  answers about the request: NOT_FOUND, INVALID_ARGUMENT, OUT_OF_RANGE,
//                  FAILED_PRECONDITION, ALREADY_EXISTS, UNIMPLEMENTED and CANCELLED are not
//                  errors here.
//
// Thread-safety: every method of StoreTraffic and CountingStore may be called concurrently
// (relaxed atomics; a snapshot may mix figures from either side of a concurrent call).
#ifndef QFORGE_COMMON_STORE_TRAFFIC_H_
#define QFORGE_COMMON_STORE_TRAFFIC_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/object_store.h"

namespace qforge {

class StoreTraffic {
 public:
  enum class Scheme { kFile = 0, kS3 = 1 };
  enum class Op { kStat = 0, kRead, kPut, kWrite, kList, kDelete, kDeletePrefix, kRename,
                  kCopy };
  static constexpr int kNumSchemes = 2;
  static constexpr int kNumOps = 9;

  // The label values: "file", "s3"; "stat", "read", "put", "write", "list", "delete",
  // "delete_prefix", "rename", "copy".
  static const char* SchemeName(Scheme s);
  static const char* OpName(Op op);
  // "s3" for s3:// URIs, "file" for everything else OpenObjectStore accepts.
  static Scheme SchemeOf(std::string_view uri);
  // Whether a call that returned `code` failed because the store failed (see above).
  static bool StoreFailure(absl::StatusCode code);

  void AddRead(Scheme s, uint64_t bytes) { At(s).read_bytes.fetch_add(bytes, kRelaxed); }
  void AddWritten(Scheme s, uint64_t bytes) { At(s).written_bytes.fetch_add(bytes, kRelaxed); }
  // One call of kind `op` that ended with `status`.
  void AddCall(Scheme s, Op op, const absl::Status& status);

  uint64_t read_bytes(Scheme s) const { return At(s).read_bytes.load(kRelaxed); }
  uint64_t written_bytes(Scheme s) const { return At(s).written_bytes.load(kRelaxed); }
  uint64_t operations(Scheme s, Op op) const { return At(s).ops[Index(op)].load(kRelaxed); }
  uint64_t errors(Scheme s, Op op) const { return At(s).errors[Index(op)].load(kRelaxed); }

 private:
  static constexpr std::memory_order kRelaxed = std::memory_order_relaxed;
  struct PerScheme {
    std::atomic<uint64_t> read_bytes{0}, written_bytes{0};
    std::array<std::atomic<uint64_t>, kNumOps> ops{}, errors{};
  };
  static size_t Index(Op op) { return static_cast<size_t>(op); }
  PerScheme& At(Scheme s) { return schemes_[static_cast<size_t>(s)]; }
  const PerScheme& At(Scheme s) const { return schemes_[static_cast<size_t>(s)]; }
  std::array<PerScheme, kNumSchemes> schemes_;
};

// The process's traffic: what every store opened by OpenCountedObjectStore moved.
StoreTraffic& GlobalStoreTraffic();

// An ObjectStore that forwards every call to `target` (owned) and records it in `traffic`
// (not owned; must outlive the store and its writers) under `scheme`.
class CountingStore final : public ObjectStore {
 public:
  CountingStore(std::unique_ptr<ObjectStore> target, StoreTraffic::Scheme scheme,
                StoreTraffic* traffic)
      : target_(std::move(target)), scheme_(scheme), traffic_(traffic) {}

  std::string uri() const override { return target_->uri(); }
  absl::StatusOr<ObjectInfo> Stat(std::string_view key) override;
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override;
  absl::Status Put(std::string_view key, std::string_view data) override;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override;
  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override;
  absl::Status Delete(std::string_view key) override;
  absl::Status DeletePrefix(std::string_view prefix) override;
  bool SupportsRename() const override { return target_->SupportsRename(); }
  absl::Status Rename(std::string_view from, std::string_view to) override;
  bool SupportsCopy() const override { return target_->SupportsCopy(); }
  absl::Status Copy(std::string_view from, std::string_view to) override;

  // The wrapped store (for callers that need its concrete type).
  ObjectStore* target() const { return target_.get(); }

 private:
  const std::unique_ptr<ObjectStore> target_;
  const StoreTraffic::Scheme scheme_;
  StoreTraffic* const traffic_;
};

// OpenObjectStore(uri[, s3]), counted in GlobalStoreTraffic(). The opener of the
// coordinator's and the worker's stores; same errors as OpenObjectStore.
absl::StatusOr<std::unique_ptr<ObjectStore>> OpenCountedObjectStore(std::string_view uri);
absl::StatusOr<std::unique_ptr<ObjectStore>> OpenCountedObjectStore(std::string_view uri,
                                                                    const S3Options& s3);

}  // namespace qforge

#endif  // QFORGE_COMMON_STORE_TRAFFIC_H_

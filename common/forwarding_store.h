// ForwardingStore: an ObjectStore that forwards every call to another one (leveldb's
// EnvWrapper). Subclass it and override the one call a test wants to break, count or slow
// down; everything else reaches the wrapped store unchanged:
//
//   class FailingReads : public ForwardingStore {
//    public:
//     using ForwardingStore::ForwardingStore;
//     absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
//                            std::string* out) override {
//       return absl::UnavailableError("injected");
//     }
//   };
//
// Ownership: the wrapped store is not owned and must outlive the wrapper.
// Thread-safety: as thread-safe as the wrapped store (and the subclass's overrides).
#ifndef QFORGE_COMMON_FORWARDING_STORE_H_
#define QFORGE_COMMON_FORWARDING_STORE_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/object_store.h"

namespace qforge {

class ForwardingStore : public ObjectStore {
 public:
  explicit ForwardingStore(ObjectStore* target) : target_(target) {}

  // The wrapped store.
  ObjectStore* target() const { return target_; }

  std::string uri() const override { return target_->uri(); }
  absl::StatusOr<ObjectInfo> Stat(std::string_view key) override { return target_->Stat(key); }
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override {
    return target_->ReadRange(key, offset, length, out);
  }
  absl::Status Put(std::string_view key, std::string_view data) override {
    return target_->Put(key, data);
  }
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    return target_->NewWriter(key);
  }
  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override {
    return target_->List(prefix);
  }
  absl::Status Delete(std::string_view key) override { return target_->Delete(key); }
  absl::Status DeletePrefix(std::string_view prefix) override {
    return target_->DeletePrefix(prefix);
  }
  bool SupportsRename() const override { return target_->SupportsRename(); }
  absl::Status Rename(std::string_view from, std::string_view to) override {
    return target_->Rename(from, to);
  }
  bool SupportsCopy() const override { return target_->SupportsCopy(); }
  absl::Status Copy(std::string_view from, std::string_view to) override {
    return target_->Copy(from, to);
  }

 private:
  ObjectStore* const target_;
};

}  // namespace qforge

#endif  // QFORGE_COMMON_FORWARDING_STORE_H_

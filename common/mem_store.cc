#include "common/mem_store.h"

#include <functional>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"

namespace qforge {
namespace {

class MemObjectWriter final : public ObjectWriter {
 public:
  using PublishFn = std::function<absl::Status(const std::string&, std::string)>;
  MemObjectWriter(std::string key, PublishFn publish)
      : key_(std::move(key)), publish_(std::move(publish)) {}

  absl::Status Append(std::string_view data) override {
    if (closed_) return Closed("Append to");
    buffer_.append(data);
    return absl::OkStatus();
  }
  absl::Status Close() override {
    if (closed_) return Closed("Close");
    closed_ = true;
    return publish_(key_, std::move(buffer_));
  }
  uint64_t bytes_written() const override { return buffer_.size(); }

 private:
  absl::Status Closed(std::string_view op) const {
    return absl::FailedPreconditionError(Cat(op, " writer of object '", key_, "' after Close()"));
  }
  const std::string key_;
  const PublishFn publish_;
  std::string buffer_;
  bool closed_ = false;
};

}  // namespace

absl::StatusOr<ObjectInfo> MemStore::Stat(std::string_view key) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = objects_.find(key);
  if (it == objects_.end()) {
    return absl::NotFoundError(Cat("no object '", key, "' in ", uri()));
  }
  return ObjectInfo{it->first, it->second.size()};
}

absl::Status MemStore::ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                                 std::string* out) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = objects_.find(key);
  if (it == objects_.end()) {
    return absl::NotFoundError(Cat("no object '", key, "' in ", uri()));
  }
  const uint64_t size = it->second.size();
  if (offset > size || length > size - offset) {
    return absl::OutOfRangeError(Cat("read of bytes [", offset, ", ", offset + length,
                                     ") of object '", key, "' in ", uri(), " is past its end (",
                                     size, " bytes)"));
  }
  out->assign(it->second, static_cast<size_t>(offset), static_cast<size_t>(length));
  return absl::OkStatus();
}

absl::Status MemStore::Publish(const std::string& key, std::string data) {
  std::lock_guard<std::mutex> lock(mu_);
  QF_RETURN_IF_ERROR(CheckCollisionLocked(key));
  objects_[key] = std::move(data);
  return absl::OkStatus();
}

absl::Status MemStore::Rename(std::string_view from, std::string_view to) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(from));
  QF_RETURN_IF_ERROR(ValidateObjectKey(to));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = objects_.find(from);
  if (it == objects_.end()) {
    return absl::NotFoundError(Cat("cannot rename object '", from, "' in ", uri(),
                                   ": no such object"));
  }
  if (from == to) return absl::OkStatus();
  std::string data = std::move(it->second);
  objects_.erase(it);
  const std::string target(to);
  if (absl::Status s = CheckCollisionLocked(target); !s.ok()) {
    objects_.emplace(std::string(from), std::move(data));  // put it back: nothing changed
    return s;
  }
  objects_[target] = std::move(data);
  return absl::OkStatus();
}

absl::Status MemStore::CheckCollisionLocked(const std::string& key) const {
  // A parent "directory" that is an object?
  for (size_t slash = key.find('/'); slash != std::string::npos; slash = key.find('/', slash + 1)) {
    const std::string_view parent(key.data(), slash);
    if (objects_.count(parent) != 0) {
      return absl::FailedPreconditionError(Cat("cannot create object '", key, "' in ", uri(), ": '",
                                               parent, "' exists and is not a directory"));
    }
  }
  // Objects below `key/`?
  const std::string dir = key + "/";
  auto below = objects_.lower_bound(dir);
  if (below != objects_.end() && StartsWith(below->first, dir)) {
    return absl::FailedPreconditionError(Cat("cannot create object '", key, "' in ", uri(),
                                             ": it is a directory (holds '", below->first, "')"));
  }
  return absl::OkStatus();
}

absl::Status MemStore::Put(std::string_view key, std::string_view data) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  return Publish(std::string(key), std::string(data));
}

absl::StatusOr<std::unique_ptr<ObjectWriter>> MemStore::NewWriter(std::string_view key) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  return std::unique_ptr<ObjectWriter>(new MemObjectWriter(
      std::string(key),
      [this](const std::string& k, std::string data) { return Publish(k, std::move(data)); }));
}

absl::StatusOr<std::vector<ObjectInfo>> MemStore::List(std::string_view prefix) {
  std::vector<ObjectInfo> out;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = objects_.lower_bound(prefix);
       it != objects_.end() && StartsWith(it->first, prefix); ++it) {
    out.push_back(ObjectInfo{it->first, it->second.size()});
  }
  return out;
}

absl::Status MemStore::Delete(std::string_view key) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = objects_.find(key);
  if (it != objects_.end()) objects_.erase(it);
  return absl::OkStatus();
}

absl::Status MemStore::DeletePrefix(std::string_view prefix) {
  if (prefix.empty()) {
    return absl::InvalidArgumentError(Cat("DeletePrefix on ", uri(),
                                          ": the prefix is empty (it would delete every object)"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = objects_.lower_bound(prefix);
       it != objects_.end() && it->first.compare(0, prefix.size(), prefix) == 0;) {
    it = objects_.erase(it);
  }
  return absl::OkStatus();
}

size_t MemStore::object_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return objects_.size();
}

uint64_t MemStore::total_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t total = 0;
  for (const auto& [key, data] : objects_) total += data.size();
  return total;
}

}  // namespace qforge

#include "common/store_traffic.h"

#include <utility>
#include <vector>

namespace qforge {

const char* StoreTraffic::SchemeName(Scheme s) {
  return s == Scheme::kS3 ? "s3" : "file";
}

const char* StoreTraffic::OpName(Op op) {
  switch (op) {
    case Op::kStat: return "stat";
    case Op::kRead: return "read";
    case Op::kPut: return "put";
    case Op::kWrite: return "write";
    case Op::kList: return "list";
    case Op::kDelete: return "delete";
    case Op::kDeletePrefix: return "delete_prefix";
    case Op::kRename: return "rename";
    case Op::kCopy: return "copy";
  }
  return "unknown";
}

StoreTraffic::Scheme StoreTraffic::SchemeOf(std::string_view uri) {
  return uri.substr(0, 5) == "s3://" ? Scheme::kS3 : Scheme::kFile;
}

bool StoreTraffic::StoreFailure(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kUnimplemented:
    case absl::StatusCode::kCancelled:
      return false;
    default:
      return true;
  }
}

void StoreTraffic::AddCall(Scheme s, Op op, const absl::Status& status) {
  PerScheme& p = At(s);
  p.ops[Index(op)].fetch_add(1, kRelaxed);
  if (StoreFailure(status.code())) p.errors[Index(op)].fetch_add(1, kRelaxed);
}

StoreTraffic& GlobalStoreTraffic() {
  static StoreTraffic* traffic = new StoreTraffic();  // never destroyed: used until exit
  return *traffic;
}

namespace {

using Op = StoreTraffic::Op;

// Counts the bytes a writer accepts; the whole writer is one "write" operation, recorded
// when it is closed (or abandoned: then as a failure only if an Append failed).
class CountingWriter final : public ObjectWriter {
 public:
  CountingWriter(std::unique_ptr<ObjectWriter> target, StoreTraffic::Scheme scheme,
                 StoreTraffic* traffic)
      : target_(std::move(target)), scheme_(scheme), traffic_(traffic) {}
  ~CountingWriter() override {
    if (!recorded_) traffic_->AddCall(scheme_, Op::kWrite, first_error_);
  }

  absl::Status Append(std::string_view data) override {
    absl::Status s = target_->Append(data);
    if (s.ok()) {
      traffic_->AddWritten(scheme_, data.size());
    } else if (first_error_.ok()) {
      first_error_ = s;
    }
    return s;
  }
  absl::Status Close() override {
    absl::Status s = target_->Close();
    if (!recorded_) {
      traffic_->AddCall(scheme_, Op::kWrite, first_error_.ok() ? s : first_error_);
      recorded_ = true;
    }
    return s;
  }
  uint64_t bytes_written() const override { return target_->bytes_written(); }

 private:
  const std::unique_ptr<ObjectWriter> target_;
  const StoreTraffic::Scheme scheme_;
  StoreTraffic* const traffic_;
  absl::Status first_error_;
  bool recorded_ = false;
};

}  // namespace

absl::StatusOr<ObjectInfo> CountingStore::Stat(std::string_view key) {
  absl::StatusOr<ObjectInfo> r = target_->Stat(key);
  traffic_->AddCall(scheme_, Op::kStat, r.status());
  return r;
}

absl::Status CountingStore::ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                                      std::string* out) {
  absl::Status s = target_->ReadRange(key, offset, length, out);
  traffic_->AddCall(scheme_, Op::kRead, s);
  if (s.ok()) traffic_->AddRead(scheme_, out->size());
  return s;
}

absl::Status CountingStore::Put(std::string_view key, std::string_view data) {
  absl::Status s = target_->Put(key, data);
  traffic_->AddCall(scheme_, Op::kPut, s);
  if (s.ok()) traffic_->AddWritten(scheme_, data.size());
  return s;
}

absl::StatusOr<std::unique_ptr<ObjectWriter>> CountingStore::NewWriter(std::string_view key) {
  absl::StatusOr<std::unique_ptr<ObjectWriter>> w = target_->NewWriter(key);
  if (!w.ok()) {
    traffic_->AddCall(scheme_, Op::kWrite, w.status());
    return w.status();
  }
  return std::unique_ptr<ObjectWriter>(
      std::make_unique<CountingWriter>(*std::move(w), scheme_, traffic_));
}

absl::StatusOr<std::vector<ObjectInfo>> CountingStore::List(std::string_view prefix) {
  absl::StatusOr<std::vector<ObjectInfo>> r = target_->List(prefix);
  traffic_->AddCall(scheme_, Op::kList, r.status());
  return r;
}

absl::Status CountingStore::Delete(std::string_view key) {
  absl::Status s = target_->Delete(key);
  traffic_->AddCall(scheme_, Op::kDelete, s);
  return s;
}

absl::Status CountingStore::DeletePrefix(std::string_view prefix) {
  absl::Status s = target_->DeletePrefix(prefix);
  traffic_->AddCall(scheme_, Op::kDeletePrefix, s);
  return s;
}

absl::Status CountingStore::Rename(std::string_view from, std::string_view to) {
  absl::Status s = target_->Rename(from, to);
  traffic_->AddCall(scheme_, Op::kRename, s);
  return s;
}

absl::Status CountingStore::Copy(std::string_view from, std::string_view to) {
  absl::Status s = target_->Copy(from, to);
  traffic_->AddCall(scheme_, Op::kCopy, s);
  return s;
}

namespace {

absl::StatusOr<std::unique_ptr<ObjectStore>> Counted(
    std::string_view uri, absl::StatusOr<std::unique_ptr<ObjectStore>> store) {
  if (!store.ok()) return store.status();
  return std::unique_ptr<ObjectStore>(std::make_unique<CountingStore>(
      *std::move(store), StoreTraffic::SchemeOf(uri), &GlobalStoreTraffic()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<ObjectStore>> OpenCountedObjectStore(std::string_view uri) {
  return Counted(uri, OpenObjectStore(uri));
}

absl::StatusOr<std::unique_ptr<ObjectStore>> OpenCountedObjectStore(std::string_view uri,
                                                                    const S3Options& s3) {
  return Counted(uri, OpenObjectStore(uri, s3));
}

}  // namespace qforge

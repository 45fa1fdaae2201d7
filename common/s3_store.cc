#include "common/s3_store.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"

namespace qforge {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool PercentDecode(std::string_view in, std::string* out) {
  out->clear();
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out->push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) return false;
    const int hi = HexValue(in[i + 1]), lo = HexValue(in[i + 2]);
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return true;
}

// A streaming multipart writer holding at most one part (see s3_store.h).
class S3Writer final : public ObjectWriter {
 public:
  S3Writer(S3Client* client, std::string key) : client_(client), key_(std::move(key)) {
    part_size_ = std::max<uint64_t>(1, client_->options().part_size);
  }
  ~S3Writer() override { Abort(); }

  absl::Status Append(std::string_view data) override {
    if (closed_) return absl::FailedPreconditionError(Cat(client_->Describe(key_), ": writer is closed"));
    if (!error_.ok()) return error_;
    while (!data.empty()) {
      if (buffer_.capacity() < part_size_) buffer_.reserve(part_size_);
      const size_t take = std::min<size_t>(data.size(), part_size_ - buffer_.size());
      buffer_.append(data.data(), take);
      data.remove_prefix(take);
      written_ += take;
      if (buffer_.size() == part_size_) {
        absl::Status s = FlushPart();
        if (!s.ok()) return Fail(s);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Close() override {
    if (closed_) return absl::FailedPreconditionError(Cat(client_->Describe(key_), ": writer is closed"));
    closed_ = true;
    if (!error_.ok()) return error_;
    absl::Status s;
    if (upload_id_.empty()) {
      s = client_->Put(key_, buffer_);
    } else {
      if (!buffer_.empty()) s = FlushPart();
      if (s.ok()) s = client_->CompleteMultipartUpload(key_, upload_id_, etags_);
      if (s.ok()) upload_id_.clear();
    }
    std::string().swap(buffer_);
    if (!s.ok()) return Fail(s);
    return absl::OkStatus();
  }

  uint64_t bytes_written() const override { return written_; }

 private:
  absl::Status FlushPart() {
    if (upload_id_.empty()) {
      QF_ASSIGN_OR_RETURN(upload_id_, client_->CreateMultipartUpload(key_));
    }
    if (etags_.size() >= 10000) {
      return absl::InvalidArgumentError(Cat(client_->Describe(key_),
                                            ": more than 10,000 parts; raise the part size"));
    }
    QF_ASSIGN_OR_RETURN(std::string etag,
                        client_->UploadPart(key_, upload_id_, static_cast<int>(etags_.size()) + 1,
                                            buffer_));
    etags_.push_back(std::move(etag));
    buffer_.clear();  // keeps its capacity: the next part reuses it
    return absl::OkStatus();
  }

  absl::Status Fail(absl::Status s) {
    error_ = s;
    Abort();
    std::string().swap(buffer_);
    return s;
  }

  void Abort() {
    if (upload_id_.empty()) return;
    (void)client_->AbortMultipartUpload(key_, upload_id_);
    upload_id_.clear();
  }

  S3Client* const client_;
  const std::string key_;
  uint64_t part_size_;
  std::string buffer_;
  std::string upload_id_;
  std::vector<std::string> etags_;
  uint64_t written_ = 0;
  bool closed_ = false;
  absl::Status error_;
};

}  // namespace

absl::StatusOr<S3Uri> ParseS3Uri(std::string_view uri) {
  auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(
        Cat("malformed S3 URI '", uri, "': ", why,
            " (expected s3://bucket[/prefix][?endpoint=http://host:port&region=name])"));
  };
  if (!StartsWith(uri, "s3://")) return bad("it does not begin with s3://");
  std::string_view rest = uri.substr(5);
  std::string_view query;
  if (const size_t q = rest.find('?'); q != std::string_view::npos) {
    query = rest.substr(q + 1);
    rest = rest.substr(0, q);
  }
  if (rest.find('#') != std::string_view::npos) return bad("a fragment ('#') is not allowed");
  S3Uri out;
  const size_t slash = rest.find('/');
  out.bucket = std::string(rest.substr(0, slash));
  if (out.bucket.empty()) return bad("the bucket is empty");
  std::string_view prefix = slash == std::string_view::npos ? "" : rest.substr(slash + 1);
  while (!prefix.empty() && prefix.back() == '/') prefix.remove_suffix(1);
  if (!prefix.empty()) {
    absl::Status s = ValidateObjectKey(prefix);
    if (!s.ok()) return bad(Cat("the prefix is not a valid key: ", s.message()));
  }
  out.prefix = std::string(prefix);
  while (!query.empty()) {
    const size_t amp = query.find('&');
    const std::string_view param = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (param.empty()) continue;
    const size_t eq = param.find('=');
    const std::string_view name = param.substr(0, eq);
    std::string value;
    if (eq == std::string_view::npos || !PercentDecode(param.substr(eq + 1), &value)) {
      return bad(Cat("parameter '", param, "' is not name=value"));
    }
    if (name == "endpoint") {
      out.endpoint = value;
    } else if (name == "region") {
      out.region = value;
    } else {
      return bad(Cat("unknown parameter '", name, "' (known: endpoint, region)"));
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<S3Store>> S3Store::Open(std::string_view uri, S3Options base) {
  QF_ASSIGN_OR_RETURN(S3Uri parsed, ParseS3Uri(uri));
  if (!parsed.endpoint.empty()) base.endpoint = parsed.endpoint;
  if (!parsed.region.empty()) base.region = parsed.region;
  auto client = S3Client::Create(parsed.bucket, std::move(base));
  if (!client.ok()) {
    return absl::InvalidArgumentError(Cat("S3 URI '", uri, "': ", client.status().message()));
  }
  std::string shown(uri);
  return std::unique_ptr<S3Store>(
      new S3Store(std::move(shown), std::move(parsed.prefix), *std::move(client)));
}

std::string S3Store::FullKey(std::string_view key) const { return JoinKey(prefix_, key); }

absl::StatusOr<ObjectInfo> S3Store::Stat(std::string_view key) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  std::string etag;
  QF_ASSIGN_OR_RETURN(uint64_t size, client_->Head(FullKey(key), &etag));
  return ObjectInfo{std::string(key), size, etag.empty() ? std::string() : "etag:" + etag};
}

absl::Status S3Store::ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                                std::string* out) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  return client_->GetRange(FullKey(key), offset, length, out);
}

absl::Status S3Store::Put(std::string_view key, std::string_view data) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  return client_->Put(FullKey(key), data);
}

absl::StatusOr<std::unique_ptr<ObjectWriter>> S3Store::NewWriter(std::string_view key) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  return std::unique_ptr<ObjectWriter>(new S3Writer(client_.get(), FullKey(key)));
}

absl::StatusOr<std::vector<ObjectInfo>> S3Store::List(std::string_view prefix) {
  const std::string root = prefix_.empty() ? std::string() : prefix_ + "/";
  const std::string full = root + std::string(prefix);
  std::vector<ObjectInfo> out;
  std::string token;
  do {
    QF_ASSIGN_OR_RETURN(S3ListPage page, client_->ListPage(full, token, list_page_size_));
    for (S3Object& o : page.objects) {
      if (o.key.size() < root.size() || o.key.compare(0, root.size(), root) != 0) continue;
      out.push_back({o.key.substr(root.size()), o.size});
    }
    if (!page.next_token.empty() && page.next_token == token) {
      return absl::InternalError(Cat("S3 list of ", client_->Describe(full),
                                     ": the continuation token repeats"));
    }
    token = std::move(page.next_token);
  } while (!token.empty());
  std::sort(out.begin(), out.end(),
            [](const ObjectInfo& a, const ObjectInfo& b) { return a.key < b.key; });
  return out;
}

absl::Status S3Store::Delete(std::string_view key) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(key));
  return client_->Delete(FullKey(key));
}

absl::Status S3Store::Copy(std::string_view from, std::string_view to) {
  QF_RETURN_IF_ERROR(ValidateObjectKey(from));
  QF_RETURN_IF_ERROR(ValidateObjectKey(to));
  QF_ASSIGN_OR_RETURN(uint64_t size, client_->Head(FullKey(from)));
  if (size <= client_->options().max_single_copy_bytes) {
    return client_->CopyObject(FullKey(from), FullKey(to));
  }
  QF_ASSIGN_OR_RETURN(std::unique_ptr<ObjectWriter> writer, NewWriter(to));
  const uint64_t chunk = std::max<uint64_t>(client_->options().part_size, 1);
  std::string buffer;
  for (uint64_t offset = 0; offset < size; offset += chunk) {
    QF_RETURN_IF_ERROR(
        client_->GetRange(FullKey(from), offset, std::min(chunk, size - offset), &buffer));
    QF_RETURN_IF_ERROR(writer->Append(buffer));
  }
  return writer->Close();  // a failure before here drops the writer: its upload is aborted
}

absl::Status S3Store::DeletePrefix(std::string_view prefix) {
  if (prefix.empty()) {
    return absl::InvalidArgumentError(
        Cat("DeletePrefix on ", uri_, ": an empty prefix would empty the store"));
  }
  QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> objects, List(prefix));
  for (const ObjectInfo& o : objects) QF_RETURN_IF_ERROR(client_->Delete(FullKey(o.key)));
  QF_ASSIGN_OR_RETURN(std::vector<S3Upload> uploads,
                      client_->ListMultipartUploads(FullKey(prefix)));
  for (const S3Upload& u : uploads) {
    QF_RETURN_IF_ERROR(client_->AbortMultipartUpload(u.key, u.upload_id));
  }
  return absl::OkStatus();
}

}  // namespace qforge

// S3Store: the ObjectStore of `s3://bucket/prefix` URIs, over S3Client (s3_client.h).
//
// URI: `s3://bucket[/prefix][?endpoint=http://host:port&region=us-east-1]`. The endpoint and
// region in the URI override the environment (S3OptionsFromEnv: AWS_ENDPOINT_URL,
// AWS_REGION, ...); credentials come only from the environment (AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), never from a URI, since URIs are stored in job
// specs and manifests.
//
// Keys map to `<prefix>/<key>` in the bucket. Put is one PUT (atomic in S3). NewWriter
// streams: bytes collect in one buffer of `part_size`; the first full buffer starts a
// multipart upload and each full buffer is uploaded as a part and reused, so a writer holds
// at most one part in memory whatever the object's size; Close() uploads the rest and
// completes the upload (a small object is one PUT). A writer destroyed or failed before
// Close() aborts its upload, so nothing partial becomes visible. DeletePrefix also aborts the
// in-progress multipart uploads under the prefix (the leftovers of killed writers).
//
// Errors: ObjectStore's codes, plus PERMISSION_DENIED (access denied) and UNAUTHENTICATED
// (bad or missing credentials); NOT_FOUND names a missing bucket or key (s3_client.h).
// Thread-safety: all methods may be called concurrently; one writer is used by one thread.
#ifndef QFORGE_COMMON_S3_STORE_H_
#define QFORGE_COMMON_S3_STORE_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/object_store.h"
#include "common/s3_client.h"

namespace qforge {

// The parts of an `s3://` URI.
struct S3Uri {
  std::string bucket;
  std::string prefix;    // no leading or trailing '/'; may be empty
  std::string endpoint;  // from ?endpoint=, "" when absent
  std::string region;    // from ?region=, "" when absent
};

// INVALID_ARGUMENT naming the URI for anything but `s3://bucket[/prefix][?endpoint=..&region=..]`
// (an unknown query parameter, an empty bucket, a prefix with an empty or '.'/'..' segment).
absl::StatusOr<S3Uri> ParseS3Uri(std::string_view uri);

class S3Store final : public ObjectStore {
 public:
  // Opens `uri` with `base` options completed from the environment and the URI. Does no I/O
  // (a missing bucket shows at the first call, naming the bucket).
  static absl::StatusOr<std::unique_ptr<S3Store>> Open(std::string_view uri,
                                                       S3Options base = S3OptionsFromEnv());

  std::string uri() const override { return uri_; }
  absl::StatusOr<ObjectInfo> Stat(std::string_view key) override;
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override;
  absl::Status Put(std::string_view key, std::string_view data) override;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override;
  absl::StatusOr<std::vector<ObjectInfo>> List(std::string_view prefix) override;
  absl::Status Delete(std::string_view key) override;
  absl::Status DeletePrefix(std::string_view prefix) override;
  // Server-side CopyObject up to S3Options::max_single_copy_bytes (5 GiB, S3's limit); a
  // larger object is streamed through a writer (ranged reads of one part each), so memory
  // stays at two parts.
  bool SupportsCopy() const override { return true; }
  absl::Status Copy(std::string_view from, std::string_view to) override;

  S3Client* client() const { return client_.get(); }
  // Keys per ListObjectsV2 page (1..1000; tests make it small to exercise continuation).
  void set_list_page_size(int n) { list_page_size_ = n; }

 private:
  S3Store(std::string uri, std::string prefix, std::unique_ptr<S3Client> client)
      : uri_(std::move(uri)), prefix_(std::move(prefix)), client_(std::move(client)) {}
  std::string FullKey(std::string_view key) const;

  const std::string uri_;
  const std::string prefix_;  // "" or "a/b"
  std::unique_ptr<S3Client> client_;
  int list_page_size_ = 1000;
};

}  // namespace qforge

#endif  // QFORGE_COMMON_S3_STORE_H_

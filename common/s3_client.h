// S3Client: signed S3 REST requests over libcurl (CURLOPT_AWS_SIGV4: curl signs, we do not),
// with retries, and the XML of S3's answers parsed with expat. It speaks to one bucket; the
// ObjectStore on top of it is S3Store (s3_store.h).
//
// Addressing: path-style (`<endpoint>/<bucket>/<key>`) for a custom endpoint (MinIO, Ceph,
// moto), virtual-hosted (`https://<bucket>.s3.<region>.amazonaws.com/<key>`) for AWS.
// Keys are percent-encoded here (RFC 3986 unreserved characters and '/' stay as they are), and
// query parameters are sorted and encoded, because curl 7.88 signs path and query as written.
//
// Retries: transport errors (connect, timeouts, resets), HTTP 5xx (503 SlowDown included),
// 429 and S3's 400 RequestTimeout are retried up to `max_attempts` with exponential backoff
// and full jitter (one line on stderr per retry); any other 4xx is final at once.
//
// Errors (absl codes): NOT_FOUND (NoSuchKey, NoSuchBucket, NoSuchUpload), PERMISSION_DENIED
// (AccessDenied), UNAUTHENTICATED (InvalidAccessKeyId, SignatureDoesNotMatch, expired token,
// missing credentials), OUT_OF_RANGE (416), UNAVAILABLE (retries exhausted), INVALID_ARGUMENT
// or FAILED_PRECONDITION (other 4xx), INTERNAL (unparseable answers). Every message names
// `s3://bucket/key` (or the bucket), the S3 error code and message, and what to check.
//
// Thread-safety: all methods may be called concurrently (curl handles are pooled).
#ifndef QFORGE_COMMON_S3_CLIENT_H_
#define QFORGE_COMMON_S3_CLIENT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qforge {

// Where and as whom to talk to S3. Defaults come from the environment (S3OptionsFromEnv); a
// store URI's `?endpoint=`/`?region=` override them.
struct S3Options {
  // "http://host:port" or "https://host" of an S3-compatible service (path-style addressing);
  // empty: AWS (`https://s3.<region>.amazonaws.com`, virtual-hosted addressing).
  std::string endpoint;
  std::string region = "us-east-1";
  // Static credentials; all empty means "none" (every request then fails UNAUTHENTICATED
  // with a message saying which variables to set, unless `anonymous`).
  std::string access_key_id, secret_access_key, session_token;
  bool anonymous = false;  // unsigned requests (public buckets)
  // Attempts per request (1 = no retry) and the backoff bounds between them.
  int max_attempts = 6;
  int64_t initial_backoff_ms = 200;
  int64_t max_backoff_ms = 10'000;
  int64_t connect_timeout_ms = 10'000;
  // A transfer slower than 1 KiB/s for this long is aborted (and retried).
  int64_t low_speed_timeout_ms = 60'000;
  // The same for requests the server works on before it answers (CompleteMultipartUpload,
  // CopyObject): AWS keeps them alive with whitespace, other stores (moto, some gateways)
  // send nothing until done, which takes minutes for objects of several GiB.
  int64_t server_side_timeout_ms = 30 * 60'000;
  // Multipart: the part size of streaming writers (S3 requires >= 5 MiB except for the last
  // part; at most 10,000 parts, so 16 MiB parts allow 156 GiB objects).
  uint64_t part_size = 16ull << 20;
  // Copies (S3Store::Copy): objects up to this size are one server-side CopyObject (S3's
  // limit is 5 GiB); larger ones are streamed through this process (ranged GETs of part_size
  // into a multipart upload; S3Client::CopyObject says why not UploadPartCopy).
  uint64_t max_single_copy_bytes = 5ull << 30;
};

// Reads AWS_ENDPOINT_URL (then AWS_ENDPOINT_URL_S3), AWS_REGION (then AWS_DEFAULT_REGION),
// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; fields whose variable is unset
// keep `base`'s value.
S3Options S3OptionsFromEnv(S3Options base = {});

// One entry of ListObjectsV2.
struct S3Object {
  std::string key;
  uint64_t size = 0;
};

struct S3ListPage {
  std::vector<S3Object> objects;
  std::string next_token;  // empty on the last page
};

struct S3Upload {
  std::string key, upload_id;
};

// The ETag S3 gives an object completed from parts with these ETags (quoted or not): the
// hex MD5 of the parts' binary MD5s, "-", the part count, quoted ("\"<32 hex>-3\"").
// "" when a part's ETag is not a hex MD5 (e.g. SSE-KMS objects).
std::string MultipartETag(const std::vector<std::string>& part_etags);

class S3Client {
 public:
  // INVALID_ARGUMENT for a malformed bucket name or endpoint.
  static absl::StatusOr<std::unique_ptr<S3Client>> Create(std::string bucket, S3Options options);
  ~S3Client();
  S3Client(const S3Client&) = delete;
  S3Client& operator=(const S3Client&) = delete;

  const std::string& bucket() const { return bucket_; }
  const S3Options& options() const { return options_; }

  // Creates the bucket (tests, setup scripts); FAILED_PRECONDITION if it exists already
  // and is someone else's.
  absl::Status CreateBucket();

  // HEAD: the object's size (and its ETag into *etag when given; "" when the answer has
  // none). NOT_FOUND names whether the key or the bucket is missing.
  absl::StatusOr<uint64_t> Head(std::string_view key, std::string* etag = nullptr);
  // GET of bytes [offset, offset + length) into *out (replaced). OUT_OF_RANGE when the object
  // is shorter than offset + length; `length` 0 reads nothing (after checking the object).
  absl::Status GetRange(std::string_view key, uint64_t offset, uint64_t length, std::string* out);
  // PUT of a whole object.
  absl::Status Put(std::string_view key, std::string_view data);
  // DELETE; a missing key is OK (S3 answers 204 either way).
  absl::Status Delete(std::string_view key);
  // One page of ListObjectsV2 under `prefix` (`max_keys` 1..1000), from `token` ("" first).
  absl::StatusOr<S3ListPage> ListPage(std::string_view prefix, std::string_view token,
                                      int max_keys = 1000);

  // Multipart upload.
  absl::StatusOr<std::string> CreateMultipartUpload(std::string_view key);
  // Returns the part's ETag. part_number 1..10000.
  absl::StatusOr<std::string> UploadPart(std::string_view key, std::string_view upload_id,
                                         int part_number, std::string_view data);
  // Idempotent: a retry (or a repeated call) that finds the upload gone succeeds when the
  // object exists with MultipartETag(etags), i.e. an earlier attempt completed these parts.
  absl::Status CompleteMultipartUpload(std::string_view key, std::string_view upload_id,
                                       const std::vector<std::string>& etags);
  absl::Status AbortMultipartUpload(std::string_view key, std::string_view upload_id);
  // CopyObject: server-side copy of `from` to `to` in this bucket (S3 allows up to 5 GiB).
  // No UploadPartCopy: its x-amz-copy-source-range header cannot be signed by curl 7.88, which
  // sorts canonical headers as whole "name:value" lines, putting "x-amz-copy-source-range:"
  // before "x-amz-copy-source:" where SigV4 sorts by name (S3 answers SignatureDoesNotMatch).
  absl::Status CopyObject(std::string_view from, std::string_view to);

  // In-progress multipart uploads whose key starts with `prefix` (all pages).
  absl::StatusOr<std::vector<S3Upload>> ListMultipartUploads(std::string_view prefix);

  // "s3://bucket/key" (or "s3://bucket" for an empty key), for messages.
  std::string Describe(std::string_view key) const;

  // Percent-encodes `s` for an S3 path (keep_slash) or a query value.
  static std::string UriEncode(std::string_view s, bool keep_slash);

 private:
  struct Request;
  struct Response {
    long status = 0;
    std::string body;  // unless the request gave its own sink
    std::map<std::string, std::string> headers;  // lower-case names
  };
  S3Client(std::string bucket, S3Options options);

  // Sends with retries. `sink` receives the body of a 2xx answer (else Response::body).
  absl::StatusOr<Response> Send(const Request& request, std::string* sink = nullptr);
  // One attempt. Returns the curl error (CURLE_OK = 0) and fills *response.
  int SendOnce(const Request& request, std::string* sink, Response* response,
               std::string* curl_error);
  // The status of a non-2xx answer: code from S3's XML error (or the HTTP status).
  absl::Status ErrorFor(const Request& request, const Response& response) const;
  std::string UrlFor(std::string_view key, const std::vector<std::pair<std::string, std::string>>&
                                               query) const;

  void* TakeHandle();  // CURL*
  void ReturnHandle(void* handle);

  const std::string bucket_;
  const S3Options options_;
  std::mutex mu_;
  std::vector<void*> handles_;  // idle CURL* handles; guarded by mu_
};

}  // namespace qforge

#endif  // QFORGE_COMMON_S3_CLIENT_H_

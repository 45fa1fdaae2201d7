#include "common/s3_client.h"

#include <curl/curl.h>
#include <expat.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/absl_compat.h"
#include "common/sha256.h"

namespace qforge {
namespace {

constexpr std::string_view kEmptySha256 =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::string(v) : std::string();
}

void GlobalInit() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// Calls `on_end(path, text)` for every element of `xml` when it closes; `path` is the
// '/'-joined element names from the root ("ListBucketResult/Contents/Key"). False when the
// document is not well-formed XML.
bool ParseXml(std::string_view xml,
              const std::function<void(const std::string&, const std::string&)>& on_end) {
  struct State {
    std::vector<std::string> names;
    std::vector<std::string> texts;
    const std::function<void(const std::string&, const std::string&)>* on_end;
  } state{{}, {}, &on_end};
  XML_Parser parser = XML_ParserCreate("UTF-8");
  if (parser == nullptr) return false;
  XML_SetUserData(parser, &state);
  XML_SetElementHandler(
      parser,
      [](void* data, const XML_Char* name, const XML_Char**) {
        auto* s = static_cast<State*>(data);
        s->names.emplace_back(name);
        s->texts.emplace_back();
      },
      [](void* data, const XML_Char*) {
        auto* s = static_cast<State*>(data);
        (*s->on_end)(absl::StrJoin(s->names, "/"), s->texts.back());
        s->names.pop_back();
        s->texts.pop_back();
      });
  XML_SetCharacterDataHandler(parser, [](void* data, const XML_Char* text, int len) {
    auto* s = static_cast<State*>(data);
    if (!s->texts.empty()) s->texts.back().append(text, static_cast<size_t>(len));
  });
  const bool ok = XML_Parse(parser, xml.data(), static_cast<int>(xml.size()), 1) == XML_STATUS_OK;
  XML_ParserFree(parser);
  return ok;
}

bool ValidBucketName(std::string_view b) {
  if (b.size() < 3 || b.size() > 63) return false;
  for (char c : b) {
    if (!(std::islower(static_cast<unsigned char>(c)) || std::isdigit(static_cast<unsigned char>(c)) ||
          c == '-' || c == '.' || c == '_')) {
      return false;
    }
  }
  return std::isalnum(static_cast<unsigned char>(b.front())) &&
         std::isalnum(static_cast<unsigned char>(b.back()));
}

size_t WriteToString(char* data, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(data, size * n);
  return size * n;
}

struct HeaderSink {
  std::map<std::string, std::string>* headers;
};

size_t WriteHeader(char* data, size_t size, size_t n, void* user) {
  const std::string_view line(data, size * n);
  const size_t colon = line.find(':');
  if (colon != std::string_view::npos) {
    std::string name = absl::AsciiStrToLower(std::string(line.substr(0, colon)));
    std::string value(absl::StripAsciiWhitespace(Sv(line.substr(colon + 1))));
    (*static_cast<HeaderSink*>(user)->headers)[name] = value;
  }
  return size * n;
}

// Whether a transport error may go away on a retry.
bool RetryableCurl(CURLcode c) {
  switch (c) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return true;
    default:
      return false;
  }
}

// `etag` without the quotes S3 puts around it.
std::string_view Unquoted(std::string_view etag) {
  if (etag.size() >= 2 && etag.front() == '"' && etag.back() == '"') {
    etag = etag.substr(1, etag.size() - 2);
  }
  return etag;
}

}  // namespace

std::string MultipartETag(const std::vector<std::string>& part_etags) {
  if (part_etags.empty()) return "";
  std::string digests;
  for (const std::string& etag : part_etags) {
    const std::string_view hex = Unquoted(etag);
    if (hex.size() != 32) return "";
    for (size_t i = 0; i < 32; i += 2) {
      int byte = 0;
      for (size_t j = i; j < i + 2; ++j) {
        const char c = static_cast<char>(std::tolower(static_cast<unsigned char>(hex[j])));
        if (c >= '0' && c <= '9') byte = byte * 16 + (c - '0');
        else if (c >= 'a' && c <= 'f') byte = byte * 16 + (c - 'a' + 10);
        else return "";
      }
      digests.push_back(static_cast<char>(byte));
    }
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (EVP_Digest(digests.data(), digests.size(), md, &md_len, EVP_md5(), nullptr) != 1) return "";
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  for (unsigned int i = 0; i < md_len; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 15]);
  }
  absl::StrAppend(&out, "-", part_etags.size(), "\"");
  return out;
}

struct S3Client::Request {
  std::string method = "GET";
  std::string key;  // "" for bucket-level requests
  std::vector<std::pair<std::string, std::string>> query;
  std::vector<std::string> headers;  // "Name: value"
  std::string_view body;
  bool has_body = false;
  std::string what;  // "read", "write", ... for messages
  bool server_side = false;  // the server works before answering: server_side_timeout_ms
};

S3Options S3OptionsFromEnv(S3Options base) {
  auto take = [](std::string* field, std::initializer_list<const char*> names) {
    for (const char* name : names) {
      std::string v = Env(name);
      if (!v.empty()) {
        *field = v;
        return;
      }
    }
  };
  take(&base.endpoint, {"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"});
  take(&base.region, {"AWS_REGION", "AWS_DEFAULT_REGION"});
  take(&base.access_key_id, {"AWS_ACCESS_KEY_ID"});
  take(&base.secret_access_key, {"AWS_SECRET_ACCESS_KEY"});
  take(&base.session_token, {"AWS_SESSION_TOKEN"});
  return base;
}

S3Client::S3Client(std::string bucket, S3Options options)
    : bucket_(std::move(bucket)), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<S3Client>> S3Client::Create(std::string bucket,
                                                           S3Options options) {
  if (!ValidBucketName(bucket)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "'", bucket, "' is not a valid S3 bucket name (3-63 characters: lower-case letters, "
                     "digits, '-', '.'; beginning and ending with a letter or digit)"));
  }
  while (!options.endpoint.empty() && options.endpoint.back() == '/') options.endpoint.pop_back();
  if (!options.endpoint.empty() && !StartsWith(options.endpoint, "http://") &&
      !StartsWith(options.endpoint, "https://")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "S3 endpoint '", options.endpoint,
        "' must begin with http:// or https:// (e.g. http://127.0.0.1:9000)"));
  }
  if (options.region.empty()) options.region = "us-east-1";
  for (char c : options.region) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-')) {
      return absl::InvalidArgumentError(
          absl::StrCat("S3 region '", options.region, "' is not a region name (e.g. us-east-1)"));
    }
  }
  if (options.max_attempts < 1) options.max_attempts = 1;
  GlobalInit();
  return std::unique_ptr<S3Client>(new S3Client(std::move(bucket), std::move(options)));
}

S3Client::~S3Client() {
  for (void* h : handles_) curl_easy_cleanup(static_cast<CURL*>(h));
}

void* S3Client::TakeHandle() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!handles_.empty()) {
      void* h = handles_.back();
      handles_.pop_back();
      return h;
    }
  }
  return curl_easy_init();
}

void S3Client::ReturnHandle(void* handle) {
  std::lock_guard<std::mutex> lock(mu_);
  if (handles_.size() < 16) {
    handles_.push_back(handle);
  } else {
    curl_easy_cleanup(static_cast<CURL*>(handle));
  }
}

std::string S3Client::UriEncode(std::string_view s, bool keep_slash) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
      out.push_back(ch);
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

std::string S3Client::Describe(std::string_view key) const {
  return key.empty() ? absl::StrCat("s3://", bucket_) : Cat("s3://", bucket_, "/", key);
}

std::string S3Client::UrlFor(std::string_view key,
                             const std::vector<std::pair<std::string, std::string>>& query) const {
  std::string url;
  if (options_.endpoint.empty()) {
    url = absl::StrCat("https://", bucket_, ".s3.", options_.region, ".amazonaws.com/",
                       UriEncode(key, true));
  } else {
    url = absl::StrCat(options_.endpoint, "/", bucket_);
    if (!key.empty()) absl::StrAppend(&url, "/", UriEncode(key, true));
  }
  // Sorted, and a valueless parameter written "name=": curl signs the query as written.
  std::vector<std::pair<std::string, std::string>> sorted = query;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    absl::StrAppend(&url, i == 0 ? "?" : "&", UriEncode(sorted[i].first, false), "=",
                    UriEncode(sorted[i].second, false));
  }
  return url;
}

int S3Client::SendOnce(const Request& request, std::string* sink, Response* response,
                       std::string* curl_error) {
  CURL* curl = static_cast<CURL*>(TakeHandle());
  if (curl == nullptr) {
    *curl_error = "curl_easy_init failed";
    return CURLE_FAILED_INIT;
  }
  curl_easy_reset(curl);
  char errbuf[CURL_ERROR_SIZE] = {0};
  const std::string url = UrlFor(request.key, request.query);
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(options_.connect_timeout_ms));
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_LIMIT, 1024L);
  const int64_t quiet_ms =
      request.server_side ? options_.server_side_timeout_ms : options_.low_speed_timeout_ms;
  curl_easy_setopt(curl, CURLOPT_LOW_SPEED_TIME, std::max(1L, static_cast<long>(quiet_ms / 1000)));
  curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
  const std::string sigv4 = absl::StrCat("aws:amz:", options_.region, ":s3");
  const std::string userpwd =
      absl::StrCat(options_.access_key_id, ":", options_.secret_access_key);
  if (!options_.anonymous) {
    curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, sigv4.c_str());
    curl_easy_setopt(curl, CURLOPT_USERPWD, userpwd.c_str());
  }
  curl_slist* headers = nullptr;
  for (const std::string& h : request.headers) headers = curl_slist_append(headers, h.c_str());
  const std::string payload_hash =
      request.has_body && !request.body.empty() ? Sha256Hex(request.body) : std::string(kEmptySha256);
  const std::string hash_header = "x-amz-content-sha256: " + payload_hash;
  headers = curl_slist_append(headers, hash_header.c_str());
  const std::string token_header = "x-amz-security-token: " + options_.session_token;
  if (!options_.session_token.empty() && !options_.anonymous) {
    headers = curl_slist_append(headers, token_header.c_str());
  }
  // No "Expect:" header to suppress 100-continue: curl 7.88 signs the empty header it then
  // leaves out, and S3 answers SignatureDoesNotMatch (seen against moto with auth on).
  if (request.method == "HEAD") {
    curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
  } else if (request.method != "GET") {
    curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, request.method.c_str());
  }
  if (request.has_body) {
    // Not copied: the caller's bytes are sent as they are (no second copy of a part).
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
                     static_cast<curl_off_t>(request.body.size()));
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, request.body.data());
  }
  curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
  std::string body;
  HeaderSink header_sink{&response->headers};
  curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, WriteHeader);
  curl_easy_setopt(curl, CURLOPT_HEADERDATA, &header_sink);
  // The body goes to the sink only when the answer is a success: decided on the first byte.
  struct BodyTarget {
    CURL* curl;
    std::string* sink;
    std::string* fallback;
  } target{curl, sink, &body};
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION,
                   +[](char* data, size_t size, size_t n, void* user) -> size_t {
                     auto* t = static_cast<BodyTarget*>(user);
                     long code = 0;
                     curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &code);
                     std::string* out = (t->sink != nullptr && code / 100 == 2) ? t->sink
                                                                                 : t->fallback;
                     return WriteToString(data, size, n, out);
                   });
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &target);
  response->headers.clear();
  if (sink != nullptr) sink->clear();
  const CURLcode rc = curl_easy_perform(curl);
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &response->status);
  response->body = std::move(body);
  curl_slist_free_all(headers);
  if (rc != CURLE_OK) *curl_error = errbuf[0] != '\0' ? errbuf : curl_easy_strerror(rc);
  ReturnHandle(curl);
  return rc;
}

absl::StatusOr<S3Client::Response> S3Client::Send(const Request& request, std::string* sink) {
  if (!options_.anonymous &&
      (options_.access_key_id.empty() || options_.secret_access_key.empty())) {
    return absl::UnauthenticatedError(absl::StrCat(
        "S3 ", request.what, " of ", Describe(request.key),
        ": no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
        "AWS_SESSION_TOKEN for temporary credentials)"));
  }
  thread_local std::mt19937_64 rng(std::random_device{}());
  std::string last_error;
  for (int attempt = 1;; ++attempt) {
    Response response;
    std::string curl_error;
    const int rc = SendOnce(request, sink, &response, &curl_error);
    bool retry = false;
    if (rc != CURLE_OK) {
      last_error = absl::StrCat("transport error: ", curl_error);
      retry = RetryableCurl(static_cast<CURLcode>(rc));
      if (!retry) {
        return absl::UnavailableError(absl::StrCat("S3 ", request.what, " of ",
                                                   Describe(request.key), " failed (",
                                                   last_error, ")"));
      }
    } else if (response.status / 100 == 2) {
      return response;
    } else {
      absl::Status error = ErrorFor(request, response);
      const bool request_timeout =
          response.status == 400 && response.body.find("<Code>RequestTimeout</Code>") !=
                                         std::string::npos;
      retry = response.status >= 500 || response.status == 429 || request_timeout;
      if (!retry) return error;
      last_error = absl::StrCat("HTTP ", response.status);
      ParseXml(response.body, [&](const std::string& path, const std::string& text) {
        if (path == "Error/Code" || path == "Error/Message") absl::StrAppend(&last_error, " ", text);
      });
    }
    if (attempt >= options_.max_attempts) {
      return absl::UnavailableError(absl::StrCat(
          "S3 ", request.what, " of ", Describe(request.key), " failed after ", attempt,
          " attempt(s); last: ", last_error, " (endpoint ",
          options_.endpoint.empty() ? "AWS" : options_.endpoint, ")"));
    }
    // Exponential backoff with full jitter.
    const int64_t cap = std::min<int64_t>(options_.max_backoff_ms,
                                          options_.initial_backoff_ms << std::min(attempt - 1, 20));
    const int64_t sleep_ms =
        cap <= 0 ? 0 : std::uniform_int_distribution<int64_t>(cap / 2, cap)(rng);
    // One line per retry on stderr: an operator sees a flaky or unreachable endpoint.
    std::fprintf(stderr, "qforge: S3 %s of %s: %s; retry %d of %d in %lld ms\n",
                 request.what.c_str(), Describe(request.key).c_str(), last_error.c_str(),
                 attempt, options_.max_attempts - 1, static_cast<long long>(sleep_ms));
    std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
  }
}

absl::Status S3Client::ErrorFor(const Request& request, const Response& response) const {
  std::string code, message;
  ParseXml(response.body, [&](const std::string& path, const std::string& text) {
    if (path == "Error/Code") code = text;
    if (path == "Error/Message") message = text;
  });
  const long status = response.status;
  const std::string where = Describe(request.key);
  const std::string s3 = absl::StrCat("HTTP ", status, code.empty() ? "" : " ", code,
                                      message.empty() ? "" : ": ", message);
  const std::string endpoint = options_.endpoint.empty() ? "AWS S3" : options_.endpoint;
  if (code == "NoSuchBucket" || (request.key.empty() && status == 404)) {
    return absl::NotFoundError(absl::StrCat("S3 bucket '", bucket_, "' does not exist at ",
                                            endpoint, " (", s3, "); create it or fix the URI"));
  }
  if (code == "NoSuchKey" || (status == 404 && code.empty())) {
    return absl::NotFoundError(absl::StrCat(where, ": no such object (", s3, ")"));
  }
  if (code == "NoSuchUpload") {
    return absl::NotFoundError(absl::StrCat(where, ": the multipart upload is gone (", s3, ")"));
  }
  if (code == "InvalidAccessKeyId" || code == "SignatureDoesNotMatch" ||
      code == "ExpiredToken" || code == "InvalidToken" || code == "TokenRefreshRequired" ||
      status == 401) {
    return absl::UnauthenticatedError(absl::StrCat(
        "S3 ", request.what, " of ", where, " refused: bad credentials (", s3,
        "); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and the region (",
        options_.region, ")"));
  }
  if (code == "AccessDenied" || status == 403) {
    return absl::PermissionDeniedError(absl::StrCat(
        "S3 ", request.what, " of ", where, ": access denied (", s3,
        "); the credentials' policy must allow it on bucket '", bucket_, "'"));
  }
  if (status == 416 || code == "InvalidRange") {
    return absl::OutOfRangeError(absl::StrCat(where, ": range outside the object (", s3, ")"));
  }
  if (status >= 500 || status == 429) {
    return absl::UnavailableError(absl::StrCat("S3 ", request.what, " of ", where, ": ", s3));
  }
  if (status == 409 || status == 412) {
    return absl::FailedPreconditionError(absl::StrCat("S3 ", request.what, " of ", where, ": ", s3));
  }
  return absl::InvalidArgumentError(absl::StrCat("S3 ", request.what, " of ", where, ": ", s3));
}

absl::Status S3Client::CreateBucket() {
  Request r;
  r.method = "PUT";
  r.what = "create bucket";
  std::string body;
  if (options_.region != "us-east-1") {
    body = absl::StrCat("<CreateBucketConfiguration><LocationConstraint>", options_.region,
                        "</LocationConstraint></CreateBucketConfiguration>");
    r.headers.push_back("Content-Type: application/xml");
  }
  r.body = body;
  r.has_body = true;
  return Send(r).status();
}

absl::StatusOr<uint64_t> S3Client::Head(std::string_view key, std::string* etag) {
  Request r;
  r.method = "HEAD";
  r.key = std::string(key);
  r.what = "stat";
  auto response = Send(r);
  if (!response.ok()) {
    // A HEAD answer has no body: tell a missing bucket from a missing key with a HEAD of the
    // bucket.
    if (absl::IsNotFound(response.status()) && !key.empty()) {
      Request b;
      b.method = "HEAD";
      b.what = "stat";
      auto bucket = Send(b);
      if (!bucket.ok() && absl::IsNotFound(bucket.status())) return bucket.status();
    }
    return response.status();
  }
  uint64_t size = 0;
  auto it = response->headers.find("content-length");
  if (it == response->headers.end() || !absl::SimpleAtoi(it->second, &size)) {
    return absl::InternalError(
        absl::StrCat("S3 stat of ", Describe(key), ": the answer has no Content-Length"));
  }
  if (etag != nullptr) {
    auto e = response->headers.find("etag");
    *etag = e == response->headers.end() ? std::string() : e->second;
  }
  return size;
}

absl::Status S3Client::GetRange(std::string_view key, uint64_t offset, uint64_t length,
                                std::string* out) {
  out->clear();
  if (length == 0) {
    auto size = Head(key);
    if (!size.ok()) return size.status();
    if (offset > *size) {
      return absl::OutOfRangeError(absl::StrCat(Describe(key), ": offset ", offset,
                                                " is past the end (size ", *size, ")"));
    }
    return absl::OkStatus();
  }
  Request r;
  r.key = std::string(key);
  r.what = "read";
  r.headers.push_back(absl::StrCat("Range: bytes=", offset, "-", offset + length - 1));
  auto response = Send(r, out);
  if (!response.ok()) {
    out->clear();
    if (absl::IsOutOfRange(response.status())) {
      return absl::OutOfRangeError(absl::StrCat("read of ", Describe(key), " bytes [", offset, ", ",
                                                offset + length, ") is past the end of the object"));
    }
    if (absl::IsNotFound(response.status())) {
      // Same distinction as Head.
      Request b;
      b.method = "HEAD";
      b.what = "read";
      auto bucket = Send(b);
      if (!bucket.ok() && absl::IsNotFound(bucket.status())) return bucket.status();
    }
    return response.status();
  }
  if (response->status == 200 && offset == 0 && out->size() > length) {
    out->resize(length);  // a server that ignores Range
  }
  if (out->size() != length) {
    const size_t got = out->size();
    out->clear();
    return absl::OutOfRangeError(absl::StrCat("read of ", Describe(key), " bytes [", offset, ", ",
                                              offset + length, ") is past the end of the object (",
                                              got, " byte(s) returned)"));
  }
  return absl::OkStatus();
}

absl::Status S3Client::Put(std::string_view key, std::string_view data) {
  Request r;
  r.method = "PUT";
  r.key = std::string(key);
  r.what = "write";
  r.body = data;
  r.has_body = true;
  r.headers.push_back("Content-Type: application/octet-stream");
  return Send(r).status();
}

absl::Status S3Client::Delete(std::string_view key) {
  Request r;
  r.method = "DELETE";
  r.key = std::string(key);
  r.what = "delete";
  auto response = Send(r);
  if (!response.ok() && absl::IsNotFound(response.status()) &&
      response.status().message().find("bucket") == std::string_view::npos) {
    return absl::OkStatus();  // some servers answer 404 for a missing key
  }
  return response.status();
}

absl::StatusOr<S3ListPage> S3Client::ListPage(std::string_view prefix, std::string_view token,
                                              int max_keys) {
  Request r;
  r.what = "list";
  r.query = {{"list-type", "2"},
             {"max-keys", std::to_string(std::clamp(max_keys, 1, 1000))},
             {"prefix", std::string(prefix)}};
  if (!token.empty()) r.query.emplace_back("continuation-token", std::string(token));
  auto response = Send(r);
  if (!response.ok()) return response.status();
  S3ListPage page;
  bool truncated = false;
  bool bad_size = false;
  // Elements of an entry may come in any order: an entry is taken when it closes.
  S3Object current;
  const bool ok = ParseXml(response->body, [&](const std::string& path, const std::string& text) {
    if (path == "ListBucketResult/Contents/Key") {
      current.key = text;
    } else if (path == "ListBucketResult/Contents/Size") {
      if (!absl::SimpleAtoi(text, &current.size)) bad_size = true;
    } else if (path == "ListBucketResult/Contents") {
      page.objects.push_back(std::move(current));
      current = S3Object{};
    } else if (path == "ListBucketResult/NextContinuationToken") {
      page.next_token = text;
    } else if (path == "ListBucketResult/IsTruncated") {
      truncated = text == "true";
    }
  });
  if (!ok || bad_size) {
    return absl::InternalError(absl::StrCat("S3 list of ", Describe(std::string(prefix)),
                                            ": the answer is not a ListBucketResult"));
  }
  if (!truncated) page.next_token.clear();
  if (truncated && page.next_token.empty()) {
    return absl::InternalError(absl::StrCat("S3 list of ", Describe(std::string(prefix)),
                                            ": truncated answer without a continuation token"));
  }
  return page;
}

absl::StatusOr<std::string> S3Client::CreateMultipartUpload(std::string_view key) {
  Request r;
  r.method = "POST";
  r.key = std::string(key);
  r.what = "write";
  r.query = {{"uploads", ""}};
  r.has_body = true;  // empty
  r.headers.push_back("Content-Type: application/octet-stream");
  auto response = Send(r);
  if (!response.ok()) return response.status();
  std::string id;
  ParseXml(response->body, [&](const std::string& path, const std::string& text) {
    if (path == "InitiateMultipartUploadResult/UploadId") id = text;
  });
  if (id.empty()) {
    return absl::InternalError(
        absl::StrCat("S3 write of ", Describe(key), ": no UploadId in the answer"));
  }
  return id;
}

absl::StatusOr<std::string> S3Client::UploadPart(std::string_view key, std::string_view upload_id,
                                                 int part_number, std::string_view data) {
  Request r;
  r.method = "PUT";
  r.key = std::string(key);
  r.what = absl::StrCat("write (part ", part_number, ")");
  r.query = {{"partNumber", std::to_string(part_number)}, {"uploadId", std::string(upload_id)}};
  r.body = data;
  r.has_body = true;
  r.headers.push_back("Content-Type: application/octet-stream");
  auto response = Send(r);
  if (!response.ok()) return response.status();
  auto it = response->headers.find("etag");
  if (it == response->headers.end() || it->second.empty()) {
    return absl::InternalError(absl::StrCat("S3 write of ", Describe(key), " part ", part_number,
                                            ": no ETag in the answer"));
  }
  return it->second;
}

absl::Status S3Client::CompleteMultipartUpload(std::string_view key, std::string_view upload_id,
                                               const std::vector<std::string>& etags) {
  std::string xml = "<CompleteMultipartUpload>";
  for (size_t i = 0; i < etags.size(); ++i) {
    std::string etag;
    for (char c : etags[i]) {
      if (c == '&') etag += "&amp;";
      else if (c == '<') etag += "&lt;";
      else if (c == '>') etag += "&gt;";
      else if (c == '"') etag += "&quot;";
      else etag.push_back(c);
    }
    absl::StrAppend(&xml, "<Part><PartNumber>", i + 1, "</PartNumber><ETag>", etag,
                    "</ETag></Part>");
  }
  xml += "</CompleteMultipartUpload>";
  Request r;
  r.method = "POST";
  r.key = std::string(key);
  r.what = "write (complete)";
  r.server_side = true;
  r.query = {{"uploadId", std::string(upload_id)}};
  r.body = xml;
  r.has_body = true;
  r.headers.push_back("Content-Type: application/xml");
  auto response = Send(r);
  if (!response.ok()) {
    // Idempotent: when an earlier attempt completed the upload but its answer was lost (a
    // timeout, a dropped connection, a 5xx from a proxy after the store finished), the
    // retry finds the upload gone. The object is then there with the ETag exactly these
    // parts give, which tells it apart from an upload aborted or completed otherwise.
    if (absl::IsNotFound(response.status())) {
      std::string etag;
      const std::string expected = MultipartETag(etags);
      if (Head(key, &etag).ok() && !expected.empty() && Unquoted(etag) == Unquoted(expected)) {
        return absl::OkStatus();
      }
    }
    return response.status();
  }
  // S3 may answer 200 with an <Error> body.
  if (response->body.find("<Error>") != std::string::npos) {
    Response as_error = *response;
    as_error.status = 500;
    return ErrorFor(r, as_error);
  }
  return absl::OkStatus();
}

absl::Status S3Client::AbortMultipartUpload(std::string_view key, std::string_view upload_id) {
  Request r;
  r.method = "DELETE";
  r.key = std::string(key);
  r.what = "abort";
  r.query = {{"uploadId", std::string(upload_id)}};
  auto response = Send(r);
  if (!response.ok() && absl::IsNotFound(response.status())) return absl::OkStatus();
  return response.status();
}

absl::Status S3Client::CopyObject(std::string_view from, std::string_view to) {
  Request r;
  r.method = "PUT";
  r.key = std::string(to);
  r.what = absl::StrCat("copy (from ", Describe(from), ")");
  r.server_side = true;
  r.headers.push_back(absl::StrCat("x-amz-copy-source: /", bucket_, "/", UriEncode(from, true)));
  auto response = Send(r);
  if (!response.ok()) return response.status();
  // A 200 answer may still carry an <Error> (S3 reports failures found during a copy so).
  if (response->body.find("<Error>") != std::string::npos) {
    Response as_error = *response;
    as_error.status = 500;
    return ErrorFor(r, as_error);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<S3Upload>> S3Client::ListMultipartUploads(std::string_view prefix) {
  std::vector<S3Upload> out;
  std::string key_marker, id_marker;
  for (int page = 0; page < 100000; ++page) {
    Request r;
    r.what = "list uploads";
    r.query = {{"uploads", ""}, {"prefix", std::string(prefix)}};
    if (!key_marker.empty()) {
      r.query.emplace_back("key-marker", key_marker);
      r.query.emplace_back("upload-id-marker", id_marker);
    }
    auto response = Send(r);
    if (!response.ok()) return response.status();
    bool truncated = false;
    std::string next_key, next_id;
    S3Upload current;
    const bool ok = ParseXml(response->body, [&](const std::string& path, const std::string& text) {
      if (path == "ListMultipartUploadsResult/Upload/Key") current.key = text;
      if (path == "ListMultipartUploadsResult/Upload/UploadId") current.upload_id = text;
      if (path == "ListMultipartUploadsResult/Upload") {
        out.push_back(std::move(current));
        current = S3Upload{};
      }
      if (path == "ListMultipartUploadsResult/IsTruncated") truncated = text == "true";
      if (path == "ListMultipartUploadsResult/NextKeyMarker") next_key = text;
      if (path == "ListMultipartUploadsResult/NextUploadIdMarker") next_id = text;
    });
    if (!ok) {
      return absl::InternalError(absl::StrCat("S3 list of uploads under ",
                                              Describe(std::string(prefix)),
                                              ": the answer is not a ListMultipartUploadsResult"));
    }
    if (!truncated || next_key.empty()) break;
    key_marker = next_key;
    id_marker = next_id;
  }
  return out;
}

}  // namespace qforge

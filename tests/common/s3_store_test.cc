// S3Store and S3Client against a real S3 endpoint on loopback: moto_server, started by the
// fixture on a free port (the suite skips, saying so, when moto_server is not on PATH).
// Every operation: put/get/stat/delete (with keys that need encoding), ranged reads and their
// bounds, ListObjectsV2 continuation with tiny pages, the streaming multipart writer (small
// parts: nothing visible before Close, aborted when dropped), DeletePrefix aborting in-flight
// uploads, the errors for a missing bucket, a missing key, bad and missing credentials, an
// unreachable endpoint after its retries, and the s3:// URI parsing and dispatch. A scripted
// HTTP endpoint checks the retry policy: 503 SlowDown and 500 retried, 4xx never.
#include "common/s3_store.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "common/object_store.h"
#include "common/s3_settings.h"
#include "common/uri.h"
#include "gtest/gtest.h"
#include "tests/integration/moto.h"

namespace qforge {
namespace {

using namespace std::chrono_literals;

using ::qforge::testing::FreeLoopbackPort;
using ::qforge::testing::OnPath;

// moto_server with small multipart parts allowed (1 KiB parts in these tests).
class Moto : public ::qforge::testing::MotoServer {
 public:
  explicit Moto(std::vector<std::string> env = {})
      : MotoServer(WithSmallParts(std::move(env))) {}

 private:
  static std::vector<std::string> WithSmallParts(std::vector<std::string> env) {
    env.push_back("S3_UPLOAD_PART_MIN_SIZE=1024");
    return env;
  }
};

S3Options TestOptions(const std::string& endpoint) {
  S3Options o;
  o.endpoint = endpoint;
  o.region = "us-east-1";
  o.access_key_id = "testing";
  o.secret_access_key = "testing";
  o.max_attempts = 3;
  o.initial_backoff_ms = 10;
  o.max_backoff_ms = 50;
  o.part_size = 1024;
  return o;
}

class S3StoreTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!OnPath("moto_server")) return;
    moto_ = new Moto();
  }
  static void TearDownTestSuite() {
    delete moto_;
    moto_ = nullptr;
  }

  void SetUp() override {
    if (moto_ == nullptr) GTEST_SKIP() << "moto_server is not on PATH; S3 tests skipped";
    ASSERT_TRUE(moto_->ready()) << "moto_server did not start:\n" << moto_->log();
    bucket_ = "qforge-test-" + std::to_string(++bucket_counter_);
    auto client = S3Client::Create(bucket_, TestOptions(moto_->endpoint()));
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE((*client)->CreateBucket().ok());
    store_ = Open("s3://" + bucket_ + "/models/run1");
    ASSERT_NE(store_, nullptr);
  }

  std::unique_ptr<S3Store> Open(const std::string& uri, S3Options options = {}) {
    if (options.endpoint.empty()) options = TestOptions(moto_->endpoint());
    auto s = S3Store::Open(uri, options);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }

  static Moto* moto_;
  static int bucket_counter_;
  std::string bucket_;
  std::unique_ptr<S3Store> store_;
};

Moto* S3StoreTest::moto_ = nullptr;
int S3StoreTest::bucket_counter_ = 0;

std::string Bytes(size_t n, uint32_t seed) {
  std::string s(n, '\0');
  uint32_t x = seed;
  for (size_t i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    s[i] = static_cast<char>(x >> 24);
  }
  return s;
}

TEST_F(S3StoreTest, PutStatReadDeleteWithKeysThatNeedEncoding) {
  const std::string data = Bytes(3000, 1);
  for (const std::string key : {"model.safetensors", "dir/a b+c=d&e%f.bin", "ünï/cödé~.json"}) {
    ASSERT_TRUE(store_->Put(key, data).ok()) << key;
    auto info = store_->Stat(key);
    ASSERT_TRUE(info.ok()) << key << ": " << info.status();
    EXPECT_EQ(info->size, data.size());
    EXPECT_EQ(info->key, key);
    auto all = store_->ReadAll(key);
    ASSERT_TRUE(all.ok()) << all.status();
    EXPECT_TRUE(*all == data) << key;
    ASSERT_TRUE(store_->Delete(key).ok());
    EXPECT_EQ(store_->Stat(key).status().code(), absl::StatusCode::kNotFound) << key;
    EXPECT_TRUE(store_->Delete(key).ok()) << "deleting a missing key is OK";
  }
  // Replacing an object changes its version (the ETag: source shards are pinned by it).
  ASSERT_TRUE(store_->Put("x", "old").ok());
  const std::string old_version = store_->Stat("x")->version;
  EXPECT_EQ(old_version.rfind("etag:", 0), 0u) << old_version;
  ASSERT_TRUE(store_->Put("x", "new!").ok());
  EXPECT_EQ(*store_->ReadAll("x"), "new!");
  EXPECT_NE(store_->Stat("x")->version, old_version);
  // The empty object.
  ASSERT_TRUE(store_->Put("empty", "").ok());
  EXPECT_EQ(store_->Stat("empty")->size, 0u);
  EXPECT_EQ(*store_->ReadAll("empty"), "");
}

TEST_F(S3StoreTest, RangedReadsAndTheirBounds) {
  const std::string data = Bytes(10000, 2);
  ASSERT_TRUE(store_->Put("blob", data).ok());
  std::string out;
  ASSERT_TRUE(store_->ReadRange("blob", 1234, 4321, &out).ok());
  EXPECT_TRUE(out == data.substr(1234, 4321));
  ASSERT_TRUE(store_->ReadRange("blob", 9990, 10, &out).ok());
  EXPECT_TRUE(out == data.substr(9990));
  ASSERT_TRUE(store_->ReadRange("blob", 0, 1, &out).ok());
  EXPECT_EQ(out, data.substr(0, 1));
  ASSERT_TRUE(store_->ReadRange("blob", 10000, 0, &out).ok());
  EXPECT_EQ(out, "");

  absl::Status s = store_->ReadRange("blob", 9990, 11, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
  EXPECT_EQ(out, "") << "nothing partial is returned";
  s = store_->ReadRange("blob", 20000, 5, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
  EXPECT_NE(s.message().find("blob"), std::string::npos) << s;
  s = store_->ReadRange("blob", 10001, 0, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange) << s;
}

TEST_F(S3StoreTest, ListFollowsContinuationTokensAndStaysUnderThePrefix) {
  store_->set_list_page_size(2);
  std::vector<std::string> keys = {"a/1", "a/2", "a/3", "a/4", "a/5", "b/1", "ab"};
  for (const std::string& k : keys) ASSERT_TRUE(store_->Put(k, k + "!").ok());
  // An object beside the store's prefix and one in a longer sibling prefix: never listed.
  auto other = Open("s3://" + bucket_ + "/models/run10");
  ASSERT_TRUE(other->Put("a/9", "x").ok());
  auto root = Open("s3://" + bucket_);
  ASSERT_TRUE(root->Put("models/other", "x").ok());

  auto all = store_->List("");
  ASSERT_TRUE(all.ok()) << all.status();
  std::vector<std::string> got;
  for (const ObjectInfo& o : *all) got.push_back(o.key);
  EXPECT_EQ(got, (std::vector<std::string>{"a/1", "a/2", "a/3", "a/4", "a/5", "ab", "b/1"}));
  EXPECT_EQ((*all)[0].size, 4u);

  auto a = store_->List("a/");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->size(), 5u);
  auto a_any = store_->List("a");
  ASSERT_TRUE(a_any.ok());
  EXPECT_EQ(a_any->size(), 6u);
  auto none = store_->List("zzz");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  // The bucket root sees everything with full keys.
  auto from_root = root->List("models/run1/a/");
  ASSERT_TRUE(from_root.ok());
  ASSERT_EQ(from_root->size(), 5u);
  EXPECT_EQ((*from_root)[0].key, "models/run1/a/1");
}

TEST_F(S3StoreTest, StreamingWriterUsesMultipartAndPublishesOnlyOnClose) {
  const std::string data = Bytes(5 * 1024 + 300, 3);  // 5 full parts of 1 KiB and a tail
  auto w = store_->NewWriter("big.safetensors");
  ASSERT_TRUE(w.ok()) << w.status();
  for (size_t pos = 0; pos < data.size();) {
    const size_t n = std::min<size_t>(data.size() - pos, 333 + pos % 700);
    ASSERT_TRUE((*w)->Append(std::string_view(data).substr(pos, n)).ok());
    pos += n;
  }
  EXPECT_EQ((*w)->bytes_written(), data.size());
  // A multipart upload is in progress; the object is not visible yet.
  auto uploads = store_->client()->ListMultipartUploads("models/run1/big");
  ASSERT_TRUE(uploads.ok()) << uploads.status();
  EXPECT_EQ(uploads->size(), 1u);
  EXPECT_EQ(store_->Stat("big.safetensors").status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE((*w)->Close().ok());
  auto back = store_->ReadAll("big.safetensors");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(*back == data);
  EXPECT_TRUE(store_->client()->ListMultipartUploads("models/run1/")->empty());
  EXPECT_EQ((*w)->Close().code(), absl::StatusCode::kFailedPrecondition);

  // Smaller than one part: a single PUT.
  auto small = store_->NewWriter("small");
  ASSERT_TRUE((*small)->Append("abc").ok());
  ASSERT_TRUE((*small)->Close().ok());
  EXPECT_EQ(*store_->ReadAll("small"), "abc");
  // Exactly one part, and nothing at all.
  auto exact = store_->NewWriter("exact");
  ASSERT_TRUE((*exact)->Append(data.substr(0, 1024)).ok());
  ASSERT_TRUE((*exact)->Close().ok());
  EXPECT_TRUE(*store_->ReadAll("exact") == data.substr(0, 1024));
  auto empty = store_->NewWriter("nothing");
  ASSERT_TRUE((*empty)->Close().ok());
  EXPECT_EQ(store_->Stat("nothing")->size, 0u);
}

TEST_F(S3StoreTest, MultipartETagIsTheOneTheStoreGivesACompletedUpload) {
  S3Client* client = store_->client();
  const std::string key = "models/run1/retried.bin";
  auto id = client->CreateMultipartUpload(key);
  ASSERT_TRUE(id.ok()) << id.status();
  std::vector<std::string> etags;
  for (int part = 1; part <= 2; ++part) {
    auto etag = client->UploadPart(key, *id, part, Bytes(part == 1 ? 5 << 20 : 1000, part));
    ASSERT_TRUE(etag.ok()) << etag.status();
    etags.push_back(*etag);
  }
  ASSERT_TRUE(client->CompleteMultipartUpload(key, *id, etags).ok());
  std::string etag;
  ASSERT_TRUE(client->Head(key, &etag).ok());
  EXPECT_EQ(etag, MultipartETag(etags)) << "moto's multipart ETag as S3 computes it";
  EXPECT_NE(MultipartETag({etags[1], etags[0]}), MultipartETag(etags));
  EXPECT_EQ(MultipartETag({"\"not-md5\""}), "");
  EXPECT_EQ(MultipartETag({}), "");
  // The known vector: one part of "" (md5 d41d8cd98f00b204e9800998ecf8427e).
  EXPECT_EQ(MultipartETag({"\"d41d8cd98f00b204e9800998ecf8427e\""}),
            "\"59adb24ef3cdbe0297f05b395827453f-1\"");
}

TEST_F(S3StoreTest, CopyIsServerSideInOneRequestOrInPartsAndWhole) {
  const std::string data = Bytes(5 * 1024 + 300, 7);
  ASSERT_TRUE(store_->Put("tmp/a b.bin", data).ok());
  EXPECT_TRUE(store_->SupportsCopy());
  EXPECT_FALSE(store_->SupportsRename());
  absl::Status s = store_->Copy("tmp/a b.bin", "final/a b.bin");  // CopyObject
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(*store_->ReadAll("final/a b.bin") == data);
  EXPECT_TRUE(store_->Stat("tmp/a b.bin").ok()) << "the source stays";
  // Above max_single_copy_bytes: streamed in parts (6 of 1 KiB) through a multipart upload.
  S3Options o = TestOptions(moto_->endpoint());
  o.max_single_copy_bytes = 2048;
  auto parts = Open("s3://" + bucket_ + "/models/run1", o);
  s = parts->Copy("tmp/a b.bin", "final/parts.bin");
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(*store_->ReadAll("final/parts.bin") == data);
  EXPECT_TRUE(store_->client()->ListMultipartUploads("models/run1/")->empty());
  // Replacing an object, and a missing source.
  ASSERT_TRUE(store_->Put("small", "xyz").ok());
  ASSERT_TRUE(store_->Copy("small", "final/parts.bin").ok());
  EXPECT_EQ(*store_->ReadAll("final/parts.bin"), "xyz");
  s = store_->Copy("nope", "final/x");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(s.message().find("nope"), std::string::npos) << s;
  EXPECT_EQ(store_->Stat("final/x").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(S3StoreTest, WriterDroppedBeforeCloseAbortsItsUploadAndLeavesNoObject) {
  {
    auto w = store_->NewWriter("dropped");
    ASSERT_TRUE((*w)->Append(Bytes(4000, 4)).ok());
    ASSERT_EQ(store_->client()->ListMultipartUploads("models/run1/dropped")->size(), 1u);
  }
  EXPECT_TRUE(store_->client()->ListMultipartUploads("models/run1/dropped")->empty());
  EXPECT_EQ(store_->Stat("dropped").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(S3StoreTest, DeletePrefixRemovesObjectsAndAbortsUploadsUnderIt) {
  store_->set_list_page_size(2);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(store_->Put("staging/" + std::to_string(i), "x").ok());
  ASSERT_TRUE(store_->Put("keep", "x").ok());
  // A writer killed mid-upload leaves an upload behind: simulated with the client directly.
  auto id = store_->client()->CreateMultipartUpload("models/run1/staging/big");
  ASSERT_TRUE(id.ok()) << id.status();
  ASSERT_TRUE(store_->client()->UploadPart("models/run1/staging/big", *id, 1, Bytes(2000, 5)).ok());

  ASSERT_TRUE(store_->DeletePrefix("staging/").ok());
  EXPECT_TRUE(store_->List("staging/")->empty());
  {
    auto left = store_->client()->ListMultipartUploads("models/run1/staging/");
    ASSERT_TRUE(left.ok()) << left.status();
    EXPECT_TRUE(left->empty()) << left->size() << " " << (left->empty() ? "" : left->front().key + " " + left->front().upload_id);
  }
  EXPECT_TRUE(store_->Stat("keep").ok());
  EXPECT_TRUE(store_->DeletePrefix("staging/").ok()) << "idempotent";
  EXPECT_EQ(store_->DeletePrefix("").code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(S3StoreTest, MissingKeyAndMissingBucketAreNotFoundNamingThem) {
  absl::Status s = store_->Stat("nope.json").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("s3://" + bucket_ + "/models/run1/nope.json"), std::string::npos) << s;
  std::string out;
  s = store_->ReadRange("nope.json", 0, 10, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.message().find("nope.json"), std::string::npos) << s;

  auto missing = Open("s3://no-such-bucket-here/p");
  for (absl::Status e : {missing->Stat("k").status(), missing->Put("k", "v"),
                         missing->ReadRange("k", 0, 1, &out), missing->List("").status()}) {
    EXPECT_EQ(e.code(), absl::StatusCode::kNotFound) << e;
    EXPECT_NE(e.message().find("bucket 'no-such-bucket-here' does not exist"), std::string::npos)
        << e;
  }
}

TEST_F(S3StoreTest, MissingCredentialsAreUnauthenticatedSayingWhatToSet) {
  S3Options o = TestOptions(moto_->endpoint());
  o.access_key_id.clear();
  o.secret_access_key.clear();
  auto store = Open("s3://" + bucket_ + "/p", o);
  absl::Status s = store->Put("k", "v");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << s;
  EXPECT_NE(s.message().find("AWS_ACCESS_KEY_ID"), std::string::npos) << s;
}

TEST_F(S3StoreTest, UnreachableEndpointIsUnavailableAfterItsRetries) {
  S3Options o = TestOptions("http://127.0.0.1:" + std::to_string(FreeLoopbackPort()));
  o.max_attempts = 3;
  auto store = Open("s3://" + bucket_ + "/p", o);
  absl::Status s = store->Put("k", "v");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("after 3 attempt(s)"), std::string::npos) << s;
  EXPECT_NE(s.message().find("s3://" + bucket_ + "/p/k"), std::string::npos) << s;
}

TEST_F(S3StoreTest, OpenObjectStoreAndSplitObjectUriAcceptS3) {
  // Through the environment, as workers and the CLI open stores.
  setenv("AWS_ACCESS_KEY_ID", "testing", 1);
  setenv("AWS_SECRET_ACCESS_KEY", "testing", 1);
  setenv("AWS_REGION", "us-east-1", 1);
  const std::string uri = "s3://" + bucket_ + "/models/run1?endpoint=" + moto_->endpoint();
  auto store = OpenObjectStore(uri);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->uri(), uri);
  ASSERT_TRUE((*store)->Put("h/hessians.safetensors", "H").ok());
  EXPECT_EQ(*store_->ReadAll("h/hessians.safetensors"), "H");

  auto split = SplitObjectUri("s3://" + bucket_ + "/models/run1/h/hessians.safetensors?endpoint=" +
                              moto_->endpoint());
  ASSERT_TRUE(split.ok()) << split.status();
  EXPECT_EQ(split->store_uri,
            "s3://" + bucket_ + "/models/run1/h?endpoint=" + moto_->endpoint());
  EXPECT_EQ(split->key, "hessians.safetensors");
  auto parent = OpenObjectStore(split->store_uri);
  ASSERT_TRUE(parent.ok());
  EXPECT_EQ(*(*parent)->ReadAll(split->key), "H");
  EXPECT_FALSE(SplitObjectUri("s3://bucket").ok());
  EXPECT_FALSE(SplitObjectUri("s3://bucket/dir/").ok());
}

// An HTTP endpoint that answers scripted statuses (the last one repeats) and counts requests:
// what the retry policy does on 503 SlowDown, 500, 403 and 404.
class ScriptedHttp {
 public:
  // `etag`: the ETag header of every answer.
  explicit ScriptedHttp(std::vector<std::pair<int, std::string>> script,
                        std::string etag = "\"e\"")
      : script_(std::move(script)), etag_(std::move(etag)) {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    socklen_t len = sizeof addr;
    getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    listen(fd_, 16);
    thread_ = std::thread([this] { Serve(); });
  }
  ~ScriptedHttp() {
    shutdown(fd_, SHUT_RDWR);
    close(fd_);
    thread_.join();
  }
  std::string endpoint() const { return "http://127.0.0.1:" + std::to_string(port_); }
  int requests() const { return requests_.load(); }

 private:
  void Serve() {
    for (;;) {
      const int c = accept(fd_, nullptr, nullptr);
      if (c < 0) return;
      std::string in;
      char buf[4096];
      size_t head_end = std::string::npos;
      while (head_end == std::string::npos) {
        const ssize_t n = recv(c, buf, sizeof buf, 0);
        if (n <= 0) break;
        in.append(buf, static_cast<size_t>(n));
        head_end = in.find("\r\n\r\n");
      }
      if (head_end != std::string::npos) {
        size_t length = 0;
        const size_t cl = in.find("ontent-Length: ");
        if (cl != std::string::npos && cl < head_end) length = std::stoul(in.substr(cl + 15));
        while (in.size() < head_end + 4 + length) {
          const ssize_t n = recv(c, buf, sizeof buf, 0);
          if (n <= 0) break;
          in.append(buf, static_cast<size_t>(n));
        }
        const int i = requests_++;
        const auto& [status, body] = script_[std::min<size_t>(i, script_.size() - 1)];
        const std::string out = "HTTP/1.1 " + std::to_string(status) +
                                " X\r\nContent-Type: application/xml\r\nETag: " + etag_ +
                                "\r\n"
                                "Content-Length: " + std::to_string(body.size()) +
                                "\r\nConnection: close\r\n\r\n" + body;
        (void)!send(c, out.data(), out.size(), MSG_NOSIGNAL);
      }
      close(c);
    }
  }

  std::vector<std::pair<int, std::string>> script_;
  const std::string etag_;
  int fd_ = -1, port_ = 0;
  std::atomic<int> requests_{0};
  std::thread thread_;
};

std::string S3Error(const std::string& code) {
  return "<?xml version=\"1.0\"?><Error><Code>" + code + "</Code><Message>m</Message></Error>";
}

TEST(S3RetryTest, SlowDownAndServerErrorsAreRetriedThenSucceed) {
  ScriptedHttp server({{503, S3Error("SlowDown")}, {500, S3Error("InternalError")}, {200, ""}});
  S3Options o = TestOptions(server.endpoint());
  o.max_attempts = 5;
  auto store = S3Store::Open("s3://bucket/p", o);
  ASSERT_TRUE(store.ok());
  EXPECT_TRUE((*store)->Put("k", "value").ok());
  EXPECT_EQ(server.requests(), 3);
}

TEST(S3RetryTest, ARetriedCompletionWhoseFirstAttemptCompletedSucceeds) {
  // The first CompleteMultipartUpload completed at the store but its answer was lost (a 500
  // from a proxy); the retry finds the upload gone (404 NoSuchUpload). The object is there
  // with the ETag these parts give (HEAD): the completion succeeded.
  const std::vector<std::string> parts = {"\"0cc175b9c0f1b6a831c399e269772661\"",
                                          "\"92eb5ffee6ae2fec3ad71c777531578f\""};
  {
    ScriptedHttp server({{500, S3Error("InternalError")}, {404, S3Error("NoSuchUpload")}, {200, ""}},
                        MultipartETag(parts));
    S3Options o = TestOptions(server.endpoint());
    o.max_attempts = 3;
    auto store = S3Store::Open("s3://bucket/p", o);
    ASSERT_TRUE(store.ok());
    absl::Status s = (*store)->client()->CompleteMultipartUpload("p/k", "upload-1", parts);
    EXPECT_TRUE(s.ok()) << s;
    EXPECT_EQ(server.requests(), 3);  // POST, POST again, HEAD
  }
  {
    // The object there is another one (other parts, or a plain PUT): still NOT_FOUND.
    ScriptedHttp server({{404, S3Error("NoSuchUpload")}, {200, ""}},
                        MultipartETag({parts[1], parts[0]}));
    S3Options o = TestOptions(server.endpoint());
    auto store = S3Store::Open("s3://bucket/p", o);
    ASSERT_TRUE(store.ok());
    absl::Status s = (*store)->client()->CompleteMultipartUpload("p/k", "upload-1", parts);
    EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
    EXPECT_NE(s.message().find("multipart upload is gone"), std::string::npos) << s;
  }
}

TEST(S3RetryTest, PersistentSlowDownIsUnavailableAfterMaxAttempts) {
  ScriptedHttp server({{503, S3Error("SlowDown")}});
  S3Options o = TestOptions(server.endpoint());
  o.max_attempts = 4;
  auto store = S3Store::Open("s3://bucket/p", o);
  absl::Status s = (*store)->Put("k", "value");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("SlowDown"), std::string::npos) << s;
  EXPECT_EQ(server.requests(), 4);
}

TEST(S3RetryTest, ClientErrorsAreNeverRetried) {
  for (const auto& [status, code, want] :
       std::vector<std::tuple<int, std::string, absl::StatusCode>>{
           {403, "AccessDenied", absl::StatusCode::kPermissionDenied},
           {403, "SignatureDoesNotMatch", absl::StatusCode::kUnauthenticated},
           {404, "NoSuchBucket", absl::StatusCode::kNotFound},
           {400, "InvalidArgument", absl::StatusCode::kInvalidArgument}}) {
    ScriptedHttp server({{status, S3Error(code)}, {200, ""}});
    auto store = S3Store::Open("s3://bucket/p", TestOptions(server.endpoint()));
    absl::Status s = (*store)->Put("k", "value");
    EXPECT_EQ(s.code(), want) << code << ": " << s;
    EXPECT_NE(s.message().find(code == "NoSuchBucket" ? "bucket 'bucket'" : "s3://bucket/p/k"),
              std::string::npos)
        << s;
    EXPECT_EQ(server.requests(), 1) << code;
  }
}

TEST(S3UriTest, ParsesBucketPrefixEndpointAndRegion) {
  auto u = ParseS3Uri("s3://b-1/a/b/?endpoint=http%3A%2F%2Fh%3A9000&region=eu-west-1");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->bucket, "b-1");
  EXPECT_EQ(u->prefix, "a/b");
  EXPECT_EQ(u->endpoint, "http://h:9000");
  EXPECT_EQ(u->region, "eu-west-1");
  u = ParseS3Uri("s3://bucket?endpoint=http://h:9000");
  ASSERT_TRUE(u.ok()) << u.status();
  EXPECT_EQ(u->prefix, "");
  EXPECT_EQ(u->endpoint, "http://h:9000");
  for (const char* bad : {"s3://", "s3:///p", "s3://b/a//c", "s3://b/../c", "s3://b/p?x=1",
                          "s3://b/p?endpoint", "s3://b/p?endpoint=%zz", "s3://b/p#f"}) {
    EXPECT_EQ(ParseS3Uri(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  S3Options o;
  o.access_key_id = o.secret_access_key = "k";
  EXPECT_EQ(S3Store::Open("s3://b/p?endpoint=ftp://h", o).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(S3Store::Open("s3://UPPER/p", o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(S3ClientTest, UriEncodeKeepsUnreservedAndOptionallySlash) {
  EXPECT_EQ(S3Client::UriEncode("a/b c+d=e~f.g-h_i", true), "a/b%20c%2Bd%3De~f.g-h_i");
  EXPECT_EQ(S3Client::UriEncode("a/b", false), "a%2Fb");
  EXPECT_EQ(S3Client::UriEncode("ü", true), "%C3%BC");
}

// moto with SigV4 checking on: every operation signed by curl must verify (encoded keys,
// sorted queries with valueless parameters, Range headers, multipart), and a wrong secret is
// UNAUTHENTICATED.
TEST(S3SignedTest, EveryOperationPassesSignatureVerification) {
  if (!OnPath("moto_server")) GTEST_SKIP() << "moto_server is not on PATH; S3 tests skipped";
  Moto moto({"INITIAL_NO_AUTH_ACTION_COUNT=3"});
  ASSERT_TRUE(moto.ready()) << moto.log();
  S3Options o = TestOptions(moto.endpoint());
  ASSERT_TRUE(moto.CreateSigningUser(&o.access_key_id, &o.secret_access_key)) << moto.log();
  auto client = S3Client::Create("signed", o);
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE((*client)->CreateBucket().ok()) << (*client)->CreateBucket();
  auto store = S3Store::Open("s3://signed/pre fix", o);
  ASSERT_TRUE(store.ok()) << store.status();
  (*store)->set_list_page_size(2);
  const std::string data = Bytes(4000, 9);
  // Keys and prefixes with every class of character that needs encoding in a path or a query:
  // space, '+', '=', '&', '%', '~', ':', '@', ',', '!', '(', non-ASCII.
  const std::vector<std::string> keys = {"a b~c.bin",      "p+q=r&s%t.bin", "x/1", "x/2", "x/3",
                                         "ü/ñ:@,!(1).json", "ü/2"};
  for (const std::string& k : keys) {
    absl::Status put = (*store)->Put(k, data);
    ASSERT_TRUE(put.ok()) << k << ": " << put;
  }
  for (const std::string& k : keys) {
    auto info = (*store)->Stat(k);  // HEAD
    ASSERT_TRUE(info.ok()) << k << ": " << info.status();
    EXPECT_EQ(info->size, data.size());
    std::string out;
    absl::Status read = (*store)->ReadRange(k, 10, 100, &out);  // ranged GET
    ASSERT_TRUE(read.ok()) << k << ": " << read;
    EXPECT_TRUE(out == data.substr(10, 100)) << k;
  }
  auto all = (*store)->ReadAll("p+q=r&s%t.bin");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_TRUE(*all == data);
  // ListObjectsV2, two keys a page (continuation tokens signed too), with prefixes that hold
  // '/', ' ', '+', '=', '&', '%' and non-ASCII in the query string.
  for (const auto& [prefix, want] : std::vector<std::pair<std::string, size_t>>{
           {"", 7}, {"x/", 3}, {"a b", 1}, {"p+q=r&s%", 1}, {"ü/", 2}, {"ü/ñ:@,!(", 1}}) {
    auto listed = (*store)->List(prefix);
    ASSERT_TRUE(listed.ok()) << "'" << prefix << "': " << listed.status();
    EXPECT_EQ(listed->size(), want) << "'" << prefix << "'";
  }
  // Multipart: create, parts, complete.
  auto w = (*store)->NewWriter("multi part");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Append(data).ok());
  absl::Status closed = (*w)->Close();
  ASSERT_TRUE(closed.ok()) << closed;
  EXPECT_TRUE(*(*store)->ReadAll("multi part") == data);
  // Multipart: list uploads and abort (a writer dropped before Close).
  {
    auto dropped = (*store)->NewWriter("ü/dropped");
    ASSERT_TRUE((*dropped)->Append(data).ok());
    auto uploads = (*store)->client()->ListMultipartUploads("pre fix/ü/");
    ASSERT_TRUE(uploads.ok()) << uploads.status();
    EXPECT_EQ(uploads->size(), 1u);
  }
  auto uploads = (*store)->client()->ListMultipartUploads("pre fix/");
  ASSERT_TRUE(uploads.ok()) << uploads.status();
  EXPECT_TRUE(uploads->empty()) << "the dropped writer aborted its upload";
  // Copies: CopyObject (x-amz-copy-source signed), and a streamed copy in parts.
  absl::Status copied = (*store)->Copy("p+q=r&s%t.bin", "ü/copy of p+q");
  ASSERT_TRUE(copied.ok()) << copied;
  S3Options part_copies = o;
  part_copies.max_single_copy_bytes = 2048;
  auto parts = S3Store::Open("s3://signed/pre fix", part_copies);
  copied = (*parts)->Copy("multi part", "ü/parts copy");
  ASSERT_TRUE(copied.ok()) << copied;
  EXPECT_TRUE(*(*store)->ReadAll("ü/parts copy") == data);
  // DELETE, one key and a prefix (list, delete each, list uploads).
  absl::Status deleted = (*store)->Delete("a b~c.bin");
  EXPECT_TRUE(deleted.ok()) << deleted;
  deleted = (*store)->DeletePrefix("x/");
  EXPECT_TRUE(deleted.ok()) << deleted;
  deleted = (*store)->DeletePrefix("ü/");
  EXPECT_TRUE(deleted.ok()) << deleted;
  auto left = (*store)->List("");
  ASSERT_TRUE(left.ok()) << left.status();
  EXPECT_EQ(left->size(), 2u);  // "multi part", "p+q=r&s%t.bin"

  o.secret_access_key = "wrong" + o.secret_access_key;
  auto wrong = S3Store::Open("s3://signed/p", o);
  absl::Status s = (*wrong)->Put("k", "v");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << s;
}

TEST(S3BadCredentialsTest, UnknownAccessKeyIsUnauthenticatedNamingTheKey) {
  if (!OnPath("moto_server")) GTEST_SKIP() << "moto_server is not on PATH; S3 tests skipped";
  // With authentication on (from the first request), moto checks the access key.
  Moto moto({"INITIAL_NO_AUTH_ACTION_COUNT=0"});
  ASSERT_TRUE(moto.ready()) << moto.log();
  S3Options o = TestOptions(moto.endpoint());
  o.access_key_id = "AKIAUNKNOWNKEY000000";
  auto store = S3Store::Open("s3://some-bucket/p", o);
  ASSERT_TRUE(store.ok());
  absl::Status s = (*store)->Put("k", "v");
  EXPECT_EQ(s.code(), absl::StatusCode::kUnauthenticated) << s;
  EXPECT_NE(s.message().find("s3://some-bucket/p/k"), std::string::npos) << s;
  EXPECT_NE(s.message().find("bad credentials"), std::string::npos) << s;
}

// The one resolution of S3 settings: URI > flags > credentials file (flag) > environment >
// AWS_SHARED_CREDENTIALS_FILE > defaults; credentials from one source as a whole.
class S3SettingsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* v : kVars) unsetenv(v);
    char tmpl[] = "/tmp/qforge-s3settings-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (const char* v : kVars) unsetenv(v);
  }
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    FILE* f = fopen(path.c_str(), "w");
    fputs(text.c_str(), f);
    fclose(f);
    return path;
  }
  static constexpr const char* kVars[] = {
      "AWS_ENDPOINT_URL",      "AWS_ENDPOINT_URL_S3", "AWS_REGION",         "AWS_DEFAULT_REGION",
      "AWS_ACCESS_KEY_ID",     "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
      "AWS_SHARED_CREDENTIALS_FILE"};
  std::string dir_;
};

TEST_F(S3SettingsTest, FlagsBeatTheFileWhichBeatsTheEnvironment) {
  setenv("AWS_ENDPOINT_URL", "http://env:1", 1);
  setenv("AWS_REGION", "eu-west-1", 1);
  setenv("AWS_ACCESS_KEY_ID", "ENVKEY", 1);
  setenv("AWS_SECRET_ACCESS_KEY", "envsecret", 1);
  // The environment alone.
  auto o = ResolveS3Options(S3Settings{});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->endpoint, "http://env:1");
  EXPECT_EQ(o->region, "eu-west-1");
  EXPECT_EQ(o->access_key_id, "ENVKEY");
  EXPECT_EQ(o->secret_access_key, "envsecret");
  // A credentials file named by the flag: its profile's keys beat the environment's.
  const std::string file = Write("credentials",
                                 "# comment\n[default]\naws_access_key_id = FILEKEY\n"
                                 "aws_secret_access_key = filesecret\n\n[profile ci]\n"
                                 "aws_access_key_id=CIKEY\naws_secret_access_key=cisecret\n"
                                 "aws_session_token=citoken\nregion=ap-south-1\n"
                                 "endpoint_url=http://file:2\n");
  S3Settings s;
  s.credentials_file = file;
  o = ResolveS3Options(s);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->access_key_id, "FILEKEY");
  EXPECT_EQ(o->secret_access_key, "filesecret");
  EXPECT_EQ(o->endpoint, "http://env:1") << "[default] names no endpoint";
  s.profile = "ci";
  o = ResolveS3Options(s);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->access_key_id, "CIKEY");
  EXPECT_EQ(o->session_token, "citoken");
  EXPECT_EQ(o->endpoint, "http://file:2");
  EXPECT_EQ(o->region, "ap-south-1");
  // Flags beat the file.
  s.endpoint = "http://flag:3";
  s.region = "us-west-2";
  o = ResolveS3Options(s);
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->endpoint, "http://flag:3");
  EXPECT_EQ(o->region, "us-west-2");
  EXPECT_EQ(o->access_key_id, "CIKEY");
  // And the URI beats everything (S3Store::Open).
  auto store = S3Store::Open("s3://bucket/p?endpoint=http://uri:4&region=sa-east-1", *o);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->client()->options().endpoint, "http://uri:4");
  EXPECT_EQ((*store)->client()->options().region, "sa-east-1");
  EXPECT_EQ((*store)->client()->options().access_key_id, "CIKEY");
}

TEST_F(S3SettingsTest, SharedCredentialsFileFromTheEnvironmentComesAfterEnvironmentKeys) {
  const std::string file =
      Write("shared", "[default]\naws_access_key_id=SHARED\naws_secret_access_key=s\n");
  setenv("AWS_SHARED_CREDENTIALS_FILE", file.c_str(), 1);
  auto o = ResolveS3Options(S3Settings{});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->access_key_id, "SHARED");
  setenv("AWS_ACCESS_KEY_ID", "ENVKEY", 1);
  setenv("AWS_SECRET_ACCESS_KEY", "envsecret", 1);
  o = ResolveS3Options(S3Settings{});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->access_key_id, "ENVKEY");
  // OpenObjectStore's one-argument form resolves the same way.
  auto store = OpenObjectStore("s3://bucket/p");
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(dynamic_cast<S3Store*>(store->get())->client()->options().access_key_id, "ENVKEY");
}

TEST_F(S3SettingsTest, BadFilesAreInvalidArgumentNamingThemWithoutSecrets) {
  S3Settings s;
  s.credentials_file = dir_ + "/missing";
  auto o = ResolveS3Options(s);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(o.status().message().find(dir_ + "/missing"), std::string::npos) << o.status();

  s.credentials_file = Write("c1", "[default]\naws_access_key_id=K\n");
  o = ResolveS3Options(s);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(o.status().message().find("without aws_secret_access_key"), std::string::npos)
      << o.status();

  s.credentials_file = Write("c2", "[default]\nTOPSECRETVALUE\n");
  o = ResolveS3Options(s);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(o.status().message().find("line 2"), std::string::npos) << o.status();
  EXPECT_EQ(o.status().message().find("TOPSECRETVALUE"), std::string::npos) << o.status();

  s.credentials_file = Write("c3", "[default]\naws_access_key_id=K\naws_secret_access_key=S\n");
  s.profile = "nope";
  o = ResolveS3Options(s);
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(o.status().message().find("no [nope] section"), std::string::npos) << o.status();

  S3Settings profile_only;
  profile_only.profile = "x";
  EXPECT_EQ(ResolveS3Options(profile_only).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge

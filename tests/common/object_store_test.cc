// ObjectStore behaviour, run against LocalStore (in a fresh mkdtemp directory) and MemStore
// through one typed suite, plus key validation, URI dispatch, LocalStore-only checks
// (symlink escapes, temp files, errno mapping) and a ForwardingStore fault-injection example.
#include "common/object_store.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/forwarding_store.h"
#include "common/object_digest.h"
#include "common/sha256.h"
#include "common/uri.h"
#include "common/local_store.h"
#include "common/mem_store.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

namespace fs = std::filesystem;

std::string MakeTempDir() {
  char tmpl[] = "/tmp/qforge-store-test-XXXXXX";
  char* dir = mkdtemp(tmpl);
  EXPECT_NE(dir, nullptr);
  return dir == nullptr ? std::string() : std::string(dir);
}

std::vector<std::string> Keys(const std::vector<ObjectInfo>& infos) {
  std::vector<std::string> keys;
  for (const ObjectInfo& i : infos) keys.push_back(i.key);
  return keys;
}

// ---- The typed suite ----------------------------------------------------------------------

class LocalStoreEnv {
 public:
  LocalStoreEnv() : dir_(MakeTempDir()) {
    auto s = OpenObjectStore("file://" + dir_);
    EXPECT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
  }
  ~LocalStoreEnv() { fs::remove_all(dir_); }
  ObjectStore& store() { return *store_; }
  // Everything physically under the root (files, directories, temp files), relative paths.
  std::set<std::string> Residue() const {
    std::set<std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(dir_)) {
      out.insert(fs::relative(e.path(), dir_).string() + (e.is_directory() ? "/" : ""));
    }
    return out;
  }

 private:
  std::string dir_;
  std::unique_ptr<ObjectStore> store_;
};

class MemStoreEnv {
 public:
  ObjectStore& store() { return store_; }
  std::set<std::string> Residue() {
    auto list = store_.List("");
    std::set<std::string> out;
    for (const ObjectInfo& i : *list) out.insert(i.key);
    return out;
  }

 private:
  MemStore store_;
};

template <typename Env>
class ObjectStoreTest : public ::testing::Test {
 protected:
  ObjectStore& store() { return env_.store(); }
  Env env_;
};

using StoreEnvs = ::testing::Types<LocalStoreEnv, MemStoreEnv>;
class EnvNames {
 public:
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, LocalStoreEnv> ? "Local" : "Mem";
  }
};
TYPED_TEST_SUITE(ObjectStoreTest, StoreEnvs, EnvNames);

TYPED_TEST(ObjectStoreTest, PutThenReadBack) {
  const std::string binary("a\0b\xff\n", 5);
  ASSERT_TRUE(this->store().Put("dir/sub/obj.bin", binary).ok());
  ASSERT_TRUE(this->store().Put("empty", "").ok());
  auto all = this->store().ReadAll("dir/sub/obj.bin");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(*all, binary);
  auto info = this->store().Stat("dir/sub/obj.bin");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->key, "dir/sub/obj.bin");
  EXPECT_EQ(info->size, 5u);
  auto empty = this->store().ReadAll("empty");
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(*empty, "");
}

TYPED_TEST(ObjectStoreTest, OverwriteReplacesWholeObject) {
  ASSERT_TRUE(this->store().Put("k", "a much longer first version").ok());
  ASSERT_TRUE(this->store().Put("k", "short").ok());
  EXPECT_EQ(*this->store().ReadAll("k"), "short");
  EXPECT_EQ(this->store().Stat("k")->size, 5u);
  // A store that tells versions gives a rewritten object another one (mem:// tells none).
  const std::string v1 = this->store().Stat("k")->version;
  ASSERT_TRUE(this->store().Put("k", "hello").ok());
  if (!v1.empty()) {
    EXPECT_NE(this->store().Stat("k")->version, v1);
  }
  EXPECT_EQ(this->env_.Residue().count("k"), 1u);
}

TYPED_TEST(ObjectStoreTest, MissingObjectsAreNotFound) {
  EXPECT_TRUE(absl::IsNotFound(this->store().Stat("nope").status()));
  EXPECT_TRUE(absl::IsNotFound(this->store().ReadAll("a/b/nope").status()));
  std::string out;
  absl::Status s = this->store().ReadRange("nope", 0, 1, &out);
  EXPECT_TRUE(absl::IsNotFound(s)) << s;
  EXPECT_NE(s.message().find("nope"), std::string::npos) << s;
  // A "directory" is not an object.
  ASSERT_TRUE(this->store().Put("d/x", "1").ok());
  EXPECT_TRUE(absl::IsNotFound(this->store().Stat("d").status()));
  EXPECT_TRUE(absl::IsNotFound(this->store().ReadRange("d", 0, 0, &out)));
}

TYPED_TEST(ObjectStoreTest, RangedReads) {
  ASSERT_TRUE(this->store().Put("r", "0123456789").ok());
  std::string out = "previous";
  ASSERT_TRUE(this->store().ReadRange("r", 2, 3, &out).ok());
  EXPECT_EQ(out, "234");
  ASSERT_TRUE(this->store().ReadRange("r", 0, 10, &out).ok());
  EXPECT_EQ(out, "0123456789");
  ASSERT_TRUE(this->store().ReadRange("r", 10, 0, &out).ok());  // empty read at the end
  EXPECT_EQ(out, "");
  // Past the end: OUT_OF_RANGE, nothing partial.
  for (auto [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {8, 3}, {10, 1}, {11, 0}, {1, ~uint64_t{0}}, {~uint64_t{0}, 2}}) {
    out = "untouched";
    absl::Status s = this->store().ReadRange("r", offset, length, &out);
    EXPECT_TRUE(absl::IsOutOfRange(s)) << offset << "+" << length << ": " << s;
    EXPECT_NE(s.message().find("'r'"), std::string::npos) << s;
    EXPECT_NE(out, "89");
  }
}

TYPED_TEST(ObjectStoreTest, ListByPrefixIsSorted) {
  for (const char* k : {"b/2", "a/1", "a/10", "a/2/x", "ab", "c", "a/2/y/z"}) {
    ASSERT_TRUE(this->store().Put(k, k).ok()) << k;
  }
  auto keys = [&](std::string_view prefix) {
    auto l = this->store().List(prefix);
    EXPECT_TRUE(l.ok()) << l.status();
    return l.ok() ? Keys(*l) : std::vector<std::string>{};
  };
  EXPECT_EQ(keys(""),
            (std::vector<std::string>{"a/1", "a/10", "a/2/x", "a/2/y/z", "ab", "b/2", "c"}));
  EXPECT_EQ(keys("a/"), (std::vector<std::string>{"a/1", "a/10", "a/2/x", "a/2/y/z"}));
  EXPECT_EQ(keys("a"), (std::vector<std::string>{"a/1", "a/10", "a/2/x", "a/2/y/z", "ab"}));
  EXPECT_EQ(keys("a/1"), (std::vector<std::string>{"a/1", "a/10"}));
  EXPECT_EQ(keys("a/2/y"), (std::vector<std::string>{"a/2/y/z"}));
  EXPECT_EQ(keys("zz"), std::vector<std::string>{});
  EXPECT_EQ(keys("q/r/"), std::vector<std::string>{});
  // Prefixes no valid key can match list nothing (and never walk outside the root).
  EXPECT_EQ(keys("../"), std::vector<std::string>{});
  EXPECT_EQ(keys("/a"), std::vector<std::string>{});
  EXPECT_EQ(keys("a//"), std::vector<std::string>{});
  auto l = this->store().List("a/2/");
  ASSERT_TRUE(l.ok());
  ASSERT_EQ(l->size(), 2u);
  EXPECT_EQ((*l)[1].size, std::string("a/2/y/z").size());
}

TYPED_TEST(ObjectStoreTest, DeleteIsIdempotentAndLeavesNoDirectories) {
  ASSERT_TRUE(this->store().Put("out/.qforge-staging/job1/task3/0/layer.safetensors", "x").ok());
  ASSERT_TRUE(this->store().Put("out/.qforge-staging/job1/task4/0/layer.safetensors", "y").ok());
  ASSERT_TRUE(this->store().Put("out/keep", "z").ok());
  auto staged = this->store().List("out/.qforge-staging/");
  ASSERT_TRUE(staged.ok());
  ASSERT_EQ(staged->size(), 2u);
  for (const ObjectInfo& o : *staged) ASSERT_TRUE(this->store().Delete(o.key).ok());
  for (const ObjectInfo& o : *staged) EXPECT_TRUE(this->store().Delete(o.key).ok());  // again
  EXPECT_TRUE(this->store().Delete("never/existed").ok());
  // Nothing of the staging prefix remains, not even its directories.
  std::set<std::string> residue = this->env_.Residue();
  residue.erase("out/");  // LocalStore's directory of out/keep
  EXPECT_EQ(residue, std::set<std::string>{"out/keep"});
  ASSERT_TRUE(this->store().Delete("out/keep").ok());
  EXPECT_TRUE(this->env_.Residue().empty());
}

TYPED_TEST(ObjectStoreTest, WriterIsInvisibleUntilClose) {
  ASSERT_TRUE(this->store().Put("w/obj", "old").ok());
  auto w = this->store().NewWriter("w/obj");
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Append("hello ").ok());
  ASSERT_TRUE((*w)->Append("world").ok());
  EXPECT_EQ((*w)->bytes_written(), 11u);
  EXPECT_EQ(*this->store().ReadAll("w/obj"), "old");
  EXPECT_EQ(Keys(*this->store().List("")), std::vector<std::string>{"w/obj"});
  auto w2 = this->store().NewWriter("w/new");
  ASSERT_TRUE(w2.ok());
  ASSERT_TRUE((*w2)->Append("n").ok());
  EXPECT_TRUE(absl::IsNotFound(this->store().Stat("w/new").status()));
  ASSERT_TRUE((*w)->Close().ok());
  EXPECT_EQ(*this->store().ReadAll("w/obj"), "hello world");
  EXPECT_TRUE(absl::IsFailedPrecondition((*w)->Append("more")));
  EXPECT_TRUE(absl::IsFailedPrecondition((*w)->Close()));
  ASSERT_TRUE((*w2)->Close().ok());
  EXPECT_EQ(this->env_.Residue().count("w/new"), 1u);
}

TYPED_TEST(ObjectStoreTest, UnclosedWriterIsDiscarded) {
  const auto before = this->env_.Residue();
  {
    auto w = this->store().NewWriter("fresh/dirs/obj");
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Append(std::string(100000, 'x')).ok());
  }
  EXPECT_TRUE(absl::IsNotFound(this->store().Stat("fresh/dirs/obj").status()));
  EXPECT_EQ(this->env_.Residue(), before);  // no temp file, no directory left behind
  // An existing object survives an abandoned replacement.
  ASSERT_TRUE(this->store().Put("kept", "v1").ok());
  {
    auto w = this->store().NewWriter("kept");
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Append("v2").ok());
  }
  EXPECT_EQ(*this->store().ReadAll("kept"), "v1");
}

TYPED_TEST(ObjectStoreTest, NoTempFilesAfterManyPuts) {
  std::set<std::string> expected;
  for (int i = 0; i < 20; ++i) {
    const std::string key = "m/" + std::to_string(i % 7);
    ASSERT_TRUE(this->store().Put(key, std::string(static_cast<size_t>(i), 'q')).ok());
    expected.insert(key);
  }
  std::set<std::string> files;
  for (const std::string& r : this->env_.Residue()) {
    if (r.back() != '/') files.insert(r);
  }
  EXPECT_EQ(files, expected);
}

TYPED_TEST(ObjectStoreTest, InvalidKeysAreRejectedBeforeIo) {
  for (const char* bad : {"../escape", "a/../../b", "/etc/passwd", "a//b", "x/"}) {
    std::string out;
    EXPECT_TRUE(absl::IsInvalidArgument(this->store().Put(bad, "x"))) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(this->store().Stat(bad).status())) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(this->store().ReadRange(bad, 0, 0, &out))) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(this->store().NewWriter(bad).status())) << bad;
    EXPECT_TRUE(absl::IsInvalidArgument(this->store().Delete(bad))) << bad;
  }
  EXPECT_TRUE(this->env_.Residue().empty());
}

TYPED_TEST(ObjectStoreTest, KeyCannotBeBothObjectAndDirectory) {
  ASSERT_TRUE(this->store().Put("a", "1").ok());
  absl::Status s = this->store().Put("a/b", "2");
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_NE(s.message().find("a/b"), std::string::npos) << s;
  ASSERT_TRUE(this->store().Put("d/e", "3").ok());
  s = this->store().Put("d", "4");
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_TRUE(this->store().Delete("d").ok());  // not an object: nothing to delete
  EXPECT_EQ(*this->store().ReadAll("d/e"), "3");
}

TYPED_TEST(ObjectStoreTest, ConcurrentPutsAreAtomicForReaders) {
  // Every version has a distinct length and a length-derived fill byte, so a torn or
  // truncated read cannot pass for a complete version.
  const auto version = [](int len) {
    return std::string(static_cast<size_t>(len), static_cast<char>('a' + len % 26));
  };
  ASSERT_TRUE(this->store().Put("hot", version(1)).ok());
  std::atomic<bool> done{false};
  std::atomic<int> bad{0}, reads{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 3; ++t) {
    writers.emplace_back([&, t] {
      for (int i = 0; i < 15; ++i) {
        if (!this->store().Put("hot", version(2 + t * 1000 + i * 37)).ok()) ++bad;
      }
    });
  }
  // The reader runs at least once even when the (fast, in-memory) writers finish before it
  // is first scheduled.
  std::thread reader([&] {
    do {
      auto r = this->store().ReadAll("hot");
      ++reads;
      if (!r.ok()) {
        // Only a detected concurrent change may fail a read.
        if (!absl::IsDataLoss(r.status()) && !absl::IsUnavailable(r.status())) ++bad;
        continue;
      }
      if (r->empty() || *r != version(static_cast<int>(r->size()))) ++bad;
    } while (!done.load());
  });
  for (auto& w : writers) w.join();
  done = true;
  reader.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(reads.load(), 0);
  std::set<std::string> files;
  for (const std::string& r : this->env_.Residue()) files.insert(r);
  EXPECT_EQ(files, std::set<std::string>{"hot"});
}

// ---- Key validation and joining -----------------------------------------------------------

TEST(ValidateObjectKeyTest, AcceptsOrdinaryKeys) {
  for (const std::string& k : std::vector<std::string>{
           "a", "a/b/c", "model.safetensors", ".hidden", "a/.b", "..a", "a..b", "a.", "...",
           "out/.qforge-staging/j/t/0/x", "日本語/モデル.safetensors", "emoji-\xF0\x9F\x98\x80",
           "sp ace", std::string(1024, 'k')}) {
    EXPECT_TRUE(ValidateObjectKey(k).ok()) << k << ": " << ValidateObjectKey(k);
  }
}

TEST(ValidateObjectKeyTest, RejectsBadKeys) {
  struct Case {
    std::string key;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"", "empty"},
      {"..", "'..' path segment"},
      {".", "'.' path segment"},
      {"a/../b", "'..' path segment at byte 2"},
      {"a/./b", "'.' path segment at byte 2"},
      {"a/..", "'..' path segment"},
      {"/abs", "no leading '/'"},
      {"a//b", "empty path segment"},
      {"a/", "trailing '/'"},
      {"a\\b", "backslash at byte 1"},
      {std::string("a\0b", 3), "control character U+0000 at byte 1"},
      {"tab\there", "control character U+0009"},
      {"del\x7f", "control character U+007F"},
      {"c1-\xC2\x85", "control character U+0085"},
      {"bad-\xFF", "not valid UTF-8 at byte 4"},
      {"overlong-\xC0\xAF", "not valid UTF-8"},
      {"surrogate-\xED\xA0\x80", "not valid UTF-8"},
      {"cut-\xE6\x97", "not valid UTF-8"},
      {"big-\xF4\x90\x80\x80", "not valid UTF-8"},
      {std::string(1025, 'k'), "1025 bytes, the limit is 1024"},
  };
  for (const Case& c : cases) {
    absl::Status s = ValidateObjectKey(c.key);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << c.message << ": " << s;
    EXPECT_NE(s.message().find(c.message), std::string::npos) << s;
  }
}

TEST(JoinKeyTest, JoinsIgnoringEmptyParts) {
  EXPECT_EQ(JoinKey("a", "b"), "a/b");
  EXPECT_EQ(JoinKey("a/", "b"), "a/b");
  EXPECT_EQ(JoinKey("a", "/b"), "a/b");
  EXPECT_EQ(JoinKey("", "b"), "b");
  EXPECT_EQ(JoinKey("a", ""), "a");
  EXPECT_EQ(JoinKey("", ""), "");
  EXPECT_EQ(JoinKey("a/b", "c/d"), "a/b/c/d");
}

// ---- OpenObjectStore ----------------------------------------------------------------------

TEST(OpenObjectStoreTest, DispatchesOnScheme) {
  const std::string dir = MakeTempDir();
  auto s = OpenObjectStore("file://" + dir + "/new/root");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE(fs::is_directory(dir + "/new/root"));
  const std::string canonical = fs::canonical(dir + "/new/root").string();
  EXPECT_EQ((*s)->uri(), "file://" + canonical);
  ASSERT_TRUE((*s)->Put("x", "1").ok());
  auto plain = OpenObjectStore(dir + "/new/root/");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(*(*plain)->ReadAll("x"), "1");
  auto localhost = OpenObjectStore("file://localhost" + dir);
  ASSERT_TRUE(localhost.ok()) << localhost.status();

  // Relative paths resolve against the working directory.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir);
  auto rel = OpenObjectStore("rel/store");
  fs::current_path(cwd);
  ASSERT_TRUE(rel.ok()) << rel.status();
  EXPECT_EQ((*rel)->uri(), "file://" + fs::canonical(dir + "/rel/store").string());

  struct Bad {
    std::string uri;
    std::string message;
  };
  for (const Bad& b :
       std::vector<Bad>{{"gs://bucket/prefix",
                         "unsupported object store URI scheme 'gs' in 'gs://bucket/prefix'"},
                        {"s3://", "malformed S3 URI"},
                        {"s3://bucket/p?color=red", "unknown parameter 'color'"},
                        {"s3://Bad_Bucket/p", "not a valid S3 bucket name"},
                        {"file://relative/dir", "malformed file URI"},
                        {"file://otherhost/dir", "malformed file URI"},
                        {"file://", "malformed file URI"},
                        {"file:///tmp/x?y=1", "no query"},
                        {"", "empty object store URI"}}) {
    auto r = OpenObjectStore(b.uri);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << b.uri << ": " << r.status();
    EXPECT_NE(r.status().message().find(b.message), std::string::npos) << r.status();
  }
  // A root that exists as a file.
  std::ofstream(dir + "/file") << "x";
  auto file_root = OpenObjectStore(dir + "/file");
  EXPECT_FALSE(file_root.ok());
  fs::remove_all(dir);
}

TYPED_TEST(ObjectStoreTest, DeletePrefixRemovesExactlyThePrefix) {
  for (const char* k : {"a/1", "a/b/2", "a/b/c/3", "ab/4", "c"}) ASSERT_TRUE(this->store().Put(k, "x").ok());
  ASSERT_TRUE(this->store().DeletePrefix("a/").ok());
  // On disk: no file and no directory of "a/" is left (Residue lists directories too).
  const std::set<std::string> expected = std::is_same_v<TypeParam, LocalStoreEnv>
                                             ? std::set<std::string>{"ab/", "ab/4", "c"}
                                             : std::set<std::string>{"ab/4", "c"};
  EXPECT_EQ(this->env_.Residue(), expected);
  EXPECT_TRUE(this->store().DeletePrefix("a/").ok());  // idempotent
  EXPECT_TRUE(this->store().DeletePrefix("nothing/here/").ok());
  absl::Status empty = this->store().DeletePrefix("");
  EXPECT_TRUE(absl::IsInvalidArgument(empty)) << empty;
  EXPECT_EQ(*this->store().ReadAll("c"), "x");
}

// ---- LocalStore specifics -----------------------------------------------------------------

TYPED_TEST(ObjectStoreTest, RenameMovesAtomicallyAndLeavesNoDirectories) {
  ObjectStore& store = this->store();
  ASSERT_TRUE(store.SupportsRename());
  ASSERT_TRUE(store.Put("out/.qforge-staging/j/assembly/model.safetensors", "new").ok());
  ASSERT_TRUE(store.Put("out/model.safetensors", "old").ok());
  ASSERT_TRUE(store.Rename("out/.qforge-staging/j/assembly/model.safetensors",
                           "out/model.safetensors").ok());
  EXPECT_EQ(*store.ReadAll("out/model.safetensors"), "new");  // replaced
  EXPECT_TRUE(absl::IsNotFound(
      store.Stat("out/.qforge-staging/j/assembly/model.safetensors").status()));
  // The source's directories went with it; the target's were created.
  ASSERT_TRUE(store.Rename("out/model.safetensors", "deep/a/b/m.safetensors").ok());
  EXPECT_EQ(this->env_.Residue().count("deep/a/b/m.safetensors"), 1u);
  EXPECT_EQ(this->env_.Residue().count("out/"), 0u);
  EXPECT_EQ(this->env_.Residue().count("out/.qforge-staging/"), 0u);
  // Missing source, bad keys, and a target that is a directory.
  EXPECT_TRUE(absl::IsNotFound(store.Rename("nope", "x")));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Rename("../x", "y")));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Rename("deep/a/b/m.safetensors", "/abs")));
  ASSERT_TRUE(store.Put("single", "s").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(store.Rename("single", "deep/a")));
  EXPECT_EQ(*store.ReadAll("single"), "s");  // a refused rename changes nothing
  EXPECT_TRUE(absl::IsNotFound(store.Rename("deep/a", "elsewhere")));  // a directory
  // A rename onto itself is a no-op.
  EXPECT_TRUE(store.Rename("single", "single").ok());
  EXPECT_EQ(*store.ReadAll("single"), "s");
}

TYPED_TEST(ObjectStoreTest, DigestObjectStreamsAndVerifies) {
  ObjectStore& store = this->store();
  std::string data;
  for (int i = 0; i < 1000; ++i) data.push_back(static_cast<char>(i * 7));
  ASSERT_TRUE(store.Put("obj", data).ok());
  // Chunks that do not divide the size, one chunk, and chunks larger than the object.
  for (uint64_t chunk : {1ull, 7ull, 1000ull, 1ull << 20}) {
    absl::StatusOr<ObjectDigest> d = DigestObject(store, "obj", chunk);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_EQ(d->size, 1000u);
    EXPECT_EQ(d->sha256, Sha256Hex(data)) << chunk;
  }
  ASSERT_TRUE(store.Put("empty", "").ok());
  EXPECT_EQ(DigestObject(store, "empty")->sha256, Sha256Hex(""));
  EXPECT_TRUE(absl::IsNotFound(DigestObject(store, "missing").status()));

  const ObjectDigest good{1000, Sha256Hex(data)};
  EXPECT_TRUE(VerifyObjectDigest(store, "obj", good, 64).ok());
  // One byte flipped: same size, another digest.
  std::string flipped = data;
  flipped[500] ^= 1;
  ASSERT_TRUE(store.Put("obj", flipped).ok());
  absl::Status s = VerifyObjectDigest(store, "obj", good, 64);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("obj"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find(Sha256Hex(flipped)), absl::string_view::npos) << s;
  // Another size: refused before any read.
  ASSERT_TRUE(store.Put("obj", data + "x").ok());
  s = VerifyObjectDigest(store, "obj", good);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("1001 bytes"), absl::string_view::npos) << s;
  // A malformed expectation is the caller's error.
  EXPECT_TRUE(absl::IsInvalidArgument(VerifyObjectDigest(store, "obj", {1001, "abc"})));
  EXPECT_TRUE(absl::IsInvalidArgument(
      VerifyObjectDigest(store, "obj", {1001, std::string(64, 'G')})));
}

// A store whose object grows between Stat and the end of the read (a writer appending).
class GrowingStore : public ForwardingStore {
 public:
  using ForwardingStore::ForwardingStore;
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override {
    absl::Status s = ForwardingStore::ReadRange(key, offset, length, out);
    if (!grown_) {
      grown_ = true;
      (void)target()->Put(key, "0123456789abcdef");
    }
    return s;
  }

 private:
  bool grown_ = false;
};

TEST(DigestObjectTest, AnObjectChangingSizeIsDataLoss) {
  MemStore mem;
  ASSERT_TRUE(mem.Put("obj", "01234567").ok());
  GrowingStore store(&mem);
  absl::Status s = DigestObject(store, "obj", 4).status();
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
}

TEST(ObjectStoreRenameTest, StoresWithoutRenameSayUnimplemented) {
  // A store that implements only the required calls (as an S3 store would).
  class NoRename : public ForwardingStore {
   public:
    using ForwardingStore::ForwardingStore;
    bool SupportsRename() const override { return false; }
    absl::Status Rename(std::string_view from, std::string_view to) override {
      return ObjectStore::Rename(from, to);  // the interface's default
    }
  };
  MemStore mem;
  ASSERT_TRUE(mem.Put("a", "x").ok());
  NoRename store(&mem);
  EXPECT_FALSE(store.SupportsRename());
  EXPECT_TRUE(absl::IsUnimplemented(store.Rename("a", "b")));
  EXPECT_TRUE(mem.Stat("a").ok());
  // ForwardingStore forwards both calls by default.
  ForwardingStore forward(&mem);
  EXPECT_TRUE(forward.SupportsRename());
  EXPECT_TRUE(forward.Rename("a", "b").ok());
  EXPECT_TRUE(mem.Stat("b").ok());
}

TEST(AbsoluteLocalUriTest, ResolvesRelativePathsAgainstTheWorkingDirectory) {
  const std::string cwd = fs::current_path().string();
  EXPECT_EQ(*AbsoluteLocalUri("out"), cwd + "/out");
  EXPECT_EQ(*AbsoluteLocalUri("./a/../b/c.safetensors"), cwd + "/b/c.safetensors");
  EXPECT_EQ(*AbsoluteLocalUri("."), cwd);
  EXPECT_EQ(*AbsoluteLocalUri("out/"), cwd + "/out/");
  // Already absolute, or not a local path: unchanged.
  for (const char* same : {"/abs/dir", "/abs/../x", "file:///abs", "s3://bucket/p?endpoint=x",
                           "", "mem://t"}) {
    EXPECT_EQ(*AbsoluteLocalUri(same), same);
  }
}

class LocalStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = MakeTempDir();
    fs::create_directories(base_ + "/root");
    fs::create_directories(base_ + "/outside");
    std::ofstream(base_ + "/outside/secret") << "secret";
    auto s = LocalStore::Open(base_ + "/root");
    ASSERT_TRUE(s.ok()) << s.status();
    store_ = std::move(*s);
    root_ = store_->root();
  }
  void TearDown() override {
    ::chmod((base_ + "/root/ro").c_str(), 0755);
    fs::remove_all(base_);
  }
  std::string base_, root_;
  std::unique_ptr<LocalStore> store_;
};

TEST_F(LocalStoreTest, RefusesSymlinksLeavingTheRoot) {
  fs::create_directory_symlink(base_ + "/outside", root_ + "/link");
  fs::create_symlink(base_ + "/outside/secret", root_ + "/evil");
  absl::Status put = store_->Put("link/planted", "x");
  EXPECT_TRUE(absl::IsPermissionDenied(put)) << put;
  EXPECT_NE(put.message().find("outside the store root"), std::string::npos) << put;
  EXPECT_FALSE(fs::exists(base_ + "/outside/planted"));
  EXPECT_TRUE(absl::IsPermissionDenied(store_->Put("link/new/dir/obj", "x")));
  EXPECT_FALSE(fs::exists(base_ + "/outside/new"));
  EXPECT_TRUE(absl::IsPermissionDenied(store_->Stat("link/secret").status()));
  EXPECT_TRUE(absl::IsPermissionDenied(store_->ReadAll("evil").status()));
  EXPECT_TRUE(absl::IsPermissionDenied(store_->Delete("link/secret")));
  EXPECT_TRUE(fs::exists(base_ + "/outside/secret"));
  EXPECT_TRUE(absl::IsPermissionDenied(store_->List("link/").status()));
  EXPECT_TRUE(Keys(*store_->List("")).empty());  // neither link is listed
}

TEST_F(LocalStoreTest, FollowsSymlinksInsideTheRoot) {
  ASSERT_TRUE(store_->Put("real/data.bin", "payload").ok());
  fs::create_symlink(root_ + "/real/data.bin", root_ + "/alias.bin");
  EXPECT_EQ(*store_->ReadAll("alias.bin"), "payload");
  EXPECT_EQ(Keys(*store_->List("")), (std::vector<std::string>{"alias.bin", "real/data.bin"}));
  // Replacing the link replaces the link, not its target.
  ASSERT_TRUE(store_->Put("alias.bin", "new").ok());
  EXPECT_EQ(*store_->ReadAll("real/data.bin"), "payload");
}

// Reads resolve a key inside the root in one kernel call (openat2 RESOLVE_BENEATH) and fall
// back to the canonical path when that refuses: the outcome is the same for every kind of
// link, relative or absolute, to an object, a directory or nothing.
TEST_F(LocalStoreTest, ReadsDecideEveryKindOfLinkAsTheCanonicalPathDoes) {
  ASSERT_TRUE(store_->Put("real/data.bin", "payload").ok());
  std::ofstream(base_ + "/outside/secret") << "secret";
  fs::create_symlink("real/data.bin", root_ + "/relative.bin");            // inside, relative
  fs::create_symlink(root_ + "/real/data.bin", root_ + "/absolute.bin");   // inside, absolute
  fs::create_symlink("relative.bin", root_ + "/chain.bin");                // a link to a link
  fs::create_directory_symlink("real", root_ + "/dirlink");                // directory inside
  fs::create_symlink("../outside/secret", root_ + "/escape");              // leaves, relative
  fs::create_symlink("real/../../outside/secret", root_ + "/sneaky");      // leaves via ..
  fs::create_directory_symlink(base_ + "/outside", root_ + "/outdir");     // directory outside
  fs::create_symlink("missing", root_ + "/dangling");                      // to nothing
  for (const char* key : {"relative.bin", "absolute.bin", "chain.bin", "dirlink/data.bin"}) {
    absl::StatusOr<ObjectInfo> info = store_->Stat(key);
    ASSERT_TRUE(info.ok()) << key << ": " << info.status();
    EXPECT_EQ(info->size, 7u) << key;
    EXPECT_EQ(*store_->ReadAll(key), "payload") << key;
    std::string part;
    ASSERT_TRUE(store_->ReadRange(key, 3, 3, &part).ok()) << key;
    EXPECT_EQ(part, "loa") << key;
  }
  for (const char* key : {"escape", "sneaky", "outdir/secret", "outdir/missing"}) {
    absl::Status stat = store_->Stat(key).status();
    EXPECT_TRUE(absl::IsPermissionDenied(stat)) << key << ": " << stat;
    EXPECT_NE(stat.message().find("outside the store root"), std::string::npos) << stat;
    EXPECT_EQ(stat.message().find("secret\""), std::string::npos);
    std::string out;
    absl::Status read = store_->ReadRange(key, 0, 1, &out);
    EXPECT_TRUE(absl::IsPermissionDenied(read)) << key << ": " << read;
    EXPECT_TRUE(out.empty()) << key;
  }
  for (const char* key : {"dangling", "real/nothing", "real/data.bin/below"}) {
    EXPECT_TRUE(absl::IsNotFound(store_->Stat(key).status())) << key;
    EXPECT_TRUE(absl::IsNotFound(store_->ReadAll(key).status())) << key;
  }
  EXPECT_TRUE(absl::IsNotFound(store_->Stat("dirlink").status()));  // a directory
}

TEST_F(LocalStoreTest, ListSkipsTempFilesAndForeignNames) {
  ASSERT_TRUE(store_->Put("dir/obj", "1").ok());
  std::ofstream(root_ + "/dir/.obj.tmp-0123456789abcdef") << "crashed writer";
  std::ofstream(root_ + "/dir/back\\slash") << "not a valid key";
  std::ofstream(root_ + "/dir/.obj.tmp-notrandom") << "a real object";
  EXPECT_EQ(Keys(*store_->List("")),
            (std::vector<std::string>{"dir/.obj.tmp-notrandom", "dir/obj"}));
  EXPECT_TRUE(LocalStore::IsTempFileName(".x.tmp-0123456789abcdef"));
  EXPECT_FALSE(LocalStore::IsTempFileName("x.tmp-0123456789abcdef"));
  EXPECT_FALSE(LocalStore::IsTempFileName(".x.tmp-0123456789abcdeg"));
}

TEST_F(LocalStoreTest, LongNamesStillGetTempFiles) {
  const std::string name(250, 'n');  // + ".tmp-<16>" would exceed NAME_MAX untruncated
  ASSERT_TRUE(store_->Put(name, "x").ok());
  EXPECT_EQ(*store_->ReadAll(name), "x");
  const std::string too_long(300, 'n');
  absl::Status s = store_->Put(too_long, "x");
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;  // ENAMETOOLONG
}

TEST_F(LocalStoreTest, MapsPermissionErrors) {
  if (::geteuid() == 0) GTEST_SKIP() << "running as root: permissions are not enforced";
  fs::create_directories(root_ + "/ro");
  ASSERT_EQ(::chmod((root_ + "/ro").c_str(), 0555), 0);
  absl::Status s = store_->Put("ro/x", "1");
  EXPECT_TRUE(absl::IsPermissionDenied(s)) << s;
  EXPECT_NE(s.message().find("ro/x"), std::string::npos) << s;
  EXPECT_NE(s.message().find(root_), std::string::npos) << s;
}

TEST_F(LocalStoreTest, DeletePrefixRemovesAKilledWritersTempFileAndItsDirectories) {
  const std::string key = ".qforge-staging/job/task/0/layer.safetensors";
  ASSERT_TRUE(store_->Put(".qforge-staging/job/other/0/layer.safetensors", "done").ok());
  ASSERT_TRUE(store_->Put("model.safetensors", "artifact").ok());
  // A writer process killed before Close: its temp file stays behind.
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto w = store_->NewWriter(key);
    if (!w.ok() || !(*w)->Append("partial bytes").ok()) ::_exit(1);
    ::_exit(0);  // no destructor runs: as if killed
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  int temps = 0;
  for (const auto& e : fs::directory_iterator(root_ + "/.qforge-staging/job/task/0")) {
    temps += LocalStore::IsTempFileName(e.path().filename().string()) ? 1 : 0;
  }
  ASSERT_EQ(temps, 1);
  EXPECT_EQ(Keys(*store_->List(".qforge-staging/")),
            (std::vector<std::string>{".qforge-staging/job/other/0/layer.safetensors"}));
  ASSERT_TRUE(store_->DeletePrefix(".qforge-staging/job/").ok());
  EXPECT_FALSE(fs::exists(root_ + "/.qforge-staging"));  // no file, no empty directory left
  EXPECT_EQ(Keys(*store_->List("")), (std::vector<std::string>{"model.safetensors"}));
}

TEST_F(LocalStoreTest, DeleteKeepsTheRootAndUnrelatedDirectories) {
  fs::create_directories(root_ + "/emptydir");
  ASSERT_TRUE(store_->Put("a/b/c", "1").ok());
  ASSERT_TRUE(store_->Delete("a/b/c").ok());
  EXPECT_FALSE(fs::exists(root_ + "/a"));
  EXPECT_TRUE(fs::is_directory(root_));
  EXPECT_TRUE(fs::is_directory(root_ + "/emptydir"));
}


// A writer creates its temp file straight in a parent directory that exists, and falls back to
// making the directories when a concurrent Delete removed the parent (left empty) in between:
// writers racing deleters in one directory all succeed, and nothing is left behind.
TEST_F(LocalStoreTest, PutsSucceedWhileDeletesRemoveTheirEmptyDirectory) {
  constexpr int kThreads = 4;
  constexpr int kRounds = 300;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const std::string key = "staging/job/t" + std::to_string(t) + ".0.layer.safetensors";
      for (int i = 0; i < kRounds; ++i) {
        const std::string value = std::to_string(t) + ":" + std::to_string(i);
        absl::Status put = store_->Put(key, value);
        if (!put.ok()) {
          ADD_FAILURE() << put;
          ++failures;
          return;
        }
        auto back = store_->ReadAll(key);
        if (!back.ok() || *back != value) ++failures;
        if (!store_->Delete(key).ok()) ++failures;
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_FALSE(fs::exists(root_ + "/staging")) << "the emptied directories are removed";
  EXPECT_TRUE(Keys(*store_->List("")).empty());
}
// ---- ForwardingStore: fault injection ------------------------------------------------------

// Fails the first `failures` ranged reads with UNAVAILABLE, as a flaky network store would.
class FlakyReads : public ForwardingStore {
 public:
  FlakyReads(ObjectStore* target, int failures) : ForwardingStore(target), failures_(failures) {}
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override {
    ++calls_;
    if (failures_ > 0) {
      --failures_;
      return absl::UnavailableError("injected: connection reset");
    }
    return ForwardingStore::ReadRange(key, offset, length, out);
  }
  int calls() const { return calls_; }

 private:
  int failures_;
  int calls_ = 0;
};

// Lets writers accept data but fails their Close(), as a full disk would.
class FailingClose : public ForwardingStore {
 public:
  using ForwardingStore::ForwardingStore;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    auto inner = ForwardingStore::NewWriter(key);
    if (!inner.ok()) return inner.status();
    class Writer : public ObjectWriter {
     public:
      explicit Writer(std::unique_ptr<ObjectWriter> w) : w_(std::move(w)) {}
      absl::Status Append(std::string_view d) override { return w_->Append(d); }
      absl::Status Close() override { return absl::ResourceExhaustedError("injected: ENOSPC"); }
      uint64_t bytes_written() const override { return w_->bytes_written(); }

     private:
      std::unique_ptr<ObjectWriter> w_;  // destroyed unclosed: discarded
    };
    return std::unique_ptr<ObjectWriter>(new Writer(*std::move(inner)));
  }
};

TEST(ForwardingStoreTest, InjectsReadFaults) {
  MemStore mem;
  ASSERT_TRUE(mem.Put("obj", "data").ok());
  FlakyReads flaky(&mem, 2);
  EXPECT_EQ(flaky.uri(), mem.uri());
  EXPECT_TRUE(flaky.Stat("obj").ok());  // forwarded untouched
  absl::StatusOr<std::string> r = flaky.ReadAll("obj");
  EXPECT_TRUE(absl::IsUnavailable(r.status())) << r.status();
  // A caller that retries UNAVAILABLE gets through on the third call.
  for (int attempt = 0; attempt < 5 && !r.ok(); ++attempt) r = flaky.ReadAll("obj");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "data");
  EXPECT_EQ(flaky.calls(), 3);
}

TEST(ForwardingStoreTest, FailedCloseLeavesNothing) {
  MemStore mem;
  FailingClose store(&mem);
  {
    auto w = store.NewWriter("out/x");
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Append("payload").ok());
    absl::Status s = (*w)->Close();
    EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  }
  EXPECT_EQ(mem.object_count(), 0u);
  EXPECT_TRUE(store.Put("out/y", "direct").ok());  // Put is not overridden: forwarded
  EXPECT_EQ(mem.object_count(), 1u);
}

}  // namespace
}  // namespace qforge

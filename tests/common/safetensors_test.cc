// safetensors: writer round trips (several dtypes, metadata, chunked data), F16/BF16 -> F32
// decoding against known values, sharded output read back through SafetensorsModel, model
// directory discovery and index validation, and a table of malformed files that must each
// fail with a precise code and message (plus truncation and mutation sweeps: never a crash).
#include "common/safetensors.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "common/forwarding_store.h"
#include "common/hessian_file.h"
#include "common/sha256.h"
#include "common/local_store.h"
#include "common/mem_store.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "base/float16.h"

namespace qforge {
namespace {

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

std::string U64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  return s;
}

// A safetensors file from a raw header and data section.
std::string File(const std::string& json, const std::string& data = "") {
  return U64(json.size()) + json + data;
}

// Expects `s` to carry `code` and a message containing `substr`.
void ExpectError(const absl::Status& s, absl::StatusCode code, const std::string& substr) {
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_NE(s.message().find(substr), std::string::npos)
      << "message: " << s.message() << "\nexpected to contain: " << substr;
}

// ---- DType --------------------------------------------------------------------------------

TEST(DTypeTest, NamesAndSizes) {
  const std::map<std::string, size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"I16", 2},  {"U16", 2}, {"I32", 4}, {"U32", 4},
      {"I64", 8},  {"U64", 8}, {"F16", 2}, {"BF16", 2}, {"F32", 4}, {"F64", 8}};
  for (const auto& [name, size] : sizes) {
    auto d = ParseDType(name);
    ASSERT_TRUE(d.ok()) << name;
    EXPECT_EQ(DTypeName(*d), name);
    EXPECT_EQ(DTypeSize(*d), size) << name;
  }
  ExpectError(ParseDType("f16").status(), absl::StatusCode::kInvalidArgument,
              "unknown dtype 'f16'");
  ExpectError(ParseDType("F8_E4M3").status(), absl::StatusCode::kInvalidArgument, "F8_E4M3");
}

// ---- Round trip through the writer --------------------------------------------------------

class SafetensorsRoundTripTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    if (GetParam()) {
      char tmpl[] = "/tmp/qforge-st-test-XXXXXX";
      ASSERT_NE(mkdtemp(tmpl), nullptr);
      dir_ = tmpl;
      auto s = LocalStore::Open(dir_);
      ASSERT_TRUE(s.ok()) << s.status();
      store_ = std::move(*s);
    } else {
      store_ = std::make_unique<MemStore>();
    }
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  std::string dir_;
  std::unique_ptr<ObjectStore> store_;
};

TEST_P(SafetensorsRoundTripTest, WritesAndReadsBackEveryDType) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uni(-4.0f, 4.0f);
  std::vector<float> f32(6);
  for (float& x : f32) x = uni(rng);
  std::vector<uint16_t> f16(4), bf16(4);
  std::vector<float> f16_values(4), bf16_values(4);
  for (int i = 0; i < 4; ++i) {
    f16[i] = qforge::FloatToHalf(uni(rng));
    f16_values[i] = qforge::HalfToFloat(f16[i]);
    bf16[i] = qforge::FloatToBFloat16(uni(rng));
    bf16_values[i] = qforge::BFloat16ToFloat(bf16[i]);
  }
  const std::vector<int32_t> i32 = {-7, 0, 123456};
  const std::vector<uint8_t> u8 = {1, 2, 3, 250, 255};
  const std::vector<int64_t> i64 = {-(int64_t{1} << 40)};
  const std::vector<double> f64 = {1.0 / 3.0, -2.5e10};
  const std::vector<uint8_t> boolean = {1, 0};

  const std::vector<TensorSpec> specs = {
      {"model.layers.0.weight", DType::kF32, {2, 3}},
      {"half", DType::kF16, {4}},
      {"brain", DType::kBF16, {2, 2}},
      {"ints", DType::kI32, {3}},
      {"empty", DType::kF32, {0, 4}},
      {"bytes", DType::kU8, {5}},
      {"scalar", DType::kI64, {}},
      {"doubles", DType::kF64, {2}},
      {"mask", DType::kBool, {2}},
  };
  const std::map<std::string, std::string> metadata = {{"qforge.layer", R"({"loss": 1.5})"},
                                                       {"note", "caf\xC3\xA9"}};
  auto w = SafetensorsWriter::Create(*store_, "sub/t.safetensors", specs, metadata);
  ASSERT_TRUE(w.ok()) << w.status();
  // The F32 tensor in two chunks, the empty tensor skipped entirely.
  const std::string f32_bytes = Bytes(f32);
  ASSERT_TRUE((*w)->WriteTensorData("model.layers.0.weight", f32_bytes.substr(0, 10)).ok());
  EXPECT_FALSE((*w)->complete());
  ASSERT_TRUE((*w)->WriteTensorData("model.layers.0.weight", f32_bytes.substr(10)).ok());
  ASSERT_TRUE((*w)->WriteTensorData("half", Bytes(f16)).ok());
  ASSERT_TRUE((*w)->WriteTensorData("brain", Bytes(bf16)).ok());
  ASSERT_TRUE((*w)->WriteTensorData("ints", Bytes(i32)).ok());
  ASSERT_TRUE((*w)->WriteTensorData("empty", "").ok());
  ASSERT_TRUE((*w)->WriteTensorData("bytes", Bytes(u8)).ok());
  ASSERT_TRUE((*w)->WriteTensorData("scalar", Bytes(i64)).ok());
  ASSERT_TRUE((*w)->WriteTensorData("doubles", Bytes(f64)).ok());
  EXPECT_TRUE(absl::IsNotFound(store_->Stat("sub/t.safetensors").status()));  // not yet
  ASSERT_TRUE((*w)->WriteTensorData("mask", Bytes(boolean)).ok());
  EXPECT_TRUE((*w)->complete());
  ASSERT_TRUE((*w)->Finish().ok());
  const uint64_t expected_size = (*w)->total_bytes();

  auto raw = store_->ReadAll("sub/t.safetensors");
  ASSERT_TRUE(raw.ok());
  EXPECT_EQ(raw->size(), expected_size);
  uint64_t n = 0;
  std::memcpy(&n, raw->data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(n + 8, (*w)->header_bytes());
  const std::string json = raw->substr(8, n);
  EXPECT_EQ(json.front(), '{');
  EXPECT_EQ(json.find_last_not_of(' '), json.rfind('}'));  // padded with spaces only

  auto h = ReadSafetensorsHeader(*store_, "sub/t.safetensors");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->data_offset(), 8 + n);
  EXPECT_EQ(h->metadata().at("format"), "pt");
  EXPECT_EQ(h->metadata().at("note"), "caf\xC3\xA9");
  EXPECT_EQ(h->metadata().at("qforge.layer"), R"({"loss": 1.5})");
  ASSERT_EQ(h->tensors().size(), specs.size());
  for (size_t i = 1; i < h->tensors().size(); ++i) {
    EXPECT_LE(h->tensors()[i - 1].data_end, h->tensors()[i].data_begin);  // sorted, contiguous
  }
  for (const TensorSpec& s : specs) {
    const TensorInfo* t = h->Find(s.name);
    ASSERT_NE(t, nullptr) << s.name;
    EXPECT_EQ(t->dtype, s.dtype);
    EXPECT_EQ(t->shape, s.shape);
  }
  EXPECT_EQ(h->Find("nope"), nullptr);
  EXPECT_EQ(h->Find("scalar")->num_elements(), 1);
  EXPECT_EQ(h->Find("empty")->num_bytes(), 0u);

  auto bytes_of = [&](const char* name) {
    auto b = ReadTensorBytes(*store_, "sub/t.safetensors", *h, *h->Find(name));
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? *b : std::string();
  };
  EXPECT_EQ(bytes_of("ints"), Bytes(i32));
  EXPECT_EQ(bytes_of("bytes"), Bytes(u8));
  EXPECT_EQ(bytes_of("scalar"), Bytes(i64));
  EXPECT_EQ(bytes_of("mask"), Bytes(boolean));
  EXPECT_EQ(bytes_of("empty"), "");

  auto as_f32 = [&](const char* name) {
    auto v = ReadTensorAsF32(*store_, "sub/t.safetensors", *h, *h->Find(name));
    EXPECT_TRUE(v.ok()) << v.status();
    return v.ok() ? *v : std::vector<float>();
  };
  EXPECT_EQ(as_f32("model.layers.0.weight"), f32);
  EXPECT_EQ(as_f32("half"), f16_values);
  EXPECT_EQ(as_f32("brain"), bf16_values);
  EXPECT_EQ(as_f32("doubles"), (std::vector<float>{static_cast<float>(1.0 / 3.0), -2.5e10f}));
  EXPECT_TRUE(as_f32("empty").empty());
  auto ints = ReadTensorAsF32(*store_, "sub/t.safetensors", *h, *h->Find("ints"));
  ExpectError(ints.status(), absl::StatusCode::kInvalidArgument, "tensor 'ints'");
  ExpectError(ints.status(), absl::StatusCode::kInvalidArgument, "dtype I32");
}

INSTANTIATE_TEST_SUITE_P(Stores, SafetensorsRoundTripTest, ::testing::Values(false, true),
                         [](const auto& info) {
                           return std::string(info.param ? "Local" : "Mem");
                         });

// ---- Decoding ------------------------------------------------------------------------------

TEST(DecodeToF32Test, KnownHalfAndBFloat16Values) {
  const std::vector<uint16_t> f16 = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x0400,
                                     0x3555, 0x7C00, 0xFC00, 0x8000, 0x3800};
  auto v = DecodeToF32(DType::kF16, Bytes(f16), "f16 test");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ((*v)[0], 1.0f);
  EXPECT_EQ((*v)[1], -2.0f);
  EXPECT_EQ((*v)[2], 65504.0f);
  EXPECT_EQ((*v)[3], std::ldexp(1.0f, -24));
  EXPECT_EQ((*v)[4], std::ldexp(1.0f, -14));
  EXPECT_EQ((*v)[5], 0.333251953125f);
  EXPECT_EQ((*v)[6], std::numeric_limits<float>::infinity());
  EXPECT_EQ((*v)[7], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit((*v)[8]) && (*v)[8] == 0.0f);
  EXPECT_EQ((*v)[9], 0.5f);
  auto nan = DecodeToF32(DType::kF16, Bytes(std::vector<uint16_t>{0x7E00}), "nan");
  EXPECT_TRUE(std::isnan((*nan)[0]));

  const std::vector<uint16_t> bf16 = {0x3F80, 0xC049, 0x7F7F, 0x0001, 0x4049, 0xFF80};
  auto b = DecodeToF32(DType::kBF16, Bytes(bf16), "bf16 test");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)[0], 1.0f);
  EXPECT_EQ((*b)[1], -3.140625f);
  EXPECT_EQ((*b)[2], 3.3895313892515355e38f);
  EXPECT_EQ((*b)[3], std::ldexp(1.0f, -133));  // smallest bfloat16 subnormal
  EXPECT_EQ((*b)[4], 3.140625f);
  EXPECT_EQ((*b)[5], -std::numeric_limits<float>::infinity());

  // Little-endian byte order, spelled out.
  auto le = DecodeToF32(DType::kF16, std::string("\x00\x3C\x00\xC0", 4), "le");
  EXPECT_EQ(*le, (std::vector<float>{1.0f, -2.0f}));
}

TEST(DecodeToF32Test, RejectsOtherDTypesAndRaggedBytes) {
  ExpectError(DecodeToF32(DType::kI8, "abc", "tensor 'q'").status(),
              absl::StatusCode::kInvalidArgument, "tensor 'q': dtype I8");
  ExpectError(DecodeToF32(DType::kF32, "abcde", "tensor 'r'").status(),
              absl::StatusCode::kInvalidArgument, "5 bytes is not a whole number of F32");
}

// ---- Writer misuse --------------------------------------------------------------------------

TEST(SafetensorsWriterTest, EnforcesOrderSizesAndCompleteness) {
  MemStore store;
  auto w = SafetensorsWriter::Create(store, "w.safetensors",
                                     {{"a", DType::kF32, {2}}, {"b", DType::kI8, {3}}});
  ASSERT_TRUE(w.ok());
  ExpectError((*w)->WriteTensorData("b", "xyz"), absl::StatusCode::kFailedPrecondition,
              "data for tensor 'b' before tensor 'a' is complete");
  ExpectError((*w)->WriteTensorData("zzz", "x"), absl::StatusCode::kInvalidArgument,
              "tensor 'zzz' was not declared");
  ExpectError((*w)->WriteTensorData("a", std::string(9, 'x')),
              absl::StatusCode::kFailedPrecondition,
              "9 more bytes for tensor 'a' which has 0 of 8 bytes");
  ASSERT_TRUE((*w)->WriteTensorData("a", std::string(8, 'x')).ok());
  ExpectError((*w)->WriteTensorData("a", "x"), absl::StatusCode::kFailedPrecondition,
              "tensor 'a' is already complete");
  ASSERT_TRUE((*w)->WriteTensorData("b", "x").ok());
  ExpectError((*w)->Finish(), absl::StatusCode::kFailedPrecondition, "tensor 'b' has 1 of 3 bytes");
  ASSERT_TRUE((*w)->WriteTensorData("b", "yz").ok());
  ASSERT_TRUE((*w)->Finish().ok());
  ExpectError((*w)->Finish(), absl::StatusCode::kFailedPrecondition, "Finish called twice");
  ExpectError((*w)->WriteTensorData("b", "q"), absl::StatusCode::kFailedPrecondition,
              "after Finish");
  EXPECT_TRUE(ReadSafetensorsHeader(store, "w.safetensors").ok());
}

TEST(SafetensorsWriterTest, RejectsBadDeclarations) {
  MemStore store;
  const auto create = [&](std::vector<TensorSpec> specs,
                          std::map<std::string, std::string> meta = {}) {
    return SafetensorsWriter::Create(store, "bad.safetensors", std::move(specs), std::move(meta))
        .status();
  };
  ExpectError(create({{"a", DType::kF32, {1}}, {"a", DType::kF16, {1}}}),
              absl::StatusCode::kInvalidArgument, "tensor 'a' is declared twice");
  ExpectError(create({{"", DType::kF32, {1}}}), absl::StatusCode::kInvalidArgument, "empty name");
  ExpectError(create({{"__metadata__", DType::kF32, {1}}}), absl::StatusCode::kInvalidArgument,
              "reserved");
  ExpectError(create({{"neg", DType::kF32, {2, -1}}}), absl::StatusCode::kInvalidArgument,
              "tensor 'neg' shape [2, -1]");
  ExpectError(create({{"big", DType::kF64, {int64_t{1} << 32, int64_t{1} << 31}}}),
              absl::StatusCode::kInvalidArgument, "overflows");
  ExpectError(create({{"bad\xFF", DType::kF32, {1}}}), absl::StatusCode::kInvalidArgument,
              "not valid UTF-8");
  ExpectError(create({{"a", DType::kF32, {1}}}, {{"format", "np"}}),
              absl::StatusCode::kInvalidArgument, "format must be 'pt'");
  EXPECT_EQ(store.object_count(), 0u);
}

TEST(SafetensorsWriterTest, UnfinishedWriterLeavesNothing) {
  MemStore store;
  {
    auto w = SafetensorsWriter::Create(store, "x.safetensors", {{"a", DType::kU8, {4}}});
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->WriteTensorData("a", "ab").ok());
  }
  EXPECT_EQ(store.object_count(), 0u);
}

TEST(SafetensorsWriterTest, NoTensorsIsAValidFile) {
  MemStore store;
  auto w = SafetensorsWriter::Create(store, "none.safetensors", {}, {{"k", "v"}});
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Finish().ok());
  auto h = ReadSafetensorsHeader(store, "none.safetensors");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_TRUE(h->tensors().empty());
  EXPECT_EQ(h->metadata().at("k"), "v");
}


// The header bytes as the safetensors format spells them: an 8-byte little-endian length, then
// compact JSON with __metadata__ first and the tensors in declaration order (their data in the
// same order), names escaped as JSON strings, padded with spaces to a multiple of 8.
TEST(SafetensorsWriterTest, HeaderIsCompactJsonInDeclarationOrder) {
  MemStore store;
  auto w = SafetensorsWriter::Create(
      store, "h.safetensors",
      {{"z.weight", DType::kF16, {2, 3}}, {"a\"b\\c", DType::kI32, {1}}, {"m", DType::kU8, {0}}},
      {{"note", "x\ny"}});
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->WriteTensorData("z.weight", std::string(12, '\1')).ok());
  ASSERT_TRUE((*w)->WriteTensorData("a\"b\\c", std::string(4, '\2')).ok());
  ASSERT_TRUE((*w)->WriteTensorData("m", "").ok());
  ASSERT_TRUE((*w)->Finish().ok());
  const std::string bytes = *store.ReadAll("h.safetensors");
  const std::string expected_json =
      R"({"__metadata__":{"format":"pt","note":"x\ny"},)"
      R"("z.weight":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},)"
      R"("a\"b\\c":{"dtype":"I32","shape":[1],"data_offsets":[12,16]},)"
      R"("m":{"dtype":"U8","shape":[0],"data_offsets":[16,16]}})";
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  ASSERT_EQ(n % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + n + 16);
  const std::string json = bytes.substr(8, n);
  EXPECT_EQ(json.substr(0, expected_json.size()), expected_json);
  EXPECT_EQ(json.find_first_not_of(' ', expected_json.size()), std::string::npos) << json;
  EXPECT_EQ(bytes.substr(8 + n), std::string(12, '\1') + std::string(4, '\2'));
}

// A shard of tens of thousands of tensors (an assembled artifact of a model with many small
// layers) is declared in linear time; with a key lookup per insertion it took seconds.
TEST(SafetensorsWriterTest, DeclaresManyTensorsAndReadsThemBack) {
  MemStore store;
  std::vector<TensorSpec> specs;
  for (int i = 0; i < 40000; ++i) {
    specs.push_back({"model.layers." + std::to_string(i) + ".qweight", DType::kU8, {1}});
  }
  auto w = SafetensorsWriter::Create(store, "many.safetensors", specs);
  ASSERT_TRUE(w.ok()) << w.status();
  for (const TensorSpec& s : specs) ASSERT_TRUE((*w)->WriteTensorData(s.name, "q").ok());
  ASSERT_TRUE((*w)->Finish().ok());
  auto h = ReadSafetensorsHeader(store, "many.safetensors");
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_EQ(h->tensors().size(), specs.size());
}
// ---- Sharded output and SafetensorsModel --------------------------------------------------

// Counts writers that are open at the same time.
class OpenWriterCounter : public ForwardingStore {
 public:
  using ForwardingStore::ForwardingStore;
  absl::StatusOr<std::unique_ptr<ObjectWriter>> NewWriter(std::string_view key) override {
    auto inner = ForwardingStore::NewWriter(key);
    if (!inner.ok()) return inner.status();
    class Writer : public ObjectWriter {
     public:
      Writer(std::unique_ptr<ObjectWriter> w, OpenWriterCounter* c) : w_(std::move(w)), c_(c) {
        c_->max_open_ = std::max(c_->max_open_, ++c_->open_);
      }
      ~Writer() override { --c_->open_; }
      absl::Status Append(std::string_view d) override { return w_->Append(d); }
      absl::Status Close() override { return w_->Close(); }
      uint64_t bytes_written() const override { return w_->bytes_written(); }

     private:
      std::unique_ptr<ObjectWriter> w_;
      OpenWriterCounter* c_;
    };
    return std::unique_ptr<ObjectWriter>(new Writer(*std::move(inner), this));
  }
  int max_open_ = 0;
  int open_ = 0;
};

struct ShardCase {
  std::vector<TensorSpec> specs;
  std::map<std::string, std::vector<float>> values;
};

ShardCase MakeShardCase() {
  ShardCase c;
  // F32 sizes in bytes: 400, 400, 1600 (bigger than the 1000-byte limit), 200, 600, 0, 300.
  const std::vector<std::pair<std::string, int64_t>> tensors = {{"model.embed_tokens.weight", 100},
                                                                {"model.layers.0.q.weight", 100},
                                                                {"model.layers.0.big.weight", 400},
                                                                {"model.layers.1.a.weight", 50},
                                                                {"model.layers.1.b.weight", 150},
                                                                {"model.layers.1.empty", 0},
                                                                {"lm_head.weight", 75}};
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  for (const auto& [name, n] : tensors) {
    c.specs.push_back({name, DType::kF32, {n}});
    std::vector<float>& v = c.values[name];
    for (int64_t i = 0; i < n; ++i) v.push_back(uni(rng));
  }
  return c;
}

TEST(ShardedSafetensorsWriterTest, ShardsStreamAndReadBack) {
  MemStore mem;
  OpenWriterCounter store(&mem);
  const ShardCase c = MakeShardCase();
  auto w = ShardedSafetensorsWriter::Create(store, "out/model/", c.specs, 1000, {{"src", "test"}});
  ASSERT_TRUE(w.ok()) << w.status();
  // [embed, q] = 800 | [big] = 1600 | [a, b, empty] = 800 | [lm_head] = 300
  EXPECT_EQ((*w)->shard_keys(),
            (std::vector<std::string>{"out/model/model-00001-of-00004.safetensors",
                                      "out/model/model-00002-of-00004.safetensors",
                                      "out/model/model-00003-of-00004.safetensors",
                                      "out/model/model-00004-of-00004.safetensors"}));
  EXPECT_EQ((*w)->tensor_shards(), (std::vector<size_t>{0, 0, 1, 2, 2, 2, 3}));
  for (const TensorSpec& s : c.specs) {
    const std::string bytes = Bytes(c.values.at(s.name));
    // Two chunks each, to exercise streaming across calls.
    ASSERT_TRUE((*w)->WriteTensorData(s.name, bytes.substr(0, bytes.size() / 2)).ok()) << s.name;
    ASSERT_TRUE((*w)->WriteTensorData(s.name, bytes.substr(bytes.size() / 2)).ok()) << s.name;
  }
  EXPECT_TRUE(absl::IsNotFound(mem.Stat("out/model/model.safetensors.index.json").status()));
  ASSERT_TRUE((*w)->Finish().ok());
  EXPECT_EQ(store.max_open_, 1);  // only the current shard is ever open

  auto index_text = mem.ReadAll("out/model/model.safetensors.index.json");
  ASSERT_TRUE(index_text.ok());
  const nlohmann::json index = nlohmann::json::parse(*index_text);
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), 400u + 400 + 1600 + 200 + 600 + 300);
  EXPECT_EQ(index["weight_map"]["model.layers.0.big.weight"], "model-00002-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["lm_head.weight"], "model-00004-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"].size(), c.specs.size());

  auto model = SafetensorsModel::Open(mem, "out/model");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->shard_keys(), (*w)->shard_keys());
  EXPECT_EQ(model->index_key(), "out/model/model.safetensors.index.json");
  EXPECT_EQ(model->num_tensors(), c.specs.size());
  EXPECT_EQ(model->total_tensor_bytes(), index["metadata"]["total_size"].get<uint64_t>());
  std::vector<std::string> names = model->TensorNames();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_EQ(names.size(), c.specs.size());
  for (size_t i = 0; i < c.specs.size(); ++i) {
    const TensorSpec& s = c.specs[i];
    auto loc = model->Find(s.name);
    ASSERT_TRUE(loc.ok());
    EXPECT_EQ(loc->key, (*w)->shard_keys()[(*w)->tensor_shards()[i]]);
    EXPECT_EQ(loc->header->metadata().at("src"), "test");
    EXPECT_EQ(loc->info->shape, s.shape);
    auto v = model->ReadF32(mem, s.name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(*v, c.values.at(s.name)) << s.name;
  }
  ExpectError(model->Find("missing.weight").status(), absl::StatusCode::kNotFound,
              "tensor 'missing.weight'");
  // Pointers stay valid when the model moves.
  auto loc = model->Find("lm_head.weight");
  SafetensorsModel moved = *std::move(model);
  EXPECT_EQ(moved.Find("lm_head.weight")->info, loc->info);
}

TEST(ShardedSafetensorsWriterTest, OneShardMeansModelSafetensorsWithoutIndex) {
  MemStore store;
  const ShardCase c = MakeShardCase();
  auto w = ShardedSafetensorsWriter::Create(store, "", c.specs, uint64_t{1} << 30);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ((*w)->shard_keys(), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ((*w)->index_key(), "");
  for (const TensorSpec& s : c.specs) {
    ASSERT_TRUE((*w)->WriteTensorData(s.name, Bytes(c.values.at(s.name))).ok());
  }
  ASSERT_TRUE((*w)->Finish().ok());
  EXPECT_EQ(store.object_count(), 1u);
  auto model = SafetensorsModel::Open(store, "");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->shard_keys(), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(*model->ReadF32(store, "lm_head.weight"), c.values.at("lm_head.weight"));
}

TEST(ShardedSafetensorsWriterTest, MisuseAndAbandonment) {
  MemStore store;
  const ShardCase c = MakeShardCase();
  ExpectError(ShardedSafetensorsWriter::Create(store, "", c.specs, 0).status(),
              absl::StatusCode::kInvalidArgument, "max_shard_bytes");
  {
    auto w = ShardedSafetensorsWriter::Create(store, "m", c.specs, 1000);
    ASSERT_TRUE(w.ok());
    const std::string embed = Bytes(c.values.at("model.embed_tokens.weight"));
    ASSERT_TRUE((*w)->WriteTensorData("model.embed_tokens.weight", embed).ok());
    // Skipping ahead into the next shard while shard 1 is incomplete.
    ExpectError((*w)->WriteTensorData("model.layers.0.big.weight", "x"),
                absl::StatusCode::kFailedPrecondition, "model.layers.0.q.weight");
    ASSERT_TRUE((*w)->WriteTensorData("model.layers.0.q.weight",
                                      Bytes(c.values.at("model.layers.0.q.weight")))
                    .ok());
    EXPECT_EQ(store.object_count(), 1u);  // shard 1 published as soon as it was complete
    ExpectError((*w)->WriteTensorData("model.embed_tokens.weight", embed),
                absl::StatusCode::kFailedPrecondition, "already complete");
    ExpectError((*w)->Finish(), absl::StatusCode::kFailedPrecondition, "model.layers.0.big.weight");
  }
  EXPECT_EQ(store.object_count(), 0u);  // the abandoned writer removed its published shard
}

// ---- Model directory discovery and index validation ---------------------------------------

class SafetensorsModelTest : public ::testing::Test {
 protected:
  // Writes a one-tensor F32 file `key` holding tensors `names` ([2] each).
  void WriteFile(const std::string& key, const std::vector<std::string>& names) {
    std::vector<TensorSpec> specs;
    for (const std::string& n : names) specs.push_back({n, DType::kF32, {2}});
    auto w = SafetensorsWriter::Create(store_, key, specs);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const std::string& n : names) {
      ASSERT_TRUE((*w)->WriteTensorData(n, Bytes(std::vector<float>{1.0f, 2.0f})).ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
  }
  void WriteIndex(const std::string& dir, const std::string& weight_map) {
    ASSERT_TRUE(store_
                    .Put(JoinKey(dir, "model.safetensors.index.json"),
                         R"({"metadata": {"total_size": 16}, "weight_map": )" + weight_map + "}")
                    .ok());
  }
  absl::Status Open(const std::string& dir) { return SafetensorsModel::Open(store_, dir).status(); }
  MemStore store_;
};

TEST_F(SafetensorsModelTest, FindsTheLayout) {
  // Nothing under the directory: it does not exist (a typo in the path, say).
  ExpectError(Open("m"), absl::StatusCode::kNotFound, "mem://test/m does not exist");
  // Files, but no safetensors: what was expected.
  ASSERT_TRUE(store_.Put("m/config.json", "{}").ok());
  ExpectError(Open("m"), absl::StatusCode::kNotFound, "no safetensors model in mem://test/m");
  WriteFile("m/weights.safetensors", {"w"});
  WriteFile("m/sub/other.safetensors", {"x"});  // not directly under m: ignored
  auto model = SafetensorsModel::Open(store_, "m");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->shard_keys(), std::vector<std::string>{"m/weights.safetensors"});
  WriteFile("m/second.safetensors", {"y"});
  ExpectError(Open("m"), absl::StatusCode::kInvalidArgument, "2 *.safetensors files");
  WriteFile("m/model.safetensors", {"z"});  // model.safetensors wins
  model = SafetensorsModel::Open(store_, "m");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->TensorNames(), std::vector<std::string>{"z"});
  ExpectError(Open("../m"), absl::StatusCode::kInvalidArgument, "'..' path segment");
}

TEST_F(SafetensorsModelTest, ValidatesTheIndex) {
  WriteFile("d/a.safetensors", {"t1", "t2"});
  WriteFile("d/b.safetensors", {"t3"});
  WriteIndex("d", R"({"t1": "a.safetensors", "t2": "a.safetensors", "t3": "b.safetensors"})");
  ASSERT_TRUE(Open("d").ok()) << Open("d");

  WriteIndex("d", R"({"t1": "a.safetensors", "t2": "a.safetensors", "t3": "c.safetensors"})");
  ExpectError(Open("d"), absl::StatusCode::kNotFound, "names shard 'd/c.safetensors'");
  WriteIndex("d", R"({"t1": "a.safetensors", "t2": "b.safetensors", "t3": "b.safetensors"})");
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument,
              "maps tensor 't2' to shard 'd/b.safetensors', which has no such tensor");
  WriteIndex("d", R"({"t1": "a.safetensors", "t3": "b.safetensors"})");
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument,
              "holds tensor 't2', which mem://test/d/model.safetensors.index.json does not list");
  WriteIndex("d", R"({"t1": "a.safetensors", "t2": "a.safetensors", "t3": "b.safetensors",
                      "t1": "b.safetensors"})");
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument, "duplicate key 'weight_map'.'t1'");
  WriteIndex("d", R"(["a.safetensors"])");
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument, "'weight_map' is an array");
  WriteIndex("d", R"({"t1": 7})");
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument, "weight_map['t1'] is an integer");
  WriteIndex("d", R"({"t1": "../a.safetensors"})");
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument, "names an invalid shard");
  WriteIndex("d", "{}");
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument, "'weight_map' is empty");
  ASSERT_TRUE(store_.Put("d/model.safetensors.index.json", "{not json").ok());
  ExpectError(Open("d"), absl::StatusCode::kInvalidArgument, "malformed JSON");

  // A tensor in two shards.
  WriteFile("e/a.safetensors", {"t1"});
  WriteFile("e/b.safetensors", {"t1", "t2"});
  WriteIndex("e", R"({"t1": "a.safetensors", "t2": "b.safetensors"})");
  ExpectError(Open("e"), absl::StatusCode::kInvalidArgument,
              "tensor 't1' is in two shards: 'e/a.safetensors' and 'e/b.safetensors'");
}

// ---- Malformed files ------------------------------------------------------------------------

struct MalformedCase {
  std::string name;
  std::string file;
  absl::StatusCode code;
  std::string message;
};

std::vector<MalformedCase> MalformedCases() {
  using C = absl::StatusCode;
  const C kInvalid = C::kInvalidArgument;
  const std::string t12 = R"("t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]})";
  const std::string d12(12, 'x');
  std::string deep = "{\"t\": ";
  for (int i = 0; i < 40; ++i) deep += "[";
  for (int i = 0; i < 40; ++i) deep += "]";
  deep += "}";
  return {
      {"Empty", "", C::kDataLoss, "truncated file: 0 bytes"},
      {"ShorterThanLength", std::string("\x10\x00\x00", 3), C::kDataLoss,
       "truncated file: 3 bytes"},
      {"ZeroHeaderLength", U64(0) + "{}", kInvalid, "header length is 0"},
      {"HugeHeaderLength", U64(200ull << 20) + "{}", kInvalid, "exceeds the limit"},
      {"AbsurdHeaderLength", U64(~0ull) + "{}", kInvalid, "exceeds the limit"},
      {"HeaderBeyondFile", U64(100) + "{}", C::kDataLoss,
       "the 8-byte header length exceeds the file size (10 bytes)"},
      {"MalformedJson", File(R"({"t": {"dtype": )"), kInvalid, "malformed JSON at byte"},
      {"TrailingGarbage", File("{} x"), kInvalid, "malformed JSON"},
      {"NotAnObject", File("[1, 2]"), kInvalid, "header is an array, expected a JSON object"},
      {"NotUtf8", File("{\"t\xff\": 1}"), kInvalid, "header is not valid UTF-8 (byte 3"},
      {"LoneSurrogateEscape", File(R"({"\ud800": 1})"), kInvalid, "malformed JSON"},
      {"MetadataNotObject", File(R"({"__metadata__": 5})"), kInvalid,
       "__metadata__ is an integer, expected an object of strings"},
      {"MetadataValueNotString", File(R"({"__metadata__": {"k": 1.5}})"), kInvalid,
       "__metadata__ entry 'k' is a non-integer number"},
      {"EntryNotObject", File(R"({"t": "F32"})"), kInvalid, "tensor 't': entry is a string"},
      {"EmptyName", File(R"({"": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}})"),
       kInvalid, "a tensor has an empty name"},
      {"MissingDtype", File(R"({"t": {"shape": [3], "data_offsets": [0, 12]}})", d12), kInvalid,
       "tensor 't': no 'dtype'"},
      {"DtypeNotString", File(R"({"t": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}})"),
       kInvalid, "tensor 't': 'dtype' is an integer"},
      {"UnknownDtype", File(R"({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}})"),
       kInvalid, "tensor 't': unknown dtype 'Q4'"},
      {"MissingShape", File(R"({"t": {"dtype": "F32", "data_offsets": [0, 12]}})", d12), kInvalid,
       "tensor 't': no 'shape'"},
      {"ShapeNotArray",
       File(R"({"t": {"dtype": "F32", "shape": 3, "data_offsets": [0, 12]}})", d12), kInvalid,
       "tensor 't': 'shape' is an integer, expected an array"},
      {"NegativeDim", File(R"({"t": {"dtype": "F32", "shape": [3, -2], "data_offsets": [0, 0]}})"),
       kInvalid, "tensor 't': shape[1] is -2"},
      {"FractionalDim", File(R"({"t": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 0]}})"),
       kInvalid, "tensor 't': shape[0] is 2.5"},
      {"StringDim",
       File(R"({"t": {"dtype": "F32", "shape": ["3"], "data_offsets": [0, 12]}})", d12), kInvalid,
       "shape[0] is \"3\""},
      {"ElementCountOverflow",
       File(R"({"t": {"dtype": "U8", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})"),
       kInvalid, "tensor 't': shape [4294967296, 4294967296] of U8 overflows"},
      {"ByteCountOverflow",
       File(R"({"t": {"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 0]}})"),
       kInvalid, "overflows"},
      {"MissingOffsets", File(R"({"t": {"dtype": "F32", "shape": [3]}})", d12), kInvalid,
       "tensor 't': no 'data_offsets'"},
      {"OffsetsWrongLength",
       File(R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [12]}})", d12), kInvalid,
       "'data_offsets' is [12], expected [begin, end]"},
      {"NegativeOffset", File(R"({"t": {"dtype": "F32", "shape": [0], "data_offsets": [-4, 0]}})"),
       kInvalid, "are not non-negative integers"},
      {"BeginAfterEnd",
       File(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", d12), kInvalid,
       "data_offsets begin 8 > end 4"},
      {"SizeMismatch",
       File(R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", d12), kInvalid,
       "hold 8 bytes but F32 [3] needs 12"},
      {"PastEndOfData", File("{" + t12 + "}", "12345678"), C::kDataLoss,
       "tensor 't': truncated file: data_offsets [0, 12) extend past the end of the data section "
       "(8 bytes)"},
      {"Overlap",
       File(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
            d12),
       kInvalid, "tensors 'a' [0, 8) and 'b' [4, 12) overlap"},
      {"Gap",
       File(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [10, 12]}})",
            d12),
       kInvalid, "2 unused bytes [8, 10) before tensor 'b'"},
      {"LeadingGap",
       File(R"({"b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})", "abcd"), kInvalid,
       "2 unused bytes [0, 2) before tensor 'b'"},
      {"TrailingBytes", File("{" + t12 + "}", d12 + "xyz"), kInvalid,
       "3 unused bytes after the last tensor"},
      {"DataWithoutTensors", File("{}", "x"), kInvalid, "1 unused bytes after the last tensor"},
      {"DuplicateTensor", File("{" + t12 + ", " + t12 + "}", d12), kInvalid, "duplicate key 't'"},
      {"DuplicateField",
       File(R"({"t": {"dtype": "F32", "dtype": "F16", "shape": [3], "data_offsets": [0, 12]}})",
            d12),
       kInvalid, "duplicate key 't'.'dtype'"},
      {"DuplicateMetadataKey", File(R"({"__metadata__": {"k": "a", "k": "b"}})"), kInvalid,
       "duplicate key '__metadata__'.'k'"},
      {"DeepNesting", File(deep), kInvalid, "nests deeper than 32 levels"},
  };
}

class MalformedSafetensorsTest : public ::testing::TestWithParam<MalformedCase> {};

TEST_P(MalformedSafetensorsTest, FailsWithCodeAndMessage) {
  const MalformedCase& c = GetParam();
  MemStore store;
  ASSERT_TRUE(store.Put("bad.safetensors", c.file).ok());
  auto h = ReadSafetensorsHeader(store, "bad.safetensors");
  ASSERT_FALSE(h.ok());
  ExpectError(h.status(), c.code, c.message);
  ExpectError(h.status(), c.code, "mem://test/bad.safetensors");  // names the file
  // The same through SafetensorsModel.
  auto m = SafetensorsModel::Open(store, "");
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), c.code) << m.status();
}

INSTANTIATE_TEST_SUITE_P(Table, MalformedSafetensorsTest, ::testing::ValuesIn(MalformedCases()),
                         [](const auto& info) { return info.param.name; });

// Issue 18: a file that is not safetensors (here the start of /etc/shadow) must not have
// its first bytes quoted back as a "header length", nor its JSON bytes as a parser excerpt.
TEST(SafetensorsHeaderTest, ErrorsQuoteNoBytesOfTheFile) {
  MemStore store;
  const std::string shadow = "root:*:20000:0:99999:7:::\ndaemon:*:20000:0:99999:7:::\n";
  uint64_t as_length = 0;
  std::memcpy(&as_length, shadow.data(), 8);
  ASSERT_TRUE(store.Put("shadow", shadow).ok());
  auto h = ReadSafetensorsHeader(store, "shadow");
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().message().find(std::to_string(as_length)), std::string::npos) << h.status();
  EXPECT_EQ(h.status().message().find("root"), std::string::npos) << h.status();
  EXPECT_NE(h.status().message().find("not a safetensors file"), std::string::npos) << h.status();

  // A length within the file and the limit, over bytes that are not JSON.
  const std::string body = "{secret-password-123}";
  ASSERT_TRUE(store.Put("notjson", U64(body.size()) + body).ok());
  h = ReadSafetensorsHeader(store, "notjson");
  ASSERT_FALSE(h.ok());
  EXPECT_NE(h.status().message().find("malformed JSON"), std::string::npos) << h.status();
  EXPECT_EQ(h.status().message().find("secret"), std::string::npos) << h.status();
  EXPECT_EQ(h.status().message().find("last read"), std::string::npos) << h.status();
}

// Issue 18 defect 7: a header longer than the process's limit is refused before it is read,
// and a header waits for the parse budget (RESOURCE_EXHAUSTED when it stays taken).
TEST(SafetensorsHeaderTest, HeaderReadsObeyTheProcessLimits) {
  MemStore store;
  const std::string json = R"({"__metadata__": {"pad": ")" + std::string(1000, 'p') + R"("}})";
  ASSERT_TRUE(store.Put("m.safetensors", File(json)).ok());
  ASSERT_TRUE(ReadSafetensorsHeader(store, "m.safetensors").ok());

  struct RestoreLimits {
    ~RestoreLimits() { EXPECT_TRUE(SetSafetensorsHeaderLimits(SafetensorsHeaderLimits()).ok()); }
  } restore;  // the limits are process-wide
  SafetensorsHeaderLimits limits;
  limits.max_header_bytes = 512;
  ASSERT_TRUE(SetSafetensorsHeaderLimits(limits).ok());
  auto h = ReadSafetensorsHeader(store, "m.safetensors");
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument) << h.status();
  EXPECT_NE(h.status().message().find("exceeds the limit of 512 bytes"), std::string::npos)
      << h.status();

  limits = SafetensorsHeaderLimits();
  limits.parse_budget_bytes = 4096;
  limits.wait_ms = 0;
  ASSERT_TRUE(SetSafetensorsHeaderLimits(limits).ok());
  EXPECT_EQ(SafetensorsHeaderBudget()->capacity(), 4096u);
  {
    auto taken = SafetensorsHeaderBudget()->Acquire(4000, absl::ZeroDuration());
    ASSERT_TRUE(taken.ok());
    h = ReadSafetensorsHeader(store, "m.safetensors");
    EXPECT_EQ(h.status().code(), absl::StatusCode::kResourceExhausted) << h.status();
    EXPECT_NE(h.status().message().find("m.safetensors"), std::string::npos) << h.status();
    EXPECT_NE(h.status().message().find("safetensors header parsing"), std::string::npos)
        << h.status();
  }
  EXPECT_TRUE(ReadSafetensorsHeader(store, "m.safetensors").ok());
  EXPECT_EQ(SafetensorsHeaderBudget()->in_use(), 0u);  // released after the parse
  EXPECT_GE(SafetensorsHeaderBudget()->peak_in_use(), json.size());

  limits.max_header_bytes = 0;
  EXPECT_EQ(SetSafetensorsHeaderLimits(limits).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsHeaderTest, AcceptsEdgeCases) {
  MemStore store;
  // Zero-size tensors may sit anywhere on the boundary, scalars are one element, unknown
  // fields are ignored, whitespace and padding are fine.
  const std::string json =
      R"(  {"z": {"dtype": "F16", "shape": [0, 7], "data_offsets": [4, 4]},
            "s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "extra": true},
            "__metadata__": {}}       )";
  ASSERT_TRUE(store.Put("ok.safetensors", File(json, "abcd")).ok());
  auto h = ReadSafetensorsHeader(store, "ok.safetensors");
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_EQ(h->tensors().size(), 2u);
  EXPECT_EQ(h->tensors()[0].name, "s");
  EXPECT_EQ(h->tensors()[1].name, "z");
  EXPECT_EQ(h->data_size(), 4u);
  EXPECT_TRUE(h->metadata().empty());
  // Parse directly, with an explicit file size.
  auto p = SafetensorsHeader::Parse("{}", 10, "direct");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->data_offset(), 10u);
  ExpectError(SafetensorsHeader::Parse("{}", 9, "direct").status(), absl::StatusCode::kDataLoss,
              "direct: truncated file");
}

// Every truncation and many random mutations of a valid file: a Status, never a crash.
TEST(SafetensorsHeaderTest, TruncationsAndMutationsNeverCrash) {
  MemStore store;
  auto w = SafetensorsWriter::Create(
      store, "v.safetensors", {{"a", DType::kF16, {3, 2}}, {"b", DType::kI32, {4}}}, {{"m", "x"}});
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->WriteTensorData("a", std::string(12, '\1')).ok());
  ASSERT_TRUE((*w)->WriteTensorData("b", std::string(16, '\2')).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  const std::string valid = *store.ReadAll("v.safetensors");
  for (size_t len = 0; len < valid.size(); ++len) {
    ASSERT_TRUE(store.Put("t.safetensors", valid.substr(0, len)).ok());
    auto h = ReadSafetensorsHeader(store, "t.safetensors");
    EXPECT_FALSE(h.ok()) << "truncated to " << len;
  }
  std::mt19937 rng(3);
  int accepted = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string m = valid;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) {
      m[rng() % m.size()] = static_cast<char>(rng() & 0xFF);
    }
    ASSERT_TRUE(store.Put("m.safetensors", m).ok());
    auto h = ReadSafetensorsHeader(store, "m.safetensors");
    if (h.ok()) {
      ++accepted;  // e.g. a mutated data byte: the header is still valid
      for (const TensorInfo& t : h->tensors()) {
        EXPECT_LE(t.data_end, h->data_size());
        EXPECT_TRUE(ReadTensorBytes(store, "m.safetensors", *h, t).ok());
      }
    }
  }
  EXPECT_GT(accepted, 0);
}


// A Hessian file that records "sha256.<tensor>" (what REDUCE writes) is verified on every
// read; one without is read as before.
TEST(HessianFileTest, RecordedTensorChecksumsAreVerifiedOnRead) {
  MemStore store;
  const std::vector<float> h = {2.0f, 0.5f, 0.5f, 3.0f};
  const std::string bytes(reinterpret_cast<const char*>(h.data()), h.size() * sizeof(float));
  std::map<std::string, std::string> metadata = {
      {"alias.model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"},
      {"sha256.model.layers.0.self_attn.q_proj", Sha256Hex(bytes)},
      {"n_tokens", "32"}};
  auto w = SafetensorsWriter::Create(store, "h.safetensors",
                                     {{"model.layers.0.self_attn.q_proj", DType::kF32, {2, 2}}},
                                     metadata);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->WriteTensorData("model.layers.0.self_attn.q_proj", bytes).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  auto file = HessianFile::Open(store, "h.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto read = file->Read(store, "model.layers.0.self_attn.k_proj", 2);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, h);

  // One flipped byte of the tensor: DATA_LOSS naming the tensor and the module read.
  auto all = store.ReadAll("h.safetensors");
  ASSERT_TRUE(all.ok());
  std::string corrupt = *all;
  corrupt[corrupt.size() - 2] ^= 0x01;
  ASSERT_TRUE(store.Put("h.safetensors", corrupt).ok());
  read = file->Read(store, "model.layers.0.self_attn.k_proj", 2);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kDataLoss) << read.status();
  EXPECT_NE(read.status().message().find("model.layers.0.self_attn.q_proj"), std::string::npos)
      << read.status();
  EXPECT_NE(read.status().message().find("k_proj"), std::string::npos) << read.status();

  // Without a recorded checksum the same bytes are read as they are.
  metadata.erase("sha256.model.layers.0.self_attn.q_proj");
  w = SafetensorsWriter::Create(store, "plain.safetensors",
                                {{"model.layers.0.self_attn.q_proj", DType::kF32, {2, 2}}},
                                metadata);
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->WriteTensorData("model.layers.0.self_attn.q_proj", bytes).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  auto plain = HessianFile::Open(store, "plain.safetensors");
  ASSERT_TRUE(plain.ok());
  read = plain->Read(store, "model.layers.0.self_attn.q_proj", 2);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, h);
}

}  // namespace
}  // namespace qforge

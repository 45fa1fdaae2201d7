#include "common/safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <set>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/json_error.h"
#include "nlohmann/json.hpp"
#include "base/float16.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors decoding assumes a little-endian host");

namespace qforge {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kIndexName = "model.safetensors.index.json";
constexpr std::string_view kSingleName = "model.safetensors";
constexpr std::string_view kSuffix = ".safetensors";
// A valid safetensors header nests 3 levels (header, tensor entry, shape); an index 3.
constexpr int kMaxJsonDepth = 32;

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeEntry kDTypes[] = {
    {DType::kBool, "BOOL", 1}, {DType::kU8, "U8", 1},     {DType::kI8, "I8", 1},
    {DType::kI16, "I16", 2},   {DType::kU16, "U16", 2},   {DType::kI32, "I32", 4},
    {DType::kU32, "U32", 4},   {DType::kI64, "I64", 8},   {DType::kU64, "U64", 8},
    {DType::kF16, "F16", 2},   {DType::kBF16, "BF16", 2}, {DType::kF32, "F32", 4},
    {DType::kF64, "F64", 8},
};

const DTypeEntry* FindDType(DType d) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == d) return &e;
  }
  return nullptr;
}

// Offset of the first byte that is not part of well-formed UTF-8 (shortest form, no
// surrogates, <= U+10FFFF), or npos.
size_t FindInvalidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp, min;
    if ((b0 & 0xE0) == 0xC0) {
      len = 2, cp = b0 & 0x1Fu, min = 0x80;
    } else if ((b0 & 0xF0) == 0xE0) {
      len = 3, cp = b0 & 0x0Fu, min = 0x800;
    } else if ((b0 & 0xF8) == 0xF0) {
      len = 4, cp = b0 & 0x07u, min = 0x10000;
    } else {
      return i;
    }
    if (i + len > s.size()) return i;
    for (size_t k = 1; k < len; ++k) {
      const unsigned char b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (b & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

// Depth of the deepest array/object nesting (strings skipped), without building anything;
// stops counting once `limit` is exceeded. Guards the DOM parser against pathological input.
int MaxNesting(std::string_view text, int limit) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      max_depth = std::max(max_depth, ++depth);
      if (max_depth > limit) return max_depth;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return max_depth;
}

// Finds the first duplicate object key of a JSON text in one SAX pass (nothing built):
// duplicate() names it with the keys of the objects and arrays around it, "'a'.'b'", or is
// empty. Linear in the text: nlohmann's DOM parser with a callback rescans an object's
// members at the end of each member object, quadratic in a header of thousands of tensors.
class DuplicateKeyFinder final : public nlohmann::json_sax<Json> {
 public:
  const std::string& duplicate() const { return duplicate_; }

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    open_objects_.emplace_back();
    path_.push_back(last_key_);
    return true;
  }
  bool key(string_t& key) override {
    last_key_ = key;
    if (!open_objects_.empty() && !open_objects_.back().insert(key).second) {
      std::string where;
      for (size_t i = 1; i < path_.size(); ++i) absl::StrAppend(&where, "'", path_[i], "'.");
      duplicate_ = Cat(where, "'", key, "'");
      return false;  // the first one is enough
    }
    return true;
  }
  bool end_object() override {
    if (!open_objects_.empty()) open_objects_.pop_back();
    if (!path_.empty()) path_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override {
    path_.push_back(last_key_);
    return true;
  }
  bool end_array() override {
    if (!path_.empty()) path_.pop_back();
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;  // the DOM parse, which ran first, reports malformed text
  }

 private:
  std::vector<std::set<std::string>> open_objects_;
  std::vector<std::string> path_;  // key of each open object or array in its parent
  std::string last_key_;
  std::string duplicate_;
};

// Parses JSON text, refusing duplicate object keys at any depth (nlohmann would keep the
// last one silently) and nesting deeper than kMaxJsonDepth. INVALID_ARGUMENT naming `source`.
absl::StatusOr<Json> ParseStrictJson(std::string_view text, std::string_view source) {
  if (MaxNesting(text, kMaxJsonDepth) > kMaxJsonDepth) {
    return absl::InvalidArgumentError(
        Cat(source, ": JSON nests deeper than ", kMaxJsonDepth, " levels"));
  }
  Json json;
  DuplicateKeyFinder duplicates;
  try {
    json = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/true);
    Json::sax_parse(text.begin(), text.end(), &duplicates);
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(
        Cat(source, ": malformed JSON at byte ", e.byte, ": ", JsonErrorWithoutInput(e)));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(Cat(source, ": out of memory parsing JSON"));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(Cat(source, ": cannot parse JSON: ", JsonErrorWithoutInput(e)));
  }
  if (!duplicates.duplicate().empty()) {
    return absl::InvalidArgumentError(Cat(source, ": duplicate key ", duplicates.duplicate()));
  }
  return json;
}

std::string JsonTypeName(const Json& j) {
  if (j.is_number_float()) return "a non-integer number";
  if (j.is_number_integer()) return "an integer";
  return Cat("a", j.is_object() || j.is_array() ? "n " : " ", j.type_name());
}

// Stores a non-negative JSON integer in *out; false for anything else.
bool GetUnsigned(const Json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = static_cast<uint64_t>(v);
    return true;
  }
  return false;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return Cat("[", absl::StrJoin(shape, ", "), "]");
}

// Product of `shape` and its byte size; false on a negative dimension or overflow
// (elements above INT64_MAX or bytes above UINT64_MAX).
bool ShapeBytes(const std::vector<int64_t>& shape, size_t elem_size, int64_t* numel,
                uint64_t* bytes) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    const uint64_t ud = static_cast<uint64_t>(d);
    if (ud != 0 && n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / ud) {
      return false;
    }
    n *= ud;
  }
  if (elem_size != 0 && n > std::numeric_limits<uint64_t>::max() / elem_size) return false;
  *numel = static_cast<int64_t>(n);
  *bytes = n * elem_size;
  return true;
}

std::string SourceName(ObjectStore& store, std::string_view key) {
  return Cat(store.uri(), "/", key);
}

// Checks writer tensor declarations; fills the byte size of each.
absl::Status ValidateSpecs(const std::vector<TensorSpec>& specs, std::string_view where,
                           std::vector<uint64_t>* bytes) {
  std::set<std::string_view> names;
  bytes->clear();
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    if (s.name.empty()) {
      return absl::InvalidArgumentError(Cat(where, ": tensor #", i, " has an empty name"));
    }
    if (s.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          Cat(where, ": '__metadata__' is reserved and cannot name a tensor"));
    }
    if (FindInvalidUtf8(s.name) != std::string_view::npos) {
      return absl::InvalidArgumentError(
          Cat(where, ": tensor name '", absl::CHexEscape(s.name), "' is not valid UTF-8"));
    }
    if (!names.insert(s.name).second) {
      return absl::InvalidArgumentError(Cat(where, ": tensor '", s.name, "' is declared twice"));
    }
    const DTypeEntry* d = FindDType(s.dtype);
    if (d == nullptr) {
      return absl::InvalidArgumentError(
          Cat(where, ": tensor '", s.name, "' has an invalid dtype value"));
    }
    int64_t numel = 0;
    uint64_t b = 0;
    if (!ShapeBytes(s.shape, d->size, &numel, &b)) {
      return absl::InvalidArgumentError(Cat(where, ": tensor '", s.name, "' shape ",
                                            ShapeString(s.shape),
                                            " has a negative dimension or overflows"));
    }
    bytes->push_back(b);
  }
  return absl::OkStatus();
}

std::string EncodeU64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i)
    out[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
  return out;
}

uint64_t DecodeU64(std::string_view b) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[static_cast<size_t>(i)]);
  return v;
}

}  // namespace

// ---- DType --------------------------------------------------------------------------------

absl::StatusOr<DType> ParseDType(std::string_view name) {
  for (const DTypeEntry& e : kDTypes) {
    if (name == e.name) return e.dtype;
  }
  return absl::InvalidArgumentError(Cat("unknown dtype '", name, "'"));
}

const char* DTypeName(DType d) {
  const DTypeEntry* e = FindDType(d);
  return e == nullptr ? "INVALID" : e->name;
}

size_t DTypeSize(DType d) {
  const DTypeEntry* e = FindDType(d);
  return e == nullptr ? 0 : e->size;
}

int64_t TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint64_t TensorInfo::num_bytes() const {
  return static_cast<uint64_t>(num_elements()) * DTypeSize(dtype);
}

// ---- SafetensorsHeader --------------------------------------------------------------------

absl::StatusOr<SafetensorsHeader> SafetensorsHeader::Parse(std::string_view json,
                                                           uint64_t file_size,
                                                           std::string_view source) {
  const uint64_t n = json.size();
  if (n == 0) {
    return absl::InvalidArgumentError(Cat(source, ": header length is 0"));
  }
  if (n > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(Cat(source, ": header length ", n, " exceeds the limit of ",
                                          kMaxSafetensorsHeaderBytes, " bytes"));
  }
  SafetensorsHeader h;
  h.data_offset_ = 8 + n;
  if (h.data_offset_ > file_size) {
    return absl::DataLossError(Cat(source, ": truncated file: the header ends at byte ",
                                   h.data_offset_, " but the file has ", file_size, " bytes"));
  }
  h.data_size_ = file_size - h.data_offset_;
  if (const size_t bad = FindInvalidUtf8(json); bad != std::string_view::npos) {
    return absl::InvalidArgumentError(
        Cat(source, ": header is not valid UTF-8 (byte ", bad, " of the header)"));
  }
  QF_ASSIGN_OR_RETURN(Json root, ParseStrictJson(json, Cat(source, ": header")));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        Cat(source, ": header is ", JsonTypeName(root), ", expected a JSON object"));
  }
  for (const auto& [name, entry] : root.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(Cat(source, ": __metadata__ is ", JsonTypeName(entry),
                                              ", expected an object of strings"));
      }
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) {
          return absl::InvalidArgumentError(Cat(source, ": __metadata__ entry '", k, "' is ",
                                                JsonTypeName(v), ", expected a string"));
        }
        h.metadata_.emplace(k, v.get<std::string>());
      }
      continue;
    }
    const std::string where = Cat(source, ": tensor '", name, "'");
    if (name.empty()) {
      return absl::InvalidArgumentError(Cat(source, ": a tensor has an empty name"));
    }
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(
          Cat(where, ": entry is ", JsonTypeName(entry), ", expected an object"));
    }
    TensorInfo t;
    t.name = name;
    // dtype
    auto it = entry.find("dtype");
    if (it == entry.end()) return absl::InvalidArgumentError(Cat(where, ": no 'dtype'"));
    if (!it->is_string()) {
      return absl::InvalidArgumentError(
          Cat(where, ": 'dtype' is ", JsonTypeName(*it), ", expected a string"));
    }
    absl::StatusOr<DType> dtype = ParseDType(it->get<std::string>());
    if (!dtype.ok()) {
      return absl::InvalidArgumentError(Cat(where, ": ", dtype.status().message()));
    }
    t.dtype = *dtype;
    // shape
    it = entry.find("shape");
    if (it == entry.end()) return absl::InvalidArgumentError(Cat(where, ": no 'shape'"));
    if (!it->is_array()) {
      return absl::InvalidArgumentError(
          Cat(where, ": 'shape' is ", JsonTypeName(*it), ", expected an array"));
    }
    for (size_t i = 0; i < it->size(); ++i) {
      uint64_t d = 0;
      if (!GetUnsigned((*it)[i], &d) ||
          d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(Cat(where, ": shape[", i, "] is ", (*it)[i].dump(),
                                              ", expected a non-negative integer"));
      }
      t.shape.push_back(static_cast<int64_t>(d));
    }
    int64_t numel = 0;
    uint64_t bytes = 0;
    if (!ShapeBytes(t.shape, DTypeSize(t.dtype), &numel, &bytes)) {
      return absl::InvalidArgumentError(Cat(where, ": shape ", ShapeString(t.shape), " of ",
                                            DTypeName(t.dtype), " overflows 64 bits"));
    }
    // data_offsets
    it = entry.find("data_offsets");
    if (it == entry.end()) {
      return absl::InvalidArgumentError(Cat(where, ": no 'data_offsets'"));
    }
    if (!it->is_array() || it->size() != 2) {
      return absl::InvalidArgumentError(
          Cat(where, ": 'data_offsets' is ", it->dump(), ", expected [begin, end]"));
    }
    if (!GetUnsigned((*it)[0], &t.data_begin) || !GetUnsigned((*it)[1], &t.data_end)) {
      return absl::InvalidArgumentError(
          Cat(where, ": 'data_offsets' ", it->dump(), " are not non-negative integers"));
    }
    if (t.data_begin > t.data_end) {
      return absl::InvalidArgumentError(
          Cat(where, ": data_offsets begin ", t.data_begin, " > end ", t.data_end));
    }
    if (t.data_end - t.data_begin != bytes) {
      return absl::InvalidArgumentError(Cat(where, ": data_offsets [", t.data_begin, ", ",
                                            t.data_end, ") hold ", t.data_end - t.data_begin,
                                            " bytes but ", DTypeName(t.dtype), " ",
                                            ShapeString(t.shape), " needs ", bytes));
    }
    if (t.data_end > h.data_size_) {
      return absl::DataLossError(Cat(where, ": truncated file: data_offsets [", t.data_begin, ", ",
                                     t.data_end, ") extend past the end of the data section (",
                                     h.data_size_, " bytes)"));
    }
    h.tensors_.push_back(std::move(t));
  }
  std::sort(h.tensors_.begin(), h.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.data_begin != b.data_begin) return a.data_begin < b.data_begin;
    if (a.data_end != b.data_end) return a.data_end < b.data_end;
    return a.name < b.name;
  });
  // The data must be covered exactly: no overlap, no gap, nothing after the last tensor.
  uint64_t covered = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : h.tensors_) {
    if (t.data_begin < covered) {
      return absl::InvalidArgumentError(
          Cat(source, ": tensors '", prev->name, "' [", prev->data_begin, ", ", prev->data_end,
              ") and '", t.name, "' [", t.data_begin, ", ", t.data_end, ") overlap"));
    }
    if (t.data_begin > covered) {
      return absl::InvalidArgumentError(Cat(source, ": ", t.data_begin - covered, " unused bytes [",
                                            covered, ", ", t.data_begin, ") before tensor '",
                                            t.name, "' (tensor data must be contiguous)"));
    }
    covered = t.data_end;
    prev = &t;
  }
  if (covered != h.data_size_) {
    return absl::InvalidArgumentError(Cat(
        source, ": ", h.data_size_ - covered, " unused bytes after the last tensor (data ends at ",
        covered, ", the data section has ", h.data_size_, " bytes)"));
  }
  for (size_t i = 0; i < h.tensors_.size(); ++i) h.index_.emplace(h.tensors_[i].name, i);
  return h;
}

const TensorInfo* SafetensorsHeader::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

struct HeaderLimitsState {
  absl::Mutex mu;
  SafetensorsHeaderLimits limits ABSL_GUARDED_BY(mu);
  std::shared_ptr<ByteBudget> budget ABSL_GUARDED_BY(mu);
};

HeaderLimitsState& HeaderLimitsNow() {
  static HeaderLimitsState* state = [] {
    auto* s = new HeaderLimitsState;
    absl::MutexLock lock(&s->mu);
    s->budget = std::make_shared<ByteBudget>(s->limits.parse_budget_bytes,
                                             "safetensors header parsing");
    return s;
  }();
  return *state;
}

}  // namespace

absl::Status SetSafetensorsHeaderLimits(const SafetensorsHeaderLimits& limits) {
  if (limits.max_header_bytes == 0 || limits.max_header_bytes > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(Cat("max_header_bytes: ", limits.max_header_bytes,
                                          " is not within 1..", kMaxSafetensorsHeaderBytes));
  }
  HeaderLimitsState& s = HeaderLimitsNow();
  absl::MutexLock lock(&s.mu);
  s.limits = limits;
  s.budget = std::make_shared<ByteBudget>(limits.parse_budget_bytes, "safetensors header parsing");
  return absl::OkStatus();
}

std::shared_ptr<ByteBudget> SafetensorsHeaderBudget() {
  HeaderLimitsState& s = HeaderLimitsNow();
  absl::MutexLock lock(&s.mu);
  return s.budget;
}

absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(ObjectStore& store, std::string_view key) {
  SafetensorsHeaderLimits limits;
  std::shared_ptr<ByteBudget> budget;
  {
    HeaderLimitsState& s = HeaderLimitsNow();
    absl::MutexLock lock(&s.mu);
    limits = s.limits;
    budget = s.budget;
  }
  const std::string source = SourceName(store, key);
  QF_ASSIGN_OR_RETURN(ObjectInfo info, store.Stat(key));
  if (info.size < 8) {
    return absl::DataLossError(Cat(source, ": truncated file: ", info.size,
                                   " bytes, a safetensors file starts with an 8-byte "
                                   "header length"));
  }
  std::string prefix;
  QF_RETURN_IF_ERROR(store.ReadRange(key, 0, 8, &prefix));
  const uint64_t n = DecodeU64(prefix);
  // The length's value is not echoed: these are the file's first 8 bytes, and a file that is
  // not safetensors at all would have them quoted in the error (issue 18).
  if (n == 0) return absl::InvalidArgumentError(Cat(source, ": header length is 0"));
  if (n > limits.max_header_bytes) {
    return absl::InvalidArgumentError(
        Cat(source, ": not a safetensors file, a corrupt one, or a header too large for this "
                    "process: the 8-byte header length exceeds the limit of ",
            limits.max_header_bytes, " bytes"));
  }
  if (n > info.size - 8) {
    return absl::DataLossError(
        Cat(source, ": truncated or not a safetensors file: the 8-byte header length exceeds "
                    "the file size (", info.size, " bytes)"));
  }
  // The JSON and its parse live until Parse returns: within the process-wide budget.
  absl::StatusOr<ByteBudget::Grant> grant =
      budget->Acquire(n, absl::Milliseconds(limits.wait_ms));
  if (!grant.ok()) {
    return absl::ResourceExhaustedError(
        Cat(source, ": the header (", n, " bytes) waited too long to be read: ",
            grant.status().message()));
  }
  std::string json;
  absl::Status s = store.ReadRange(key, 8, n, &json);
  if (absl::IsOutOfRange(s)) {
    return absl::DataLossError(Cat(source, ": changed while being read: ", s.message()));
  }
  QF_RETURN_IF_ERROR(s);
  return SafetensorsHeader::Parse(json, info.size, source);
}

absl::StatusOr<std::string> ReadTensorBytes(ObjectStore& store, std::string_view key,
                                            const SafetensorsHeader& h, const TensorInfo& t) {
  if (t.data_end < t.data_begin || t.data_end > h.data_size()) {
    return absl::InvalidArgumentError(Cat(SourceName(store, key), ": tensor '", t.name,
                                          "' offsets [", t.data_begin, ", ", t.data_end,
                                          ") do not belong to this header"));
  }
  std::string bytes;
  absl::Status s =
      store.ReadRange(key, h.data_offset() + t.data_begin, t.data_end - t.data_begin, &bytes);
  if (absl::IsOutOfRange(s)) {
    return absl::DataLossError(Cat(SourceName(store, key), ": tensor '", t.name,
                                   "': the file shrank since its header was read: ", s.message()));
  }
  QF_RETURN_IF_ERROR(s);
  return bytes;
}

absl::StatusOr<std::vector<float>> DecodeToF32(DType dtype, std::string_view bytes,
                                               std::string_view what) {
  const size_t size = DTypeSize(dtype);
  if (dtype != DType::kF16 && dtype != DType::kBF16 && dtype != DType::kF32 &&
      dtype != DType::kF64) {
    return absl::InvalidArgumentError(Cat(what, ": dtype ", DTypeName(dtype),
                                          " cannot be read as float32 (only F16, BF16, "
                                          "F32 and F64 can)"));
  }
  if (bytes.size() % size != 0) {
    return absl::InvalidArgumentError(Cat(what, ": ", bytes.size(),
                                          " bytes is not a whole number of ", DTypeName(dtype),
                                          " elements"));
  }
  const size_t n = bytes.size() / size;
  std::vector<float> out(n);
  const char* p = bytes.data();
  switch (dtype) {
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = qforge::HalfToFloat(h);
      }
      break;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, p + 2 * i, 2);
        out[i] = qforge::BFloat16ToFloat(b);
      }
      break;
    case DType::kF32:
      if (n != 0) std::memcpy(out.data(), p, n * sizeof(float));
      break;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, p + 8 * i, 8);
        out[i] = static_cast<float>(d);
      }
      break;
    default:
      break;
  }
  return out;
}

absl::StatusOr<std::vector<float>> ReadTensorAsF32(ObjectStore& store, std::string_view key,
                                                   const SafetensorsHeader& h,
                                                   const TensorInfo& t) {
  const std::string what = Cat(SourceName(store, key), ": tensor '", t.name, "'");
  if (t.dtype != DType::kF16 && t.dtype != DType::kBF16 && t.dtype != DType::kF32 &&
      t.dtype != DType::kF64) {
    // Checked before reading, so a large integer tensor is not fetched for nothing.
    return DecodeToF32(t.dtype, {}, what).status();
  }
  QF_ASSIGN_OR_RETURN(std::string bytes, ReadTensorBytes(store, key, h, t));
  return DecodeToF32(t.dtype, bytes, what);
}

// ---- SafetensorsModel ---------------------------------------------------------------------

absl::StatusOr<SafetensorsModel> SafetensorsModel::Open(ObjectStore& store, std::string_view dir) {
  while (!dir.empty() && dir.back() == '/') dir.remove_suffix(1);
  if (!dir.empty()) QF_RETURN_IF_ERROR(ValidateObjectKey(dir));
  SafetensorsModel model;
  model.dir_ = std::string(dir);
  const std::string where = dir.empty() ? store.uri() : SourceName(store, dir);

  // Which layout?
  const auto exists = [&](const std::string& key) -> absl::StatusOr<bool> {
    absl::StatusOr<ObjectInfo> info = store.Stat(key);
    if (info.ok()) return true;
    if (absl::IsNotFound(info.status())) return false;
    return info.status();
  };
  const std::string index_key = JoinKey(dir, kIndexName);
  QF_ASSIGN_OR_RETURN(bool sharded, exists(index_key));
  if (!sharded) {
    std::string single = JoinKey(dir, kSingleName);
    QF_ASSIGN_OR_RETURN(bool has_single, exists(single));
    if (!has_single) {
      const std::string prefix = dir.empty() ? "" : Cat(dir, "/");
      QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> objects, store.List(prefix));
      std::vector<std::string> candidates;
      for (const ObjectInfo& o : objects) {
        const std::string_view rest = std::string_view(o.key).substr(prefix.size());
        if (rest.find('/') == std::string_view::npos && rest.size() > kSuffix.size() &&
            rest.substr(rest.size() - kSuffix.size()) == kSuffix) {
          candidates.push_back(o.key);
        }
      }
      if (objects.empty()) {
        return absl::NotFoundError(Cat(where, " does not exist (nothing is stored under it); give "
                                       "the directory of a Hugging Face safetensors model"));
      }
      if (candidates.empty()) {
        return absl::NotFoundError(Cat("no safetensors model in ", where, ": expected ", kIndexName,
                                       ", ", kSingleName, " or a single *.safetensors file"));
      }
      if (candidates.size() > 1) {
        return absl::InvalidArgumentError(Cat("ambiguous safetensors model in ", where, ": no ",
                                              kIndexName, " or ", kSingleName, " and ",
                                              candidates.size(), " *.safetensors files (",
                                              absl::StrJoin(candidates, ", "), ")"));
      }
      single = candidates.front();
    }
    QF_ASSIGN_OR_RETURN(SafetensorsHeader header, ReadSafetensorsHeader(store, single));
    model.shard_keys_.push_back(single);
    model.headers_.push_back(std::make_shared<const SafetensorsHeader>(std::move(header)));
    for (const TensorInfo& t : model.headers_.front()->tensors()) {
      model.tensors_.emplace(t.name, std::make_pair(size_t{0}, &t));
    }
    return model;
  }

  // Sharded: read and validate the index.
  model.index_key_ = index_key;
  const std::string index_source = SourceName(store, index_key);
  QF_ASSIGN_OR_RETURN(ObjectInfo index_info, store.Stat(index_key));
  if (index_info.size > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(Cat(index_source, ": ", index_info.size,
                                          " bytes exceeds the limit of ",
                                          kMaxSafetensorsHeaderBytes));
  }
  QF_ASSIGN_OR_RETURN(std::string index_text, store.ReadAll(index_key));
  if (const size_t bad = FindInvalidUtf8(index_text); bad != std::string_view::npos) {
    return absl::InvalidArgumentError(Cat(index_source, ": not valid UTF-8 (byte ", bad, ")"));
  }
  QF_ASSIGN_OR_RETURN(Json index, ParseStrictJson(index_text, index_source));
  if (!index.is_object()) {
    return absl::InvalidArgumentError(
        Cat(index_source, ": is ", JsonTypeName(index), ", expected a JSON object"));
  }
  auto wm = index.find("weight_map");
  if (wm == index.end()) {
    return absl::InvalidArgumentError(Cat(index_source, ": no 'weight_map'"));
  }
  if (!wm->is_object()) {
    return absl::InvalidArgumentError(
        Cat(index_source, ": 'weight_map' is ", JsonTypeName(*wm), ", expected an object"));
  }
  std::map<std::string, std::string> weight_map;           // tensor -> shard key
  std::map<std::string, std::vector<std::string>> shards;  // shard key -> tensors
  for (const auto& [tensor, file] : wm->items()) {
    if (!file.is_string()) {
      return absl::InvalidArgumentError(Cat(index_source, ": weight_map['", tensor, "'] is ",
                                            JsonTypeName(file), ", expected a shard file name"));
    }
    const std::string shard_key = JoinKey(dir, file.get<std::string>());
    if (absl::Status s = ValidateObjectKey(shard_key); !s.ok()) {
      return absl::InvalidArgumentError(
          Cat(index_source, ": weight_map['", tensor, "'] names an invalid shard: ", s.message()));
    }
    weight_map.emplace(tensor, shard_key);
    shards[shard_key].push_back(tensor);
  }
  if (weight_map.empty()) {
    return absl::InvalidArgumentError(Cat(index_source, ": 'weight_map' is empty"));
  }
  for (const auto& [shard_key, tensors] : shards) {
    absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(store, shard_key);
    if (!header.ok()) {
      return absl::Status(header.status().code(),
                          Cat(index_source, " names shard '", shard_key, "' (for tensor '",
                              tensors.front(), "'): ", header.status().message()));
    }
    for (const std::string& tensor : tensors) {
      if (header->Find(tensor) == nullptr) {
        return absl::InvalidArgumentError(Cat(index_source, ": maps tensor '", tensor,
                                              "' to shard '", shard_key,
                                              "', which has no such tensor"));
      }
    }
    model.shard_keys_.push_back(shard_key);
    model.headers_.push_back(std::make_shared<const SafetensorsHeader>(*std::move(header)));
  }
  for (size_t s = 0; s < model.headers_.size(); ++s) {
    for (const TensorInfo& t : model.headers_[s]->tensors()) {
      auto listed = weight_map.find(t.name);
      if (listed == weight_map.end()) {
        return absl::InvalidArgumentError(Cat("shard '", model.shard_keys_[s], "' holds tensor '",
                                              t.name, "', which ", index_source, " does not list"));
      }
      if (listed->second != model.shard_keys_[s]) {
        return absl::InvalidArgumentError(Cat("tensor '", t.name, "' is in two shards: '",
                                              listed->second, "' and '", model.shard_keys_[s],
                                              "'"));
      }
      model.tensors_.emplace(t.name, std::make_pair(s, &t));
    }
  }
  return model;
}

std::vector<std::string> SafetensorsModel::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, loc] : tensors_) names.push_back(name);
  return names;
}

absl::StatusOr<SafetensorsModel::Location> SafetensorsModel::Find(std::string_view tensor) const {
  auto it = tensors_.find(tensor);
  if (it == tensors_.end()) {
    return absl::NotFoundError(Cat(
        "tensor '", tensor, "' is not in the model", dir_.empty() ? "" : Cat(" in '", dir_, "'"),
        " (", tensors_.size(), " tensors in ", shard_keys_.size(), " file(s))"));
  }
  const auto& [shard, info] = it->second;
  return Location{shard_keys_[shard], headers_[shard].get(), info};
}

uint64_t SafetensorsModel::total_tensor_bytes() const {
  uint64_t total = 0;
  for (const auto& [name, loc] : tensors_) total += loc.second->num_bytes();
  return total;
}

absl::StatusOr<std::vector<float>> SafetensorsModel::ReadF32(ObjectStore& store,
                                                             std::string_view tensor) const {
  QF_ASSIGN_OR_RETURN(Location loc, Find(tensor));
  return ReadTensorAsF32(store, loc.key, *loc.header, *loc.info);
}

// ---- SafetensorsWriter --------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    ObjectStore& store, std::string_view key, std::vector<TensorSpec> tensors,
    std::map<std::string, std::string> metadata) {
  const std::string source = SourceName(store, key);
  std::vector<uint64_t> bytes;
  QF_RETURN_IF_ERROR(ValidateSpecs(tensors, source, &bytes));
  auto format = metadata.find("format");
  if (format != metadata.end() && format->second != "pt") {
    return absl::InvalidArgumentError(
        Cat(source, ": __metadata__.format must be 'pt', got '", format->second, "'"));
  }
  metadata["format"] = "pt";
  for (const auto& [k, v] : metadata) {
    if (FindInvalidUtf8(k) != std::string_view::npos ||
        FindInvalidUtf8(v) != std::string_view::npos) {
      return absl::InvalidArgumentError(
          Cat(source, ": __metadata__ entry '", absl::CHexEscape(Sv(k)), "' is not valid UTF-8"));
    }
  }

  // The header is {"__metadata__": {...}, "<name>": {"dtype", "shape", "data_offsets"}, ...}
  // in tensor order, written member by member (what OrderedJson's dump writes for the whole
  // object): inserting into an OrderedJson looks every key up linearly, quadratic in the
  // tensors of a shard (seconds for the tens of thousands of an assembled artifact's shard).
  // ValidateSpecs has refused duplicate names.
  auto writer = std::unique_ptr<SafetensorsWriter>(new SafetensorsWriter());
  std::string json;
  try {
    OrderedJson meta = OrderedJson::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    json = Cat("{", OrderedJson(std::string(kMetadataKey)).dump(), ":", meta.dump());
    uint64_t offset = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorSpec& t = tensors[i];
      if (offset > std::numeric_limits<uint64_t>::max() - bytes[i]) {
        return absl::InvalidArgumentError(Cat(source, ": total data size overflows"));
      }
      const OrderedJson entry = {{"dtype", DTypeName(t.dtype)},
                                 {"shape", t.shape},
                                 {"data_offsets", {offset, offset + bytes[i]}}};
      absl::StrAppend(&json, ",", OrderedJson(t.name).dump(), ":", entry.dump());
      offset += bytes[i];
    }
    json.push_back('}');
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(Cat(source, ": cannot encode header: ", e.what()));
  }
  json.append((8 - json.size() % 8) % 8, ' ');  // 8 + N is then a multiple of 8
  if (json.size() > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(Cat(source, ": header of ", json.size(),
                                          " bytes exceeds the limit of ",
                                          kMaxSafetensorsHeaderBytes));
  }

  writer->key_ = std::string(key);
  writer->header_bytes_ = 8 + json.size();
  for (size_t i = 0; i < tensors.size(); ++i) {
    writer->index_.emplace(tensors[i].name, i);
    writer->slots_.push_back(Slot{std::move(tensors[i]), bytes[i], 0});
  }
  QF_ASSIGN_OR_RETURN(writer->out_, store.NewWriter(key));
  QF_RETURN_IF_ERROR(writer->out_->Append(EncodeU64(json.size())));
  QF_RETURN_IF_ERROR(writer->out_->Append(json));
  writer->SkipComplete();
  return writer;
}

SafetensorsWriter::~SafetensorsWriter() = default;

void SafetensorsWriter::SkipComplete() {
  while (current_ < slots_.size() && slots_[current_].written == slots_[current_].bytes) {
    ++current_;
  }
}

uint64_t SafetensorsWriter::total_bytes() const {
  uint64_t total = header_bytes_;
  for (const Slot& s : slots_) total += s.bytes;
  return total;
}

absl::Status SafetensorsWriter::WriteTensorData(std::string_view name, std::string_view chunk) {
  if (finished_) {
    return absl::FailedPreconditionError(
        Cat("safetensors writer for '", key_, "': WriteTensorData after Finish"));
  }
  QF_RETURN_IF_ERROR(failure_);
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::InvalidArgumentError(
        Cat("safetensors writer for '", key_, "': tensor '", name, "' was not declared"));
  }
  if (chunk.empty()) return absl::OkStatus();
  Slot& slot = slots_[it->second];
  if (it->second != current_) {
    if (current_ < slots_.size() && it->second > current_) {
      return absl::FailedPreconditionError(
          Cat("safetensors writer for '", key_, "': data for tensor '", name, "' before tensor '",
              slots_[current_].spec.name, "' is complete (", slots_[current_].written, " of ",
              slots_[current_].bytes, " bytes); tensors are written in declaration order"));
    }
    return absl::FailedPreconditionError(Cat("safetensors writer for '", key_, "': tensor '", name,
                                             "' is already complete (", slot.bytes, " bytes)"));
  }
  if (chunk.size() > slot.bytes - slot.written) {
    return absl::FailedPreconditionError(
        Cat("safetensors writer for '", key_, "': ", chunk.size(), " more bytes for tensor '", name,
            "' which has ", slot.written, " of ", slot.bytes, " bytes (",
            DTypeName(slot.spec.dtype), " ", ShapeString(slot.spec.shape), ")"));
  }
  if (absl::Status s = out_->Append(chunk); !s.ok()) {
    failure_ = s;
    return s;
  }
  slot.written += chunk.size();
  SkipComplete();
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  if (finished_) {
    return absl::FailedPreconditionError(
        Cat("safetensors writer for '", key_, "': Finish called twice"));
  }
  QF_RETURN_IF_ERROR(failure_);
  if (current_ < slots_.size()) {
    const Slot& s = slots_[current_];
    return absl::FailedPreconditionError(Cat("safetensors writer for '", key_, "': tensor '",
                                             s.spec.name, "' has ", s.written, " of ", s.bytes,
                                             " bytes"));
  }
  absl::Status s = out_->Close();
  if (!s.ok()) {
    failure_ = s;
    return s;
  }
  finished_ = true;
  return absl::OkStatus();
}

// ---- ShardedSafetensorsWriter -------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ShardedSafetensorsWriter>> ShardedSafetensorsWriter::Create(
    ObjectStore& store, std::string_view dir, std::vector<TensorSpec> tensors,
    uint64_t max_shard_bytes, std::map<std::string, std::string> metadata) {
  while (!dir.empty() && dir.back() == '/') dir.remove_suffix(1);
  const std::string where = dir.empty() ? store.uri() : SourceName(store, dir);
  if (!dir.empty()) QF_RETURN_IF_ERROR(ValidateObjectKey(dir));
  if (max_shard_bytes == 0) {
    return absl::InvalidArgumentError(
        Cat("sharded safetensors output ", where, ": max_shard_bytes must be > 0"));
  }
  std::vector<uint64_t> bytes;
  QF_RETURN_IF_ERROR(ValidateSpecs(tensors, where, &bytes));

  auto w = std::unique_ptr<ShardedSafetensorsWriter>(new ShardedSafetensorsWriter(store));
  uint64_t in_shard = 0;  // tensor bytes in the last shard
  for (size_t i = 0; i < tensors.size(); ++i) {
    // A new shard when this tensor would push a non-empty shard past the limit (a shard
    // already past it holds one oversized tensor).
    const bool full = in_shard > max_shard_bytes || bytes[i] > max_shard_bytes - in_shard;
    if (w->shard_tensors_.empty() || (!w->shard_tensors_.back().empty() && full)) {
      w->shard_tensors_.emplace_back();
      in_shard = 0;
    }
    w->shard_tensors_.back().push_back(i);
    w->tensor_shard_.push_back(w->shard_tensors_.size() - 1);
    in_shard += bytes[i];
    w->total_bytes_ += bytes[i];
  }
  if (w->shard_tensors_.empty()) w->shard_tensors_.emplace_back();  // no tensors: one file
  const size_t n = w->shard_tensors_.size();
  if (n > 99999) {
    return absl::InvalidArgumentError(Cat("sharded safetensors output ", where, ": ", n,
                                          " shards (max_shard_bytes ", max_shard_bytes,
                                          ") exceed the 5-digit shard numbering"));
  }
  for (size_t s = 0; s < n; ++s) {
    w->shard_keys_.push_back(
        n == 1 ? JoinKey(dir, kSingleName)
               : JoinKey(dir, absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, n)));
  }
  if (n > 1) w->index_key_ = JoinKey(dir, kIndexName);
  for (size_t i = 0; i < tensors.size(); ++i) w->index_.emplace(tensors[i].name, i);
  w->specs_ = std::move(tensors);
  w->metadata_ = std::move(metadata);
  QF_RETURN_IF_ERROR(w->OpenShard(0));
  return w;
}

ShardedSafetensorsWriter::~ShardedSafetensorsWriter() {
  if (finished_) return;
  open_.reset();  // discards the shard being written
  for (size_t s = 0; s < published_; ++s) (void)store_.Delete(shard_keys_[s]);
}

absl::Status ShardedSafetensorsWriter::OpenShard(size_t shard) {
  std::vector<TensorSpec> specs;
  for (size_t i : shard_tensors_[shard]) specs.push_back(specs_[i]);
  absl::StatusOr<std::unique_ptr<SafetensorsWriter>> w =
      SafetensorsWriter::Create(store_, shard_keys_[shard], std::move(specs), metadata_);
  if (!w.ok()) {
    failure_ = w.status();
    return failure_;
  }
  open_ = *std::move(w);
  open_shard_ = shard;
  return absl::OkStatus();
}

absl::Status ShardedSafetensorsWriter::FinishOpenShard() {
  absl::Status s = open_->Finish();
  if (!s.ok()) {
    // FAILED_PRECONDITION: a tensor is incomplete (the caller's order error, recoverable).
    if (!absl::IsFailedPrecondition(s)) failure_ = s;
    return s;
  }
  open_.reset();
  published_ = open_shard_ + 1;
  return absl::OkStatus();
}

absl::Status ShardedSafetensorsWriter::WriteTensorData(std::string_view name,
                                                       std::string_view chunk) {
  if (finished_) {
    return absl::FailedPreconditionError(
        "sharded safetensors writer: WriteTensorData after Finish");
  }
  QF_RETURN_IF_ERROR(failure_);
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::InvalidArgumentError(
        Cat("sharded safetensors writer: tensor '", name, "' was not declared"));
  }
  if (chunk.empty()) return absl::OkStatus();
  const size_t shard = tensor_shard_[it->second];
  if (shard < published_) {
    return absl::FailedPreconditionError(Cat("sharded safetensors writer: tensor '", name,
                                             "' is already complete (its shard ",
                                             shard_keys_[shard], " has been written)"));
  }
  // Moving on to a later shard: the open one must be complete, and shards in between can
  // only hold empty tensors.
  while (open_ == nullptr || open_shard_ != shard) {
    if (open_ != nullptr) {
      absl::Status s = FinishOpenShard();
      if (!s.ok()) {
        return absl::Status(s.code(), Cat("data for tensor '", name, "' of ", shard_keys_[shard],
                                          ": ", s.message()));
      }
    }
    QF_RETURN_IF_ERROR(OpenShard(published_));
  }
  absl::Status s = open_->WriteTensorData(name, chunk);
  if (!s.ok()) {
    if (!absl::IsFailedPrecondition(s) && !absl::IsInvalidArgument(s)) failure_ = s;
    return s;
  }
  // Publish the shard as soon as its last tensor is complete.
  if (open_->complete()) QF_RETURN_IF_ERROR(FinishOpenShard());
  return absl::OkStatus();
}

absl::Status ShardedSafetensorsWriter::Finish() {
  if (finished_) {
    return absl::FailedPreconditionError("sharded safetensors writer: Finish called twice");
  }
  QF_RETURN_IF_ERROR(failure_);
  while (published_ < shard_keys_.size()) {
    if (open_ == nullptr) QF_RETURN_IF_ERROR(OpenShard(published_));
    QF_RETURN_IF_ERROR(FinishOpenShard());
  }
  if (!index_key_.empty()) {
    std::map<std::string, std::string> sorted;  // tensor -> shard file name
    for (size_t i = 0; i < specs_.size(); ++i) {
      const std::string& key = shard_keys_[tensor_shard_[i]];
      const size_t slash = key.rfind('/');
      sorted[specs_[i].name] = slash == std::string::npos ? key : key.substr(slash + 1);
    }
    OrderedJson weight_map = OrderedJson::object();
    for (const auto& [tensor, file] : sorted) weight_map[tensor] = file;
    OrderedJson index = OrderedJson::object();
    index["metadata"] = {{"total_size", total_bytes_}};
    index["weight_map"] = std::move(weight_map);
    absl::Status s = store_.Put(index_key_, index.dump(2) + "\n");
    if (!s.ok()) {
      failure_ = s;
      return s;
    }
  }
  finished_ = true;
  return absl::OkStatus();
}

}  // namespace qforge

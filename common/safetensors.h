// safetensors: reading headers and tensors through an ObjectStore with ranged reads, and
// writing (optionally sharded) files in a streaming way. Format: FORMATS.md.
//
// File layout: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header, then the data
// section; every tensor's `data_offsets` [begin, end) are relative to the data section.
//
// Validation done by SafetensorsHeader::Parse (every failure is a Status, never a crash):
//   INVALID_ARGUMENT: header length N of 0 or above kMaxSafetensorsHeaderBytes; header not
//     valid UTF-8; JSON malformed, with duplicate keys (at any depth), or not an object;
//     `__metadata__` not an object of strings; a tensor entry that is not an object or lacks
//     a well-typed `dtype` (string), `shape` (array of non-negative integers) or
//     `data_offsets` (array of two non-negative integers); an empty tensor name; unknown
//     dtype; element count or byte size overflowing 64 bits; begin > end;
//     end - begin != numel * dtype size; overlapping tensors; a gap between tensors or bytes
//     after the last one (the data section must be covered exactly, as the reference
//     implementation requires).
//   DATA_LOSS: the file is truncated: shorter than 8 bytes, shorter than 8 + N, or shorter
//     than the data the header declares.
// Messages name the file (`source`) and the tensor or field concerned.
//
// Byte order: tensors are little-endian; the decoders assume a little-endian host (checked
// at compile time).
//
// Thread-safety: SafetensorsHeader and SafetensorsModel are immutable after construction
// and safe to share between threads. The writers are used by one thread at a time.
#ifndef QFORGE_COMMON_SAFETENSORS_H_
#define QFORGE_COMMON_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/byte_budget.h"
#include "common/object_store.h"

namespace qforge {

// Largest accepted JSON header (N): 100 MiB.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = uint64_t{100} << 20;

enum class DType { kBool, kU8, kI8, kI16, kU16, kI32, kU32, kI64, kU64, kF16, kBF16, kF32, kF64 };

// "F16", "BF16", "I32", ... (safetensors spelling, case-sensitive).
// INVALID_ARGUMENT "unknown dtype 'X'" otherwise.
absl::StatusOr<DType> ParseDType(std::string_view name);
// The safetensors spelling of `d` ("F16").
const char* DTypeName(DType d);
// Bytes per element (BOOL is 1).
size_t DTypeSize(DType d);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // row-major; {} is a scalar (one element)
  uint64_t data_begin = 0;     // byte offsets relative to the start of the data section
  uint64_t data_end = 0;

  // Product of the shape (1 for a scalar). Parse guarantees it does not overflow.
  int64_t num_elements() const;
  // num_elements() * DTypeSize(dtype) (== data_end - data_begin for a parsed header).
  uint64_t num_bytes() const;
};

class SafetensorsHeader {
 public:
  // Parses and validates a header. `json`: the N header bytes; `file_size`: total bytes of
  // the file (8 + N + data); `source`: the file's name for error messages.
  static absl::StatusOr<SafetensorsHeader> Parse(std::string_view json, uint64_t file_size,
                                                 std::string_view source);

  // 8 + N: absolute offset of the data section in the file.
  uint64_t data_offset() const { return data_offset_; }
  // Size of the data section (file_size - data_offset()).
  uint64_t data_size() const { return data_size_; }
  // All tensors, sorted by data_begin (ties, i.e. empty tensors, by name).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // The tensor named `name`, or nullptr. The pointer lives as long as this header.
  const TensorInfo* Find(std::string_view name) const;
  // `__metadata__` (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  uint64_t data_offset_ = 0;
  uint64_t data_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// Process-wide limits on reading headers (issue 18 defect 7: the JSON of a header and its
// parse take several times its length in memory, so concurrent large headers must not all
// be in memory at once). ReadSafetensorsHeader holds `parse_budget_bytes` worth of header
// bytes at most across all threads: a read of an N-byte header first reserves N bytes
// (the whole budget when N is larger) and waits for them, up to `wait`, in arrival order;
// then RESOURCE_EXHAUSTED. A header longer than `max_header_bytes` is INVALID_ARGUMENT
// before any of it is read. Defaults: max_header_bytes = kMaxSafetensorsHeaderBytes,
// parse_budget_bytes = 256 MiB (0: no budget), wait = 60 s.
struct SafetensorsHeaderLimits {
  uint64_t max_header_bytes = kMaxSafetensorsHeaderBytes;
  uint64_t parse_budget_bytes = uint64_t{256} << 20;
  int64_t wait_ms = 60'000;
};
// Replaces the limits (call at startup; reads already waiting keep the old budget).
// INVALID_ARGUMENT for max_header_bytes of 0 or above kMaxSafetensorsHeaderBytes.
absl::Status SetSafetensorsHeaderLimits(const SafetensorsHeaderLimits& limits);
// The budget in force now (tests read its peak_in_use()).
std::shared_ptr<ByteBudget> SafetensorsHeaderBudget();

// Reads and validates the header of safetensors object `key` with a Stat and two ranged
// reads (the 8-byte length, then the JSON), within the SafetensorsHeaderLimits. Errors: as
// Parse, plus the store's, plus RESOURCE_EXHAUSTED when the parse budget stays taken.
absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(ObjectStore& store, std::string_view key);

// The raw bytes of tensor `t` of `h` (one ranged read of t.num_bytes() bytes).
absl::StatusOr<std::string> ReadTensorBytes(ObjectStore& store, std::string_view key,
                                            const SafetensorsHeader& h, const TensorInfo& t);

// Tensor `t` converted to float32, row-major, t.num_elements() values. F16/BF16/F32/F64
// only (F64 is rounded to nearest float); other dtypes INVALID_ARGUMENT naming the tensor
// and its dtype.
absl::StatusOr<std::vector<float>> ReadTensorAsF32(ObjectStore& store, std::string_view key,
                                                   const SafetensorsHeader& h, const TensorInfo& t);

// Little-endian `bytes` of `dtype` (F16/BF16/F32/F64) -> float32. INVALID_ARGUMENT (with
// `what`, e.g. "tensor 'x' of model.safetensors", in the message) for another dtype or a
// byte count that is not a multiple of the element size.
absl::StatusOr<std::vector<float>> DecodeToF32(DType dtype, std::string_view bytes,
                                               std::string_view what);

// A Hugging Face model directory in a store: `model.safetensors.index.json` (sharded) if
// present, else `model.safetensors`, else the only `*.safetensors` directly under the
// directory. Open reads only headers (and the index). The index is validated: a JSON
// object whose `weight_map` is an object of tensor name -> shard file name (a file in the
// same directory); every listed shard exists and is a valid safetensors file; every tensor
// is in the shard the index names; no tensor is in two shards; no shard holds a tensor the
// index does not list.
//
// Errors: NOT_FOUND when the directory holds no safetensors model (or a shard named by the
// index is missing); INVALID_ARGUMENT for a malformed index, several candidate
// `*.safetensors` files without an index, or any header error above (DATA_LOSS for
// truncated files). Messages name the file and the tensor.
class SafetensorsModel {
 public:
  // `dir`: the model directory's key prefix in `store` ("" = the store root).
  static absl::StatusOr<SafetensorsModel> Open(ObjectStore& store, std::string_view dir);

  struct Location {
    std::string key;                  // the shard's key in the store
    const SafetensorsHeader* header;  // that shard's header (owned by the model)
    const TensorInfo* info;           // the tensor within it (owned by the model)
  };

  // All tensor names, sorted.
  std::vector<std::string> TensorNames() const;
  // Where `tensor` lives. NOT_FOUND naming the tensor and the model directory. The pointers
  // stay valid while this model (or a copy of it) exists; moving the model keeps them valid.
  absl::StatusOr<Location> Find(std::string_view tensor) const;
  // Keys of the shard files, sorted (one entry for an unsharded model).
  const std::vector<std::string>& shard_keys() const { return shard_keys_; }
  // The headers, parallel to shard_keys().
  const std::vector<std::shared_ptr<const SafetensorsHeader>>& headers() const { return headers_; }
  // Key of the index file, or "" for an unsharded model.
  const std::string& index_key() const { return index_key_; }
  // Number of tensors.
  size_t num_tensors() const { return tensors_.size(); }
  // Sum of all tensors' data bytes (what an index's metadata.total_size records).
  uint64_t total_tensor_bytes() const;
  // Tensor `tensor` as float32 (see ReadTensorAsF32).
  absl::StatusOr<std::vector<float>> ReadF32(ObjectStore& store, std::string_view tensor) const;

 private:
  std::string dir_;
  std::string index_key_;
  std::vector<std::string> shard_keys_;
  // Immutable and heap-allocated: Location pointers stay valid when the model is moved, and
  // copies of the model share the headers.
  std::vector<std::shared_ptr<const SafetensorsHeader>> headers_;
  std::map<std::string, std::pair<size_t, const TensorInfo*>, std::less<>> tensors_;
};

struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// Streaming writer of one safetensors object. All tensors are declared up front, so the
// header is written first (padded with spaces so that 8 + N is a multiple of 8;
// `__metadata__` always holds "format":"pt" plus the given metadata), then the data of each
// tensor in declaration order, possibly in several chunks. Finish() checks that every
// tensor is complete and publishes the object atomically (ObjectWriter::Close); destroying
// the writer before a successful Finish() leaves no object behind.
//
// Errors: Create: INVALID_ARGUMENT for an empty, duplicate, "__metadata__" or non-UTF-8
// tensor name, a negative dimension, a size overflowing 64 bits, non-UTF-8 metadata, or a
// "format" metadata entry other than "pt"; the store's errors. WriteTensorData:
// INVALID_ARGUMENT for an undeclared tensor; FAILED_PRECONDITION for data out of
// declaration order or more bytes than the tensor holds. Finish: FAILED_PRECONDITION
// naming the first incomplete tensor. After an I/O error, or after Finish(), every call
// fails.
class SafetensorsWriter {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      ObjectStore& store, std::string_view key, std::vector<TensorSpec> tensors,
      std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();

  // Appends `chunk` to tensor `name`, which must be the first incomplete tensor in
  // declaration order. An empty chunk is accepted for any declared tensor.
  absl::Status WriteTensorData(std::string_view name, std::string_view chunk);
  absl::Status Finish();

  // True when every declared tensor has all its bytes (Finish() would succeed).
  bool complete() const { return current_ == slots_.size(); }
  // The header bytes (8-byte length + padded JSON) this writer emits.
  uint64_t header_bytes() const { return header_bytes_; }
  // Header plus all tensor data: the final object size.
  uint64_t total_bytes() const;
  const std::string& key() const { return key_; }

 private:
  struct Slot {
    TensorSpec spec;
    uint64_t bytes = 0;    // declared size
    uint64_t written = 0;  // received so far
  };
  SafetensorsWriter() = default;
  // Moves `current_` past complete tensors.
  void SkipComplete();

  std::string key_;
  std::unique_ptr<ObjectWriter> out_;
  std::vector<Slot> slots_;
  std::map<std::string, size_t, std::less<>> index_;
  size_t current_ = 0;  // first incomplete slot
  uint64_t header_bytes_ = 0;
  bool finished_ = false;
  absl::Status failure_;
};

// Sharded streaming output in the Hugging Face layout. Tensors are assigned to shards in
// declaration order; a new shard starts when adding the next tensor would make the current
// one exceed `max_shard_bytes` of tensor data (a tensor bigger than that gets a shard of its
// own). One shard -> `<dir>/model.safetensors` and no index; several ->
// `<dir>/model-0000i-of-0000N.safetensors` plus `<dir>/model.safetensors.index.json`
// ({"metadata":{"total_size":<tensor bytes>},"weight_map":{tensor: shard file name}}),
// written last, so a reader that finds the index finds every shard. Only the current shard
// is open at a time; each shard is published when its last tensor is complete. Every shard
// carries `metadata` (plus "format":"pt").
//
// Errors: as SafetensorsWriter; INVALID_ARGUMENT for max_shard_bytes == 0. If the writer is
// destroyed before a successful Finish(), the shards it already published are deleted
// (best effort).
class ShardedSafetensorsWriter {
 public:
  static absl::StatusOr<std::unique_ptr<ShardedSafetensorsWriter>> Create(
      ObjectStore& store, std::string_view dir, std::vector<TensorSpec> tensors,
      uint64_t max_shard_bytes, std::map<std::string, std::string> metadata = {});
  ~ShardedSafetensorsWriter();

  absl::Status WriteTensorData(std::string_view name, std::string_view chunk);
  absl::Status Finish();

  // Keys of all shards (valid after Create), in order.
  const std::vector<std::string>& shard_keys() const { return shard_keys_; }
  // Key of the index, or "" when there is a single shard.
  const std::string& index_key() const { return index_key_; }
  // Shard number (index into shard_keys()) of each tensor, in declaration order.
  const std::vector<size_t>& tensor_shards() const { return tensor_shard_; }

 private:
  explicit ShardedSafetensorsWriter(ObjectStore& store) : store_(store) {}
  // Starts the writer of shard `shard` (no other shard is open).
  absl::Status OpenShard(size_t shard);
  // Finishes (publishes) the open shard.
  absl::Status FinishOpenShard();

  ObjectStore& store_;
  std::vector<TensorSpec> specs_;
  std::vector<size_t> tensor_shard_;                // per tensor
  std::vector<std::vector<size_t>> shard_tensors_;  // per shard: tensor indices
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::string> shard_keys_;
  std::string index_key_;
  uint64_t total_bytes_ = 0;  // all tensor data (the index's metadata.total_size)
  std::unique_ptr<SafetensorsWriter> open_;
  size_t open_shard_ = 0;
  size_t published_ = 0;  // shards [0, published_) are complete
  bool finished_ = false;
  absl::Status failure_;
};

}  // namespace qforge

#endif  // QFORGE_COMMON_SAFETENSORS_H_

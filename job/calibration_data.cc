#include "job/calibration_data.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/json_error.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/safetensors.h"
#include "common/sha256.h"
#include "nlohmann/json.hpp"

namespace qforge {
namespace {

using Json = nlohmann::json;

// The rows of a calibration file, whatever its format.
class RowSource {
 public:
  virtual ~RowSource() = default;
  virtual int64_t rows() const = 0;
  virtual int64_t length(int64_t r) const = 0;
  // "sample 3" (plus the line for JSON Lines), for messages.
  virtual std::string RowName(int64_t r) const { return Cat("sample ", r); }
  // Copies row r: ids and mask (1 everywhere without a mask). INVALID_ARGUMENT naming the row
  // and position for a mask value other than 0/1.
  virtual absl::Status Row(int64_t r, int64_t* ids, uint8_t* mask) const = 0;
};

bool IsIntegerDType(DType d) {
  switch (d) {
    case DType::kBool:
    case DType::kU8:
    case DType::kI8:
    case DType::kI16:
    case DType::kU16:
    case DType::kI32:
    case DType::kU32:
    case DType::kI64:
    case DType::kU64:
      return true;
    default:
      return false;
  }
}

// Element i of an integer tensor's little-endian bytes, widened (U64 above INT64_MAX becomes
// negative, which every caller refuses).
int64_t IntAt(DType d, const char* p, int64_t i) {
  switch (d) {
    case DType::kBool:
    case DType::kU8: {
      uint8_t v;
      std::memcpy(&v, p + i, 1);
      return v;
    }
    case DType::kI8: {
      int8_t v;
      std::memcpy(&v, p + i, 1);
      return v;
    }
    case DType::kI16: {
      int16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      return v;
    }
    case DType::kU16: {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      return v;
    }
    case DType::kI32: {
      int32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      return v;
    }
    case DType::kU32: {
      uint32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      return v;
    }
    case DType::kI64:
    case DType::kU64:
    default: {
      int64_t v;
      std::memcpy(&v, p + 8 * i, 8);
      return v;
    }
  }
}

class SafetensorsRows final : public RowSource {
 public:
  SafetensorsRows(std::string_view prefix, const char* ids, DType ids_dtype, const char* mask,
                  DType mask_dtype, int64_t rows, int64_t cols)
      : prefix_(prefix),
        ids_(ids),
        ids_dtype_(ids_dtype),
        mask_(mask),
        mask_dtype_(mask_dtype),
        rows_(rows),
        cols_(cols) {}
  int64_t rows() const override { return rows_; }
  int64_t length(int64_t) const override { return cols_; }
  absl::Status Row(int64_t r, int64_t* ids, uint8_t* mask) const override {
    for (int64_t j = 0; j < cols_; ++j) ids[j] = IntAt(ids_dtype_, ids_, r * cols_ + j);
    if (mask_ == nullptr) {
      std::memset(mask, 1, static_cast<size_t>(cols_));
      return absl::OkStatus();
    }
    for (int64_t j = 0; j < cols_; ++j) {
      const int64_t m = IntAt(mask_dtype_, mask_, r * cols_ + j);
      if (m != 0 && m != 1) {
        return absl::InvalidArgumentError(Cat(prefix_, "sample ", r, ", position ", j,
                                              ": attention_mask is ", m,
                                              "; expected 0 (padding) or 1 (token)"));
      }
      mask[j] = static_cast<uint8_t>(m);
    }
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
  const char* ids_;
  DType ids_dtype_;
  const char* mask_;
  DType mask_dtype_;
  int64_t rows_, cols_;
};

class JsonLinesRows final : public RowSource {
 public:
  int64_t rows() const override { return static_cast<int64_t>(lines_.size()); }
  int64_t length(int64_t r) const override { return offsets_[r + 1] - offsets_[r]; }
  std::string RowName(int64_t r) const override {
    return Cat("sample ", r, " (line ", lines_[r], ")");
  }
  absl::Status Row(int64_t r, int64_t* ids, uint8_t* mask) const override {
    const int64_t b = offsets_[r], n = length(r);
    std::copy(ids_.begin() + b, ids_.begin() + b + n, ids);
    if (mask_.empty()) {
      std::memset(mask, 1, static_cast<size_t>(n));
    } else {
      std::copy(mask_.begin() + b, mask_.begin() + b + n, mask);
    }
    return absl::OkStatus();
  }

  // Parses the file; messages start with `prefix` ("field: key: ").
  absl::Status Parse(std::string_view text, std::string_view prefix) {
    offsets_.push_back(0);
    int64_t line = 0;
    bool any_mask = false;
    size_t pos = 0;
    while (pos < text.size()) {
      size_t end = text.find('\n', pos);
      if (end == std::string_view::npos) end = text.size();
      std::string_view l = text.substr(pos, end - pos);
      pos = end + 1;
      ++line;
      if (l.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      const std::string where = Cat(prefix, "line ", line, ": ");
      Json j;
      try {
        j = Json::parse(l.begin(), l.end());
      } catch (const Json::exception& e) {
        return absl::InvalidArgumentError(
            Cat(where, "malformed JSON (", JsonErrorWithoutInput(e),
                "); each line must be an object {\"input_ids\": [int, ...]}"));
      }
      if (!j.is_object()) {
        return absl::InvalidArgumentError(
            Cat(where, "is a JSON ", j.type_name(), ", expected {\"input_ids\": [int, ...]}"));
      }
      auto ids = j.find("input_ids");
      if (ids == j.end() || !ids->is_array()) {
        return absl::InvalidArgumentError(
            Cat(where,
                "has no \"input_ids\" array of token ids (tokenize the text with the model's "
                "tokenizer first)"));
      }
      for (size_t i = 0; i < ids->size(); ++i) {
        const Json& v = (*ids)[i];
        if (!v.is_number_integer()) {
          return absl::InvalidArgumentError(
              Cat(where, "input_ids[", i, "] is ", v.dump(), ", expected an integer token id"));
        }
        ids_.push_back(v.is_number_unsigned() &&
                               v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                           ? -1
                           : v.get<int64_t>());
      }
      const size_t n = ids->size();
      auto m = j.find("attention_mask");
      if (m != j.end() && !m->is_null()) {
        if (!m->is_array() || m->size() != n) {
          return absl::InvalidArgumentError(
              Cat(where, "attention_mask has ", m->is_array() ? m->size() : 0,
                  " values but input_ids has ", n, "; they must have the same length"));
        }
        if (!any_mask) {
          mask_.assign(ids_.size() - n, 1);
          any_mask = true;
        }
        for (size_t i = 0; i < n; ++i) {
          const Json& v = (*m)[i];
          int64_t value = -1;
          if (v.is_boolean()) value = v.get<bool>() ? 1 : 0;
          if (v.is_number_integer()) value = v.get<int64_t>();
          if (value != 0 && value != 1) {
            return absl::InvalidArgumentError(Cat(where, "attention_mask[", i, "] is ", v.dump(),
                                                  "; expected 0 (padding) or 1 (token)"));
          }
          mask_.push_back(static_cast<uint8_t>(value));
        }
      } else if (any_mask) {
        mask_.insert(mask_.end(), n, 1);
      }
      offsets_.push_back(static_cast<int64_t>(ids_.size()));
      lines_.push_back(line);
    }
    return absl::OkStatus();
  }

 private:
  std::vector<int64_t> ids_;
  std::vector<uint8_t> mask_;  // empty: no line has a mask
  std::vector<int64_t> offsets_;
  std::vector<int64_t> lines_;
};

// Appends the rows taken to `out`, checking their real ids against the vocabulary.
class Collector {
 public:
  Collector(std::string_view prefix, const quant::DecoderConfig& config, CalibrationData* out)
      : prefix_(prefix), vocab_(config.vocab_size), out_(out) {}

  // Row `name` of `n` ids/mask (position j of the source row is `first_position + j`).
  absl::Status Add(const RowSource& src, int64_t r, int64_t first_position, const int64_t* ids,
                   const uint8_t* mask, int64_t n) {
    int64_t real = 0;
    for (int64_t j = 0; j < n; ++j) {
      QF_RETURN_IF_ERROR(Check(src, r, first_position + j, ids[j], mask[j]));
      real += mask[j];
      out_->ids.push_back(
          mask[j] ? static_cast<int32_t>(ids[j])
                  : (ids[j] >= 0 && ids[j] < vocab_ ? static_cast<int32_t>(ids[j]) : 0));
      out_->mask.push_back(mask[j]);
    }
    if (real == 0) {
      return absl::InvalidArgumentError(Cat(prefix_, src.RowName(r),
                                            ": attention_mask has no real token (1) in the ", n,
                                            " positions taken; drop the row or fix its mask"));
    }
    out_->tokens += real;
    ++out_->samples;
    return absl::OkStatus();
  }

  absl::Status Check(const RowSource& src, int64_t r, int64_t position, int64_t id,
                     uint8_t mask) const {
    if (mask && (id < 0 || id >= vocab_)) {
      return absl::InvalidArgumentError(Cat(prefix_, src.RowName(r), ", position ", position,
                                            ": id ", id, " is outside the vocabulary (vocab_size ",
                                            vocab_, "); tokenize with the model's own tokenizer"));
    }
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
  int64_t vocab_;
  CalibrationData* out_;
};

absl::Status Select(const RowSource& src, const CalibrationDataOptions& options,
                    const quant::DecoderConfig& config, std::string_view prefix,
                    CalibrationData* out) {
  const int64_t rows = src.rows();
  if (rows == 0) {
    return absl::InvalidArgumentError(Cat(prefix, "empty data: no samples"));
  }
  const int64_t max_samples = options.max_samples;
  Collector collect(prefix, config, out);
  std::vector<int64_t> ids;
  std::vector<uint8_t> mask;
  auto load = [&](int64_t r) -> absl::Status {
    ids.resize(static_cast<size_t>(src.length(r)));
    mask.resize(ids.size());
    return src.Row(r, ids.data(), mask.data());
  };
  auto check_len = [&](int64_t L) -> absl::Status {
    if (L <= config.max_position_embeddings) return absl::OkStatus();
    return absl::InvalidArgumentError(
        Cat(prefix, "seq_len ", L, " is above the model's max_position_embeddings ",
            config.max_position_embeddings, "; pass a smaller --calib-seq-len"));
  };

  int64_t min_len = src.length(0);
  for (int64_t r = 1; r < rows; ++r) min_len = std::min(min_len, src.length(r));

  if (options.seq_len == 0) {
    const int64_t len0 = src.length(0);
    for (int64_t r = 1; r < rows; ++r) {
      if (src.length(r) != len0) {
        return absl::InvalidArgumentError(Cat(
            prefix, "ragged rows: ", src.RowName(r), " has ", src.length(r), " tokens but ",
            src.RowName(0), " has ", len0,
            "; pass --calib-seq-len L to truncate the rows to L tokens (or pack them into rows of "
            "L when some are shorter)"));
      }
    }
    if (len0 == 0) {
      return absl::InvalidArgumentError(Cat(prefix, "empty data: the samples have no tokens"));
    }
    QF_RETURN_IF_ERROR(check_len(len0));
    out->seq_len = len0;
  } else {
    out->seq_len = options.seq_len;
  }
  const int64_t L = out->seq_len;
  const int64_t take = max_samples > 0 ? std::min(max_samples, rows) : rows;

  if (min_len >= L) {  // equal rows, or truncate
    out->ids.reserve(static_cast<size_t>(take * L));
    out->mask.reserve(static_cast<size_t>(take * L));
    for (int64_t r = 0; r < take; ++r) {
      QF_RETURN_IF_ERROR(load(r));
      QF_RETURN_IF_ERROR(collect.Add(src, r, 0, ids.data(), mask.data(), L));
    }
  } else {  // pack the real tokens into rows of L
    out->packed = true;
    std::vector<int64_t> row;
    std::vector<uint8_t> ones(static_cast<size_t>(L), 1);
    row.reserve(static_cast<size_t>(L));
    int64_t real_tokens = 0;
    for (int64_t r = 0; r < rows && (max_samples == 0 || out->samples < max_samples); ++r) {
      QF_RETURN_IF_ERROR(load(r));
      for (size_t j = 0; j < ids.size(); ++j) {
        if (!mask[j]) continue;
        QF_RETURN_IF_ERROR(collect.Check(src, r, static_cast<int64_t>(j), ids[j], 1));
        ++real_tokens;
        row.push_back(ids[j]);
        if (static_cast<int64_t>(row.size()) == L) {
          QF_RETURN_IF_ERROR(
              collect.Add(src, r, static_cast<int64_t>(j), row.data(), ones.data(), L));
          row.clear();
          if (max_samples > 0 && out->samples == max_samples) break;
        }
      }
    }
    if (out->samples == 0) {
      return absl::InvalidArgumentError(
          Cat(prefix, "empty data: only ", real_tokens, " real tokens, fewer than seq_len ", L,
              " to pack one sample; pass a smaller --calib-seq-len or bring more data"));
    }
  }
  if (std::all_of(out->mask.begin(), out->mask.end(), [](uint8_t m) { return m == 1; })) {
    out->mask.clear();
    out->mask.shrink_to_fit();
  }
  return absl::OkStatus();
}

}  // namespace

quant::TokenBatch CalibrationData::Batch(int64_t begin, int64_t end) const {
  quant::TokenBatch b;
  b.samples = end - begin;
  b.seq_len = seq_len;
  b.mask = mask.empty() ? nullptr : mask.data() + begin * seq_len;
  return b;
}

absl::StatusOr<CalibrationData> LoadCalibrationData(ObjectStore& store, std::string_view key,
                                                    const CalibrationDataOptions& options,
                                                    const quant::DecoderConfig& config,
                                                    std::string_view field) {
  const std::string prefix = Cat(field, ": ", key, ": ");
  if (options.max_samples < 0 || options.seq_len < 0) {
    return absl::InvalidArgumentError(
        Cat(prefix, "samples ", options.max_samples, " and seq_len ", options.seq_len,
            " must not be negative (0 = all samples / the data's length)"));
  }
  if (options.seq_len > config.max_position_embeddings) {
    return absl::InvalidArgumentError(
        Cat(prefix, "seq_len ", options.seq_len, " is above the model's max_position_embeddings ",
            config.max_position_embeddings, "; pass a smaller --calib-seq-len"));
  }
  absl::StatusOr<ObjectInfo> info = store.Stat(key);
  if (!info.ok()) {
    return absl::Status(info.status().code(), Cat(field, ": ", info.status().message()));
  }
  if (info->size > kMaxCalibrationBytes) {
    return absl::InvalidArgumentError(Cat(prefix, "is ", info->size, " bytes, above the limit of ",
                                          kMaxCalibrationBytes,
                                          " bytes; take fewer samples into the file"));
  }
  absl::StatusOr<std::string> bytes = store.ReadAll(key);
  if (!bytes.ok()) {
    return absl::Status(bytes.status().code(), Cat(field, ": ", bytes.status().message()));
  }
  CalibrationData out;
  out.file_bytes = bytes->size();
  out.sha256 = Sha256Hex(*bytes);

  const std::string_view text = *bytes;
  uint64_t n = 0;
  if (text.size() >= 9) std::memcpy(&n, text.data(), 8);
  const bool safetensors = text.size() >= 9 && n >= 2 && n <= text.size() - 8 && text[8] == '{';
  if (!safetensors && text.size() >= 9 && text[8] == '{' && text[0] != '{' && n >= 2) {
    // A safetensors file whose 8-byte header length points past its end.
    return absl::InvalidArgumentError(
        Cat(prefix, "not a valid safetensors file: the 8-byte header length exceeds the file "
                    "size (", text.size(), " bytes)"));
  }
  if (safetensors) {
    absl::StatusOr<SafetensorsHeader> parsed =
        SafetensorsHeader::Parse(text.substr(8, n), text.size(), key);
    if (!parsed.ok()) {
      return absl::Status(parsed.status().code(), Cat(field, ": ", parsed.status().message()));
    }
    const SafetensorsHeader& h = *parsed;
    const TensorInfo* ids = h.Find("input_ids");
    if (ids == nullptr) {
      return absl::InvalidArgumentError(
          Cat(prefix,
              "safetensors file without an \"input_ids\" tensor (I32 or I64 [samples, "
              "seq_len] of token ids)"));
    }
    if ((ids->dtype != DType::kI32 && ids->dtype != DType::kI64) || ids->shape.size() != 2) {
      std::string shape;
      for (size_t i = 0; i < ids->shape.size(); ++i)
        absl::StrAppend(&shape, i ? ", " : "", ids->shape[i]);
      return absl::InvalidArgumentError(Cat(prefix, "input_ids is ", DTypeName(ids->dtype), " [",
                                            shape, "]; expected I32 or I64 [samples, seq_len]"));
    }
    const char* base = text.data() + h.data_offset();
    const TensorInfo* m = h.Find("attention_mask");
    if (m != nullptr && (!IsIntegerDType(m->dtype) || m->shape != ids->shape)) {
      return absl::InvalidArgumentError(
          Cat(prefix, "attention_mask is ", DTypeName(m->dtype), " with ", m->shape.size(),
              " dimensions; expected an integer or BOOL tensor of input_ids' shape [",
              ids->shape[0], ", ", ids->shape[1], "]"));
    }
    SafetensorsRows rows(prefix, base + ids->data_begin, ids->dtype,
                         m ? base + m->data_begin : nullptr, m ? m->dtype : DType::kU8,
                         ids->shape[0], ids->shape[1]);
    QF_RETURN_IF_ERROR(Select(rows, options, config, prefix, &out));
    return out;
  }
  const size_t first = text.find_first_not_of(" \t\r\n");
  if (first == std::string_view::npos || text[first] != '{') {
    return absl::InvalidArgumentError(
        Cat(prefix, first == std::string_view::npos
                        ? "empty data: the file has no samples"
                        : "is neither safetensors (an \"input_ids\" I32/I64 "
                          "[samples, seq_len] tensor) nor JSON Lines "
                          "({\"input_ids\": [...]} per line)"));
  }
  JsonLinesRows rows;
  QF_RETURN_IF_ERROR(rows.Parse(text, prefix));
  QF_RETURN_IF_ERROR(Select(rows, options, config, prefix, &out));
  return out;
}

}  // namespace qforge

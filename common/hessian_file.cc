#include "common/hessian_file.h"

#include <cstring>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "base/status_macros.h"
#include "common/sha256.h"

namespace qforge {
namespace {
constexpr char kAliasPrefix[] = "alias.";
constexpr char kSha256Prefix[] = "sha256.";
constexpr size_t kAliasPrefixLen = sizeof(kAliasPrefix) - 1;

bool IsFloatDType(DType d) {
  return d == DType::kF16 || d == DType::kBF16 || d == DType::kF32 || d == DType::kF64;
}
}  // namespace

absl::StatusOr<HessianFile> HessianFile::Open(ObjectStore& store, std::string_view key) {
  HessianFile file;
  file.key_ = std::string(key);
  const std::string& source = file.key_;
  QF_ASSIGN_OR_RETURN(file.header_, ReadSafetensorsHeader(store, key));
  for (const auto& [k, v] : file.header_.metadata()) {
    if (absl::StartsWith(k, kAliasPrefix)) {
      std::string module = k.substr(kAliasPrefixLen);
      if (module.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("Hessian file ", source, ": empty module name in metadata key '", k, "'"));
      }
      file.aliases_[module] = v;
    } else if (k == "n_samples" || k == "n_tokens") {
      int64_t n = 0;
      if (!absl::SimpleAtoi(v, &n) || n < 0) {
        return absl::InvalidArgumentError(absl::StrCat("Hessian file ", source,
                                                       ": __metadata__.", k, " is '", v,
                                                       "', expected a non-negative integer"));
      }
      (k == "n_samples" ? file.n_samples_ : file.n_tokens_) = n;
    }
  }
  for (const TensorInfo& t : file.header_.tensors()) {
    if (!IsFloatDType(t.dtype) || t.shape.size() != 2 || t.shape[0] != t.shape[1]) {
      std::string shape;
      for (size_t i = 0; i < t.shape.size(); ++i) absl::StrAppend(&shape, i ? ", " : "", t.shape[i]);
      return absl::InvalidArgumentError(absl::StrCat(
          "Hessian file ", source, ": tensor '", t.name, "' is ", DTypeName(t.dtype), " [", shape,
          "]; expected a square 2-D floating-point matrix [in, in]"));
    }
    file.tensors_[t.name] = &t;
  }
  for (const auto& [module, target] : file.aliases_) {
    if (file.tensors_.find(target) == file.tensors_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("Hessian file ", source, ": alias for module '",
                                                     module, "' points at '", target,
                                                     "', which is not a tensor of the file"));
    }
  }
  return file;
}

absl::StatusOr<const TensorInfo*> HessianFile::Find(std::string_view module) const {
  auto t = tensors_.find(module);
  if (t != tensors_.end()) return t->second;
  auto a = aliases_.find(module);
  if (a != aliases_.end()) return tensors_.find(a->second)->second;
  return absl::NotFoundError(absl::StrCat("Hessian file ", key_, " has no Hessian for module '",
                                          std::string(module), "' (", num_modules(),
                                          " modules in the file)"));
}

absl::StatusOr<std::vector<float>> HessianFile::Read(ObjectStore& store, std::string_view module,
                                                     int64_t in_features) const {
  QF_ASSIGN_OR_RETURN(const TensorInfo* t, Find(module));
  if (t->shape[0] != in_features) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Hessian file ", key_, ": Hessian '", t->name, "' for module '", std::string(module), "' is [",
        t->shape[0], ", ", t->shape[1], "] but the layer has in_features = ", in_features));
  }
  // A file that records the tensor's sha256 (a reduced calibration file, the Hessian cache)
  // is checked on every read: a corrupt entry fails here instead of skewing the solve.
  auto digest = header_.metadata().find(absl::StrCat(kSha256Prefix, t->name));
  if (digest == header_.metadata().end()) return ReadTensorAsF32(store, key_, header_, *t);
  QF_ASSIGN_OR_RETURN(std::string bytes, ReadTensorBytes(store, key_, header_, *t));
  if (const std::string got = Sha256Hex(bytes); got != digest->second) {
    return absl::DataLossError(absl::StrCat(
        "Hessian file ", key_, ": tensor '", t->name, "' (module '", std::string(module),
        "') has sha256 ", got, " but the file records ", digest->second,
        "; the file is corrupt (a cached entry is recomputed by a job with --no-cache)"));
  }
  return DecodeToF32(t->dtype, bytes, absl::StrCat("tensor '", t->name, "' of ", key_));
}

absl::Status WriteHessianFile(ObjectStore& store, std::string_view key,
                              const std::vector<HessianEntry>& entries,
                              const std::map<std::string, std::string>& aliases,
                              int64_t n_samples) {
  std::vector<TensorSpec> specs;
  for (const HessianEntry& e : entries) specs.push_back({e.module, DType::kF32, {e.n, e.n}});
  std::map<std::string, std::string> metadata;
  for (const auto& [module, target] : aliases) metadata[absl::StrCat(kAliasPrefix, module)] = target;
  if (n_samples >= 0) metadata["n_samples"] = absl::StrCat(n_samples);
  QF_ASSIGN_OR_RETURN(auto writer, SafetensorsWriter::Create(store, key, std::move(specs), metadata));
  for (const HessianEntry& e : entries) {
    QF_RETURN_IF_ERROR(writer->WriteTensorData(
        e.module, std::string_view(reinterpret_cast<const char*>(e.data),
                                   static_cast<size_t>(e.n * e.n) * sizeof(float))));
  }
  return writer->Finish();
}

}  // namespace qforge

#include "job/assembler.h"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/fault_point.h"
#include "common/object_digest.h"
#include "common/sha256.h"
#include "base/status_macros.h"
#include "job/layer_dequantizer.h"
#include "job/staged_layer.h"
#include "quant/gptq_layer_quantizer.h"

namespace qforge {
namespace {

// Where one output tensor's bytes come from.
struct TensorSource {
  ObjectStore* store;
  std::string key;
  const SafetensorsHeader* header;
  const TensorInfo* info;
};

std::string Basename(std::string_view key) {
  size_t slash = key.rfind('/');
  return std::string(slash == std::string_view::npos ? key : key.substr(slash + 1));
}

bool IsWeightFile(std::string_view name) {
  for (std::string_view ext : {".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack",
                               ".ckpt", ".gguf", ".safetensors.index.json", ".bin.index.json"}) {
    if (name.size() >= ext.size() && name.substr(name.size() - ext.size()) == ext) return true;
  }
  return false;
}

std::string NowIso8601() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::tm tm;
  gmtime_r(&t, &tm);
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

nlohmann::json ShapeJson(const std::vector<int64_t>& shape) {
  nlohmann::json j = nlohmann::json::array();
  for (int64_t d : shape) j.push_back(d);
  return j;
}

absl::Status PutJson(ObjectStore& store, const std::string& key, const nlohmann::json& j,
                     AssembleResult* result) {
  std::string text = j.dump(2);
  text.push_back('\n');
  QF_RETURN_IF_ERROR(store.Put(key, text));
  result->bytes_written += text.size();
  return absl::OkStatus();
}

// Streams [begin, end) of `key` through `fn` in chunks of at most `chunk` bytes.
template <typename Fn>
absl::Status StreamRange(ObjectStore& store, const std::string& key, uint64_t begin, uint64_t end,
                         uint64_t chunk, Fn fn) {
  std::string buf;
  for (uint64_t off = begin; off < end; off += chunk) {
    const uint64_t n = std::min(chunk, end - off);
    QF_RETURN_IF_ERROR(store.ReadRange(key, off, n, &buf));
    QF_RETURN_IF_ERROR(fn(std::string_view(buf)));
  }
  return absl::OkStatus();
}

// Counts the non-finite values (NaN, ±Inf) of a float tensor streamed in chunks of any size
// (an element split across chunks is carried over). Other dtypes hold none.
class NonFiniteScan {
 public:
  explicit NonFiniteScan(DType dtype) : dtype_(dtype), size_(DTypeSize(dtype)) {}
  void Update(std::string_view chunk) {
    if (!IsFloat()) return;
    size_t i = 0;
    if (!carry_.empty()) {
      const size_t take = std::min(size_ - carry_.size(), chunk.size());
      carry_.append(chunk.substr(0, take));
      i = take;
      if (carry_.size() < size_) return;
      Check(reinterpret_cast<const unsigned char*>(carry_.data()));
      carry_.clear();
    }
    for (; i + size_ <= chunk.size(); i += size_) {
      Check(reinterpret_cast<const unsigned char*>(chunk.data() + i));
    }
    carry_.append(chunk.substr(i));
  }
  uint64_t count() const { return count_; }
  uint64_t first() const { return first_; }  // element index of the first one

 private:
  bool IsFloat() const {
    return dtype_ == DType::kF16 || dtype_ == DType::kBF16 || dtype_ == DType::kF32 ||
           dtype_ == DType::kF64;
  }
  // Little-endian element `p`: all exponent bits set means Inf or NaN.
  void Check(const unsigned char* p) {
    bool bad = false;
    switch (dtype_) {
      case DType::kF16:
        bad = (p[1] & 0x7C) == 0x7C;
        break;
      case DType::kBF16:
        bad = (p[1] & 0x7F) == 0x7F && (p[0] & 0x80) == 0x80;
        break;
      case DType::kF32:
        bad = (p[3] & 0x7F) == 0x7F && (p[2] & 0x80) == 0x80;
        break;
      default:  // kF64
        bad = (p[7] & 0x7F) == 0x7F && (p[6] & 0xF0) == 0xF0;
        break;
    }
    if (bad && count_++ == 0) first_ = index_;
    ++index_;
  }

  const DType dtype_;
  const size_t size_;
  std::string carry_;
  uint64_t index_ = 0;
  uint64_t count_ = 0;
  uint64_t first_ = 0;
};

}  // namespace

nlohmann::json GptqQuantizeConfigJson(const GptqQuantizeConfig& c) {
  return {{"bits", c.bits},
          {"group_size", c.group_size},
          {"desc_act", c.desc_act},
          {"sym", c.sym},
          {"damp_percent", c.damp_percent},
          {"static_groups", c.static_groups},
          {"true_sequential", c.true_sequential},
          {"checkpoint_format", quant::CheckpointFormatName(c.format)},
          {"quant_method", "gptq"}};
}

absl::Status RemoveUnpublished(ObjectStore& store, const std::string& journal_key,
                               const std::string& manifest_key, const std::string& job_id) {
  auto journal = store.ReadAll(journal_key);
  if (absl::IsNotFound(journal.status())) return absl::OkStatus();
  if (!journal.ok()) return journal.status();
  // The publication finished when the output holds this job's manifest: keep everything.
  bool published = false;
  if (auto prior = store.ReadAll(manifest_key); prior.ok()) {
    nlohmann::json m = nlohmann::json::parse(*prior, nullptr, /*allow_exceptions=*/false);
    published = m.is_object() && m.contains("spec") && m["spec"].is_object() &&
                m["spec"].value("job_id", std::string()) == job_id;
  } else if (!absl::IsNotFound(prior.status())) {
    return prior.status();
  }
  if (!published) {
    nlohmann::json j = nlohmann::json::parse(*journal, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("files") || !j["files"].is_array()) {
      return absl::DataLossError(absl::StrCat("publication journal '", journal_key, "' in ",
                                              store.uri(), " is not {\"files\": [...]}"));
    }
    for (const nlohmann::json& f : j["files"]) {
      if (!f.is_string() || f.get<std::string>() == manifest_key) continue;
      QF_RETURN_IF_ERROR(store.Delete(f.get<std::string>()));
    }
  }
  return store.Delete(journal_key);
}

absl::StatusOr<AssembleResult> AssembleArtifact(const AssembleRequest& req,
                                                std::vector<std::string>* corrupt_layers) {
  const bool vptq = req.method == ArtifactMethod::kVptq;
  if (req.model_store == nullptr || req.model == nullptr || req.staging_store == nullptr ||
      req.output_store == nullptr) {
    return absl::InvalidArgumentError("AssembleArtifact: stores and model are required");
  }
  const bool staged_publish = !req.temp_dir.empty();
  const bool by_rename = req.output_store->SupportsRename();
  if (staged_publish && !by_rename && !req.output_store->SupportsCopy()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AssembleArtifact: temp_dir '", req.temp_dir, "' needs an output store with rename or "
        "server-side copy (", req.output_store->uri(), " has neither); write in place instead"));
  }
  if (staged_publish && (req.temp_dir == req.output_dir ||
                         absl::StartsWith(JoinKey(req.output_dir, "x"), req.temp_dir + "/"))) {
    return absl::InvalidArgumentError(absl::StrCat("AssembleArtifact: temp_dir '", req.temp_dir,
                                                   "' must not contain the output"));
  }
  AssembleResult result;
  // Every file is written as `write_key(name)` (under temp_dir when publishing by rename) and
  // recorded as out_key(name); `names` keeps the write order for the publication.
  const auto out_key = [&](std::string_view name) { return JoinKey(req.output_dir, name); };
  const std::string& write_dir = staged_publish ? req.temp_dir : req.output_dir;
  const auto write_key = [&](std::string_view name) { return JoinKey(write_dir, name); };
  std::vector<std::string> names;

  // 0. Every staged layer with a recorded digest is hashed again before anything is written:
  // a staged object that changed since its task completed is never assembled.
  {
    std::vector<std::string> corrupt;
    std::string problems;
    for (const StagedLayer& layer : req.layers) {
      if (layer.staged_sha256.empty()) continue;
      absl::Status s = VerifyObjectDigest(*req.staging_store, layer.staged_key,
                                          {layer.staged_bytes, layer.staged_sha256},
                                          req.copy_chunk_bytes);
      if (s.ok()) continue;
      if (!absl::IsDataLoss(s) && !absl::IsNotFound(s) && !absl::IsInvalidArgument(s)) return s;
      corrupt.push_back(layer.module);
      absl::StrAppend(&problems, problems.empty() ? "" : "; ", "layer '", layer.module, "': ",
                      std::string(s.message()));
    }
    if (!corrupt.empty()) {
      if (corrupt_layers != nullptr) *corrupt_layers = corrupt;
      return absl::DataLossError(absl::StrCat(
          corrupt.size(), " staged layer(s) no longer match what their tasks reported, so "
          "nothing was assembled: ", problems));
    }
  }

  // 1. The staged layers: headers and the statistics the workers recorded.
  struct Staged {
    const StagedLayer* layer;
    StagedLayerObject object;  // kVptq: its layer config is the config_for_layers entry
    nlohmann::json stats;      // the recorded LayerOutcome; {} when there is none
  };
  std::map<std::string, Staged> staged;  // by weight tensor name
  for (const StagedLayer& layer : req.layers) {
    const std::string weight = absl::StrCat(layer.module, ".weight");
    if (!req.model->Find(weight).ok()) {
      return absl::InvalidArgumentError(absl::StrCat("staged layer '", layer.module,
                                                     "' has no weight '", weight,
                                                     "' in the source model"));
    }
    QF_ASSIGN_OR_RETURN(StagedLayerObject object,
                        ReadStagedLayer(*req.staging_store, layer.staged_key, layer.module));
    // The staged tensors: exactly the method's (VPTQ: quant::VptqTensorSuffixes of the layer's
    // config, which the package registers; the layer's bias stays in the source model).
    std::vector<std::string> required;
    if (vptq) {
      if (!object.layer_config.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat("staged file ", layer.staged_key,
                                                       " for layer '", layer.module,
                                                       "' has no valid ", kStagedLayerConfigKey));
      }
      auto config = VptqLayerConfigFromJson(object.layer_config);
      if (!config.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("staged file ", layer.staged_key,
                                                       " for layer '", layer.module, "': ",
                                                       config.status().message()));
      }
      const bool source_bias = req.model->Find(absl::StrCat(layer.module, ".bias")).ok();
      if (config->bias != source_bias) {
        return absl::InvalidArgumentError(absl::StrCat(
            "staged file ", layer.staged_key, " for layer '", layer.module, "' says bias ",
            config->bias ? "true" : "false", " but the source model ",
            source_bias ? "has" : "has no", " tensor '", layer.module, ".bias'"));
      }
      for (std::string& suffix : quant::VptqTensorSuffixes(*config)) {
        if (suffix != "bias") required.push_back(std::move(suffix));
      }
    } else {
      required.assign(std::begin(quant::kGptqTensorSuffixes),
                      std::end(quant::kGptqTensorSuffixes));
    }
    for (const std::string& suffix : required) {
      if (object.FindTensor(suffix) == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("staged file ", layer.staged_key,
                                                       " for layer '", layer.module,
                                                       "' has no tensor '",
                                                       StagedTensorName(layer.module, suffix),
                                                       "'"));
      }
    }
    for (const TensorInfo* info : object.Tensors()) {
      const std::string suffix = info->name.substr(layer.module.size() + 1);
      if (std::find(required.begin(), required.end(), suffix) == required.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "staged file ", layer.staged_key, " for layer '", layer.module, "' holds tensor '",
            info->name, "', which the ", vptq ? "vptq" : "GPTQ",
            " loader does not register for this layer; it would be an unexpected key"));
      }
    }
    nlohmann::json stats = object.outcome.has_value() ? LayerOutcomeToJson(*object.outcome)
                                                      : nlohmann::json::object();
    staged.emplace(weight, Staged{&layer, std::move(object), std::move(stats)});
  }

  // The source's config.json, checked before anything is written.
  auto config_text = req.model_store->ReadAll(JoinKey(req.model_dir, "config.json"));
  if (!config_text.ok()) {
    if (absl::IsNotFound(config_text.status())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the source model has no config.json under '", req.model_dir,
          "'; transformers and vLLM need it to load the quantized model"));
    }
    return config_text.status();
  }
  nlohmann::json config = nlohmann::json::parse(*config_text, nullptr, false);
  if (!config.is_object()) {
    return absl::InvalidArgumentError("the source model's config.json is not a JSON object");
  }

  // 2. The output tensors, sorted by name, and where each one's bytes come from.
  std::vector<TensorSpec> specs;
  std::map<std::string, TensorSource> sources;
  for (const std::string& name : req.model->TensorNames()) {
    auto st = staged.find(name);
    if (st != staged.end()) {
      // Every tensor of the layer's staged file replaces its weight.
      for (const TensorInfo* info : st->second.object.Tensors()) {
        specs.push_back({info->name, info->dtype, info->shape});
        sources[info->name] = {req.staging_store, st->second.layer->staged_key,
                               &st->second.object.header, info};
      }
      ++result.tensors_quantized;
      continue;
    }
    QF_ASSIGN_OR_RETURN(SafetensorsModel::Location loc, req.model->Find(name));
    specs.push_back({name, loc.info->dtype, loc.info->shape});
    sources[name] = {req.model_store, loc.key, loc.header, loc.info};
    ++result.tensors_copied;
  }
  std::sort(specs.begin(), specs.end(),
            [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });

  // 3. Stream the tensors into the sharded output, hashing each one on the way.
  nlohmann::json tensors_json = nlohmann::json::object();
  QF_ASSIGN_OR_RETURN(auto writer, ShardedSafetensorsWriter::Create(
                                       *req.output_store, write_dir, specs,
                                       req.max_shard_bytes));
  for (const TensorSpec& spec : specs) {
    const TensorSource& src = sources.at(spec.name);
    const uint64_t begin = src.header->data_offset() + src.info->data_begin;
    const uint64_t end = src.header->data_offset() + src.info->data_end;
    Sha256 hash;
    // A tensor copied from the source (not quantized) must hold finite values: a NaN there
    // would pass into the artifact unnoticed (issue 18).
    const bool copied = src.store == req.model_store && !req.allow_non_finite_copies;
    NonFiniteScan scan(spec.dtype);
    QF_RETURN_IF_ERROR(StreamRange(*src.store, src.key, begin, end, req.copy_chunk_bytes,
                                   [&](std::string_view chunk) {
                                     hash.Update(chunk);
                                     if (copied) scan.Update(chunk);
                                     return writer->WriteTensorData(spec.name, chunk);
                                   }));
    if (scan.count() > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", spec.name, "' of the source model (", src.key,
          ", copied unquantized) holds ", scan.count(), " non-finite value(s) (NaN or Inf), "
          "the first at element ", scan.first(),
          "; the artifact would carry them: repair the source model"));
    }
    tensors_json[spec.name] = {{"sha256", hash.HexDigest()},
                               {"bytes", end - begin},
                               {"dtype", DTypeName(spec.dtype)},
                               {"shape", ShapeJson(spec.shape)}};
  }
  QF_RETURN_IF_ERROR(writer->Finish());
  for (const std::string& key : writer->shard_keys()) {
    names.push_back(Basename(key));
    QF_ASSIGN_OR_RETURN(ObjectInfo info, req.output_store->Stat(key));
    result.bytes_written += info.size;
  }
  // Which shard holds each tensor: the index when sharded, else the single file.
  if (writer->shard_keys().size() > 1) {
    const std::string index_key = write_key("model.safetensors.index.json");
    names.push_back("model.safetensors.index.json");
    QF_ASSIGN_OR_RETURN(std::string index_text, req.output_store->ReadAll(index_key));
    nlohmann::json index = nlohmann::json::parse(index_text, nullptr, false);
    if (index.is_discarded() || !index.contains("weight_map")) {
      return absl::InternalError(absl::StrCat("cannot read back ", index_key));
    }
    for (auto& [name, entry] : tensors_json.items()) entry["file"] = index["weight_map"][name];
  } else {
    const std::string file = Basename(writer->shard_keys().front());
    for (auto& [name, entry] : tensors_json.items()) entry["file"] = file;
  }

  // 4. config.json with quantization_config, and (GPTQ) quantize_config.json.
  nlohmann::json qconfig;
  if (vptq) {
    nlohmann::json per_layer = nlohmann::json::object();
    for (const auto& [weight, s] : staged) per_layer[s.layer->module] = s.object.layer_config;
    qconfig = {{"quant_method", "vptq"}, {"config_for_layers", per_layer}};
  } else {
    qconfig = GptqQuantizeConfigJson(req.config);
  }
  config["quantization_config"] = qconfig;
  QF_RETURN_IF_ERROR(PutJson(*req.output_store, write_key("config.json"), config, &result));
  names.push_back("config.json");
  if (!vptq) {
    QF_RETURN_IF_ERROR(
        PutJson(*req.output_store, write_key("quantize_config.json"), qconfig, &result));
    names.push_back("quantize_config.json");
  }

  // 5. Tokenizer and other small top-level files, unchanged.
  const std::string model_prefix = req.model_dir.empty() ? "" : req.model_dir + "/";
  QF_ASSIGN_OR_RETURN(std::vector<ObjectInfo> listing, req.model_store->List(model_prefix));
  for (const ObjectInfo& obj : listing) {
    const std::string rel = obj.key.substr(model_prefix.size());
    if (rel.find('/') != std::string::npos || IsWeightFile(rel) || rel == "config.json" ||
        rel == "quantize_config.json" || rel == kManifestName ||
        obj.size > req.max_small_file_bytes) {
      continue;
    }
    QF_ASSIGN_OR_RETURN(std::string bytes, req.model_store->ReadAll(obj.key));
    QF_RETURN_IF_ERROR(req.output_store->Put(write_key(rel), bytes));
    names.push_back(rel);
    result.bytes_written += bytes.size();
  }

  // 6. The manifest, last.
  nlohmann::json source_shards = nlohmann::json::array();
  for (const std::string& key : req.model->shard_keys()) {
    nlohmann::json entry = {{"file", Basename(key)}};
    QF_ASSIGN_OR_RETURN(ObjectInfo info, req.model_store->Stat(key));
    entry["bytes"] = info.size;
    if (req.hash_source_shards) {
      Sha256 hash;
      QF_RETURN_IF_ERROR(StreamRange(*req.model_store, key, 0, info.size, req.copy_chunk_bytes,
                                     [&](std::string_view chunk) {
                                       hash.Update(chunk);
                                       return absl::OkStatus();
                                     }));
      entry["sha256"] = hash.HexDigest();
    }
    source_shards.push_back(std::move(entry));
  }
  nlohmann::json layers = nlohmann::json::object();
  for (const auto& [weight, s] : staged) {
    nlohmann::json entry = s.stats;
    entry.erase("module");
    if (vptq) {
      entry["method"] = "vptq";
      entry["config"] = s.object.layer_config;
    } else {
      entry["method"] = "gptq";
      entry["bits"] = req.config.bits;
      entry["group_size"] = req.config.group_size;
    }
    for (auto& [k, v] : s.layer->extra.items()) entry[k] = v;
    layers[s.layer->module] = std::move(entry);
  }
  nlohmann::json manifest = {
      {"qforge_version", req.qforge_version},
      {"created_at", NowIso8601()},
      {"format", vptq ? "vptq" : "gptq"},
      {"spec", req.spec},
      {"quantization_config", vptq ? nlohmann::json{{"quant_method", "vptq"}} : qconfig},
      {"source", {{"uri", req.model_uri}, {"shards", std::move(source_shards)}}},
      {"tensors", std::move(tensors_json)},  // moved: thousands of entries each
      {"layers", std::move(layers)},
      {"totals",
       {{"tensors_quantized", result.tensors_quantized},
        {"tensors_copied", result.tensors_copied},
        {"files", names.size() + 1}}},
  };
  if (!req.calibration.is_null()) manifest["calibration"] = req.calibration;
  QF_RETURN_IF_ERROR(PutJson(*req.output_store, write_key(kManifestName), manifest, &result));
  names.push_back(kManifestName);

  // Fault tests (common/fault_point.h): everything written, nothing published.
  QF_RETURN_IF_ERROR(FaultPoint("assemble.written"));

  // 7. Publication: by rename (or server-side copy) from temp_dir, in write order, so the
  // manifest comes last. The journal first names every final key, so that what an interrupted
  // publication left can be found and removed (RemoveUnpublished); a failed publication
  // removes what it published itself.
  if (staged_publish && !req.publish_journal.empty()) {
    nlohmann::json files = nlohmann::json::array();
    for (const std::string& name : names) files.push_back(out_key(name));
    QF_RETURN_IF_ERROR(req.output_store->Put(
        req.publish_journal, nlohmann::json{{"files", files}}.dump(2)));
  }
  for (const std::string& name : names) {
    if (staged_publish) {
      absl::Status s = by_rename ? req.output_store->Rename(write_key(name), out_key(name))
                                 : req.output_store->Copy(write_key(name), out_key(name));
      if (s.ok()) {
        result.files_written.push_back(out_key(name));
        // Fault tests: between two renames of the publication.
        if (result.files_written.size() == 1) s = FaultPoint("assemble.publishing");
      }
      if (!s.ok()) {
        for (auto it = result.files_written.rbegin(); it != result.files_written.rend(); ++it) {
          (void)req.output_store->Delete(*it);  // best effort; the journal names the rest
        }
        return s;
      }
    } else {
      result.files_written.push_back(out_key(name));
    }
  }
  return result;
}

}  // namespace qforge

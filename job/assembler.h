// ASSEMBLE: writes the final Hugging Face model directory (GPTQ, or VPTQ for the `vptq`
// package / transformers >= 4.48) from the source model and the staged per-layer outputs. Streams every tensor in bounded chunks (memory is one chunk plus
// one staged layer's headers, whatever the model size), copies the untouched tensors
// unchanged, rewrites config.json with `quantization_config`, writes quantize_config.json,
// copies tokenizer and other small files, the shard index, and `qforge_manifest.json` LAST:
// its presence means the artifact is complete.
//
// Verification: a staged layer that carries the digest its worker reported (StagedLayer::
// staged_bytes/staged_sha256) is hashed again in full (streaming, DigestObject) before any
// byte is written; one whose object is missing, has another size or another sha256 is not
// assembled: the run writes nothing, fails with DATA_LOSS naming the layers and lists their
// modules in *corrupt_layers, so the caller can recompute them.
//
// Publication: with a temp_dir (and an output store that SupportsRename, or SupportsCopy as
// S3 does), every file is written under temp_dir and then renamed (copied server-side) into
// output_dir one by one, the manifest last: the output never holds a partly written file or a
// writer's temp file, and a file of the artifact appears without the manifest only for the
// renames (copies) of one publication. Before the first, a publication journal (when asked
// for) names every final key; a publication that fails deletes what it published, and
// RemoveUnpublished removes what a killed one left. The caller deletes temp_dir's leftovers of
// an interrupted run (a killed process) before running again. Without temp_dir the files are
// written in place, the manifest still last.
// Thread-safety: AssembleArtifact is reentrant; it must not run twice on one output.
#ifndef QFORGE_JOB_ASSEMBLER_H_
#define QFORGE_JOB_ASSEMBLER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/object_store.h"
#include "common/safetensors.h"
#include "nlohmann/json.hpp"
#include "quant/gptq_pack.h"

namespace qforge {

inline constexpr char kManifestName[] = "qforge_manifest.json";

// What quantize_config.json and config.json's quantization_config say.
struct GptqQuantizeConfig {
  int bits = 4;
  int64_t group_size = 128;  // -1 = per channel
  bool desc_act = false;
  bool sym = true;
  double damp_percent = 0.01;
  bool static_groups = false;
  // false: qforge solves every layer from the original model's Hessians, independently (no
  // layer sees an earlier one's quantized output).
  bool true_sequential = false;
  quant::GptqCheckpointFormat format = quant::GptqCheckpointFormat::kV1;
};
nlohmann::json GptqQuantizeConfigJson(const GptqQuantizeConfig& c);

struct StagedLayer {
  std::string module;      // "model.layers.0.self_attn.q_proj"
  std::string staged_key;  // key in the staging store of the object RunLayer wrote
  nlohmann::json extra;    // merged into the manifest's layer entry (worker id, attempt, ...)
  // What the staged object held when its task completed (the worker's report, verified by
  // the coordinator then); "" = not checked (the offline driver wrote it in this process).
  std::string staged_sha256;
  uint64_t staged_bytes = 0;
};

enum class ArtifactMethod { kGptq, kVptq };

struct AssembleRequest {
  // kGptq: every staged file holds <module>.{qweight,qzeros,scales,g_idx}; config from `config`.
  // kVptq: every staged file holds the layer's VPTQ tensors and its config_for_layers entry
  // (its layer config, job/staged_layer.h); config.json gets quant_method "vptq".
  ArtifactMethod method = ArtifactMethod::kGptq;
  ObjectStore* model_store = nullptr;
  std::string model_dir;  // prefix of the model inside model_store ("" = root)
  std::string model_uri;  // for the manifest
  const SafetensorsModel* model = nullptr;
  ObjectStore* staging_store = nullptr;
  std::vector<StagedLayer> layers;
  ObjectStore* output_store = nullptr;
  std::string output_dir;  // "" = root of output_store
  // Where the files are written before they are renamed into output_dir ("" = written in
  // place). Must be a prefix of its own (a job's `.qforge-staging/<job>/assembly`), and
  // output_store must SupportsRename; INVALID_ARGUMENT otherwise.
  std::string temp_dir;
  // With temp_dir: the key of the publication journal (a job's `.qforge-staging/<job>/
  // publish.json`); "" = none.
  std::string publish_journal;
  GptqQuantizeConfig config;  // kGptq only
  uint64_t max_shard_bytes = 5'000'000'000ull;  // transformers' default "5GB"
  uint64_t copy_chunk_bytes = 16ull << 20;
  uint64_t max_small_file_bytes = 64ull << 20;  // larger non-weight files are not copied
  bool hash_source_shards = true;
  // Copied (unquantized) float tensors are scanned: a NaN or Inf fails the assembly with
  // INVALID_ARGUMENT naming the tensor, unless this is set.
  bool allow_non_finite_copies = false;
  nlohmann::json spec = nlohmann::json::object();  // the job spec, recorded in the manifest
  // What calibration used and produced (CalibrationInfoToJson, job/spec.h), recorded in the
  // manifest under "calibration"; null: no such entry (Hessians given, or data-free).
  nlohmann::json calibration = nullptr;
  std::string qforge_version;
};

struct AssembleResult {
  std::vector<std::string> files_written;  // keys, in write order (manifest last)
  uint64_t bytes_written = 0;
  int tensors_quantized = 0;  // layers replaced by their GPTQ tensors
  int tensors_copied = 0;
};

// Errors: INVALID_ARGUMENT (no config.json, a staged file missing a tensor or naming a
// module the model lacks, naming it; a copied float tensor holding NaN or Inf, naming the
// tensor, its shard and the first bad element), DATA_LOSS (staged layers that fail their digest check;
// `corrupt_layers`, when not null, then receives their modules, in request order), store
// errors as reported (with the key).
// Undoes an interrupted publication: when `journal_key` exists and `manifest_key` does not
// hold job `job_id`'s manifest, deletes every final key the journal names (not the manifest
// key), then the journal. OK when there is no journal. Store errors as reported; DATA_LOSS
// for a journal that is not one.
absl::Status RemoveUnpublished(ObjectStore& store, const std::string& journal_key,
                               const std::string& manifest_key, const std::string& job_id);

absl::StatusOr<AssembleResult> AssembleArtifact(const AssembleRequest& request,
                                                std::vector<std::string>* corrupt_layers = nullptr);

}  // namespace qforge

#endif  // QFORGE_JOB_ASSEMBLER_H_

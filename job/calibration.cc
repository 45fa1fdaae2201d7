#include "job/calibration.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/absl_compat.h"
#include "common/hessian_file.h"
#include "common/sha256.h"
#include "common/status_bridge.h"
#include "job/hidden_states.h"

namespace qforge {
namespace {

using Clock = std::chrono::steady_clock;

// Bytes per ranged read when hashing objects or copying the staged reduce output.
constexpr uint64_t kChunkBytes = uint64_t{16} << 20;
constexpr char kSha256Prefix[] = "sha256.";

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

constexpr quant::DecoderInput kInputs[] = {quant::DecoderInput::kQkv, quant::DecoderInput::kO,
                                           quant::DecoderInput::kGateUp,
                                           quant::DecoderInput::kDown};

absl::Status PWriteAll(int fd, const char* p, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t w = pwrite(fd, p, static_cast<size_t>(std::min<uint64_t>(n, kChunkBytes)),
                             static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      return absl::UnavailableError(Cat("writing the reduce staging file: ", std::strerror(errno)));
    }
    p += w;
    n -= static_cast<uint64_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return absl::OkStatus();
}

absl::Status PReadAll(int fd, char* p, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t r = pread(fd, p, static_cast<size_t>(n), static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      return absl::UnavailableError(
          Cat("reading the reduce staging file: ", r < 0 ? std::strerror(errno) : "short read"));
    }
    p += r;
    n -= static_cast<uint64_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return absl::OkStatus();
}

// sha256 of bytes [offset, offset + length) of `key`, in ranged reads of kChunkBytes.
absl::StatusOr<std::string> HashRange(ObjectStore& store, std::string_view key, uint64_t offset,
                                      uint64_t length) {
  Sha256 sha;
  std::string chunk;
  for (uint64_t done = 0; done < length;) {
    const uint64_t n = std::min(kChunkBytes, length - done);
    QF_RETURN_IF_ERROR(store.ReadRange(key, offset + done, n, &chunk));
    sha.Update(chunk);
    done += n;
  }
  return sha.HexDigest();
}

std::string Basename(std::string_view key) {
  const size_t slash = key.rfind('/');
  return std::string(slash == std::string_view::npos ? key : key.substr(slash + 1));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

}  // namespace

absl::Status CheckForwardShard(std::string_view what, const DecoderModelConfig& config,
                               const CalibrationData& d, int64_t sample_begin, int64_t sample_end,
                               std::string_view seq_len_flag) {
  const quant::DecoderConfig& c = config.decoder;
  const int64_t L = d.seq_len;
  if (sample_begin < 0 || sample_end > d.samples || sample_begin >= sample_end) {
    return absl::InvalidArgumentError(Cat(what, ": samples [", sample_begin, ", ", sample_end,
                                          ") is empty or outside the data's [0, ", d.samples,
                                          ")"));
  }
  if (L <= 0 || d.ids.size() != static_cast<size_t>(d.samples * L) ||
      (!d.mask.empty() && d.mask.size() != d.ids.size())) {
    return absl::InvalidArgumentError(Cat(what, ": the data holds ", d.ids.size(), " ids and ",
                                          d.mask.size(), " mask values for ", d.samples,
                                          " samples of ", L, " tokens"));
  }
  if (L > c.max_position_embeddings) {
    return absl::InvalidArgumentError(Cat(what, ": seq_len ", L,
                                          " is above max_position_embeddings ",
                                          c.max_position_embeddings));
  }
  if (config.sliding_window > 0 && config.sliding_window < L) {
    return absl::InvalidArgumentError(
        Cat(what, ": the model attends within a sliding window of ", config.sliding_window,
            " tokens, shorter than seq_len ", L,
            "; the forward pass implements full causal attention: use ", seq_len_flag, " <= ",
            config.sliding_window));
  }
  return absl::OkStatus();
}

absl::StatusOr<CalibrationShardOutcome> RunCalibrationShard(const CalibrationShardJob& job) {
  if (job.model_store == nullptr || job.model == nullptr || job.model_config == nullptr ||
      job.data == nullptr || job.forward == nullptr || job.out_store == nullptr ||
      job.staged_key.empty()) {
    return absl::InvalidArgumentError(
        "calibration shard: model store, model, model config, data, forward pass, output store "
        "and staged key are all required");
  }
  QF_RETURN_IF_ERROR(CheckForwardShard("calibration shard", *job.model_config, *job.data,
                                       job.sample_begin, job.sample_end, "--calib-seq-len"));
  const quant::DecoderConfig& c = job.model_config->decoder;
  const CalibrationData& d = *job.data;
  const int64_t L = d.seq_len;

  CalibrationShardOutcome out;
  const int64_t ns = job.sample_end - job.sample_begin, T = ns * L, H = c.hidden_size;
  out.samples = ns;
  out.layers = c.num_hidden_layers;
  const uint8_t* mask = d.mask.empty() ? nullptr : d.mask.data() + job.sample_begin * L;
  int64_t tokens = T;
  if (mask != nullptr) tokens = std::count(mask, mask + T, uint8_t{1});
  out.tokens = tokens;
  if (tokens == 0) {
    return absl::InvalidArgumentError(Cat("calibration shard: samples [", job.sample_begin, ", ",
                                          job.sample_end, ") hold no real token"));
  }

  QF_ASSIGN_OR_RETURN(std::unique_ptr<HiddenStates> hidden,
                      HiddenStates::Create(static_cast<uint64_t>(T) * static_cast<uint64_t>(H),
                                           job.spill_above_bytes, job.spill_dir));
  out.spilled = hidden->spilled();

  auto t0 = Clock::now();
  QF_RETURN_IF_ERROR(EmbedTokens(*job.model_store, *job.model, c,
                                 d.ids.data() + job.sample_begin * L, T, hidden->data()));
  out.read_seconds += SecondsSince(t0);

  // The partial file: every layer's four inputs, declared up front, written layer by layer.
  std::vector<TensorSpec> specs;
  std::map<std::string, std::string> metadata;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    for (quant::DecoderInput in : kInputs) {
      const std::vector<std::string> modules = DecoderInputModules(layer, in);
      const int64_t dim = quant::DecoderInputDim(c, in);
      specs.push_back({modules.front(), DType::kF32, {dim, dim}});
      for (size_t m = 1; m < modules.size(); ++m) {
        metadata[Cat("alias.", modules[m])] = modules.front();
      }
    }
  }
  metadata["n_samples"] = Cat(ns);
  metadata["n_tokens"] = Cat(tokens);
  QF_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> writer,
                      SafetensorsWriter::Create(*job.out_store, job.staged_key, std::move(specs),
                                                std::move(metadata)));

  const quant::TokenBatch batch = d.Batch(job.sample_begin, job.sample_end);
  const double layers = static_cast<double>(c.num_hidden_layers);
  const double scale = 2.0 / static_cast<double>(tokens);
  quant::LayerHessianSums sums;
  std::vector<float> h32;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    t0 = Clock::now();
    QF_ASSIGN_OR_RETURN(quant::DecoderLayerWeights weights,
                        ReadDecoderLayerWeights(*job.model_store, *job.model, c, layer));
    out.read_seconds += SecondsSince(t0);

    t0 = Clock::now();
    sums.Reset(c);
    std::function<bool(double)> layer_progress;
    if (job.progress) {
      layer_progress = [&job, layer, layers](double f) {
        return job.progress((static_cast<double>(layer) + std::min(f, 1.0)) / layers);
      };
    }
    Status st = job.forward->ForwardLayer(c, weights, batch, hidden->data(), &sums, layer_progress);
    if (!st.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(static_cast<int>(st.code())),
                          Cat("calibration forward pass (", job.forward->backend(), "), layer ",
                              layer, ": ", st.message()));
    }
    out.forward_seconds += SecondsSince(t0);
    if (sums.tokens != tokens) {
      return absl::InternalError(Cat("calibration forward pass (", job.forward->backend(),
                                     "), layer ", layer, ": summed ", sums.tokens,
                                     " tokens, the shard has ", tokens));
    }
    weights = quant::DecoderLayerWeights();  // one layer's weights at a time

    t0 = Clock::now();
    for (quant::DecoderInput in : kInputs) {
      const std::vector<double>& s = sums.sums[static_cast<int>(in)];
      h32.resize(s.size());
      for (size_t i = 0; i < s.size(); ++i) h32[i] = static_cast<float>(scale * s[i]);
      QF_RETURN_IF_ERROR(writer->WriteTensorData(
          DecoderInputTensorName(layer, in),
          std::string_view(reinterpret_cast<const char*>(h32.data()), h32.size() * sizeof(float))));
    }
    out.write_seconds += SecondsSince(t0);
    if (job.progress && !job.progress(static_cast<double>(layer + 1) / layers)) {
      return absl::CancelledError(
          Cat("calibration shard cancelled after layer ", layer, " of ", c.num_hidden_layers));
    }
  }
  t0 = Clock::now();
  QF_RETURN_IF_ERROR(writer->Finish());
  out.write_seconds += SecondsSince(t0);
  out.bytes_written = writer->total_bytes();
  return out;
}

absl::StatusOr<ReduceOutcome> ReduceHessians(const ReduceJob& job) {
  if (job.in_store == nullptr || job.out_store == nullptr || job.out_key.empty()) {
    return absl::InvalidArgumentError("reduce: input store, output store and key are required");
  }
  if (job.partial_keys.empty()) {
    return absl::InvalidArgumentError("reduce: no partial Hessian files to reduce");
  }
  // Sorted, so the float64 sums (and the output bytes) do not depend on the order given.
  std::vector<std::string> keys = job.partial_keys;
  std::sort(keys.begin(), keys.end());
  for (size_t i = 1; i < keys.size(); ++i) {
    if (keys[i] == keys[i - 1]) {
      return absl::InvalidArgumentError(Cat("reduce: partial '", keys[i], "' is listed twice"));
    }
  }
  std::vector<HessianFile> files;
  files.reserve(keys.size());  // never moved: a HessianFile points into its own header
  int64_t N = 0, samples = 0;
  for (const std::string& key : keys) {
    QF_ASSIGN_OR_RETURN(HessianFile f, HessianFile::Open(*job.in_store, key));
    if (f.n_tokens() <= 0 || f.n_samples() < 0) {
      return absl::InvalidArgumentError(
          Cat("reduce: partial ", key, " lacks a positive __metadata__ n_tokens or n_samples (",
              f.n_tokens(), ", ", f.n_samples(), "); it is not a RunCalibrationShard output"));
    }
    N += f.n_tokens();
    samples += f.n_samples();
    files.push_back(std::move(f));
  }
  // Every partial must have the first one's tensors (same names and shapes) and aliases.
  const HessianFile& first = files.front();
  const std::vector<TensorInfo>& tensors = first.header().tensors();
  for (size_t s = 1; s < files.size(); ++s) {
    const HessianFile& f = files[s];
    if (f.header().tensors().size() != tensors.size()) {
      return absl::InvalidArgumentError(
          Cat("reduce: partial ", f.key(), " has ", f.header().tensors().size(), " tensors but ",
              first.key(), " has ", tensors.size(), "; the shards calibrated different models"));
    }
    for (const TensorInfo& t : tensors) {
      const TensorInfo* o = f.header().Find(t.name);
      if (o == nullptr || o->shape != t.shape) {
        return absl::InvalidArgumentError(
            Cat("reduce: partial ", f.key(), " has ", o == nullptr ? "no tensor" : "tensor", " '",
                t.name, "'", o == nullptr ? "" : Cat(" of shape ", ShapeString(o->shape)), " but ",
                first.key(), " has it as ", ShapeString(t.shape),
                "; the shards calibrated different models"));
      }
    }
    if (f.aliases() != first.aliases()) {
      return absl::InvalidArgumentError(
          Cat("reduce: partial ", f.key(), " has other aliases than ", first.key()));
    }
  }

  // Pass 1: each tensor Σ_s (n_s / N)·H_s in float64, rounded to float32, hashed and staged
  // in a local file (the header, written first, carries the hashes).
  uint64_t staged_bytes = 0;
  for (const TensorInfo& t : tensors) staged_bytes += static_cast<uint64_t>(t.num_elements()) * 4;
  const std::string dir = SpillDirectory(job.spill_dir);
  QF_ASSIGN_OR_RETURN(const int fd, AnonymousFile(dir, staged_bytes, "reduce"));
  struct FdCloser {
    int fd;
    ~FdCloser() { close(fd); }
  } closer{fd};
  const double total_units = static_cast<double>(tensors.size());
  auto report = [&](double fraction, const std::string& where) -> absl::Status {
    if (!job.progress || job.progress(fraction)) return absl::OkStatus();
    return absl::CancelledError(Cat("reduce cancelled ", where));
  };
  std::map<std::string, std::string> metadata;
  std::vector<TensorSpec> specs;
  std::vector<double> acc;
  std::vector<float> h32;  // one partial's tensor, then the reduced one
  uint64_t offset = 0;
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const TensorInfo& t = tensors[ti];
    acc.assign(static_cast<size_t>(t.num_elements()), 0.0);
    for (const HessianFile& f : files) {
      const TensorInfo* info = f.header().Find(t.name);
      h32 = std::vector<float>();  // at most one float32 tensor at a time
      QF_ASSIGN_OR_RETURN(h32, ReadTensorAsF32(*job.in_store, f.key(), f.header(), *info));
      const double w = static_cast<double>(f.n_tokens()) / static_cast<double>(N);
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += w * static_cast<double>(h32[i]);
    }
    for (size_t i = 0; i < acc.size(); ++i) h32[i] = static_cast<float>(acc[i]);
    const std::string_view bytes(reinterpret_cast<const char*>(h32.data()),
                                 h32.size() * sizeof(float));
    metadata[Cat(kSha256Prefix, t.name)] = Sha256Hex(bytes);
    QF_RETURN_IF_ERROR(PWriteAll(fd, bytes.data(), bytes.size(), offset));
    offset += bytes.size();
    specs.push_back({t.name, DType::kF32, t.shape});
    QF_RETURN_IF_ERROR(report(0.9 * static_cast<double>(ti + 1) / total_units,
                              Cat("after tensor '", t.name, "'")));
  }
  acc = std::vector<double>();
  h32 = std::vector<float>();

  // Pass 2: the Hessian file, published atomically.
  for (const auto& [module, target] : first.aliases()) {
    metadata[Cat("alias.", module)] = target;
  }
  metadata["n_samples"] = Cat(samples);
  metadata["n_tokens"] = Cat(N);
  QF_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> writer,
                      SafetensorsWriter::Create(*job.out_store, job.out_key, specs, metadata));
  std::string chunk;
  offset = 0;
  for (size_t ti = 0; ti < specs.size(); ++ti) {
    const uint64_t bytes = static_cast<uint64_t>(tensors[ti].num_elements()) * 4;
    for (uint64_t done = 0; done < bytes;) {
      const uint64_t n = std::min(kChunkBytes, bytes - done);
      chunk.resize(static_cast<size_t>(n));
      QF_RETURN_IF_ERROR(PReadAll(fd, chunk.data(), n, offset));
      QF_RETURN_IF_ERROR(writer->WriteTensorData(specs[ti].name, chunk));
      offset += n;
      done += n;
    }
    QF_RETURN_IF_ERROR(report(0.9 + 0.1 * static_cast<double>(ti + 1) / total_units,
                              Cat("while writing '", specs[ti].name, "'")));
  }
  QF_RETURN_IF_ERROR(writer->Finish());
  ReduceOutcome out;
  out.samples = samples;
  out.tokens = N;
  out.tensors = static_cast<int64_t>(specs.size());
  out.bytes_written = writer->total_bytes();
  return out;
}

absl::StatusOr<std::string> ModelFingerprint(ObjectStore& store, const SafetensorsModel& model) {
  const std::vector<std::string>& shards = model.shard_keys();
  std::vector<absl::StatusOr<std::string>> hashes(shards.size(), std::string());
  std::atomic<size_t> next{0};
  auto work = [&]() {
    for (size_t i = next++; i < shards.size(); i = next++) {
      absl::StatusOr<ObjectInfo> info = store.Stat(shards[i]);
      hashes[i] = info.ok() ? HashRange(store, shards[i], 0, info->size)
                            : absl::StatusOr<std::string>(info.status());
    }
  };
  const size_t threads = std::min<size_t>(shards.size(), 4);
  std::vector<std::thread> pool;
  for (size_t i = 1; i < threads; ++i) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  Sha256 sha;
  for (size_t i = 0; i < shards.size(); ++i) {
    QF_RETURN_IF_ERROR(hashes[i].status());
    sha.Update(Cat(Basename(shards[i]), "\n", *hashes[i], "\n"));
  }
  return sha.HexDigest();
}

std::string HessianCacheEntryKey(std::string_view model_fingerprint, std::string_view data_sha256,
                                 int64_t samples, int64_t seq_len) {
  const std::string id =
      Sha256Hex(Cat("qforge Hessian cache v1\nmodel ", model_fingerprint, "\ndata ", data_sha256,
                    "\nsamples ", samples, "\nseq_len ", seq_len, "\n"));
  return Cat(id, "/", kHessianCacheFileName);
}

absl::Status VerifyHessianCacheEntry(ObjectStore& store, std::string_view key,
                                     const quant::DecoderConfig& config, bool verify_data) {
  absl::StatusOr<ObjectInfo> info = store.Stat(key);
  if (!info.ok()) return info.status();
  const std::string where = Cat("Hessian cache entry ", key, " in ", store.uri());
  absl::StatusOr<HessianFile> opened = HessianFile::Open(store, key);
  if (!opened.ok()) {
    return absl::DataLossError(Cat(where, ": ", opened.status().message()));
  }
  const HessianFile& f = *opened;
  if (f.n_tokens() <= 0) {
    return absl::DataLossError(Cat(where, ": no positive n_tokens in its metadata"));
  }
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    for (quant::DecoderInput in : kInputs) {
      const int64_t dim = quant::DecoderInputDim(config, in);
      for (const std::string& module : DecoderInputModules(layer, in)) {
        absl::StatusOr<const TensorInfo*> t = f.Find(module);
        if (!t.ok()) {
          return absl::DataLossError(Cat(where, ": no Hessian for module '", module, "'"));
        }
        if ((*t)->shape != std::vector<int64_t>{dim, dim}) {
          return absl::InvalidArgumentError(Cat(where, ": the Hessian of '", module, "' is ",
                                                ShapeString((*t)->shape),
                                                ", the model's input has ", dim, " features"));
        }
      }
    }
  }
  const auto& metadata = f.header().metadata();
  for (const TensorInfo& t : f.header().tensors()) {
    auto it = metadata.find(Cat(kSha256Prefix, t.name));
    if (it == metadata.end()) {
      return absl::DataLossError(Cat(where, ": no sha256 for tensor '", t.name, "'"));
    }
    if (!verify_data) continue;
    QF_ASSIGN_OR_RETURN(
        std::string digest,
        HashRange(store, key, f.header().data_offset() + t.data_begin, t.num_bytes()));
    if (digest != it->second) {
      return absl::DataLossError(Cat(where, ": tensor '", t.name, "' has sha256 ", digest,
                                     ", the entry recorded ", it->second));
    }
  }
  return absl::OkStatus();
}

uint64_t CalibrationTaskMemoryBytes(const quant::DecoderConfig& c, int64_t samples, int64_t seq_len,
                                    uint64_t spill_above_bytes) {
  const uint64_t H = static_cast<uint64_t>(std::max<int64_t>(c.hidden_size, 0));
  const uint64_t QO = static_cast<uint64_t>(std::max<int64_t>(c.q_out(), 0));
  const uint64_t KV = static_cast<uint64_t>(std::max<int64_t>(c.kv_out(), 0));
  const uint64_t I = static_cast<uint64_t>(std::max<int64_t>(c.intermediate_size, 0));
  const uint64_t S = static_cast<uint64_t>(std::max<int64_t>(samples, 0));
  const uint64_t L = static_cast<uint64_t>(std::max<int64_t>(seq_len, 0));
  const uint64_t T = S * L;
  // One layer's float32 weights (projections, norms, biases).
  const uint64_t weights = DecoderLayerWeightBytes(c);
  // The four float64 sums and the float32 [dim, dim] written from the largest.
  const uint64_t D = std::max({H, QO, I});
  const uint64_t sums = 8 * (2 * H * H + QO * QO + I * I) + 4 * D * D;
  // The hidden states, in memory up to spill_above_bytes.
  const uint64_t hidden = std::min<uint64_t>(4 * T * H, spill_above_bytes);
  // The forward's activations for one chunk of whole samples of about kHessianBlockTokens
  // tokens: a, q, k, v, o, the MLP's b, gate, up, and a Gram panel.
  const uint64_t chunk_samples =
      L == 0 ? 0 : std::max<uint64_t>(1, static_cast<uint64_t>(quant::kHessianBlockTokens) / L);
  const uint64_t chunk = std::min(S, chunk_samples) * L;
  const uint64_t activations =
      4 * chunk * (2 * H + 2 * QO + 2 * KV + 2 * I) + 4 * D * 256 + 4 * 64 * L * 16;
  // The task's token ids and mask, and one embedding read.
  const uint64_t data = 5 * T + (uint64_t{64} << 20);
  return weights + sums + hidden + activations + data;
}

}  // namespace qforge

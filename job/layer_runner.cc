#include "job/layer_runner.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "common/status_bridge.h"

namespace qforge {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The quantizers' name for a weight dtype that DecodeToF32 accepted.
quant::WeightDtype WeightDtypeOf(DType d) {
  switch (d) {
    case DType::kBF16:
      return quant::WeightDtype::kBFloat16;
    case DType::kF32:
      return quant::WeightDtype::kFloat32;
    case DType::kF64:
      return quant::WeightDtype::kFloat64;
    case DType::kF16:
    default:
      return quant::WeightDtype::kFloat16;
  }
}

// Reads the weight (one ranged read of its bytes) and the Hessian (identity when there is
// no Hessian file) of one layer into `w` and `h`, filling the read figures of `out`.
absl::Status ReadLayerInputs(const LayerJob& job, Matrix* w, Matrix* h, LayerOutcome* out) {
  if (job.model_store == nullptr || job.out_store == nullptr) {
    return absl::InvalidArgumentError("layer runner: the model and output stores are required");
  }
  if ((job.hessian_store == nullptr) != (job.hessians == nullptr)) {
    return absl::InvalidArgumentError("layer runner: Hessian store and file go together");
  }
  auto t0 = std::chrono::steady_clock::now();
  const TensorLocation& wl = job.weight;
  if (wl.shape.size() != 2 || wl.shape[0] <= 0 || wl.shape[1] <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", wl.name, "' in ", wl.key, " has ",
                                                    wl.shape.size(),
                                                    " dimensions; a linear weight is 2-D [out, in]"));
  }
  const int64_t rows = wl.shape[0], cols = wl.shape[1];
  if (wl.length != static_cast<uint64_t>(rows * cols) * DTypeSize(wl.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", wl.name, "' in ", wl.key, ": ",
                                                    wl.length, " bytes for [", rows, ", ", cols,
                                                    "] ", DTypeName(wl.dtype)));
  }
  out->module = job.module;
  out->out_features = rows;
  out->in_features = cols;
  std::string raw;
  QF_RETURN_IF_ERROR(job.model_store->ReadRange(wl.key, wl.offset, wl.length, &raw));
  w->rows = rows;
  w->cols = cols;
  QF_ASSIGN_OR_RETURN(w->data, DecodeToF32(wl.dtype, raw, absl::StrCat(wl.name, " in ", wl.key)));
  out->bytes_read += wl.length;

  *h = Matrix(cols, cols);
  if (job.hessians != nullptr) {
    QF_ASSIGN_OR_RETURN(h->data, job.hessians->Read(*job.hessian_store, job.module, cols));
    out->bytes_read += static_cast<uint64_t>(cols * cols) * sizeof(float);
  } else {
    for (int64_t i = 0; i < cols; ++i) (*h)(i, i) = 1.0f;
  }
  out->read_seconds = SecondsSince(t0);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LayerOutcome> RunLayer(const LayerJob& job, quant::LayerQuantizer& quantizer) {
  LayerOutcome out;
  Matrix w, h;
  QF_RETURN_IF_ERROR(ReadLayerInputs(job, &w, &h, &out));

  // Quantize (solve and pack).
  quant::LayerInput in;
  in.weight = &w;
  in.hessian = &h;
  in.weight_dtype = WeightDtypeOf(job.weight.dtype);
  in.has_bias = job.has_bias;
  auto t0 = std::chrono::steady_clock::now();
  qforge::StatusOr<quant::QuantizedLayer> quantized =
      quantizer.Quantize(in, job.options, job.progress);
  if (!quantized.ok()) {
    const qforge::Status& s = quantized.status();
    return absl::Status(ToAbslStatus(s).code(),
                        absl::StrCat("layer '", job.module, "': ", s.message()));
  }
  out.solve_seconds = SecondsSince(t0);
  const quant::QuantizeStats& stats = quantized->stats;
  out.proxy_loss = stats.proxy_loss;
  out.output_error = stats.output_error;
  out.weight_energy = stats.weight_energy;
  out.relative_error = stats.weight_energy > 0 ? stats.output_error / stats.weight_energy : 0.0;
  out.output_error_f32 = stats.output_error_f32;
  out.relative_error_f32 =
      stats.weight_energy > 0 ? stats.output_error_f32 / stats.weight_energy : 0.0;
  out.damp_percent_used = stats.damp_percent_used;
  out.bits_per_weight = stats.bits_per_weight;

  // Stage.
  t0 = std::chrono::steady_clock::now();
  for (const quant::QuantizedTensor& t : quantized->tensors) out.bytes_written += t.bytes.size();
  out.staged_key = job.staged_key;
  QF_RETURN_IF_ERROR(WriteStagedLayer(*job.out_store, job.staged_key, out, *quantized));
  out.write_seconds = SecondsSince(t0);
  return out;
}

}  // namespace qforge

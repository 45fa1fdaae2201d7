#include "quant/gptq_layer_quantizer.h"

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "base/status_macros.h"
#include "quant/gptq_pack.h"

namespace qforge::quant {
namespace {

// A tensor holding `values` (trivially copyable) as little-endian bytes.
template <typename T>
QuantizedTensor Tensor(const char* suffix, const char* dtype, std::vector<int64_t> shape,
                       const std::vector<T>& values) {
  QuantizedTensor t;
  t.suffix = suffix;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

class GptqLayerQuantizer final : public LayerQuantizer {
 public:
  explicit GptqLayerQuantizer(std::unique_ptr<GptqSolver> solver) : solver_(std::move(solver)) {}

  const char* method() const override { return GptqLayerOptions::kMethod; }
  const char* backend() const override { return solver_->backend(); }

  StatusOr<QuantizedLayer> Quantize(const LayerInput& in, const QuantizeOptions& options,
                                    const SolveProgress& progress) override {
    const GptqLayerOptions* o = std::get_if<GptqLayerOptions>(&options);
    if (o == nullptr) {
      return InvalidArgumentError(std::string("the GPTQ layer quantizer was given the options of "
                                              "method '") +
                                  QuantizeMethod(options) + "'");
    }
    if (in.weight == nullptr || in.hessian == nullptr) {
      return InvalidArgumentError("the GPTQ layer quantizer needs a weight and a Hessian");
    }
    const int64_t rows = in.weight->rows, cols = in.weight->cols;
    QF_RETURN_IF_ERROR(CheckGptqPackable(o->solver.bits, rows, cols));
    GptqOptions solver_options = o->solver;
    solver_options.progress = progress;
    QF_ASSIGN_OR_RETURN(GptqResult r, solver_->Quantize(*in.weight, *in.hessian, solver_options));

    QF_ASSIGN_OR_RETURN(GptqPackedLayer packed,
                        PackGptqLayer(r.codes.data(), r.scales.data(), r.zeros.data(),
                                      r.g_idx.data(), r.bits, rows, cols, r.num_groups, o->format));
    const int64_t qweight_rows = cols * r.bits / 32;
    const int64_t qzeros_cols = rows * r.bits / 32;
    QuantizedLayer out;
    out.tensors.push_back(Tensor(kGptqTensorSuffixes[0], "I32", {cols}, packed.g_idx));
    out.tensors.push_back(
        Tensor(kGptqTensorSuffixes[1], "I32", {qweight_rows, rows}, packed.qweight));
    out.tensors.push_back(
        Tensor(kGptqTensorSuffixes[2], "I32", {r.num_groups, qzeros_cols}, packed.qzeros));
    out.tensors.push_back(
        Tensor(kGptqTensorSuffixes[3], "F16", {r.num_groups, rows}, packed.scales));
    out.stats.proxy_loss = r.proxy_loss;
    out.stats.output_error_f32 = r.output_error;
    {
      QF_ASSIGN_OR_RETURN(std::vector<float> decoded,
                          DequantizeGptqPacked(packed, GptqDecodeArithmetic::kFloat16));
      Matrix w_hat(rows, cols);
      w_hat.data = std::move(decoded);
      out.stats.output_error = OutputError(*in.weight, w_hat, *in.hessian);
    }
    out.stats.weight_energy = r.weight_energy;
    out.stats.damp_percent_used = r.damp_percent_used;
    // Every stored bit per weight: codes, zeros, scales and g_idx (as VptqBitsPerWeight
    // counts VPTQ's indices, codebooks, scales and perm).
    size_t stored_bytes = 0;
    for (const QuantizedTensor& t : out.tensors) stored_bytes += t.bytes.size();
    out.stats.bits_per_weight =
        8.0 * static_cast<double>(stored_bytes) / (static_cast<double>(rows) * cols);
    return out;
  }

 private:
  std::unique_ptr<GptqSolver> solver_;
};

}  // namespace

std::unique_ptr<LayerQuantizer> NewGptqLayerQuantizer(std::unique_ptr<GptqSolver> solver) {
  return std::make_unique<GptqLayerQuantizer>(std::move(solver));
}

}  // namespace qforge::quant

#include "quant/vptq_layer_quantizer.h"

#include <array>
#include <cstdint>
#include <string>
#include <utility>

#include "base/status_macros.h"
#include "quant/gptq.h"

namespace qforge::quant {
namespace {

// Appends `"key":` (keys are plain ASCII names: no escaping needed).
void Key(const char* key, std::string* out) {
  if (out->size() > 1) out->push_back(',');
  out->push_back('"');
  out->append(key);
  out->append("\":");
}

void Int(const char* key, int64_t v, std::string* out) {
  Key(key, out);
  out->append(std::to_string(v));
}

void Bool(const char* key, bool v, std::string* out) {
  Key(key, out);
  out->append(v ? "true" : "false");
}

void Pair(const char* key, const std::array<int64_t, 2>& v, std::string* out) {
  Key(key, out);
  out->append("[" + std::to_string(v[0]) + "," + std::to_string(v[1]) + "]");
}

class VptqLayerQuantizer final : public LayerQuantizer {
 public:
  explicit VptqLayerQuantizer(std::unique_ptr<VptqSolver> solver) : solver_(std::move(solver)) {}

  const char* method() const override { return VptqLayerOptions::kMethod; }
  const char* backend() const override { return solver_->backend(); }

  StatusOr<QuantizedLayer> Quantize(const LayerInput& in, const QuantizeOptions& options,
                                    const SolveProgress& progress) override {
    const VptqLayerOptions* o = std::get_if<VptqLayerOptions>(&options);
    if (o == nullptr) {
      return InvalidArgumentError(std::string("the VPTQ layer quantizer was given the options of "
                                              "method '") +
                                  QuantizeMethod(options) + "'");
    }
    if (in.weight == nullptr || in.hessian == nullptr) {
      return InvalidArgumentError("the VPTQ layer quantizer needs a weight and a Hessian");
    }
    const bool bf16 = in.weight_dtype == WeightDtype::kBFloat16;
    VptqOptions solver_options = o->solver;
    solver_options.param_dtype = bf16 ? VptqParamDtype::kBFloat16 : VptqParamDtype::kFloat16;
    solver_options.progress = progress;
    // The loader's limits, before any work.
    QF_ASSIGN_OR_RETURN(VptqLayerConfig config,
                        VptqConfigFromOptions(solver_options, in.weight->rows, in.weight->cols,
                                              in.has_bias));
    QF_RETURN_IF_ERROR(ValidateVptqLayerConfig(config));

    QF_ASSIGN_OR_RETURN(VptqResult r, solver_->Quantize(*in.weight, *in.hessian, solver_options));
    QuantizedLayer out;
    out.stats.proxy_loss = r.proxy_loss;
    out.stats.output_error_f32 = r.output_error;
    out.stats.weight_energy = r.weight_energy;
    out.stats.damp_percent_used = r.damp_percent_used;
    out.stats.bits_per_weight = VptqBitsPerWeight(r);

    QF_ASSIGN_OR_RETURN(
        VptqLayerTensors packed,
        PackVptqLayer(r, bf16 ? VptqModelDtype::kBFloat16 : VptqModelDtype::kFloat16));
    // What the loader decodes: the packed tensors in the model dtype's arithmetic.
    QF_ASSIGN_OR_RETURN(Matrix decoded, DequantizeVptqLayer(packed, VptqDecodeArithmetic::kModelDtype));
    out.stats.output_error = OutputError(*in.weight, decoded, *in.hessian);
    packed.config.bias = in.has_bias;  // the bias itself stays in the model
    out.layer_config = VptqLayerConfigJson(packed.config);
    out.tensors.reserve(packed.tensors.size());
    for (VptqTensor& t : packed.tensors) {
      out.tensors.push_back(QuantizedTensor{std::move(t.suffix), std::move(t.dtype),
                                            std::move(t.shape), std::move(t.bytes)});
    }
    return out;
  }

 private:
  std::unique_ptr<VptqSolver> solver_;
};

}  // namespace

std::unique_ptr<LayerQuantizer> NewVptqLayerQuantizer(std::unique_ptr<VptqSolver> solver) {
  return std::make_unique<VptqLayerQuantizer>(std::move(solver));
}

std::string VptqLayerConfigJson(const VptqLayerConfig& c) {
  // In key order, as nlohmann::json (a std::map) writes an object.
  std::string out = "{";
  Bool("bias", c.bias, &out);
  Bool("enable_norm", c.enable_norm, &out);
  Bool("enable_perm", c.enable_perm, &out);
  Int("group_num", c.group_num, &out);
  Int("group_size", c.group_size, &out);
  Int("in_features", c.in_features, &out);
  Bool("indices_as_float", c.indices_as_float, &out);
  Bool("is_indice_packed", c.is_indice_packed, &out);
  Pair("num_centroids", c.num_centroids, &out);
  Pair("num_res_centroids", c.num_res_centroids, &out);
  Int("out_features", c.out_features, &out);
  Int("outlier_size", c.outlier_size, &out);
  Pair("vector_lens", c.vector_lens, &out);
  out.push_back('}');
  return out;
}

}  // namespace qforge::quant

// One linear layer's quantization behind one interface, whatever the method (GPTQ, VPTQ) and
// the device (CPU, CUDA): the weight and its Hessian go in; the tensors to stage, the
// method's per-layer artifact config and the layer's figures come out. The worker's task
// execution and the offline driver call only this interface and pick the implementation by
// method from a LayerQuantizerSet (one set per device). A new method is one implementation
// (as gptq_layer_quantizer.h, vptq_layer_quantizer.h), its options in QuantizeOptions, and
// one branch of the job spec conversion (job/spec.h).
//
// Thread-safety: a LayerQuantizer is thread-compatible: one Quantize at a time per instance.
// The CUDA quantizers of one device share its GpuContext, so one Quantize at a time per
// device. LayerQuantizerSet is thread-compatible; its const lookups may run concurrently.
#ifndef QFORGE_QUANT_LAYER_QUANTIZER_H_
#define QFORGE_QUANT_LAYER_QUANTIZER_H_

#include <cstddef>  // before matrix.h, which uses ::size_t without including it
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/matrix.h"
#include "base/status.h"
#include "quant/gptq.h"
#include "quant/gptq_pack.h"
#include "quant/progress.h"
#include "quant/vptq.h"

namespace qforge::quant {

// The dtype the model stores the weight in. A method whose checkpoint keeps parameters in the
// model's dtype follows it (VPTQ: codebooks and scales in bfloat16 for a bfloat16 weight,
// float16 for any other); GPTQ stores float16 scales whatever it is.
enum class WeightDtype { kFloat16, kBFloat16, kFloat32, kFloat64 };

// One layer as the quantizers take it. The matrices are not owned and must outlive the call.
struct LayerInput {
  const Matrix* weight = nullptr;   // [out, in] float32
  const Matrix* hessian = nullptr;  // [in, in] symmetric PSD (identity for data-free runs)
  WeightDtype weight_dtype = WeightDtype::kFloat16;
  // Whether the layer has a bias. The bias stays in the model; a method whose per-layer
  // config records it (VPTQ's `bias`) says so.
  bool has_bias = false;
};

// GPTQ's options: the solver's and the checkpoint format the tensors are packed for.
struct GptqLayerOptions {
  static constexpr char kMethod[] = "gptq";
  GptqOptions solver;  // its `progress` is replaced by Quantize's
  GptqCheckpointFormat format = GptqCheckpointFormat::kV1;
};

// VPTQ's options.
struct VptqLayerOptions {
  static constexpr char kMethod[] = "vptq";
  VptqOptions solver;  // its `progress` is replaced by Quantize's, `param_dtype` follows the
                       // weight's dtype (LayerInput::weight_dtype)
};

// The options of one method; the alternative says which method quantizes the layer.
using QuantizeOptions = std::variant<GptqLayerOptions, VptqLayerOptions>;

// The method `options` are for: "gptq" or "vptq" (the kMethod of the alternative).
const char* QuantizeMethod(const QuantizeOptions& options);

// One tensor of a quantized layer, as it is staged and then written to the artifact.
struct QuantizedTensor {
  std::string suffix;          // after "<module>.": "qweight", "centroids.weight", ...
  std::string dtype;           // safetensors dtype name: "I32", "I16", "F16", "BF16"
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian, row-major; product(shape) × dtype size
};

// The figures of one quantized layer (numerical conventions: docs/ARCHITECTURE.md).
struct QuantizeStats {
  double proxy_loss = 0;         // Σ (w−q)²/d²/2 (the GPTQ reference's figure)
  // tr(ΔW H ΔWᵀ) with the original H and ΔW = W − the weight a loader decodes from the packed
  // tensors in its dtype (GPTQ: float16, scales[g] · (q − z) rounded to float16; VPTQ: the
  // model dtype, every elementwise step rounded as the package's torch path does:
  // DequantizeGptqPacked / DequantizeVptqLayer with their 16-bit arithmetic).
  double output_error = 0;
  // The same with the solver's own float32 result (GPTQ: float32 scales; VPTQ: the stored
  // 16-bit parameters combined in float32).
  double output_error_f32 = 0;
  double weight_energy = 0;      // tr(W H Wᵀ)
  double damp_percent_used = 0;  // the damping the factorization needed
  // Stored bits per weight. VPTQ: indices, codebooks, scales and perm; GPTQ: codes, zeros,
  // scales and g_idx (the packed tensors' bytes · 8 / (out · in)).
  double bits_per_weight = 0;
};

struct QuantizedLayer {
  std::vector<QuantizedTensor> tensors;  // in the order they are staged
  // The method's per-layer artifact config, serialized (VPTQ: the layer's `config_for_layers`
  // entry as JSON); empty when the method has none (GPTQ).
  std::string layer_config;
  QuantizeStats stats;
};

class LayerQuantizer {
 public:
  virtual ~LayerQuantizer() = default;

  // The method it implements ("gptq", "vptq": the kMethod of the options it takes).
  virtual const char* method() const = 0;
  // The device it solves on ("cpu", "cuda").
  virtual const char* backend() const = 0;

  // Quantizes `in` with `options` and packs the result into the method's checkpoint tensors.
  // `progress` (may be empty) receives the solve's progress and may cancel it (progress.h).
  // Errors: INVALID_ARGUMENT when `options` are another method's, an input matrix is null,
  // the shapes or options do not fit (not packable, outside the loader's limits) or W/H are
  // not finite; FAILED_PRECONDITION when no damping makes H positive definite; CANCELLED when
  // `progress` returned false; the backend's errors (RESOURCE_EXHAUSTED, INTERNAL on CUDA).
  // The messages do not name the layer (the caller does).
  virtual StatusOr<QuantizedLayer> Quantize(const LayerInput& in, const QuantizeOptions& options,
                                            const SolveProgress& progress) = 0;
};

// The quantizers of one device, at most one per method.
class LayerQuantizerSet {
 public:
  // Adds `quantizer` (not null), replacing the one of the same method.
  void Add(std::unique_ptr<LayerQuantizer> quantizer);
  // The quantizer of `method` ("gptq"), or null when the set has none.
  LayerQuantizer* Find(std::string_view method) const;
  // The quantizer that takes `options`, or null: Find(QuantizeMethod(options)).
  LayerQuantizer* For(const QuantizeOptions& options) const;
  // The device its quantizers solve on ("cpu", "cuda"); "none" for an empty set.
  const char* backend() const;

 private:
  std::vector<std::unique_ptr<LayerQuantizer>> quantizers_;
};

// GPTQ and VPTQ on the CPU solvers. (The CUDA set: NewCudaLayerQuantizers, cuda/backends.h.)
LayerQuantizerSet NewCpuLayerQuantizers();

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_LAYER_QUANTIZER_H_

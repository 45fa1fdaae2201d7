#include "quant/layer_quantizer.h"

#include <utility>

#include "quant/gptq_layer_quantizer.h"
#include "quant/vptq_layer_quantizer.h"

namespace qforge::quant {

const char* QuantizeMethod(const QuantizeOptions& options) {
  return std::visit([](const auto& o) -> const char* { return o.kMethod; }, options);
}

void LayerQuantizerSet::Add(std::unique_ptr<LayerQuantizer> quantizer) {
  for (std::unique_ptr<LayerQuantizer>& q : quantizers_) {
    if (std::string_view(q->method()) == quantizer->method()) {
      q = std::move(quantizer);
      return;
    }
  }
  quantizers_.push_back(std::move(quantizer));
}

LayerQuantizer* LayerQuantizerSet::Find(std::string_view method) const {
  for (const std::unique_ptr<LayerQuantizer>& q : quantizers_) {
    if (method == q->method()) return q.get();
  }
  return nullptr;
}

LayerQuantizer* LayerQuantizerSet::For(const QuantizeOptions& options) const {
  return Find(QuantizeMethod(options));
}

const char* LayerQuantizerSet::backend() const {
  return quantizers_.empty() ? "none" : quantizers_.front()->backend();
}

LayerQuantizerSet NewCpuLayerQuantizers() {
  LayerQuantizerSet set;
  set.Add(NewGptqLayerQuantizer(NewCpuGptqSolver()));
  set.Add(NewVptqLayerQuantizer(NewCpuVptqSolver()));
  return set;
}

}  // namespace qforge::quant

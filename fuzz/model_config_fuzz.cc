// Fuzz target: the config.json reader (job/decoder_model.h ParseDecoderModelConfig).
// Invariants: an error names its source; an accepted config has positive sizes that divide as
// the forward pass needs (heads a multiple of kv_heads, a positive head_dim).
#include <string_view>

#include "fuzz/fuzz_target.h"
#include "job/decoder_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view json(reinterpret_cast<const char*>(data), size);
  auto config = qforge::ParseDecoderModelConfig(json, "fuzz: config.json");
  if (!config.ok()) {
    QF_FUZZ_CHECK(config.status().message().find("fuzz: config.json") != std::string_view::npos);
    return 0;
  }
  const auto& d = config->decoder;
  QF_FUZZ_CHECK(d.hidden_size > 0 && d.intermediate_size > 0 && d.num_hidden_layers > 0);
  QF_FUZZ_CHECK(d.num_attention_heads > 0 && d.num_key_value_heads > 0);
  QF_FUZZ_CHECK(d.num_attention_heads % d.num_key_value_heads == 0);
  QF_FUZZ_CHECK(d.vocab_size > 0 && d.head_dim > 0);
  return 0;
}

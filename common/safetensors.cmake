# safetensors headers, tensors, models (sharded or not) and streaming writers.
add_library(qforge_safetensors ${CMAKE_CURRENT_LIST_DIR}/safetensors.cc)
target_include_directories(qforge_safetensors PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_safetensors PUBLIC qforge_object_store qforge_quant_base
  nlohmann_json::nlohmann_json absl::status absl::statusor absl::strings absl::str_format)
list(APPEND QFORGE_COMMON_LIBS qforge_safetensors)

add_library(qforge_layer_runner ${CMAKE_CURRENT_LIST_DIR}/layer_runner.cc)
target_include_directories(qforge_layer_runner PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_layer_runner PUBLIC qforge_quant qforge_safetensors qforge_hessian_file
  nlohmann_json::nlohmann_json absl::strings absl::status absl::statusor)

add_executable(qforge-quantize ${CMAKE_CURRENT_LIST_DIR}/qforge_quantize.cc)
target_link_libraries(qforge-quantize PRIVATE qforge_layer_runner qforge_job_core
  qforge_coordinator_core qforge_common CLI11::CLI11)
target_compile_definitions(qforge-quantize PRIVATE QFORGE_VERSION="${PROJECT_VERSION}")

add_executable(qforge-make-demo-model ${CMAKE_CURRENT_LIST_DIR}/make_demo_model.cc)
target_link_libraries(qforge-make-demo-model PRIVATE qforge_common qforge_quant CLI11::CLI11
  nlohmann_json::nlohmann_json)

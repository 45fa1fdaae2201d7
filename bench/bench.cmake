add_executable(qforge-bench ${CMAKE_CURRENT_LIST_DIR}/qforge_bench.cc)
target_link_libraries(qforge-bench PRIVATE qforge_quant qforge_common CLI11::CLI11
  nlohmann_json::nlohmann_json)

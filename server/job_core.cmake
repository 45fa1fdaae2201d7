# Transport-free coordinator core: planning and assembly.
add_library(qforge_job_core ${CMAKE_CURRENT_LIST_DIR}/planner.cc ${CMAKE_CURRENT_LIST_DIR}/assembler.cc)
target_include_directories(qforge_job_core PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_job_core PUBLIC qforge_safetensors qforge_sha256 qforge_gptq_pack
  nlohmann_json::nlohmann_json absl::strings absl::status absl::statusor)

add_library(qforge_hessian_file ${CMAKE_CURRENT_LIST_DIR}/hessian_file.cc)
target_include_directories(qforge_hessian_file PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_hessian_file PUBLIC qforge_safetensors absl::strings absl::status absl::statusor)
list(APPEND QFORGE_COMMON_LIBS qforge_hessian_file)

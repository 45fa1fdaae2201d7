add_library(qforge_uri ${CMAKE_CURRENT_LIST_DIR}/uri.cc)
target_include_directories(qforge_uri PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_uri PUBLIC absl::strings absl::status absl::statusor)
list(APPEND QFORGE_COMMON_LIBS qforge_uri)

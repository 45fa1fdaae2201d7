# ObjectStore: the interface, LocalStore (file://), MemStore (tests) and ForwardingStore.
add_library(qforge_object_store
  ${CMAKE_CURRENT_LIST_DIR}/object_store.cc
  ${CMAKE_CURRENT_LIST_DIR}/local_store.cc
  ${CMAKE_CURRENT_LIST_DIR}/mem_store.cc)
target_include_directories(qforge_object_store PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_object_store PUBLIC absl::status absl::statusor absl::strings
  absl::str_format absl::core_headers Threads::Threads)
list(APPEND QFORGE_COMMON_LIBS qforge_object_store)

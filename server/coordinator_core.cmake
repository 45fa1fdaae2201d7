# The transport-free coordinator core: spec conversion and validation (also linked by the
# worker, which converts its Task's spec with the same code), the JobManager (planning,
# scheduling, leases, retries, cancellation, assembly, recovery) and its state stores.
find_package(SQLite3 REQUIRED)
# Visible to the test fragments (which open databases directly) and the other components.
get_target_property(qforge_sqlite_global SQLite::SQLite3 IMPORTED_GLOBAL)
if(NOT qforge_sqlite_global)
  set_target_properties(SQLite::SQLite3 PROPERTIES IMPORTED_GLOBAL TRUE)
endif()

add_library(qforge_job_spec ${CMAKE_CURRENT_LIST_DIR}/spec.cc)
target_include_directories(qforge_job_spec PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_job_spec PUBLIC qforge_proto qforge_job_core qforge_uri qforge_quant
  nlohmann_json::nlohmann_json absl::status absl::statusor absl::strings)

add_library(qforge_coordinator_core
  ${CMAKE_CURRENT_LIST_DIR}/job_manager.cc
  ${CMAKE_CURRENT_LIST_DIR}/sqlite_state_store.cc)
target_include_directories(qforge_coordinator_core PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_coordinator_core PUBLIC qforge_job_spec qforge_proto qforge_job_core
  qforge_layer_runner qforge_common SQLite::SQLite3 absl::synchronization absl::time
  absl::strings absl::status absl::statusor absl::core_headers Threads::Threads)

# The coordinator's gRPC edge (JobService / WorkerService adapters, bearer-token auth, the
# long-poll executor), its Prometheus metrics and local-worker supervision, and the
# qforge-coordinator binary (build/server/qforge-coordinator).
find_package(gRPC CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)

add_library(qforge_coordinator_rpc
  ${CMAKE_CURRENT_LIST_DIR}/auth.cc
  ${CMAKE_CURRENT_LIST_DIR}/long_poll_executor.cc
  ${CMAKE_CURRENT_LIST_DIR}/rpc_job_service.cc
  ${CMAKE_CURRENT_LIST_DIR}/rpc_worker_service.cc
  ${CMAKE_CURRENT_LIST_DIR}/metrics.cc
  ${CMAKE_CURRENT_LIST_DIR}/local_workers.cc)
target_include_directories(qforge_coordinator_rpc PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_coordinator_rpc PUBLIC qforge_coordinator_core qforge_proto
  qforge_sha256 gRPC::grpc++ prometheus-cpp::core prometheus-cpp::pull
  absl::status absl::statusor absl::strings Threads::Threads)

add_executable(qforge-coordinator ${CMAKE_CURRENT_LIST_DIR}/coordinator_main.cc)
# Reflection registers itself through a static initializer: link the whole library.
target_link_libraries(qforge-coordinator PRIVATE qforge_coordinator_rpc gRPC::grpc++_reflection
  CLI11::CLI11)
target_compile_definitions(qforge-coordinator PRIVATE QFORGE_VERSION="${PROJECT_VERSION}")

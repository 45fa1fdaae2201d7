# The worker process: task executor (fetch → solve → stage), the coordinator client and loop,
# and the qforge-worker binary (build/worker/qforge-worker).
find_package(gRPC CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)

add_library(qforge_worker_core
  ${CMAKE_CURRENT_LIST_DIR}/task_executor.cc
  ${CMAKE_CURRENT_LIST_DIR}/coordinator_client.cc)
target_include_directories(qforge_worker_core PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(qforge_worker_core PUBLIC qforge_proto qforge_layer_runner qforge_object_store
  qforge_hessian_file qforge_safetensors qforge_sha256 qforge_uri qforge_quant qforge_job_spec
  gRPC::grpc++ absl::status absl::statusor absl::strings absl::str_format absl::cord
  absl::core_headers Threads::Threads)

add_executable(qforge-worker ${CMAKE_CURRENT_LIST_DIR}/worker_main.cc)
target_link_libraries(qforge-worker PRIVATE qforge_worker_core CLI11::CLI11
  prometheus-cpp::pull prometheus-cpp::core)
target_compile_definitions(qforge-worker PRIVATE QFORGE_VERSION="${PROJECT_VERSION}")

# Multi-process tests: real coordinator, workers and CLI on loopback. Built only once the three
# binaries exist as targets.
if(TARGET qforge-coordinator AND TARGET qforge-worker AND TARGET qforge)
  qforge_test(service_integration_test
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/service_test.cc ${CMAKE_CURRENT_LIST_DIR}/subprocess.cc
    LIBS qforge_common nlohmann_json::nlohmann_json
    LABELS integration SERIAL TIMEOUT 400)
  target_compile_definitions(service_integration_test PRIVATE QFORGE_BIN_DIR="${PROJECT_BINARY_DIR}")
  add_dependencies(service_integration_test qforge-coordinator qforge-worker qforge
    qforge-quantize qforge-make-demo-model)
endif()

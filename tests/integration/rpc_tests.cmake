# The coordinator's gRPC edge with an in-process server on loopback (auth, status mapping,
# WatchJob, AcquireTask long-polls, health, reflection, /metrics, a real Prometheus scrape),
# plus offline checks of deploy/ (promtool check config / check rules / test rules).
find_package(gRPC CONFIG REQUIRED)

if(TARGET qforge_coordinator_rpc)
  qforge_test(rpc_test
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/rpc_test.cc ${CMAKE_CURRENT_LIST_DIR}/subprocess.cc
    LIBS qforge_coordinator_rpc gRPC::grpc++_reflection nlohmann_json::nlohmann_json
    LABELS integration TIMEOUT 120)
  target_compile_definitions(rpc_test PRIVATE QFORGE_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
endif()

# Exits 77 (skipped) when promtool is not installed.
add_test(NAME deploy_promtool COMMAND ${PROJECT_SOURCE_DIR}/deploy/check.sh)
set_tests_properties(deploy_promtool PROPERTIES SKIP_RETURN_CODE 77 LABELS deploy TIMEOUT 60)

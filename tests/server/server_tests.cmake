# The transport-free coordinator core: spec conversion, the SQLite state store and the
# JobManager (FakeClock, real SQLite file, real LocalStore with a tiny generated model).
qforge_test(coordinator_core_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/spec_test.cc
          ${CMAKE_CURRENT_LIST_DIR}/sqlite_state_store_test.cc
          ${CMAKE_CURRENT_LIST_DIR}/job_manager_test.cc
  LIBS qforge_coordinator_core qforge_layer_runner qforge_common qforge_quant SQLite::SQLite3
  LABELS server
  TIMEOUT 120)

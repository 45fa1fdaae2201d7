# The worker process's parts (task executor, coordinator client loop against an in-process
# fake coordinator) and the qforge CLI's formatting and configuration.
if(TARGET qforge_worker_core)
  qforge_test(worker_task_executor_test
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/task_executor_test.cc
    LIBS qforge_worker_core qforge_common
    LABELS worker)
  qforge_test(worker_loop_test
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/worker_loop_test.cc
    LIBS qforge_worker_core
    LABELS worker)
endif()
if(TARGET qforge_cli)
  qforge_test(cli_output_test
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/cli_output_test.cc
    LIBS qforge_cli nlohmann_json::nlohmann_json
    LABELS cli)
endif()

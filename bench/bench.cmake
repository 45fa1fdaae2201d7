# qforge-bench. The synthetic mode needs only the quantization core, CLI11 and nlohmann-json,
# so the binary is built in core-only configurations too (the lent GPU machines, which get
# both from .carry/prefix via CMAKE_PREFIX_PATH); the file mode (bench/file_mode.cc, through
# common/ and abseil) is compiled in only when common/ is part of the build.
find_package(CLI11 QUIET)
find_package(nlohmann_json QUIET)
if(NOT TARGET CLI11::CLI11 OR NOT TARGET nlohmann_json::nlohmann_json)
  message(STATUS "qforge: qforge-bench skipped: CLI11 or nlohmann-json not found "
                 "(core-only: pass -DCMAKE_PREFIX_PATH=<repo>/.carry/prefix)")
  return()
endif()

add_executable(qforge-bench ${CMAKE_CURRENT_LIST_DIR}/qforge_bench.cc
  ${CMAKE_CURRENT_LIST_DIR}/bench_config.cc)
target_link_libraries(qforge-bench PRIVATE qforge_quant CLI11::CLI11
  nlohmann_json::nlohmann_json)
if(TARGET qforge_common)
  target_sources(qforge-bench PRIVATE ${CMAKE_CURRENT_LIST_DIR}/file_mode.cc)
  target_compile_definitions(qforge-bench PRIVATE QFORGE_BENCH_FILE_MODE=1)
  target_link_libraries(qforge-bench PRIVATE qforge_common)
  message(STATUS "qforge: qforge-bench with file mode")
else()
  message(STATUS "qforge: qforge-bench synthetic mode only (file mode needs common/)")
endif()

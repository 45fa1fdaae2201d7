# qforge_test(NAME SOURCES ... LIBS ... [LABELS ...] [SERIAL] [TIMEOUT s]): one GoogleTest
# executable whose tests are registered with ctest. SERIAL tests never run beside others
# (multi-process tests that need the machine's cores).
function(qforge_test name)
  cmake_parse_arguments(QT "SERIAL" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${QT_SOURCES})
  target_link_libraries(${name} PRIVATE ${QT_LIBS} GTest::gtest GTest::gtest_main Threads::Threads)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR})
  if(NOT QT_TIMEOUT)
    set(QT_TIMEOUT 600)
  endif()
  set(props LABELS "${QT_LABELS}" TIMEOUT ${QT_TIMEOUT})
  if(QT_SERIAL)
    list(APPEND props RUN_SERIAL TRUE)
  endif()
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES ${props})
endfunction()

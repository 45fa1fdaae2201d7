# qforge_test(NAME SOURCES ... LIBS ... [LABELS ...] [ENVIRONMENT VAR=value ...] [SERIAL]
# [TIMEOUT s] [PREFIX p]): one GoogleTest executable whose tests are registered with ctest
# (named p + Suite.Test; a PREFIX keeps a second build of the same suite apart). SERIAL tests
# never run beside others (multi-process tests that need the machine's cores).
function(qforge_test name)
  cmake_parse_arguments(QT "SERIAL" "TIMEOUT;PREFIX" "SOURCES;LIBS;LABELS;ENVIRONMENT" ${ARGN})
  add_executable(${name} ${QT_SOURCES})
  target_link_libraries(${name} PRIVATE ${QT_LIBS} GTest::gtest GTest::gtest_main Threads::Threads)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR})
  if(NOT QT_TIMEOUT)
    set(QT_TIMEOUT 600)
  endif()
  set(props TIMEOUT ${QT_TIMEOUT})
  if(QT_SERIAL)
    list(APPEND props RUN_SERIAL TRUE)
  endif()
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 TEST_PREFIX "${QT_PREFIX}" PROPERTIES ${props})
  # List-valued properties (LABELS "quant;gpu", several ENVIRONMENT entries) do not survive
  # gtest_discover_tests' generated script (3.25 splits them into stray arguments), so they are
  # set by a ctest include file that runs after the discovered tests are defined.
  set(list_props "")
  if(QT_LABELS)
    string(APPEND list_props " LABELS [==[${QT_LABELS}]==]")
  endif()
  if(QT_ENVIRONMENT)
    string(APPEND list_props " ENVIRONMENT [==[${QT_ENVIRONMENT}]==]")
  endif()
  if(list_props)
    set(props_file ${CMAKE_CURRENT_BINARY_DIR}/${name}_list_properties.cmake)
    file(WRITE ${props_file}
         "if(${name}_TESTS)\n  set_tests_properties(\${${name}_TESTS} PROPERTIES${list_props})\nendif()\n")
    set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES ${props_file})
  endif()
endfunction()

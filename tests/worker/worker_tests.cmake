qforge_test(offline_pipeline_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/offline_pipeline_test.cc
  LIBS qforge_layer_runner qforge_job_core qforge_common qforge_quant
  LABELS pipeline)

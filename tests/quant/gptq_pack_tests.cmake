qforge_test(gptq_pack_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/gptq_pack_test.cc
  LIBS qforge_gptq_pack
  LABELS quant)

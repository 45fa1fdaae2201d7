qforge_test(cuda_device_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/device_test.cc
  LIBS qforge_cuda
  LABELS quant)

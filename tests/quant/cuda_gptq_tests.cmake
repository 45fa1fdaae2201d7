# CUDA GPTQ backend against the CPU solver (the GPU cases skip without a device) and its
# memory estimate (checked everywhere).
qforge_test(cuda_gptq_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/cuda_gptq_test.cc
  LIBS qforge_cuda qforge_quant
  LABELS quant gpu)

# The CUDA VPTQ backend against the CPU one (skipped without a GPU; the memory-estimate test
# runs everywhere).
qforge_test(cuda_vptq_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/cuda_vptq_test.cc
  LIBS qforge_cuda qforge_quant
  LABELS quant gpu)

# The CUDA VPTQ backend's device-memory estimate against the pool's high-water mark (GPU only).
qforge_test(cuda_vptq_memory_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/cuda_vptq_memory_test.cc
  LIBS qforge_cuda qforge_quant
  LABELS quant gpu)

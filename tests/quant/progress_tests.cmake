# Progress reporting and cooperative cancellation of the CPU solvers (worker/quant/progress.h).
qforge_test(quant_progress_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/progress_test.cc
  LIBS qforge_vptq qforge_gptq
  LABELS quant)

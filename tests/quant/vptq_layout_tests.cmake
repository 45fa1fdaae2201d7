# The host-side pieces shared by the CPU and CUDA VPTQ solvers (vptq_layout.h).
qforge_test(quant_vptq_layout_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/vptq_layout_test.cc
  LIBS qforge_vptq
  LABELS quant)

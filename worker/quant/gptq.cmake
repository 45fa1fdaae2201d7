# GPTQ CPU solver and the pieces it shares with the other solvers: linear algebra (BLAS or
# portable), Hessian preparation, the min-max quantizer, synthetic layers, the float64 oracle.
add_library(qforge_gptq
  ${CMAKE_CURRENT_LIST_DIR}/linalg.cc
  ${CMAKE_CURRENT_LIST_DIR}/hessian.cc
  ${CMAKE_CURRENT_LIST_DIR}/quantizer.cc
  ${CMAKE_CURRENT_LIST_DIR}/gptq.cc
  ${CMAKE_CURRENT_LIST_DIR}/synthetic.cc
  ${CMAKE_CURRENT_LIST_DIR}/reference/gptq_ref.cc)
target_link_libraries(qforge_gptq PUBLIC qforge_quant_base)
list(APPEND QFORGE_QUANT_LIBS qforge_gptq)

# GPTQ solver, linear algebra, Hessian preparation and quantizer suites. The linalg, hessian
# and GPTQ-oracle suites run both the BLAS and the portable path in one binary
# (internal::SetForcePortableLinalg); without BLAS the BLAS cases skip.
foreach(suite linalg hessian quantizer gptq)
  qforge_test(quant_${suite}_test
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/${suite}_test.cc
    LIBS qforge_gptq
    LABELS quant)
endforeach()

# k-means (+ its float64 oracle), the VPTQ solver, and the VPTQ checkpoint packer.
qforge_test(quant_kmeans_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/kmeans_test.cc
  LIBS qforge_vptq qforge_kmeans_ref
  LABELS quant)
qforge_test(quant_vptq_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/vptq_test.cc
  LIBS qforge_vptq qforge_gptq
  LABELS quant)
qforge_test(quant_vptq_pack_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/vptq_pack_test.cc
  LIBS qforge_vptq
  LABELS quant)

# VPTQ: weighted k-means with an injected nearest-centroid search (kmeans.h), the CPU VPTQ
# solver (vptq.h), the host-side pieces every VPTQ backend shares (vptq_layout.h: checks,
# geometry, normalisation set-up; the CUDA solver links them from here) and the checkpoint
# packer/dequantiser (vptq_pack.h). Linear algebra, Hessian preparation and the output-error
# metrics come from qforge_gptq (gptq.cmake).
add_library(qforge_vptq
  ${CMAKE_CURRENT_LIST_DIR}/kmeans.cc
  ${CMAKE_CURRENT_LIST_DIR}/vptq.cc
  ${CMAKE_CURRENT_LIST_DIR}/vptq_layout.cc
  ${CMAKE_CURRENT_LIST_DIR}/vptq_pack.cc)
target_link_libraries(qforge_vptq PUBLIC qforge_gptq qforge_quant_base)
list(APPEND QFORGE_QUANT_LIBS qforge_vptq)

# Float64 k-means oracle, for tests only (not part of qforge_quant).
add_library(qforge_kmeans_ref ${CMAKE_CURRENT_LIST_DIR}/reference/kmeans_ref.cc)
target_link_libraries(qforge_kmeans_ref PUBLIC qforge_quant_base)

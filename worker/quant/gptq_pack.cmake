# GPTQ checkpoint packing (qweight / qzeros / scales / g_idx): layout helpers shared with CUDA.
add_library(qforge_gptq_pack ${CMAKE_CURRENT_LIST_DIR}/gptq_pack.cc)
target_link_libraries(qforge_gptq_pack PUBLIC qforge_quant_base)
list(APPEND QFORGE_QUANT_LIBS qforge_gptq_pack)

# CUDA backends. Every .cu file under cuda/ is compiled whenever nvcc is found (CI has nvcc but
# no GPU); without nvcc the factories of cuda/backends.h answer UNAVAILABLE (backends_stub.cc).
# The device-memory estimates (cuda/*_memory.cc) are plain C++ in their own library, so the
# coordinator can place tasks without linking the CUDA runtime.
file(GLOB QFORGE_CUDA_ESTIMATES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/cuda/*_memory.cc)
add_library(qforge_gpu_memory ${QFORGE_CUDA_ESTIMATES})
target_link_libraries(qforge_gpu_memory PUBLIC qforge_quant_base qforge_vptq qforge_gptq)
if(QFORGE_HAVE_CUDA)
  file(GLOB QFORGE_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/cuda/*.cu)
  add_library(qforge_cuda ${QFORGE_CUDA_SOURCES})
  target_link_libraries(qforge_cuda PUBLIC qforge_gpu_memory qforge_quant_base qforge_vptq
                        qforge_gptq CUDA::cudart CUDA::cublas CUDA::cusolver)
  set_target_properties(qforge_cuda PROPERTIES CUDA_SEPARABLE_COMPILATION OFF)
  target_compile_options(qforge_cuda PRIVATE
                         $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
else()
  add_library(qforge_cuda ${CMAKE_CURRENT_LIST_DIR}/cuda/device_stub.cc
              ${CMAKE_CURRENT_LIST_DIR}/cuda/backends_stub.cc)
  target_link_libraries(qforge_cuda PUBLIC qforge_gpu_memory qforge_quant_base qforge_vptq
                        qforge_gptq)
endif()
list(APPEND QFORGE_QUANT_LIBS qforge_gpu_memory qforge_cuda)

# The GPU test suites on the CPU: every worker/quant/cuda/*.cu file rewritten to C++
# (cmake/rewrite_cu_for_emulator.cmake) and run by the lane emulator (emulated_cuda.h) over an
# emulated runtime, cuBLAS and cuSOLVER (emulated_runtime.cc, OpenBLAS/LAPACKE). It checks the
# kernels' logic,
# barriers, launch limits and device-memory handling where CI has no GPU; it does not replace the
# runs on a GPU (see emulated_cuda.h for what it cannot see). Needs the CUDA toolkit's headers
# and OpenBLAS/LAPACKE.
set(QFORGE_CUDA_EMULATION "AUTO" CACHE STRING
    "Run the GPU test suites on the CPU emulator: AUTO (with CUDA headers and BLAS), ON or OFF")
set_property(CACHE QFORGE_CUDA_EMULATION PROPERTY STRINGS AUTO ON OFF)
set(qforge_emulation_possible OFF)
if(QFORGE_HAVE_CUDA AND QFORGE_HAVE_BLAS)
  set(qforge_emulation_possible ON)
endif()
if(QFORGE_CUDA_EMULATION STREQUAL "ON" AND NOT qforge_emulation_possible)
  message(FATAL_ERROR "QFORGE_CUDA_EMULATION=ON needs the CUDA toolkit and OpenBLAS/LAPACKE")
endif()
if(QFORGE_CUDA_EMULATION STREQUAL "OFF" OR NOT qforge_emulation_possible)
  message(STATUS "qforge: CUDA emulator tests OFF")
  return()
endif()
message(STATUS "qforge: CUDA emulator tests ON")

set(emu_dir ${CMAKE_CURRENT_LIST_DIR})
file(GLOB emu_cuda_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/worker/quant/cuda/*.cu)
set(emu_generated)
foreach(cu ${emu_cuda_sources})
  get_filename_component(stem ${cu} NAME_WE)
  set(out ${CMAKE_CURRENT_BINARY_DIR}/cuda_emu/${stem}_emulated.cc)
  add_custom_command(OUTPUT ${out}
    COMMAND ${CMAKE_COMMAND} -DINPUT=${cu} -DOUTPUT=${out} -P ${PROJECT_SOURCE_DIR}/cmake/rewrite_cu_for_emulator.cmake
    DEPENDS ${cu} ${PROJECT_SOURCE_DIR}/cmake/rewrite_cu_for_emulator.cmake
    COMMENT "Rewriting ${stem}.cu for the CUDA emulator" VERBATIM)
  list(APPEND emu_generated ${out})
endforeach()
# The rewritten sources: C++ with the emulator's prelude; warnings off (the CUDA headers'
# execution-space attributes mean nothing to the host compiler). No FMA contraction, so the
# emulated kernels round as the CPU reference code does.
set_source_files_properties(${emu_generated} PROPERTIES LANGUAGE CXX
  COMPILE_OPTIONS "-include;${emu_dir}/emulated_cuda.h;-w;-ffp-contract=off")
# The scheduler switches stacks with _longjmp, which _FORTIFY_SOURCE's check rejects.
set_source_files_properties(${emu_dir}/emulated_lanes.cc PROPERTIES
  COMPILE_OPTIONS "-U_FORTIFY_SOURCE;-D_FORTIFY_SOURCE=0")
add_library(qforge_cuda_emulated STATIC ${emu_generated} ${emu_dir}/emulated_lanes.cc
            ${emu_dir}/emulated_runtime.cc)
target_include_directories(qforge_cuda_emulated PUBLIC ${PROJECT_SOURCE_DIR}
                           ${CUDAToolkit_INCLUDE_DIRS})
target_link_libraries(qforge_cuda_emulated PUBLIC qforge_gpu_memory qforge_vptq qforge_gptq
                      qforge_quant_base)
# The core libraries without the real CUDA backend (the emulated one replaces it).
get_target_property(emu_core_libs qforge_quant INTERFACE_LINK_LIBRARIES)
list(REMOVE_ITEM emu_core_libs qforge_cuda)

# One solver thread: the emulated cuBLAS calls are small, and OpenBLAS's idle threads spinning
# beside them cost more than they help.
set(emu_environment QFORGE_NUM_THREADS=1)

# The GPU suites, unchanged, on the emulated device.
foreach(suite cuda_gptq_test cuda_vptq_test cuda_vptq_memory_test)
  string(REPLACE "_test" "_emulated_test" emu_name ${suite})
  qforge_test(${emu_name}
    SOURCES ${PROJECT_SOURCE_DIR}/tests/quant/${suite}.cc
    LIBS qforge_cuda_emulated ${emu_core_libs}
    LABELS quant emu
    ENVIRONMENT ${emu_environment}
    PREFIX "emulated.")
endforeach()
# The emulator's own behaviour (barriers, warp collectives, launch limits, pointer checks).
qforge_test(cuda_emulator_test
  SOURCES ${emu_dir}/emulator_test.cc
  LIBS qforge_cuda_emulated
  LABELS quant emu
  PREFIX "emulated.")
# What only the emulator can show: device memory after failures and cancellations.
qforge_test(cuda_failure_emulated_test
  SOURCES ${emu_dir}/cuda_failure_test.cc
  LIBS qforge_cuda_emulated ${emu_core_libs}
  LABELS quant emu
  ENVIRONMENT ${emu_environment}
  PREFIX "emulated.")

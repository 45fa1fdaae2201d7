# cmake -DINPUT=x.cu -DOUTPUT=x_emulated.cc -P rewrite_cu_for_emulator.cmake
# Rewrites a CUDA source into C++ for the CPU emulator (emulated_cuda.h, force-included when the
# output is compiled):
#   Kernel<T><<<grid, block, shared, stream>>>(args)  ->  emu::Launch(Kernel<T>, "Kernel<T>", grid, block, shared, stream)(args)
#   extern __shared__ T name[];                       ->  T* name = reinterpret_cast<T*>(emu::SharedMemory());
# Launch configurations may span lines; template arguments may not nest.
if(NOT INPUT OR NOT OUTPUT)
  message(FATAL_ERROR "rewrite_cu_for_emulator.cmake: INPUT and OUTPUT are required")
endif()
file(READ "${INPUT}" source)
string(REGEX REPLACE "([A-Za-z_][A-Za-z_0-9]*(<[^<>;{}]*>)?)<<<" "emu::Launch(\\1, \"\\1\", "
       source "${source}")
string(REGEX REPLACE ">>>\\(" ")(" source "${source}")
string(REGEX REPLACE "extern __shared__ ([A-Za-z_][A-Za-z_0-9]*) ([A-Za-z_][A-Za-z_0-9]*)\\[\\];"
       "\\1* \\2 = reinterpret_cast<\\1*>(emu::SharedMemory());" source "${source}")
string(FIND "${source}" "<<<" left)
string(FIND "${source}" ">>>" right)
if(NOT left EQUAL -1 OR NOT right EQUAL -1)
  message(FATAL_ERROR "rewrite_cu_for_emulator.cmake: ${INPUT} has a launch the rewrite does not understand")
endif()
file(WRITE "${OUTPUT}" "// Generated from ${INPUT} by rewrite_cu_for_emulator.cmake for the CPU emulator.\n#line 1 \"${INPUT}\"\n${source}")

# Tests of common/: object stores, safetensors, and the float16 conversions they rely on.
qforge_test(object_store_test
  SOURCES ${PROJECT_SOURCE_DIR}/tests/common/object_store_test.cc
  LIBS qforge_object_store
  LABELS common)
qforge_test(safetensors_test
  SOURCES ${PROJECT_SOURCE_DIR}/tests/common/safetensors_test.cc
  LIBS qforge_safetensors qforge_object_store
  LABELS common)
qforge_test(float16_test
  SOURCES ${PROJECT_SOURCE_DIR}/tests/common/float16_test.cc
  LIBS qforge_quant_base
  LABELS common)

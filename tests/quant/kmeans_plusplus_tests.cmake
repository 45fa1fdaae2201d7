# The k-means++ draws a device replays (kmeans.h DrawKMeansPlusPlus) against KMeans()'s own.
qforge_test(quant_kmeans_plusplus_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/kmeans_plusplus_test.cc
  LIBS qforge_vptq
  LABELS quant)

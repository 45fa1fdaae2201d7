// Dense row-major matrices used by the quantization core.
//
// A Matrix owns its storage: element (r, c) is data[r * cols + c]. HF linear weights are
// [out_features, in_features] (y = x Wᵀ); Hessians are [in_features, in_features].
// Value type; not thread-safe for concurrent mutation.
#ifndef QFORGE_BASE_MATRIX_H_
#define QFORGE_BASE_MATRIX_H_

#include <cstdint>
#include <vector>

namespace qforge {

template <typename T>
struct BasicMatrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<T> data;  // [rows, cols], row-major

  BasicMatrix() = default;
  BasicMatrix(int64_t r, int64_t c, T fill = T(0))
      : rows(r), cols(c), data(static_cast<size_t>(r * c), fill) {}

  T& operator()(int64_t r, int64_t c) { return data[static_cast<size_t>(r * cols + c)]; }
  const T& operator()(int64_t r, int64_t c) const {
    return data[static_cast<size_t>(r * cols + c)];
  }
  T* row(int64_t r) { return data.data() + r * cols; }
  const T* row(int64_t r) const { return data.data() + r * cols; }
  int64_t size() const { return rows * cols; }
};

using Matrix = BasicMatrix<float>;
using MatrixD = BasicMatrix<double>;

}  // namespace qforge

#endif  // QFORGE_BASE_MATRIX_H_

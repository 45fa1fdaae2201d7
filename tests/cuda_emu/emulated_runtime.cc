// The part of the CUDA runtime, cuBLAS and cuSOLVER that the backends call, on host memory, for
// the emulated GPU of emulated_cuda.h. One device ("Emulated GPU", H100 limits: 132 SMs, 227 KiB
// opt-in shared memory per block); streams are synchronous; cuBLAS and cuSOLVER are OpenBLAS and
// LAPACKE in float32/float64 as asked (TF32 is not emulated).
//
// Every pointer the calls take as device memory is checked against the live allocations (base
// and extent, from the matrix shapes and leading dimensions): a host pointer, a freed buffer or a
// copy past the end returns cudaErrorInvalidValue / CUBLAS_STATUS_INVALID_VALUE /
// CUSOLVER_STATUS_INVALID_VALUE and prints what was wrong, as the backends then fail with a
// message. Allocations are accounted (emulated_device.h) so tests see leaks and peaks.
#include <cblas.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>

#include "tests/cuda_emu/emulated_cuda.h"
#include "tests/cuda_emu/emulated_device.h"

namespace emu {
namespace {

constexpr size_t kAllocationAlignment = 256;  // cudaMalloc's

struct DeviceMemory {
  std::mutex mu;
  std::map<const char*, size_t> allocations;  // base -> bytes
  int64_t live_bytes = 0;
  int64_t high_water_bytes = 0;
  int64_t allocation_count = 0;
  int64_t calls_until_failure = 0;  // 0: none pending
  uint64_t capacity = uint64_t{80} << 30;
  std::map<const void*, int> dynamic_shared_limit;  // kernel -> opted-in bytes
};
DeviceMemory& Memory() {
  static DeviceMemory* m = new DeviceMemory;
  return *m;
}

// Whether [p, p + bytes) lies inside one live allocation; prints `what` when not.
bool InDeviceMemory(const void* p, size_t bytes, const char* what) {
  if (bytes == 0) return true;
  DeviceMemory& m = Memory();
  std::lock_guard<std::mutex> hold(m.mu);
  const char* c = static_cast<const char*>(p);
  auto it = m.allocations.upper_bound(c);
  if (it != m.allocations.begin()) {
    --it;
    if (c >= it->first && c + bytes <= it->first + it->second) return true;
  }
  std::fprintf(stderr, "CUDA emulator: %s: [%p, +%zu) is not inside a live device allocation\n",
               what, p, bytes);
  return false;
}

// Bytes spanned by a column-major rows x cols matrix with leading dimension ld.
size_t MatrixExtent(int64_t rows, int64_t cols, int64_t ld, size_t element) {
  if (rows <= 0 || cols <= 0) return 0;
  return static_cast<size_t>((cols - 1) * ld + rows) * element;
}

CBLAS_TRANSPOSE Transpose(cublasOperation_t op) {
  return op == CUBLAS_OP_N ? CblasNoTrans : CblasTrans;
}
CBLAS_UPLO Uplo(cublasFillMode_t fill) {
  return fill == CUBLAS_FILL_MODE_LOWER ? CblasLower : CblasUpper;
}
bool ValidOp(cublasOperation_t op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T; }

// Checks the operands of C = op(A) op(B) (m x n, inner k) in device memory.
bool GemmOperandsOk(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                    const void* a, int lda, const void* b, int ldb, const void* c, int ldc,
                    size_t element, const char* call) {
  if (!ValidOp(ta) || !ValidOp(tb) || m < 0 || n < 0 || k < 0 ||
      lda < std::max(1, ta == CUBLAS_OP_N ? m : k) ||
      ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m)) {
    std::fprintf(stderr, "CUDA emulator: %s: invalid shape or leading dimension\n", call);
    return false;
  }
  const int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
  const int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
  return InDeviceMemory(a, MatrixExtent(a_rows, a_cols, lda, element), call) &&
         InDeviceMemory(b, MatrixExtent(b_rows, b_cols, ldb, element), call) &&
         InDeviceMemory(c, MatrixExtent(m, n, ldc, element), call);
}

}  // namespace

int64_t LiveDeviceBytes() {
  std::lock_guard<std::mutex> hold(Memory().mu);
  return Memory().live_bytes;
}
int64_t DeviceAllocations() {
  std::lock_guard<std::mutex> hold(Memory().mu);
  return Memory().allocation_count;
}
void FailAllocation(int64_t nth) {
  std::lock_guard<std::mutex> hold(Memory().mu);
  Memory().calls_until_failure = nth;
}
void SetDeviceMemoryBytes(uint64_t bytes) {
  std::lock_guard<std::mutex> hold(Memory().mu);
  Memory().capacity = bytes;
}
size_t DynamicSharedLimit(const void* kernel) {
  std::lock_guard<std::mutex> hold(Memory().mu);
  auto it = Memory().dynamic_shared_limit.find(kernel);
  return it == Memory().dynamic_shared_limit.end() ? kDefaultDynamicSharedBytes
                                                   : static_cast<size_t>(it->second);
}

}  // namespace emu

using emu::InDeviceMemory;
using emu::Memory;

extern "C" {

// ---- Devices, streams, errors ----

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "Emulated GPU");
  prop->totalGlobalMem = Memory().capacity;
  prop->multiProcessorCount = 132;
  prop->sharedMemPerBlock = emu::kDefaultDynamicSharedBytes;
  prop->sharedMemPerBlockOptin = emu::kMaxDynamicSharedBytes;
  prop->sharedMemPerMultiprocessor = 233472;
  prop->maxThreadsPerBlock = 1024;
  prop->warpSize = 32;
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> hold(Memory().mu);
  *total_bytes = Memory().capacity;
  *free_bytes = Memory().capacity - static_cast<uint64_t>(Memory().live_bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  static char stream_tag;
  *stream = reinterpret_cast<cudaStream_t>(&stream_tag);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
// Events: the stream is synchronous, so a recorded event has always completed. Each is a heap
// cell holding whether it was recorded (synchronising on one never recorded is an error here,
// as waiting on it would be a logic error on a GPU).
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = reinterpret_cast<cudaEvent_t>(new bool(false));
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete reinterpret_cast<bool*>(event);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  if (event == nullptr) return cudaErrorInvalidResourceHandle;
  *reinterpret_cast<bool*>(event) = true;
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (event == nullptr || !*reinterpret_cast<bool*>(event)) {
    std::fprintf(stderr, "CUDA emulator: cudaEventSynchronize on an event never recorded\n");
    return cudaErrorInvalidResourceHandle;
  }
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return emu::TakeLaunchError(); }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    default: return "cudaError(emulated)";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    default: return "emulated error";
  }
}
cudaError_t cudaFuncSetAttribute(const void* kernel, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > emu::kMaxDynamicSharedBytes) {
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> hold(Memory().mu);
  Memory().dynamic_shared_limit[kernel] = value;
  return cudaSuccess;
}

// ---- Memory ----

cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  emu::DeviceMemory& m = Memory();
  std::lock_guard<std::mutex> hold(m.mu);
  *p = nullptr;
  if (m.calls_until_failure > 0 && --m.calls_until_failure == 0) return cudaErrorMemoryAllocation;
  if (bytes > m.capacity - static_cast<uint64_t>(m.live_bytes)) return cudaErrorMemoryAllocation;
  // Exactly `bytes` (aligned as cudaMalloc's): an AddressSanitizer build sees any access past
  // the end.
  void* block = nullptr;
  if (posix_memalign(&block, emu::kAllocationAlignment, std::max<size_t>(bytes, 1)) != 0) {
    return cudaErrorMemoryAllocation;
  }
  // Fresh device memory holds garbage: NaN bytes make reading it before writing show.
  std::memset(block, 0xff, bytes);
  m.allocations[static_cast<const char*>(block)] = bytes;
  m.live_bytes += static_cast<int64_t>(bytes);
  m.high_water_bytes = std::max(m.high_water_bytes, m.live_bytes);
  ++m.allocation_count;
  *p = block;
  return cudaSuccess;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  if (p == nullptr) return cudaSuccess;
  emu::DeviceMemory& m = Memory();
  std::lock_guard<std::mutex> hold(m.mu);
  auto it = m.allocations.find(static_cast<const char*>(p));
  if (it == m.allocations.end()) {
    std::fprintf(stderr, "CUDA emulator: cudaFreeAsync(%p): not a live allocation\n", p);
    return cudaErrorInvalidValue;
  }
  m.live_bytes -= static_cast<int64_t>(it->second);
  m.allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t) {
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind == cudaMemcpyDefault) return cudaErrorInvalidValue;  // not used by the backends
  if ((dst_device && !InDeviceMemory(dst, bytes, "cudaMemcpyAsync destination")) ||
      (src_device && !InDeviceMemory(src, bytes, "cudaMemcpyAsync source"))) {
    return cudaErrorInvalidValue;
  }
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                              size_t width, size_t height, cudaMemcpyKind kind, cudaStream_t) {
  if (width > dpitch || width > spitch || kind == cudaMemcpyDefault) return cudaErrorInvalidValue;
  const bool dst_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool src_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  const size_t dst_extent = height == 0 ? 0 : (height - 1) * dpitch + width;
  const size_t src_extent = height == 0 ? 0 : (height - 1) * spitch + width;
  if ((dst_device && !InDeviceMemory(dst, dst_extent, "cudaMemcpy2DAsync destination")) ||
      (src_device && !InDeviceMemory(src, src_extent, "cudaMemcpy2DAsync source"))) {
    return cudaErrorInvalidValue;
  }
  for (size_t r = 0; r < height; ++r) {
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch,
                 width);
  }
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  if (!InDeviceMemory(dst, bytes, "cudaMemsetAsync")) return cudaErrorInvalidValue;
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  static char pool_tag;
  if (device != 0) return cudaErrorInvalidDevice;
  *pool = reinterpret_cast<cudaMemPool_t>(&pool_tag);
  return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, enum cudaMemPoolAttr attr, void* value) {
  emu::DeviceMemory& m = Memory();
  std::lock_guard<std::mutex> hold(m.mu);
  if (attr == cudaMemPoolAttrUsedMemHigh || attr == cudaMemPoolAttrReservedMemHigh) {
    // The only value the runtime accepts is 0: reset the mark to the current use.
    if (*static_cast<const uint64_t*>(value) != 0) return cudaErrorInvalidValue;
    m.high_water_bytes = m.live_bytes;
  }
  return cudaSuccess;
}
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, enum cudaMemPoolAttr attr, void* value) {
  emu::DeviceMemory& m = Memory();
  std::lock_guard<std::mutex> hold(m.mu);
  uint64_t v = 0;
  switch (attr) {
    case cudaMemPoolAttrUsedMemHigh:
    case cudaMemPoolAttrReservedMemHigh: v = static_cast<uint64_t>(m.high_water_bytes); break;
    case cudaMemPoolAttrUsedMemCurrent:
    case cudaMemPoolAttrReservedMemCurrent: v = static_cast<uint64_t>(m.live_bytes); break;
    default: return cudaErrorInvalidValue;
  }
  *static_cast<uint64_t*>(value) = v;
  return cudaSuccess;
}

// ---- cuBLAS ----

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  static char handle_tag;
  *handle = reinterpret_cast<cublasHandle_t>(&handle_tag);
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream_v2(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }

cublasStatus_t cublasSgemm_v2(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m,
                              int n, int k, const float* alpha, const float* a, int lda,
                              const float* b, int ldb, const float* beta, float* c, int ldc) {
  if (!emu::GemmOperandsOk(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, sizeof(float),
                           "cublasSgemm")) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (m > 0 && n > 0) {
    cblas_sgemm(CblasColMajor, emu::Transpose(ta), emu::Transpose(tb), m, n, k, *alpha, a, lda,
                b, ldb, *beta, c, ldc);
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDgemm_v2(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m,
                              int n, int k, const double* alpha, const double* a, int lda,
                              const double* b, int ldb, const double* beta, double* c, int ldc) {
  if (!emu::GemmOperandsOk(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, sizeof(double),
                           "cublasDgemm")) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (m > 0 && n > 0) {
    cblas_dgemm(CblasColMajor, emu::Transpose(ta), emu::Transpose(tb), m, n, k, *alpha, a, lda,
                b, ldb, *beta, c, ldc);
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb,
                            int m, int n, int k, const void* alpha, const void* a,
                            cudaDataType a_type, int lda, const void* b, cudaDataType b_type,
                            int ldb, const void* beta, void* c, cudaDataType c_type, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
  // The backends use float32 operands with float32 (pedantic or not) or TF32 compute; all run
  // as float32 here.
  if (a_type != CUDA_R_32F || b_type != CUDA_R_32F || c_type != CUDA_R_32F ||
      (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC &&
       compute != CUBLAS_COMPUTE_32F_FAST_TF32)) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  return cublasSgemm_v2(handle, ta, tb, m, n, k, static_cast<const float*>(alpha),
                        static_cast<const float*>(a), lda, static_cast<const float*>(b), ldb,
                        static_cast<const float*>(beta), static_cast<float*>(c), ldc);
}
cublasStatus_t cublasGemmStridedBatchedEx(
    cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
    const void* alpha, const void* a, cudaDataType a_type, int lda, long long int stride_a,
    const void* b, cudaDataType b_type, int ldb, long long int stride_b, const void* beta,
    void* c, cudaDataType c_type, int ldc, long long int stride_c, int batch_count,
    cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  // Float32 as cublasGemmEx; batch i at a + i·stride_a, b + i·stride_b, c + i·stride_c (each
  // checked against the live allocations by cublasSgemm).
  if (batch_count < 0 || stride_a < 0 || stride_b < 0 || stride_c < 0) {
    std::fprintf(stderr, "CUDA emulator: cublasGemmStridedBatchedEx: negative batch or stride\n");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  for (int i = 0; i < batch_count; ++i) {
    const cublasStatus_t s = cublasGemmEx(
        handle, ta, tb, m, n, k, alpha, static_cast<const float*>(a) + i * stride_a, a_type, lda,
        static_cast<const float*>(b) + i * stride_b, b_type, ldb, beta,
        static_cast<float*>(c) + i * stride_c, c_type, ldc, compute, algo);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDsyrk_v2(cublasHandle_t, cublasFillMode_t uplo, cublasOperation_t trans,
                              int n, int k, const double* alpha, const double* a, int lda,
                              const double* beta, double* c, int ldc) {
  const int a_rows = trans == CUBLAS_OP_N ? n : k, a_cols = trans == CUBLAS_OP_N ? k : n;
  if (!emu::ValidOp(trans) || n < 0 || k < 0 || lda < std::max(1, a_rows) ||
      ldc < std::max(1, n) ||
      !InDeviceMemory(a, emu::MatrixExtent(a_rows, a_cols, lda, sizeof(double)), "cublasDsyrk") ||
      !InDeviceMemory(c, emu::MatrixExtent(n, n, ldc, sizeof(double)), "cublasDsyrk")) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (n > 0) {
    cblas_dsyrk(CblasColMajor, emu::Uplo(uplo), emu::Transpose(trans), n, k, *alpha, a, lda,
                *beta, c, ldc);
  }
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasStrsm_v2(cublasHandle_t, cublasSideMode_t side, cublasFillMode_t uplo,
                              cublasOperation_t trans, cublasDiagType_t diag, int m, int n,
                              const float* alpha, const float* a, int lda, float* b, int ldb) {
  const int order = side == CUBLAS_SIDE_LEFT ? m : n;
  if (!emu::ValidOp(trans) || m < 0 || n < 0 || lda < std::max(1, order) ||
      ldb < std::max(1, m) ||
      !InDeviceMemory(a, emu::MatrixExtent(order, order, lda, sizeof(float)), "cublasStrsm") ||
      !InDeviceMemory(b, emu::MatrixExtent(m, n, ldb, sizeof(float)), "cublasStrsm")) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (m > 0 && n > 0) {
    cblas_strsm(CblasColMajor, side == CUBLAS_SIDE_LEFT ? CblasLeft : CblasRight, emu::Uplo(uplo),
                emu::Transpose(trans), diag == CUBLAS_DIAG_UNIT ? CblasUnit : CblasNonUnit, m, n,
                *alpha, a, lda, b, ldb);
  }
  return CUBLAS_STATUS_SUCCESS;
}

// ---- cuSOLVER ----

cusolverStatus_t cusolverDnCreate(cusolverDnHandle_t* handle) {
  static char handle_tag;
  *handle = reinterpret_cast<cusolverDnHandle_t>(&handle_tag);
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnDestroy(cusolverDnHandle_t) { return CUSOLVER_STATUS_SUCCESS; }
cusolverStatus_t cusolverDnSetStream(cusolverDnHandle_t, cudaStream_t) {
  return CUSOLVER_STATUS_SUCCESS;
}

// The workspace the emulated potrf asks for (and checks it got): one panel of 64 columns.
static int PotrfWorkspace(int n) { return std::max(1, n) * 64; }

cusolverStatus_t cusolverDnSpotrf_bufferSize(cusolverDnHandle_t, cublasFillMode_t, int n, float*,
                                             int lda, int* lwork) {
  if (n < 0 || lda < std::max(1, n)) return CUSOLVER_STATUS_INVALID_VALUE;
  *lwork = PotrfWorkspace(n);
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnSpotrf(cusolverDnHandle_t, cublasFillMode_t uplo, int n, float* a,
                                  int lda, float* workspace, int lwork, int* dev_info) {
  if (n < 0 || lda < std::max(1, n) || lwork < PotrfWorkspace(n) ||
      !InDeviceMemory(a, emu::MatrixExtent(n, n, lda, sizeof(float)), "cusolverDnSpotrf A") ||
      !InDeviceMemory(workspace, static_cast<size_t>(lwork) * sizeof(float),
                      "cusolverDnSpotrf workspace") ||
      !InDeviceMemory(dev_info, sizeof(int), "cusolverDnSpotrf devInfo")) {
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  std::fill(workspace, workspace + lwork, std::numeric_limits<float>::quiet_NaN());
  // The _work variant: no NaN scan of the input (cuSOLVER does none either).
  *dev_info = n == 0 ? 0
                     : LAPACKE_spotrf_work(LAPACK_COL_MAJOR,
                                           uplo == CUBLAS_FILL_MODE_LOWER ? 'L' : 'U', n, a, lda);
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnXtrtri_bufferSize(cusolverDnHandle_t, cublasFillMode_t,
                                             cublasDiagType_t, int64_t n, cudaDataType type,
                                             void*, int64_t lda, size_t* device_bytes,
                                             size_t* host_bytes) {
  if (type != CUDA_R_32F || n < 0 || lda < std::max<int64_t>(1, n)) {
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  *device_bytes = 256;
  *host_bytes = 0;
  return CUSOLVER_STATUS_SUCCESS;
}
cusolverStatus_t cusolverDnXtrtri(cusolverDnHandle_t, cublasFillMode_t uplo,
                                  cublasDiagType_t diag, int64_t n, cudaDataType type, void* a,
                                  int64_t lda, void* device_workspace, size_t device_bytes,
                                  void*, size_t, int* dev_info) {
  if (type != CUDA_R_32F || n < 0 || lda < std::max<int64_t>(1, n) || device_bytes < 256 ||
      !InDeviceMemory(a, emu::MatrixExtent(n, n, lda, sizeof(float)), "cusolverDnXtrtri A") ||
      !InDeviceMemory(device_workspace, device_bytes, "cusolverDnXtrtri workspace") ||
      !InDeviceMemory(dev_info, sizeof(int), "cusolverDnXtrtri devInfo")) {
    return CUSOLVER_STATUS_INVALID_VALUE;
  }
  *dev_info = n == 0 ? 0
                     : LAPACKE_strtri_work(LAPACK_COL_MAJOR,
                                           uplo == CUBLAS_FILL_MODE_UPPER ? 'U' : 'L',
                                           diag == CUBLAS_DIAG_UNIT ? 'U' : 'N',
                                           static_cast<lapack_int>(n), static_cast<float*>(a),
                                           static_cast<lapack_int>(lda));
  return CUSOLVER_STATUS_SUCCESS;
}

}  // extern "C"

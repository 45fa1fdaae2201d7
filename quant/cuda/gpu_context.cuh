// The CUDA-side definition of GpuContext and the checking helpers every backend .cu uses.
// Include only from .cu files.
//
//   QF_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(...));      // INTERNAL / RESOURCE_EXHAUSTED
//   QF_CUBLAS_RETURN_IF_ERROR(cublasSgemm(...));
//   QF_CUSOLVER_RETURN_IF_ERROR(cusolverDnSpotrf(...));
//   DeviceBuffer<float> buf; QF_RETURN_IF_ERROR(buf.Allocate(ctx, n));  // stream-ordered
//
// Each message names the call (its source text), the file and line, and the library's error
// name, e.g. "cudaMallocAsync(&p, bytes, stream) at gptq_cuda.cu:120: cudaErrorMemoryAllocation
// (out of memory)". Kernel launches are checked with QF_CUDA_RETURN_IF_ERROR(cudaGetLastError()).
#ifndef QFORGE_QUANT_CUDA_GPU_CONTEXT_CUH_
#define QFORGE_QUANT_CUDA_GPU_CONTEXT_CUH_

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "quant/cuda/backends.h"
#include "base/status.h"

namespace qforge::quant {

class GpuContext {
 public:
  ~GpuContext();
  GpuContext(const GpuContext&) = delete;
  GpuContext& operator=(const GpuContext&) = delete;

  int device() const { return device_; }
  const std::string& device_name() const { return device_name_; }
  const cudaDeviceProp& properties() const { return prop_; }
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }
  cusolverDnHandle_t cusolver() const { return cusolver_; }
  bool allow_tf32() const { return allow_tf32_; }

  // Makes this context's device current on the calling thread (every backend entry point
  // calls it first: the worker may call from different threads).
  Status Activate() const;
  // Waits for the stream; returns the first asynchronous error, if any.
  Status Synchronize() const;

 private:
  friend StatusOr<std::shared_ptr<GpuContext>> CreateGpuContext(const GpuContextOptions&);
  GpuContext() = default;
  int device_ = -1;
  std::string device_name_;
  cudaDeviceProp prop_{};
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cusolverDnHandle_t cusolver_ = nullptr;
  bool allow_tf32_ = false;
};

// Error conversion (RESOURCE_EXHAUSTED for allocation failures, INTERNAL otherwise).
Status CudaError(cudaError_t e, const char* call, const char* file, int line);
Status CublasError(cublasStatus_t e, const char* call, const char* file, int line);
Status CusolverError(cusolverStatus_t e, const char* call, const char* file, int line);

#define QF_CUDA_RETURN_IF_ERROR(call)                                                   \
  do {                                                                                  \
    const cudaError_t qf_cuda_err_ = (call);                                            \
    if (qf_cuda_err_ != cudaSuccess) {                                                  \
      return ::qforge::quant::CudaError(qf_cuda_err_, #call, __FILE__, __LINE__);       \
    }                                                                                   \
  } while (0)
#define QF_CUBLAS_RETURN_IF_ERROR(call)                                                 \
  do {                                                                                  \
    const cublasStatus_t qf_cublas_err_ = (call);                                       \
    if (qf_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                      \
      return ::qforge::quant::CublasError(qf_cublas_err_, #call, __FILE__, __LINE__);   \
    }                                                                                   \
  } while (0)
#define QF_CUSOLVER_RETURN_IF_ERROR(call)                                               \
  do {                                                                                  \
    const cusolverStatus_t qf_cusolver_err_ = (call);                                   \
    if (qf_cusolver_err_ != CUSOLVER_STATUS_SUCCESS) {                                  \
      return ::qforge::quant::CusolverError(qf_cusolver_err_, #call, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)

// A stream-ordered device allocation of `count` T (cudaMallocAsync / cudaFreeAsync on the
// context's stream). Move-only; frees in its destructor (errors there are ignored: the
// context's next checked call reports a broken stream).
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      count_ = std::exchange(o.count_, 0);
      stream_ = std::exchange(o.stream_, nullptr);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Allocates `count` elements (any previous allocation is freed first). count 0 is allowed
  // (null pointer). RESOURCE_EXHAUSTED naming the size when the device is out of memory.
  Status Allocate(const GpuContext& ctx, int64_t count) {
    Reset();
    if (count < 0) return InvalidArgumentError("DeviceBuffer: negative size");
    stream_ = ctx.stream();
    count_ = count;
    if (count == 0) return OkStatus();
    void* p = nullptr;
    const cudaError_t e = cudaMallocAsync(&p, static_cast<size_t>(count) * sizeof(T), stream_);
    if (e != cudaSuccess) {
      cudaGetLastError();
      count_ = 0;
      return CudaError(e, ("cudaMallocAsync of " + std::to_string(count * sizeof(T)) + " bytes").c_str(),
                       __FILE__, __LINE__);
    }
    ptr_ = static_cast<T*>(p);
    return OkStatus();
  }
  void Reset() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);
    ptr_ = nullptr;
    count_ = 0;
  }
  T* get() const { return ptr_; }
  int64_t size() const { return count_; }
  size_t bytes() const { return static_cast<size_t>(count_) * sizeof(T); }

 private:
  T* ptr_ = nullptr;
  int64_t count_ = 0;
  cudaStream_t stream_ = nullptr;
};

// Host <-> device copies on the context's stream (the host side must stay alive until the
// stream is synchronised; Download synchronises before returning).
template <typename T>
Status Upload(const GpuContext& ctx, const T* host, int64_t count, T* device) {
  if (count == 0) return OkStatus();
  QF_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device, host, static_cast<size_t>(count) * sizeof(T),
                                          cudaMemcpyHostToDevice, ctx.stream()));
  return OkStatus();
}
template <typename T>
Status Download(const GpuContext& ctx, const T* device, int64_t count, T* host) {
  if (count > 0) {
    QF_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host, device, static_cast<size_t>(count) * sizeof(T),
                                            cudaMemcpyDeviceToHost, ctx.stream()));
  }
  return ctx.Synchronize();
}

// Progress of blocks of work enqueued on the context's stream, reported when the device has
// finished them rather than when the host enqueued them, one block behind: Enqueued(units)
// records an event after the block just enqueued, then waits for the previous block's event
// and reports that block's units, so the device always has the newest block queued while the
// host waits. Finished() waits for and reports the last block. With an empty `report` nothing
// is recorded or waited for. A report that fails (a cancellation) is returned, and nothing
// further is reported; the work already enqueued stays on the stream.
class DeviceProgress {
 public:
  using Report = std::function<Status(int64_t units)>;
  DeviceProgress(const GpuContext& ctx, Report report);
  ~DeviceProgress();
  DeviceProgress(const DeviceProgress&) = delete;
  DeviceProgress& operator=(const DeviceProgress&) = delete;

  Status Enqueued(int64_t units);
  Status Finished();

 private:
  // Waits for the pending block's event (in `slot`) and reports its units.
  Status ReportPending(int slot);

  const GpuContext& ctx_;
  Report report_;
  cudaEvent_t events_[2] = {nullptr, nullptr};
  int next_ = 0;          // the slot the next block's event goes into
  bool pending_ = false;  // a block recorded (in slot 1 - next_) and not yet reported
  int64_t pending_units_ = 0;
};

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace qforge::quant

#endif  // QFORGE_QUANT_CUDA_GPU_CONTEXT_CUH_

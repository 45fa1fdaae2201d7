#include "quant/cuda/gpu_context.cuh"

#include <string>

namespace qforge::quant {
namespace {

std::string Where(const char* call, const char* file, int line) {
  std::string f(file);
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return std::string(call) + " at " + f + ":" + std::to_string(line) + ": ";
}

const char* CublasName(cublasStatus_t e) {
  switch (e) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_(unknown)";
}

const char* CusolverName(cusolverStatus_t e) {
  switch (e) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED:
      return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    default: return "CUSOLVER_STATUS_(other)";
  }
}

}  // namespace

Status CudaError(cudaError_t e, const char* call, const char* file, int line) {
  std::string m = Where(call, file, line) + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorMemoryAllocation) return ResourceExhaustedError(m);
  return InternalError(m);
}

Status CublasError(cublasStatus_t e, const char* call, const char* file, int line) {
  std::string m = Where(call, file, line) + CublasName(e);
  if (e == CUBLAS_STATUS_ALLOC_FAILED) return ResourceExhaustedError(m);
  return InternalError(m);
}

Status CusolverError(cusolverStatus_t e, const char* call, const char* file, int line) {
  std::string m = Where(call, file, line) + CusolverName(e);
  if (e == CUSOLVER_STATUS_ALLOC_FAILED) return ResourceExhaustedError(m);
  return InternalError(m);
}

GpuContext::~GpuContext() {
  if (device_ >= 0) cudaSetDevice(device_);
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  if (cusolver_ != nullptr) cusolverDnDestroy(cusolver_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

Status GpuContext::Activate() const {
  QF_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  return OkStatus();
}

Status GpuContext::Synchronize() const {
  QF_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  QF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return OkStatus();
}

StatusOr<std::shared_ptr<GpuContext>> CreateGpuContext(const GpuContextOptions& options) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return UnavailableError(std::string("no CUDA driver or device: ") + cudaGetErrorName(err) +
                            " (" + cudaGetErrorString(err) + ")");
  }
  if (options.device < 0 || options.device >= count) {
    return UnavailableError("CUDA device " + std::to_string(options.device) +
                            " does not exist (this machine has " + std::to_string(count) + ")");
  }
  std::shared_ptr<GpuContext> ctx(new GpuContext());
  ctx->device_ = options.device;
  ctx->allow_tf32_ = options.allow_tf32;
  QF_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctx->device_));
  QF_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&ctx->prop_, ctx->device_));
  ctx->device_name_ = ctx->prop_.name;
  QF_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&ctx->stream_, cudaStreamNonBlocking));
  QF_CUBLAS_RETURN_IF_ERROR(cublasCreate(&ctx->cublas_));
  QF_CUBLAS_RETURN_IF_ERROR(cublasSetStream(ctx->cublas_, ctx->stream_));
  QF_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(
      ctx->cublas_, options.allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_PEDANTIC_MATH));
  QF_CUSOLVER_RETURN_IF_ERROR(cusolverDnCreate(&ctx->cusolver_));
  QF_CUSOLVER_RETURN_IF_ERROR(cusolverDnSetStream(ctx->cusolver_, ctx->stream_));
  return ctx;
}

DeviceProgress::DeviceProgress(const GpuContext& ctx, Report report)
    : ctx_(ctx), report_(std::move(report)) {}

DeviceProgress::~DeviceProgress() {
  for (cudaEvent_t e : events_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
}

Status DeviceProgress::Enqueued(int64_t units) {
  if (!report_) return OkStatus();
  const int slot = next_;
  if (events_[slot] == nullptr) {
    QF_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&events_[slot], cudaEventDisableTiming));
  }
  QF_CUDA_RETURN_IF_ERROR(cudaEventRecord(events_[slot], ctx_.stream()));
  next_ = 1 - slot;
  if (pending_) QF_RETURN_IF_ERROR(ReportPending(1 - slot));  // the block before this one
  pending_ = true;
  pending_units_ = units;
  return OkStatus();
}

Status DeviceProgress::Finished() {
  if (!report_ || !pending_) return OkStatus();
  pending_ = false;
  return ReportPending(1 - next_);  // the slot recorded last
}

Status DeviceProgress::ReportPending(int slot) {
  QF_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(events_[slot]));
  const Status s = report_(pending_units_);
  if (!s.ok()) report_ = nullptr;
  return s;
}

int GpuContextDevice(const GpuContext* ctx) { return ctx == nullptr ? -1 : ctx->device(); }
const char* GpuContextDeviceName(const GpuContext* ctx) {
  return ctx == nullptr ? "" : ctx->device_name().c_str();
}

}  // namespace qforge::quant

// The ONE conversion from the coordinator's absl::Status to the grpc::Status an RPC answers
// with, used by every handler of server/rpc_*_service.cc. The canonical codes of abseil and
// gRPC are the same numbers (both are google.rpc.Code), so the code travels unchanged and the
// message is kept verbatim: an INVALID_ARGUMENT naming `spec.gptq.bits` reaches the CLI as
// INVALID_ARGUMENT naming `spec.gptq.bits`. Codes outside the canonical range (which abseil
// tolerates) become UNKNOWN, as gRPC requires.
//
// Thread-safety: pure function.
#ifndef QFORGE_SERVER_GRPC_STATUS_H_
#define QFORGE_SERVER_GRPC_STATUS_H_

#include <string>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace qforge {

static_assert(static_cast<int>(absl::StatusCode::kCancelled) == grpc::StatusCode::CANCELLED &&
                  static_cast<int>(absl::StatusCode::kInvalidArgument) ==
                      grpc::StatusCode::INVALID_ARGUMENT &&
                  static_cast<int>(absl::StatusCode::kFailedPrecondition) ==
                      grpc::StatusCode::FAILED_PRECONDITION &&
                  static_cast<int>(absl::StatusCode::kUnauthenticated) ==
                      grpc::StatusCode::UNAUTHENTICATED,
              "absl and gRPC canonical codes must be the same numbers");

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const int code = static_cast<int>(status.code());
  // 1..16 are the canonical error codes (CANCELLED .. UNAUTHENTICATED).
  const grpc::StatusCode grpc_code = (code >= 1 && code <= 16)
                                         ? static_cast<grpc::StatusCode>(code)
                                         : grpc::StatusCode::UNKNOWN;
  return grpc::Status(grpc_code, std::string(status.message()));
}

}  // namespace qforge

#endif  // QFORGE_SERVER_GRPC_STATUS_H_

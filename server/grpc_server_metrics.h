// GrpcServerMetrics: request counts and latencies of the coordinator's gRPC server, recorded
// by a server interceptor (grpc::experimental, gRPC 1.51) so that no service method has to
// remember it:
//
//   qforge_grpc_server_handled_total{grpc_service,grpc_method,grpc_code}     counter
//   qforge_grpc_server_handling_seconds{grpc_service,grpc_method,grpc_code}  histogram: from
//       the start of the call to its status being sent (a WatchJob stream: its whole life)
//
// grpc_service is the full service name ("qforge.v1.JobService"), grpc_method the method
// ("SubmitJob"), grpc_code the status code's canonical name ("OK", "NOT_FOUND"; "CANCELLED"
// for a call that ended without a status). Only methods the binary knows (its generated
// protobuf services, and grpc.health.v1.Health) get their own labels: any other name a
// client sends counts as grpc_service="unknown", grpc_method="unknown", so clients cannot
// create series.
//
// Usage:
//   GrpcServerMetrics grpc_metrics(registry);
//   std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> f;
//   f.push_back(grpc_metrics.NewInterceptorFactory());
//   builder.experimental().SetInterceptorCreators(std::move(f));
//
// Thread-safety: thread-safe; the factory and its interceptors may be used from any gRPC
// thread. The GrpcServerMetrics must outlive the server built with its factory.
#ifndef QFORGE_SERVER_GRPC_SERVER_METRICS_H_
#define QFORGE_SERVER_GRPC_SERVER_METRICS_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "grpcpp/support/server_interceptor.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace qforge {

class GrpcServerMetrics {
 public:
  explicit GrpcServerMetrics(prometheus::Registry& registry);
  GrpcServerMetrics(const GrpcServerMetrics&) = delete;
  GrpcServerMetrics& operator=(const GrpcServerMetrics&) = delete;

  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> NewInterceptorFactory();

  // Records one finished call. `full_method` as gRPC names it ("/pkg.Service/Method").
  void Record(const std::string& full_method, grpc::StatusCode code, double seconds);

  // ("qforge.v1.JobService", "SubmitJob") for "/qforge.v1.JobService/SubmitJob" when the
  // binary knows that method, else ("unknown", "unknown").
  static std::pair<std::string, std::string> SplitMethod(const std::string& full_method);
  // "OK", "NOT_FOUND", ...
  static std::string CodeName(grpc::StatusCode code);

 private:
  prometheus::Family<prometheus::Counter>& handled_;
  prometheus::Family<prometheus::Histogram>& handling_;
  std::mutex mu_;
  // By (full method, code): the label values resolved once.
  std::map<std::pair<std::string, int>,
           std::pair<prometheus::Counter*, prometheus::Histogram*>> series_;  // guarded by mu_
};

}  // namespace qforge

#endif  // QFORGE_SERVER_GRPC_SERVER_METRICS_H_

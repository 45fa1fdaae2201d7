#include "server/grpc_server_metrics.h"

#include <chrono>
#include <utility>

#include "absl/status/status.h"
#include "google/protobuf/descriptor.h"

namespace qforge {
namespace {

using Hook = grpc::experimental::InterceptionHookPoints;

// Calls last from a millisecond (GetJob) to the length of a WatchJob stream.
const prometheus::Histogram::BucketBoundaries& HandlingBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
  return *b;
}

class MetricsInterceptor final : public grpc::experimental::Interceptor {
 public:
  MetricsInterceptor(GrpcServerMetrics* metrics, std::string method)
      : metrics_(metrics), method_(std::move(method)), start_(std::chrono::steady_clock::now()) {}
  ~MetricsInterceptor() override {
    if (!recorded_) Finish(grpc::StatusCode::CANCELLED);
  }

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (!recorded_ && methods->QueryInterceptionHookPoint(Hook::PRE_SEND_STATUS)) {
      Finish(methods->GetSendStatus().error_code());
    }
    methods->Proceed();
  }

 private:
  void Finish(grpc::StatusCode code) {
    recorded_ = true;
    const std::chrono::duration<double> d = std::chrono::steady_clock::now() - start_;
    metrics_->Record(method_, code, d.count());
  }

  GrpcServerMetrics* const metrics_;
  const std::string method_;
  const std::chrono::steady_clock::time_point start_;
  bool recorded_ = false;
};

class MetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit MetricsInterceptorFactory(GrpcServerMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new MetricsInterceptor(metrics_, info->method() != nullptr ? info->method() : "");
  }

 private:
  GrpcServerMetrics* const metrics_;
};

}  // namespace

GrpcServerMetrics::GrpcServerMetrics(prometheus::Registry& registry)
    : handled_(prometheus::BuildCounter()
                   .Name("qforge_grpc_server_handled_total")
                   .Help("gRPC calls the coordinator completed, by service, method and status code")
                   .Register(registry)),
      handling_(prometheus::BuildHistogram()
                    .Name("qforge_grpc_server_handling_seconds")
                    .Help("Time from the start of a gRPC call to its status, by service, method "
                          "and status code")
                    .Register(registry)) {}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
GrpcServerMetrics::NewInterceptorFactory() {
  return std::make_unique<MetricsInterceptorFactory>(this);
}

std::pair<std::string, std::string> GrpcServerMetrics::SplitMethod(const std::string& full_method) {
  const std::pair<std::string, std::string> unknown{"unknown", "unknown"};
  if (full_method.size() < 4 || full_method[0] != '/') return unknown;
  const size_t slash = full_method.find('/', 1);
  if (slash == std::string::npos || slash + 1 >= full_method.size()) return unknown;
  std::string service = full_method.substr(1, slash - 1);
  std::string method = full_method.substr(slash + 1);
  if (service == "grpc.health.v1.Health") {
    if (method == "Check" || method == "Watch") return {service, method};
    return unknown;
  }
  const google::protobuf::ServiceDescriptor* s =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
  if (s == nullptr || s->FindMethodByName(method) == nullptr) return unknown;
  return {service, method};
}

std::string GrpcServerMetrics::CodeName(grpc::StatusCode code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

void GrpcServerMetrics::Record(const std::string& full_method, grpc::StatusCode code,
                               double seconds) {
  std::pair<prometheus::Counter*, prometheus::Histogram*> s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto& slot = series_[{full_method, static_cast<int>(code)}];
    if (slot.first == nullptr) {
      auto [service, method] = SplitMethod(full_method);
      std::string code_name = CodeName(code);
      if (code_name.empty()) code_name = std::to_string(static_cast<int>(code));
      const std::map<std::string, std::string> labels = {
          {"grpc_service", service}, {"grpc_method", method}, {"grpc_code", code_name}};
      slot.first = &handled_.Add(labels);
      slot.second = &handling_.Add(labels, HandlingBuckets());
    }
    s = slot;
    // Unknown names share their series, but each distinct name costs a map entry: keep the
    // map bounded by forgetting them (they resolve to the same series again).
    if (series_.size() > 1024) series_.clear();
  }
  s.first->Increment();
  s.second->Observe(seconds < 0 ? 0 : seconds);
}

}  // namespace qforge

// Prometheus collectables shared by the coordinator's and the worker's metrics ports
// (MetricsHttpServerOptions::collectables), read at scrape time:
//
//   ProcessCollector: the standard process metrics of the client libraries, from /proc/self:
//     process_cpu_seconds_total            counter: user + system CPU time
//     process_resident_memory_bytes        gauge
//     process_virtual_memory_bytes         gauge
//     process_open_fds                     gauge: entries of /proc/self/fd
//     process_max_fds                      gauge: the RLIMIT_NOFILE soft limit
//     process_start_time_seconds           gauge: Unix time the process started
//   A value that cannot be read (no /proc) is left out; the others are still served.
//
//   StoreTrafficCollector: a StoreTraffic (common/store_traffic.h), by URI scheme:
//     qforge_store_read_bytes_total{scheme}         counter
//     qforge_store_written_bytes_total{scheme}      counter
//     qforge_store_operations_total{scheme,op}      counter: every store call
//     qforge_store_errors_total{scheme,op}          counter: calls the store failed
//   Every (scheme, op) series exists from the first scrape (value 0), so rate() works at once.
//
//   GaugeCallback: one gauge family whose samples a function returns at each scrape (none:
//   the family is left out), e.g. a worker's GPU memory in use.
//
// Thread-safety: Collect() may be called concurrently from the server's handler threads.
#ifndef QFORGE_COMMON_METRICS_COLLECTORS_H_
#define QFORGE_COMMON_METRICS_COLLECTORS_H_

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "common/store_traffic.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace qforge {

class ProcessCollector final : public prometheus::Collectable {
 public:
  // `proc_self`: the /proc directory of the process to describe (tests point it elsewhere).
  explicit ProcessCollector(std::string proc_self = "/proc/self", std::string proc_stat = "/proc/stat");
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const std::string proc_self_;
  const std::string proc_stat_;
};

class StoreTrafficCollector final : public prometheus::Collectable {
 public:
  // `traffic` is not owned and must outlive the collector.
  explicit StoreTrafficCollector(const StoreTraffic* traffic) : traffic_(traffic) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const StoreTraffic* const traffic_;
};

class GaugeCallback final : public prometheus::Collectable {
 public:
  // Labels of one sample, and its value.
  using Sample = std::pair<std::map<std::string, std::string>, double>;
  // `samples` is called at every scrape, from the scraping thread.
  GaugeCallback(std::string name, std::string help, std::function<std::vector<Sample>()> samples)
      : name_(std::move(name)), help_(std::move(help)), samples_(std::move(samples)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const std::string name_, help_;
  const std::function<std::vector<Sample>()> samples_;
};

}  // namespace qforge

#endif  // QFORGE_COMMON_METRICS_COLLECTORS_H_

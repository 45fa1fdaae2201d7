#include "common/metrics_collectors.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace qforge {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily Family(const char* name, const char* help, MetricType type) {
  MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  return f;
}

MetricFamily Single(const char* name, const char* help, MetricType type, double value) {
  MetricFamily f = Family(name, help, type);
  ClientMetric m;
  if (type == MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  f.metric.push_back(std::move(m));
  return f;
}

// The fields of /proc/<pid>/stat after the command name ("(comm)" may hold spaces and
// parentheses: everything up to the last ')'). fields[0] is the state (field 3 of proc(5)).
bool ReadStatFields(const std::string& path, std::vector<std::string>* fields) {
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return false;
  const size_t close = line.rfind(')');
  if (close == std::string::npos) return false;
  std::istringstream rest(line.substr(close + 1));
  std::string field;
  while (rest >> field) fields->push_back(field);
  return fields->size() >= 22;  // up to rss (field 24)
}

bool ParseU64(const std::string& text, unsigned long long* out) {
  if (text.empty()) return false;
  char* end = nullptr;
  *out = std::strtoull(text.c_str(), &end, 10);
  return end != nullptr && *end == '\0';
}

// Boot time (Unix seconds) from the "btime" line of /proc/stat; 0 when unknown.
unsigned long long BootTime(const std::string& proc_stat) {
  std::ifstream in(proc_stat);
  std::string key;
  unsigned long long value = 0;
  while (in >> key) {
    if (key == "btime") {
      if (in >> value) return value;
      return 0;
    }
    std::string skip;
    std::getline(in, skip);
  }
  return 0;
}

}  // namespace

ProcessCollector::ProcessCollector(std::string proc_self, std::string proc_stat)
    : proc_self_(std::move(proc_self)), proc_stat_(std::move(proc_stat)) {}

std::vector<MetricFamily> ProcessCollector::Collect() const {
  std::vector<MetricFamily> out;
  const long ticks = sysconf(_SC_CLK_TCK);
  const long page = sysconf(_SC_PAGESIZE);
  std::vector<std::string> f;
  if (ReadStatFields(proc_self_ + "/stat", &f)) {
    // proc(5) field n is f[n - 3]: utime 14, stime 15, starttime 22, vsize 23, rss 24.
    unsigned long long utime = 0, stime = 0, start = 0, vsize = 0, rss = 0;
    if (ticks > 0 && ParseU64(f[11], &utime) && ParseU64(f[12], &stime)) {
      out.push_back(Single("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                           MetricType::Counter, static_cast<double>(utime + stime) / ticks));
    }
    if (page > 0 && ParseU64(f[21], &rss)) {
      out.push_back(Single("process_resident_memory_bytes", "Resident memory size in bytes.",
                           MetricType::Gauge, static_cast<double>(rss) * page));
    }
    if (ParseU64(f[20], &vsize)) {
      out.push_back(Single("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                           MetricType::Gauge, static_cast<double>(vsize)));
    }
    const unsigned long long boot = BootTime(proc_stat_);
    if (ticks > 0 && boot > 0 && ParseU64(f[19], &start)) {
      out.push_back(Single("process_start_time_seconds",
                           "Start time of the process since unix epoch in seconds.",
                           MetricType::Gauge,
                           static_cast<double>(boot) + static_cast<double>(start) / ticks));
    }
  }
  if (DIR* d = opendir((proc_self_ + "/fd").c_str())) {
    // This process's listing includes the descriptor of the listing itself: not counted.
    const std::string own = proc_self_ == "/proc/self" ? std::to_string(dirfd(d)) : "";
    long n = 0;
    while (const dirent* e = readdir(d)) {
      if (e->d_name[0] != '.' && own != e->d_name) ++n;
    }
    closedir(d);
    out.push_back(Single("process_open_fds", "Number of open file descriptors.",
                         MetricType::Gauge, static_cast<double>(n)));
  }
  struct rlimit lim = {};
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY) {
    out.push_back(Single("process_max_fds", "Maximum number of open file descriptors.",
                         MetricType::Gauge, static_cast<double>(lim.rlim_cur)));
  }
  return out;
}

std::vector<MetricFamily> StoreTrafficCollector::Collect() const {
  using Scheme = StoreTraffic::Scheme;
  using Op = StoreTraffic::Op;
  MetricFamily read = Family("qforge_store_read_bytes_total",
                             "Bytes read from object stores by this process, by URI scheme",
                             MetricType::Counter);
  MetricFamily written = Family("qforge_store_written_bytes_total",
                                "Bytes written to object stores by this process, by URI scheme",
                                MetricType::Counter);
  MetricFamily ops = Family("qforge_store_operations_total",
                            "Object store calls made by this process, by URI scheme and operation",
                            MetricType::Counter);
  MetricFamily errors = Family(
      "qforge_store_errors_total",
      "Object store calls that failed because the store failed (unavailable, timeouts, denied "
      "access, internal errors; not missing keys), by URI scheme and operation",
      MetricType::Counter);
  for (int si = 0; si < StoreTraffic::kNumSchemes; ++si) {
    const Scheme s = static_cast<Scheme>(si);
    const std::string scheme = StoreTraffic::SchemeName(s);
    ClientMetric m;
    m.label = {{"scheme", scheme}};
    m.counter.value = static_cast<double>(traffic_->read_bytes(s));
    read.metric.push_back(m);
    m.counter.value = static_cast<double>(traffic_->written_bytes(s));
    written.metric.push_back(m);
    for (int oi = 0; oi < StoreTraffic::kNumOps; ++oi) {
      const Op op = static_cast<Op>(oi);
      ClientMetric c;
      c.label = {{"op", StoreTraffic::OpName(op)}, {"scheme", scheme}};
      c.counter.value = static_cast<double>(traffic_->operations(s, op));
      ops.metric.push_back(c);
      c.counter.value = static_cast<double>(traffic_->errors(s, op));
      errors.metric.push_back(c);
    }
  }
  return {std::move(read), std::move(written), std::move(ops), std::move(errors)};
}

std::vector<MetricFamily> GaugeCallback::Collect() const {
  std::vector<Sample> samples = samples_ ? samples_() : std::vector<Sample>{};
  if (samples.empty()) return {};
  MetricFamily f;
  f.name = name_;
  f.help = help_;
  f.type = MetricType::Gauge;
  for (auto& [labels, value] : samples) {
    ClientMetric m;
    for (const auto& [k, v] : labels) m.label.push_back({k, v});
    m.gauge.value = value;
    f.metric.push_back(std::move(m));
  }
  return {std::move(f)};
}

}  // namespace qforge

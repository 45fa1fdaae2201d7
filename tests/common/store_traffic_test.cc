// StoreTraffic / CountingStore (common/store_traffic.h) and the collectables of
// common/metrics_collectors.h: what is counted as bytes, operations and errors, and how the
// families look in the exposition.
#include "common/store_traffic.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "common/forwarding_store.h"
#include "common/mem_store.h"
#include "common/metrics_collectors.h"
#include "gtest/gtest.h"
#include "prometheus/text_serializer.h"

namespace qforge {
namespace {

using Op = StoreTraffic::Op;
using Scheme = StoreTraffic::Scheme;

// Owns a MemStore and fails the calls a test picks.
class FaultyStore final : public ForwardingStore {
 public:
  FaultyStore() : ForwardingStore(&mem_) {}
  absl::Status fail_reads = absl::OkStatus();
  absl::Status ReadRange(std::string_view key, uint64_t offset, uint64_t length,
                         std::string* out) override {
    if (!fail_reads.ok()) return fail_reads;
    return ForwardingStore::ReadRange(key, offset, length, out);
  }

 private:
  MemStore mem_;
};

TEST(StoreTrafficTest, CountsBytesOperationsAndStoreFailures) {
  StoreTraffic traffic;
  auto inner = std::make_unique<FaultyStore>();
  FaultyStore* faulty = inner.get();
  CountingStore store(std::move(inner), Scheme::kS3, &traffic);

  ASSERT_TRUE(store.Put("a/b", "hello world").ok());
  std::string out;
  ASSERT_TRUE(store.ReadRange("a/b", 6, 5, &out).ok());
  EXPECT_EQ(out, "world");
  ASSERT_TRUE(store.Stat("a/b").ok());
  ASSERT_TRUE(store.ReadRange("a/b", 0, 11, &out).ok());
  auto w = store.NewWriter("c");
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Append("12345").ok());
  ASSERT_TRUE((*w)->Append("678").ok());
  ASSERT_TRUE((*w)->Close().ok());
  w->reset();
  ASSERT_TRUE(store.List("").ok());
  ASSERT_TRUE(store.Delete("c").ok());

  EXPECT_EQ(traffic.written_bytes(Scheme::kS3), 11u + 8u);
  EXPECT_EQ(traffic.read_bytes(Scheme::kS3), 5u + 11u);
  EXPECT_EQ(traffic.operations(Scheme::kS3, Op::kPut), 1u);
  EXPECT_EQ(traffic.operations(Scheme::kS3, Op::kRead), 2u);
  EXPECT_EQ(traffic.operations(Scheme::kS3, Op::kStat), 1u);
  EXPECT_EQ(traffic.operations(Scheme::kS3, Op::kWrite), 1u);  // one per writer
  EXPECT_EQ(traffic.operations(Scheme::kS3, Op::kList), 1u);
  EXPECT_EQ(traffic.operations(Scheme::kS3, Op::kDelete), 1u);
  EXPECT_EQ(traffic.read_bytes(Scheme::kFile), 0u);

  // Answers about the request are not store errors; failures of the store are.
  EXPECT_TRUE(absl::IsNotFound(store.Stat("missing").status()));
  EXPECT_TRUE(absl::IsOutOfRange(store.ReadRange("a/b", 0, 100, &out)));
  EXPECT_TRUE(absl::IsInvalidArgument(store.Put("../x", "y")));
  EXPECT_EQ(traffic.errors(Scheme::kS3, Op::kStat), 0u);
  EXPECT_EQ(traffic.errors(Scheme::kS3, Op::kRead), 0u);
  EXPECT_EQ(traffic.errors(Scheme::kS3, Op::kPut), 0u);
  faulty->fail_reads = absl::UnavailableError("connection reset");
  EXPECT_TRUE(absl::IsUnavailable(store.ReadRange("a/b", 0, 1, &out)));
  faulty->fail_reads = absl::PermissionDeniedError("access denied");
  EXPECT_FALSE(store.ReadRange("a/b", 0, 1, &out).ok());
  EXPECT_EQ(traffic.errors(Scheme::kS3, Op::kRead), 2u);
  EXPECT_EQ(traffic.read_bytes(Scheme::kS3), 16u);  // failed reads move nothing

  // An abandoned writer counts as one write operation, without bytes lost.
  {
    auto abandoned = store.NewWriter("d");
    ASSERT_TRUE(abandoned.ok());
    ASSERT_TRUE((*abandoned)->Append("xyz").ok());
  }
  EXPECT_EQ(traffic.operations(Scheme::kS3, Op::kWrite), 2u);
  EXPECT_EQ(traffic.errors(Scheme::kS3, Op::kWrite), 0u);
}

TEST(StoreTrafficTest, SchemeOfAUri) {
  EXPECT_EQ(StoreTraffic::SchemeOf("s3://bucket/prefix"), Scheme::kS3);
  EXPECT_EQ(StoreTraffic::SchemeOf("file:///data"), Scheme::kFile);
  EXPECT_EQ(StoreTraffic::SchemeOf("/data/models"), Scheme::kFile);
  EXPECT_STREQ(StoreTraffic::OpName(Op::kDeletePrefix), "delete_prefix");
}

TEST(StoreTrafficTest, OpenCountedObjectStoreCountsInTheProcessTotals) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("qforge-traffic-" + std::to_string(getpid())))
          .string();
  const uint64_t before = GlobalStoreTraffic().written_bytes(Scheme::kFile);
  auto store = OpenCountedObjectStore("file://" + dir);
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE((*store)->Put("x", "1234").ok());
  EXPECT_EQ(GlobalStoreTraffic().written_bytes(Scheme::kFile), before + 4);
  std::filesystem::remove_all(dir);
}

std::string Expose(const prometheus::Collectable& c) {
  return prometheus::TextSerializer().Serialize(c.Collect());
}

TEST(MetricsCollectorsTest, StoreTrafficFamiliesHaveEverySeriesFromTheStart) {
  StoreTraffic traffic;
  traffic.AddRead(Scheme::kS3, 100);
  traffic.AddCall(Scheme::kS3, Op::kRead, absl::UnavailableError("x"));
  const std::string text = Expose(StoreTrafficCollector(&traffic));
  EXPECT_NE(text.find("# TYPE qforge_store_read_bytes_total counter"), std::string::npos) << text;
  EXPECT_NE(text.find("qforge_store_read_bytes_total{scheme=\"s3\"} 100"), std::string::npos);
  EXPECT_NE(text.find("qforge_store_read_bytes_total{scheme=\"file\"} 0"), std::string::npos);
  EXPECT_NE(text.find("qforge_store_errors_total{op=\"read\",scheme=\"s3\"} 1"), std::string::npos);
  EXPECT_NE(text.find("qforge_store_operations_total{op=\"rename\",scheme=\"file\"} 0"),
            std::string::npos);
}

TEST(MetricsCollectorsTest, ProcessMetricsFromProc) {
  const std::string text = Expose(ProcessCollector());
  for (const char* name : {"process_cpu_seconds_total", "process_resident_memory_bytes",
                           "process_virtual_memory_bytes", "process_open_fds",
                           "process_max_fds", "process_start_time_seconds"}) {
    EXPECT_NE(text.find(std::string("\n") + name + " "), std::string::npos) << name << "\n" << text;
  }
  EXPECT_NE(text.find("# TYPE process_cpu_seconds_total counter"), std::string::npos);
}

TEST(MetricsCollectorsTest, ProcessMetricsFromAFakeProc) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("qforge-proc-" + std::to_string(getpid())))
          .string();
  std::filesystem::create_directories(dir + "/fd");
  for (const char* fd : {"0", "1", "2", "7"}) std::ofstream(dir + "/fd/" + fd) << "";
  // A command name with spaces and parentheses; utime 300, stime 100 ticks, start 500 ticks
  // after boot, vsize 4096000, rss 10 pages.
  std::ofstream(dir + "/stat")
      << "42 (my (odd) name) S 1 42 42 0 -1 4194560 1 0 0 0 300 100 0 0 20 0 3 0 500 4096000 10 "
         "18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
  std::ofstream(dir + "/procstat") << "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
  const std::string text = Expose(ProcessCollector(dir, dir + "/procstat"));
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  auto value = [&text](const std::string& name) {
    const size_t p = text.find("\n" + name + " ");
    return p == std::string::npos ? -1.0 : std::stod(text.substr(p + name.size() + 2));
  };
  EXPECT_DOUBLE_EQ(value("process_cpu_seconds_total"), 400.0 / ticks) << text;
  EXPECT_DOUBLE_EQ(value("process_virtual_memory_bytes"), 4096000.0);
  EXPECT_DOUBLE_EQ(value("process_resident_memory_bytes"), 10.0 * page);
  EXPECT_NEAR(value("process_start_time_seconds"), 1700000000.0 + 500.0 / ticks, 1e-3);
  EXPECT_DOUBLE_EQ(value("process_open_fds"), 4.0);
  std::filesystem::remove_all(dir);

  // Nothing readable: the /proc families are left out, no crash.
  const std::string none = Expose(ProcessCollector("/nonexistent", "/nonexistent"));
  EXPECT_EQ(none.find("process_cpu_seconds_total"), std::string::npos);
}

TEST(MetricsCollectorsTest, GaugeCallbackIsAbsentWithoutSamples) {
  bool have = false;
  GaugeCallback g("qforge_test_bytes", "test", [&have]() -> std::vector<GaugeCallback::Sample> {
    if (!have) return {};
    return {{{{"device", "cuda:0"}}, 1024.0}};
  });
  EXPECT_EQ(Expose(g), "");
  have = true;
  EXPECT_NE(Expose(g).find("qforge_test_bytes{device=\"cuda:0\"} 1024"), std::string::npos)
      << Expose(g);
}

}  // namespace
}  // namespace qforge

// common/byte_budget.h: grants within the capacity, an oversized request runs alone, arrival
// order (a large waiter is not overtaken), timed-out waiters give up their turn, and many
// threads never hold more than the capacity together. No timing: waits that must fail use a
// zero timeout, and threads are observed through waiting().
#include "common/byte_budget.h"

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace qforge {
namespace {

// Spins (yielding) until `budget` has `n` waiters.
void AwaitWaiters(const ByteBudget& budget, int n) {
  while (budget.waiting() != n) std::this_thread::yield();
}

TEST(ByteBudgetTest, GrantsWithinTheCapacityAndRefusesWhenFullAtTheDeadline) {
  ByteBudget b(100, "test budget");
  auto g1 = b.Acquire(60, absl::ZeroDuration());
  ASSERT_TRUE(g1.ok());
  auto g2 = b.Acquire(40, absl::ZeroDuration());
  ASSERT_TRUE(g2.ok());
  EXPECT_EQ(b.in_use(), 100u);
  auto g3 = b.Acquire(1, absl::ZeroDuration());
  ASSERT_FALSE(g3.ok());
  EXPECT_EQ(g3.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(g3.status().message().find("test budget"), std::string::npos) << g3.status();
  EXPECT_NE(g3.status().message().find("100 of 100 bytes in use"), std::string::npos)
      << g3.status();
  g1->Release();
  EXPECT_EQ(b.in_use(), 40u);
  EXPECT_TRUE(b.Acquire(60, absl::ZeroDuration()).ok());  // released again at once
  EXPECT_EQ(b.in_use(), 40u);
  EXPECT_EQ(b.peak_in_use(), 100u);
}

TEST(ByteBudgetTest, ARequestLargerThanTheCapacityRunsAlone) {
  ByteBudget b(100, "test budget");
  {
    auto big = b.Acquire(1'000'000, absl::ZeroDuration());
    ASSERT_TRUE(big.ok());
    EXPECT_EQ(big->bytes(), 100u);
    EXPECT_FALSE(b.Acquire(1, absl::ZeroDuration()).ok());
  }
  EXPECT_EQ(b.in_use(), 0u);
  // Nothing free: the big one waits for everything to be released.
  auto small = b.Acquire(1, absl::ZeroDuration());
  ASSERT_TRUE(small.ok());
  EXPECT_FALSE(b.Acquire(1'000'000, absl::ZeroDuration()).ok());
}

TEST(ByteBudgetTest, ALargeWaiterIsNotOvertakenAndATimedOutWaiterGivesUpItsTurn) {
  ByteBudget b(100, "test budget");
  auto held = b.Acquire(60, absl::ZeroDuration());
  ASSERT_TRUE(held.ok());
  std::atomic<bool> large_granted{false};
  std::thread large([&] {
    auto g = b.Acquire(100, absl::Hours(1));
    EXPECT_TRUE(g.ok()) << g.status();
    large_granted = true;
  });
  AwaitWaiters(b, 1);
  // 40 bytes are free, but the large request came first.
  EXPECT_FALSE(b.Acquire(10, absl::ZeroDuration()).ok());
  EXPECT_FALSE(large_granted.load());
  held->Release();
  large.join();
  EXPECT_TRUE(large_granted.load());
  EXPECT_EQ(b.in_use(), 0u);
  // The refused request's turn was passed on: later requests are served.
  EXPECT_TRUE(b.Acquire(100, absl::ZeroDuration()).ok());
}

TEST(ByteBudgetTest, ManyThreadsNeverHoldMoreThanTheCapacity) {
  ByteBudget b(1000, "test budget");
  std::vector<std::thread> threads;
  std::atomic<int> granted{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      std::mt19937 rng(i);
      for (int k = 0; k < 200; ++k) {
        auto g = b.Acquire(rng() % 1500, absl::Hours(1));
        ASSERT_TRUE(g.ok()) << g.status();
        ASSERT_LE(b.in_use(), 1000u);
        ++granted;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(granted.load(), 1600);
  EXPECT_EQ(b.in_use(), 0u);
  EXPECT_LE(b.peak_in_use(), 1000u);
  EXPECT_GT(b.peak_in_use(), 0u);
}

TEST(ByteBudgetTest, ZeroCapacityMeansNoLimit) {
  ByteBudget b(0, "test budget");
  auto g = b.Acquire(uint64_t{1} << 40, absl::ZeroDuration());
  ASSERT_TRUE(g.ok());
  EXPECT_TRUE(b.Acquire(uint64_t{1} << 40, absl::ZeroDuration()).ok());
}

}  // namespace
}  // namespace qforge

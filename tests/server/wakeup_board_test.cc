// server/wakeup_board.h: each callback runs exactly once — on Fire of its key, at its
// deadline, or at Stop — on the board's thread, never on the thread that fires it.
#include "server/wakeup_board.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace qforge {
namespace {

// Counts runs of callbacks and remembers the threads they ran on.
class Runs {
 public:
  std::function<void()> Callback(const std::string& name) {
    return [this, name] {
      std::lock_guard<std::mutex> l(mu_);
      order_.push_back(name);
      threads_.push_back(std::this_thread::get_id());
      cv_.notify_all();
    };
  }
  bool WaitFor(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] { return order_.size() >= n; });
  }
  std::vector<std::string> order() {
    std::lock_guard<std::mutex> l(mu_);
    return order_;
  }
  std::vector<std::thread::id> threads() {
    std::lock_guard<std::mutex> l(mu_);
    return threads_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> order_;
  std::vector<std::thread::id> threads_;
};

TEST(WakeupBoardTest, FireRunsOnlyThatKeysCallbacksOnceOnTheBoardsThread) {
  WakeupBoard board;
  Runs runs;
  board.Add("job:a", absl::Seconds(60), runs.Callback("a1"));
  board.Add("job:a", absl::Seconds(60), runs.Callback("a2"));
  board.Add("job:b", absl::Seconds(60), runs.Callback("b"));
  EXPECT_EQ(board.size(), 3u);
  board.Fire("job:a");
  ASSERT_TRUE(runs.WaitFor(2));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(runs.order().size(), 2u) << "job:b ran without being fired";
  EXPECT_EQ(board.size(), 1u);
  board.Fire("job:a");  // nothing left under it: runs nothing again
  board.Fire("job:none");
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(runs.order().size(), 2u);
  for (std::thread::id t : runs.threads()) EXPECT_NE(t, std::this_thread::get_id());
  board.FireAll();
  ASSERT_TRUE(runs.WaitFor(3));
  EXPECT_EQ(runs.order().back(), "b");
  EXPECT_EQ(board.size(), 0u);
}

TEST(WakeupBoardTest, DeadlinesRunInTheirOrderAndNotBefore) {
  WakeupBoard board;
  Runs runs;
  const auto t0 = std::chrono::steady_clock::now();
  board.Add("k", absl::Milliseconds(300), runs.Callback("late"));
  board.Add("k", absl::Milliseconds(100), runs.Callback("early"));
  board.Add("k", absl::ZeroDuration(), runs.Callback("now"));
  ASSERT_TRUE(runs.WaitFor(1));
  EXPECT_EQ(runs.order()[0], "now");
  ASSERT_TRUE(runs.WaitFor(3));
  EXPECT_EQ(runs.order(), (std::vector<std::string>{"now", "early", "late"}));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(300));
  EXPECT_EQ(board.size(), 0u);
  board.Fire("k");  // the expired ones are gone: nothing runs twice
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(runs.order().size(), 3u);
}

TEST(WakeupBoardTest, StopRunsWhatIsPendingAndLaterAddsRunInline) {
  Runs runs;
  WakeupBoard board;
  board.Add("k", absl::Hours(1), runs.Callback("pending"));
  board.Stop();
  EXPECT_EQ(runs.order(), (std::vector<std::string>{"pending"}));
  board.Add("k", absl::Hours(1), runs.Callback("after"));  // nobody else would run it
  EXPECT_EQ(runs.order(), (std::vector<std::string>{"pending", "after"}));
  EXPECT_EQ(runs.threads().back(), std::this_thread::get_id());
  board.Stop();  // idempotent
}

TEST(WakeupBoardTest, ACallbackMayRegisterAgainAndFireFromInside) {
  WakeupBoard board;
  std::atomic<int> rounds{0};
  std::mutex mu;
  std::condition_variable cv;
  std::function<void()> again = [&] {
    if (++rounds < 5) {
      board.Add("loop", absl::ZeroDuration(), again);
      board.Fire("other");  // firing from a callback does not deadlock
    }
    cv.notify_all();
  };
  board.Add("loop", absl::ZeroDuration(), again);
  std::unique_lock<std::mutex> l(mu);
  EXPECT_TRUE(cv.wait_for(l, std::chrono::seconds(5), [&] { return rounds.load() >= 5; }));
}

}  // namespace
}  // namespace qforge

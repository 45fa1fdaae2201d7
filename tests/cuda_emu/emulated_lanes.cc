// The block scheduler of emulated_cuda.h: the lanes of a block are coroutines on their own
// stacks, switched with _setjmp/_longjmp (no signal-mask system call per switch, unlike
// swapcontext). Lane t of every block runs on stack t; a stack is entered with makecontext once,
// and its entry loop parks there between blocks, so starting a lane is one _longjmp too. Built
// without _FORTIFY_SOURCE: its longjmp check rejects jumps between stacks. Under
// AddressSanitizer every switch is announced (__sanitizer_*_switch_fiber), so a build with
// -fsanitize=address checks the kernels' accesses to device memory (host heap here) without
// false reports about the lanes' stacks.
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tests/cuda_emu/emulated_cuda.h"
#include "tests/cuda_emu/emulated_device.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace emu {

LanePosition lane;

namespace {

enum class Wait { kNone, kBlock, kWarp };

constexpr size_t kLaneStackBytes = 128 * 1024;

struct Lane {
  jmp_buf resume;
  bool started = false;
  bool done = false;
  Wait wait = Wait::kNone;
  uint3 thread{0, 0, 0};
};

// The stack lane t of every block runs on; `parked` is where its entry loop waits for the next
// block once `entered`.
struct LaneStack {
  std::unique_ptr<char[]> memory;
  ucontext_t context;
  jmp_buf parked;
  bool entered = false;
  void* sanitizer_fake_stack = nullptr;  // AddressSanitizer's state of this stack while away
};

// The AddressSanitizer announcements of a stack switch (no-ops in other builds): Leaving before
// jumping to the stack [bottom, bottom + size), Arrived right after a jump lands, with the state
// Leaving saved for this stack; Arrived reports the stack it came from.
void Leaving(void** fake_stack_save, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#endif
}
void Arrived(void* fake_stack_save, const void** from_bottom, size_t* from_size) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake_stack_save, from_bottom, from_size);
#endif
}
// The scheduler's stack (the launching thread's), learnt when a lane first arrives.
const void* scheduler_bottom = nullptr;
size_t scheduler_size = 0;
void* scheduler_fake_stack = nullptr;

struct Block {
  std::vector<Lane> lanes;
  std::vector<uint64_t> warp_slots;  // 32 per warp
  jmp_buf scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
};

// State of the kernel that is running (one at a time: RunGrid holds `launch_mutex`).
std::mutex launch_mutex;
const char* running_kernel = "(none)";
Block* running = nullptr;
alignas(16) unsigned char shared_memory[kMaxDynamicSharedBytes];
std::vector<LaneStack> lane_stacks;
cudaError_t pending_launch_error = cudaSuccess;
int64_t launches = 0;

enum class Order { kForward, kReverse, kShuffle };
Order LaneOrder() {
  static const Order order = [] {
    const char* v = std::getenv("QFORGE_EMU_LANE_ORDER");
    const std::string s = v == nullptr ? "" : v;
    if (s == "forward") return Order::kForward;
    if (s == "reverse") return Order::kReverse;
    if (!s.empty() && s != "shuffle") {
      std::fprintf(stderr, "QFORGE_EMU_LANE_ORDER=%s: expected forward, reverse or shuffle\n",
                   s.c_str());
      std::abort();
    }
    return Order::kShuffle;
  }();
  return order;
}

// QFORGE_EMU_PROFILE=1: per kernel, the launches, blocks and seconds the emulator spent, printed
// to stderr at exit (which kernels make a test slow here).
struct KernelProfile {
  int64_t launches = 0;
  int64_t blocks = 0;
  double seconds = 0;
};
std::map<std::string, KernelProfile>* Profile() {
  static std::map<std::string, KernelProfile>* profile = [] {
    const char* v = std::getenv("QFORGE_EMU_PROFILE");
    if (v == nullptr || std::string(v) != "1") return static_cast<std::map<std::string, KernelProfile>*>(nullptr);
    auto* p = new std::map<std::string, KernelProfile>;
    std::atexit([] {
      for (const auto& [name, k] : *Profile()) {
        std::fprintf(stderr, "emulated %-40s %8lld launches %10lld blocks %9.3f s\n", name.c_str(),
                     static_cast<long long>(k.launches), static_cast<long long>(k.blocks), k.seconds);
      }
    });
    return p;
  }();
  return profile;
}

int LinearThread(const uint3& t, const dim3& b) {
  return static_cast<int>(t.x + t.y * b.x + t.z * b.x * b.y);
}

// From the running lane back to the scheduler.
[[noreturn]] void ToScheduler() {
  Leaving(&lane_stacks[running->current].sanitizer_fake_stack, scheduler_bottom, scheduler_size);
  _longjmp(running->scheduler, 1);
}

void Yield(Wait wait) {
  const int t = running->current;
  running->lanes[t].wait = wait;
  if (_setjmp(running->lanes[t].resume) == 0) ToScheduler();
  Arrived(lane_stacks[t].sanitizer_fake_stack, &scheduler_bottom, &scheduler_size);
}

[[noreturn]] void LaneEntry() {
  Arrived(nullptr, &scheduler_bottom, &scheduler_size);
  for (;;) {
    (*running->body)();
    const int t = running->current;
    running->lanes[t].done = true;
    if (_setjmp(lane_stacks[t].parked) == 0) ToScheduler();
    Arrived(lane_stacks[t].sanitizer_fake_stack, &scheduler_bottom, &scheduler_size);
  }
}

// Releases the barriers every live lane of the block / of a warp has reached; returns whether
// any was released.
bool ReleaseBarriers(Block& b) {
  const int n = static_cast<int>(b.lanes.size());
  int alive = 0, at_block = 0;
  for (const Lane& l : b.lanes) {
    alive += !l.done;
    at_block += l.wait == Wait::kBlock;
  }
  bool released = false;
  if (at_block > 0 && at_block == alive) {
    for (Lane& l : b.lanes) l.wait = Wait::kNone;
    released = true;
  }
  for (int w = 0; w * 32 < n; ++w) {
    const int width = std::min(32, n - w * 32);
    int warp_alive = 0, at_warp = 0;
    for (int q = 0; q < width; ++q) {
      warp_alive += !b.lanes[w * 32 + q].done;
      at_warp += b.lanes[w * 32 + q].wait == Wait::kWarp;
    }
    if (at_warp > 0 && at_warp == warp_alive) {
      if (warp_alive < 32) Fatal("warp barrier with exited lanes or a partial warp");
      for (int q = 0; q < width; ++q) b.lanes[w * 32 + q].wait = Wait::kNone;
      released = true;
    }
  }
  return released;
}

// The order of the lanes for the next round (QFORGE_EMU_LANE_ORDER).
void Reorder(std::vector<int>& order) {
  static uint32_t shuffle_state = 12345;
  if (LaneOrder() == Order::kReverse) std::reverse(order.begin(), order.end());
  if (LaneOrder() == Order::kShuffle) {
    for (size_t t = order.size() - 1; t > 0; --t) {
      shuffle_state = shuffle_state * 1103515245u + 12345u;
      std::swap(order[t], order[(shuffle_state >> 8) % static_cast<uint32_t>(t + 1)]);
    }
  }
}

// Runs lane t of `b` until it waits at a barrier or finishes. The lane comes back by _longjmp
// to the _setjmp here; nothing in this frame changes between the two (which keeps the jump
// well defined), hence a function of its own, never inlined into the scheduler's loop.
__attribute__((noinline)) void RunLane(Block& b, int t) {
  b.current = t;
  Lane& l = b.lanes[t];
  LaneStack& stack = lane_stacks[t];
  lane.thread = l.thread;
  if (!stack.entered) stack.memory.reset(new char[kLaneStackBytes]);
  if (_setjmp(b.scheduler) != 0) {
    Arrived(scheduler_fake_stack, nullptr, nullptr);  // back from the lane
    return;
  }
  Leaving(&scheduler_fake_stack, stack.memory.get(), kLaneStackBytes);
  if (l.started) _longjmp(l.resume, 1);
  l.started = true;
  if (stack.entered) _longjmp(stack.parked, 1);
  stack.entered = true;
  getcontext(&stack.context);
  stack.context.uc_stack.ss_sp = stack.memory.get();
  stack.context.uc_stack.ss_size = kLaneStackBytes;
  stack.context.uc_link = nullptr;
  makecontext(&stack.context, LaneEntry, 0);
  setcontext(&stack.context);
}

void RunBlock(dim3 block_dim, const std::function<void()>& body) {
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  Block b;
  b.lanes.resize(n);
  b.warp_slots.assign(static_cast<size_t>((n + 31) / 32) * 32, 0);
  b.body = &body;
  if (static_cast<int>(lane_stacks.size()) < n) lane_stacks.resize(n);
  for (int t = 0; t < n; ++t) {
    b.lanes[t].thread = {static_cast<unsigned>(t % block_dim.x),
                         static_cast<unsigned>((t / block_dim.x) % block_dim.y),
                         static_cast<unsigned>(t / (block_dim.x * block_dim.y))};
  }
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = t;
  running = &b;
  for (;;) {
    Reorder(order);
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      const Lane& l = b.lanes[order[i]];
      if (l.done || l.wait != Wait::kNone) continue;
      ran = true;
      RunLane(b, order[i]);
    }
    const bool released = ReleaseBarriers(b);
    bool all_done = true;
    for (const Lane& l : b.lanes) all_done = all_done && l.done;
    if (all_done) break;
    if (!ran && !released) Fatal("deadlock: the lanes of a block wait at different barriers");
  }
  running = nullptr;
}

}  // namespace

void* SharedMemory() { return shared_memory; }

void Fatal(const char* message) {
  std::fprintf(stderr, "CUDA emulator: %s (kernel %s, block %u,%u,%u, thread %u,%u,%u)\n",
               message, running_kernel, lane.block.x, lane.block.y, lane.block.z,
               lane.thread.x, lane.thread.y, lane.thread.z);
  std::abort();
}

void BlockBarrier() { Yield(Wait::kBlock); }
void WarpBarrier() { Yield(Wait::kWarp); }

int LaneInWarp() { return LinearThread(lane.thread, lane.block_dim) % 32; }

uint64_t& WarpSlot(int lane_in_warp) {
  const int warp = LinearThread(lane.thread, lane.block_dim) / 32;
  return running->warp_slots[static_cast<size_t>(warp) * 32 + lane_in_warp];
}

void SetLaunchError(cudaError_t error) {
  if (pending_launch_error == cudaSuccess) pending_launch_error = error;
}

void RunGrid(const char* name, dim3 grid, dim3 block, size_t dynamic_shared_bytes,
             const std::function<void()>& body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    SetLaunchError(cudaErrorInvalidConfiguration);
    return;
  }
  std::lock_guard<std::mutex> hold(launch_mutex);
  ++launches;
  running_kernel = name;
  const auto start = std::chrono::steady_clock::now();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        lane.block = {x, y, z};
        lane.block_dim = block;
        lane.grid_dim = grid;
        const float nan = std::nanf("");
        float* shared = reinterpret_cast<float*>(shared_memory);
        std::fill(shared, shared + (dynamic_shared_bytes + 3) / 4, nan);
        RunBlock(block, body);
      }
    }
  }
  running_kernel = "(none)";
  if (Profile() != nullptr) {
    KernelProfile& k = (*Profile())[name];
    ++k.launches;
    k.blocks += int64_t{grid.x} * grid.y * grid.z;
    k.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
}

cudaError_t TakeLaunchError() {
  const cudaError_t e = pending_launch_error;
  pending_launch_error = cudaSuccess;
  return e;
}

int64_t KernelLaunches() { return launches; }

}  // namespace emu

// A barrier between the phases of one forward() that spins briefly, then sleeps (futex via
// std::atomic::wait). OpenMP's own barrier spins for a long time by default, which on a small
// busy machine is the worst case: a thread that shares its core with another process waits for a
// scheduler slice while its partner burns the other core spinning (measured: 0.4 ms calls took
// 16-24 ms with one busy process beside them). Sleeping early frees the core, so the scheduler can
// move the late thread onto it.
#pragma once

#include <atomic>
#include <cstdint>

namespace tmoe::cpu {

class PhaseBarrier {
 public:
  // Every thread of the team calls this with the same team size; returns once all have arrived.
  void arrive_and_wait(int team) {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == team) {
      arrived_.store(0, std::memory_order_relaxed);  // before the release below: next use is clean
      generation_.fetch_add(1, std::memory_order_release);
      generation_.notify_all();
      return;
    }
    // Phases are tens of microseconds and up: a short spin catches partners that are running.
    for (int spin = 0; spin < kSpins; ++spin) {
      if (generation_.load(std::memory_order_acquire) != generation) return;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    while (generation_.load(std::memory_order_acquire) == generation)
      generation_.wait(generation, std::memory_order_acquire);
  }

 private:
  static constexpr int kSpins = 4096;  // about 20-50 us of pause instructions
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> generation_{0};
};

}  // namespace tmoe::cpu

// A timeline of the tensor-core decode passes, for latency work (issue #4: qwen3's 1-token forward
// against 12 us): in a build with -DTMOE_PASS_TRACE=1 every block of mma_projection_kernel (and of
// the one-launch decode, fused_decode.cuh: passes 2 and 3 below) records
// when it started, finished staging, finished its main loops and ended (%globaltimer, ns, thread
// 0's view), on which SM, and which pass, block and grid it was. ncu times kernels one at a time;
// this shows a graph replay as it runs: waves, tails, and how the passes overlap through
// programmatic dependent launch. `tmoe bench --trace FILE` writes the records of one replay per
// case; scripts/trace-summary condenses them. Off by default: then the kernels record nothing and
// pass_trace_built() is false. Host declarations only (plain types: the bench includes it).
#pragma once

#include <cstdint>
#include <vector>

#ifndef TMOE_PASS_TRACE
#define TMOE_PASS_TRACE 0
#endif

namespace tmoe::cuda {

inline constexpr bool kPassTrace = TMOE_PASS_TRACE != 0;
// Records kept per traced run; blocks past it are counted but not kept.
inline constexpr uint32_t kPassTraceCapacity = 1u << 18;

struct PassTraceRecord {
  uint64_t begin = 0, staged = 0, looped = 0, end = 0;  // ns; staged = looped = begin for empty blocks
  uint32_t sm = 0;
  uint32_t pass = 0;    // 0: gate+up, 1: down; the one-launch decode: 2 its phase A (begin, x staged,
                        // gate/up chunks done, grid-wide arrival passed), 3 its phase B (arrival
                        // passed, h staged, thread 0's down chunks done, the block's end)
  uint32_t block = 0;   // linear block index in its grid (x fastest)
  uint32_t blocks = 0;  // blocks in its grid
};

// Where kernels write their records (device pointers; null when the build does not record).
struct PassTraceSink {
  PassTraceRecord* records = nullptr;
  unsigned long long* count = nullptr;
};
PassTraceSink pass_trace_sink();

// Whether this build records (-DTMOE_PASS_TRACE=1).
bool pass_trace_built();
// Starts a traced run: forgets earlier records. Call with the device idle.
void pass_trace_begin();
// The records since pass_trace_begin (after a device synchronize), and in `dropped` how many did
// not fit kPassTraceCapacity.
std::vector<PassTraceRecord> pass_trace_end(uint64_t* dropped = nullptr);

}  // namespace tmoe::cuda

// A timeline of the tensor-core decode passes, for latency work (issue #4: qwen3's 1-token forward
// against 12 us): in a build with -DTMOE_PASS_TRACE=1 every block of mma_projection_kernel records
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
  uint32_t pass = 0;    // 0: gate+up, 1: down
  uint32_t block = 0;   // linear block index in its grid (x fastest)
  uint32_t blocks = 0;  // blocks in its grid
};

// Whether this build records (-DTMOE_PASS_TRACE=1).
bool pass_trace_built();
// Starts a traced run: forgets earlier records. Call with the device idle.
void pass_trace_begin();
// The records since pass_trace_begin (after a device synchronize), and in `dropped` how many did
// not fit kPassTraceCapacity.
std::vector<PassTraceRecord> pass_trace_end(uint64_t* dropped = nullptr);

}  // namespace tmoe::cuda

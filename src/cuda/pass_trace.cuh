// The device side of the pass trace (pass_trace.hpp): a block's timeline as thread 0 sees it,
// written to a sink in device memory. Nothing is recorded unless -DTMOE_PASS_TRACE=1.
#pragma once

#include <cstdint>

#include "pass_trace.hpp"

namespace tmoe::cuda {

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Thread 0's marks of one block: 0 begin, 1 staged, 2 main loops done; write() adds the end.
struct BlockTrace {
  uint64_t t[3] = {0, 0, 0};
  __device__ __forceinline__ void mark(int i) {
    if constexpr (kPassTrace)
      if (threadIdx.x == 0) t[i] = global_ns();
  }
  __device__ __forceinline__ void write(int pass, PassTraceSink sink) const {
    if constexpr (kPassTrace) {
      if (threadIdx.x != 0 || sink.records == nullptr) return;
      PassTraceRecord r;
      r.end = global_ns();
      r.begin = t[0];
      r.staged = t[1] ? t[1] : r.begin;
      r.looped = t[2] ? t[2] : r.staged;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(r.sm));
      r.pass = static_cast<uint32_t>(pass);
      r.block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
      r.blocks = gridDim.x * gridDim.y * gridDim.z;
      const unsigned long long i = atomicAdd(sink.count, 1ull);
      if (i < kPassTraceCapacity) sink.records[i] = r;
    }
  }
};

}  // namespace tmoe::cuda

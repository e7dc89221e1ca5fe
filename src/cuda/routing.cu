// One block builds the whole routing plan: counts (shared-memory integer atomics), exclusive
// offsets (block scan), the stable order (one warp walks the pairs in order, 32 at a time, ranking
// equal ids with __match_any_sync), and the work items (a second scan over per-expert chunk
// counts). Pairs per forward are small (T * k), so one block is plenty and saves launches.
//
// It is the first kernel of a forward and is launched as a programmatic dependent (launch.hpp): it
// waits for whatever ran before it on the stream (the caller's producer of x and the ids, or the
// previous forward, which may still use this workspace) and only then lets the passes launch, so
// they may read x and the ids before their own wait.
#include <climits>

#include "cuda_check.hpp"
#include "launch.hpp"
#include "routing.hpp"

namespace tmoe::cuda {
namespace {

constexpr int kRoutingThreads = 256;  // E and T*k are small: fewer warps make the scans shorter

// Exclusive scan of data[0, n) in place by the whole block; returns the total.
__device__ int block_exclusive_scan(int* data, int n, int* warp_sums) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int carry = 0;
  for (int base = 0; base < n; base += kRoutingThreads) {
    const int i = base + threadIdx.x;
    const int v = i < n ? data[i] : 0;
    int inclusive = v;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += other;
    }
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      constexpr int kWarps = kRoutingThreads / 32;
      int s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, s, d);
        if (lane >= d) s += other;
      }
      warp_sums[lane] = s;  // inclusive over warps
    }
    __syncthreads();
    const int warp_prefix = warp ? warp_sums[warp - 1] : 0;
    if (i < n) data[i] = carry + warp_prefix + inclusive - v;
    carry += warp_sums[kRoutingThreads / 32 - 1];
    __syncthreads();
  }
  return carry;
}

__global__ void __launch_bounds__(kRoutingThreads)
routing_kernel(const int32_t* __restrict__ ids, int pairs, int top_k, int experts,
               int tokens_per_item, RoutingOutputs out) {
  extern __shared__ int shared[];
  int* offsets = shared;                 // [E + 1]: counts, then exclusive offsets
  int* item_offsets = offsets + experts + 1;  // [E]: chunks per expert, then their offsets
  int* cursor = item_offsets + experts;  // [E]: pairs placed so far (stable placement)
  int* warp_sums = cursor + experts;     // [32]

  wait_for_predecessor();
  allow_dependents();
  for (int e = threadIdx.x; e <= experts; e += kRoutingThreads) {
    offsets[e] = 0;
    if (e < experts) cursor[e] = 0;
  }
  for (int64_t i = threadIdx.x; i < out.num_counters; i += kRoutingThreads) out.counters[i] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < pairs; p += kRoutingThreads) {
    out.inverse[p] = -1;
    const int id = ids[p];
    if (id == -1) continue;
    if (id < 0 || id >= experts) {  // an input error: skipped, flagged, never used as an address
      atomicAdd(&out.error[0], 1);
      atomicMin(&out.error[1], p);
      out.error[2] = top_k;
      continue;
    }
    atomicAdd(&offsets[id], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += kRoutingThreads) {
    out.counts[e] = offsets[e];
    item_offsets[e] = (offsets[e] + tokens_per_item - 1) / tokens_per_item;
  }
  __syncthreads();
  const int routed = block_exclusive_scan(offsets, experts, warp_sums);
  const int items = block_exclusive_scan(item_offsets, experts, warp_sums);
  if (threadIdx.x == 0) {
    offsets[experts] = routed;
    *out.num_items = items;
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= experts; e += kRoutingThreads) out.offsets[e] = offsets[e];
  // Work items: chunks of tokens_per_item consecutive pairs of one expert.
  for (int e = threadIdx.x; e < experts; e += kRoutingThreads) {
    const int count = offsets[e + 1] - offsets[e];
    int* item = out.items + static_cast<int64_t>(item_offsets[e]) * kWorkItemInts;
    for (int first = 0; first < count; first += tokens_per_item, item += kWorkItemInts) {
      item[0] = e;
      item[1] = offsets[e] + first;
      item[2] = min(tokens_per_item, count - first);
      item[3] = 0;
    }
  }
  // Stable order: warp 0 walks the pairs in increasing index, 32 at a time.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const unsigned lower = (1u << lane) - 1u;
    for (int base = 0; base < pairs; base += 32) {
      const int p = base + lane;
      const int id = p < pairs ? ids[p] : -1;
      const bool routed_pair = id >= 0 && id < experts;
      const unsigned same = __match_any_sync(0xffffffffu, routed_pair ? id : -1);
      if (routed_pair) {
        const int pos = offsets[id] + cursor[id] + __popc(same & lower);
        out.order[pos] = p;
        out.inverse[p] = pos;
      }
      __syncwarp();
      if (routed_pair && (same & lower) == 0) cursor[id] += __popc(same);  // the group's first lane
      __syncwarp();
    }
  }
}

}  // namespace

void launch_routing(const int32_t* expert_ids, int64_t tokens, int top_k, int experts,
                    int tokens_per_item, const RoutingOutputs& out, cudaStream_t stream) {
  const int64_t pairs = tokens * top_k;
  if (pairs > INT_MAX / 2 || experts > kMaxRoutingExperts || experts <= 0 || tokens_per_item <= 0)
    throw Error(ErrorKind::bad_input,
                "routing: " + std::to_string(pairs) + " pairs over " + std::to_string(experts) +
                    " experts is outside what the CUDA routing kernel takes (at most " +
                    std::to_string(kMaxRoutingExperts) + " experts)");
  const size_t shared = (3 * static_cast<size_t>(experts) + 1 + 32) * sizeof(int);
  if (shared > 48 * 1024)
    TMOE_CUDA_CHECK(cudaFuncSetAttribute(routing_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(shared)));
  launch_dependent(routing_kernel, dim3(1), dim3(kRoutingThreads), shared, stream, true, expert_ids,
                   static_cast<int>(pairs), top_k, experts, tokens_per_item, out);
}

}  // namespace tmoe::cuda

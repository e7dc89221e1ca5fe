// Device routing (FORMAT.md's plan) as one graph-safe kernel: no host sync, no allocation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tmoe::cuda {

// A work item is up to `tokens_per_item` consecutive routed pairs of one expert:
// {expert, first position in `order`, pair count, 0}.
inline constexpr int kWorkItemInts = 4;

// Upper bound on the work items of any routing of `pairs` pairs over `experts` experts:
// sum_e ceil(c_e / m) <= pairs / m + (number of experts with pairs), and never more than pairs.
inline int64_t max_work_items(int64_t pairs, int experts, int tokens_per_item) {
  const int64_t used = pairs < experts ? pairs : experts;
  const int64_t bound = pairs / tokens_per_item + used;
  return bound < pairs ? bound : pairs;
}

// Where the routing kernel writes (device pointers). Sizes: counts [E], offsets [E+1],
// order [pairs], inverse [pairs] (-1 for skipped slots), items [max_work_items * 4],
// num_items [1], counters [num_counters] (zeroed for the passes that follow),
// error [3]: {bad id count, smallest bad pair index, top_k} (accumulates until cleared).
struct RoutingOutputs {
  int32_t* counts = nullptr;
  int32_t* offsets = nullptr;
  int32_t* order = nullptr;
  int32_t* inverse = nullptr;
  int32_t* items = nullptr;
  int32_t* num_items = nullptr;
  int32_t* counters = nullptr;
  int64_t num_counters = 0;
  int32_t* error = nullptr;
};

inline constexpr int kMaxRoutingExperts = 4096;

// Builds the plan for expert_ids [tokens, top_k] on `stream` (one block). Ids of -1 are skipped;
// other ids outside [0, experts) are skipped and counted in `error`. Launched as a programmatic
// dependent (launch.hpp): kernels after it on the stream may start before it ends, and must wait
// for it (wait_for_predecessor) before they read its outputs or the counters.
void launch_routing(const int32_t* expert_ids, int64_t tokens, int top_k, int experts,
                    int tokens_per_item, const RoutingOutputs& out, cudaStream_t stream);

}  // namespace tmoe::cuda

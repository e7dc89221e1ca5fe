// The routing plan (FORMAT.md): which (token, slot) pairs each expert serves, grouped by expert.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace tmoe {

struct RoutingPlan {
  int experts = 0;
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<int32_t> counts;   // [E]   pairs routed to each expert
  std::vector<int32_t> offsets;  // [E+1] exclusive prefix sum; offsets[E] = routed pairs
  std::vector<int32_t> order;    // [offsets[E]] pair ids t*k+j, by expert, stable within an expert
  std::vector<int32_t> inverse;  // [T*k] position of pair t*k+j in `order`, -1 for skipped slots

  int64_t routed_pairs() const { return offsets.empty() ? 0 : offsets.back(); }
};

// Builds the plan from expert_ids [tokens, top_k]. Ids of -1 are skipped; any other id outside
// [0, experts) throws tmoe::Error (bad input) naming the token, slot and id.
RoutingPlan make_routing_plan(std::span<const int32_t> expert_ids, int64_t tokens, int top_k,
                              int experts);
// The same, refilling `plan` in place: no allocation once its vectors have grown (per-call use).
void make_routing_plan(std::span<const int32_t> expert_ids, int64_t tokens, int top_k, int experts,
                       RoutingPlan& plan);

}  // namespace tmoe

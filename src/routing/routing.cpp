#include "tmoe/routing.hpp"

#include "tmoe/error.hpp"

namespace tmoe {

RoutingPlan make_routing_plan(std::span<const int32_t> expert_ids, int64_t tokens, int top_k,
                              int experts) {
  RoutingPlan plan;
  make_routing_plan(expert_ids, tokens, top_k, experts, plan);
  return plan;
}

void make_routing_plan(std::span<const int32_t> expert_ids, int64_t tokens, int top_k, int experts,
                       RoutingPlan& plan) {
  require(tokens >= 0 && top_k > 0 && experts > 0, "bad routing geometry: tokens={} k={} experts={}",
          tokens, top_k, experts);
  require(expert_ids.size() == static_cast<size_t>(tokens * top_k),
          "expert_ids holds {} ids, tokens x k = {}", expert_ids.size(), tokens * top_k);
  plan.experts = experts;
  plan.tokens = tokens;
  plan.top_k = top_k;
  plan.counts.assign(experts, 0);
  for (int64_t pair = 0; pair < tokens * top_k; ++pair) {
    const int32_t e = expert_ids[pair];
    if (e == -1) continue;
    require(e >= 0 && e < experts, "expert id {} at token {}, slot {} is outside [0, {}) (and not -1)",
            e, pair / top_k, pair % top_k, experts);
    ++plan.counts[e];
  }
  plan.offsets.assign(experts + 1, 0);
  for (int e = 0; e < experts; ++e) plan.offsets[e + 1] = plan.offsets[e] + plan.counts[e];
  plan.order.assign(plan.offsets[experts], 0);
  plan.inverse.assign(tokens * top_k, -1);
  // counts[] becomes the running fill position of each expert, then is restored.
  for (int e = 0; e < experts; ++e) plan.counts[e] = plan.offsets[e];
  for (int64_t pair = 0; pair < tokens * top_k; ++pair) {  // increasing pair id: stable
    const int32_t e = expert_ids[pair];
    if (e == -1) continue;
    const int32_t slot = plan.counts[e]++;
    plan.order[slot] = static_cast<int32_t>(pair);
    plan.inverse[pair] = slot;
  }
  for (int e = 0; e < experts; ++e) plan.counts[e] -= plan.offsets[e];
}

}  // namespace tmoe

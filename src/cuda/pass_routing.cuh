// What a projection-pass block needs from the routing, and the combine fused into the down pass.
//
// Work item of a block: for small batches (at most kLocalPlanMaxPairs routed pairs) every block
// derives its own item straight from expert_ids, so the gate+up pass need not wait for the routing
// kernel before it prefetches weights and stages activations (it waits only before its finish
// counters, which the routing kernel zeroes), and the down pass prefetches its weights while the
// gate+up pass drains. The derivation gives exactly the routing kernel's plan (routing.cu): pairs in
// stable order by expert, work items = chunks of tokens_per_item consecutive pairs of one expert,
// numbered expert by expert. Larger batches read the routing kernel's items after waiting for it.
//
// Combine: the down pass's finishing block of (item, finish group) has written its pairs' outputs y
// for that group's columns; per (token, finish group) an integer counter counts the token's routed
// pairs done, and the block that completes a token sums its k slots in slot order (a fixed order:
// bitwise repeatable) into the output, converted to the output dtype.
#pragma once

#include <cstdint>

#include "launch.hpp"
#include "routing.hpp"
#include "tmoe/half.hpp"

namespace tmoe::cuda {

// Largest pair count (tokens x top_k) for which pass blocks derive their item from the ids: each
// thread of the block ranks one pair against all others in shared memory, so it must not exceed
// the block's threads, and the two O(pairs) loops per thread stay well under a microsecond.
inline constexpr int kLocalPlanMaxPairs = 64;
// Most pairs in one work item (the passes' kMaxItemTokens must not exceed it).
inline constexpr int kMaxPassItemPairs = 16;

// How a pass is launched and where its blocks find their work item. The routing kernel's plan
// (items, num_items, order) is read when expert_ids is null.
struct PassRouting {
  const int32_t* expert_ids = nullptr;  // [pairs]: derive items from the ids (pairs <= kLocalPlanMaxPairs)
  int experts = 0;
  int tokens_per_item = 1;
  int programmatic = 0;  // launched as a programmatic dependent of the kernel before (launch.hpp)
};

// Set on the down pass (out non-null): its finishing blocks also combine the k slots of each token.
struct PassCombine {
  void* out = nullptr;                  // [tokens][H] in out_dtype
  DType out_dtype = DType::f32;
  const float* probs = nullptr;         // [tokens][top_k]
  const int32_t* expert_ids = nullptr;  // [tokens][top_k]: which slots are routed
  int32_t* counters = nullptr;          // [tokens][finish groups], zeroed by the routing kernel
  int64_t tokens = 0;
  int experts = 0;
};

// A block's work item: `count` (0: the block has none) pairs of `expert` at positions first ..
// first + count - 1 of the stable order; pair[t] = the (token * top_k + slot) index of position first + t.
struct PassItem {
  int expert, first, count;
  int pair[kMaxPassItemPairs];
};

// Fills `item` (shared memory) for work item `item_index`; every thread of the block calls it and
// sees the result. Needs blockDim.x >= kLocalPlanMaxPairs when routing.expert_ids is set.
__device__ inline void find_pass_item(const PassRouting& routing, const int32_t* items, const int32_t* num_items,
                                      const int32_t* order, int pairs, int item_index, PassItem& item) {
  __shared__ int ids[kLocalPlanMaxPairs];     // routed ids, -1 for skipped slots
  __shared__ int chunks[kLocalPlanMaxPairs];  // at an expert's first pair: its item count
  if (threadIdx.x == 0) item.count = 0;
  if (routing.expert_ids == nullptr) {  // the routing kernel's plan
    wait_for_predecessor();
    if (threadIdx.x == 0 && item_index < *num_items) {
      const int32_t* it = items + static_cast<int64_t>(item_index) * kWorkItemInts;
      item.expert = it[0];
      item.first = it[1];
      item.count = it[2];
    }
    __syncthreads();
    // One thread per pair: the order loads go out together, not one after another in thread 0.
    if (static_cast<int>(threadIdx.x) < item.count) item.pair[threadIdx.x] = order[item.first + threadIdx.x];
    __syncthreads();
    return;
  }
  const int p = threadIdx.x, m = routing.tokens_per_item;
  int id = -1;
  if (p < pairs) {
    id = routing.expert_ids[p];
    if (id < 0 || id >= routing.experts) id = -1;  // skipped (bad ids are flagged by the routing kernel)
    ids[p] = id;
  }
  __syncthreads();
  int before = 0, same = 0, same_before = 0;  // routed pairs of smaller experts; of this one; of it before p
  if (id >= 0) {
#pragma unroll 4
    for (int q = 0; q < pairs; ++q) {
      const int v = ids[q];
      before += v >= 0 && v < id;
      same += v == id;
      same_before += v == id && q < p;
    }
    chunks[p] = same_before == 0 ? (same + m - 1) / m : 0;
  }
  __syncthreads();
  if (id >= 0) {
    int items_before = 0;  // items of the smaller experts
#pragma unroll 4
    for (int q = 0; q < pairs; ++q) {
      const int v = ids[q];
      if (v >= 0 && v < id) items_before += chunks[q];
    }
    const int chunk = same_before / m;
    if (items_before + chunk == item_index) {
      const int t = same_before - chunk * m;
      item.pair[t] = p;
      if (t == 0) {
        item.expert = id;
        item.first = before + same_before;
        item.count = min(m, same - same_before);
      }
    }
  }
  __syncthreads();
}

// Slots whose ids (routed_slots) or outputs (combine_completed_tokens) one thread loads before it
// uses them: the loads go out together instead of one dependent round trip per slot (v16's pass
// trace: the down pass's combining blocks took 4-6 us at one token).
inline constexpr int kSlotLoadBatch = 8;

// Routed slots of token `token` (called by one thread).
__device__ inline int routed_slots(const PassCombine& c, int64_t token, int top_k) {
  int routed = 0;
  for (int j0 = 0; j0 < top_k; j0 += kSlotLoadBatch) {
    int id[kSlotLoadBatch];
#pragma unroll
    for (int u = 0; u < kSlotLoadBatch; ++u) id[u] = j0 + u < top_k ? c.expert_ids[token * top_k + j0 + u] : -1;
#pragma unroll
    for (int u = 0; u < kSlotLoadBatch; ++u) routed += id[u] >= 0 && id[u] < c.experts;
  }
  return routed;
}

// Output rows of tokens with no routed slot are zero; no finishing block would write them. The
// blocks of one column group and split share the tokens (block b takes tokens b, b + stride, ...).
__device__ inline void zero_unrouted_rows(const PassCombine& c, int top_k, int64_t H, int block, int stride) {
  __shared__ int unrouted;
  for (int64_t token = block; token < c.tokens; token += stride) {
    __syncthreads();  // the previous token's `unrouted` is read by all
    if (threadIdx.x == 0) unrouted = routed_slots(c, token, top_k) == 0;
    __syncthreads();
    if (unrouted)
      for (int64_t n = threadIdx.x; n < H; n += blockDim.x) store_from_float(c.out, token * H + n, c.out_dtype, 0.0f);
  }
}

// Called by every thread of a down-pass finishing block after it wrote y[pair[t]][col0 .. col0 +
// cols) for its item's pairs (y rows by slot, token * top_k + j): counts them per token and finish
// group, and the block completing a token writes out[token][col0 .. col0 + cols) = sum over its
// routed slots j in order of probs * y. The tokens it completes are combined together, one (token,
// column) per thread; a slot's id, router weight and y load together (rows by position would need
// the slot's position first: one more dependent L2 round trip in the forward's last step).
__device__ inline void combine_completed_tokens(const PassCombine& c, const PassItem& item, int top_k,
                                                const float* y, int64_t H, int finish_group,
                                                int num_finish_groups, int64_t col0, int cols) {
  static_assert(kMaxPassItemPairs <= 32, "one lane per pair");
  __shared__ int complete[kMaxPassItemPairs];  // tokens this block completes, packed
  __shared__ int num_complete;
  __threadfence();  // this block's y is visible before its counts are
  __syncthreads();
  if (threadIdx.x < 32) {  // one lane per pair: the atomics go out together
    const int t = threadIdx.x;
    int token = -1;
    if (t < item.count) {
      token = item.pair[t] / top_k;
      const int done =
          atomicAdd(&c.counters[static_cast<int64_t>(token) * num_finish_groups + finish_group], 1);
      if (done != routed_slots(c, token, top_k) - 1) token = -1;
    }
    const unsigned completing = __ballot_sync(0xffffffffu, token >= 0);
    if (token >= 0) complete[__popc(completing & ((1u << t) - 1u))] = token;
    if (t == 0) num_complete = __popc(completing);
  }
  __syncthreads();
  const int n = num_complete;
  if (n == 0) return;
  __threadfence();  // the other blocks' y, published before their counts
  for (int i = threadIdx.x; i < n * cols; i += blockDim.x) {
    const int64_t token = complete[i / cols];
    const int col = i % cols;
    const int64_t slot0 = token * top_k;
    float sum = 0.0f;
    for (int j0 = 0; j0 < top_k; j0 += kSlotLoadBatch) {
      int32_t id[kSlotLoadBatch];
      float prob[kSlotLoadBatch], value[kSlotLoadBatch];
#pragma unroll
      for (int u = 0; u < kSlotLoadBatch; ++u) {
        const int64_t slot = slot0 + j0 + u;
        const bool in_token = j0 + u < top_k;
        id[u] = in_token ? c.expert_ids[slot] : -1;
        prob[u] = in_token ? c.probs[slot] : 0.0f;
        value[u] = in_token ? __ldcg(&y[slot * H + col0 + col]) : 0.0f;  // unused unless routed
      }
#pragma unroll
      for (int u = 0; u < kSlotLoadBatch; ++u)
        if (id[u] >= 0 && id[u] < c.experts) sum = fmaf(prob[u], value[u], sum);
    }
    store_from_float(c.out, token * H + col0 + col, c.out_dtype, sum);
  }
}

}  // namespace tmoe::cuda

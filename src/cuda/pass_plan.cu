// The launch planner (pass_plan.hpp): its cost model's constants, each with the measurement or the
// guess behind it, plan_pass and plan_items.
#include "pass_plan.hpp"

#include <cmath>

#include "routing.hpp"

namespace tmoe::cuda {
namespace {

// A block's fixed work (staging, group sums, finish test) in k-tile rows of its main loop. CUDA-core
// kernel: ncu on v6 counted ~1400 instructions per thread outside the decode steps, ~3 steps of 4
// rows. Tensor-core kernel: measured (H100, one run, each value twice, us; `tmoe bench --tokens
// 1,2,4 --grouped-min-tokens 1000000000` with the constant overridden):
//   fixed rows   qwen3 1 / 4 tokens   mixtral 1 / 2 / 4     glm 1 / 2 tokens   deepseek 1 / 4
//   16           30.6 / 74.2          130.9 / 209 / 322     65.4 / 116         136.2 / 436.5
//   40           30.3 / 72.0          129.3 / 209 / 319     62.9 / 115         --
//   96           30.1 / 72.1          128.8 / 219 / 329     62.8 / 118         140.6 / 431.2
//   256          30.4 / 72.2          152.4 / 221 / 325     62.8 / 117         --
// 40 is best or within 1% everywhere (glm 1 token -4%, qwen3 4 tokens -3% against 16).
inline constexpr int kFixedRowsCudaCore = 12;
// -DTMOE_FIXED_ROWS_TENSOR_CORE=N: another value, for A/B runs (scripts/gpu-ab).
#ifndef TMOE_FIXED_ROWS_TENSOR_CORE
#define TMOE_FIXED_ROWS_TENSOR_CORE 40
#endif
inline constexpr int kFixedRowsTensorCore = TMOE_FIXED_ROWS_TENSOR_CORE;
// A block of the dense 4-row variant (4 blocks per SM, 64 registers) against one of the 3-block
// kernel: more blocks at once, each slower (more warps share the schedulers; a few spills). From one
// H100 run (docs/notes-cuda.md, "v11"), 4 blocks against 3 at 1 / 4 / 16 tokens, us: mixtral 84 vs
// 93 / 219 vs 226, deepseek 88.5 vs 101 / 286 vs 313 / 874 vs 944, glm 44 vs 47 / 129 vs 141 /
// 334 vs 363, qwen3 47.5 vs 55 / 117 vs 133 at 4 / 16, but 27.4 vs 24.5 at 1 token (one wave both
// ways: the dense plan took 5 shorter splits). A block runs ~(4/3) / 1.1 = 1.2x as long when the
// SM is full (4/3 the warps, ~10% more throughput). Applied to the fixed work too: with it on the
// k-tile rows only, qwen3's 1-token down pass took the dense variant and was 1.5 us slower.
inline constexpr double kDenseBlockCost = 1.2;
// The dense 8-row variant (3 blocks per SM, 80 registers) against the 2-block one (128 registers):
// 1.5x the warps; assumed, like the 4-row pair, to run a block ~1.2x as long when the SM is full.
// -DTMOE_DENSE_8ROW_COST=N: another value for A/B runs (100: never the dense 8-row variant).
#ifndef TMOE_DENSE_8ROW_COST
#define TMOE_DENSE_8ROW_COST 1.2
#endif
inline constexpr double kDense8RowBlockCost = TMOE_DENSE_8ROW_COST;

// -DTMOE_PLANNER_EXPECTED_BUSY=1 (an A/B knob, off): plan_items' busy items are the expected ones
// (expected_busy_items) instead of min(items, pairs, experts), which counts every expert as hit once
// pairs >= experts (qwen3 at 16 tokens: 128 where ~83 are; v16 blamed part of the column groups'
// loss on it, v17's trace shows 984 of 1536 gate+up blocks working).
#ifndef TMOE_PLANNER_EXPECTED_BUSY
#define TMOE_PLANNER_EXPECTED_BUSY 0
#endif
inline constexpr bool kPlannerExpectedBusy = TMOE_PLANNER_EXPECTED_BUSY != 0;

// A down pass of one split finishes inside each block (projection.cuh, finishes_in_block); the
// blocks of every other down pass write partial sums, pass a counter, and the last one reloads
// them: a few dependent L2 round trips more, weighed as this many k-tile rows of each block's
// length. Unless its blocks fill less than half a wave: then the SMs' few warps leave memory
// bandwidth unused and the split plan wins anyway. Measured (H100, us, 0 -> 32, notes-cuda.md
// "v20"): qwen3 2 tokens 29.1 -> 26.4 and glm 1 token 39.1 -> 37.9 (both 0.65 waves of one split),
// qwen3 1 token 22.3 -> 23.0 (0.32 waves: the half-wave rule keeps its 3 splits). Gate+up blocks
// (gate and up are separate blocks) pass the counter or leave their finish to the down pass
// (cuda_moe.cu, kDeferFinishMaxWaves); their plans do not weigh it.
// -DTMOE_SPLIT_FINISH_ROWS=N: another weight, for A/B runs (0: the plans before the in-block finish).
#ifndef TMOE_SPLIT_FINISH_ROWS
#define TMOE_SPLIT_FINISH_ROWS 32
#endif
inline constexpr int kSplitFinishRows = TMOE_SPLIT_FINISH_ROWS;

}  // namespace

int64_t expected_busy_items(int64_t tokens, int top_k, int64_t experts, int tokens_per_item, int64_t max_items) {
  if (tokens <= 0 || experts <= 0) return 0;
  const int64_t pairs = tokens * top_k;
  // Each token routes to top_k distinct experts, uniformly: an expert is missed by one token with
  // probability 1 - k / E, by all of them with its T-th power.
  const double miss = std::max(0.0, 1.0 - static_cast<double>(top_k) / static_cast<double>(experts));
  const double hit = static_cast<double>(experts) * (1.0 - std::pow(miss, static_cast<double>(tokens)));
  const int64_t busy = std::max(static_cast<int64_t>(std::ceil(hit - 1e-9)), ceil_div(pairs, tokens_per_item));
  return std::min({busy, max_items, pairs});
}

ItemPlan plan_items(int64_t tokens, int top_k, int64_t experts, bool tensor_core) {
  ItemPlan p;
  const int64_t pairs = tokens * top_k;
  const double load = static_cast<double>(pairs) / static_cast<double>(experts);
  if (tensor_core) {
    // mma columns are nearly free: items of up to 4 rows cost a 1-row item's loop, so one item
    // takes all of an expert's pairs up to 16 (4, 8 or 16 rows: 1, 2 or 4 mma blocks).
    p.tokens_per_item = std::min(kMaxMmaItemTokens, load <= 2 ? 4 : load <= 6 ? 8 : 16);
    // An expert gets at most one pair per token (unless a token lists it twice: then it just runs
    // more items), so items of more rows than tokens only stage rows of zeros (1 token: 4 rows
    // staged for 1 used; the kernel keeps 4 rows per mma block either way).
    p.tokens_per_item = static_cast<int>(std::min<int64_t>(p.tokens_per_item, std::max<int64_t>(tokens, 1)));
  } else {
    // Rows per item from the expected pairs per expert: with one pair per expert on average
    // (qwen3 at 8 tokens), items of 4 rows would run the 168-register kernel at 3 blocks per SM
    // for nothing; an expert that does get several pairs then runs several items (the extra
    // reads of its tiles hit L2: items of one expert run side by side).
    p.tokens_per_item = tokens <= 1 || load <= 0.5 ? 1 : tokens <= 2 || load <= 1.5 ? 2 : kMaxItemTokens;
  }
  p.max_items = max_work_items(pairs, static_cast<int>(experts), p.tokens_per_item);
  p.busy = kPlannerExpectedBusy ? expected_busy_items(tokens, top_k, experts, p.tokens_per_item, p.max_items)
                                : std::min<int64_t>(p.max_items, std::min<int64_t>(pairs, experts));
  return p;
}

PassPlan plan_pass(const DeviceProjection& w, int nproj, int min_group_size, int hadamard_out, int stage_bytes,
                   bool affine, bool tensor_core, int64_t busy_items, int tokens_per_item,
                   const Occupancy& occupancy) {
  PassPlan p;
  const int64_t tiles_k = w.tiles_k();
  const int cols_per_block = tensor_core ? kMmaColsPerBlock : kColsPerBlock;
  p.col_groups = static_cast<int>(ceil_div(w.tiles_n() * kTileDim, cols_per_block));
  p.finish_cols = std::max(cols_per_block, hadamard_out);
  p.num_finish_groups = static_cast<int>(ceil_div(p.col_groups, p.finish_cols / cols_per_block));
  // K ranges hold whole Hadamard blocks, and for the tensor-core kernel whole units (4 k-tiles).
  const int align = std::max(tensor_core ? kQuadTiles : 1, w.hadamard / kTileDim);
  auto shared_of = [&](int64_t kr) {
    return tensor_core ? mma_pass_shared_bytes(tokens_per_item, static_cast<int>(kr), p.finish_cols, min_group_size)
                       : pass_shared_bytes(tokens_per_item, static_cast<int>(kr), p.finish_cols, stage_bytes);
  };
  // CUDA-core: at most 128 k-tile rows per block (staged activations <= tokens_per_item x 8 KB).
  // Tensor-core: up to 256 while the staged rows fit the shared memory limit.
  int64_t max_kr = std::max<int64_t>(align, (tensor_core ? 256 : 128) / align * align);
  while (tensor_core && max_kr > align && shared_of(max_kr) > kMaxPassShared) max_kr -= align;
  const int64_t per_split = std::max<int64_t>(1, busy_items * p.col_groups * nproj);
  const int fixed_rows = tensor_core ? kFixedRowsTensorCore : kFixedRowsCudaCore;
  // Pick the split count whose waves of blocks cost least: ceil(blocks / blocks-at-once) times a
  // block's length (its k-tile rows plus its fixed work). Whole waves matter: a last wave of a few
  // blocks costs as much as a full one (ncu on v4: 2.26 waves).
  const int64_t ks_min = ceil_div(tiles_k, max_kr);
  const int64_t ks_max = std::max(ks_min, std::min<int64_t>(ks_min + 64, ceil_div(tiles_k, 4)));
  // 4- and 8-row tensor-core items weigh the dense kernel variant too (ties go to the other one).
  const bool try_dense = tensor_core && mma_item_rows(tokens_per_item) <= 8;
  double best = 0;
  bool first = true;
  for (int dense = 0; dense <= (try_dense ? 1 : 0); ++dense)
    for (int64_t ks = ks_min; ks <= ks_max; ++ks) {
      const int64_t kr = ceil_div(ceil_div(tiles_k, ks), align) * align;
      const int64_t splits = ceil_div(tiles_k, kr);
      const size_t shared = shared_of(kr);
      const int64_t at_once =
          static_cast<int64_t>(occupancy.blocks_per_sm(tensor_core, tokens_per_item, affine, shared, dense != 0)) *
          occupancy.sms;
      const double block_cost =
          dense ? (mma_item_rows(tokens_per_item) == 4 ? kDenseBlockCost : kDense8RowBlockCost) : 1.0;
      const int64_t blocks = per_split * splits;
      const bool in_block_finish =
          tensor_core && finishes_in_block(nproj, static_cast<int>(splits), p.finish_cols) && 2 * blocks >= at_once;
      const int finish_rows = tensor_core && nproj == 1 && !in_block_finish ? kSplitFinishRows : 0;
      const double cost =
          static_cast<double>(ceil_div(blocks, at_once)) * (kr + fixed_rows + finish_rows) * block_cost;
      if (first || cost < best) {
        first = false;
        best = cost;
        p.k_tiles_per_block = static_cast<int>(kr);
        p.k_splits = static_cast<int>(splits);
        p.shared = shared;
        p.dense = dense != 0;
      }
    }
  return p;
}

}  // namespace tmoe::cuda

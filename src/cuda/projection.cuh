// The decode / small-batch projection pass: y = T(T(a . su) . Q) . sv for the rows of one work item
// (up to a few routed pairs of one expert), fp32 accumulation. Two kernels share the staging of the
// activations and the finish; they differ in the hot loop:
//
// Tensor-core kernel (affine grids, grid[i] = grid0 + step * i; v8): reads the FRAGMENT layout
// (fragment_layout.hpp). Grid: x = work item, y = column group of kMmaColsPerBlock columns,
// z = projection * k_splits + split. 8 warps; warp w owns n-tile (8 y + w) over the block's K range
// and walks its units (4 k-tiles each) front to back, one contiguous stream, kUnitsInFlight units of
// loads ahead in registers. A unit decodes (decode_unit_pairs) into the A operand of
// mma.m16n8k16 bf16 (rows = the 16 columns n, codebook indices plus the decode bias, exactly);
// B = the item's activations, each row split x = hi + lo (two bf16, |x - hi - lo| <= 2^-17 |x|) so a
// row takes 2 of the 8 mma columns: 4 rows per 8-column block, 1, 2 or 4 blocks (items of up to 4, 8
// or 16 rows). Products are exact and the sums fp32. Per scale group the warp flushes
// scale[g][n] * (acc + (grid0/step - bias) * sum_g (hi + lo)) into fp32 totals; step multiplies the
// partial sums.
//
// CUDA-core kernel (any grid; v1..v7): reads the tile layout (FORMAT.md order, n-tile-major).
// Grid as above with kColsPerBlock columns; 4 warps; lane = (k-tile row kq, n-tile nt, half) so one
// warp step reads 4 rows of 4 consecutive tiles through a cp.async ring, and each thread decodes 8
// whole tile columns in registers, one FMA per weight and row.
//
// Both: a block stages its K range of the item's activations in shared memory (times su, then the
// Hadamard transform) and writes its partial sums; the last block of a finish group (an integer
// counter, so the float sums keep a fixed order) adds the splits in order, applies the output
// Hadamard and sv, and SwiGLU for gate+up.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "device_weights.cuh"
#include "pass_routing.cuh"
#include "routing.hpp"
#include "tmoe/half.hpp"

namespace tmoe::cuda {

inline constexpr int kProjWarps = 4;                    // warps per block
inline constexpr int kProjThreads = kProjWarps * 32;
inline constexpr int kRowsPerStep = 4;                  // k-tile rows per warp step
inline constexpr int kTilesPerStepRow = 4;              // n-tiles per warp step
inline constexpr int kColsPerBlock = kTilesPerStepRow * kTileDim;  // 64
inline constexpr int kMaxItemTokens = 4;                // rows per work item (register budget)
// Tensor-core kernel: 8 warps, one n-tile each; items of up to kMaxMmaItemTokens rows (4 per
// 8-column mma block, hi and lo halves of each row). Items hold at most kMaxPassItemPairs pairs
// (pass_routing.cuh's PassItem, 16): a variant with more rows than that would never run, so it is
// not built.
inline constexpr int kMmaWarps = 8;
inline constexpr int kMmaThreads = kMmaWarps * 32;
inline constexpr int kMmaColsPerBlock = kMmaWarps * kTileDim;  // 128
inline constexpr int kMmaRowsPerBlock = 4;                     // item rows per 8-column mma block
inline constexpr int kMaxMmaItemTokens = kMaxPassItemPairs < 16 ? kMaxPassItemPairs : 16;
// Whether the variant with CB mma column blocks (items of up to 4 CB rows) is built.
template <int CB>
inline constexpr bool kMmaBlocksBuilt = CB == 1 || (CB / 2) * kMmaRowsPerBlock < kMaxMmaItemTokens;
// Blocks per SM of the dense variant of the 4-row tensor-core kernel (one fewer for the other).
inline constexpr int kMmaDenseBlocks = 4;
inline constexpr int kMaxHadamard = 256;                // largest Hadamard block the passes take
// A stage of a warp's cp.async ring: 4 k-tile rows of 4 tiles and their 4 x 64 fp16 scales.
// 3 stages (2 steps in flight per warp) keep a block's shared memory small enough for 6 blocks
// per SM at one row per item (ncu on v4: 60 KB per block, 3 blocks per SM, 16% occupancy).
TMOE_HD constexpr int ring_stage_bytes(int bits) { return 4 * 4 * tile_bytes(bits) + 4 * 64 * 2; }
inline constexpr int kStages = 3;

// One projection as a pass sees it. `affine`: grid[i] == grid0 + step * i (checked at upload), so
// the kernel decodes the index itself and folds grid0 into a per-tile sum of the activations.
struct PassProjection {
  DeviceProjection w;
  int affine = 0;
  float grid0_over_step = 0;  // grid[0] / step
  float step = 1;             // multiplies each partial sum (1 on the general path)
};

// The tensor-core kernel takes a pass when every projection of it has an affine grid.
inline bool tensor_core_pass(const PassProjection* proj, int nproj) {
  for (int p = 0; p < nproj; ++p)
    if (!proj[p].affine) return false;
  return true;
}

// A down pass of one K split whose finish group is one tensor-core block's columns finishes inside
// each block (projection.cu, mma_projection_block): the block holds every sum of its outputs, so it
// skips the partial stores, a fence, the counter's atomic and the partial loads. The planner
// (pass_plan.cu) weighs it, the kernel takes it: one rule for both. -DTMOE_SINGLE_SPLIT_FINISH=0
// sends such passes through the counter, for A/B runs.
#ifndef TMOE_SINGLE_SPLIT_FINISH
#define TMOE_SINGLE_SPLIT_FINISH 1
#endif
TMOE_HD constexpr bool finishes_in_block(int nproj, int k_splits, int finish_cols) {
  return TMOE_SINGLE_SPLIT_FINISH != 0 && nproj == 1 && k_splits == 1 && finish_cols == kMmaColsPerBlock;
}

// Deferred gate+up finish (PassArgs::defer_finish): the gate+up blocks only write their partial
// sums, with no counter and no finishing block, and the down pass forms h while it stages its
// activations: per value the splits' sums in split order, sv and SwiGLU, exactly the finishing
// block's operations (so the output is bitwise the same either way). It takes the finishing
// blocks' tail off a one-wave gate+up pass (~3 us at one token, notes-cuda.md "v17"); the down
// blocks pay 2 x splits loads per h value instead of one. Only without an output Hadamard on
// gate and up (a transform across columns would need whole blocks of columns per staging thread).
TMOE_HD constexpr bool can_defer_gate_up_finish(int gate_hadamard, int up_hadamard) {
  return gate_hadamard == 0 && up_hadamard == 0;
}
// The down-pass kernels that can form h so, and how many splits' partial sums a staging thread
// loads at once there (2 x that many float4 loads in flight; 0: not built). The CUDA-core kernel
// and the 2- and 3-bit tensor-core kernels for items of up to 4 rows (a one-wave gate+up pass has
// few pairs) load 2 splits at once: 4 made ptxas spill inside the 3-bit dense 1-row kernel's main
// loop (24 local loads/stores per iteration). The 4-bit ones load 1: at 2 they spilled in the main
// loop (6 per iteration; an H100: mixtral 4 tokens 3% slower than without the deferred staging,
// while deferring is 4-7% faster at 1 token). Not built into the 8- and 16-row tensor-core kernels,
// whose register allocation it disturbed (mixtral 16 tokens, which never defers, ran ~2% slower:
// notes-cuda.md "v21"), nor into the mixed-bit kernel (bits 0), which only gate+up passes launch.
// `bits` is the kernel's. -DTMOE_DEFERRED_SPLIT_BATCH=N: another batch for 2 and 3 bits (A/B runs).
#ifndef TMOE_DEFERRED_SPLIT_BATCH
#define TMOE_DEFERRED_SPLIT_BATCH 2
#endif
TMOE_HD constexpr int deferred_split_batch(bool tensor_core, int tokens_per_item, int bits) {
  if (!tensor_core) return TMOE_DEFERRED_SPLIT_BATCH;
  if (tokens_per_item > kMmaRowsPerBlock || bits == 0) return 0;
  return bits == 4 ? 1 : TMOE_DEFERRED_SPLIT_BATCH;
}
TMOE_HD constexpr bool deferred_staging_built(bool tensor_core, int tokens_per_item, int bits) {
  return deferred_split_batch(tensor_core, tokens_per_item, bits) > 0;
}
// What the down pass reads to form h when gate+up deferred its finish.
struct GateUpSums {
  const float* partial = nullptr;       // gate+up's partial sums [2][k_splits][P][I]; null: h is src
  int k_splits = 1;
  const uint16_t* sv[2] = {nullptr, nullptr};  // gate's and up's sv, [E][I]
};

struct PassArgs {
  PassProjection proj[2];
  int nproj = 1;           // 2: gate and up (SwiGLU in the finish), 1: down
  // Input rows: x rows by token (row = order[pos] / top_k) or h rows by position (row = pos).
  const void* src = nullptr;
  DType src_dtype = DType::f32;
  int src_by_token = 1;
  int top_k = 1;
  const int32_t* items = nullptr;
  const int32_t* num_items = nullptr;
  const int32_t* order = nullptr;
  int64_t pairs = 0;            // P: rows of partial and dst
  int k_splits = 1;
  int k_tiles_per_block = 1;    // kr
  int col_groups = 1;
  int finish_groups_cols = 64;  // columns one finishing block owns (a multiple of Hadamard blocks)
  int stage_bytes = ring_stage_bytes(4);  // ring stage size: the largest bits of the pass
  int num_finish_groups = 1;
  float* partial = nullptr;     // [nproj][k_splits][P][N]
  int32_t* counters = nullptr;  // [max items][num_finish_groups]
  float* dst = nullptr;         // [P][N]: h for gate+up (rows by position), the pair outputs for down (by slot)
  int mma_dense = 0;            // 4- and 8-row tensor-core items: the variant with more blocks per SM
  int defer_finish = 0;         // gate+up: write the partial sums and end (GateUpSums)
  GateUpSums gate_up_sums;      // down: form h from these while staging (partial null: read src)
  PassRouting routing;          // where blocks find their work item (pass_routing.cuh)
  PassCombine combine;          // down pass: the combine over each token's slots, fused
};

// Shared memory (floats) the pass needs for `tokens` rows per item.
inline size_t pass_shared_bytes(int tokens, int k_tiles_per_block, int finish_cols, int stage_bytes) {
  const size_t floats = static_cast<size_t>(tokens) * k_tiles_per_block * kTileDim  // activations
                        + static_cast<size_t>(tokens) * k_tiles_per_block            // tile sums
                        + static_cast<size_t>(kProjWarps) * kColsPerBlock * tokens   // warp partials
                        + 16                                                         // grid
                        + 2 * static_cast<size_t>(tokens) * finish_cols              // finish rows
                        + 4;                                                         // flags
  return floats * sizeof(float) + 16 + static_cast<size_t>(kProjWarps) * kStages * stage_bytes;
}

// Scale groups a K range of kr k-tiles can touch (it may start inside a group).
TMOE_HD constexpr int mma_block_groups(int k_tiles_per_block, int group_size) {
  return (k_tiles_per_block - 1) / (group_size / kTileDim) + 2;
}
// Floats of the tensor-core kernel's shared data for `rows` staged rows (its flag follows): the
// activations [rows][16 kr + 16], tile sums and group sums [rows][kr], and the block's scales as
// fp32 pairs [groups][8 n-tiles][8 lanes g][2] (mma_block_groups for the pass's smallest group size); the
// finish rows reuse the space after the main loop.
TMOE_HD constexpr int mma_shared_floats(int rows, int k_tiles_per_block, int finish_cols, int min_group_size) {
  const int staging = rows * (k_tiles_per_block * kTileDim + kTileDim) + 2 * rows * k_tiles_per_block +
                      mma_block_groups(k_tiles_per_block, min_group_size) * kMmaColsPerBlock;
  const int finishing = 2 * rows * finish_cols;
  return staging > finishing ? staging : finishing;
}
// Shared memory of the tensor-core kernel for items of up to `tokens` rows (it stages exactly those
// rows: the B lanes of the kernel's other rows read the last staged row, into output columns that
// are never written).
size_t mma_pass_shared_bytes(int tokens, int k_tiles_per_block, int finish_cols, int min_group_size);
// Rows of the tensor-core kernel variant for items of `tokens` rows (4 per mma block): 4, 8 or 16.
inline int mma_item_rows(int tokens) { return tokens <= 4 ? 4 : tokens <= 8 ? 8 : 16; }

// Launches the pass for the rows of every work item: the tensor-core kernel when
// tensor_core_pass(args.proj, args.nproj), else the CUDA-core kernel (template dispatch on tokens
// per item and on its affine fast path). The plan (col_groups, shared bytes) must be the chosen
// kernel's.
void launch_projection_pass(const PassArgs& args, int tokens_per_item, int64_t max_items,
                            size_t shared_bytes, cudaStream_t stream);
// Raises the dynamic shared memory limit of every instantiation (once per process and device).
void prepare_projection_kernels();
// Blocks of the pass kernel that fit on one SM at once with this much shared memory.
int projection_blocks_per_sm(int tokens_per_item, bool affine, size_t shared_bytes);
// dense: the 4- or 8-row kernel's variant with more blocks per SM (PassArgs::mma_dense).
int mma_projection_blocks_per_sm(int tokens_per_item, bool dense, size_t shared_bytes);

}  // namespace tmoe::cuda

// The decode / small-batch projection pass: y = T(T(a . su) . Q) . sv for the rows of one work item
// (up to kMaxItemTokens routed pairs of one expert), CUDA cores, fp32 accumulation.
//
// Grid: x = work item (fastest, so the chunks of one expert run together and share L2),
//       y = column group of kColsPerBlock output columns, z = projection * k_splits + split.
// A block stages its K range of the item's activations in shared memory (times su, then the
// Hadamard transform), then its 4 warps stream the packed tiles of that K range and column group:
// lane = (k-tile row kq, n-tile nt, half) so one warp step reads 4 rows of 4 consecutive tiles,
// and each thread loads 8 whole tile columns (16*bits bytes, bits x 16-byte loads) and decodes them
// in registers. Each block writes its partial sums; the last block of a finish group (an integer
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
  float* dst = nullptr;         // [P][N]: h for gate+up, the pair outputs for down
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

// Launches the pass for the rows of every work item (template dispatch on tokens per item and on
// the affine fast path).
void launch_projection_pass(const PassArgs& args, int tokens_per_item, int64_t max_items,
                            size_t shared_bytes, cudaStream_t stream);
// Raises the dynamic shared memory limit of every instantiation (once per process and device).
void prepare_projection_kernels();
// Blocks of the pass kernel that fit on one SM at once with this much shared memory.
int projection_blocks_per_sm(int tokens_per_item, bool affine, size_t shared_bytes);

}  // namespace tmoe::cuda

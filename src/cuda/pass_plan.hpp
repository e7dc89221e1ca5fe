// The launch planner of the decode / small-batch passes: for one pass, the K split, the kernel
// variant and the shared memory, chosen by a cost model of whole waves of blocks (plan_pass); and
// the work items of a forward (plan_items). Host code only: CudaMoe calls it per forward shape, and
// tests/cuda/test_pass_plan.cu checks its rules without a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "device_weights.cuh"
#include "projection.cuh"

namespace tmoe::cuda {

// Launch geometry of one projection pass; a function of (T, k) and the shape only, so a captured
// graph replays the same launches.
struct PassPlan {
  int k_splits = 1, k_tiles_per_block = 1, col_groups = 1, finish_cols = kColsPerBlock,
      num_finish_groups = 1;
  bool dense = false;  // 4- or 8-row tensor-core items: the kernel variant with more blocks per SM
  size_t shared = 0;
};

// Blocks of the pass kernels resident per SM: the register limit (queried once per kernel), then
// shared memory (the device's per-SM pool, 1 KB of it reserved per block).
struct Occupancy {
  int sms = 132;
  size_t shared_per_sm = 228 * 1024;
  int register_blocks[3][2] = {};   // CUDA-core kernel: [tokens per item 1, 2, 4][affine]
  int mma_register_blocks[3] = {};  // tensor-core kernel: [item rows 4, 8, 16]
  int mma_dense_register_blocks[2] = {};  // the dense variants of its 4- and 8-row kernels
  int blocks_per_sm(bool tensor_core, int tokens_per_item, bool affine, size_t shared, bool dense = false) const {
    const int rows = mma_item_rows(tokens_per_item);
    const int by_registers =
        tensor_core ? (dense && rows <= 8 ? mma_dense_register_blocks[rows == 4 ? 0 : 1]
                                          : mma_register_blocks[rows == 4 ? 0 : rows == 8 ? 1 : 2])
                    : register_blocks[tokens_per_item == 1 ? 0 : tokens_per_item == 2 ? 1 : 2][affine];
    const int by_shared = static_cast<int>(shared_per_sm / (shared + 1024));
    return std::max(1, std::min(by_registers, by_shared));
  }
};

// The tensor-core kernel's dynamic shared memory limit (prepare_projection_kernels raises it).
inline constexpr size_t kMaxPassShared = 96 * 1024;

// The work items of a forward's decode passes: rows per item, the most items the routing can make,
// and the items the planner expects to hold pairs.
struct ItemPlan {
  int tokens_per_item = 1;
  int64_t max_items = 0, busy = 0;
};
// tensor_core: both passes run the tensor-core kernel (items of 4, 8 or 16 rows), else the
// CUDA-core one (1, 2 or 4).
ItemPlan plan_items(int64_t tokens, int top_k, int64_t experts, bool tensor_core);
// The work items expected to hold pairs when tokens route uniformly to top_k distinct experts: the
// expected experts hit, at least pairs / tokens_per_item, at most max_items and the pairs.
// plan_items uses it with -DTMOE_PLANNER_EXPECTED_BUSY=1.
int64_t expected_busy_items(int64_t tokens, int top_k, int64_t experts, int tokens_per_item, int64_t max_items);

// w: the pass's first projection (K, N); min_group_size: the smallest scale group of its
// projections; busy_items: the work items expected to hold pairs.
PassPlan plan_pass(const DeviceProjection& w, int nproj, int min_group_size, int hadamard_out, int stage_bytes,
                   bool affine, bool tensor_core, int64_t busy_items, int tokens_per_item,
                   const Occupancy& occupancy);

}  // namespace tmoe::cuda

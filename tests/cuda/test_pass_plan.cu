// The decode passes' launch planner (src/cuda/pass_plan.hpp), on the host: no GPU needed, so these
// run in CI too. An H100-like occupancy (132 SMs, 228 KB of shared memory per SM; 3 / 2 / 2 blocks
// per SM for the 4- / 8- / 16-row tensor-core kernels, 4 / 3 for their dense variants) stands in
// for the one CudaMoe queries from the device.
//
// Rules checked on every plan: the K splits cover K with no empty split and whole units (4 k-tiles),
// and the shared memory is what the kernel will lay out (mma_pass_shared_bytes for the plan's rows,
// K range, finish columns and group size) and within the kernel's limit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda/pass_plan.hpp"

namespace tmoe::testing {
namespace {

using cuda::PassPlan;

cuda::Occupancy h100_like() {
  cuda::Occupancy o;
  o.sms = 132;
  o.shared_per_sm = 228 * 1024;
  for (auto& row : o.register_blocks) row[0] = row[1] = 3;
  o.mma_register_blocks[0] = 3;
  o.mma_register_blocks[1] = 2;
  o.mma_register_blocks[2] = 2;
  o.mma_dense_register_blocks[0] = 4;
  o.mma_dense_register_blocks[1] = 3;
  return o;
}

cuda::DeviceProjection projection(int64_t K, int64_t N, int group_size = 128, int hadamard = 0, int bits = 3) {
  cuda::DeviceProjection w;
  w.K = K;
  w.N = N;
  w.group_size = group_size;
  w.hadamard = hadamard;
  w.bits = bits;
  w.experts = 8;
  return w;
}

struct PassCase {
  cuda::DeviceProjection w;
  int nproj = 2;
  int tokens_per_item = 1;
  int64_t busy = 8;
  bool tensor_core = true;
};

PassPlan plan(const PassCase& c) {
  return cuda::plan_pass(c.w, c.nproj, c.w.group_size, c.w.hadamard, cuda::ring_stage_bytes(c.w.bits), true,
                         c.tensor_core, c.busy, c.tokens_per_item, h100_like());
}

std::string describe(const PassCase& c, const PassPlan& p) {
  return "K=" + std::to_string(c.w.K) + " N=" + std::to_string(c.w.N) + " group=" + std::to_string(c.w.group_size) +
         " nproj=" + std::to_string(c.nproj) + " rows=" + std::to_string(c.tokens_per_item) +
         " busy=" + std::to_string(c.busy) + (c.tensor_core ? "" : " cuda-cores") + " -> " +
         std::to_string(p.k_splits) + " splits x " + std::to_string(p.k_tiles_per_block) + " k-tiles, " +
         std::to_string(p.col_groups) + " column groups, " + std::to_string(p.shared) + " bytes shared" +
         (p.dense ? ", dense" : "");
}

void check_rules(const PassCase& c, const PassPlan& p) {
  SCOPED_TRACE(describe(c, p));
  const int64_t tiles_k = c.w.tiles_k();
  EXPECT_GE(static_cast<int64_t>(p.k_splits) * p.k_tiles_per_block, tiles_k);
  EXPECT_LT(static_cast<int64_t>(p.k_splits - 1) * p.k_tiles_per_block, tiles_k);  // no empty split
  if (c.tensor_core) {
    EXPECT_EQ(p.k_tiles_per_block % cuda::kQuadTiles, 0);
    EXPECT_EQ(p.col_groups, (c.w.N + cuda::kMmaColsPerBlock - 1) / cuda::kMmaColsPerBlock);
    EXPECT_EQ(p.shared, cuda::mma_pass_shared_bytes(c.tokens_per_item, p.k_tiles_per_block, p.finish_cols,
                                                    c.w.group_size));
    EXPECT_LE(p.shared, cuda::kMaxPassShared);
  }
}

// The model shapes' passes (gate+up: K = H, N = I, two projections; down: K = I, N = H) and two
// odd ones (partial column groups, groups of 48 and 16, Hadamard 128).
std::vector<PassCase> cases() {
  struct Shape {
    int64_t H, I;
    int group, hadamard;
  };
  const Shape shapes[] = {{2048, 768, 128, 0},  {4096, 14336, 128, 0}, {7168, 2048, 128, 0},
                          {4096, 1408, 128, 0}, {1024, 656, 48, 0},    {640, 4112, 16, 128}};
  std::vector<PassCase> out;
  for (const Shape& s : shapes)
    for (int rows : {1, 4, 8, 16})
      for (int64_t busy : {1, 8, 64})
        for (bool down : {false, true})
          for (bool tensor_core : {true, false}) {
            if (!tensor_core && rows > cuda::kMaxItemTokens) continue;
            PassCase c;
            c.w = down ? projection(s.I, s.H, s.group, s.hadamard) : projection(s.H, s.I, s.group, s.hadamard);
            c.nproj = down ? 1 : 2;
            c.tokens_per_item = rows;
            c.busy = busy;
            c.tensor_core = tensor_core;
            out.push_back(c);
          }
  return out;
}

TEST(PassPlan, SplitsCoverKAndSharedMemoryFits) {
  for (const PassCase& c : cases()) check_rules(c, plan(c));
}

// Rows per work item: 4-16 for the tensor-core kernel, never more than the tokens (but at least the
// kernel's 4-row minimum's worth of one row), 1, 2 or 4 for the CUDA-core one; the busy items never
// exceed the items, the pairs or the experts.
TEST(PassPlan, WorkItems) {
  for (int64_t T : {1, 2, 3, 8, 16, 64, 1000})
    for (auto [E, k] : {std::pair<int64_t, int>{128, 8}, {8, 2}, {256, 8}})
      for (bool tensor_core : {true, false}) {
        const cuda::ItemPlan p = cuda::plan_items(T, k, E, tensor_core);
        SCOPED_TRACE("T=" + std::to_string(T) + " E=" + std::to_string(E) + " k=" + std::to_string(k));
        if (tensor_core) {
          EXPECT_LE(p.tokens_per_item, std::max<int64_t>(T, 1));
          EXPECT_LE(p.tokens_per_item, cuda::kMaxMmaItemTokens);
        } else {
          EXPECT_TRUE(p.tokens_per_item == 1 || p.tokens_per_item == 2 || p.tokens_per_item == cuda::kMaxItemTokens);
        }
        EXPECT_GE(p.max_items * p.tokens_per_item, T * k);  // room for every pair
        EXPECT_LE(p.busy, p.max_items);
        EXPECT_LE(p.busy, std::min<int64_t>(T * k, E));
      }
}

// Down passes that finish inside their blocks (one split, one block per finish group): the planner
// prefers them over a split plan of the same waves, but not when their blocks would fill less than
// half a wave (qwen3's down pass: K = 768, N = 2048). Gate+up passes always pass the counter, so
// the rule never changes their plans.
TEST(PassPlan, InBlockFinish) {
  PassCase down;
  down.w = projection(768, 2048);
  down.w.experts = 128;
  down.nproj = 1;
  down.tokens_per_item = 2;  // 2 tokens: 16 items x 16 column groups, 256 blocks, 0.65 waves
  down.busy = 16;
  EXPECT_EQ(plan(down).k_splits, 1);
  check_rules(down, plan(down));
  down.tokens_per_item = 1;  // 1 token: 8 items, 128 blocks (3 per SM): 0.32 waves, so 3 splits
  down.busy = 8;
  EXPECT_EQ(plan(down).k_splits, 3);
  check_rules(down, plan(down));
  PassCase gate_up = down;  // qwen3's gate+up at 2 tokens keeps the plan it had: 2 splits
  gate_up.w = projection(2048, 768);
  gate_up.nproj = 2;
  gate_up.tokens_per_item = 2;
  gate_up.busy = 16;
  EXPECT_EQ(plan(gate_up).k_splits, 2);
}

// The expected busy items (the planner's -DTMOE_PLANNER_EXPECTED_BUSY=1): top_k at one token, the
// expected experts hit by uniform routing (qwen3 at 16 tokens: 128 (1 - (120/128)^16) = 82.4), at
// least the full items' count, never more than the items or pairs; a Monte Carlo count of the experts
// hit agrees within a few percent.
TEST(PassPlan, ExpectedBusyItems) {
  EXPECT_EQ(cuda::expected_busy_items(1, 8, 128, 1, 8), 8);
  EXPECT_EQ(cuda::expected_busy_items(16, 8, 128, 4, 160), 83);
  EXPECT_EQ(cuda::expected_busy_items(16, 2, 8, 8, 12), 8);    // mixtral: every expert hit
  EXPECT_EQ(cuda::expected_busy_items(64, 2, 8, 16, 16), 8);   // pairs / rows = 8
  EXPECT_EQ(cuda::expected_busy_items(1000, 8, 128, 16, 628), 500);  // pairs / rows = 500 > 128 experts
  EXPECT_EQ(cuda::expected_busy_items(0, 8, 128, 1, 0), 0);
  std::mt19937_64 rng(7);
  for (auto [T, k, E] : {std::tuple<int, int, int>{16, 8, 128}, {4, 8, 256}, {32, 8, 128}}) {
    double hit = 0;
    constexpr int kTrials = 400;
    for (int trial = 0; trial < kTrials; ++trial) {
      std::vector<int> experts(E), seen(E, 0);
      for (int e = 0; e < E; ++e) experts[e] = e;
      for (int t = 0; t < T; ++t) {
        std::shuffle(experts.begin(), experts.end(), rng);
        for (int j = 0; j < k; ++j) seen[experts[j]] = 1;
      }
      hit += std::count(seen.begin(), seen.end(), 1);
    }
    const int64_t busy = cuda::expected_busy_items(T, k, E, 16, 1 << 20);
    EXPECT_NEAR(static_cast<double>(busy), hit / kTrials, 0.03 * hit / kTrials + 1) << "T=" << T << " E=" << E;
  }
}

// Not a test: the plans of the four model shapes' decode passes at 1-64 tokens, for reading the
// planner's choices without a GPU:
//   build/tmoe_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='PassPlan.DISABLED_Print*'
TEST(PassPlan, DISABLED_PrintModelShapePlans) {
  struct Shape {
    const char* name;
    int64_t H, I, E;
    int k;
  };
  const Shape shapes[] = {{"qwen3-30b-a3b", 2048, 768, 128, 8},
                          {"mixtral-8x7b", 4096, 14336, 8, 2},
                          {"deepseek-v3", 7168, 2048, 256, 8},
                          {"glm-4.5-air", 4096, 1408, 128, 8}};
  const cuda::Occupancy occupancy = h100_like();
  for (const Shape& s : shapes)
    for (int64_t T : {1, 2, 4, 8, 16, 32, 64}) {
      const cuda::ItemPlan items = cuda::plan_items(T, s.k, s.E, true);
      for (bool down : {false, true}) {
        PassCase c;
        c.w = down ? projection(s.I, s.H) : projection(s.H, s.I);
        c.nproj = down ? 1 : 2;
        c.tokens_per_item = items.tokens_per_item;
        c.busy = items.busy;
        const PassPlan p = plan(c);
        const int64_t blocks = c.busy * p.col_groups * c.nproj * p.k_splits;
        const int64_t at_once =
            static_cast<int64_t>(occupancy.blocks_per_sm(true, c.tokens_per_item, true, p.shared, p.dense)) *
            occupancy.sms;
        std::printf("%s T=%lld %s: %d rows per item, %d splits x %d k-tiles%s, %.2f waves\n", s.name,
                    static_cast<long long>(T), down ? "down" : "gate+up", c.tokens_per_item, p.k_splits,
                    p.k_tiles_per_block, p.dense ? ", dense" : "", static_cast<double>(blocks) / static_cast<double>(at_once));
      }
    }
}

}  // namespace
}  // namespace tmoe::testing

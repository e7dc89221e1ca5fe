// The one-launch decode's plan (plan_fused_decode, src/cuda/fused_decode.cuh), on the host: no GPU
// needed, so these run in CI too. An H100-like device (132 SMs, 227 KB of shared memory per block,
// less the kernel's static share) stands in for the one CudaMoe queries.
//
// Checked on every plan it accepts: the shared memory layout's regions follow one another without
// overlap, each aligned as the kernel uses it (ring slots 128 bytes, mbarriers 8, activation rows
// 16 for their vector stores), all inside the block's shared memory; the ring has the slots the
// window argument needs (partial rows = ring slots + the most chunks of a unit, unit counters =
// ring slots + 1); a slot holds a whole chunk at the widest projection's bits plus its scale rows.
//
// The chunk hand-over between warps (partial rows, unit counters: shared memory written and read
// around an atomic counter, which compute-sanitizer's racecheck cannot follow) is replayed on the
// host with the kernel's own work split (BlockWork, describe_chunk) under random interleavings of
// the producer warps (in lockstep) and the consumer warps, rings smaller than the consumers too:
// no partial row or unit counter is reused before its unit is finished, every unit is finished
// once, and nothing deadlocks.
#include <gtest/gtest.h>

#include <algorithm>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/fused_decode.cuh"

namespace tmoe::testing {
namespace {

constexpr size_t kH100Shared = 227 * 1024 - 1024;

cuda::PassProjection projection(int64_t K, int64_t N, int bits = 3, int group_size = 128, int hadamard = 0) {
  cuda::PassProjection p;
  p.w.K = K;
  p.w.N = N;
  p.w.bits = bits;
  p.w.group_size = group_size;
  p.w.hadamard = hadamard;
  p.w.experts = 128;
  p.w.quads = cuda::quads_of(K);
  p.affine = 1;
  return p;
}

struct Layer {
  cuda::PassProjection gate, up, down;
};

Layer layer(int64_t H, int64_t I, int bits = 3, int group_size = 128) {
  return {projection(H, I, bits, group_size), projection(H, I, bits, group_size), projection(I, H, bits, group_size)};
}

void check_layout(const cuda::FusedDecodePlan& plan, int max_bits, int64_t min_group = 128) {
  ASSERT_TRUE(plan.ok) << plan.why;
  const cuda::FusedLayout& l = plan.layout;
  EXPECT_EQ(plan.blocks, 132);
  EXPECT_GE(l.ring_slots, 8);
  EXPECT_LE(l.ring_slots, cuda::kFusedMaxRingSlots);
  EXPECT_EQ(l.slot_bytes % 128, 0u);
  EXPECT_GE(l.scales_offset_in_slot, static_cast<uint32_t>(l.chunk_quads * cuda::unit_bytes(max_bits)));
  // Scale rows: one per group the chunk's k range meets (at most chunk k / the group size rounded
  // up, plus one), 32 bytes each.
  const int64_t chunk_k = l.chunk_quads * 64;
  EXPECT_GE(l.slot_bytes - l.scales_offset_in_slot, static_cast<uint32_t>(((chunk_k + min_group - 1) / min_group + 1) * 32));
  EXPECT_EQ(l.bars_offset, static_cast<uint32_t>(l.ring_slots) * l.slot_bytes);
  EXPECT_EQ(l.bars_offset % 8, 0u);
  EXPECT_EQ(l.act_offset, l.bars_offset + static_cast<uint32_t>(l.ring_slots) * 16);
  EXPECT_EQ(l.act_offset % 16, 0u);
  EXPECT_GT(l.partial_offset, l.act_offset);
  EXPECT_GE(l.sv_offset, l.partial_offset + static_cast<uint32_t>(l.partial_slots) * 16 * 4);
  EXPECT_GT(l.counters_offset, l.sv_offset);
  EXPECT_LE(l.counters_offset + static_cast<size_t>(l.unit_slots) * 4, plan.shared);
  EXPECT_LE(plan.shared, kH100Shared);
  EXPECT_GT(l.partial_slots, l.ring_slots);
  EXPECT_EQ(l.ring_slots % l.producer_warps, 0);
  EXPECT_EQ(l.unit_slots, l.ring_slots + cuda::fused_producer_drift(l.producer_warps) + 1);
}

TEST(FusedDecodePlan, ModelShapesFit) {
  struct Shape {
    const char* name;
    int64_t H, I;
    int k;
  };
  for (const Shape& s : {Shape{"qwen3-30b-a3b", 2048, 768, 8}, Shape{"mixtral-8x7b", 4096, 14336, 2},
                         Shape{"deepseek-v3", 7168, 2048, 8}, Shape{"glm-4.5-air", 4096, 1408, 8}}) {
    SCOPED_TRACE(s.name);
    const Layer l = layer(s.H, s.I);
    for (int k = 1; k <= s.k; ++k) check_layout(cuda::plan_fused_decode(l.gate, l.up, l.down, k, 132, kH100Shared), 3);
  }
}

TEST(FusedDecodePlan, EdgeShapesAndMixedBits) {
  Layer l = layer(208, 144, 3, 48);
  check_layout(cuda::plan_fused_decode(l.gate, l.up, l.down, 16, 132, kH100Shared), 3, 48);
  l.gate.w.bits = 2;
  l.up.w.bits = 4;
  check_layout(cuda::plan_fused_decode(l.gate, l.up, l.down, 5, 132, kH100Shared), 4, 48);
  // Groups of 128 but down's of 16: the slots hold the smallest group's scale rows.
  Layer mixed = layer(2048, 768);
  mixed.down.w.group_size = 16;
  check_layout(cuda::plan_fused_decode(mixed.gate, mixed.up, mixed.down, 8, 132, kH100Shared), 3, 16);
  // Many slots of a wide down projection: the staged activations still leave a ring.
  const Layer wide = layer(4096, 2048);
  check_layout(cuda::plan_fused_decode(wide.gate, wide.up, wide.down, 16, 132, kH100Shared), 3);
}

TEST(FusedDecodePlan, RefusesWhatTheKernelDoesNotTake) {
  const Layer l = layer(2048, 768);
  auto refused = [](const Layer& x, int k, size_t shared = kH100Shared) {
    const cuda::FusedDecodePlan p = cuda::plan_fused_decode(x.gate, x.up, x.down, k, 132, shared);
    EXPECT_FALSE(p.ok);
    EXPECT_FALSE(p.why.empty());
    return p.why;
  };
  EXPECT_NE(refused(l, cuda::kFusedMaxSlots + 1).find("top_k"), std::string::npos);
  EXPECT_NE(refused(l, 0).find("top_k"), std::string::npos);
  Layer hadamard = l;
  hadamard.down.w.hadamard = 32;
  EXPECT_NE(refused(hadamard, 8).find("Hadamard"), std::string::npos);
  Layer custom = l;
  custom.up.affine = 0;
  EXPECT_NE(refused(custom, 8).find("grid"), std::string::npos);
  Layer mismatched = l;
  mismatched.down.w.N = 1024;
  EXPECT_NE(refused(mismatched, 8).find("mismatched"), std::string::npos);
  // Activations that fill the block's shared memory: 16 slots of a 14336-wide intermediate.
  const Layer huge = layer(4096, 14336);
  EXPECT_NE(refused(huge, 16).find("shared memory"), std::string::npos);
}


// One block's schedule, replayed: producer p takes steps l = 0, 1, ... of 32-step rounds; step l of
// round t is chunk 32 P t + P l + p (none past the last chunk), loaded into its ring slot once the
// slot's previous chunk was released; after every kFusedProducerStride steps the producers meet
// (the lockstep barrier). Warp w takes chunks w, w + W, ... in order, each once it has landed,
// phase B ones only once every phase A chunk of the block is done (the grid-wide arrival); a chunk
// writes its partial row, counts on its unit's counter, the warp completing the unit reads the
// unit's rows and resets the counter, and only then releases the ring slot (the kernel's order).
void replay_block(const cuda::FusedDecodeArgs& a, int routed, int block, int blocks, uint64_t seed) {
  const cuda::BlockWork work(a, routed, block, blocks);
  const int total = work.na + work.nb, W = cuda::kFusedConsumerWarps, R = a.layout.ring_slots;
  const int P = a.layout.producer_warps, stride = cuda::kFusedProducerStride;
  ASSERT_EQ(R % P, 0);
  const int steps = (total + 32 * P - 1) / (32 * P) * 32;  // each producer's, skipped ones included
  std::vector<int> row_owner(a.layout.partial_slots, -1), counter_unit(a.layout.unit_slots, -1), counter(a.layout.unit_slots, 0);
  std::vector<char> loaded(total, 0), released(total, 0);
  std::vector<int> next(W), step_of(P, 0);
  for (int w = 0; w < W; ++w) next[w] = w;
  int a_done = 0, finished_units = 0;
  std::mt19937_64 rng(seed);
  auto chunk_of = [&](int p, int l) { return l / 32 * 32 * P + l % 32 * P + p; };
  for (int step = 0;; ++step) {
    ASSERT_LT(step, 100 * (total + P * steps) + 1000) << "no progress";
    std::vector<int> runnable;  // -1 - p: producer p, w: warp w
    const int slowest = *std::min_element(step_of.begin(), step_of.end());
    for (int p = 0; p < P; ++p) {
      const int l = step_of[p];
      if (l >= steps || slowest < l / stride * stride) continue;  // done, or at the barrier
      const int i = chunk_of(p, l);
      if (i >= total || i < R || released[i - R]) runnable.push_back(-1 - p);
    }
    for (int w = 0; w < W; ++w) {
      const int i = next[w];
      if (i < total && loaded[i] && (i < work.na || a_done == work.na)) runnable.push_back(w);
    }
    if (runnable.empty()) {
      for (int w = 0; w < W; ++w) ASSERT_GE(next[w], total) << "deadlock: warp " << w << " waits for chunk " << next[w];
      for (int p = 0; p < P; ++p) ASSERT_EQ(step_of[p], steps) << "deadlock: producer " << p;
      break;
    }
    // Skewed choice: low-numbered actors run far more often, so some warps fall far behind.
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const int pick = runnable[static_cast<size_t>(runnable.size() * u(rng) * u(rng))];
    if (pick < 0) {
      const int p = -1 - pick, i = chunk_of(p, step_of[p]++);
      if (i < total) loaded[i] = 1;
      continue;
    }
    const int i = next[pick];
    const cuda::Chunk c = cuda::describe_chunk(work, i);
    ASSERT_EQ(c.first + (i - c.first), i);
    ASSERT_LT(i - c.first, c.per_unit);
    int& owner = row_owner[i % a.layout.partial_slots];
    if (owner >= 0) {  // the row's previous chunk must belong to a finished unit
      const cuda::Chunk prev = cuda::describe_chunk(work, owner);
      ASSERT_NE(counter_unit[prev.unit % a.layout.unit_slots], prev.unit) << "chunk " << i << " overwrites chunk " << owner;
    }
    owner = i;
    const int slot = c.unit % a.layout.unit_slots;
    if (counter[slot] == 0) counter_unit[slot] = c.unit;
    ASSERT_EQ(counter_unit[slot], c.unit) << "unit counter " << slot << " shared by two live units";
    if (++counter[slot] == c.per_unit) {  // this warp finishes the unit: its rows are all there
      for (int r = 0; r < c.per_unit; ++r) ASSERT_EQ(row_owner[(c.first + r) % a.layout.partial_slots], c.first + r);
      counter[slot] = 0;
      counter_unit[slot] = -1;
      ++finished_units;
    }
    released[i] = 1;
    if (i < work.na) ++a_done;
    next[pick] += W;
  }
  const int units = (work.a1 - work.a0) + (work.nb > 0 ? work.b1 - work.b0 : 0);
  EXPECT_EQ(finished_units, units);
}

TEST(FusedDecodePlan, ChunkHandOverReplays) {
  struct Shape {
    int64_t H, I;
    int k, chunk_quads;
  };
  uint64_t seed = 1;
  for (const Shape& s : {Shape{2048, 768, 8, 8}, Shape{4096, 14336, 2, 8}, Shape{208, 144, 16, 1},
                         Shape{512, 256, 8, 4}, Shape{7168, 2048, 8, 8}, Shape{4096, 14336, 2, 16}}) {
    SCOPED_TRACE("H=" + std::to_string(s.H) + " I=" + std::to_string(s.I) + " k=" + std::to_string(s.k));
    const Layer l = layer(s.H, s.I);
    // The chunk size knob (TMOE_FUSED_CHUNK_QUADS) as the plan reads it: small chunks give units of
    // more chunks than the ring has slots.
    setenv("TMOE_FUSED_CHUNK_QUADS", std::to_string(s.chunk_quads).c_str(), 1);
    // Rings of every size the plan gives, and (TMOE_FUSED_RING_SLOTS) smaller than the consumer warps.
    for (int producers : {1, 2, 4})
      for (int ring_cap : {0, 4, 12}) {
        SCOPED_TRACE("producers " + std::to_string(producers) + ", ring cap " + std::to_string(ring_cap));
        setenv("TMOE_FUSED_PRODUCERS", std::to_string(producers).c_str(), 1);
        if (ring_cap > 0) setenv("TMOE_FUSED_RING_SLOTS", std::to_string(ring_cap).c_str(), 1);
        const cuda::FusedDecodePlan plan = cuda::plan_fused_decode(l.gate, l.up, l.down, s.k, 132, kH100Shared);
        unsetenv("TMOE_FUSED_RING_SLOTS");
        ASSERT_TRUE(plan.ok) << plan.why;
        ASSERT_EQ(plan.layout.chunk_quads, s.chunk_quads);
        ASSERT_EQ(plan.layout.producer_warps, producers);
        if (ring_cap > 0) ASSERT_EQ(plan.layout.ring_slots, ring_cap / producers * producers);
        cuda::FusedDecodeArgs a;
        a.layout = plan.layout;
        a.proj[0] = l.gate;
        a.proj[1] = l.up;
        a.proj[2] = l.down;
        for (int routed : {0, 1, s.k})
          for (int block : {0, 1, 65, 131})
            for (int round = 0; round < 2; ++round) replay_block(a, routed, block, 132, seed++);
      }
    unsetenv("TMOE_FUSED_PRODUCERS");
    unsetenv("TMOE_FUSED_CHUNK_QUADS");
  }
}

}  // namespace
}  // namespace tmoe::testing

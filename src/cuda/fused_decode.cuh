// The one-launch decode: a whole 1-token MoE forward (gate and up of every routed slot, SwiGLU,
// down, router weights and the sum over the slots) in ONE kernel of one block per SM, instead of
// two projection passes whose split-K partial sums meet in finishing blocks (projection.cuh).
//
// Why: at one token a pass is mostly fixed cost (docs/notes-cuda.md "v17": a qwen3 forward of 22 us
// for ~5 us of weight bytes: staging behind the weights, finishing blocks, a hand-over between the
// passes). Here each block streams ALL of its weights from the start, gate/up and then down, through
// a shared-memory ring filled by bulk copies (producer warps; the down weights load while gate
// and up are computed), so the memory system is busy from the first microsecond to the last; no K
// splits (a unit is a whole column strip), so no partial sums leave the block; one grid-wide
// arrival between the phases (every block needs every slot's h).
//
// Work: phase A units are (slot p, n-tile j of I): gate and up strips of 16 columns over all of K =
// H, finished into h[p][16 j ..] = silu(gate) * up by the warp that completes the unit. Phase B
// units are the n-tiles of H: the down strips of every routed slot for those 16 columns, finished
// into out = sum over slots in slot order of prob * y (no atomics: bitwise repeatable). Blocks take
// contiguous unit ranges. A strip is cut into chunks of kFusedChunkQuads units (fragment_layout.hpp)
// plus their scale rows; chunk i of a block goes to ring slot i % ring_slots and to consumer warp
// i % kFusedConsumerWarps, which decodes it into mma.m16n8k16 like the pass kernel (hi + lo bf16
// activations, flush per scale group with the affine term).
//
// Takes: one token, top_k <= kFusedMaxSlots, affine grids and no Hadamard on all three projections,
// and shapes whose staged activations leave room for a ring; plan_fused_decode says. Needs sm_90
// (bulk copies, mbarrier transactions); the sm_90a build has it (fused_decode_built).
//
// Status (session 14): correct on H100 (tests/cuda: FusedDecode.*, CudaSmall under the sanitizers;
// tests/cuda/test_fused_plan.cu on the host). Four producer warps instead of one made it ~2x faster
// on the large shapes, but it is still 1.45-1.65x slower than the passes (ncu: the consumers' decode
// loop and both sides' polling share the issue slots; notes-cuda.md "v19"), so
// CudaMoeOptions::fused_decode is off by default.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "pass_trace.hpp"
#include "projection.cuh"

namespace tmoe::cuda {

inline constexpr int kFusedMaxSlots = 16;
// Consumer warps per block: 16, or -DTMOE_FUSED_CONSUMER_WARPS=24 (72 registers, a few spills;
// more warps to hide the mma chain and shared-memory latency; for A/B builds, not yet timed).
#ifndef TMOE_FUSED_CONSUMER_WARPS
#define TMOE_FUSED_CONSUMER_WARPS 16
#endif
inline constexpr int kFusedConsumerWarps = TMOE_FUSED_CONSUMER_WARPS;
// Producer warps: each issues every P-th chunk. One warp issuing every chunk was the bottleneck
// (ncu on H100, notes-cuda.md "v19": ~140 dependent instructions, ~0.45 us, per chunk while the
// consumers waited for data at 20% of DRAM bandwidth). TMOE_FUSED_PRODUCERS=1|2|4 for A/B timing.
inline constexpr int kFusedMaxProducerWarps = 4;
inline constexpr int kFusedDefaultProducerWarps = 4;
// Producers advance in lockstep: a named barrier after every kFusedProducerStride of each one's
// chunks, so that no chunk is issued while a chunk more than (ring slots + drift) earlier is still
// held (plan_fused_decode sizes the partial rows and unit counters with this drift).
inline constexpr int kFusedProducerStride = 8;
TMOE_HD constexpr int fused_producer_drift(int producers) { return kFusedProducerStride * producers; }
inline constexpr int kFusedMaxThreads = (kFusedConsumerWarps + kFusedMaxProducerWarps) * 32;
inline constexpr int kFusedChunkQuads = 8;  // units per chunk (512 k): fewer chunks cost less per byte (H100: 4 -> 8 made the forward 20-40% faster)
inline constexpr int kFusedMaxRingSlots = 128;

// The launch's shape of the block (plan_fused_decode): its ring, copy and wait modes, and its
// shared-memory layout as byte offsets from the dynamic base.
struct FusedLayout {
  int ring_slots = 0;     // a multiple of producer_warps: each producer has its own slots
  int producer_warps = kFusedDefaultProducerWarps;
  int chunk_quads = kFusedChunkQuads;
  int bulk_copies = 1;  // 1: bulk copies on the slot barrier's transactions; 0: cp.async per lane
  int consumer_wait = 0;  // how consumers wait for a chunk: 0 poll (test_wait), 1 try_wait with a
                          // 100 ns suspend hint, 2 plain try_wait (TMOE_FUSED_WAIT=spin|hint|sleep)
  int paired_units = 0;   // 1: the consumers decode a scale group's units two at a time (TMOE_FUSED_PAIRED=1)
  int producer_wait = 0;  // how producers wait for a free slot: 0 poll (test_wait), 1 try_wait with a
                          // 200 ns hint, leaving issue slots to the consumers (TMOE_FUSED_PRODUCER_WAIT=spin|hint)
  uint32_t slot_bytes = 0, scales_offset_in_slot = 0;
  uint32_t bars_offset = 0, act_offset = 0, partial_offset = 0, sv_offset = 0, counters_offset = 0;
  int partial_slots = 0;  // ring_slots + the producers' drift + the most chunks of one unit
  int unit_slots = 0;     // ring_slots + the producers' drift + 1
};

struct FusedDecodeArgs {
  PassProjection proj[3];  // gate, up, down
  const void* x = nullptr;
  DType x_dtype = DType::f32;
  const int32_t* expert_ids = nullptr;  // [top_k]
  const float* probs = nullptr;         // [top_k]
  int top_k = 1;
  int experts = 0;
  void* out = nullptr;  // [H] in out_dtype
  DType out_dtype = DType::f32;
  float* h = nullptr;           // [top_k][I] workspace
  int32_t* arrivals = nullptr;  // one counter, zeroed by the routing kernel before this kernel uses it
  PassTraceSink trace;          // -DTMOE_PASS_TRACE=1 builds: the blocks' timelines (passes 2 and 3)
  FusedLayout layout;
};

// Units [begin, end) of `units` that block b of `blocks` takes.
TMOE_HD constexpr int64_t range_begin(int64_t units, int64_t b, int64_t blocks) { return units * b / blocks; }

// A staged activation row of `quads` quads (floats): B fragments [quads * 64], tile sums
// [quads * 4] (zero past K), quad sums [quads]; padded to 16 bytes for the next row's vector stores.
TMOE_HD constexpr int fused_row_floats(int64_t quads) { return static_cast<int>((quads * (kQuadK + kQuadTiles + 1) + 3) / 4 * 4); }

// What one block does: its routed slots, unit ranges and chunk counts (every thread derives the same; host
// tests replay the scheduling with it).
struct BlockWork {
  int pairs = 0;               // routed slots (ids in [0, E)), in slot order
  int tn_i = 0, tn_h = 0;      // n-tiles of I and of H
  int quads_a = 0, quads_b = 0;  // quads of K = H (gate, up) and of K = I (down)
  int chunk_quads = 1;         // units per chunk (a strip's last chunk may have fewer)
  int chunks_a = 0, chunks_b = 0;  // chunks per strip
  int a0 = 0, a1 = 0, b0 = 0, b1 = 0;  // phase A units (slot, n-tile of I), phase B units (n-tile of H)
  int pair_a0 = 0;             // the first slot of the phase A range (its activations staged first)
  int na = 0, nb = 0;          // chunks of each phase

  TMOE_HD BlockWork(const FusedDecodeArgs& a, int routed, int block, int blocks) {
    pairs = routed;
    const DeviceProjection &gate = a.proj[0].w, &down = a.proj[2].w;
    tn_i = static_cast<int>(gate.tiles_n());
    tn_h = static_cast<int>(down.tiles_n());
    quads_a = static_cast<int>(gate.quads);
    quads_b = static_cast<int>(down.quads);
    chunk_quads = a.layout.chunk_quads;
    chunks_a = (quads_a + chunk_quads - 1) / chunk_quads;
    chunks_b = (quads_b + chunk_quads - 1) / chunk_quads;
    const int64_t units_a = static_cast<int64_t>(pairs) * tn_i;
    a0 = static_cast<int>(range_begin(units_a, block, blocks));
    a1 = static_cast<int>(range_begin(units_a, block + 1, blocks));
    b0 = static_cast<int>(range_begin(tn_h, block, blocks));
    b1 = static_cast<int>(range_begin(tn_h, block + 1, blocks));
    pair_a0 = a0 / tn_i;
    na = (a1 - a0) * 2 * chunks_a;
    nb = pairs > 0 ? (b1 - b0) * pairs * chunks_b : 0;
  }
  TMOE_HD int a_stride() const { return fused_row_floats(quads_a); }
  TMOE_HD int b_stride() const { return fused_row_floats(quads_b); }
};

// One chunk of a block's stream: chunk_quads units (or fewer at a strip's end) of one strip.
struct Chunk {
  int proj;         // 0 gate, 1 up, 2 down
  int pair;         // routed slot (index into the block's slot list)
  int n_tile;
  int quad0, quads;
  int unit;         // the block's unit sequence number (phase A units, then phase B)
  int phase_unit;   // unit number within its phase, from the block's first
  int first;        // block chunk index of the unit's first chunk
  int per_unit;     // chunks of the unit
};

TMOE_HD Chunk describe_chunk(const BlockWork& b, int i) {
  Chunk c;
  int k;
  if (i < b.na) {
    c.per_unit = 2 * b.chunks_a;
    const int ul = i / c.per_unit, r = i - ul * c.per_unit;
    const int unit = b.a0 + ul;
    c.pair = unit / b.tn_i;
    c.n_tile = unit - c.pair * b.tn_i;
    c.proj = r / b.chunks_a;
    k = r - c.proj * b.chunks_a;
    c.quad0 = k * b.chunk_quads;
    c.quads = b.chunk_quads < b.quads_a - c.quad0 ? b.chunk_quads : b.quads_a - c.quad0;
    c.unit = c.phase_unit = ul;
    c.first = i - r;
  } else {
    const int j = i - b.na;
    c.per_unit = b.pairs * b.chunks_b;
    const int ul = j / c.per_unit, r = j - ul * c.per_unit;
    c.pair = r / b.chunks_b;
    k = r - c.pair * b.chunks_b;
    c.proj = 2;
    c.n_tile = b.b0 + ul;
    c.quad0 = k * b.chunk_quads;
    c.quads = b.chunk_quads < b.quads_b - c.quad0 ? b.chunk_quads : b.quads_b - c.quad0;
    c.unit = (b.a1 - b.a0) + ul;
    c.phase_unit = ul;
    c.first = i - r;
  }
  return c;
}

struct FusedDecodePlan {
  bool ok = false;
  std::string why;  // when not ok: what the shape lacks
  int blocks = 0;
  size_t shared = 0;
  FusedLayout layout;
};

// Whether the one-launch decode takes this layer at one token with top_k slots on a device of `sms`
// SMs and `max_shared` bytes of shared memory per block, and its launch geometry.
FusedDecodePlan plan_fused_decode(const PassProjection& gate, const PassProjection& up, const PassProjection& down,
                                  int top_k, int sms, size_t max_shared);
// Whether the kernel has its sm_90a body for the current device.
bool fused_decode_built();
// Raises the kernel's dynamic shared memory limit to max_shared (once per process and device,
// before its first launch; plans use at most that).
void prepare_fused_decode(size_t max_shared);
void launch_fused_decode(const FusedDecodeArgs& args, const FusedDecodePlan& plan, cudaStream_t stream);

}  // namespace tmoe::cuda

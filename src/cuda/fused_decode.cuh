// The one-launch decode: a whole 1-token MoE forward (gate and up of every routed slot, SwiGLU,
// down, router weights and the sum over the slots) in ONE kernel of one block per SM, instead of
// two projection passes whose split-K partial sums meet in finishing blocks (projection.cuh).
//
// Why: at one token a pass is mostly fixed cost (docs/notes-cuda.md "v17": a qwen3 forward of 22 us
// for ~5 us of weight bytes: staging behind the weights, finishing blocks, a hand-over between the
// passes). Here each block streams ALL of its weights from the start, gate/up and then down, through
// a shared-memory ring filled by bulk copies (one producer warp; the down weights load while gate
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
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "projection.cuh"

namespace tmoe::cuda {

inline constexpr int kFusedMaxSlots = 16;
// Consumer warps per block: 16, or -DTMOE_FUSED_CONSUMER_WARPS=24 (72 registers, a few spills;
// more warps to hide the mma chain and shared-memory latency; for A/B builds, not yet timed).
#ifndef TMOE_FUSED_CONSUMER_WARPS
#define TMOE_FUSED_CONSUMER_WARPS 16
#endif
inline constexpr int kFusedConsumerWarps = TMOE_FUSED_CONSUMER_WARPS;
inline constexpr int kFusedThreads = (kFusedConsumerWarps + 1) * 32;  // + the producer warp
inline constexpr int kFusedChunkQuads = 8;  // units per chunk (512 k): fewer chunks cost less per byte (H100: 4 -> 8 made the forward 20-40% faster)
inline constexpr int kFusedMaxRingSlots = 64;

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
  // Shared memory layout (plan_fused_decode): byte offsets from the dynamic base.
  int ring_slots = 0;
  int chunk_quads = kFusedChunkQuads;
  int bulk_copies = 1;  // 1: bulk copies on the slot barrier's transactions; 0: cp.async per lane
  int consumer_wait = 0;  // how consumers wait for a chunk: 0 poll (test_wait), 1 try_wait with a
                          // 100 ns suspend hint, 2 plain try_wait (TMOE_FUSED_WAIT=spin|hint|sleep)
  uint32_t slot_bytes = 0, scales_offset_in_slot = 0;
  uint32_t bars_offset = 0, act_offset = 0, partial_offset = 0, sv_offset = 0, counters_offset = 0;
  int partial_slots = 0;  // ring_slots + the most chunks of one unit
  int unit_slots = 0;     // ring_slots + 1
};

struct FusedDecodePlan {
  bool ok = false;
  std::string why;  // when not ok: what the shape lacks
  int blocks = 0;
  size_t shared = 0;
  FusedDecodeArgs layout;  // the shared memory layout fields set
};

// Whether the one-launch decode takes this layer at one token with top_k slots on a device of `sms`
// SMs and `max_shared` bytes of shared memory per block, and its launch geometry.
FusedDecodePlan plan_fused_decode(const PassProjection& gate, const PassProjection& up, const PassProjection& down,
                                  int top_k, int sms, size_t max_shared);
// Whether the kernel has its sm_90a body for the current device.
bool fused_decode_built();
void launch_fused_decode(const FusedDecodeArgs& args, const FusedDecodePlan& plan, cudaStream_t stream);

}  // namespace tmoe::cuda

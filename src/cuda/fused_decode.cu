// The one-launch decode (see fused_decode.cuh for the scheme).
#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda_check.hpp"
#include "fragment_decode.cuh"
#include "fused_decode.cuh"
#include "grouped/gemm_common.cuh"
#include "grouped/wgmma.cuh"
#include "knobs.hpp"
#include "launch.hpp"
#include "pass_trace.cuh"
#include "staging.cuh"
#include "tmoe/error.hpp"

namespace tmoe::cuda {
namespace {

namespace wg = grouped::wgmma;

constexpr int kConsumerThreads = kFusedConsumerWarps * 32;

// The chunk's products for this lane's output columns g and g + 8 (lane = 4 g + tq; meaningful in
// the lanes with tq == 0, the accumulator columns of the hi and lo halves of the one activation
// row): the sum over its k-tiles of scale * (grid index . x), the affine term added per scale group
// (projection.cu's flush), from the group's activation sums accumulated along the way so that a
// chunk may start or end inside a group. QUAD_GROUPS (groups of whole units, e.g. 128): the chunk's
// units of each group with no test between them, one sum per unit; the padded k-tiles of a last partial unit have zero activations and
// sums, so every unit runs its 4 mma unchecked. Otherwise (groups of 16, 48, ...) a flush test per
// k-tile, and the last unit stops at the chunk's last real k-tile (its group's scale row is the
// chunk's last one). (The first version tested both per k-tile everywhere: 197 SASS instructions
// per unit against the pass kernel's ~80, which bounded the forward at ~2.5x the passes' issue.)
//
// PAIRED (QUAD_GROUPS only; TMOE_FUSED_PAIRED=1, not yet timed): a group's units two at a time into
// two accumulator sets, so that one warp has two independent decode + mma chains in flight (ncu on
// H100: the consumers' loop stalled mostly on fixed-latency dependencies, notes-cuda.md "v19").
template <int BITS, bool QUAD_GROUPS, bool PAIRED = false>
__device__ __forceinline__ float2 consume_chunk(const uint32_t* words, const uint16_t* scales, const float* xs,
                                                const float* tile_sums, const float* quad_sums, int kt_begin,
                                                int kt_end, int tiles_per_group, float coefficient) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const uint32_t* b_src = reinterpret_cast<const uint32_t*>(xs) + (tq * 2 + (g & 1)) * 2 + kt_begin * kTileDim;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  float total0 = 0.0f, total1 = 0.0f, sum = 0.0f;
  int group = 0;
  auto flush = [&]() {
    const float affine = coefficient * sum;
    total0 = fmaf(half_bits_to_float(scales[group * kTileDim + g]), (acc[0] + affine) + acc[1], total0);
    total1 = fmaf(half_bits_to_float(scales[group * kTileDim + g + 8]), (acc[2] + affine) + acc[3], total1);
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
    sum = 0.0f;
    ++group;
  };
  // Unit u's weight pairs (fragment_decode.cuh) from the lane's BITS words in the chunk.
  auto unit_pairs = [&](int u, uint32_t (&pairs)[16]) {
    uint32_t w[BITS];
#pragma unroll
    for (int v = 0; v < BITS; ++v) w[v] = words[(u * BITS + v) * 32 + lane];
    decode_unit_pairs<BITS>(w, pairs);
  };
  // Unit u's 4 mma into `into`.
  auto unit_products = [&](int u, const uint32_t (&pairs)[16], float (&into)[4]) {
#pragma unroll
    for (int i = 0; i < kQuadTiles; ++i) {
      const uint2 b = *reinterpret_cast<const uint2*>(b_src + (u * kQuadTiles + i) * kTileDim);
      mma_bf16(into, pairs[4 * i], pairs[4 * i + 1], pairs[4 * i + 2], pairs[4 * i + 3], b.x, b.y);
    }
  };
  const int quads = (kt_end - kt_begin + kQuadTiles - 1) / kQuadTiles;
  if constexpr (QUAD_GROUPS) {
    // Group by group: the chunk's `run` units of the group, then its flush.
    const int quads_per_group = tiles_per_group / kQuadTiles;
    const int quad0 = kt_begin / kQuadTiles;
    int u = 0, run = min(quads, quads_per_group - quad0 % quads_per_group);
    while (u < quads) {
      const int end = u + run;
      float other[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // PAIRED: the second unit's products
      if constexpr (PAIRED) {
        for (; u + 1 < end; u += 2) {
          uint32_t first[16], second[16];
          unit_pairs(u, first);
          unit_pairs(u + 1, second);
          unit_products(u, first, acc);
          unit_products(u + 1, second, other);
          sum += quad_sums[quad0 + u] + quad_sums[quad0 + u + 1];
        }
      }
      for (; u < end; ++u) {  // PAIRED: the group's odd unit, if any
        uint32_t pairs[16];
        unit_pairs(u, pairs);
        unit_products(u, pairs, acc);
        sum += quad_sums[quad0 + u];
      }
      if constexpr (PAIRED) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[j] += other[j];
      }
      flush();
      run = min(quads - u, quads_per_group);
    }
  } else {
    int left = tiles_per_group - kt_begin % tiles_per_group;
    for (int u = 0; u < quads; ++u) {
      uint32_t pairs[16];
      unit_pairs(u, pairs);
#pragma unroll
      for (int i = 0; i < kQuadTiles; ++i) {
        const int kt = kt_begin + u * kQuadTiles + i;
        if (kt >= kt_end) break;
        const uint2 b = *reinterpret_cast<const uint2*>(b_src + (u * kQuadTiles + i) * kTileDim);
        mma_bf16(acc, pairs[4 * i], pairs[4 * i + 1], pairs[4 * i + 2], pairs[4 * i + 3], b.x, b.y);
        sum += tile_sums[kt];
        if (--left == 0 || kt + 1 == kt_end) {
          flush();
          left = tiles_per_group;
        }
      }
    }
  }
  return make_float2(total0, total1);
}

// A k-tile row of activations (16 values from src[0..15] times su) as B fragments at `row`; returns
// its tile sum. fp32 rows from other blocks (h) are loaded through L2 (ld.cg).
__device__ __forceinline__ float stage_row(const void* src, int64_t index, DType dtype, const uint16_t* su,
                                           bool from_l2, float* row) {
  float v[kTileDim];
  if (!load_whole_tile_row(src, index, dtype, su, 1.0f, true, v, from_l2)) {
#pragma unroll
    for (int j = 0; j < kTileDim; ++j) v[j] = load_as_float(src, index + j, dtype) * half_bits_to_float(su[j]);
  }
  return store_b_fragments(v, row);
}

// Stages quad q of a row (its 4 k-tile rows; zeros past the row's tiles_k) into the row layout of
// fused_row_floats: B fragments, tile sums and the quad's sum. `src` holds the row's values at
// src_index + 16 kt, su the projection's signs for this row's expert.
__device__ __forceinline__ void stage_quad(const void* src, int64_t src_index, DType dtype, const uint16_t* su,
                                           bool from_l2, int q, int tiles_k, int quads, float* row) {
  float* tile_sums = row + quads * kQuadK;
  float quad_sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kQuadTiles; ++i) {
    const int kt = q * kQuadTiles + i;
    float tile_sum = 0.0f;
    if (kt < tiles_k) {
      tile_sum = stage_row(src, src_index + kt * kTileDim, dtype, su + kt * kTileDim, from_l2, row + kt * kTileDim);
    } else {
#pragma unroll
      for (int j = 0; j < kTileDim; j += 4) *reinterpret_cast<float4*>(row + kt * kTileDim + j) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    tile_sums[kt] = tile_sum;
    quad_sum += tile_sum;
  }
  tile_sums[quads * kQuadTiles + q] = quad_sum;
}

__device__ __forceinline__ int load_acquire(const int32_t* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Every block's phase A is done (one thread per block): the blocks are all resident (cooperative
// launch), so this ends; it traps instead of hanging if the protocol is ever broken.
__device__ __forceinline__ void arrive_and_wait_all(int32_t* arrivals) {
  wait_for_predecessor();  // the routing kernel zeroed the counter
  __threadfence();         // this block's h before its arrival
  atomicAdd(arrivals, 1);
  for (uint32_t tries = 0; load_acquire(arrivals) < static_cast<int>(gridDim.x); ++tries) {
    if (tries > (1u << 24)) __trap();
    __nanosleep(64);
  }
  __threadfence();
}

__global__ void __launch_bounds__(kFusedMaxThreads, 1) fused_decode_kernel(const __grid_constant__ FusedDecodeArgs a) {
#ifdef TMOE_WGMMA_DEVICE
  __shared__ int slot_expert[kFusedMaxSlots];
  __shared__ float slot_prob[kFusedMaxSlots];
  __shared__ int routed;
  // Per ring slot, the round whose chunk its producer is loading. A consumer of round r waits for
  // it before the slot's barrier: the barrier's parity names a phase only up to two, and the phase
  // of round r - 1 (the slot's previous chunk, another warp's) may not have completed yet.
  __shared__ int slot_round[kFusedMaxRingSlots];
  extern __shared__ __align__(128) uint8_t smem[];
  BlockTrace phase_a_trace, phase_b_trace;  // thread 0's (a consumer's) view; -DTMOE_PASS_TRACE=1 only
  phase_a_trace.mark(0);
  allow_dependents();
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + a.layout.bars_offset);
  uint64_t* empty = full + a.layout.ring_slots;
  float* act = reinterpret_cast<float*>(smem + a.layout.act_offset);
  float* partial = reinterpret_cast<float*>(smem + a.layout.partial_offset);
  float* sv = reinterpret_cast<float*>(smem + a.layout.sv_offset);
  int* unit_done = reinterpret_cast<int*>(smem + a.layout.counters_offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // The routed slots, in slot order (ids outside [0, E) are skipped; the routing kernel flags them).
  if (warp == 0) {
    const int id = lane < a.top_k ? a.expert_ids[lane] : -1;
    const bool ok = id >= 0 && id < a.experts;
    const unsigned mask = __ballot_sync(0xffffffffu, ok);
    if (ok) {
      const int at = __popc(mask & ((1u << lane) - 1u));
      slot_expert[at] = id;
      slot_prob[at] = a.probs[lane];
    }
    if (lane == 0) routed = __popc(mask);
  }
  if (threadIdx.x < a.layout.ring_slots) {
    const int s = threadIdx.x;
    wg::mbarrier_init_unfenced(&full[s], a.layout.bulk_copies ? 1 : 32);  // the expect_tx arrival, or the producer's lanes
    wg::mbarrier_init_unfenced(&empty[s], 1);
    slot_round[s] = -1;
    wg::fence_mbarrier_init();
  }
  for (int s = threadIdx.x; s < a.layout.unit_slots; s += blockDim.x) unit_done[s] = 0;
  __syncthreads();
  const BlockWork work(a, routed, blockIdx.x, gridDim.x);
  const int total_chunks = work.na + work.nb;

  if (warp >= kFusedConsumerWarps) {  // --- the producers: chunk i is producer i % P's
    // Lane l works out where chunk base + P l + p comes from (divisions, 64-bit products), then the
    // warp issues its 32 chunks one after another from shuffled descriptors, each into its ring
    // slot once the slot's previous chunk is released. R is a multiple of P, so a slot's chunks
    // are all one producer's and its waits see the slot's phases in order.
    // Copies: one bulk copy for the chunk's weights and one per scale row, on the slot's
    // transaction count; or (TMOE_FUSED_COPY=cp) cp.async, 16 bytes per lane, each lane's copies
    // counted on the slot's barrier when they land (its 32 expected arrivals).
    const int P = a.layout.producer_warps, p = warp - kFusedConsumerWarps;
    int slot = p, round = 0;
    for (int base = 0; base < total_chunks; base += 32 * P) {
      const uint8_t* weights = nullptr;
      const uint16_t* scale_rows = nullptr;
      int weight_pieces = 0, scale_pieces = 0, row_stride = 0;
      if (base + lane * P + p < total_chunks) {
        const Chunk c = describe_chunk(work, base + lane * P + p);
        const DeviceProjection& w = a.proj[c.proj].w;
        const int expert = slot_expert[c.pair];
        const int tiles_per_group = w.group_size / kTileDim;
        const int kt_begin = c.quad0 * kQuadTiles;
        const int kt_end = min(static_cast<int>(w.tiles_k()), (c.quad0 + c.quads) * kQuadTiles);
        const int group0 = kt_begin / tiles_per_group;
        weights = reinterpret_cast<const uint8_t*>(w.unit(expert, c.n_tile, c.quad0));
        weight_pieces = c.quads * unit_bytes(w.bits) / 16;
        scale_rows = w.scales + (static_cast<int64_t>(expert) * w.groups() + group0) * w.N +
                     static_cast<int64_t>(c.n_tile) * kTileDim;
        scale_pieces = 2 * ((kt_end - 1) / tiles_per_group - group0 + 1);
        row_stride = static_cast<int>(w.N);
      }
      for (int l = 0; l < 32; ++l) {
        if (base + l * P + p < total_chunks) {
          const uint8_t* src = reinterpret_cast<const uint8_t*>(
              __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(weights), l));
          const uint16_t* rows = reinterpret_cast<const uint16_t*>(
              __shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(scale_rows), l));
          const int pieces = __shfl_sync(0xffffffffu, weight_pieces, l);
          const int row_pieces = __shfl_sync(0xffffffffu, scale_pieces, l);
          const int stride = __shfl_sync(0xffffffffu, row_stride, l);
          if (round > 0) {
            if (a.layout.producer_wait == 0) wg::mbarrier_spin_or_trap(&empty[slot], (round - 1) & 1);
            else wg::mbarrier_wait_hinted_or_trap(&empty[slot], (round - 1) & 1, 200);
          }
          if (lane == 0) reinterpret_cast<volatile int*>(slot_round)[slot] = round;
          uint8_t* slot_data = smem + static_cast<size_t>(slot) * a.layout.slot_bytes;
          if (a.layout.bulk_copies) {  // one bulk copy for the weights, one per scale row
            if (lane == 0) wg::mbarrier_arrive_expect_tx(&full[slot], (pieces + row_pieces) * 16);
            __syncwarp();
            if (lane == 0) wg::bulk_copy_to_shared(slot_data, src, pieces * 16, &full[slot]);
            for (int row = lane; row < row_pieces / 2; row += 32)
              wg::bulk_copy_to_shared(slot_data + a.layout.scales_offset_in_slot + row * 32, rows + row * stride, 32, &full[slot]);
          } else {
            const uint32_t dst = wg::smem_address(slot_data);
            for (int piece = lane; piece < pieces; piece += 32) grouped::cp_async16(dst + piece * 16, src + piece * 16, 16);
            for (int piece = lane; piece < row_pieces; piece += 32)
              grouped::cp_async16(dst + a.layout.scales_offset_in_slot + piece * 16, rows + (piece >> 1) * stride + (piece & 1) * 8, 16);
            wg::cp_async_mbarrier_arrive(&full[slot]);
          }
          for (slot += P; slot >= a.layout.ring_slots; slot -= a.layout.ring_slots) ++round;
        }
        // Lockstep (every producer reaches every barrier: the loops' trip counts are the same).
        if (l % kFusedProducerStride == kFusedProducerStride - 1) wg::sync_threads_at(2, P * 32);
      }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");  // no copy outlives its issuing thread
    return;
  }

  // --- consumers
  // Phase A's activations: x * su of gate and up for each slot of the block's range, and sv.
  const int64_t H = a.proj[0].w.K, I = a.proj[0].w.N;
  if (work.na > 0) {
    const int slots_a = (work.a1 - 1) / work.tn_i - work.pair_a0 + 1;
    const int tk = static_cast<int>(a.proj[0].w.tiles_k());
    for (int t = threadIdx.x; t < slots_a * 2 * work.quads_a; t += kConsumerThreads) {
      const int row = t / work.quads_a, q = t - row * work.quads_a;  // row = 2 * staged slot + projection
      const int p = work.pair_a0 + row / 2;
      stage_quad(a.x, 0, a.x_dtype, a.proj[row % 2].w.su + static_cast<int64_t>(slot_expert[p]) * H, false, q, tk,
                 work.quads_a, act + row * work.a_stride());
    }
    for (int t = threadIdx.x; t < (work.a1 - work.a0) * 2 * kTileDim; t += kConsumerThreads) {
      const int n = t % kTileDim, proj = (t / kTileDim) % 2, unit = work.a0 + t / (2 * kTileDim);
      const int p = unit / work.tn_i, j = unit - p * work.tn_i;
      sv[t] = half_bits_to_float(a.proj[proj].w.sv[static_cast<int64_t>(slot_expert[p]) * I + j * kTileDim + n]);
    }
  }
  wg::sync_threads(kConsumerThreads);
  phase_a_trace.mark(1);

  // Where a warp's chunk i sits: its ring slot and round (the slot barrier's phase) and its partial
  // row, stepped by the warp's stride without divisions.
  struct Position {
    int slot, round, row;
  };
  auto position_of = [&](int i) { return Position{i % a.layout.ring_slots, i / a.layout.ring_slots, i % a.layout.partial_slots}; };
  auto step = [&](Position& at) {
    for (at.slot += kFusedConsumerWarps; at.slot >= a.layout.ring_slots; at.slot -= a.layout.ring_slots) ++at.round;
    for (at.row += kFusedConsumerWarps; at.row >= a.layout.partial_slots;) at.row -= a.layout.partial_slots;
  };
  auto consume = [&](int i, const Position& at) {
    const Chunk c = describe_chunk(work, i);
    const int slot = at.slot;
    const PassProjection& pp = a.proj[c.proj];
    const DeviceProjection& w = pp.w;
    const bool phase_a = c.proj < 2;
    const float* xs = phase_a ? act + ((c.pair - work.pair_a0) * 2 + c.proj) * work.a_stride()
                              : act + c.pair * work.b_stride();
    const int quads = phase_a ? work.quads_a : work.quads_b;
    const float* tile_sums = xs + quads * kQuadK;
    const float* quad_sums = tile_sums + quads * kQuadTiles;
    const int kt_begin = c.quad0 * kQuadTiles;
    const int kt_end = min(static_cast<int>(w.tiles_k()), (c.quad0 + c.quads) * kQuadTiles);
    const uint8_t* data = smem + static_cast<size_t>(slot) * a.layout.slot_bytes;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(data);
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(data + a.layout.scales_offset_in_slot);
    const int tpg = w.group_size / kTileDim;
    const uint32_t parity = at.round & 1;
    // The slot's producer is on this round: the barrier's phases before it are complete.
    for (uint32_t tries = 0; reinterpret_cast<volatile int*>(slot_round)[slot] != at.round; ++tries)
      if (tries > (1u << 27)) __trap();
    if (a.layout.consumer_wait == 0) wg::mbarrier_spin_or_trap(&full[slot], parity);
    else if (a.layout.consumer_wait == 1) wg::mbarrier_wait_hinted_or_trap(&full[slot], parity, 100);
    else wg::mbarrier_wait_or_trap(&full[slot], parity);
    float2 t;
    // The loop's variant: 0 a flush test per k-tile, 1 per unit (groups of whole units), 2 the
    // same with units in pairs (a.layout.paired_units).
    auto run = [&](auto bits, auto loop) {
      constexpr int kBits = decltype(bits)::value, kLoop = decltype(loop)::value;
      t = consume_chunk<kBits, kLoop >= 1, kLoop == 2>(words, scales, xs, tile_sums, quad_sums, kt_begin, kt_end, tpg,
                                                       pp.grid0_over_step - kDecodeBias<kBits>);
    };
    auto run_bits = [&](auto loop) {
      switch (w.bits) {
        case 2: run(std::integral_constant<int, 2>{}, loop); break;
        case 4: run(std::integral_constant<int, 4>{}, loop); break;
        default: run(std::integral_constant<int, 3>{}, loop); break;
      }
    };
    if (tpg % kQuadTiles != 0) run_bits(std::integral_constant<int, 0>{});
    else if (a.layout.paired_units) run_bits(std::integral_constant<int, 2>{});
    else run_bits(std::integral_constant<int, 1>{});
    float* mine = partial + at.row * kTileDim;
    // Partial rows are written and read with shared-memory atomics: the unit's chunks meet through
    // the unit counter below, not a barrier, which compute-sanitizer's racecheck cannot see.
    if ((lane & 3) == 0) {
      atomicExch(&mine[lane >> 2], t.x);
      atomicExch(&mine[(lane >> 2) + 8], t.y);
    }
    __threadfence_block();
    __syncwarp();
    int last = 0;
    if (lane == 0) {
      int* done = &unit_done[c.unit % a.layout.unit_slots];
      last = atomicAdd(done, 1) == c.per_unit - 1;
      if (last) *done = 0;  // the slot's next unit is a unit_slots later one (see plan_fused_decode)
    }
    if (__shfl_sync(0xffffffffu, last, 0)) {  // this warp completes the unit: finish it
      __threadfence_block();
      const int n = lane;
      // The unit's rows start at row `first_row` and wrap once at most (a unit has fewer chunks
      // than partial_slots), so the loop steps without a modulo.
      int first_row = at.row - (i - c.first);
      if (first_row < 0) first_row += a.layout.partial_slots;
      auto chunk_sum = [&](int r0, int count) {  // the unit's chunks r0 .. r0 + count - 1, in order
        float s = 0.0f;
        int row = first_row + r0;
        if (row >= a.layout.partial_slots) row -= a.layout.partial_slots;
        for (int r = 0; r < count; ++r) {  // an integer atomic read (a float atomicAdd is a CAS loop)
          s += __int_as_float(atomicOr(reinterpret_cast<int*>(&partial[row * kTileDim + n]), 0));
          if (++row == a.layout.partial_slots) row = 0;
        }
        return s;
      };
      if (n < kTileDim) {
        if (phase_a) {
          const float* unit_sv = sv + c.phase_unit * 2 * kTileDim;
          const float gate = chunk_sum(0, work.chunks_a) * a.proj[0].step * unit_sv[n];
          const float up = chunk_sum(work.chunks_a, work.chunks_a) * a.proj[1].step * unit_sv[kTileDim + n];
          a.h[static_cast<int64_t>(c.pair) * I + c.n_tile * kTileDim + n] = swiglu(gate, up);
        } else {
          const float* unit_sv = sv + c.phase_unit * work.pairs * kTileDim;
          float sum = 0.0f;
          for (int p = 0; p < work.pairs; ++p) {
            const float y = chunk_sum(p * work.chunks_b, work.chunks_b) * pp.step * unit_sv[p * kTileDim + n];
            sum = fmaf(slot_prob[p], y, sum);
          }
          store_from_float(a.out, c.n_tile * kTileDim + n, a.out_dtype, sum);
        }
      }
    }
    __syncwarp();
    if (lane == 0) wg::mbarrier_arrive(&empty[slot]);  // after the finish: see plan_fused_decode
  };

  Position at = position_of(warp);
  for (int i = warp; i < work.na; i += kFusedConsumerWarps, step(at)) consume(i, at);

  // --- every block's h is written: stage down's activations (h * su of each slot) and sv.
  wg::sync_threads(kConsumerThreads);
  phase_a_trace.mark(2);
  if (threadIdx.x == 0) arrive_and_wait_all(a.arrivals);
  wg::sync_threads(kConsumerThreads);
  phase_a_trace.write(2, a.trace);
  phase_b_trace.mark(0);
  if (work.pairs == 0) {  // no routed slot: the output is zero
    for (int n = work.b0 * kTileDim + threadIdx.x; n < work.b1 * kTileDim; n += kConsumerThreads)
      store_from_float(a.out, n, a.out_dtype, 0.0f);
    phase_b_trace.write(3, a.trace);
    return;
  }
  const int tk_b = static_cast<int>(a.proj[2].w.tiles_k());
  for (int t = threadIdx.x; t < work.pairs * work.quads_b; t += kConsumerThreads) {
    const int p = t / work.quads_b, q = t - p * work.quads_b;
    stage_quad(a.h, static_cast<int64_t>(p) * I, DType::f32, a.proj[2].w.su + static_cast<int64_t>(slot_expert[p]) * I,
               true, q, tk_b, work.quads_b, act + p * work.b_stride());
  }
  for (int t = threadIdx.x; t < (work.b1 - work.b0) * work.pairs * kTileDim; t += kConsumerThreads) {
    const int n = t % kTileDim, p = (t / kTileDim) % work.pairs, j = work.b0 + t / (work.pairs * kTileDim);
    sv[t] = half_bits_to_float(a.proj[2].w.sv[static_cast<int64_t>(slot_expert[p]) * H + j * kTileDim + n]);
  }
  wg::sync_threads(kConsumerThreads);
  phase_b_trace.mark(1);
  const int first_b = work.na + ((warp - work.na % kFusedConsumerWarps) + kFusedConsumerWarps) % kFusedConsumerWarps;
  at = position_of(first_b);
  for (int i = first_b; i < total_chunks; i += kFusedConsumerWarps, step(at)) consume(i, at);
  if constexpr (kPassTrace) {  // the block's end: every consumer's last chunk
    phase_b_trace.mark(2);
    wg::sync_threads(kConsumerThreads);
    phase_b_trace.write(3, a.trace);
  }
#endif
}

}  // namespace

FusedDecodePlan plan_fused_decode(const PassProjection& gate, const PassProjection& up, const PassProjection& down,
                                  int top_k, int sms, size_t max_shared) {
  FusedDecodePlan plan;
  auto no = [&](const std::string& why) {
    plan.why = why;
    return plan;
  };
  if (top_k < 1 || top_k > kFusedMaxSlots) return no("top_k " + std::to_string(top_k) + " > 16");
  for (const PassProjection* p : {&gate, &up, &down}) {
    if (!p->affine) return no("a custom (non-affine) grid");
    if (p->w.hadamard != 0) return no("a Hadamard transform");
  }
  const int64_t H = gate.w.K, I = gate.w.N;
  if (up.w.K != H || up.w.N != I || down.w.K != I || down.w.N != H) return no("mismatched projections");
  if (sms < 1) return no("no SMs");
  const int64_t G = sms;
  const int64_t tn_i = I / kTileDim, tn_h = H / kTileDim;
  const int64_t quads_a = gate.w.quads, quads_b = down.w.quads;
  // Units per chunk: kFusedChunkQuads, or TMOE_FUSED_CHUNK_QUADS (1..16) for A/B timing. (16 died
  // with "unspecified launch failure" on mixtral in session 13, probably the round race fixed in
  // session 14: its ring of ~12 slots, fewer than the consumer warps, made a consumer's wait on
  // the parity of a slot whose previous chunk had not even been issued routine.)
  const int chunk_quads = static_cast<int>(std::clamp<int64_t>(env_knob("TMOE_FUSED_CHUNK_QUADS", kFusedChunkQuads), 1, 16));
  // Copies: bulk copies (TMOE_FUSED_COPY=bulk, the default) or cp.async (=cp) for A/B timing.
  plan.layout.bulk_copies = env_choice("TMOE_FUSED_COPY", {"bulk", "cp"}, 0) == 0;
  // Consumer waits: polling (TMOE_FUSED_WAIT=spin, the default), try_wait with a 100 ns hint (=hint)
  // or plain try_wait (=sleep), for A/B timing (notes-cuda.md "v18").
  plan.layout.consumer_wait = env_choice("TMOE_FUSED_WAIT", {"spin", "hint", "sleep"}, 0);
  // Producers' waits for a free slot: polling (TMOE_FUSED_PRODUCER_WAIT=spin, the default) or
  // try_wait with a 200 ns hint (=hint): on H100 the producers' polls were 16% of a mixtral
  // forward's instructions (notes-cuda.md "v19"). For A/B timing; not yet timed.
  plan.layout.producer_wait = env_choice("TMOE_FUSED_PRODUCER_WAIT", {"spin", "hint"}, 0);
  // The consumers' loop with a group's units in pairs (TMOE_FUSED_PAIRED=1; groups of whole units only).
  plan.layout.paired_units = env_choice("TMOE_FUSED_PAIRED", {"0", "1"}, 0);
  // Producer warps: kFusedDefaultProducerWarps, or TMOE_FUSED_PRODUCERS (1, 2 or 4: a divisor of
  // the consumer warps, see the consumers' ring position) for A/B timing.
  const int64_t producers_knob = env_knob("TMOE_FUSED_PRODUCERS", kFusedDefaultProducerWarps);
  const int producers = producers_knob >= 4 ? 4 : producers_knob >= 2 ? 2 : 1;
  const int drift = fused_producer_drift(producers);
  const int64_t chunks_a = (quads_a + chunk_quads - 1) / chunk_quads;
  const int64_t chunks_b = (quads_b + chunk_quads - 1) / chunk_quads;
  // The largest phase A slot span and unit counts of any block, for any number of routed slots.
  int64_t most_a_slots = 1, most_a_units = 0, most_b_units = 0;
  for (int64_t pairs = 1; pairs <= top_k; ++pairs)
    for (int64_t b = 0; b < G; ++b) {
      const int64_t a0 = range_begin(pairs * tn_i, b, G), a1 = range_begin(pairs * tn_i, b + 1, G);
      if (a1 > a0) most_a_slots = std::max(most_a_slots, (a1 - 1) / tn_i - a0 / tn_i + 1);
      most_a_units = std::max(most_a_units, a1 - a0);
    }
  for (int64_t b = 0; b < G; ++b) most_b_units = std::max(most_b_units, range_begin(tn_h, b + 1, G) - range_begin(tn_h, b, G));
  const int64_t most_unit_chunks = std::max(2 * chunks_a, top_k * chunks_b);
  const int64_t act_floats = std::max<int64_t>(most_a_slots * 2 * fused_row_floats(quads_a), top_k * fused_row_floats(quads_b));
  const int64_t sv_floats = std::max(most_a_units * 2 * kTileDim, most_b_units * top_k * kTileDim);
  const int bits = std::max({gate.w.bits, up.w.bits, down.w.bits});
  const uint32_t weight_bytes = chunk_quads * unit_bytes(bits);
  // Scale rows of a chunk: the groups its k range (chunk_k values) meets, at most chunk_k / the
  // smallest group size, rounded up, plus one for a range that starts inside a group; 32 bytes each
  // (16 columns of fp16). (Sized for groups of 16 everywhere, a slot took 4224 bytes instead of 3328
  // at 128: a quarter fewer slots.)
  const int64_t smallest_group = std::min({gate.w.group_size, up.w.group_size, down.w.group_size});
  const int64_t chunk_k = static_cast<int64_t>(chunk_quads) * kQuadK;
  const uint32_t chunk_groups = static_cast<uint32_t>((chunk_k + smallest_group - 1) / smallest_group + 1);
  const uint32_t slot_bytes = (weight_bytes + chunk_groups * kTileDim * 2 + 127) / 128 * 128;
  // Per ring slot: the slot, its two mbarriers, a partial-sum row and a unit counter. The partial
  // rows are ring_slots + drift + most_unit_chunks: a chunk's row is reused by chunk i +
  // partial_slots, which cannot be loaded before every chunk up to i + partial_slots - ring_slots -
  // drift has released its slot (its producer waited for the slot's previous chunk, and the other
  // producers are at most `drift` chunks behind it: the lockstep barrier); a chunk releases its slot
  // after the finish it may run, so the unit's rows outlive its finish. The same argument with one
  // chunk per unit sizes the unit counters (ring_slots + drift + 1).
  const size_t fixed = static_cast<size_t>(act_floats + sv_floats + (drift + most_unit_chunks) * kTileDim) * 4 +
                       (drift + 1) * 4 + 512;
  const size_t per_slot = slot_bytes + 16 + kTileDim * 4 + 4;
  if (max_shared <= fixed + 8 * per_slot) return no("staged activations leave too little shared memory for a ring");
  int slots = static_cast<int>(std::min<size_t>(kFusedMaxRingSlots, (max_shared - fixed) / per_slot));
  // TMOE_FUSED_RING_SLOTS=N: at most N slots (tests: rings smaller than the consumer warps).
  slots = static_cast<int>(std::clamp<int64_t>(env_knob("TMOE_FUSED_RING_SLOTS", slots), producers, slots));
  // A multiple of the producers, so that each ring slot is one producer's.
  slots = slots / producers * producers;
  FusedLayout& l = plan.layout;
  l.ring_slots = slots;
  l.producer_warps = producers;
  l.chunk_quads = chunk_quads;
  l.slot_bytes = slot_bytes;
  l.scales_offset_in_slot = weight_bytes;
  l.partial_slots = static_cast<int>(slots + drift + most_unit_chunks);
  l.unit_slots = slots + drift + 1;
  size_t at = static_cast<size_t>(slots) * slot_bytes;
  l.bars_offset = static_cast<uint32_t>(at);
  at += static_cast<size_t>(slots) * 16;
  l.act_offset = static_cast<uint32_t>(at);
  at += static_cast<size_t>(act_floats) * 4;
  l.partial_offset = static_cast<uint32_t>(at);
  at += static_cast<size_t>(l.partial_slots) * kTileDim * 4;
  l.sv_offset = static_cast<uint32_t>(at);
  at += static_cast<size_t>(sv_floats) * 4;
  l.counters_offset = static_cast<uint32_t>(at);
  at += static_cast<size_t>(l.unit_slots) * 4;
  if (at > max_shared) return no("shared memory");
  plan.shared = at;
  plan.blocks = sms;
  plan.ok = true;
  return plan;
}

bool fused_decode_built() {
  int device = 0;
  TMOE_CUDA_CHECK(cudaGetDevice(&device));
  static int known[64] = {};  // per device: 0 unknown, 1 yes, 2 no
  if (device < 64 && known[device]) return known[device] == 1;
  cudaFuncAttributes attributes{};
  TMOE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, fused_decode_kernel));
  // Only the sm_90a body declares static shared memory (the slot tables).
  const bool built = attributes.sharedSizeBytes > 0;
  if (device < 64) known[device] = built ? 1 : 2;
  return built;
}

void prepare_fused_decode(size_t max_shared) {
  TMOE_CUDA_CHECK(cudaFuncSetAttribute(fused_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(max_shared)));
}

void launch_fused_decode(const FusedDecodeArgs& args, const FusedDecodePlan& plan, cudaStream_t stream) {
  if (!plan.ok) throw Error(ErrorKind::internal, "launch_fused_decode: the plan does not take this layer: " + plan.why);
  FusedDecodeArgs a = args;
  a.layout = plan.layout;
  // Cooperative: every block resident at once (the phase barrier waits for all of them); programmatic
  // (launch.hpp): it starts while the routing kernel runs.
  cudaLaunchAttribute attributes[2]{};
  attributes[0].id = cudaLaunchAttributeCooperative;
  attributes[0].val.cooperative = 1;
  attributes[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attributes[1].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(plan.blocks);
  config.blockDim = dim3((kFusedConsumerWarps + plan.layout.producer_warps) * 32);
  config.dynamicSmemBytes = plan.shared;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = programmatic_launch_supported(reinterpret_cast<const void*>(fused_decode_kernel)) ? 2 : 1;
  TMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, fused_decode_kernel, a));
}

}  // namespace tmoe::cuda

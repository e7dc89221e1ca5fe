// The decode / small-batch projection pass (see projection.cuh for the scheme).
#include <cuda_fp16.h>

#include <algorithm>

#include "cuda_check.hpp"
#include "projection.cuh"

namespace tmoe::cuda {
namespace {

// 2^e for |e| < 127, built from its bits (a constant once e is).
__device__ __forceinline__ float pow2(int e) { return __uint_as_float(static_cast<uint32_t>(127 + e) << 23); }

// A tile column is 16 fields of BITS bits. The affine decode ORs a field, left where it sits in a
// 32-bit word, into the mantissa of 2^23 (bits 0..22) and turns it back into its exact index with
// one FMA: (2^23 + idx * 2^s) * 2^-s - 2^(23-s) = idx. So a field must lie in bits [0, 23) of the
// word it is read from: the column is cut into "segments" of 23 / BITS whole fields, each read with
// one funnel shift. (Closed forms, not loops: they must fold to constants in the unrolled code.)
template <int BITS>
__device__ __forceinline__ constexpr int segment_base(int j) {
  return j / (23 / BITS) * (23 / BITS) * BITS;
}

// 32 bits starting at bit `bit` of a thread's register array (bit is a compile-time constant after
// unrolling, so this is one funnel shift or a plain register read).
template <int WORDS>
__device__ __forceinline__ uint32_t bits_at(const uint32_t (&r)[WORDS], int bit) {
  const int w = bit >> 5, shift = bit & 31;
  const uint32_t lo = r[w];
  const uint32_t hi = w + 1 < WORDS ? r[w + 1] : 0u;
  // Plain shifts, not __funnelshift_r: its inline asm kept the compiler from sharing one shift
  // among the fields of a segment (the PTX had one shf per field).
  return shift == 0 ? lo : (lo >> shift) | (hi << (32 - shift));
}

__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

// The butterfly passes len = first_len, 2 first_len, ..., block / 2 of the block Walsh-Hadamard
// transform of `rows` rows (row_len values each, `stride` apart) in shared memory; every thread of
// the block calls it, and it ends with a barrier when it ran a pass. Not normalized: callers fold
// 1/sqrt(block) into their loads. Lengths are powers of two, so the indexing is shifts (ncu on v5:
// ~10 instructions per weight, much of it integer division in the staging and in these passes).
__device__ void shared_hadamard_passes(float* data, int rows, int row_len, int stride, int block, int first_len) {
  const int pairs = row_len >> 1;
  for (int len = first_len, lg = __ffs(first_len) - 1; len < block; len <<= 1, ++lg) {
    for (int t = 0; t < rows; ++t) {
      float* d = data + t * stride;
      for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
        const int lo = ((q >> lg) << (lg + 1)) | (q & (len - 1));
        const float a = d[lo], b = d[lo + len];
        d[lo] = a + b;
        d[lo + len] = a - b;
      }
    }
    __syncthreads();
  }
}

__device__ __forceinline__ void cp_async16(void* shared_dst, const void* global_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

struct StreamArgs {
  const PassProjection* pp;
  int expert, k_tile0, k_tiles, n_tile0;  // n_tile0: the column group's first n-tile
  bool column_active;                     // this lane's n-tile exists
  const float* xs;
  int xs_stride;
  const float* tile_sums;
  int sums_stride;
  const float* grid;
  uint8_t* ring;  // this warp's ring
  int stage_bytes;
  // This lane's copy sources, computed once per block by init_sources (v5 redid the 64-bit address
  // arithmetic and a 64-bit division for the scale group at every step). Step i adds 16 i k-tile
  // rows: step_bytes to every tile piece, 16 i to the rows checked against k_tiles.
  const uint8_t* chunk_base = nullptr;  // tile (expert, k_tile0, n_tile0)
  int64_t step_bytes = 0;
  uint32_t piece_offset[4] = {};        // piece v's byte offset from chunk_base at step 0
  int piece_row[4] = {};                // its k-tile row at step 0 (huge: its n-tile does not exist)
  const uint16_t* scale_src = nullptr;  // this lane's 8 scales in group 0; null: columns past N
  int scale_row = 0;                    // the k-tile row of this lane's scales at step 0
  int scale_group0 = 0, groups_per_step = 0, scale_k0 = 0;  // groups_per_step 0: divide per step
};

inline constexpr int kNoRow = 1 << 29;

template <int BITS>
__device__ __forceinline__ void init_sources(StreamArgs& a) {
  constexpr int kPiecesPerChunk = kRowsPerStep * tile_bytes(BITS) / 16;
  const DeviceProjection& w = a.pp->w;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a.chunk_base = w.tile(a.expert, a.k_tile0, a.n_tile0);
  a.step_bytes = static_cast<int64_t>(kProjWarps) * kRowsPerStep * w.k_tile_stride;
  const int64_t tiles_n = w.tiles_n();
#pragma unroll
  for (int v = 0; v < BITS; ++v) {
    const int piece = lane + 32 * v;
    const int strip = piece / kPiecesPerChunk, offset = (piece % kPiecesPerChunk) * 16;
    const int row = warp * kRowsPerStep + offset / tile_bytes(BITS);
    // A block's region (4 n-tile strips, at most 128 + 16 i k-tile rows) spans far less than 4 GiB.
    a.piece_offset[v] = static_cast<uint32_t>(row * w.k_tile_stride + strip * w.n_tile_stride + offset % tile_bytes(BITS));
    a.piece_row[v] = a.n_tile0 + strip < tiles_n ? row : kNoRow;
  }
  const int nt = lane >> 3, kq = (lane >> 1) & 3, half = lane & 1;
  const int64_t n0 = static_cast<int64_t>(a.n_tile0 + nt) * kTileDim + half * 8;
  a.scale_row = warp * kRowsPerStep + kq;
  a.scale_k0 = (a.k_tile0 + a.scale_row) * kTileDim;
  a.scale_group0 = a.scale_k0 / w.group_size;
  constexpr int kStepK = kProjWarps * kRowsPerStep * kTileDim;  // 256
  a.groups_per_step = kStepK % w.group_size == 0 ? kStepK / w.group_size : 0;
  a.scale_src = n0 < w.N ? w.scales + a.expert * w.groups() * w.N + n0 : nullptr;
}

// Copies warp step i (k-tile rows (warp + 4 i) * 4 + 0..3 of the column group's 4 n-tiles, and
// their scales) into stage i % kStages of the warp's ring, the whole warp together. CudaMoe stores
// each expert's tiles n-tile-major (k_tile_stride = tile_bytes): the 4 k-tiles of one n-tile are
// 4 * tile_bytes contiguous bytes, and a block sweeps 4 neighbouring column strips front to back,
// one contiguous region. Lane l copies 16-byte pieces l, l + 32, ..., so each cp.async instruction
// of the warp reads whole 128-byte lines. Stage layout: [n-tile][4 k-tiles] (lane (nt, kq, half)
// finds its 8 columns at lane * 16 * BITS), then each lane's own 8 scales at 16 * lane.
// Commits one group whether or not it copied.
template <int BITS>
__device__ __forceinline__ void issue_step(const StreamArgs& a, int i) {
  const int lane = threadIdx.x & 31;
  uint8_t* stage = a.ring + (i % kStages) * a.stage_bytes;
  const int row_step = i * kProjWarps * kRowsPerStep;
  const uint8_t* chunk = a.chunk_base + i * a.step_bytes;
#pragma unroll
  for (int v = 0; v < BITS; ++v)  // piece p = lane + 32 v lands at p * 16 of the stage
    if (a.piece_row[v] + row_step < a.k_tiles) cp_async16(stage + (lane + 32 * v) * 16, chunk + a.piece_offset[v]);
  if (a.scale_src != nullptr && a.scale_row + row_step < a.k_tiles) {
    const int step_k = row_step * kTileDim;
    const int group = a.groups_per_step ? a.scale_group0 + i * a.groups_per_step
                                        : (a.scale_k0 + step_k) / a.pp->w.group_size;
    cp_async16(stage + kRowsPerStep * kTilesPerStepRow * tile_bytes(BITS) + lane * 16,
               a.scale_src + group * a.pp->w.N);
  }
  cp_async_commit();
}

// The first kStages - 1 steps: issued before the activations are staged, so the weights are on
// their way while the block reads x and su.
template <int BITS>
__device__ __forceinline__ void issue_prologue(StreamArgs& a) {
  init_sources<BITS>(a);
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue_step<BITS>(a, i);
}

// One warp's share of a block: the k-tile rows of the block's K range that belong to this warp
// (warp steps warp, warp + 4, ...), for the 4 n-tiles of the column group; total[c][t] gets the
// sums of the thread's 8 columns. Each lane copies its 8 tile columns and their 8 scales into its
// slot of the warp's shared-memory ring with cp.async, kStages - 1 steps ahead of the decode, so
// the loads stay in flight while the warp does arithmetic. A lane reads back only its own slot.
template <int BITS, int TC, bool AFFINE>
__device__ __forceinline__ void stream_tiles(const StreamArgs& a, float (&total)[8][TC]) {
  constexpr int kWords = 4 * BITS;      // 8 tile columns = 16 * BITS bytes
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kq = (lane >> 1) & 3;
  const int steps = (a.k_tiles + kRowsPerStep - 1) / kRowsPerStep;
  const int my_steps = warp < steps ? (steps - warp + kProjWarps - 1) / kProjWarps : 0;
  const float* xs = a.xs;
  const float* tile_sums = a.tile_sums;
  const float* grid = a.grid;
  const int xs_stride = a.xs_stride, sums_stride = a.sums_stride;

  for (int i = 0; i < my_steps; ++i) {  // steps 0 .. kStages - 2 were issued by issue_prologue
    __syncwarp();  // every lane is done reading the stage the next copy overwrites
    issue_step<BITS>(a, i + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncwarp();  // the other lanes' pieces of step i have landed too
    const int row = (warp + i * kProjWarps) * kRowsPerStep + kq;
    if (!a.column_active || row >= a.k_tiles) continue;
    const uint8_t* stage = a.ring + (i % kStages) * a.stage_bytes;
    const uint4* slot = reinterpret_cast<const uint4*>(stage + lane * 16 * BITS);
    uint32_t r[kWords];
#pragma unroll
    for (int v = 0; v < BITS; ++v) {
      const uint4 q = slot[v];
      r[4 * v + 0] = q.x;
      r[4 * v + 1] = q.y;
      r[4 * v + 2] = q.z;
      r[4 * v + 3] = q.w;
    }
    const uint4 scale_bits =
        *reinterpret_cast<const uint4*>(stage + kRowsPerStep * kTilesPerStepRow * tile_bytes(BITS) + lane * 16);
    const uint32_t scale_words[4] = {scale_bits.x, scale_bits.y, scale_bits.z, scale_bits.w};
    // The 16 activations of this k-tile row for each row of the item.
    float x[TC][16];
#pragma unroll
    for (int t = 0; t < TC; ++t) {
      const float4* xv = reinterpret_cast<const float4*>(xs + t * xs_stride + row * kTileDim);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float4 v = xv[q];
        x[t][4 * q + 0] = v.x;
        x[t][4 * q + 1] = v.y;
        x[t][4 * q + 2] = v.z;
        x[t][4 * q + 3] = v.w;
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      float acc[TC];
#pragma unroll
      for (int t = 0; t < TC; ++t) acc[t] = AFFINE ? tile_sums[t * sums_stride + row] : 0.0f;
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const int base = segment_base<BITS>(j);
        const int s = j * BITS - base;
        const uint32_t segment = bits_at(r, c * 16 * BITS + base);
        float value;
        if constexpr (AFFINE) {
          const uint32_t m = (segment & (kMask << s)) | 0x4B000000u;
          value = fmaf(__uint_as_float(m), pow2(-s), -pow2(23 - s));  // the index, exactly
        } else {
          value = grid[(segment >> s) & kMask];
        }
#pragma unroll
        for (int t = 0; t < TC; ++t) acc[t] = fmaf(x[t][j], value, acc[t]);
      }
      const float scale = half_bits_to_float(
          static_cast<uint16_t>(c & 1 ? scale_words[c / 2] >> 16 : scale_words[c / 2] & 0xffffu));
#pragma unroll
      for (int t = 0; t < TC; ++t) total[c][t] = fmaf(scale, acc[t], total[c][t]);
    }
  }
  cp_async_wait<0>();
}


// stream_tiles with ROWS activation rows, dispatched on bits; total[c][t] = 0 for t >= ROWS.
template <int ROWS, int TC, bool AFFINE>
__device__ __forceinline__ void stream_rows_impl(const StreamArgs& a, float (&total)[8][TC]) {
  float part[8][ROWS];
#pragma unroll
  for (int c = 0; c < 8; ++c)
#pragma unroll
    for (int t = 0; t < ROWS; ++t) part[c][t] = 0.0f;
  switch (a.pp->w.bits) {
    case 2: stream_tiles<2, ROWS, AFFINE>(a, part); break;
    case 4: stream_tiles<4, ROWS, AFFINE>(a, part); break;
    default: stream_tiles<3, ROWS, AFFINE>(a, part); break;
  }
#pragma unroll
  for (int c = 0; c < 8; ++c)
#pragma unroll
    for (int t = 0; t < TC; ++t) total[c][t] = t < ROWS ? part[c][t < ROWS ? t : 0] : 0.0f;
}

static_assert(kMaxItemTokens <= kMaxPassItemPairs && kLocalPlanMaxPairs <= kProjThreads,
              "pass_routing.cuh: a block's item holds up to kMaxItemTokens pairs; one thread per pair");

template <int TC, bool AFFINE>
__global__ void __launch_bounds__(kProjThreads, TC == 1 ? 6 : TC == 2 ? 4 : 3)  // blocks per SM
projection_kernel(const __grid_constant__ PassArgs a) {
  // Launched as a dependent (launch.hpp): the next kernel may place its blocks as ours finish.
  allow_dependents();
  const int item_index = blockIdx.x;
  __shared__ PassItem item;
  find_pass_item(a.routing, a.items, a.num_items, a.order, static_cast<int>(a.pairs), item_index, item);
  if (a.combine.out != nullptr && blockIdx.y == 0 && blockIdx.z == 0)
    zero_unrouted_rows(a.combine, a.top_k, a.proj[0].w.N, item_index, gridDim.x);
  if (item.count == 0) {
    wait_for_predecessor();  // launch.hpp's rule: no block exits before its predecessor is done
    return;
  }
  const int expert = item.expert, first = item.first, count = item.count;
  const int col_group = blockIdx.y;
  const int p = blockIdx.z / a.k_splits, split = blockIdx.z % a.k_splits;
  const PassProjection& pp = p == 0 ? a.proj[0] : a.proj[1];
  const DeviceProjection& w = pp.w;
  const int64_t K = w.K, N = w.N;

  extern __shared__ float shared[];
  const int kr = a.k_tiles_per_block;
  const int xs_stride = kr * kTileDim;
  float* xs = shared;                              // [TC][kr * 16]
  float* tile_sums = xs + TC * xs_stride;          // [TC][kr]
  float* warp_partials = tile_sums + TC * kr;      // [warps][64][TC]
  float* grid = warp_partials + kProjWarps * kColsPerBlock * TC;  // [16]
  float* finish = grid + 16;                       // [2][TC][finish cols]
  int* flag = reinterpret_cast<int*>(finish + 2 * TC * a.finish_groups_cols);
  const uintptr_t ring_base = (reinterpret_cast<uintptr_t>(flag + 4) + 15) & ~uintptr_t{15};
  uint8_t* ring = reinterpret_cast<uint8_t*>(ring_base) + (threadIdx.x >> 5) * kStages * a.stage_bytes;

  const int k_tile0 = split * kr;
  const int k_tiles = min(static_cast<int64_t>(kr), w.tiles_k() - k_tile0);
  const int64_t k0 = static_cast<int64_t>(k_tile0) * kTileDim;
  const int k_len = k_tiles * kTileDim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nt = lane >> 3, half = lane & 1;  // lane = (n-tile, k-tile row, half tile)
  const int n_tile = col_group * kTilesPerStepRow + nt;
  const bool column_active = n_tile < w.tiles_n();
  StreamArgs sa{&pp, expert, k_tile0, k_tiles, col_group * kTilesPerStepRow, column_active, xs, xs_stride, tile_sums, kr, grid, ring, a.stage_bytes};
  // --- the first weight steps go out before anything else: they depend only on the item.
  switch (w.bits) {
    case 2: issue_prologue<2>(sa); break;
    case 4: issue_prologue<4>(sa); break;
    default: issue_prologue<3>(sa); break;
  }

  // --- stage the activations of this K range, one k-tile row (16 values) per thread at a time:
  // a[k] * su[k] / sqrt(block), the Hadamard passes inside the 16 values in registers, then the
  // wider passes in shared memory (v5: one value per thread and step, with divisions).
  const int hadamard = w.hadamard;
  const float norm = hadamard ? rsqrtf(static_cast<float>(hadamard)) : 1.0f;
  const int register_block = hadamard ? min(hadamard, kTileDim) : 1;
  const uint16_t* su = w.su + static_cast<int64_t>(expert) * K;
  if (!a.src_by_token) wait_for_predecessor();  // rows by position: h, written by the gate+up pass
  for (int i = threadIdx.x; i < TC * kr; i += blockDim.x) {
    const int t = i / kr, kt = i - t * kr;
    float v[kTileDim];
#pragma unroll
    for (int j = 0; j < kTileDim; ++j) v[j] = 0.0f;
    if (t < count && kt < k_tiles) {
      const int64_t pos = first + t;
      const int64_t row = a.src_by_token ? item.pair[t] / a.top_k : pos;
      const int64_t k_first = k0 + static_cast<int64_t>(kt) * kTileDim;
#pragma unroll
      for (int j = 0; j < kTileDim; ++j)
        if (k_first + j < K)
          v[j] = load_as_float(a.src, row * K + k_first + j, a.src_dtype) * half_bits_to_float(su[k_first + j]) * norm;
#pragma unroll
      for (int len = 1; len < kTileDim; len <<= 1) {
        if (len < register_block) {
#pragma unroll
          for (int j = 0; j < kTileDim; ++j)
            if ((j & len) == 0) {
              const float lo = v[j], hi = v[j + len];
              v[j] = lo + hi;
              v[j + len] = lo - hi;
            }
        }
      }
    }
    float4* dst = reinterpret_cast<float4*>(xs + t * xs_stride + kt * kTileDim);
#pragma unroll
    for (int q = 0; q < 4; ++q) dst[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
  if (threadIdx.x < 16) grid[threadIdx.x] = threadIdx.x < (1 << w.bits) ? w.grid[threadIdx.x] : 0.0f;
  __syncthreads();
  if (hadamard > kTileDim) shared_hadamard_passes(xs, TC, k_len, xs_stride, hadamard, kTileDim);
  if (AFFINE) {
    for (int i = threadIdx.x; i < TC * kr; i += blockDim.x) {
      const int t = i / kr, kt = i % kr;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 16; ++j) sum += xs[t * xs_stride + kt * kTileDim + j];
      tile_sums[t * kr + kt] = sum * pp.grid0_over_step;
    }
    __syncthreads();
  }

  // --- stream the tiles, with only as many activation rows as the item has (1, 2 or TC): a
  // one-pair item does not pay TC FMAs per weight.
  float total[8][TC];
  if (count <= 1 || TC == 1) {
    stream_rows_impl<1, TC, AFFINE>(sa, total);
  } else if (count <= 2 || TC == 2) {
    stream_rows_impl<(TC >= 2 ? 2 : 1), TC, AFFINE>(sa, total);
  } else {
    stream_rows_impl<TC, TC, AFFINE>(sa, total);
  }
  // Sum over the 4 k-tile rows of the warp (lanes 2 and 4 apart), then over warps in order.
#pragma unroll
  for (int c = 0; c < 8; ++c)
#pragma unroll
    for (int t = 0; t < TC; ++t) {
      total[c][t] += __shfl_xor_sync(0xffffffffu, total[c][t], 2);
      total[c][t] += __shfl_xor_sync(0xffffffffu, total[c][t], 4);
    }
  if ((lane & 6) == 0) {  // k-tile row 0 of each (n-tile, half) holds the sums
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int t = 0; t < TC; ++t)
        warp_partials[(warp * kColsPerBlock + nt * kTileDim + half * 8 + c) * TC + t] = total[c][t];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kColsPerBlock * TC; i += blockDim.x) {
    const int col = i / TC, t = i % TC;
    const int64_t n = static_cast<int64_t>(col_group) * kColsPerBlock + col;
    if (t >= count || n >= N) continue;
    float v = 0.0f;
#pragma unroll
    for (int wp = 0; wp < kProjWarps; ++wp) v += warp_partials[wp * kColsPerBlock * TC + i];
    a.partial[((static_cast<int64_t>(p) * a.k_splits + split) * a.pairs + first + t) * N + n] = v * (AFFINE ? pp.step : 1.0f);
  }

  // --- the last block of this finish group (all splits, projections and its column groups) ends it.
  const int groups_per_finish = a.finish_groups_cols / kColsPerBlock;
  const int fg = col_group / groups_per_finish;
  const int fg_groups = min(groups_per_finish, a.col_groups - fg * groups_per_finish);
  wait_for_predecessor();  // the routing kernel zeroed the counters
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int arrivals = a.nproj * a.k_splits * fg_groups;
    const int done = atomicAdd(&a.counters[static_cast<int64_t>(item_index) * a.num_finish_groups + fg], 1);
    *flag = done == arrivals - 1;
  }
  __syncthreads();
  if (!*flag) return;
  __threadfence();

  const int64_t col0 = static_cast<int64_t>(fg) * a.finish_groups_cols;
  const int cols = static_cast<int>(min(static_cast<int64_t>(a.finish_groups_cols), N - col0));
  const int fcols = a.finish_groups_cols;
  for (int i = threadIdx.x; i < a.nproj * TC * cols; i += blockDim.x) {
    const int pr = i / (TC * cols), t = (i / cols) % TC, c = i % cols;
    float v = 0.0f;
    if (t < count) {
      for (int sp = 0; sp < a.k_splits; ++sp)
        v += __ldcg(&a.partial[((static_cast<int64_t>(pr) * a.k_splits + sp) * a.pairs + first + t) * N + col0 + c]);
    }
    const int b = a.proj[pr].w.hadamard;
    finish[(pr * TC + t) * fcols + c] = b ? v * rsqrtf(static_cast<float>(b)) : v;
  }
  __syncthreads();
  for (int pr = 0; pr < a.nproj; ++pr) {
    const int b = a.proj[pr].w.hadamard;
    if (b) shared_hadamard_passes(finish + pr * TC * fcols, TC, cols, fcols, b, 1);
  }
  const uint16_t* sv0 = a.proj[0].w.sv + static_cast<int64_t>(expert) * N;
  const uint16_t* sv1 = a.proj[1].w.sv + static_cast<int64_t>(expert) * N;
  for (int i = threadIdx.x; i < count * cols; i += blockDim.x) {
    const int t = i / cols, c = i % cols;
    const int64_t n = col0 + c;
    float v = finish[t * fcols + c] * half_bits_to_float(sv0[n]);
    if (a.nproj == 2) {
      const float u = finish[(TC + t) * fcols + c] * half_bits_to_float(sv1[n]);
      v = v / (1.0f + expf(-v)) * u;  // SwiGLU
    }
    a.dst[(static_cast<int64_t>(first) + t) * N + n] = v;
  }
  if (a.combine.out != nullptr)
    combine_completed_tokens(a.combine, item, a.top_k, a.dst, N, fg, a.num_finish_groups, col0, cols);
}

template <int TC, bool AFFINE>
void launch_one(const PassArgs& args, int64_t max_items, size_t shared_bytes, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(max_items), static_cast<unsigned>(args.col_groups),
                  static_cast<unsigned>(args.nproj * args.k_splits));
  launch_dependent(projection_kernel<TC, AFFINE>, grid, dim3(kProjThreads), shared_bytes, stream,
                   args.routing.programmatic != 0, args);
}

template <int TC, bool AFFINE>
void raise_shared_limit() {
  TMOE_CUDA_CHECK(cudaFuncSetAttribute(projection_kernel<TC, AFFINE>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
}

}  // namespace

void prepare_projection_kernels() {
  raise_shared_limit<1, false>();
  raise_shared_limit<1, true>();
  raise_shared_limit<2, false>();
  raise_shared_limit<2, true>();
  raise_shared_limit<4, false>();
  raise_shared_limit<4, true>();
}

int projection_blocks_per_sm(int tokens_per_item, bool affine, size_t shared_bytes) {
  int blocks = 0;
  auto query = [&](auto kernel) {
    TMOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kProjThreads, shared_bytes));
  };
  switch (tokens_per_item) {
    case 1: affine ? query(projection_kernel<1, true>) : query(projection_kernel<1, false>); break;
    case 2: affine ? query(projection_kernel<2, true>) : query(projection_kernel<2, false>); break;
    default: affine ? query(projection_kernel<4, true>) : query(projection_kernel<4, false>); break;
  }
  return std::max(blocks, 1);
}

void launch_projection_pass(const PassArgs& args, int tokens_per_item, int64_t max_items,
                            size_t shared_bytes, cudaStream_t stream) {
  bool affine = true;
  for (int p = 0; p < args.nproj; ++p) affine = affine && args.proj[p].affine;
  switch (tokens_per_item) {
    case 1: affine ? launch_one<1, true>(args, max_items, shared_bytes, stream) : launch_one<1, false>(args, max_items, shared_bytes, stream); break;
    case 2: affine ? launch_one<2, true>(args, max_items, shared_bytes, stream) : launch_one<2, false>(args, max_items, shared_bytes, stream); break;
    default: affine ? launch_one<4, true>(args, max_items, shared_bytes, stream) : launch_one<4, false>(args, max_items, shared_bytes, stream); break;
  }
  TMOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace tmoe::cuda

// The decode / small-batch projection pass (see projection.cuh for the scheme).
#include <cuda_fp16.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "cuda_check.hpp"
#include "fragment_decode.cuh"
#include "pass_trace.cuh"
#include "projection.cuh"
#include "staging.cuh"
#include "tmoe/error.hpp"

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

// Where staged k-tile row (t, kt) lives: xs[t * xs_stride + 16 kt ..], 16 floats (or, in the
// tensor-core kernel, their 16 B-fragment words in the same place).
struct StagedRows {
  float* xs;
  int xs_stride;
  __device__ __forceinline__ float* slot(int t, int kt) const { return xs + t * xs_stride + kt * kTileDim; }
  // The row's 16 fp32 values, as a staging phase before left them there.
  __device__ __forceinline__ void load(int t, int kt, float (&v)[kTileDim]) const {
    const float4* row = reinterpret_cast<const float4*>(slot(t, kt));
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4 f = row[q];
      v[4 * q] = f.x, v[4 * q + 1] = f.y, v[4 * q + 2] = f.z, v[4 * q + 3] = f.w;
    }
  }
};

// Stores a staged k-tile row as fp32 (the CUDA-core kernel's layout, and the tensor-core kernel's
// before its B-fragment conversion).
struct Fp32RowStore : StagedRows {
  __device__ __forceinline__ void operator()(int t, int kt, const float (&v)[kTileDim]) const {
    float4* dst = reinterpret_cast<float4*>(slot(t, kt));
#pragma unroll
    for (int q = 0; q < 4; ++q) dst[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
};

// Stores a staged k-tile row as the tensor-core kernel's B fragments (store_b_fragments), in place
// of its 16 floats, and the row's sum into tile_sums[t][kt] (kr per row).
struct FragmentRowStore : StagedRows {
  float* tile_sums;
  int kr;
  __device__ __forceinline__ void operator()(int t, int kt, const float (&v)[kTileDim]) const {
    tile_sums[t * kr + kt] = store_b_fragments(v, slot(t, kt));
  }
};

// h[pos][k .. k + 3] of a deferred gate+up finish (GateUpSums), times su[k ..] * norm as
// load_whole_tile_row scales its values: the finishing block's operations in its order (the
// splits added in order from zero, then sv, then SwiGLU), so h is bitwise the h it would have
// written. I is a multiple of 16 and k of 4: every load is aligned.
template <int SPLIT_BATCH>
__device__ __forceinline__ float4 deferred_h_quad(const GateUpSums& s, int64_t pairs, int64_t I, int expert,
                                                  int64_t pos, int64_t k, const uint16_t* su_k, float norm) {
  const int64_t split_stride = pairs * I / 4;  // float4s between one split's sums and the next's
  float sum[2][4] = {};
  for (int sp0 = 0; sp0 < s.k_splits; sp0 += SPLIT_BATCH) {
    float4 part[2][SPLIT_BATCH];
#pragma unroll
    for (int pr = 0; pr < 2; ++pr)
#pragma unroll
      for (int u = 0; u < SPLIT_BATCH; ++u)
        if (sp0 + u < s.k_splits)
          part[pr][u] = __ldcg(reinterpret_cast<const float4*>(
                                   s.partial + ((static_cast<int64_t>(pr) * s.k_splits + sp0) * pairs + pos) * I + k) +
                               u * split_stride);
#pragma unroll
    for (int pr = 0; pr < 2; ++pr)
#pragma unroll
      for (int u = 0; u < SPLIT_BATCH; ++u)
        if (sp0 + u < s.k_splits)
          sum[pr][0] += part[pr][u].x, sum[pr][1] += part[pr][u].y, sum[pr][2] += part[pr][u].z, sum[pr][3] += part[pr][u].w;
  }
  const int64_t sv_at = static_cast<int64_t>(expert) * I + k;
  const uint2 sv_gate = __ldg(reinterpret_cast<const uint2*>(s.sv[0] + sv_at));
  const uint2 sv_up = __ldg(reinterpret_cast<const uint2*>(s.sv[1] + sv_at));
  const uint2 su = __ldg(reinterpret_cast<const uint2*>(su_k));
  const uint32_t gate_words[2] = {sv_gate.x, sv_gate.y}, up_words[2] = {sv_up.x, sv_up.y}, su_words[2] = {su.x, su.y};
  float h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int shift = 16 * (j % 2);
    const float gate = sum[0][j] * half_bits_to_float(static_cast<uint16_t>(gate_words[j / 2] >> shift));
    const float up = sum[1][j] * half_bits_to_float(static_cast<uint16_t>(up_words[j / 2] >> shift));
    h[j] = swiglu(gate, up) * (half_bits_to_float(static_cast<uint16_t>(su_words[j / 2] >> shift)) * norm);
  }
  return make_float4(h[0], h[1], h[2], h[3]);
}

// Stages the item's activations for the block's K range (k-tiles k_tile0 .. k_tile0 + k_tiles - 1):
// store(t, kt, v) gets v = T(a . su)[16 (k_tile0 + kt) + 0..15] for rows t < count and kt < k_tiles,
// zeros for the other rows t < rows and k-tiles kt < kt_alloc. One k-tile row (16 values) per thread
// at a time: a[k] * su[k] / sqrt(block), the Hadamard passes inside the 16 values in registers, then
// (Fp32RowStore only: they run on xs) the wider passes in shared memory (v5: one value per thread
// and step, with divisions). With a deferred gate+up finish (a.gate_up_sums) a first phase forms
// a . su / sqrt(block) from gate+up's partial sums, 4 values per thread (a row's 16 would keep too
// many loads in one thread), into the rows' slots, where the per-row phase reads them back (only in
// kernels built with a DEFERRED_BATCH: deferred_split_batch). Every thread calls it; it ends with a
// barrier.
template <int DEFERRED_BATCH, typename RowStore>
__device__ __forceinline__ void stage_activations(const PassArgs& a, const DeviceProjection& w, const PassItem& item,
                                                  int rows, int k_tile0, int k_tiles, int kt_alloc,
                                                  const RowStore& store) {
  const int first = item.first, count = item.count;
  const int64_t K = w.K;
  const int64_t k0 = static_cast<int64_t>(k_tile0) * kTileDim;
  const int hadamard = w.hadamard;
  const float norm = hadamard ? rsqrtf(static_cast<float>(hadamard)) : 1.0f;
  const int register_block = hadamard ? min(hadamard, kTileDim) : 1;
  const uint16_t* su = w.su + static_cast<int64_t>(item.expert) * K;
  if (!a.src_by_token) wait_for_predecessor();  // rows by position: h or its sums, from the gate+up pass
  const bool deferred = DEFERRED_BATCH > 0 && a.gate_up_sums.partial != nullptr;
  if constexpr (DEFERRED_BATCH > 0) {
    if (deferred) {
      const int quads = min(count, rows) * k_tiles * 4;
      for (int i = threadIdx.x; i < quads; i += blockDim.x) {
        const int t = i / (k_tiles * 4), rest = i - t * k_tiles * 4, kt = rest / 4, q = rest % 4;
        const int64_t k = k0 + static_cast<int64_t>(kt) * kTileDim + 4 * q;
        reinterpret_cast<float4*>(store.slot(t, kt))[q] =
            deferred_h_quad<DEFERRED_BATCH>(a.gate_up_sums, a.pairs, K, item.expert, first + t, k, su + k, norm);
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < rows * kt_alloc; i += blockDim.x) {
    const int t = i / kt_alloc, kt = i - t * kt_alloc;
    float v[kTileDim];
#pragma unroll
    for (int j = 0; j < kTileDim; ++j) v[j] = 0.0f;
    if (t < count && kt < k_tiles) {
      const int64_t pos = first + t;
      const int64_t row = a.src_by_token ? item.pair[t] / a.top_k : pos;
      const int64_t k_first = k0 + static_cast<int64_t>(kt) * kTileDim;
      if (deferred) {
        store.load(t, kt, v);  // phase 1's values
      } else if (!load_whole_tile_row(a.src, row * K + k_first, a.src_dtype, su + k_first, norm,
                                      k_first + kTileDim <= K, v)) {
#pragma unroll
        for (int j = 0; j < kTileDim; ++j)
          if (k_first + j < K)
            v[j] = load_as_float(a.src, row * K + k_first + j, a.src_dtype) * half_bits_to_float(su[k_first + j]) * norm;
      }
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
    store(t, kt, v);
  }
  __syncthreads();
  // Rows past count are zero and stay zero under the transform.
  if constexpr (std::is_same_v<RowStore, Fp32RowStore>)
    if (hadamard > kTileDim)
      shared_hadamard_passes(store.xs, min(count, rows), k_tiles * kTileDim, store.xs_stride, hadamard, kTileDim);
}

// Splits whose partial sums a finishing thread loads before adding them (memory-level parallelism:
// v16's trace showed finishing blocks 2-14 us long, one dependent L2 load per split and output).
#ifndef TMOE_SPLIT_LOAD_BATCH
#define TMOE_SPLIT_LOAD_BATCH 4
#endif
inline constexpr int kSplitLoadBatch = TMOE_SPLIT_LOAD_BATCH;
// -DTMOE_FINISH_SV_PREFETCH=0: the finishing block loads sv after the split sums (for A/B runs).
#ifndef TMOE_FINISH_SV_PREFETCH
#define TMOE_FINISH_SV_PREFETCH 1
#endif
inline constexpr bool kPrefetchSv = TMOE_FINISH_SV_PREFETCH != 0;

// The finishing block's work for finish group fg (see finish_if_last). sums_in_finish: the block
// already wrote the group's sums (times the Hadamard norm) into `finish`, so there are no splits
// to load.
__device__ __forceinline__ void finish_group(const PassArgs& a, const PassItem& item, int rows, int fg,
                                             float* finish, bool sums_in_finish = false) {
  const int expert = item.expert, first = item.first, count = item.count;
  const int64_t N = a.proj[0].w.N;
  const int64_t col0 = static_cast<int64_t>(fg) * a.finish_groups_cols;
  const int cols = static_cast<int>(min(static_cast<int64_t>(a.finish_groups_cols), N - col0));
  const int fcols = a.finish_groups_cols;
  const uint16_t* sv0 = a.proj[0].w.sv + static_cast<int64_t>(expert) * N;
  const uint16_t* sv1 = a.proj[1].w.sv + static_cast<int64_t>(expert) * N;
  // sv of the first output this thread writes below, loaded now: its memory latency overlaps the
  // split sums' instead of following them (the finishing block is the pass's critical path).
  float sv0_first = 0.0f, sv1_first = 0.0f;
  if (kPrefetchSv && static_cast<int>(threadIdx.x) < count * cols) {
    const int64_t n = col0 + threadIdx.x % cols;
    sv0_first = half_bits_to_float(sv0[n]);
    if (a.nproj == 2) sv1_first = half_bits_to_float(sv1[n]);
  }
  // The splits' partial sums of the item's rows, 4 columns per thread and step (cols and N are
  // multiples of 16), up to kSplitLoadBatch splits' loads in flight; added in split order, so the
  // result is the same whatever the batching. Rows past count are not needed: the Hadamard passes
  // and the outputs below take the first count rows.
  const int quads_per_row = cols / 4;
  const int64_t split_stride = a.pairs * N / 4;  // float4s between one split's partial sums and the next's
  for (int i = threadIdx.x; !sums_in_finish && i < a.nproj * count * quads_per_row; i += blockDim.x) {
    const int pr = i / (count * quads_per_row), rest = i - pr * count * quads_per_row;
    const int t = rest / quads_per_row, q = rest - t * quads_per_row;
    const float4* src = reinterpret_cast<const float4*>(
        a.partial + (static_cast<int64_t>(pr) * a.k_splits * a.pairs + first + t) * N + col0) + q;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int sp0 = 0; sp0 < a.k_splits; sp0 += kSplitLoadBatch) {
      float4 part[kSplitLoadBatch];
#pragma unroll
      for (int u = 0; u < kSplitLoadBatch; ++u)
        if (sp0 + u < a.k_splits) part[u] = __ldcg(src + (sp0 + u) * split_stride);
#pragma unroll
      for (int u = 0; u < kSplitLoadBatch; ++u)
        if (sp0 + u < a.k_splits) v.x += part[u].x, v.y += part[u].y, v.z += part[u].z, v.w += part[u].w;
    }
    const int b = a.proj[pr].w.hadamard;
    const float norm = b ? rsqrtf(static_cast<float>(b)) : 1.0f;
    float* dst = finish + (pr * rows + t) * fcols + 4 * q;  // scalar stores: finish need not be 16-byte aligned
    dst[0] = v.x * norm, dst[1] = v.y * norm, dst[2] = v.z * norm, dst[3] = v.w * norm;
  }
  __syncthreads();
  for (int pr = 0; pr < a.nproj; ++pr) {
    const int b = a.proj[pr].w.hadamard;
    if (b) shared_hadamard_passes(finish + pr * rows * fcols, min(count, rows), cols, fcols, b, 1);
  }
  for (int i = threadIdx.x; i < count * cols; i += blockDim.x) {
    const int t = i / cols, c = i % cols;
    const int64_t n = col0 + c;
    const bool first_output = kPrefetchSv && i == static_cast<int>(threadIdx.x);
    float v = finish[t * fcols + c] * (first_output ? sv0_first : half_bits_to_float(sv0[n]));
    if (a.nproj == 2) {
      const float u = finish[(rows + t) * fcols + c] * (first_output ? sv1_first : half_bits_to_float(sv1[n]));
      v = swiglu(v, u);
    }
    // h rows by position (the down pass stages an item's rows together), y rows by slot (the
    // combine reads a token's slots: combine_completed_tokens).
    const int64_t row = a.combine.out != nullptr ? item.pair[t] : static_cast<int64_t>(first) + t;
    a.dst[row * N + n] = v;
  }
  if (a.combine.out != nullptr)
    combine_completed_tokens(a.combine, item, a.top_k, a.dst, N, fg, a.num_finish_groups, col0, cols);
}

// Called by every thread of a block once its partial sums are written: the last block of this
// finish group (all splits, projections and its column groups: an integer counter) adds the splits
// in order, applies the output Hadamard and sv, and SwiGLU for gate+up; on the down pass it also
// combines the tokens it completes (pass_routing.cuh). `finish` holds
// [2][rows][finish_groups_cols] floats (it may alias the block's other shared data: the first
// barrier here orders it after their last use). in_block (finishes_in_block): the block wrote its
// sums into `finish` instead, and finishes without the counter.
__device__ __forceinline__ void finish_if_last(const PassArgs& a, int item_index, const PassItem& item, int rows,
                                               int col_group, int cols_per_block, float* finish, int* flag,
                                               bool in_block = false) {
  const int groups_per_finish = a.finish_groups_cols / cols_per_block;
  const int fg = col_group / groups_per_finish;
  const int fg_groups = min(groups_per_finish, a.col_groups - fg * groups_per_finish);
  wait_for_predecessor();  // the routing kernel zeroed the counters
  if (a.defer_finish) return;  // the down pass finishes these sums (GateUpSums)
  if (!in_block) {
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
  }
  finish_group(a, item, rows, fg, finish, in_block);  // its first barrier publishes in-block sums
}

// The prologue of both pass kernels. Launched as dependents (launch.hpp), they let the next kernel
// place its blocks as theirs finish; the block finds its work item (grid x), the down pass's first
// block column zeroes the output rows of tokens with no routed slot, and the result says whether
// the item has rows (an empty one has still waited for its predecessor: launch.hpp's rule, no
// block exits before that).
__device__ __forceinline__ bool begin_pass_block(const PassArgs& a, PassItem& item) {
  allow_dependents();
  find_pass_item(a.routing, a.items, a.num_items, a.order, static_cast<int>(a.pairs), blockIdx.x, item);
  if (a.combine.out != nullptr && blockIdx.y == 0 && blockIdx.z == 0)
    zero_unrouted_rows(a.combine, a.top_k, a.proj[0].w.N, blockIdx.x, gridDim.x);
  if (item.count > 0) return true;
  wait_for_predecessor();
  return false;
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
  __shared__ PassItem item;
  if (!begin_pass_block(a, item)) return;
  const int item_index = blockIdx.x;
  const int expert = item.expert, first = item.first, count = item.count;
  const int col_group = blockIdx.y;
  const int p = blockIdx.z / a.k_splits, split = blockIdx.z % a.k_splits;
  const PassProjection& pp = p == 0 ? a.proj[0] : a.proj[1];
  const DeviceProjection& w = pp.w;
  const int64_t N = w.N;

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

  if (threadIdx.x < 16) grid[threadIdx.x] = threadIdx.x < (1 << w.bits) ? w.grid[threadIdx.x] : 0.0f;
  stage_activations<deferred_split_batch(false, TC, 0)>(a, w, item, TC, k_tile0, k_tiles, kr, Fp32RowStore{{xs, xs_stride}});
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

  finish_if_last(a, item_index, item, TC, col_group, kColsPerBlock, finish, flag);
}

// Either pass kernel over the pass's grid: x = work item, y = column group, z = projection * splits
// + split; chained to the kernel before it when the plan says so (launch.hpp).
template <typename Kernel>
void launch_pass_kernel(Kernel kernel, int threads, const PassArgs& args, int64_t max_items, size_t shared_bytes,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(max_items), static_cast<unsigned>(args.col_groups),
                  static_cast<unsigned>(args.nproj * args.k_splits));
  launch_dependent(kernel, grid, dim3(threads), shared_bytes, stream, args.routing.programmatic != 0, args);
}

template <int TC, bool AFFINE>
void launch_one(const PassArgs& args, int64_t max_items, size_t shared_bytes, cudaStream_t stream) {
  launch_pass_kernel(projection_kernel<TC, AFFINE>, kProjThreads, args, max_items, shared_bytes, stream);
}

template <int TC, bool AFFINE>
void raise_shared_limit() {
  TMOE_CUDA_CHECK(cudaFuncSetAttribute(projection_kernel<TC, AFFINE>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
}

// ---------------------------------------------------------------------------------------------
// The pass trace (pass_trace.hpp): nothing unless -DTMOE_PASS_TRACE=1.
__device__ PassTraceRecord g_pass_trace[kPassTrace ? kPassTraceCapacity : 1];
__device__ unsigned long long g_pass_trace_count;
// The projection kernels' sink: the symbols themselves (the one-launch decode, another translation
// unit, gets their addresses from pass_trace_sink()).
__device__ __forceinline__ PassTraceSink projection_trace_sink() { return {g_pass_trace, &g_pass_trace_count}; }

// ---------------------------------------------------------------------------------------------
// The tensor-core kernel (affine grids; see projection.cuh).

// Units whose loads a warp keeps in flight (registers): 3 blocks of 8 warps per SM then hold
// ~24 x 4 x 384 B = 36 KB of 3-bit weights in flight per SM. (8 units at 2 blocks per SM, 48 KB,
// was 5-20% slower: docs/notes-cuda.md, v8; 6 units with the v11 decode: equal, notes "v11".)
// -DTMOE_UNITS_IN_FLIGHT=N: another value, for A/B runs (scripts/gpu-ab).
#ifndef TMOE_UNITS_IN_FLIGHT
#define TMOE_UNITS_IN_FLIGHT 4
#endif
inline constexpr int kUnitsInFlight = TMOE_UNITS_IN_FLIGHT;
// Blocks per SM the launch bounds ask for (registers). 4-row items come in two variants, 3 blocks
// (80 registers) and 4 (64 registers, more warps to hide latency, a few spills and ~8% more
// instructions per unit); 8-row items in 2 (128 registers) and 3 (80): the planner picks one per
// pass (PassArgs::mma_dense). 16-row items: 2.
TMOE_HD constexpr int mma_min_blocks(int mma_blocks, bool dense) {
  return mma_blocks == 1 ? (dense ? kMmaDenseBlocks : kMmaDenseBlocks - 1) : mma_blocks == 2 && dense ? 3 : 2;
}
// Whether the CB-block kernel has a dense variant.
template <int CB>
inline constexpr bool kMmaDenseBuilt = CB <= 2;

// One 32-bit word of a unit (read-only, streamed once), with the L2::256B prefetch hint (each
// 128-byte warp request also brings the next 128 bytes of the warp's stream into L2; the 256-byte
// block lies inside the 256-byte aligned allocation): 3-6% faster at 1..4 tokens, equal at 16..64
// (notes-cuda.md, v8). -DTMOE_MMA_L2_256=0 turns it off.
__device__ __forceinline__ uint32_t load_unit_word(const uint32_t* p) {
#if !defined(TMOE_MMA_L2_256) || TMOE_MMA_L2_256
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
#else
  return __ldg(p);
#endif
}

// Stage B fragments straight from registers when the Hadamard block is at most 16
// (mma_projection_block): 1 token mixtral/deepseek -3% on H100 (notes-cuda.md, v14).
// -DTMOE_MMA_FUSED_STAGING=0 forces the two-phase staging (fp32 rows, then B fragments), for A/B runs.
#ifndef TMOE_MMA_FUSED_STAGING
#define TMOE_MMA_FUSED_STAGING 1
#endif
inline constexpr bool kMmaFusedStaging = TMOE_MMA_FUSED_STAGING != 0;
// A block stages only its item's rows (count) instead of the pass's used_rows, leaving the other
// rows' shared memory as it is. Their B columns, tile sums and group sums feed only accumulator
// columns of rows that are never written (an mma column depends on its B column alone), so any
// value there, NaN included, is harmless. Saves the zero rows' staging (~150 instructions and 4
// bank-conflicted stores per k-tile row; about half the staged rows of mixtral's 8-row items at 16
// tokens, ncu in notes-cuda.md "v15"): 4-16 tokens -1.5 to -5% on H100 (notes "v17").
// -DTMOE_MMA_STAGE_COUNT_ROWS=0 stages every used row (zeros past count), for A/B runs.
#ifndef TMOE_MMA_STAGE_COUNT_ROWS
#define TMOE_MMA_STAGE_COUNT_ROWS 1
#endif
inline constexpr bool kMmaStageCountRows = TMOE_MMA_STAGE_COUNT_ROWS != 0;

TMOE_HD constexpr int mma_xs_stride(int kr) { return kr * kTileDim + kTileDim; }  // +16: row banks alternate

// One block of the tensor-core kernel for a projection of BITS bits; CB 8-column mma blocks
// (items of up to 4 CB rows). QUAD_GROUPS: the scale group is a multiple of 64 (whole units), so
// the group-boundary test runs once per unit instead of once per k-tile. DEFERRED_BATCH: the
// kernel's deferred staging of h (deferred_split_batch of the kernel's bits, not the block's).
template <int BITS, int CB, bool QUAD_GROUPS, int DEFERRED_BATCH>
__device__ __forceinline__ void mma_projection_block(const PassArgs& a, int item_index, const PassItem& item, int p,
                                                     int split, int col_group, BlockTrace& trace) {
  const int expert = item.expert, first = item.first, count = item.count;
  constexpr int kUnitWords = 32 * BITS;
  const PassProjection& pp = p == 0 ? a.proj[0] : a.proj[1];
  const DeviceProjection& w = pp.w;
  const int64_t N = w.N;

  extern __shared__ float shared[];
  const int kr = a.k_tiles_per_block;  // a multiple of 4: splits start at a unit
  const int xs_stride = mma_xs_stride(kr);
  // Rows staged: the most any item of this call holds (1 at one token). The B lanes of the kernel's
  // other rows read the last staged row: their products land in accumulator columns of rows that
  // are never written out, so they need no row of zeros (v12 staged one: 16 KB per block at
  // K = 4096; mma_pass_shared_bytes sizes the same way).
  const int used_rows = a.routing.tokens_per_item;
  const int min_group_size = a.nproj == 2 ? min(a.proj[0].w.group_size, a.proj[1].w.group_size) : w.group_size;
  float* xs = shared;                              // [used_rows][xs_stride]: fp32, then B fragments
  float* tile_sums = xs + used_rows * xs_stride;      // [used_rows][kr]: sum of x over a k-tile row
  float* group_sums = tile_sums + used_rows * kr;     // [used_rows][kr]: (grid0/step - bias) * sums
  float* block_scales = group_sums + used_rows * kr;  // [groups][n-tile w][g][lo, hi]: fp32 scales
  float* finish = shared;                             // [2][used_rows][finish cols], after the loop
  int* flag = reinterpret_cast<int*>(shared + mma_shared_floats(used_rows, kr, a.finish_groups_cols, min_group_size));

  const int k_tile0 = split * kr;
  const int k_tiles = min(static_cast<int64_t>(kr), w.tiles_k() - k_tile0);
  const int quads = (k_tiles + kQuadTiles - 1) / kQuadTiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n_tile0 = static_cast<int64_t>(col_group) * kMmaWarps;  // the block's first n-tile
  const int64_t n_tile = n_tile0 + warp;
  const bool active = n_tile < w.tiles_n();

  // --- the first units go out before anything else: they depend only on the item.
  const uint32_t* units = active ? w.unit(expert, n_tile, k_tile0 / kQuadTiles) + lane : nullptr;
  uint32_t ring[kUnitsInFlight][BITS];
#pragma unroll
  for (int d = 0; d < kUnitsInFlight; ++d)
    if (active && d < quads)
#pragma unroll
      for (int v = 0; v < BITS; ++v) ring[d][v] = load_unit_word(units + d * kUnitWords + v * 32);

  // --- the block's scales, copied now (cp.async: they land while the activations are staged) and
  // turned into fp32 (lo, hi) pairs below, so a flush reads its two scales with one shared load
  // (v12 loaded them from global memory in the main loop: two 16-bit loads, their conversions and
  // 64-bit pointer steps per group). Slot (local group, n-tile) is 64 bytes; its fp16 scales land in
  // its second half, and the thread that copied them rewrites the slot in place.
  const int tiles_per_group = w.group_size / kTileDim;
  const int group0 = k_tile0 / tiles_per_group, last_group = (k_tile0 + k_tiles - 1) / tiles_per_group;
  const int local_groups = last_group - group0 + 1;  // <= mma_block_groups(kr, group size)
  const int block_n_tiles = static_cast<int>(min(static_cast<int64_t>(kMmaWarps), w.tiles_n() - n_tile0));
  const uint16_t* expert_scales = w.scales + (static_cast<int64_t>(expert) * w.groups() + group0) * N + n_tile0 * kTileDim;
  for (int i = threadIdx.x; i < local_groups * kMmaWarps; i += blockDim.x) {
    const int lg = i / kMmaWarps, t = i % kMmaWarps;
    if (t >= block_n_tiles) continue;
    const uint16_t* src = expert_scales + lg * N + t * kTileDim;
    uint8_t* slot = reinterpret_cast<uint8_t*>(block_scales + i * kTileDim);
    cp_async16(slot + 32, src);
    cp_async16(slot + 48, src + 8);
  }
  cp_async_commit();

  // --- activations in B-fragment order, and the affine term's sums. Staged rows past the item's
  // count are zeros (no loads, no conversion; not staged at all with kMmaStageCountRows): zeros are
  // zeros in B-fragment order too, and the sums of those rows only reach outputs that are never
  // written. With a Hadamard block of at most 16
  // (the whole transform in registers) the staging writes B fragments and tile sums straight from
  // its registers; otherwise it writes fp32 rows (the wider Hadamard passes run on them) and a
  // second phase converts them in place (one barrier and a shared-memory round trip more).
  const int staged_rows = kMmaStageCountRows ? count : used_rows;
  const FragmentRowStore fragment_store{{xs, xs_stride}, tile_sums, kr};
  if (kMmaFusedStaging && w.hadamard <= kTileDim) {
    stage_activations<DEFERRED_BATCH>(a, w, item, staged_rows, k_tile0, k_tiles, quads * kQuadTiles, fragment_store);
  } else {
    stage_activations<DEFERRED_BATCH>(a, w, item, staged_rows, k_tile0, k_tiles, quads * kQuadTiles,
                                      Fp32RowStore{{xs, xs_stride}});
    const int kt_staged = quads * kQuadTiles;
    for (int i = threadIdx.x; i < count * kt_staged; i += blockDim.x) {
      const int t = i / kt_staged, kt = i - t * kt_staged;
      float v[kTileDim];
      fragment_store.load(t, kt, v);
      fragment_store(t, kt, v);
    }
    __syncthreads();
  }
  // The block's scales, converted in the same phase as the group sums (its barrier publishes them).
  cp_async_wait<0>();  // this thread's scale copies (it alone rewrites their slots)
  for (int i = threadIdx.x; i < local_groups * kMmaWarps; i += blockDim.x) {
    if (i % kMmaWarps >= block_n_tiles) continue;
    float4* slot = reinterpret_cast<float4*>(block_scales + i * kTileDim);
    const uint4 lo = reinterpret_cast<const uint4*>(slot)[2], hi = reinterpret_cast<const uint4*>(slot)[3];
    const uint32_t lo_words[4] = {lo.x, lo.y, lo.z, lo.w}, hi_words[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int q = 0; q < 4; ++q)  // lanes g = 2q, 2q + 1: columns g and g + 8
      slot[q] = make_float4(half_bits_to_float(static_cast<uint16_t>(lo_words[q])),
                            half_bits_to_float(static_cast<uint16_t>(hi_words[q])),
                            half_bits_to_float(static_cast<uint16_t>(lo_words[q] >> 16)),
                            half_bits_to_float(static_cast<uint16_t>(hi_words[q] >> 16)));
  }
  // (grid0/step - bias) times the sum of x over each scale group's part of the K range: the affine
  // grid's constant term less the decode bias the products carry (fragment_decode.cuh). (v8's
  // first version summed a group's values serially in one thread: up to 1024 dependent shared loads.)
  const float group_coefficient = pp.grid0_over_step - static_cast<float>(kDecodeBias<BITS>);
  for (int i = threadIdx.x; i < count * local_groups; i += blockDim.x) {
    const int t = i / local_groups, g = i - t * local_groups;
    const int kt_begin = max(0, (group0 + g) * tiles_per_group - k_tile0);
    const int kt_end = min(k_tiles, (group0 + g + 1) * tiles_per_group - k_tile0);
    float sum = 0.0f;
    for (int kt = kt_begin; kt < kt_end; ++kt) sum += tile_sums[t * kr + kt];
    group_sums[t * kr + g] = sum * group_coefficient;
  }
  __syncthreads();
  trace.mark(1);

  // --- the warp's n-tile over the K range: decode, mma, flush at each scale group's end.
  const int g = lane >> 2, tq = lane & 3;
  // acc holds one scale group's products; the flush adds the group's affine term (which removes the
  // decode bias), scales the sums into the fp32 totals and zeroes acc, so the bias cancels within
  // one group's sums and its fp32 error never grows with the K range
  // (CudaMoe.ActivationsFarFromZeroMean).
  float acc[CB][4], total[CB][2];
#pragma unroll
  for (int c = 0; c < CB; ++c) {
    acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.0f;
    total[c][0] = total[c][1] = 0.0f;
  }
  if (active) {
    // B columns of mma block c read item row 4 c + g / 2, accumulator rows are 4 c + tq; rows past
    // the used ones read the last used row (their columns are never written out).
    const uint32_t* b_src[CB];
    const float* my_group_sums[CB];
#pragma unroll
    for (int c = 0; c < CB; ++c) {
      const int row = min(c * kMmaRowsPerBlock + (g >> 1), used_rows - 1);
      b_src[c] = reinterpret_cast<const uint32_t*>(xs) + row * xs_stride + (tq * 2 + (g & 1)) * 2;
      my_group_sums[c] = group_sums + min(c * kMmaRowsPerBlock + tq, used_rows - 1) * kr;
    }
    // This lane's output columns n0 = 16 n_tile + g and n0 + 8: their scales, group by group.
    const float2* my_scales = reinterpret_cast<const float2*>(block_scales) + warp * (kTileDim / 2) + g;
    int group = 0;  // local
    int left = tiles_per_group - k_tile0 % tiles_per_group;  // k-tiles left in the current group
    auto flush = [&]() {
      const float2 scale = my_scales[group * (kMmaColsPerBlock / 2)];
#pragma unroll
      for (int c = 0; c < CB; ++c) {
        const float affine_term = my_group_sums[c][group];
        total[c][0] = fmaf(scale.x, (acc[c][0] + affine_term) + acc[c][1], total[c][0]);
        total[c][1] = fmaf(scale.y, (acc[c][2] + affine_term) + acc[c][3], total[c][1]);
        acc[c][0] = acc[c][1] = acc[c][2] = acc[c][3] = 0.0f;
      }
      ++group;
      left = tiles_per_group;
    };
    const uint32_t* next_unit = units + kUnitsInFlight * kUnitWords;  // the unit to load next
    // -DTMOE_MMA_SKIP_MAIN_LOOP=1 (a measurement build, wrong results): everything but this loop,
    // to time a block's fixed work (scripts/gpu-ab ... noloop=.:-DTMOE_MMA_SKIP_MAIN_LOOP=1).
#ifndef TMOE_MMA_SKIP_MAIN_LOOP
#define TMOE_MMA_SKIP_MAIN_LOOP 0
#endif
    // One iteration over the kUnitsInFlight ring slots from unit q0. CHECKED: the last iterations,
    // where a unit may be past the range, a refill may have nothing left to load and the range may
    // end inside a scale group; the others (all but the last 1-2) skip those tests (static main
    // loop 370 -> 330 per 4 units, sass-loops; 1 token mixtral 82.7 -> 73.8 us on an H200, notes
    // "v12"). The body is written once and instantiated twice.
    auto ring_iteration = [&](auto checked, int q0) {
      constexpr bool kChecked = decltype(checked)::value;
#pragma unroll
      for (int d = 0; d < kUnitsInFlight; ++d) {
        const int q = q0 + d;
        if (kChecked && q >= quads) break;
        // Decode the slot, then refill it: the load goes out ~30 instructions later than it could,
        // but into the same registers (loading first needed a second set and ~19 moves per unit).
        uint32_t pairs[16];
        decode_unit_pairs<BITS>(ring[d], pairs);
        if (!kChecked || q + kUnitsInFlight < quads) {
#pragma unroll
          for (int v = 0; v < BITS; ++v) ring[d][v] = load_unit_word(next_unit + v * 32);
        }
        next_unit += kUnitWords;
#pragma unroll
        for (int i = 0; i < kQuadTiles; ++i) {
          const int kt = q * kQuadTiles + i;
#pragma unroll
          for (int c = 0; c < CB; ++c) {
            const uint2 b = *reinterpret_cast<const uint2*>(b_src[c] + kt * kTileDim);
            mma_bf16(acc[c], pairs[4 * i], pairs[4 * i + 1], pairs[4 * i + 2], pairs[4 * i + 3], b.x, b.y);
          }
          if constexpr (!QUAD_GROUPS) {
            if (kChecked ? kt < k_tiles && (--left == 0 || kt + 1 == k_tiles) : --left == 0) flush();
          }
        }
        if constexpr (QUAD_GROUPS) {
          left -= kQuadTiles;
          if (left == 0 || (kChecked && q + 1 == quads)) flush();
        }
      }
    };
    const int main_quads = TMOE_MMA_SKIP_MAIN_LOOP ? 0 : quads;
    int q0 = 0;
    // Unchecked while every unit of this iteration and of the next (the refills) is in range.
    for (; q0 + 2 * kUnitsInFlight <= main_quads; q0 += kUnitsInFlight) ring_iteration(std::false_type{}, q0);
    for (; q0 < main_quads; q0 += kUnitsInFlight) ring_iteration(std::true_type{}, q0);
    // Partial sums of this split: rows tq + 4 c, columns n0 and n0 + 8.
#pragma unroll
    for (int c = 0; !finishes_in_block(a.nproj, a.k_splits, a.finish_groups_cols) && c < CB; ++c) {
      const int t = c * kMmaRowsPerBlock + tq;
      if (t < count) {
        float* dst = a.partial + ((static_cast<int64_t>(p) * a.k_splits + split) * a.pairs + first + t) * N + n_tile * kTileDim + g;
        dst[0] = total[c][0] * pp.step;
        dst[8] = total[c][1] * pp.step;
      }
    }
  }
  trace.mark(2);
  // (The rule is read from the kernel parameters here and above: a flag kept over the main loop
  // costs registers.)
  const bool in_block = finishes_in_block(a.nproj, a.k_splits, a.finish_groups_cols);
  if (in_block) {
    // Straight into the finish rows, as finish_group's split loop would have left them. They alias
    // the staged activations and scales: every warp must be past its main loop first.
    __syncthreads();
    const float norm = w.hadamard ? rsqrtf(static_cast<float>(w.hadamard)) : 1.0f;
#pragma unroll
    for (int c = 0; c < CB; ++c) {
      const int t = c * kMmaRowsPerBlock + tq;
      if (active && t < count) {
        float* dst = finish + t * a.finish_groups_cols + warp * kTileDim + g;
        dst[0] = total[c][0] * pp.step * norm;
        dst[8] = total[c][1] * pp.step * norm;
      }
    }
  }
  finish_if_last(a, item_index, item, used_rows, col_group, kMmaColsPerBlock, finish, flag, in_block);
}

// BITS: the bit width of every projection of the pass (one copy of the block in the kernel), or 0
// for passes whose gate and up differ (a run-time switch over three copies).
template <int CB, bool QUAD_GROUPS, int BITS, bool DENSE>
__global__ void __launch_bounds__(kMmaThreads, mma_min_blocks(CB, DENSE))
mma_projection_kernel(const __grid_constant__ PassArgs a) {
  BlockTrace trace;
  trace.mark(0);
  const int pass = a.nproj == 2 ? 0 : 1;
  __shared__ PassItem item;
  if (!begin_pass_block(a, item)) {
    trace.write(pass, projection_trace_sink());
    return;
  }
  const int item_index = blockIdx.x;
  const int p = blockIdx.z / a.k_splits, split = blockIdx.z % a.k_splits;
  constexpr int kDeferredBatch = deferred_split_batch(true, CB * kMmaRowsPerBlock, BITS);
  if constexpr (BITS != 0) {
    mma_projection_block<BITS, CB, QUAD_GROUPS, kDeferredBatch>(a, item_index, item, p, split, blockIdx.y, trace);
  } else {
    switch (a.proj[p == 0 ? 0 : 1].w.bits) {
      case 2: mma_projection_block<2, CB, QUAD_GROUPS, kDeferredBatch>(a, item_index, item, p, split, blockIdx.y, trace); break;
      case 4: mma_projection_block<4, CB, QUAD_GROUPS, kDeferredBatch>(a, item_index, item, p, split, blockIdx.y, trace); break;
      default: mma_projection_block<3, CB, QUAD_GROUPS, kDeferredBatch>(a, item_index, item, p, split, blockIdx.y, trace); break;
    }
  }
  trace.write(pass, projection_trace_sink());
}

template <int CB, bool QUAD_GROUPS, int BITS>
void launch_mma(const PassArgs& args, int64_t max_items, size_t shared_bytes, cudaStream_t stream) {
  const auto sparse = mma_projection_kernel<CB, QUAD_GROUPS, BITS, false>;
  const auto dense = mma_projection_kernel<CB, QUAD_GROUPS, BITS, kMmaDenseBuilt<CB>>;
  launch_pass_kernel(args.mma_dense ? dense : sparse, kMmaThreads, args, max_items, shared_bytes, stream);
}

template <int CB, bool QUAD_GROUPS>
void launch_mma_bits(const PassArgs& args, int64_t max_items, size_t shared_bytes, cudaStream_t stream) {
  const int bits = args.proj[0].w.bits;
  const bool same = args.nproj == 1 || args.proj[1].w.bits == bits;
  switch (same ? bits : 0) {
    case 2: launch_mma<CB, QUAD_GROUPS, 2>(args, max_items, shared_bytes, stream); break;
    case 3: launch_mma<CB, QUAD_GROUPS, 3>(args, max_items, shared_bytes, stream); break;
    case 4: launch_mma<CB, QUAD_GROUPS, 4>(args, max_items, shared_bytes, stream); break;
    default: launch_mma<CB, QUAD_GROUPS, 0>(args, max_items, shared_bytes, stream); break;
  }
}

template <int CB>
void launch_mma_groups(const PassArgs& args, int64_t max_items, size_t shared_bytes, cudaStream_t stream) {
  bool quad_groups = true;
  for (int p = 0; p < args.nproj; ++p) quad_groups = quad_groups && args.proj[p].w.group_size % kQuadK == 0;
  if (quad_groups) launch_mma_bits<CB, true>(args, max_items, shared_bytes, stream);
  else launch_mma_bits<CB, false>(args, max_items, shared_bytes, stream);
}

template <int CB, bool DENSE>
void raise_mma_shared_limit() {
  for (auto kernel : {mma_projection_kernel<CB, true, 0, DENSE>, mma_projection_kernel<CB, true, 2, DENSE>,
                      mma_projection_kernel<CB, true, 3, DENSE>, mma_projection_kernel<CB, true, 4, DENSE>,
                      mma_projection_kernel<CB, false, 0, DENSE>, mma_projection_kernel<CB, false, 2, DENSE>,
                      mma_projection_kernel<CB, false, 3, DENSE>, mma_projection_kernel<CB, false, 4, DENSE>})
    TMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
}
}  // namespace

void prepare_projection_kernels() {
  raise_shared_limit<1, false>();
  raise_shared_limit<1, true>();
  raise_shared_limit<2, false>();
  raise_shared_limit<2, true>();
  raise_shared_limit<4, false>();
  raise_shared_limit<4, true>();
  raise_mma_shared_limit<1, false>();
  raise_mma_shared_limit<1, true>();
  if constexpr (kMmaBlocksBuilt<2>) raise_mma_shared_limit<2, false>();
  if constexpr (kMmaBlocksBuilt<2>) raise_mma_shared_limit<2, true>();
  if constexpr (kMmaBlocksBuilt<4>) raise_mma_shared_limit<4, false>();
}

bool pass_trace_built() { return kPassTrace; }

PassTraceSink pass_trace_sink() {
  PassTraceSink sink;
  if constexpr (kPassTrace) {
    TMOE_CUDA_CHECK(cudaGetSymbolAddress(reinterpret_cast<void**>(&sink.records), g_pass_trace));
    TMOE_CUDA_CHECK(cudaGetSymbolAddress(reinterpret_cast<void**>(&sink.count), g_pass_trace_count));
  }
  return sink;
}

void pass_trace_begin() {
  if constexpr (kPassTrace) {
    const unsigned long long zero = 0;
    TMOE_CUDA_CHECK(cudaDeviceSynchronize());
    TMOE_CUDA_CHECK(cudaMemcpyToSymbol(g_pass_trace_count, &zero, sizeof zero));
  }
}

std::vector<PassTraceRecord> pass_trace_end(uint64_t* dropped) {
  std::vector<PassTraceRecord> records;
  if (dropped != nullptr) *dropped = 0;
  if constexpr (kPassTrace) {
    TMOE_CUDA_CHECK(cudaDeviceSynchronize());
    unsigned long long count = 0;
    TMOE_CUDA_CHECK(cudaMemcpyFromSymbol(&count, g_pass_trace_count, sizeof count));
    const size_t kept = static_cast<size_t>(std::min<unsigned long long>(count, kPassTraceCapacity));
    records.resize(kept);
    if (kept > 0)
      TMOE_CUDA_CHECK(cudaMemcpyFromSymbol(records.data(), g_pass_trace, kept * sizeof(PassTraceRecord)));
    if (dropped != nullptr) *dropped = count - kept;
  }
  return records;
}

size_t mma_pass_shared_bytes(int tokens, int k_tiles_per_block, int finish_cols, int min_group_size) {
  return (mma_shared_floats(tokens, k_tiles_per_block, finish_cols, min_group_size) + 4) * sizeof(float);
}

int mma_projection_blocks_per_sm(int tokens_per_item, bool dense, size_t shared_bytes) {
  int blocks = 0;
  auto query = [&](auto kernel) {
    TMOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kMmaThreads, shared_bytes));
  };
  switch (mma_item_rows(tokens_per_item)) {
    case 4: dense ? query(mma_projection_kernel<1, true, 0, true>) : query(mma_projection_kernel<1, true, 0, false>); break;
    case 8:
      if constexpr (kMmaBlocksBuilt<2>)
        dense ? query(mma_projection_kernel<2, true, 0, true>) : query(mma_projection_kernel<2, true, 0, false>);
      break;
    default: if constexpr (kMmaBlocksBuilt<4>) query(mma_projection_kernel<4, true, 0, false>); break;
  }
  return std::max(blocks, 1);
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
  if (tensor_core_pass(args.proj, args.nproj)) {
    if (tokens_per_item > kMaxMmaItemTokens)
      throw Error(ErrorKind::internal, "projection pass: items of " + std::to_string(tokens_per_item) +
                                           " rows; the tensor-core kernel takes up to " +
                                           std::to_string(kMaxMmaItemTokens));
    switch (mma_item_rows(tokens_per_item)) {
      case 4: launch_mma_groups<1>(args, max_items, shared_bytes, stream); break;
      case 8: if constexpr (kMmaBlocksBuilt<2>) launch_mma_groups<2>(args, max_items, shared_bytes, stream); break;
      default: if constexpr (kMmaBlocksBuilt<4>) launch_mma_groups<4>(args, max_items, shared_bytes, stream); break;
    }
    TMOE_CUDA_CHECK(cudaGetLastError());
    return;
  }
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

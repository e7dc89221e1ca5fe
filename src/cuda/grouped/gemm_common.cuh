// What the grouped path's two GEMM kernels share (gemm_mma.cu: grouped_gemm, mma.sync, sm_80 on;
// gemm_wgmma.cu: grouped_gemm_wgmma, sm_90a) with each other and with the host code that launches
// them (grouped_moe.cu): tiling constants, the kernels' parameters, PTX wrappers, the decode of a
// lane's weights into fragments, the weight-side copies, the epilogue, and the kernels' launch
// entry points. Device code and inline host helpers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "cuda/fragment_decode.cuh"
#include "cuda/grouped/grouped_moe.cuh"
#include "cuda/grouped/weight_decode.cuh"
#include "cuda/staging.cuh"  // half_bits_to_float
#include "tmoe/error.hpp"
#include "tmoe/trellis_decode.hpp"

namespace tmoe::cuda::grouped {

// ---- tiling constants of grouped_gemm -------------------------------------------------------
// A block computes BM rows (pairs of one expert) x kBN output columns (split between the
// projections it runs: gate+up get 64 columns each, so SwiGLU pairs stay in one thread's
// registers). kBK = 64 gives each pipeline stage 4 tiles of K (one fragment-layout quad). Warps
// sit 4 side by side (columns), each owning 32 columns = two units; every warp decodes its own
// units in registers, so warps stacked along the rows would decode the same units again: tiles of
// up to 128 rows use one warp row (a warp then holds up to 128 x 32 fp32 accumulators), 256-row
// tiles two. Row-tile heights, chosen from the average rows per expert (tile_rows_for): kRows32
// and kRows64 when experts hold few rows (a taller tile would mostly multiply padding and hold
// fewer blocks per SM), kRows128, and kRows256 (one block per SM) for well-filled experts.
constexpr int kBN = 128, kBK = 64;
constexpr int kRows32 = 32, kRows64 = 64, kRows128 = 128, kRows256 = 256;
constexpr int threads_for(int rows) { return rows == kRows256 ? 256 : 128; }
// Blocks per SM (launch bounds; shared memory ~50 / ~68 / ~107 / ~180 KB per block).
constexpr int blocks_per_sm_for(int rows) {
  return rows == kRows256 ? 1 : rows == kRows128 ? 2 : rows == kRows64 ? 3 : 4;
}
// cp.async stages in flight: 4 for every height (3 ahead). Tiles with few valid rows (small T)
// are bound by the latency of their weight stream, not by issue: more bytes in flight per SM.
constexpr int stages_for(int) { return 4; }
constexpr int kKTiles = kBK / kTileDim;     // 4 tiles of K per stage
constexpr int kRowPad = 8;                  // halves: 144-byte rows make ldmatrix conflict-free
constexpr int kAStride = kBK + kRowPad;     // A stage [BM][kAStride] bf16
constexpr int kMaxBits = 4;
constexpr int kMaxGrid = 16;

enum Epilogue : int {
  kSwiglu = 0,     // gate/up: h = silu(g . sv_g) * (u . sv_u) -> bf16 [pairs, I]
  kRawPair = 1,    // gate/up: raw fp32 G, U [pairs, I] (Hadamard path)
  kAtomic = 2,     // down: out_acc[t] += p * (d . sv_d) (float atomics)
  kRowsScaled = 3, // down: rows[r] = p * (d . sv_d) (fixed-order combine follows)
  kRowsRaw = 4,    // down: rows[r] = d (Hadamard path)
};

struct GemmParams {
  DeviceProjection proj[2];
  const __nv_bfloat16* su16[2]; // su as bf16 [E, K] (gate/up with hadamard = 0: folded into B)
  const __nv_bfloat16* a[2];    // A sources (a[1] used only with separate A operands)
  bool gather_tokens;           // A row of pair row r is order[r] / top_k (else r)
  int top_k;
  int64_t K, N;                 // of the projection(s)
  const int32_t* items;         // [max_items][2]: expert, first row
  const int32_t* num_items;
  const int32_t* offsets;
  const int32_t* order;
  const float* probs;
  int epilogue;
  int k_splits;                 // blocks along K (gridDim.z); > 1 only with kAtomic
  __nv_bfloat16* h;             // kSwiglu
  const uint16_t* h_su;         // kSwiglu: down's su (fp16 [E, N]) folded into h, or null
  float* g_raw;                 // kRawPair
  float* u_raw;
  float* rows;                  // kRowsScaled, kRowsRaw: [pairs, N]
  float* out_acc;               // kAtomic: [tokens, N]
};

// ---- small PTX wrappers --------------------------------------------------------------------
// 16 bytes from global to shared memory (src_bytes < 16: the rest zero-filled). The shared
// address form is for copy loops that compute their destinations once: the generic pointer form
// converts on every call (an S2R, a LEA and a subtraction in the SASS).
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(smem)), gmem, src_bytes);
}
// The same, issued only where `copy` (no branch around it).
__device__ __forceinline__ void cp_async16_if(bool copy, uint32_t smem, const void* gmem, int src_bytes = 16) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %0, 0;\n @p cp.async.cg.shared.global [%1], [%2], 16, %3;\n}\n" ::"r"(
          static_cast<int>(copy)),
      "r"(smem), "l"(gmem), "r"(src_bytes));
}
// A thread's 16-byte chunk of an activation row at k into shared memory: the A / X copies of both
// GEMM kernels. Only where row_valid (padding rows are not copied at all: an output row depends
// only on its own activation row, and padding rows are never stored); k past K (a last partial
// step) is zero-filled, read from the row's start.
__device__ __forceinline__ void cp_async_activation_chunk(bool row_valid, uint32_t smem, const __nv_bfloat16* row,
                                                          int k, int K) {
  const bool k_in = k < K;
  cp_async16_if(row_valid, smem, row + (k_in ? k : 0), k_in ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// v * sigmoid(v) with the approximate reciprocal (2 ulp; h is stored as bf16): the IEEE division
// put a check and a slow-path call in the gate/up epilogue's loop. For v < -87, exp overflows and
// the reciprocal of infinity is 0, so silu is -0 as it should be.
__device__ __forceinline__ float silu(float v) { return v * __fdividef(1.0f, 1.0f + __expf(-v)); }

// The four weight pairs of k-tile KT of one unit for this lane, in scaled_weight_pairs' order
// (weight_decode.cuh): the m16n8k16 A fragment of the unit's 16 columns (grouped_gemm_wgmma),
// or, as {out[0], out[2]} and {out[1], out[3]}, the B fragments of its left (columns g) and
// right (g + 8) halves (grouped_gemm). BITS_ALL = 2, 3, 4: compile-time bits and an affine grid;
// 0: a switch on `bits` and `affine`. Everything by value: a pointer to a register array would put
// it in local memory.
template <int BITS_ALL, int KT>
__device__ __forceinline__ void unit_weight_pairs(const uint32_t (&words)[kMaxBits], int bits, bool affine,
                                                  const uint32_t* level_pairs, uint2 coef_left,
                                                  uint2 coef_right, bool with_su, uint32_t su_low,
                                                  uint32_t su_high, uint32_t (&out)[4]) {
  auto decode = [&](auto bits_constant) {
    constexpr int BITS = decltype(bits_constant)::value;
    const uint32_t(&w)[BITS] = *reinterpret_cast<const uint32_t(*)[BITS]>(&words);
    if (BITS_ALL != 0 || affine)
      scaled_weight_pairs<BITS, KT, true>(w, level_pairs, coef_left, coef_right, with_su, su_low, su_high, out);
    else
      scaled_weight_pairs<BITS, KT, false>(w, level_pairs, coef_left, coef_right, with_su, su_low, su_high, out);
  };
  if constexpr (BITS_ALL != 0) {
    decode(std::integral_constant<int, BITS_ALL>{});
  } else {
    switch (bits) {
      case 2: decode(std::integral_constant<int, 2>{}); break;
      case 4: decode(std::integral_constant<int, 4>{}); break;
      default: decode(std::integral_constant<int, 3>{}); break;
    }
  }
}

template <int... I, typename F>
__device__ __forceinline__ void static_for(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}

// The epilogue of both GEMM kernels, in three parts so that a kernel can load what depends only on
// the column or only on the row once (grouped_gemm_wgmma: sv once per thread, the rows' router
// weights before its main loop; ncu, session 12: down's per-element dependent loads order ->
// probs -> multiply were a third of qwen3 16384's down kernel's stall samples).
// Column pair n, n + 1 (N is a multiple of 16, so n < N means n + 1 < N too): the sv factors
// (gate/up: sv_g, sv_u, then down's su folded into h, or 1; down: sv_d).
struct OutputColumns {
  float f[3][2];
};
template <int NUM_PROJ>
__device__ __forceinline__ OutputColumns output_columns(const GemmParams& p, int expert, int n) {
  const int64_t N = p.N, base = static_cast<int64_t>(expert) * N + n;
  OutputColumns c{{{1.0f, 1.0f}, {1.0f, 1.0f}, {1.0f, 1.0f}}};
  if (NUM_PROJ == 2 ? p.epilogue != kSwiglu : p.epilogue == kRowsRaw) return c;
  for (int j = 0; j < 2; ++j) {
    c.f[0][j] = half_bits_to_float(p.proj[0].sv[base + j]);
    if constexpr (NUM_PROJ == 2) {
      c.f[1][j] = half_bits_to_float(p.proj[1].sv[base + j]);
      if (p.h_su) c.f[2][j] = half_bits_to_float(p.h_su[base + j]);
    }
  }
  return c;
}
// Pair row r: down's router weight and the row its output goes to (kAtomic: the token's row of
// out_acc; else r itself).
struct OutputRow {
  float prob;
  int32_t dst;
};
template <int NUM_PROJ>
__device__ __forceinline__ OutputRow output_row(const GemmParams& p, int64_t r) {
  if (NUM_PROJ == 2 || p.epilogue == kRowsRaw) return {1.0f, static_cast<int32_t>(r)};
  const int32_t pair = p.order[r];
  return {p.probs[pair], p.epilogue == kAtomic ? pair / p.top_k : static_cast<int32_t>(r)};
}
// Columns n, n + 1 of pair row r (rows past the expert's valid rows are never passed): v0, v1 = the
// projection's (gate's) accumulators, u0, u1 = up's (NUM_PROJ == 2). By value: a pointer into a
// register array would move it to local memory. Applies sv, SwiGLU (and down's su) or the router
// weight and the combine.
template <int NUM_PROJ>
__device__ __forceinline__ void store_output(const GemmParams& p, const OutputColumns& c, OutputRow row, int64_t r,
                                             int n, float v0, float v1, float u0, float u1) {
  const int64_t N = p.N;
  if constexpr (NUM_PROJ == 2) {
    if (p.epilogue == kSwiglu) {
      const float h0 = silu(v0 * c.f[0][0]) * u0 * c.f[1][0] * c.f[2][0];
      const float h1 = silu(v1 * c.f[0][1]) * u1 * c.f[1][1] * c.f[2][1];
      *reinterpret_cast<uint32_t*>(&p.h[r * N + n]) = pack_bf16(h0, h1);
    } else {
      *reinterpret_cast<float2*>(&p.g_raw[r * N + n]) = make_float2(v0, v1);
      *reinterpret_cast<float2*>(&p.u_raw[r * N + n]) = make_float2(u0, u1);
    }
  } else {
    if (p.epilogue == kRowsRaw) {
      *reinterpret_cast<float2*>(&p.rows[r * N + n]) = make_float2(v0, v1);
      return;
    }
    const float d0 = v0 * c.f[0][0] * row.prob;
    const float d1 = v1 * c.f[0][1] * row.prob;
    if (p.epilogue == kAtomic) {
      float* dst = p.out_acc + static_cast<int64_t>(row.dst) * N + n;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      // One vector reduction for both columns (sm_90) where dst is 8-byte aligned: n and N are even,
      // so it is unless the caller's out_acc is not.
      if ((reinterpret_cast<uintptr_t>(dst) & 7) == 0) {
        atomicAdd(reinterpret_cast<float2*>(dst), make_float2(d0, d1));
        return;
      }
#endif
      atomicAdd(dst, d0);
      atomicAdd(dst + 1, d1);
    } else {
      *reinterpret_cast<float2*>(&p.rows[r * N + n]) = make_float2(d0, d1);
    }
  }
}
// All three for one element pair (grouped_gemm, whose threads own few elements of a row).
template <int NUM_PROJ>
__device__ __forceinline__ void store_output_pair(const GemmParams& p, int expert, int64_t r, int n,
                                                  float v0, float v1, float u0, float u1) {
  if (n >= p.N) return;
  store_output<NUM_PROJ>(p, output_columns<NUM_PROJ>(p, expert, n), output_row<NUM_PROJ>(p, r), r, n, v0, v1, u0,
                         u1);
}

// The row tile of a GEMM block: grid y = work item (expert, first row of up to `tile_rows`), grid
// x = block of `cols` columns of each projection. False when the block has nothing to do (past the
// routing's item count or the last column): it exits at once.
struct RowTile {
  int expert, row0, rows_valid, n0;
};
__device__ __forceinline__ bool find_row_tile(const GemmParams& p, int tile_rows, int cols, RowTile& t) {
  const int item = blockIdx.y;
  if (item >= *p.num_items) return false;
  t.n0 = blockIdx.x * cols;
  if (t.n0 >= p.N) return false;
  t.expert = p.items[2 * item];
  t.row0 = p.items[2 * item + 1];
  t.rows_valid = min(tile_rows, p.offsets[t.expert + 1] - t.row0);
  return true;
}

// The row of the A sources that valid row r of the tile reads (a token, or a pair row).
__device__ __forceinline__ int64_t a_row_index(const GemmParams& p, const RowTile& t, int r) {
  return p.gather_tokens ? p.order[t.row0 + r] / p.top_k : t.row0 + r;
}
// Where row r of the tile reads A operand `which` from (nullptr: a padding row, zero-filled).
__device__ __forceinline__ const __nv_bfloat16* a_row_source(const GemmParams& p, const RowTile& t, int which, int r) {
  if (r >= t.rows_valid) return nullptr;
  return p.a[which] + a_row_index(p, t, r) * p.K;
}

// Each projection's grid form and its table of level pairs (grid[i], grid[j]) as bf16x2, indexed
// by both fields of an index pair (the decode of non-affine grids), in shared memory.
template <int NUM_PROJ>
__device__ __forceinline__ void load_grid_tables(const GemmParams& p, GridForm (&grid)[NUM_PROJ],
                                                 uint32_t (&level_pairs)[NUM_PROJ][kMaxGrid * kMaxGrid],
                                                 int tid, int threads) {
  if (tid < NUM_PROJ) grid[tid] = grid_form(p.proj[tid].grid, p.proj[tid].bits);
  for (int i = tid; i < NUM_PROJ * kMaxGrid * kMaxGrid; i += threads) {
    const int q = i / (kMaxGrid * kMaxGrid), pair = i % (kMaxGrid * kMaxGrid);
    const int bits = p.proj[q].bits, mask = (1 << bits) - 1;
    if (pair < (1 << (2 * bits)))
      level_pairs[q][pair] = pack_bf16(p.proj[q].grid[pair & mask], p.proj[q].grid[pair >> bits]);
  }
}

// Runs main_loop(std::integral_constant<int, BITS_ALL>) with the block's decode variant: one for the
// whole block, BITS_ALL = 2, 3, 4 when all projections share those bits and have affine grids (the
// common case, and the fast one: no branches between the MMAs), else 0 (per-unit switches).
template <int NUM_PROJ, typename MainLoop>
__device__ __forceinline__ void with_decode_variant(const GemmParams& p, const GridForm (&grid)[NUM_PROJ],
                                                    MainLoop&& main_loop) {
  int common_bits = p.proj[0].bits;
#pragma unroll
  for (int q = 0; q < NUM_PROJ; ++q)
    if (p.proj[q].bits != common_bits || !grid[q].affine) common_bits = 0;
  switch (common_bits) {
    case 2: main_loop(std::integral_constant<int, 2>{}); break;
    case 3: main_loop(std::integral_constant<int, 3>{}); break;
    case 4: main_loop(std::integral_constant<int, 4>{}); break;
    default: main_loop(std::integral_constant<int, 0>{}); break;
  }
}

// One thread's fixed share of a K step's weight-side copies, in both GEMM kernels: 16-byte chunks
// of the block's raw units (chunk c = tid + THREADS i: unit c / 32, chunk c % 32; a unit of the
// step per PROJ_COLS / 16 n-tiles and projection) and 16-byte pieces of the step's scale rows and
// su (piece c = tid + THREADS i: one (k-tile, 8 columns) piece of a scale row for c <
// kScalePieces, then one of su, gate/up with su folded into the weights; one piece per thread
// where the block has enough threads). Everything that does not change between steps is found
// once per block (sources, shared-memory destinations, the scale row's shift), so a step costs a
// few instructions per copy: the copies are issued by the same warps that decode and multiply
// (ncu, session 12: ~100 of the wgmma kernel's ~400 instructions per warp and step were copy
// issue, a run-time division for the scale row among them). Pieces outside K / N are zero-filled
// (a zero scale or su makes padded weights zero).
template <int NUM_PROJ, int PROJ_COLS, int THREADS, bool FOLD_SU>
struct WeightCopies {
  static constexpr int kProjNTiles = PROJ_COLS / kTileDim;
  static constexpr int kChunksPerUnit = unit_bytes(kMaxBits) / 16;
  static constexpr int kUnitChunks = NUM_PROJ * kProjNTiles * kChunksPerUnit;
  static constexpr int kUnitCopies = (kUnitChunks + THREADS - 1) / THREADS;
  static constexpr int kScalePieces = NUM_PROJ * kKTiles * (PROJ_COLS / 8);
  static constexpr int kMetaPieces = kScalePieces + (FOLD_SU ? NUM_PROJ * (kBK / 8) : 0);
  static constexpr int kMetaCopies = (kMetaPieces + THREADS - 1) / THREADS;
  static constexpr uint32_t kNoCopy = ~0u;  // the destination of a copy slot with nothing to copy

  // Units: step 0's source, stage 0's shared-memory destination (kNoCopy: none), bytes per step.
  const uint32_t* unit_src[kUnitCopies];
  uint32_t unit_dst[kUnitCopies];
  int unit_step_bytes[kUnitCopies];
  // Scale and su pieces: the piece at k (k = its k-tile's first k in the step) is row
  // k >> meta_shift of meta_src (k / meta_divisor where the group size is not a power of two),
  // rows meta_row_bytes apart: scales' rows are the expert's groups (N halves apart), su's "rows"
  // its single halves (shift 0). meta_src nullptr: columns past N (zero-filled).
  const uint16_t* meta_src[kMetaCopies];
  uint32_t meta_dst[kMetaCopies];  // stage 0's; kNoCopy: none
  uint32_t meta_stage_bytes[kMetaCopies];
  int meta_k[kMetaCopies], meta_shift[kMetaCopies], meta_divisor[kMetaCopies], meta_row_bytes[kMetaCopies];

  // units0: stage 0's units as [unit][words] (unit = projection * kProjNTiles + n-tile);
  // scales0 / su0: stage 0's [NUM_PROJ][kKTiles][PROJ_COLS] / [NUM_PROJ][kBK]; *_stage_bytes: the
  // distance between two stages of each.
  __device__ __forceinline__ WeightCopies(const GemmParams& p, int tid, int expert, int n0, uint32_t* units0,
                                          uint16_t* scales0, uint16_t* su0, uint32_t scale_stage_bytes,
                                          uint32_t su_stage_bytes) {
    const int K = static_cast<int>(p.K), N = static_cast<int>(p.N);
#pragma unroll
    for (int i = 0; i < kUnitCopies; ++i) {
      const int c = tid + i * THREADS;
      const int chunk = c % kChunksPerUnit, u = c / kChunksPerUnit;
      const int q = u / kProjNTiles, nt = u % kProjNTiles;
      unit_src[i] = p.proj[0].units;  // never read (kNoCopy)
      unit_dst[i] = kNoCopy;
      unit_step_bytes[i] = 0;
      if (c < kUnitChunks) {
        const DeviceProjection& w = p.proj[q];
        const int gn = n0 / kTileDim + nt;
        if (chunk * 16 < unit_bytes(w.bits) && gn < N / kTileDim) {
          unit_src[i] = w.unit(expert, gn, 0) + chunk * 4;
          unit_step_bytes[i] = 4 * unit_words(w.bits);
          unit_dst[i] = static_cast<uint32_t>(__cvta_generic_to_shared(units0 + u * unit_words(kMaxBits) + chunk * 4));
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kMetaCopies; ++i) {
      const int c = tid + i * THREADS;
      meta_src[i] = nullptr;
      meta_dst[i] = kNoCopy;
      meta_stage_bytes[i] = 0;
      meta_k[i] = 0;
      meta_shift[i] = 0;
      meta_divisor[i] = 1;
      meta_row_bytes[i] = 2;
      if (c < kScalePieces) {
        const int chunk = c % (PROJ_COLS / 8), kt = (c / (PROJ_COLS / 8)) % kKTiles;
        const int q = c / ((PROJ_COLS / 8) * kKTiles);
        const DeviceProjection& w = p.proj[q];
        meta_k[i] = kt * kTileDim;
        const int group = w.group_size;
        meta_shift[i] = (group & (group - 1)) == 0 ? __ffs(group) - 1 : -1;
        meta_divisor[i] = group;
        meta_row_bytes[i] = 2 * N;
        if (n0 + chunk * 8 < N)
          meta_src[i] = w.scales + static_cast<int64_t>(expert) * w.groups() * N + n0 + chunk * 8;
        meta_dst[i] = static_cast<uint32_t>(__cvta_generic_to_shared(scales0 + (q * kKTiles + kt) * PROJ_COLS + chunk * 8));
        meta_stage_bytes[i] = scale_stage_bytes;
      } else if (c < kMetaPieces) {
        const int chunk = (c - kScalePieces) % (kBK / 8), q = (c - kScalePieces) / (kBK / 8);
        meta_k[i] = chunk * 8;
        meta_src[i] = reinterpret_cast<const uint16_t*>(p.su16[q]) + static_cast<int64_t>(expert) * K;
        meta_dst[i] = static_cast<uint32_t>(__cvta_generic_to_shared(su0 + q * kBK + meta_k[i]));
        meta_stage_bytes[i] = su_stage_bytes;
      }
    }
  }

  // The copies of step kb into stage `stage`, whose units lie unit_stage_bytes after stage 0's.
  __device__ __forceinline__ void issue(const GemmParams& p, int stage, int kb, uint32_t unit_stage_bytes) const {
#pragma unroll
    for (int i = 0; i < kUnitCopies; ++i)
      cp_async16_if(unit_dst[i] != kNoCopy, unit_dst[i] + stage * unit_stage_bytes,
                    reinterpret_cast<const uint8_t*>(unit_src[i]) + static_cast<int64_t>(kb) * unit_step_bytes[i]);
#pragma unroll
    for (int i = 0; i < kMetaCopies; ++i) {
      if (meta_dst[i] == kNoCopy) continue;
      const int K = static_cast<int>(p.K);  // < 2^31 (validated)
      const int k = kb * kBK + meta_k[i];
      const bool ok = meta_src[i] != nullptr && k < K;
      const int row = !ok ? 0 : meta_shift[i] >= 0 ? k >> meta_shift[i] : k / meta_divisor[i];
      const uint8_t* src = reinterpret_cast<const uint8_t*>(ok ? meta_src[i] : p.proj[0].scales);
      cp_async16(meta_dst[i] + stage * meta_stage_bytes[i], src + static_cast<int64_t>(row) * meta_row_bytes[i],
                 ok ? 16 : 0);
    }
  }
};

// ---- host helpers ----------------------------------------------------------------------------
[[noreturn]] inline void bad(const std::string& what) {
  throw Error(ErrorKind::bad_input, "grouped MoE: " + what);
}
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::internal,
                std::string("grouped MoE: ") + what + ": " + cudaGetErrorString(status));
}

// Shared memory one block of the current device may opt in to (227 KB on H100, 163 KB on A100).
inline size_t device_shared_limit() {
  int device = 0, bytes = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  return static_cast<size_t>(bytes);
}
// ---- the kernels' launch entry points ----------------------------------------------------------
// grouped_gemm (gemm_mma.cu): NUM_PROJ 1 or 2 and row tiles of 32, 64, 128 or 256 with one A
// operand; separate A operands (the Hadamard path) only for gate/up on 128-row tiles.
size_t mma_gemm_smem_bytes(int num_proj, bool separate_a, int tile_rows);
void launch_gemm_mma(const GemmParams& p, int num_proj, bool separate_a, int tile_rows, int64_t max_items,
                     cudaStream_t stream);
// grouped_gemm_wgmma (gemm_wgmma.cu): whether the build and device run it, its token tile for a
// layer, its run-time variants, and the launch (a_rows: rows of the A source, for the TMA map).
bool wgmma_kernel_built();
int wgmma_tokens(const GroupedMoeArgs& a);
bool wgmma_producer();
bool wgmma_tma_x();
void launch_gemm_wgmma(const GemmParams& p, int num_proj, int tokens, int64_t max_items, int64_t a_rows,
                       cudaStream_t stream);

}  // namespace tmoe::cuda::grouped

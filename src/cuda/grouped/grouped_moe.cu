// The grouped tensor-core MoE path (see grouped_moe.cuh for the contract).
//
// Kernels, in launch order:
//   build_work_items      one block: the flat list of (expert, first row) tiles of BM rows, so
//                         that one launch covers every expert however ragged the groups are
//   scatter_inverse       pair id -> row in `order` (for the fixed-order combine)
//   convert_to_bf16 / transform_pair_rows     the A operand of gate/up
//   grouped_gemm<2, ...>  gate and up for the same columns in one block, SwiGLU epilogue
//                         (or grouped_gemm_wgmma<2>, the sm_90a kernel with the weights as
//                         wgmma's register operand, where use_wgmma picks it; same for down
//                         with grouped_gemm_wgmma<1>)
//   transform_intermediate (Hadamard only)
//   grouped_gemm<1, ...>  down, with the router weight and the combine in the epilogue
//   finish_rows / combine_rows / convert_from_f32
#include <cuda.h>  // CUtensorMap (types only; the encoder comes from the runtime entry point)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/fragment_decode.cuh"
#include "cuda/grouped/grouped_moe.cuh"
#include "cuda/grouped/weight_decode.cuh"
#include "cuda/grouped/wgmma.cuh"
#include "tmoe/error.hpp"
#include "tmoe/trellis_decode.hpp"

namespace tmoe::cuda::grouped {
namespace {

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
// Every warp of grouped_gemm runs the MMAs of all its row fragments, padding ones included (their
// accumulators are never stored), instead of testing each fragment before its MMAs (a compare, a
// branch and a WARPSYNC per fragment and k-tile): static K step 827 -> 715 instructions, mixtral
// 4096 tokens -14% on H100 (notes-grouped.md, session 7). -DTMOE_GROUPED_ALL_ROW_FRAGS=0 restores the
// tests, for A/B runs.
#ifndef TMOE_GROUPED_ALL_ROW_FRAGS
#define TMOE_GROUPED_ALL_ROW_FRAGS 1
#endif
constexpr bool kMmaAllRowFrags = TMOE_GROUPED_ALL_ROW_FRAGS != 0;
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
// fp16 bits -> float with the hardware conversion (half_to_float is the portable bit-exact one;
// both are exact, this one is a single instruction).
__device__ __forceinline__ float h2f(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// ---- shared memory of grouped_gemm ----------------------------------------------------------
template <int NUM_PROJ, bool SEPARATE_A, int BM>
struct GemmSmem {
  static constexpr int kStages = stages_for(BM);
  static constexpr int kNumA = SEPARATE_A ? 2 : 1;
  static constexpr int kProjCols = kBN / NUM_PROJ;          // columns per projection
  static constexpr int kProjNTiles = kProjCols / kTileDim;  // tiles of N (= units) per projection
  __nv_bfloat16 a[kStages][kNumA][BM * kAStride];
  // The stage's fragment-layout units (fragment_layout.hpp), raw: 3 bits per weight in shared
  // memory; each warp decodes its own units into registers (no decoded B in shared memory).
  uint32_t units[kStages][NUM_PROJ][kProjNTiles][unit_words(kMaxBits)];
  uint16_t scales[kStages][NUM_PROJ][kKTiles][kProjCols];
  uint16_t su[kStages][NUM_PROJ][kBK];  // bf16 bits
  // weight = X * c.x + c.y per (k-tile, column), c.x / c.y bf16x2 broadcasts; X = the centred
  // index (affine grid: c = (step * scale, center * scale)) or the level (c = (scale, 0)).
  // Double-buffered: computed for stage kb+1 while the warps read stage kb's.
  uint2 coef[2][NUM_PROJ][kKTiles][kProjCols];
  // Other grids: bf16x2 (grid[lo], grid[hi]) for a pair of indices lo | hi << BITS.
  uint32_t level_pairs[NUM_PROJ][kMaxGrid * kMaxGrid];
  GridForm grid[NUM_PROJ];
  const __nv_bfloat16* a_src[kNumA][BM];
};

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
    c.f[0][j] = h2f(p.proj[0].sv[base + j]);
    if constexpr (NUM_PROJ == 2) {
      c.f[1][j] = h2f(p.proj[1].sv[base + j]);
      if (p.h_su) c.f[2][j] = h2f(p.h_su[base + j]);
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

// One block: BM rows of one expert's pairs x kBN columns of NUM_PROJ projections (same K).
// Blocks past the work list exit at once (the grid is sized for the worst case, so no host
// synchronisation is needed to know how many tiles the routing produced).
// B operand: each warp owns two units per stage (gate + up of one n-tile, or two n-tiles of down),
// loads their raw words from shared memory and decodes them into B fragments in registers.
template <int NUM_PROJ, bool SEPARATE_A, int BM>
__global__ void __launch_bounds__(threads_for(BM), blocks_per_sm_for(BM))
    grouped_gemm(const GemmParams p) {
  constexpr int kBM = BM;
  constexpr int kThreads = threads_for(BM);
  constexpr int kStages = stages_for(BM);
  constexpr int kWarpsM = kThreads / 128;  // warps: kWarpsM (rows) x 4 (columns)
  constexpr int kWarpRows = BM / kWarpsM;
  using Smem = GemmSmem<NUM_PROJ, SEPARATE_A, BM>;
  constexpr int kNumA = Smem::kNumA;
  constexpr int kProjCols = Smem::kProjCols;
  constexpr int kWarpCols = kProjCols / 4;      // per projection: 16 (gate/up) or 32 (down)
  constexpr int kWarpNFrags = kWarpCols / 8;    // n8 fragments per projection per warp
  constexpr int kNFrags = NUM_PROJ * kWarpNFrags;  // 4: two units of two n8 halves each
  constexpr int kMFrags = kWarpRows / 16;
  static_assert(kNFrags == 4, "each warp decodes exactly two units per stage");
  // su is folded into the decoded weights for gate/up without Hadamard (one shared A operand);
  // down's su is in h, and the Hadamard path applies su to its separate A operands.
  constexpr bool kFoldSu = NUM_PROJ == 2 && !SEPARATE_A;

  extern __shared__ __align__(128) uint8_t smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);

  RowTile tile;
  if (!find_row_tile(p, kBM, kProjCols, tile)) return;
  const int n0 = tile.n0, expert = tile.expert, row0 = tile.row0, rows_valid = tile.rows_valid;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;  // warp_m < kWarpsM
  const int K = static_cast<int>(p.K);  // < 2^31 (validated)

  // Per-row A sources (padding rows: row 0's, never copied).
  for (int i = tid; i < kNumA * kBM; i += kThreads)
    s.a_src[i / kBM][i % kBM] = a_row_source(p, tile, i / kBM, i % kBM < rows_valid ? i % kBM : 0);
  load_grid_tables<NUM_PROJ>(p, s.grid, s.level_pairs, tid, kThreads);

  // Each thread's share of a stage's copies is fixed (WeightCopies for the weight side).
  const WeightCopies<NUM_PROJ, kProjCols, kThreads, kFoldSu> weight_copies(
      p, tid, expert, n0, &s.units[0][0][0][0], &s.scales[0][0][0][0], &s.su[0][0][0], sizeof(s.scales[0]),
      sizeof(s.su[0]));
  __syncthreads();

  // Issues the cp.async copies of stage `kb` (A rows, units, scales, su) into buffer `buf`.
  // Chunks outside K / N / the expert's rows are zero-filled (src-size 0), so the MMA sees zeros
  // (a zero scale or su makes the weights of padded k and n zero; padded units hold index 0).
  // A: this thread's 16-byte chunk a_k / 8 of kAChunks rows (the same chunk in each: kThreads is a
  // multiple of 8), destinations as shared addresses found once (as in WeightCopies).
  constexpr int kAChunks = kNumA * kBM * (kBK / 8) / kThreads;
  static_assert(kAChunks * kThreads == kNumA * kBM * (kBK / 8) && kThreads % (kBK / 8) == 0);
  const int a_k = (tid % (kBK / 8)) * 8;
  const uint32_t a_dst0 = static_cast<uint32_t>(__cvta_generic_to_shared(&s.a[0][0][a_k]));
  auto load_stage = [&](int buf, int kb) {
    // k past K (a last partial step) is zero-filled from k = 0 of the row.
    const bool k_in = kb * kBK + a_k < K;
    const int k = k_in ? kb * kBK + a_k : 0, bytes = k_in ? 16 : 0;
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kThreads;
      const int which = c / (kBM * (kBK / 8)), row = (c / (kBK / 8)) % kBM;
      // Padding rows are not copied at all: an output row depends only on its own A row, and
      // the epilogue never stores padding rows (their MMAs' results are never read).
      const uint32_t dst = a_dst0 + static_cast<uint32_t>(sizeof(s.a[0])) * buf +
                           static_cast<uint32_t>(sizeof(s.a[0][0])) * which + row * kAStride * 2;
      cp_async16_if(row < rows_valid, dst, s.a_src[which][row] + k, bytes);
    }
    weight_copies.issue(p, buf, kb, sizeof(s.units[0]));
  };

  // Coefficients of stage `buf` into s.coef[cb] (one (k-tile, column) entry per thread and pass).
  auto compute_coefs = [&](int buf, int cb) {
    constexpr int kEntries = NUM_PROJ * kKTiles * kProjCols;
    static_assert(kEntries % kThreads == 0);
#pragma unroll  // independent entries: loads of all passes in flight together
    for (int pass = 0; pass < kEntries / kThreads; ++pass) {
      const int i = tid + pass * kThreads;
      const int q = i / (kKTiles * kProjCols), kt = (i / kProjCols) % kKTiles, col = i % kProjCols;
      const float scale = h2f(s.scales[buf][q][kt][col]);
      s.coef[cb][q][kt][col] = weight_coef(s.grid[q], scale);
    }
  };

  // The warp's two units: (projection, n-tile in the block).
  int unit_q[2], unit_nt[2], unit_bits[2];
  bool unit_affine[2];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    unit_q[u] = NUM_PROJ == 2 ? u : 0;
    unit_nt[u] = NUM_PROJ == 2 ? warp_n : 2 * warp_n + u;
    unit_bits[u] = p.proj[unit_q[u]].bits;
    unit_affine[u] = s.grid[unit_q[u]].affine != 0;
  }
  const int g = lane >> 2, t = lane & 3;
  // Row fragments of this warp that hold any valid row (the others are padding: no MMAs).
  const int warp_row_frags = min(kMFrags, max(0, (rows_valid - warp_m * kWarpRows + 15) / 16));

  float acc[kMFrags][kNFrags][4];
#pragma unroll
  for (int i = 0; i < kMFrags; ++i)
#pragma unroll
    for (int j = 0; j < kNFrags; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // This block's K range: split-K (p.k_splits > 1, atomic down epilogue only) gives each
  // blockIdx.z a contiguous run of 64-deep steps.
  const int total_kb = (K + kBK - 1) / kBK;
  const int kb_per_split = (total_kb + p.k_splits - 1) / p.k_splits;
  const int kb_begin = blockIdx.z * kb_per_split;
  const int num_kb = min(total_kb - kb_begin, kb_per_split);  // this block's steps
  if (num_kb <= 0) return;

  // One K step's decode and MMAs. BITS_ALL = 2, 3, 4: every unit of this block has those bits and
  // an affine grid (compile-time decode, no branches between the MMAs); 0: per-unit switches.
  auto k_step = [&](auto bits_constant, int i) {
    constexpr int BITS_ALL = decltype(bits_constant)::value;
    const int buf = i % kStages, cb = i & 1;
    uint32_t words[2][kMaxBits];
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int w = 0; w < kMaxBits; ++w)
        words[u][w] = w < (BITS_ALL ? BITS_ALL : unit_bits[u])
                          ? s.units[buf][unit_q[u]][unit_nt[u]][w * 32 + lane]
                          : 0u;
    // Padding k-tiles of the last quad need no test: their A columns and scales are zero.
    static_for(std::make_integer_sequence<int, kKTiles>{}, [&](auto ks_constant) {
      constexpr int ks = decltype(ks_constant)::value;
      uint32_t bfrag[kNFrags][2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int q = unit_q[u], col = unit_nt[u] * kTileDim + g;
        const uint2 cl = s.coef[cb][q][ks][col], cr = s.coef[cb][q][ks][col + 8];
        uint32_t su_low = 0, su_high = 0;
        if constexpr (kFoldSu) {
          su_low = *reinterpret_cast<const uint32_t*>(&s.su[buf][q][ks * kTileDim + 2 * t]);
          su_high = *reinterpret_cast<const uint32_t*>(&s.su[buf][q][ks * kTileDim + 2 * t + 8]);
        }
        const uint32_t* lp = s.level_pairs[q];
        uint32_t v[4];
        unit_weight_pairs<BITS_ALL, ks>(words[u], unit_bits[u], unit_affine[u], lp, cl, cr, kFoldSu, su_low,
                                        su_high, v);
        bfrag[2 * u][0] = v[0];
        bfrag[2 * u][1] = v[2];
        bfrag[2 * u + 1][0] = v[1];
        bfrag[2 * u + 1][1] = v[3];
      }
#pragma unroll
      for (int mf = 0; mf < kMFrags; ++mf) {
        if (!kMmaAllRowFrags && mf >= warp_row_frags) break;
        uint32_t afrag[kNumA][4];
        const int row = warp_m * kWarpRows + mf * 16 + (lane & 15);
#pragma unroll
        for (int which = 0; which < kNumA; ++which)
          ldmatrix_x4(afrag[which], &s.a[buf][which][row * kAStride + ks * kTileDim + (lane >> 4) * 8]);
#pragma unroll
        for (int nf = 0; nf < kNFrags; ++nf)
          mma_bf16(acc[mf][nf], afrag[SEPARATE_A ? nf / kWarpNFrags : 0], bfrag[nf][0], bfrag[nf][1]);
      }
    });
  };

  // Pipeline: copies run kStages-1 stages ahead; the coefficients of stage i+1 are computed in
  // the same barrier interval as stage i's decode and MMAs, so there is one barrier per K step.
  // Buffers are indexed by the local step i; load_stage takes the global step kb_begin + i.
  auto main_loop = [&](auto bits_constant) {
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < num_kb) load_stage(st, kb_begin + st);
      cp_async_commit();
    }
    cp_async_wait<kStages - 2>();
    __syncthreads();
    compute_coefs(0, 0);
    for (int i = 0; i < num_kb; ++i) {
      cp_async_wait<kStages - 3>();  // stage i+1 landed (this thread's copies)
      // All copies of stage i+1 visible; stage i's coefficients visible; every warp is done with
      // stage i-1, so its buffers (and coefficient buffer (i-1) & 1) may be overwritten.
      __syncthreads();
      {
        const int next = i + kStages - 1;
        if (next < num_kb) load_stage(next % kStages, kb_begin + next);
        cp_async_commit();
      }
      if (i + 1 < num_kb) compute_coefs((i + 1) % kStages, (i + 1) & 1);
      k_step(bits_constant, i);
    }
  };
  with_decode_variant<NUM_PROJ>(p, s.grid, main_loop);
  cp_async_wait<0>();

  // Epilogue. Accumulator c[0..1]: row lane/4, columns 2*(lane%4) + {0,1}; c[2..3]: row + 8.
#pragma unroll
  for (int mf = 0; mf < kMFrags; ++mf)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int local_row = warp_m * kWarpRows + mf * 16 + (lane >> 2) + half * 8;
      if (local_row >= rows_valid) continue;
#pragma unroll
      for (int j = 0; j < kWarpNFrags; ++j) {
        const int n = n0 + warp_n * kWarpCols + j * 8 + (lane & 3) * 2;
        const int up = NUM_PROJ == 2 ? kWarpNFrags + j : j;
        store_output_pair<NUM_PROJ>(p, expert, row0 + local_row, n, acc[mf][j][half * 2],
                                    acc[mf][j][half * 2 + 1], acc[mf][up][half * 2],
                                    acc[mf][up][half * 2 + 1]);
      }
    }
}

// ---- grouped_gemm_wgmma (sm_90a): the weights as wgmma's register A operand --------------------
// One block: TOKENS (128 or 256) pair rows (tokens) of one expert x wg_cols(TOKENS) output features
// (128-token tiles: gate 128 + up 128, or 256 of down; 256-token tiles: gate 64 + up 64, or 128 of
// down), 2 warpgroups. The GEMM runs transposed, D[feature][token] = W^T[feature][k] X^T[k][token],
// so that the decoded weights are wgmma's A operand straight from registers: the fragment layout
// already holds each lane's m16n8k16 A fragment (fragment_layout.hpp), and every warp decodes its
// own units once per token tile, nothing twice, no decoded weights in shared memory. The
// activations are B: a K-major SW128 tile in shared memory that both warpgroups read. A warpgroup
// owns wg_slabs(TOKENS) 64-feature slabs, each with TOKENS / 2 fp32 accumulators per thread (128 in
// all): with 128-token tiles, gate and up of the same 64 features or two of down's; with 256-token
// tiles one slab (gate in one warpgroup, up in the other, or 64 of down's), so each slice's group is
// one m64n256k16 for one unit's decode, twice the tensor work per decode instruction.
// Pipeline: cp.async copies of each 64-deep K step (X rows, raw units, scales, su; the X rows by TMA
// with TMA_X) run kWgAhead steps ahead, one __syncthreads per step; per k16 slice a warpgroup decodes its slabs' fragments,
// issues their wgmmas as one group and waits for the group before, so a slice's decode runs under
// the previous slice's wgmmas (more groups in flight make ptxas serialize them, notes "v9").
// Epilogue: the accumulators go through shared memory (transposed to [token][feature], where gate
// and up meet) into store_output_pair, grouped_gemm's epilogue.
// (v8, a producer warpgroup decoding into a shared-memory B operand, was no faster than mma.sync;
// docs/notes-grouped.md.)
// PRODUCER (the kernel's third template argument): a third warpgroup issues every copy (X rows,
// units, scales, su), handing each ring slot to the two consumer warpgroups through a full and an
// empty mbarrier instead of one __syncthreads per step; registers move from it to the consumers
// (setmaxnreg). The default: 1-4% faster than without it from 1024 tokens on every shape (H100,
// session 12, once the copies were cheap to issue; before that the producer was the bottleneck,
// 10-15% slower). -DTMOE_WGMMA_PRODUCER=0 or the environment variable of the same name turns it off.
#ifndef TMOE_WGMMA_PRODUCER
#define TMOE_WGMMA_PRODUCER 1
#endif
constexpr bool kWgProducerDefault = TMOE_WGMMA_PRODUCER != 0;
constexpr int kWgConsumerThreads = 256;  // warpgroups 0 and 1
constexpr int wg_copy_threads(bool producer) { return producer ? 128 : kWgConsumerThreads; }  // threads issuing copies
constexpr int wg_threads(bool producer) { return kWgConsumerThreads + (producer ? 128 : 0); }
// Registers per thread after setmaxnreg (multiples of 8; 128 x 56 + 256 x 224 = the 384 x 168 the
// launch gives a 384-thread block).
constexpr int kWgProducerRegisters = 56, kWgConsumerRegisters = 224;
constexpr int kWgStages = 5;
[[maybe_unused]] constexpr int kWgAhead = kWgStages - 2;  // steps whose copies are in flight beyond the current one
constexpr int wg_slabs(int tokens) { return tokens == 128 ? 2 : 1; }  // 64-feature slabs per warpgroup
constexpr int wg_cols(int tokens) { return 128 * wg_slabs(tokens); }  // features per block (all projections)
// Floats of padding per staged row: strides of 68 / 132 / 260 floats make the stores conflict-free.
[[maybe_unused]] constexpr int kWgStagePad = 4;
// Average rows per expert from which the wgmma kernel takes 256-token tiles; 0: never (the default
// until measured: session 10 wrote them without a device run). -DTMOE_WGMMA_TILE256_MIN_ROWS=N.
#ifndef TMOE_WGMMA_TILE256_MIN_ROWS
#define TMOE_WGMMA_TILE256_MIN_ROWS 0
#endif
constexpr int64_t kWgTile256MinRows = TMOE_WGMMA_TILE256_MIN_ROWS;
// TMA_X (the kernel's fourth template argument, down only): down's X tile (contiguous h rows) by one
// 2D bulk tensor copy per step, completing on the slot's mbarrier, instead of 4-8 cp.async per
// thread. Gate/up rows are gathered and stay on cp.async: one TMA per gathered row was 64% slower
// (session 12's ncu; down with one box per step 5% faster, without the producer). Chosen by
// -DTMOE_WGMMA_TMA_X=1 or the environment variable of the same name; default 0.
#ifndef TMOE_WGMMA_TMA_X
#define TMOE_WGMMA_TMA_X 0
#endif
constexpr bool kWgTmaXDefault = TMOE_WGMMA_TMA_X != 0;

template <int NUM_PROJ, int TOKENS>
struct WgmmaSmem {
  static constexpr int kProjCols = wg_cols(TOKENS) / NUM_PROJ;
  static constexpr int kUnits = wg_cols(TOKENS) / kTileDim;  // units per step
  struct Ring {
    uint8_t x[kWgStages][TOKENS * wgmma::kRowBytes];  // SW128 K-major (first: aligned)
    uint32_t units[kWgStages][kUnits][unit_words(kMaxBits)];
    uint16_t scales[kWgStages][NUM_PROJ][kKTiles][kProjCols];
    uint16_t su[kWgStages][NUM_PROJ][kBK];  // bf16 bits (gate/up: folded into the weights)
  };
  union {
    Ring ring;
    float staged[NUM_PROJ][TOKENS][kProjCols + kWgStagePad];  // the epilogue's [token][feature]
  };
  uint32_t level_pairs[NUM_PROJ][kMaxGrid * kMaxGrid];
  GridForm grid[NUM_PROJ];
};
// Dynamic shared memory of the kernel: the struct plus room to align it to 1024 bytes (SW128).
template <int NUM_PROJ, int TOKENS>
constexpr size_t wgmma_smem_bytes() {
  return sizeof(WgmmaSmem<NUM_PROJ, TOKENS>) + wgmma::kTileAlign;
}

// x_map (TMA_X): the A source (x rows for gate/up, h rows for down) as a 2D bf16 tensor map, SW128,
// box 64 k x 1 row (gathered rows) or 64 k x TOKENS rows (contiguous rows).
template <int NUM_PROJ, int TOKENS, bool PRODUCER, bool TMA_X>
__global__ void __launch_bounds__(wg_threads(PRODUCER), 1)
    grouped_gemm_wgmma(const GemmParams p, const __grid_constant__ CUtensorMap x_map) {
#ifdef TMOE_WGMMA_DEVICE
  constexpr bool kWgProducer = PRODUCER, kWgTmaX = TMA_X;
  constexpr int kWgThreads = wg_threads(PRODUCER), kWgCopyThreads = wg_copy_threads(PRODUCER);
  // Static shared memory exists only in this sm_90a body: the host's probe of a usable build.
  __shared__ const __nv_bfloat16* x_src[TOKENS];
  __shared__ uint64_t x_full[kWgStages];            // TMA: the slot's X tile landed
  // kWgProducer: the slot's copies landed (X by TMA too) / both consumer warpgroups are done with it.
  __shared__ uint64_t slot_full[kWgProducer ? kWgStages : 1], slot_empty[kWgProducer ? kWgStages : 1];
  // Down: each valid row's router weight and destination, loaded before the main loop so that the
  // epilogue's stores wait on no global load.
  __shared__ OutputRow out_row[NUM_PROJ == 1 ? TOKENS : 1];
  uint64_t* const tma_bar = kWgProducer ? slot_full : x_full;  // where the X tile's TMA copies complete
  using Smem = WgmmaSmem<NUM_PROJ, TOKENS>;
  constexpr int kSlabs = wg_slabs(TOKENS);
  constexpr int kProjCols = Smem::kProjCols;
  constexpr int kProjNTiles = kProjCols / kTileDim;
  constexpr bool kFoldSu = NUM_PROJ == 2;  // gate/up without Hadamard (the only ones run here)
  extern __shared__ uint8_t smem_raw[];
  // Aligned by pointer arithmetic on smem_raw (not through an integer), so that the compiler still
  // knows every access below is to shared memory (LDS / STS; generic loads cost ~2x in v8's ncu).
  const uint32_t misalign = wgmma::smem_address(smem_raw) & (wgmma::kTileAlign - 1);
  Smem& s = *reinterpret_cast<Smem*>(smem_raw + ((wgmma::kTileAlign - misalign) & (wgmma::kTileAlign - 1)));

  RowTile tile;
  if (!find_row_tile(p, TOKENS, kProjCols, tile)) return;
  const int n0 = tile.n0, expert = tile.expert, row0 = tile.row0, rows_valid = tile.rows_valid;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wq = warp & 3, g = lane >> 2, t = lane & 3;
  const int K = static_cast<int>(p.K);  // < 2^31 (validated)
  const int num_kb = (K + kBK - 1) / kBK;

  for (int r = tid; r < TOKENS; r += kWgThreads) {
    x_src[r] = a_row_source(p, tile, 0, r < rows_valid ? r : 0);  // padding rows: row 0's (never copied)
    if (NUM_PROJ == 1 && r < rows_valid) out_row[r] = output_row<NUM_PROJ>(p, row0 + r);
    // Padding rows read row 0 (valid; their columns of D are never stored).
  }
  if (kWgTmaX && !kWgProducer && tid == 0)
    for (int st = 0; st < kWgStages; ++st) wgmma::mbarrier_init(&x_full[st], 1);
  if (kWgProducer && tid == 0)
    for (int st = 0; st < kWgStages; ++st) {
      // Every copy thread arrives once its copies of the slot landed (+1: TMA's expect_tx arrival).
      wgmma::mbarrier_init(&slot_full[st], kWgCopyThreads + (kWgTmaX ? 1 : 0));
      wgmma::mbarrier_init(&slot_empty[st], kWgConsumerThreads);
    }
  load_grid_tables<NUM_PROJ>(p, s.grid, s.level_pairs, tid, kWgThreads);
  __syncthreads();

  // Each thread's share of a step's copies is fixed: its sources are found once here and advance
  // by one step (64 k, one unit quad) per load; chunks outside K / N are zero-filled (a zero scale
  // or su makes padded weights zero, and zero activations meet padded k).
  // The copy threads: the whole block, or the producer warpgroup (ctid = its thread index).
  const int ctid = kWgProducer ? tid - kWgConsumerThreads : tid;
  // X: chunk ctid % 8 (16 bytes) of tile rows x_row0 + kXRowStep i; padding rows are not copied
  // (their columns of D are never stored).
  constexpr int kXCopies = TOKENS * 8 / kWgCopyThreads, kXRowStep = kWgCopyThreads / 8;
  const int x_row0 = ctid / 8, x_k = (ctid % 8) * 8;
  const __nv_bfloat16* x_row[kXCopies];
  if constexpr (!kWgProducer) {  // (the producer reads x_src per copy: its registers are few)
#pragma unroll
    for (int i = 0; i < kXCopies; ++i) x_row[i] = x_src[x_row0 + kXRowStep * i];
  }
  auto x_row_at = [&](int i) {
    if constexpr (kWgProducer) return x_src[x_row0 + kXRowStep * i];
    else return x_row[i];
  };
  const uint32_t x_dst0 = wgmma::smem_address(s.ring.x[0]) + wgmma::sw128_offset(x_row0, ctid % 8);
  using Copies = WeightCopies<NUM_PROJ, kProjCols, kWgCopyThreads, kFoldSu>;
  auto make_copies = [&] {
    return Copies(p, ctid, expert, n0, &s.ring.units[0][0][0], &s.ring.scales[0][0][0][0], &s.ring.su[0][0][0],
                  sizeof(s.ring.scales[0]), sizeof(s.ring.su[0]));
  };
  // The block's copies (the producer makes its own after the role split: nothing live across it).
  [[maybe_unused]] const auto weight_copies = [&] {
    if constexpr (kWgProducer) return 0;
    else return make_copies();
  }();
  auto load_stage = [&](const Copies& copies, int slot, int kb) {
    const int k0 = kb * kBK;
    if constexpr (kWgTmaX) {
      // The tile's rows row0 .. row0 + TOKENS - 1 of h (the host launches TMA_X for down only, whose
      // rows are contiguous). Out-of-range k and rows past the source are zero-filled and still
      // count as the box's bytes; rows past the expert's are padding (never stored).
      if (ctid == 0) {
        wgmma::mbarrier_arrive_expect_tx(&tma_bar[slot], TOKENS * wgmma::kRowBytes);
        wgmma::tma_load_2d(s.ring.x[slot], &x_map, k0, row0, &tma_bar[slot]);
      }
    } else {
      // k past K (a last partial step) is zero-filled from row k = 0.
      const bool k_in = k0 + x_k < K;
      const int k = k_in ? k0 + x_k : 0, bytes = k_in ? 16 : 0;
      const uint32_t dst = x_dst0 + slot * static_cast<uint32_t>(sizeof(s.ring.x[0]));
#pragma unroll
      for (int i = 0; i < kXCopies; ++i)
        cp_async16_if(x_row0 + kXRowStep * i < rows_valid, dst + i * kXRowStep * wgmma::kRowBytes, x_row_at(i) + k,
                      bytes);
    }
    copies.issue(p, slot, kb, sizeof(s.ring.units[0]));
  };

  if constexpr (kWgProducer) {
    if (warp >= kWgConsumerThreads / 32) {
      // The producer: each slot's copies once both consumer warpgroups have released it, then an
      // arrival on its full barrier that fires when they land. Up to kWgStages steps ahead.
      wgmma::decrease_registers<kWgProducerRegisters>();
      const Copies copies = make_copies();
      for (int kb = 0; kb < num_kb; ++kb) {
        const int slot = kb % kWgStages;
        if (kb >= kWgStages) wgmma::mbarrier_wait_or_trap(&slot_empty[slot], (kb / kWgStages - 1) & 1);
        load_stage(copies, slot, kb);
        wgmma::cp_async_mbarrier_arrive(&slot_full[slot]);
      }
      cp_async_wait<0>();
      return;
    }
    wgmma::increase_registers<kWgConsumerRegisters>();
  }

  // This warp's unit of each slab: projection, n-tile j in the block (features 16 j .. 16 j + 15 =
  // rows 16 wq .. of the warpgroup's 64-row wgmma), bits and grid form. Gate/up: two slabs per
  // warpgroup are gate and up of features 64 wg .., one slab is gate (warpgroup 0) or up (1) of
  // features 0 .. 63; down: slab S = kSlabs wg + sl holds features 64 S ...
  int slab_q[kSlabs], slab_col[kSlabs], slab_bits[kSlabs];
  bool slab_affine[kSlabs];
  float2 slab_coef_mul[kSlabs];  // coef_multipliers of the slab's grid, in registers
#pragma unroll
  for (int sl = 0; sl < kSlabs; ++sl) {
    const int j = NUM_PROJ == 2 ? (kSlabs == 2 ? 4 * wg : 0) + wq : 4 * (kSlabs * wg + sl) + wq;
    slab_q[sl] = NUM_PROJ == 2 ? (kSlabs == 2 ? sl : wg) : 0;
    slab_col[sl] = j * kTileDim;
    slab_bits[sl] = p.proj[slab_q[sl]].bits;
    slab_coef_mul[sl] = coef_multipliers(s.grid[slab_q[sl]]);
    slab_affine[sl] = s.grid[slab_q[sl]].affine != 0;
  }

  // Group sizes that are multiples of 64 give all 4 k-tiles of a step one scale row: the
  // coefficients are computed once per step (else once per k-tile).
  bool coef_per_step = true;
#pragma unroll
  for (int q = 0; q < NUM_PROJ; ++q) coef_per_step = coef_per_step && p.proj[q].group_size % kBK == 0;

  // Written only by wgmma (the first slice's overwrites: scale-d = 0), so that no other
  // instruction defines them inside the wgmma pipeline (ptxas would serialize it).
  float acc[kSlabs][TOKENS / 2];
  auto main_loop = [&](auto bits_constant) {
    constexpr int BITS_ALL = decltype(bits_constant)::value;
    if constexpr (!kWgProducer) {
#pragma unroll
      for (int st = 0; st < kWgAhead; ++st) {
        if (st < num_kb) load_stage(weight_copies, st, st);
        cp_async_commit();
      }
    }
    for (int i = 0; i < num_kb; ++i) {
      const int slot = i % kWgStages;
      if constexpr (kWgProducer) {
        wgmma::mbarrier_wait_or_trap(&slot_full[slot], (i / kWgStages) & 1);  // the producer's copies landed
        wgmma::fence_proxy_async();  // ... and are visible to wgmma
      } else {
        cp_async_wait<kWgAhead - 1>();  // this thread's copies of step i landed
        wgmma::fence_proxy_async();     // ... and are visible to wgmma
        // Everyone's copies of step i visible; step i-2 retired in both warpgroups (each waited for
        // it during step i-1), so its slot takes step i + kWgAhead's copies.
        __syncthreads();
        if constexpr (kWgTmaX) wgmma::mbarrier_wait_or_trap(&x_full[slot], (i / kWgStages) & 1);
        {
          const int next = i + kWgAhead;
          if (next < num_kb) load_stage(weight_copies, next % kWgStages, next);
          cp_async_commit();
        }
      }
      uint32_t words[kSlabs][kMaxBits];
#pragma unroll
      for (int sl = 0; sl < kSlabs; ++sl)
#pragma unroll
        for (int b = 0; b < kMaxBits; ++b)
          words[sl][b] = b < (BITS_ALL ? BITS_ALL : slab_bits[sl])
                             ? s.ring.units[slot][slab_q[sl] * kProjNTiles + slab_col[sl] / kTileDim][b * 32 + lane]
                             : 0u;
      const uint32_t x_base = wgmma::smem_address(s.ring.x[slot]);
      uint2 cl[kSlabs], cr[kSlabs];  // coefficients of columns g and g + 8 of each slab's unit
      static_for(std::make_integer_sequence<int, kKTiles>{}, [&](auto kt_constant) {
        constexpr int kt = decltype(kt_constant)::value;
        uint32_t a[kSlabs][4];
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
          const int q = slab_q[sl], col = slab_col[sl] + g;
          if (kt == 0 || !coef_per_step) {
            cl[sl] = weight_coef(slab_coef_mul[sl], h2f(s.ring.scales[slot][q][kt][col]));
            cr[sl] = weight_coef(slab_coef_mul[sl], h2f(s.ring.scales[slot][q][kt][col + 8]));
          }
          uint32_t su_low = 0, su_high = 0;
          if constexpr (kFoldSu) {
            su_low = *reinterpret_cast<const uint32_t*>(&s.ring.su[slot][q][kt * kTileDim + 2 * t]);
            su_high = *reinterpret_cast<const uint32_t*>(&s.ring.su[slot][q][kt * kTileDim + 2 * t + 8]);
          }
          unit_weight_pairs<BITS_ALL, kt>(words[sl], slab_bits[sl], slab_affine[sl], s.level_pairs[q], cl[sl],
                                          cr[sl], kFoldSu, su_low, su_high, a[sl]);
        }
        const uint64_t desc = wgmma::sw128_descriptor(x_base + 32 * kt);
        wgmma::fence_operands();
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) wgmma::mma_m64k16_rs<TOKENS>(acc[sl], a[sl], desc, i > 0 || kt > 0);
        wgmma::commit_group();
        // The slice before has retired: its fragments' registers are free. (Waiting for all but
        // two made ptxas serialize every wgmma: a wait after each, CUDA 13.0.)
        wgmma::wait_group<1>();
        // Producer: after the first slice, step i - 1's groups have all retired and its decode
        // loads are done, so this thread is finished with its slot.
        if constexpr (kWgProducer && kt == 0)
          if (i > 0) wgmma::mbarrier_arrive(&slot_empty[(i - 1) % kWgStages]);
      });
    }
    wgmma::wait_group<0>();
  };
  with_decode_variant<NUM_PROJ>(p, s.grid, main_loop);
  cp_async_wait<0>();
  // The ring is free: its last readers (wgmma) retired, its last copies landed (the producer's:
  // every full barrier was waited for; it may have exited, so only the consumers sync).
  auto consumers_sync = [] {
    if constexpr (kWgProducer) wgmma::sync_threads(kWgConsumerThreads);
    else __syncthreads();
  };
  consumers_sync();

  // Epilogue. acc[sl][4 j + i] is feature slab_col[sl] + g + 8 (i >> 1) of the block's projection
  // columns, token row 8 j + 2 t + (i & 1) of the tile.
#pragma unroll
  for (int sl = 0; sl < kSlabs; ++sl) {
    float(&staged)[TOKENS][kProjCols + kWgStagePad] = s.staged[slab_q[sl]];
#pragma unroll
    for (int j = 0; j < TOKENS / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) staged[8 * j + 2 * t + (i & 1)][slab_col[sl] + g + 8 * (i >> 1)] = acc[sl][4 * j + i];
  }
  consumers_sync();
  // Each thread owns one column pair of the block (its sv loaded once) and every kRowStep-th row.
  constexpr int kColPairs = kProjCols / 2, kRowStep = kWgConsumerThreads / kColPairs;
  static_assert(kWgConsumerThreads % kColPairs == 0);
  const int n = 2 * (tid % kColPairs);
  if (n0 + n < p.N) {
    const OutputColumns columns = output_columns<NUM_PROJ>(p, expert, n0 + n);
    for (int r = tid / kColPairs; r < rows_valid; r += kRowStep) {
      const float2 v = *reinterpret_cast<const float2*>(&s.staged[0][r][n]);
      const float2 u = *reinterpret_cast<const float2*>(&s.staged[NUM_PROJ - 1][r][n]);
      const OutputRow row = NUM_PROJ == 1 ? out_row[r] : OutputRow{1.0f, row0 + r};
      store_output<NUM_PROJ>(p, columns, row, row0 + r, n0 + n, v.x, v.y, u.x, u.y);
    }
  }
#endif
}

// ---- routing helpers ------------------------------------------------------------------------
constexpr int kScanThreads = 1024;

// items[i] = (expert, first row) for every tile of `tile_rows` rows of every expert, in order.
__global__ void __launch_bounds__(kScanThreads)
    build_work_items(const int32_t* offsets, int experts, int tile_rows, int32_t* items,
                     int32_t* num_items) {
  __shared__ int32_t scan[kScanThreads];
  __shared__ int32_t base;
  const int tid = threadIdx.x;
  if (tid == 0) base = 0;
  __syncthreads();
  for (int e0 = 0; e0 < experts; e0 += kScanThreads) {
    const int e = e0 + tid;
    const int begin = e < experts ? offsets[e] : 0;
    const int count = e < experts ? offsets[e + 1] - begin : 0;
    const int tiles = (count + tile_rows - 1) / tile_rows;
    scan[tid] = tiles;
    __syncthreads();
    for (int off = 1; off < kScanThreads; off <<= 1) {
      const int v = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += v;
      __syncthreads();
    }
    const int first = base + scan[tid] - tiles;
    for (int m = 0; m < tiles; ++m) {
      items[2 * (first + m)] = e;
      items[2 * (first + m) + 1] = begin + m * tile_rows;
    }
    __syncthreads();
    if (tid == kScanThreads - 1) base += scan[tid];
    __syncthreads();
  }
  if (tid == 0) *num_items = base;
}

// inverse[pair] = its row in `order` (inverse was filled with -1: skipped slots stay -1).
__global__ void scatter_inverse(const int32_t* offsets, int experts, const int32_t* order,
                                int64_t max_pairs, int32_t* inverse) {
  const int64_t pairs = offsets[experts];
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < pairs && r < max_pairs;
       r += int64_t(gridDim.x) * blockDim.x)
    inverse[order[r]] = static_cast<int32_t>(r);
}

__global__ void convert_to_bf16(const void* x, DType dtype, int64_t count, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(load_as_float(x, i, dtype));
}

__global__ void su_to_bf16(const uint16_t* su, int64_t count, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(h2f(su[i]));
}

__global__ void convert_from_f32(const float* in, int64_t count, void* out, DType dtype) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    store_from_float(out, i, dtype, in[i]);
}

// ---- the Hadamard path's row-wise kernels (one block per pair row, the row in shared memory) --
constexpr int kRowThreads = 256;

// In place: v <- T v on each block of `block` elements (block 0: identity), T normalized.
__device__ void block_hadamard_shared(float* v, int64_t n, int block) {
  if (block <= 1) return;
  const int half = block / 2;
  for (int len = 1; len < block; len <<= 1) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n / 2; i += blockDim.x) {
      const int64_t blk = i / half;
      const int j = static_cast<int>(i % half);
      const int64_t pos = blk * block + (j / len) * 2 * len + (j % len);
      const float a = v[pos], c = v[pos + len];
      v[pos] = a + c;
      v[pos + len] = a - c;
    }
  }
  __syncthreads();
  const float norm = rsqrtf(static_cast<float>(block));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[i] *= norm;
  __syncthreads();
}

// The expert that owns row r of `order` (binary search over offsets).
__device__ int expert_of_row(const int32_t* offsets, int experts, int64_t r) {
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// a_g[r] = T_g(x[t] . su_g[e]), a_u[r] = T_u(x[t] . su_u[e]) as bf16, t = order[r] / k.
__global__ void transform_pair_rows(const void* x, DType x_dtype, int top_k, const int32_t* offsets,
                                    const int32_t* order, DeviceProjection gate, DeviceProjection up,
                                    __nv_bfloat16* a_gate, __nv_bfloat16* a_up) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x, H = gate.K;
  if (r >= offsets[gate.experts]) return;
  const int e = expert_of_row(offsets, static_cast<int>(gate.experts), r);
  const int64_t t = order[r] / top_k;
  for (int which = 0; which < 2; ++which) {
    const DeviceProjection& w = which ? up : gate;
    __nv_bfloat16* dst = (which ? a_up : a_gate) + r * H;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
      row[i] = load_as_float(x, t * H + i, x_dtype) * half_to_float(w.su[e * H + i]);
    block_hadamard_shared(row, H, w.hadamard);
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) dst[i] = __float2bfloat16_rn(row[i]);
    __syncthreads();
  }
}

// h[r] = T_d(su_d . silu(T_g(G[r]) . sv_g) * (T_u(U[r]) . sv_u)) as bf16.
__global__ void transform_intermediate(const int32_t* offsets, DeviceProjection gate,
                                       DeviceProjection up, DeviceProjection down, const float* g_raw,
                                       const float* u_raw, __nv_bfloat16* h) {
  extern __shared__ float rows[];
  const int64_t r = blockIdx.x, I = gate.N;
  if (r >= offsets[gate.experts]) return;
  const int e = expert_of_row(offsets, static_cast<int>(gate.experts), r);
  float* g = rows;
  float* u = rows + I;
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
    g[i] = g_raw[r * I + i];
    u[i] = u_raw[r * I + i];
  }
  block_hadamard_shared(g, I, gate.hadamard);
  block_hadamard_shared(u, I, up.hadamard);
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
    const float gv = g[i] * half_to_float(gate.sv[e * I + i]);
    const float uv = u[i] * half_to_float(up.sv[e * I + i]);
    g[i] = silu(gv) * uv * half_to_float(down.su[e * I + i]);
  }
  block_hadamard_shared(g, I, down.hadamard);
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) h[r * I + i] = __float2bfloat16_rn(g[i]);
}

// rows[r] = p[pair] * T_d(rows[r]) . sv_d, in place.
__global__ void finish_rows(const int32_t* offsets, const int32_t* order, const float* probs,
                            DeviceProjection down, float* rows_out) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x, H = down.N;
  if (r >= offsets[down.experts]) return;
  const int e = expert_of_row(offsets, static_cast<int>(down.experts), r);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) row[i] = rows_out[r * H + i];
  block_hadamard_shared(row, H, down.hadamard);
  const float prob = probs[order[r]];
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
    rows_out[r * H + i] = row[i] * half_to_float(down.sv[e * H + i]) * prob;
}

// out[t] = sum over slots j in order of rows[inverse[t*k+j]] (skipped slots add nothing).
__global__ void combine_rows(const float* rows, const int32_t* inverse, int top_k, int64_t H,
                             void* out, DType out_dtype) {
  const int64_t t = blockIdx.x;
  for (int64_t n = threadIdx.x; n < H; n += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const int32_t r = inverse[t * top_k + j];
      if (r >= 0) sum += rows[static_cast<int64_t>(r) * H + n];
    }
    store_from_float(out, t * H + n, out_dtype, sum);
  }
}

// ---- host side -------------------------------------------------------------------------------
[[noreturn]] void bad(const std::string& what) {
  throw Error(ErrorKind::bad_input, "grouped MoE: " + what);
}
void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::internal,
                std::string("grouped MoE: ") + what + ": " + cudaGetErrorString(status));
}

bool any_hadamard(const GroupedMoeArgs& a) {
  return a.gate.hadamard || a.up.hadamard || a.down.hadamard;
}
int64_t max_work_items(const GroupedMoeArgs& a, int tile_rows) {
  const int64_t pairs = a.tokens * a.top_k;
  return ceil_div(pairs, tile_rows) + std::min<int64_t>(a.gate.experts, pairs);
}
// Shared memory one block of the current device may opt in to (227 KB on H100, 163 KB on A100).
size_t device_shared_limit() {
  int device = 0, bytes = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  return static_cast<size_t>(bytes);
}
// Row tile height from the average rows per expert (the Hadamard path keeps one configuration);
// the 256-row tile only where the device's shared memory holds it (Hopper).
int tile_rows_for(const GroupedMoeArgs& a) {
  const size_t limit = device_shared_limit();
  if (any_hadamard(a)) {
    if (sizeof(GemmSmem<2, true, kRows128>) > limit)
      bad("the Hadamard path needs " + std::to_string(sizeof(GemmSmem<2, true, kRows128>)) +
          " bytes of shared memory per block; this device allows " + std::to_string(limit));
    return kRows128;
  }
  const bool huge_fits = sizeof(GemmSmem<2, false, kRows256>) <= limit &&
                         sizeof(GemmSmem<1, false, kRows256>) <= limit;
  if (a.tile_rows) {
    if (a.tile_rows == kRows256 && !huge_fits)
      bad("tile_rows = 256 needs more shared memory per block than this device allows");
    return a.tile_rows;
  }
  // 32-row tiles only up to 16 rows per expert on average: beyond, random routing gives many
  // experts a second 32-row tile (every weight decoded twice), and one 128-row tile is faster.
  // Measured (H100, mixtral, us): 32-row tiles 1172 / 1914 / 2892 at 16 / 32 / 64 rows per expert,
  // 128-row tiles 1707 / 2589 at 64 / 128; switching at 64 or 32 made time fall as T rose.
  const int64_t pairs = a.tokens * a.top_k;
  if (pairs <= 16 * a.gate.experts) return kRows32;
  // 64-row tiles up to 48 rows per expert on average: random routing then rarely gives an expert a
  // second tile, and 3 blocks per SM stream weights where 128-row tiles hold 2 (ncu, mixtral 256
  // tokens on 128-row tiles: 1.95 active warps per scheduler, latency-bound).
  if (pairs <= 48 * a.gate.experts) return kRows64;
  return pairs >= 256 * a.gate.experts && huge_fits ? kRows256 : kRows128;
}

// Whether grouped_gemm_wgmma has its sm_90a body for the current device (the build has an sm_90a
// target and the device runs it): only that body declares static shared memory (its row table).
bool wgmma_kernel_built() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  static int known[64] = {};  // per device: 0 unknown, 1 yes, 2 no
  if (device < 64 && known[device]) return known[device] == 1;
  cudaFuncAttributes gate_up{}, down{};
  check_cuda(cudaFuncGetAttributes(&gate_up, grouped_gemm_wgmma<2, 128, false, false>), "cudaFuncGetAttributes");
  check_cuda(cudaFuncGetAttributes(&down, grouped_gemm_wgmma<1, 128, false, false>), "cudaFuncGetAttributes");
  // The largest instantiation's shared memory (256-token tiles: ~190 KB + its 2 KB row table).
  const size_t most = std::max({wgmma_smem_bytes<1, 128>(), wgmma_smem_bytes<2, 128>(), wgmma_smem_bytes<1, 256>(),
                                wgmma_smem_bytes<2, 256>()});
  const bool built = gate_up.sharedSizeBytes > 0 && down.sharedSizeBytes > 0 &&
                     most + 2 * gate_up.sharedSizeBytes <= device_shared_limit();
  if (device < 64) known[device] = built ? 1 : 2;
  return built;
}

// A wgmma kernel knob: the build's value (-Dname=N), overridden by the environment variable of the
// same name, so that one build tests and times every setting.
int64_t wgmma_knob(const char* name, int64_t build_value) {
  if (const char* env = std::getenv(name)) return std::atoll(env);
  return build_value;
}

// Token tile of the wgmma kernel: 256 from TMOE_WGMMA_TILE256_MIN_ROWS average rows per expert
// (0: never), else 128.
int wgmma_tokens(const GroupedMoeArgs& a) {
  const int64_t min_rows = wgmma_knob("TMOE_WGMMA_TILE256_MIN_ROWS", kWgTile256MinRows);
  return min_rows > 0 && a.tokens * a.top_k >= min_rows * a.gate.experts ? 256 : 128;
}
// Whether the wgmma kernel runs with a producer warpgroup (PRODUCER) / loads X by TMA (TMA_X).
bool wgmma_producer() { return wgmma_knob("TMOE_WGMMA_PRODUCER", kWgProducerDefault) != 0; }
bool wgmma_tma_x() { return wgmma_knob("TMOE_WGMMA_TMA_X", kWgTmaXDefault) != 0; }

// f(std::true_type{}) or f(std::false_type{}): a run-time flag as a compile-time one.
template <typename F>
void with_bool(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

bool use_wgmma(const GroupedMoeArgs& a) {
  if (any_hadamard(a)) return false;
  GroupedKernel choice = a.kernel;
  if (choice == GroupedKernel::automatic) {
    if (const char* env = std::getenv("TMOE_GROUPED_KERNEL")) {
      if (std::string(env) == "mma") choice = GroupedKernel::mma_sync;
      if (std::string(env) == "wgmma") choice = GroupedKernel::wgmma;
    }
  }
  if (choice == GroupedKernel::mma_sync || !wgmma_kernel_built()) return false;
  if (choice == GroupedKernel::wgmma) return true;
  return kWgmmaAutomatic && a.tile_rows == 0 &&
         a.tokens * a.top_k >= wgmma_min_rows_per_expert(a.gate.experts) * a.gate.experts;
}

// Split-K for down (atomic combine only: the partial sums meet in the float atomics): when the
// column blocks x row tiles fill fewer than two waves of blocks, e.g. mixtral at 128 tokens
// (8 experts x 32 column blocks of H = 4096), each block would stream a whole K = 14336 alone.
int down_k_splits(const GroupedMoeArgs& a, int tile_rows, int64_t max_items) {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t slots = int64_t{sms} * blocks_per_sm_for(tile_rows);
  const int64_t blocks = ceil_div(a.down.N, kBN) * max_items;
  const int64_t steps = ceil_div(a.down.K, kBK);
  int splits = 1;
  while (splits < 8 && blocks * splits < 2 * slots && steps >= 16 * splits) splits *= 2;
  return splits;
}

// Workspace carve-up; the same function sizes and places the buffers.
struct Workspace {
  int32_t* items = nullptr;
  int32_t* num_items = nullptr;
  int32_t* inverse = nullptr;
  __nv_bfloat16* x16 = nullptr;     // [T, H]   hadamard = 0 and x not bf16
  __nv_bfloat16* a_gate = nullptr;  // [pairs, H] Hadamard path
  __nv_bfloat16* a_up = nullptr;
  __nv_bfloat16* h = nullptr;       // [pairs, I]
  float* g_raw = nullptr;           // [pairs, I] Hadamard path
  float* u_raw = nullptr;
  float* rows = nullptr;            // [pairs, H] fixed-order combine / Hadamard path
  float* out_acc = nullptr;         // [T, H]   atomic combine into a 16-bit output
  __nv_bfloat16* su16[2] = {};      // gate, up su as bf16 (hadamard = 0; down's is folded into h)
  size_t bytes = 0;
};

Workspace carve(const GroupedMoeArgs& a, uint8_t* base) {
  Workspace w;
  size_t at = 0;
  auto take = [&](auto*& ptr, int64_t count) {
    using T = std::remove_reference_t<decltype(*ptr)>;
    at = (at + 255) / 256 * 256;
    ptr = reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(base) + at);
    at += static_cast<size_t>(count) * sizeof(T);
  };
  const int64_t T = a.tokens, pairs = a.tokens * a.top_k, H = a.gate.K, I = a.gate.N;
  const bool hadamard = any_hadamard(a);
  const bool fixed_order = a.deterministic || hadamard;
  take(w.items, 2 * max_work_items(a, kRows32));  // the longest list of any tile height
  take(w.num_items, 1);
  if (fixed_order) take(w.inverse, pairs);
  if (!hadamard && a.x_dtype != DType::bf16) take(w.x16, T * H);
  if (hadamard) {
    take(w.a_gate, pairs * H);
    take(w.a_up, pairs * H);
    take(w.g_raw, pairs * I);
    take(w.u_raw, pairs * I);
  }
  take(w.h, pairs * I);
  if (fixed_order) take(w.rows, pairs * H);
  if (!fixed_order && a.out_dtype != DType::f32) take(w.out_acc, T * H);
  if (!hadamard) {
    const int64_t E = a.gate.experts;
    take(w.su16[0], E * H);
    take(w.su16[1], E * H);
  }
  w.bytes = (at + 255) / 256 * 256;
  return w;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void validate_projection(const DeviceProjection& w, const char* name, bool check_pointers) {
  const std::string n = name;
  if (!valid_bits(w.bits)) bad(n + ": bits must be 2, 3 or 4, got " + std::to_string(w.bits));
  if (w.K <= 0 || w.N <= 0 || w.K % kTileDim || w.N % kTileDim)
    bad(n + ": K and N must be positive multiples of 16, got K=" + std::to_string(w.K) +
        " N=" + std::to_string(w.N));
  if (w.group_size <= 0 || w.group_size % kTileDim)
    bad(n + ": group size must be a positive multiple of 16, got " + std::to_string(w.group_size));
  if (w.hadamard) {
    const int b = w.hadamard;
    if (b < 2 || (b & (b - 1)) || w.K % b || w.N % b)
      bad(n + ": Hadamard block " + std::to_string(b) + " must be a power of two dividing K and N");
  }
  if (!check_pointers) return;
  if (!w.units || !w.scales || !w.su || !w.sv || !w.grid) bad(n + ": null device pointer");
  if (!aligned16(w.units) || !aligned16(w.scales) || !aligned16(w.su))
    bad(n + ": units, scales and su must be 16-byte aligned");
  if (w.quads != quads_of(w.K))
    bad(n + ": quads is " + std::to_string(w.quads) + ", expected " + std::to_string(quads_of(w.K)) +
        " (fragment layout of K = " + std::to_string(w.K) + ")");
}

void validate(const GroupedMoeArgs& a, bool check_pointers) {
  validate_projection(a.gate, "gate", check_pointers);
  validate_projection(a.up, "up", check_pointers);
  validate_projection(a.down, "down", check_pointers);
  const DeviceProjection &g = a.gate, &u = a.up, &d = a.down;
  if (u.K != g.K || u.N != g.N || d.K != g.N || d.N != g.K || g.experts <= 0 ||
      u.experts != g.experts || d.experts != g.experts)
    bad("gate, up and down do not form one MoE layer (gate " + std::to_string(g.K) + "x" +
        std::to_string(g.N) + ", up " + std::to_string(u.K) + "x" + std::to_string(u.N) +
        ", down " + std::to_string(d.K) + "x" + std::to_string(d.N) + ")");
  if (a.tokens < 0 || a.top_k <= 0) bad("tokens must be >= 0 and top_k > 0");
  if (a.tile_rows != 0 && a.tile_rows != kRows32 && a.tile_rows != kRows64 && a.tile_rows != kRows128 &&
      a.tile_rows != kRows256)
    bad("tile_rows must be 0, 32, 64, 128 or 256, got " + std::to_string(a.tile_rows));
  if (a.tokens * a.top_k >= (int64_t{1} << 31)) bad("too many (token, slot) pairs");
  if (max_work_items(a, kRows32) > 65535) bad("too many row tiles for one launch's grid");
  if (any_hadamard(a)) {
    const int64_t max_row = std::max(2 * g.N, g.K) * int64_t(sizeof(float));
    if (max_row > 200 * 1024) bad("Hadamard path: rows too long for shared memory");
  }
  if (check_pointers && a.tokens > 0) {
    if (!a.x || !a.offsets || !a.order || !a.probs || !a.out || !a.workspace)
      bad("null pointer among x, offsets, order, probs, out, workspace");
    if (!aligned16(a.x) || reinterpret_cast<uintptr_t>(a.workspace) % 256)
      bad("x must be 16-byte aligned and the workspace 256-byte aligned");
  }
}

template <int NUM_PROJ, bool SEPARATE_A, int BM>
void launch_gemm(const GemmParams& p, int64_t max_items, cudaStream_t stream) {
  constexpr int kProjCols = kBN / NUM_PROJ;
  const size_t smem = sizeof(GemmSmem<NUM_PROJ, SEPARATE_A, BM>);
  static bool configured = false;  // attribute set once per process and instantiation
  if (!configured) {
    check_cuda(cudaFuncSetAttribute(grouped_gemm<NUM_PROJ, SEPARATE_A, BM>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "cudaFuncSetAttribute");
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kProjCols)), static_cast<unsigned>(max_items),
                  static_cast<unsigned>(p.k_splits));
  grouped_gemm<NUM_PROJ, SEPARATE_A, BM><<<grid, threads_for(BM), smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "grouped_gemm launch");
}

// The wgmma kernel's A source as a 2D bf16 tensor map (TMA_X): rows x K, row stride K, box 64 k x
// box_rows, 128-byte swizzle (the SW128 tile layout), out-of-range elements zero-filled. Without
// TMA_X an empty map (the kernel never reads it).
CUtensorMap x_tensor_map(bool tma_x, const __nv_bfloat16* base, int64_t rows, int64_t K, int box_rows) {
  CUtensorMap map{};
  if (!tma_x) return map;
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || fn == nullptr)
      throw Error(ErrorKind::internal, "grouped MoE: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * sizeof(__nv_bfloat16)};
  const cuuint32_t box[2] = {kBK, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult status = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(base), dims,
                                 strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS)
    throw Error(ErrorKind::internal, "grouped MoE: cuTensorMapEncodeTiled failed (" + std::to_string(status) + ")");
  return map;
}

template <int NUM_PROJ, int TOKENS, bool PRODUCER, bool TMA_X>
void launch_gemm_wgmma(const GemmParams& p, int64_t max_items, int64_t a_rows, cudaStream_t stream) {
  constexpr int kProjCols = wg_cols(TOKENS) / NUM_PROJ;
  const size_t smem = wgmma_smem_bytes<NUM_PROJ, TOKENS>();
  static bool configured = false;  // attribute set once per process and instantiation
  if (!configured) {
    check_cuda(cudaFuncSetAttribute(grouped_gemm_wgmma<NUM_PROJ, TOKENS, PRODUCER, TMA_X>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute");
    configured = true;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kProjCols)), static_cast<unsigned>(max_items), 1);
  static_assert(!TMA_X || NUM_PROJ == 1, "X by TMA for down's contiguous rows only");
  const CUtensorMap x_map = x_tensor_map(TMA_X, p.a[0], a_rows, p.K, TOKENS);
  grouped_gemm_wgmma<NUM_PROJ, TOKENS, PRODUCER, TMA_X><<<grid, wg_threads(PRODUCER), smem, stream>>>(p, x_map);
  check_cuda(cudaGetLastError(), "grouped_gemm_wgmma launch");
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)),
               "cudaFuncSetAttribute");
}

unsigned elementwise_blocks(int64_t count) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(count, 256), 1, 4096));
}

}  // namespace

void validate_grouped_moe(const GroupedMoeArgs& args) { validate(args, true); }

bool grouped_uses_wgmma(const GroupedMoeArgs& args) {
  validate(args, false);
  return use_wgmma(args);
}

std::string grouped_plan_summary(const GroupedMoeArgs& args) {
  validate(args, false);
  if (use_wgmma(args))
    return "grouped: wgmma (sm_90a), " + std::to_string(wgmma_tokens(args)) + "-token tiles" +
           (wgmma_producer() ? ", producer warpgroup" : "") + (wgmma_tma_x() ? ", down's X by TMA" : "");
  return "grouped: mma.sync, " + std::to_string(tile_rows_for(args)) + "-row tiles" +
         (any_hadamard(args) ? ", Hadamard" : "");
}

size_t grouped_moe_workspace_bytes(const GroupedMoeArgs& args) {
  validate(args, false);
  return carve(args, nullptr).bytes;
}

void grouped_moe_forward(const GroupedMoeArgs& a, cudaStream_t stream) {
  validate(a, true);
  if (a.tokens == 0) return;
  const Workspace ws = carve(a, static_cast<uint8_t*>(a.workspace));
  const int experts = static_cast<int>(a.gate.experts);
  const int64_t T = a.tokens, pairs = T * a.top_k, H = a.gate.K, I = a.gate.N;
  const bool wgmma_path = use_wgmma(a);
  const int tile_rows = wgmma_path ? wgmma_tokens(a) : tile_rows_for(a);
  const int64_t max_items = max_work_items(a, tile_rows);
  const bool hadamard = any_hadamard(a);
  const bool fixed_order = a.deterministic || hadamard;

  build_work_items<<<1, kScanThreads, 0, stream>>>(a.offsets, experts, tile_rows, ws.items,
                                                   ws.num_items);
  check_cuda(cudaGetLastError(), "build_work_items launch");
  if (fixed_order) {
    check_cuda(cudaMemsetAsync(ws.inverse, 0xff, pairs * sizeof(int32_t), stream), "memset");
    scatter_inverse<<<elementwise_blocks(pairs), 256, 0, stream>>>(a.offsets, experts, a.order,
                                                                   pairs, ws.inverse);
    check_cuda(cudaGetLastError(), "scatter_inverse launch");
  }

  GemmParams p{};
  p.items = ws.items;
  p.num_items = ws.num_items;
  p.offsets = a.offsets;
  p.order = a.order;
  p.probs = a.probs;
  p.top_k = a.top_k;
  p.k_splits = 1;
  // Launches grouped_gemm_wgmma<NUM_PROJ, tile_rows, producer> or grouped_gemm<NUM_PROJ, false, tile_rows>.
  auto launch = [&](auto num_proj) {
    constexpr int kNumProj = decltype(num_proj)::value;
    if (wgmma_path) {
      // Rows of the A source: x's tokens (gate/up) or h's pairs (down).
      const int64_t a_rows = p.gather_tokens ? T : pairs;
      // The instantiation of (tile, producer, TMA) chosen at run time.
      const bool tile256 = tile_rows == 256;
      with_bool(tile256, [&](auto t256) {
        constexpr int kTokens = decltype(t256)::value ? 256 : 128;
        with_bool(wgmma_producer(), [&](auto producer) {
          constexpr bool kProducer = decltype(producer)::value;
          // X by TMA for down only (contiguous rows; no gate/up instantiation with it).
          with_bool(kNumProj == 1 && wgmma_tma_x(), [&](auto tma_x) {
            constexpr bool kTmaX = decltype(tma_x)::value;
            if constexpr (kNumProj == 1 || !kTmaX)
              launch_gemm_wgmma<kNumProj, kTokens, kProducer, kTmaX>(p, max_items, a_rows, stream);
          });
        });
      });
      return;
    }
    switch (tile_rows) {
      case kRows32: launch_gemm<kNumProj, false, kRows32>(p, max_items, stream); break;
      case kRows64: launch_gemm<kNumProj, false, kRows64>(p, max_items, stream); break;
      case kRows256: launch_gemm<kNumProj, false, kRows256>(p, max_items, stream); break;
      default: launch_gemm<kNumProj, false, kRows128>(p, max_items, stream); break;
    }
  };

  // gate + up
  p.proj[0] = a.gate;
  p.proj[1] = a.up;
  p.K = H;
  p.N = I;
  if (!hadamard) {
    const __nv_bfloat16* x16 = static_cast<const __nv_bfloat16*>(a.x);
    if (a.x_dtype != DType::bf16) {
      convert_to_bf16<<<elementwise_blocks(T * H), 256, 0, stream>>>(a.x, a.x_dtype, T * H, ws.x16);
      check_cuda(cudaGetLastError(), "convert_to_bf16 launch");
      x16 = ws.x16;
    }
    p.a[0] = p.a[1] = x16;
    p.gather_tokens = true;
    const DeviceProjection* projections[2] = {&a.gate, &a.up};
    for (int q = 0; q < 2; ++q) {
      const int64_t count = projections[q]->experts * projections[q]->K;
      su_to_bf16<<<elementwise_blocks(count), 256, 0, stream>>>(projections[q]->su, count,
                                                                ws.su16[q]);
      check_cuda(cudaGetLastError(), "su_to_bf16 launch");
    }
    p.su16[0] = ws.su16[0];
    p.su16[1] = ws.su16[1];
    p.epilogue = kSwiglu;
    p.h = ws.h;
    p.h_su = a.down.su;
    launch(std::integral_constant<int, 2>{});
  } else {
    const size_t row_bytes = H * sizeof(float);
    allow_shared(transform_pair_rows, row_bytes);
    transform_pair_rows<<<static_cast<unsigned>(pairs), kRowThreads, row_bytes, stream>>>(
        a.x, a.x_dtype, a.top_k, a.offsets, a.order, a.gate, a.up, ws.a_gate, ws.a_up);
    check_cuda(cudaGetLastError(), "transform_pair_rows launch");
    p.a[0] = ws.a_gate;
    p.a[1] = ws.a_up;
    p.gather_tokens = false;
    p.epilogue = kRawPair;
    p.g_raw = ws.g_raw;
    p.u_raw = ws.u_raw;
    launch_gemm<2, true, kRows128>(p, max_items, stream);
    const size_t mid_bytes = 2 * I * sizeof(float);
    allow_shared(transform_intermediate, mid_bytes);
    transform_intermediate<<<static_cast<unsigned>(pairs), kRowThreads, mid_bytes, stream>>>(
        a.offsets, a.gate, a.up, a.down, ws.g_raw, ws.u_raw, ws.h);
    check_cuda(cudaGetLastError(), "transform_intermediate launch");
  }

  // down
  p.proj[0] = a.down;
  p.proj[1] = DeviceProjection{};
  p.a[0] = p.a[1] = ws.h;
  p.gather_tokens = false;
  p.su16[0] = p.su16[1] = nullptr;  // down's su is in h (or applied by the Hadamard path)
  p.K = I;
  p.N = H;
  if (!fixed_order) {
    float* acc = a.out_dtype == DType::f32 ? static_cast<float*>(a.out) : ws.out_acc;
    check_cuda(cudaMemsetAsync(acc, 0, T * H * sizeof(float), stream), "memset");
    p.epilogue = kAtomic;
    p.out_acc = acc;
    p.k_splits = wgmma_path ? 1 : down_k_splits(a, tile_rows, max_items);
    launch(std::integral_constant<int, 1>{});
    if (a.out_dtype != DType::f32) {
      convert_from_f32<<<elementwise_blocks(T * H), 256, 0, stream>>>(acc, T * H, a.out,
                                                                      a.out_dtype);
      check_cuda(cudaGetLastError(), "convert_from_f32 launch");
    }
    return;
  }
  p.epilogue = hadamard ? kRowsRaw : kRowsScaled;
  p.rows = ws.rows;
  launch(std::integral_constant<int, 1>{});
  if (hadamard) {
    const size_t row_bytes = H * sizeof(float);
    allow_shared(finish_rows, row_bytes);
    finish_rows<<<static_cast<unsigned>(pairs), kRowThreads, row_bytes, stream>>>(
        a.offsets, a.order, a.probs, a.down, ws.rows);
    check_cuda(cudaGetLastError(), "finish_rows launch");
  }
  combine_rows<<<static_cast<unsigned>(T), 256, 0, stream>>>(ws.rows, ws.inverse, a.top_k, H,
                                                            a.out, a.out_dtype);
  check_cuda(cudaGetLastError(), "combine_rows launch");
}

}  // namespace tmoe::cuda::grouped

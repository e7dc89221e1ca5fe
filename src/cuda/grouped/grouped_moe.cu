// The grouped tensor-core MoE path (see grouped_moe.cuh for the contract).
//
// Kernels, in launch order:
//   build_work_items      one block: the flat list of (expert, first row) tiles of BM rows, so
//                         that one launch covers every expert however ragged the groups are
//   scatter_inverse       pair id -> row in `order` (for the fixed-order combine)
//   convert_to_bf16 / transform_pair_rows     the A operand of gate/up
//   grouped_gemm<2, ...>  gate and up for the same columns in one block, SwiGLU epilogue
//   transform_intermediate (Hadamard only)
//   grouped_gemm<1, ...>  down, with the router weight and the combine in the epilogue
//   finish_rows / combine_rows / convert_from_f32
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "cuda/grouped/grouped_moe.cuh"
#include "tmoe/error.hpp"
#include "tmoe/trellis_decode.hpp"

namespace tmoe::cuda::grouped {
namespace {

// ---- tiling constants of grouped_gemm -------------------------------------------------------
// A block computes BM rows (pairs of one expert) x kBN output columns (split between the
// projections it runs: gate+up get 64 columns each, so SwiGLU pairs stay in one thread's
// registers). kBK = 64 gives each pipeline stage 4 tiles of K; 8 warps as 2 (rows) x 4 (columns),
// each warp 64 rows x 32 columns = 4 x 4 mma tiles of 16x8: 64 fp32 accumulators per thread.
// Three row-tile heights, chosen from the average rows per expert: kSmallRows (32) when experts
// hold few rows (a taller tile would mostly multiply padding), kMidRows (128), and kHugeRows (256,
// 16 warps as 4 x 4, one block per SM) for well-filled experts: the decode of a stage costs the
// same for any height, so taller tiles spend fewer instructions per flop (the kernel is issue
// bound, not tensor bound: see docs/notes-grouped.md).
constexpr int kBN = 128, kBK = 64;
constexpr int kSmallRows = 32, kMidRows = 128, kHugeRows = 256;
constexpr int threads_for(int rows) { return rows == kHugeRows ? 512 : 256; }
constexpr int blocks_per_sm_for(int rows) { return rows == kHugeRows ? 1 : 2; }
// cp.async stages in flight: 4 where one block owns the SM (more latency to cover per block), 3
// where two blocks share it (two blocks' shared memory must fit in 227 KB).
constexpr int stages_for(int rows) { return rows == kHugeRows ? 4 : 3; }
constexpr int kKTiles = kBK / kTileDim;     // 4 tiles of K per stage
constexpr int kRowPad = 8;                  // halves: 144-byte rows make ldmatrix conflict-free
constexpr int kAStride = kBK + kRowPad;     // A stage [BM][kAStride] bf16
constexpr int kBStride = kBK + kRowPad;     // decoded B [kBN][kBStride] bf16 (n-major, k contiguous)
constexpr int kMaxTileBytes = 128;          // 4 bits
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
  bool fold_su[2];              // multiply decoded rows by su (hadamard = 0)
  const __nv_bfloat16* su16[2]; // su as bf16 [E, K] (fold_su only)
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
  __nv_bfloat16* h;             // kSwiglu
  float* g_raw;                 // kRawPair
  float* u_raw;
  float* rows;                  // kRowsScaled, kRowsRaw: [pairs, N]
  float* out_acc;               // kAtomic: [tokens, N]
};

// ---- small PTX wrappers --------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
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
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }
// fp16 bits -> float with the hardware conversion (half_to_float is the portable bit-exact one;
// both are exact, this one is a single instruction).
__device__ __forceinline__ float h2f(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// ---- shared memory of grouped_gemm ----------------------------------------------------------
template <int NUM_PROJ, bool SEPARATE_A, int BM>
struct GemmSmem {
  static constexpr int kStages = stages_for(BM);
  static constexpr int kNumA = SEPARATE_A ? 2 : 1;
  static constexpr int kProjCols = kBN / NUM_PROJ;          // columns per projection
  static constexpr int kProjNTiles = kProjCols / kTileDim;  // tiles of N per projection
  __nv_bfloat16 a[kStages][kNumA][BM * kAStride];
  uint8_t packed[kStages][NUM_PROJ][kProjNTiles][kKTiles][kMaxTileBytes];
  uint16_t scales[kStages][NUM_PROJ][kKTiles][kProjCols];
  uint16_t su[kStages][NUM_PROJ][kBK];  // bf16 bits
  // Decoded B, double-buffered: stage kb+1 is decoded while the MMAs consume stage kb, so
  // decode (ALU) and MMA (tensor) warps overlap between the same two barriers.
  __nv_bfloat16 b[2][kBN * kBStride];
  // (grid[i], grid[j]) for the pair of indices (i, j) of two consecutive k: one lookup per two
  // weights. A pair of BITS-bit fields is one 2*BITS-bit field of the column word.
  float2 grid_pairs[NUM_PROJ][kMaxGrid * kMaxGrid];
  const __nv_bfloat16* a_src[kNumA][BM];
};

// Decodes one tile column (16 k-values of output column n_in_tile) to bf16:
// w[k] = bf16(grid[index] * scale) * su[k] (FORMAT.md, su folded into the weights; su is +-1 in
// practice, so the bf16 product is exact; null su: the caller applied it to the activations).
template <int BITS>
__device__ __forceinline__ void decode_column(const uint8_t* tile, int n_in_tile,
                                              const float2* grid_pairs, float scale,
                                              const uint16_t* su, uint32_t (&out)[8]) {
  const uint64_t word = load_column_word<BITS>(tile, n_in_tile);
#pragma unroll
  for (int k = 0; k < kTileDim; k += 2) {
    const float2 g = grid_pairs[column_index<2 * BITS>(word, k / 2)];
    out[k / 2] = pack_bf16(g.x * scale, g.y * scale);
  }
  if (su) {
    uint32_t signs[8];
    *reinterpret_cast<uint4*>(&signs[0]) = *reinterpret_cast<const uint4*>(su);
    *reinterpret_cast<uint4*>(&signs[4]) = *reinterpret_cast<const uint4*>(su + 8);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&out[i]),
                                       *reinterpret_cast<const __nv_bfloat162*>(&signs[i]));
      out[i] = *reinterpret_cast<const uint32_t*>(&v);
    }
  }
}

// One block: BM rows of one expert's pairs x kBN columns of NUM_PROJ projections (same K).
// Blocks past the work list exit at once (the grid is sized for the worst case, so no host
// synchronisation is needed to know how many tiles the routing produced). Two blocks per SM
// (<= 128 registers) so one block's decode overlaps the other's MMAs.
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
  constexpr int kProjNTiles = Smem::kProjNTiles;
  constexpr int kWarpCols = kProjCols / 4;      // per projection: 16 (gate/up) or 32 (down)
  constexpr int kWarpNFrags = kWarpCols / 8;    // n8 fragments per projection per warp
  constexpr int kNFrags = NUM_PROJ * kWarpNFrags;  // 4
  constexpr int kMFrags = kWarpRows / 16;          // 4

  extern __shared__ __align__(128) uint8_t smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);

  const int item = blockIdx.y;
  if (item >= *p.num_items) return;
  const int n0 = blockIdx.x * kProjCols;  // first column of this block in each projection
  if (n0 >= p.N) return;
  const int expert = p.items[2 * item];
  const int row0 = p.items[2 * item + 1];
  const int rows_valid = min(kBM, p.offsets[expert + 1] - row0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 2, warp_n = warp & 3;  // warp_m < kWarpsM
  const int K = static_cast<int>(p.K), N = static_cast<int>(p.N);  // < 2^31 (validated)
  const int tiles_k = K / kTileDim;

  // Per-row A sources (nullptr: padding row, zero-filled).
  for (int i = tid; i < kNumA * kBM; i += kThreads) {
    const int which = i / kBM, r = i % kBM;
    const __nv_bfloat16* src = nullptr;
    if (r < rows_valid) {
      const int64_t a_row = p.gather_tokens ? p.order[row0 + r] / p.top_k : row0 + r;
      src = p.a[which] + a_row * K;
    }
    s.a_src[which][r] = src;
  }
  for (int i = tid; i < NUM_PROJ * kMaxGrid * kMaxGrid; i += kThreads) {
    const int q = i / (kMaxGrid * kMaxGrid), pair = i % (kMaxGrid * kMaxGrid);
    const int bits = p.proj[q].bits, mask = (1 << bits) - 1;
    if (pair < (1 << (2 * bits)))
      s.grid_pairs[q][pair] = make_float2(p.proj[q].grid[pair & mask], p.proj[q].grid[pair >> bits]);
  }

  // Each thread's share of a stage's copies is fixed; its global addresses are computed once here
  // and advance by one stage per k-step (the k loop then costs a few instructions per copy).
  // Packed tiles: exactly one 16-byte chunk per thread (NUM_PROJ * kProjNTiles * kKTiles * 8 = 256).
  static_assert(NUM_PROJ * kProjNTiles * kKTiles * (kMaxTileBytes / 16) == 256);
  const int tile_tid = tid & 255;  // threads >= 256 (16-warp blocks) copy no tiles
  const int tile_chunk = tile_tid % 8, tile_kt = (tile_tid / 8) % kKTiles;
  const int tile_nt = (tile_tid / (8 * kKTiles)) % kProjNTiles;
  const int tile_q = tile_tid / (8 * kKTiles * kProjNTiles);
  const uint8_t* tile_src = nullptr;
  int64_t tile_step = 0;  // bytes per stage along K
  if (tid < 256) {
    const DeviceProjection& w = p.proj[tile_q];
    const int gn = n0 / kTileDim + tile_nt;
    if (tile_chunk * 16 < tile_bytes(w.bits) && gn < N / kTileDim)
      tile_src = w.tile(expert, tile_kt, gn) + tile_chunk * 16;
    tile_step = kKTiles * w.k_tile_stride;
  }
  uint8_t* const tile_dst = &s.packed[0][tile_q][tile_nt][tile_kt][tile_chunk * 16];
  // Scales: threads [0, kScaleChunks) copy one 16-byte row piece each; su: the next NUM_PROJ * 8.
  constexpr int kScaleChunks = NUM_PROJ * kKTiles * (kProjCols / 8);
  const uint16_t* meta_src = nullptr;
  uint16_t* meta_dst = nullptr;
  int meta_kt = 0, meta_group_size = 1;
  if (tid < kScaleChunks) {
    const int chunk = tid % (kProjCols / 8);
    meta_kt = (tid / (kProjCols / 8)) % kKTiles;
    const int q = tid / ((kProjCols / 8) * kKTiles);
    const DeviceProjection& w = p.proj[q];
    meta_group_size = w.group_size;
    const int groups = (K + w.group_size - 1) / w.group_size;
    if (n0 + chunk * 8 < N)
      meta_src = w.scales + static_cast<int64_t>(expert) * groups * N + n0 + chunk * 8;
    meta_dst = &s.scales[0][q][meta_kt][chunk * 8];
  } else if (tid < kScaleChunks + NUM_PROJ * (kBK / 8)) {
    const int chunk = (tid - kScaleChunks) % (kBK / 8), q = (tid - kScaleChunks) / (kBK / 8);
    meta_kt = chunk;  // su: chunk of 8 k-values
    if (p.fold_su[q])
      meta_src = reinterpret_cast<const uint16_t*>(p.su16[q]) + static_cast<int64_t>(expert) * K +
                 chunk * 8;
    meta_dst = &s.su[0][q][chunk * 8];
  }
  __syncthreads();

  // Issues the cp.async copies of stage `kb` (A rows, packed tiles, scales, su) into buffer `buf`.
  // Chunks outside K / N / the expert's rows are zero-filled (src-size 0), so the MMA sees zeros.
  auto load_stage = [&](int buf, int kb) {
    const int k0 = kb * kBK;
    constexpr int kAChunks = kNumA * kBM * (kBK / 8) / kThreads;
    static_assert(kAChunks * kThreads == kNumA * kBM * (kBK / 8));
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kThreads;
      const int which = c / (kBM * (kBK / 8)), row = (c / (kBK / 8)) % kBM;
      const int k = k0 + (c % (kBK / 8)) * 8;
      const __nv_bfloat16* src = s.a_src[which][row];
      const bool ok = src != nullptr && k < K;
      cp_async16(&s.a[buf][which][row * kAStride + (c % (kBK / 8)) * 8], ok ? src + k : p.a[0],
                 ok ? 16 : 0);
    }
    if (tile_src) {
      const bool ok = kb * kKTiles + tile_kt < tiles_k;
      cp_async16(tile_dst + buf * sizeof(s.packed[0]), ok ? tile_src + kb * tile_step : tile_src,
                 ok ? 16 : 0);
    }
    if (meta_dst) {
      const bool is_scale = tid < kScaleChunks;
      const int k = k0 + meta_kt * (is_scale ? kTileDim : 8);
      const bool ok = meta_src != nullptr && k < K;
      const uint16_t* src = !ok ? p.proj[0].scales
                            : is_scale ? meta_src + static_cast<int64_t>(k / meta_group_size) * N
                                       : meta_src + k0;
      const size_t stage_halves = is_scale ? sizeof(s.scales[0]) / 2 : sizeof(s.su[0]) / 2;
      if (is_scale || ok) cp_async16(meta_dst + buf * stage_halves, src, ok ? 16 : 0);
    }
  };

  // Decodes buffer `buf` (stage kb) into s.b[b_index]: row = output column, k contiguous.
  // Thread: one column `col` of the block, tiles of K dec_kt (+ 2 with 256 threads).
  constexpr int kDecodeColumns = kBN * kKTiles / kThreads;  // column words per thread: 2 or 1
  const int dec_col = tid % kBN, dec_kt = tid / kBN;
  const int dec_q = dec_col / kProjCols, dec_qcol = dec_col % kProjCols;
  const int dec_bits = p.proj[dec_q].bits;
  const bool dec_fold_su = p.fold_su[dec_q];
  const bool dec_col_ok = n0 + dec_qcol < N;
  auto decode_stage = [&](int buf, int kb, int b_index) {
    auto columns = [&](auto bits_constant) {
      constexpr int BITS = decltype(bits_constant)::value;
#pragma unroll
      for (int j = 0; j < kDecodeColumns; ++j) {
        const int kt = dec_kt + (kThreads / kBN) * j;
        uint32_t out[8];
        if (dec_col_ok && kb * kKTiles + kt < tiles_k) {
          decode_column<BITS>(s.packed[buf][dec_q][dec_qcol / kTileDim][kt], dec_qcol % kTileDim,
                              s.grid_pairs[dec_q], h2f(s.scales[buf][dec_q][kt][dec_qcol]),
                              dec_fold_su ? &s.su[buf][dec_q][kt * kTileDim] : nullptr, out);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) out[i] = 0;
        }
        uint4* dst = reinterpret_cast<uint4*>(&s.b[b_index][dec_col * kBStride + kt * kTileDim]);
        dst[0] = make_uint4(out[0], out[1], out[2], out[3]);
        dst[1] = make_uint4(out[4], out[5], out[6], out[7]);
      }
    };
    switch (dec_bits) {  // uniform per warp (a warp's columns belong to one projection)
      case 2: columns(std::integral_constant<int, 2>{}); break;
      case 4: columns(std::integral_constant<int, 4>{}); break;
      default: columns(std::integral_constant<int, 3>{}); break;
    }
  };

  float acc[kMFrags][kNFrags][4];
#pragma unroll
  for (int i = 0; i < kMFrags; ++i)
#pragma unroll
    for (int j = 0; j < kNFrags; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // Pipeline: copies run kStages-1 stages ahead; stage kb+1 is decoded in the same barrier
  // interval as stage kb's MMAs (decode one ahead), so there is one barrier per K step.
  const int num_kb = (K + kBK - 1) / kBK;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < num_kb) load_stage(st, st);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();
  decode_stage(0, 0, 0);

  for (int kb = 0; kb < num_kb; ++kb) {
    const int buf = kb % kStages;
    cp_async_wait<kStages - 3>();  // stage kb+1 landed (this thread's copies)
    // All copies of stage kb+1 visible; stage kb decoded; every warp is done with the MMAs of
    // stage kb-1, so its A buffer and decoded-B buffer may be overwritten.
    __syncthreads();
    {
      const int next = kb + kStages - 1;
      if (next < num_kb) load_stage(next % kStages, next);
      cp_async_commit();
    }
    if (kb + 1 < num_kb) decode_stage((kb + 1) % kStages, kb + 1, (kb + 1) & 1);

#pragma unroll
    for (int ks = 0; ks < kKTiles; ++ks) {
      uint32_t afrag[kNumA][kMFrags][4];
#pragma unroll
      for (int which = 0; which < kNumA; ++which)
#pragma unroll
        for (int mf = 0; mf < kMFrags; ++mf) {
          const int row = warp_m * kWarpRows + mf * 16 + (lane & 15);
          ldmatrix_x4(afrag[which][mf],
                      &s.a[buf][which][row * kAStride + ks * kTileDim + (lane >> 4) * 8]);
        }
      uint32_t bfrag[kNFrags][2];
#pragma unroll
      for (int q = 0; q < NUM_PROJ; ++q)
#pragma unroll
        for (int jj = 0; jj < kWarpNFrags / 2; ++jj) {
          const int col = q * kProjCols + warp_n * kWarpCols + jj * 16 + (lane >> 4) * 8 + (lane & 7);
          uint32_t r[4];
          ldmatrix_x4(r, &s.b[kb & 1][col * kBStride + ks * kTileDim + ((lane >> 3) & 1) * 8]);
          bfrag[q * kWarpNFrags + jj * 2][0] = r[0];
          bfrag[q * kWarpNFrags + jj * 2][1] = r[1];
          bfrag[q * kWarpNFrags + jj * 2 + 1][0] = r[2];
          bfrag[q * kWarpNFrags + jj * 2 + 1][1] = r[3];
        }
#pragma unroll
      for (int mf = 0; mf < kMFrags; ++mf)
#pragma unroll
        for (int nf = 0; nf < kNFrags; ++nf)
          mma_bf16(acc[mf][nf], afrag[SEPARATE_A ? nf / kWarpNFrags : 0][mf], bfrag[nf][0],
                   bfrag[nf][1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue. Accumulator c[0..1]: row lane/4, columns 2*(lane%4) + {0,1}; c[2..3]: row + 8.
#pragma unroll
  for (int mf = 0; mf < kMFrags; ++mf)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int local_row = warp_m * kWarpRows + mf * 16 + (lane >> 2) + half * 8;
      if (local_row >= rows_valid) continue;
      const int64_t r = row0 + local_row;
#pragma unroll
      for (int j = 0; j < kWarpNFrags; ++j) {
        const int n = n0 + warp_n * kWarpCols + j * 8 + (lane & 3) * 2;
        if (n >= N) continue;  // N is a multiple of 16: n + 1 < N too
        const float v0 = acc[mf][j][half * 2], v1 = acc[mf][j][half * 2 + 1];
        if constexpr (NUM_PROJ == 2) {
          const float u0 = acc[mf][kWarpNFrags + j][half * 2];
          const float u1 = acc[mf][kWarpNFrags + j][half * 2 + 1];
          if (p.epilogue == kSwiglu) {
            const uint16_t* svg = p.proj[0].sv + static_cast<int64_t>(expert) * N;
            const uint16_t* svu = p.proj[1].sv + static_cast<int64_t>(expert) * N;
            const float g0 = v0 * h2f(svg[n]), g1 = v1 * h2f(svg[n + 1]);
            const float h0 = silu(g0) * u0 * h2f(svu[n]);
            const float h1 = silu(g1) * u1 * h2f(svu[n + 1]);
            *reinterpret_cast<uint32_t*>(&p.h[r * N + n]) = pack_bf16(h0, h1);
          } else {
            *reinterpret_cast<float2*>(&p.g_raw[r * N + n]) = make_float2(v0, v1);
            *reinterpret_cast<float2*>(&p.u_raw[r * N + n]) = make_float2(u0, u1);
          }
        } else {
          if (p.epilogue == kRowsRaw) {
            *reinterpret_cast<float2*>(&p.rows[r * N + n]) = make_float2(v0, v1);
            continue;
          }
          const int32_t pair = p.order[r];
          const float prob = p.probs[pair];
          const uint16_t* sv = p.proj[0].sv + static_cast<int64_t>(expert) * N;
          const float d0 = v0 * h2f(sv[n]) * prob;
          const float d1 = v1 * h2f(sv[n + 1]) * prob;
          if (p.epilogue == kAtomic) {
            float* dst = p.out_acc + static_cast<int64_t>(pair / p.top_k) * N + n;
            atomicAdd(dst, d0);
            atomicAdd(dst + 1, d1);
          } else {
            *reinterpret_cast<float2*>(&p.rows[r * N + n]) = make_float2(d0, d1);
          }
        }
      }
    }
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
    if (sizeof(GemmSmem<2, true, kMidRows>) > limit)
      bad("the Hadamard path needs " + std::to_string(sizeof(GemmSmem<2, true, kMidRows>)) +
          " bytes of shared memory per block; this device allows " + std::to_string(limit));
    return kMidRows;
  }
  const bool huge_fits = sizeof(GemmSmem<2, false, kHugeRows>) <= limit &&
                         sizeof(GemmSmem<1, false, kHugeRows>) <= limit;
  if (a.tile_rows) {
    if (a.tile_rows == kHugeRows && !huge_fits)
      bad("tile_rows = 256 needs more shared memory per block than this device allows");
    return a.tile_rows;
  }
  // 32-row tiles only up to 16 rows per expert on average: beyond, random routing gives many
  // experts a second 32-row tile (every weight decoded twice), and one 128-row tile is faster.
  // Measured (H100, mixtral, us): 32-row tiles 1172 / 1914 / 2892 at 16 / 32 / 64 rows per expert,
  // 128-row tiles 1707 / 2589 at 64 / 128; switching at 64 or 32 made time fall as T rose.
  const int64_t pairs = a.tokens * a.top_k;
  if (pairs <= 16 * a.gate.experts) return kSmallRows;
  return pairs >= 256 * a.gate.experts && huge_fits ? kHugeRows : kMidRows;
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
  __nv_bfloat16* su16[3] = {};      // gate, up, down su as bf16 (hadamard = 0)
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
  take(w.items, 2 * max_work_items(a, kSmallRows));  // the longest list of any tile height
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
    take(w.su16[2], E * I);
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
  if (!w.tiles || !w.scales || !w.su || !w.sv || !w.grid) bad(n + ": null device pointer");
  if (!aligned16(w.tiles) || !aligned16(w.scales) || !aligned16(w.su) ||
      w.expert_stride % 16 || w.k_tile_stride % 16 || w.n_tile_stride % 16)
    bad(n + ": tiles, scales and su must be 16-byte aligned and tile strides multiples of 16");
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
  if (a.tile_rows != 0 && a.tile_rows != kSmallRows && a.tile_rows != kMidRows &&
      a.tile_rows != kHugeRows)
    bad("tile_rows must be 0, 32, 128 or 256, got " + std::to_string(a.tile_rows));
  if (a.tokens * a.top_k >= (int64_t{1} << 31)) bad("too many (token, slot) pairs");
  if (max_work_items(a, kSmallRows) > 65535) bad("too many row tiles for one launch's grid");
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
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, kProjCols)), static_cast<unsigned>(max_items));
  grouped_gemm<NUM_PROJ, SEPARATE_A, BM><<<grid, threads_for(BM), smem, stream>>>(p);
  check_cuda(cudaGetLastError(), "grouped_gemm launch");
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
  const int tile_rows = tile_rows_for(a);
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
  // Launches grouped_gemm<NUM_PROJ, false, tile_rows>.
  auto launch = [&](auto num_proj) {
    constexpr int kNumProj = decltype(num_proj)::value;
    switch (tile_rows) {
      case kSmallRows: launch_gemm<kNumProj, false, kSmallRows>(p, max_items, stream); break;
      case kHugeRows: launch_gemm<kNumProj, false, kHugeRows>(p, max_items, stream); break;
      default: launch_gemm<kNumProj, false, kMidRows>(p, max_items, stream); break;
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
    p.fold_su[0] = p.fold_su[1] = true;
    const DeviceProjection* projections[3] = {&a.gate, &a.up, &a.down};
    for (int q = 0; q < 3; ++q) {
      const int64_t count = projections[q]->experts * projections[q]->K;
      su_to_bf16<<<elementwise_blocks(count), 256, 0, stream>>>(projections[q]->su, count,
                                                                ws.su16[q]);
      check_cuda(cudaGetLastError(), "su_to_bf16 launch");
    }
    p.su16[0] = ws.su16[0];
    p.su16[1] = ws.su16[1];
    p.epilogue = kSwiglu;
    p.h = ws.h;
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
    p.fold_su[0] = p.fold_su[1] = false;
    p.epilogue = kRawPair;
    p.g_raw = ws.g_raw;
    p.u_raw = ws.u_raw;
    launch_gemm<2, true, kMidRows>(p, max_items, stream);
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
  p.fold_su[0] = !hadamard;
  p.fold_su[1] = false;
  p.su16[0] = ws.su16[2];
  p.su16[1] = nullptr;
  p.K = I;
  p.N = H;
  if (!fixed_order) {
    float* acc = a.out_dtype == DType::f32 ? static_cast<float*>(a.out) : ws.out_acc;
    check_cuda(cudaMemsetAsync(acc, 0, T * H * sizeof(float), stream), "memset");
    p.epilogue = kAtomic;
    p.out_acc = acc;
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

// grouped_gemm: the grouped path's mma.sync kernel (any sm_80+ device; on Hopper below the rows per
// expert where grouped_gemm_wgmma takes over, and the Hadamard path). docs/notes-grouped.md v1-v7.
#include "cuda/grouped/gemm_common.cuh"

namespace tmoe::cuda::grouped {
namespace {

// Every warp of grouped_gemm runs the MMAs of all its row fragments, padding ones included (their
// accumulators are never stored), instead of testing each fragment before its MMAs (a compare, a
// branch and a WARPSYNC per fragment and k-tile): static K step 827 -> 715 instructions, mixtral
// 4096 tokens -14% on H100 (notes-grouped.md, session 7). -DTMOE_GROUPED_ALL_ROW_FRAGS=0 restores the
// tests, for A/B runs.
#ifndef TMOE_GROUPED_ALL_ROW_FRAGS
#define TMOE_GROUPED_ALL_ROW_FRAGS 1
#endif
constexpr bool kMmaAllRowFrags = TMOE_GROUPED_ALL_ROW_FRAGS != 0;
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
#pragma unroll
    for (int i = 0; i < kAChunks; ++i) {
      const int c = tid + i * kThreads;
      const int which = c / (kBM * (kBK / 8)), row = (c / (kBK / 8)) % kBM;
      const uint32_t dst = a_dst0 + static_cast<uint32_t>(sizeof(s.a[0])) * buf +
                           static_cast<uint32_t>(sizeof(s.a[0][0])) * which + row * kAStride * 2;
      cp_async_activation_chunk(row < rows_valid, dst, s.a_src[which][row], kb * kBK + a_k, K);
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
      const float scale = half_bits_to_float(s.scales[buf][q][kt][col]);
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

// f(std::integral_constant<int, ROWS>{}) for the row-tile heights grouped_gemm is built for.
template <typename F>
decltype(auto) with_tile_rows(int tile_rows, F&& f) {
  switch (tile_rows) {
    case kRows32: return f(std::integral_constant<int, kRows32>{});
    case kRows64: return f(std::integral_constant<int, kRows64>{});
    case kRows256: return f(std::integral_constant<int, kRows256>{});
    default: return f(std::integral_constant<int, kRows128>{});
  }
}

void check_mma_config(int num_proj, bool separate_a, int tile_rows) {
  if ((num_proj != 1 && num_proj != 2) || (separate_a && (num_proj != 2 || tile_rows != kRows128)))
    throw Error(ErrorKind::internal, "grouped MoE: no grouped_gemm for this configuration");
}

}  // namespace

size_t mma_gemm_smem_bytes(int num_proj, bool separate_a, int tile_rows) {
  check_mma_config(num_proj, separate_a, tile_rows);
  if (separate_a) return sizeof(GemmSmem<2, true, kRows128>);
  return with_tile_rows(tile_rows, [&](auto rows) {
    constexpr int kRows = decltype(rows)::value;
    return num_proj == 2 ? sizeof(GemmSmem<2, false, kRows>) : sizeof(GemmSmem<1, false, kRows>);
  });
}

void launch_gemm_mma(const GemmParams& p, int num_proj, bool separate_a, int tile_rows, int64_t max_items,
                     cudaStream_t stream) {
  check_mma_config(num_proj, separate_a, tile_rows);
  if (separate_a) return launch_gemm<2, true, kRows128>(p, max_items, stream);
  with_tile_rows(tile_rows, [&](auto rows) {
    constexpr int kRows = decltype(rows)::value;
    if (num_proj == 2) launch_gemm<2, false, kRows>(p, max_items, stream);
    else launch_gemm<1, false, kRows>(p, max_items, stream);
  });
}

}  // namespace tmoe::cuda::grouped

// grouped_gemm_wgmma: the grouped path's sm_90a kernel, the weights decoded straight into wgmma's
// register A operand (docs/notes-grouped.md v9 on). Compiles to an empty body outside the sm_90a
// device pass; wgmma_kernel_built() tells the host whether the body is there.
#include <cuda.h>  // CUtensorMap (types only; the encoder comes from the runtime entry point)
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>

#include "cuda/grouped/gemm_common.cuh"
#include "cuda/grouped/wgmma.cuh"
#include "cuda/knobs.hpp"

namespace tmoe::cuda::grouped {
namespace {

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
// with TMA_X) run kWgAhead steps ahead, one __syncthreads per step (or, with PRODUCER, per-slot
// mbarriers); per k16 slice a warpgroup decodes its slabs' fragments,
// issues their wgmmas as one group and waits for the group before, so a slice's decode runs under
// the previous slice's wgmmas (more groups in flight make ptxas serialize them, notes "v9").
// Epilogue: the accumulators go through shared memory (transposed to [token][feature], where gate
// and up meet) into store_output, the epilogue shared with grouped_gemm; each thread owns one column
// pair (its sv loaded once) and down's row weights were loaded before the main loop.
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
  // X: chunk ctid % 8 (16 bytes) of tile rows x_row0 + kXRowStep i (cp_async_activation_chunk).
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
      const uint32_t dst = x_dst0 + slot * static_cast<uint32_t>(sizeof(s.ring.x[0]));
#pragma unroll
      for (int i = 0; i < kXCopies; ++i)
        cp_async_activation_chunk(x_row0 + kXRowStep * i < rows_valid, dst + i * kXRowStep * wgmma::kRowBytes,
                                  x_row_at(i), k0 + x_k, K);
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
            cl[sl] = weight_coef(slab_coef_mul[sl], half_bits_to_float(s.ring.scales[slot][q][kt][col]));
            cr[sl] = weight_coef(slab_coef_mul[sl], half_bits_to_float(s.ring.scales[slot][q][kt][col + 8]));
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

// f(std::true_type{}) or f(std::false_type{}): a run-time flag as a compile-time one.
template <typename F>
void with_bool(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
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
void launch_wgmma_kernel(const GemmParams& p, int64_t max_items, int64_t a_rows, cudaStream_t stream) {
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

}  // namespace

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

// Token tile of the wgmma kernel: 256 from TMOE_WGMMA_TILE256_MIN_ROWS average rows per expert
// (0: never), else 128.
int wgmma_tokens(const GroupedMoeArgs& a) {
  const int64_t min_rows = env_knob("TMOE_WGMMA_TILE256_MIN_ROWS", kWgTile256MinRows);
  return min_rows > 0 && a.tokens * a.top_k >= min_rows * a.gate.experts ? 256 : 128;
}
// Whether the wgmma kernel runs with a producer warpgroup (PRODUCER) / loads X by TMA (TMA_X).
bool wgmma_producer() { return env_knob("TMOE_WGMMA_PRODUCER", kWgProducerDefault) != 0; }
bool wgmma_tma_x() { return env_knob("TMOE_WGMMA_TMA_X", kWgTmaXDefault) != 0; }

void launch_gemm_wgmma(const GemmParams& p, int num_proj, int tokens, int64_t max_items, int64_t a_rows,
                       cudaStream_t stream) {
  // The instantiation of (projections, tile, producer, TMA) chosen at run time.
  auto launch = [&](auto num_proj_constant) {
    constexpr int kNumProj = decltype(num_proj_constant)::value;
    with_bool(tokens == 256, [&](auto t256) {
      constexpr int kTokens = decltype(t256)::value ? 256 : 128;
      with_bool(wgmma_producer(), [&](auto producer) {
        constexpr bool kProducer = decltype(producer)::value;
        // X by TMA for down only (contiguous rows; no gate/up instantiation with it).
        with_bool(kNumProj == 1 && wgmma_tma_x(), [&](auto tma_x) {
          constexpr bool kTmaX = decltype(tma_x)::value;
          if constexpr (kNumProj == 1 || !kTmaX)
            launch_wgmma_kernel<kNumProj, kTokens, kProducer, kTmaX>(p, max_items, a_rows, stream);
        });
      });
    });
  };
  if (num_proj == 2) launch(std::integral_constant<int, 2>{});
  else launch(std::integral_constant<int, 1>{});
}

}  // namespace tmoe::cuda::grouped

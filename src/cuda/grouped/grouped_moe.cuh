// The grouped tensor-core path of the CUDA backend (issue 5): the MoE forward for large token
// counts (prefill). Tokens are grouped per expert by the routing plan (FORMAT.md), and each
// expert's rows run through tiled GEMMs on tensor cores (mma.sync m16n8k16, bf16 operands, fp32
// accumulation) whose B operand is decoded from the packed Trellis tiles straight into shared
// memory. See docs/notes-grouped.md for the design, the measurements and what is left.
//
// Contract (what the caller, CudaMoe's dispatcher, provides):
//   - x: the raw activations [tokens, H] in x_dtype (f32, f16 or bf16); nothing applied yet.
//     This path applies su, the Hadamard transforms T and sv itself (FORMAT.md):
//       * hadamard = 0 on every projection (the fast, fused path): su is folded into the decoded
//         weights (x.su . Q = x . diag(su) Q), sv and SwiGLU into the gate/up epilogue (the
//         intermediate is written once, as bf16), sv, the router weight and the combine into the
//         down epilogue;
//       * any projection with hadamard = b > 0: per-pair activations are transformed first, the
//         GEMMs write fp32 rows and row-wise kernels apply T, sv, SwiGLU and the combine.
//   - counts, offsets, order: the routing plan on the device (order holds pair ids t*k+j).
//     Only offsets and order are read; counts is accepted for symmetry with the plan.
//   - probs [tokens, k] (fp32), out [tokens, H] in out_dtype: every element is written.
//   - workspace: grouped_moe_workspace_bytes(args) bytes, 256-byte aligned.
// Graph-safe: no allocation, no host synchronisation; everything runs on `stream`.
// Operands are bf16 whatever x_dtype is (f16 / f32 activations are converted once, [T, H]).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/device_weights.cuh"
#include "tmoe/half.hpp"

namespace tmoe::cuda::grouped {

// Which GEMM kernel runs the projections: the mma.sync kernel (every GPU) or grouped_gemm_wgmma
// (sm_90a: every warp decodes its own weights once per 128-token tile straight into wgmma's
// register A operand, the activations are the shared-memory B operand; docs/notes-grouped.md "v9").
// automatic takes the wgmma kernel only when kWgmmaAutomatic is on and experts average at least
// wgmma_min_rows_per_expert(experts) rows; mma_sync / wgmma force one (wgmma falls back to mma_sync
// where it cannot run: no sm_90a build for this device, or a Hadamard path). With automatic, the
// environment variable TMOE_GROUPED_KERNEL=mma|wgmma overrides the choice (benchmarks through
// CudaMoe compare both).
enum class GroupedKernel { automatic, mma_sync, wgmma };
// From 64 average rows per expert, or from 32 on layers of at most 16 experts. Measured (us,
// mma.sync | wgmma, both kernels forced: `TMOE_GROUPED_KERNEL=mma|wgmma tmoe bench --backend cuda
// --grouped-min-tokens 0`; docs/notes-grouped.md "v9" and "Session 11"):
//   rows/expert   8-16: qwen3 256 308 | 432, glm 256 911 | 1303, deepseek 256 4096 | 5965 (H200)
//                 16:   deepseek 512 4264 | 5834 (H100)
//                 24:   deepseek 768 5977 | 5966 (H100)
//                 32:   deepseek 1024 6150 | 6197, qwen3 512 467 | 491, mixtral 128 816 | 755 (H100)
//                 48:   deepseek 1536 6411 | 6547, qwen3 768 518 | 528, mixtral 192 894 | 780 (H100)
//                 64:   qwen3 1024 796 | 604, mixtral 256 1326 | 796 (H100); glm 1024 2338 | 1569 (H200)
//                 128+: wgmma 1.25-1.92x faster on every shape (mixtral 4096 12378 | 7375, H200)
// At 32-48 rows wgmma loses 1-5% on the many-expert shapes (128-256 experts) and wins 7-13% on
// mixtral's 8 experts; switching mixtral at 64 rows fell by 11% from 192 tokens (894 us, mma.sync)
// to 256 (796 us, wgmma), more than #5's 10% cliff rule allows. Not measured: 16-32 rows on mixtral
// (64-127 tokens keep mma.sync) and glm at 32-48 rows (it keeps the 64).
inline constexpr bool kWgmmaAutomatic = true;
inline constexpr int64_t kWgmmaMinRowsPerExpert = 64;
inline constexpr int64_t kWgmmaFewExperts = 16;
inline constexpr int64_t kWgmmaMinRowsFewExperts = 32;
constexpr int64_t wgmma_min_rows_per_expert(int64_t experts) {
  return experts <= kWgmmaFewExperts ? kWgmmaMinRowsFewExperts : kWgmmaMinRowsPerExpert;
}

struct GroupedMoeArgs {
  DeviceProjection gate, up, down;
  int64_t tokens = 0;
  int top_k = 0;
  const void* x = nullptr;
  DType x_dtype = DType::bf16;
  const int32_t* counts = nullptr;   // [E] (unused, see above)
  const int32_t* offsets = nullptr;  // [E+1]
  const int32_t* order = nullptr;    // [offsets[E]]
  const float* probs = nullptr;      // [tokens, top_k]
  void* out = nullptr;               // [tokens, H]
  DType out_dtype = DType::f32;
  void* workspace = nullptr;
  // Bitwise repeatable results: per-pair rows are combined in slot order by one kernel instead of
  // float atomics. Paths with a Hadamard transform are always deterministic.
  bool deterministic = false;
  // Row-tile height of the GEMMs: 0 picks it from the average rows per expert; 32, 64, 128 or 256
  // force one (tests cover each, benchmarks compare them). The Hadamard path always uses 128.
  int tile_rows = 0;
  GroupedKernel kernel = GroupedKernel::automatic;  // forcing wgmma ignores tile_rows
};

// True when grouped_moe_forward(args) runs its GEMMs with grouped_gemm_wgmma (see GroupedKernel).
bool grouped_uses_wgmma(const GroupedMoeArgs& args);

// What grouped_moe_forward(args) would run, for logs and benchmarks: the GEMM kernel and its tile
// height, e.g. "grouped: wgmma (sm_90a), 128-token tiles, producer warpgroup" or "grouped: mma.sync,
// 64-row tiles".
std::string grouped_plan_summary(const GroupedMoeArgs& args);

// Throws tmoe::Error (bad input) naming the first thing this path cannot run: shapes that do not
// form one MoE layer, K or N not a multiple of 16, bad bits / group size / Hadamard block,
// misaligned device pointers, or more tokens than the scheduler's grid can hold.
void validate_grouped_moe(const GroupedMoeArgs& args);

// Workspace for a call with these shapes, tokens, top_k, dtypes and options (pointers unused).
size_t grouped_moe_workspace_bytes(const GroupedMoeArgs& args);

// Runs the layer; see the contract above. Validates args first.
void grouped_moe_forward(const GroupedMoeArgs& args, cudaStream_t stream);

}  // namespace tmoe::cuda::grouped

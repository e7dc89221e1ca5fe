// Which CUDA path runs a batch: the decode / small-batch kernels (bandwidth-bound; tensor-core mma
// for affine grids, CUDA-core FMAs for custom ones) or the tensor-core grouped path
// (src/cuda/grouped/). Host code; no CUDA types.
#pragma once

#include <cstdint>

namespace tmoe::cuda {

// Expected (token, slot) pairs per expert at which the grouped path becomes the faster one.
// The grouped path decodes each weight once per row tile of an expert's tokens and feeds tensor
// cores; the decode / small-batch path (tensor-core mma kernel since v8) streams every selected
// expert's units once per work item of up to 16 rows, so it wins while items stay few per expert.
//
// Measured (H100 80GB HBM3, 3-bit, group 128; us). Current (session 4, v11 decode kernels): decode
// forced with `scripts/gpu-ab <4 shapes> 16,32,64,128,256,512 new=.` and TMOE_AB_ARGS=
// "--grouped-min-tokens 1000000000", grouped from the dispatcher's own sweep (`scripts/gpu-check`)
// one run earlier (the same kernels, the same kind of H100):
//
//   pairs/expert   qwen3 (T)          mixtral (T)        deepseek (T)         glm (T)
//   2              170 | --  (32)     296 | --  (8)      2120 | --   (64)     475 | --  (32)
//   4              306 | 274 (64)     500 | 545 (16)     3890 | 3807 (128)    868 | 827 (64)
//   8              454 | 285 (128)    742 | 549 (32)     6107 | 3994 (256)    1369 | 864 (128)
//                  (decode | grouped)
//
// At 2 pairs per expert the decode path wins (session 3: by 6-14% with slower decode kernels); at
// 4 the grouped path wins by 2-12% except on mixtral (decode 8% faster: 8 experts of 4096 x 14336);
// at 8 the grouped path wins by 1.4-1.6x. The switch stays at 3: each shape's time still rises with
// T across it (qwen3 32 -> 64: 168 -> 274, mixtral 8 -> 16: 296 -> 545, deepseek 64 -> 128: 2085
// -> 3807, glm 32 -> 64: 471 -> 827). Not measured: 2..3 pairs per expert at token counts off the
// list (e.g. mixtral 10 or 11 tokens).
inline constexpr double kGroupedMinPairsPerExpert = 3.0;

// True when a batch of `tokens` x `top_k` over `experts` experts should take the grouped path.
// `forced_min_tokens` >= 0 overrides the rule (CudaMoeOptions::grouped_min_tokens).
inline bool use_grouped_path(int64_t tokens, int top_k, int64_t experts, int64_t forced_min_tokens) {
  if (forced_min_tokens >= 0) return tokens >= forced_min_tokens;
  const double pairs_per_expert = static_cast<double>(tokens) * top_k / static_cast<double>(experts);
  return pairs_per_expert >= kGroupedMinPairsPerExpert;
}

}  // namespace tmoe::cuda

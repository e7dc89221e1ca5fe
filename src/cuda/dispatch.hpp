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
// Measured (H100 80GB HBM3, 3-bit, group 128; us). Current (session 3): decode forced with
// `tmoe bench --backend cuda --tokens 8,16,32,64 --grouped-min-tokens 1000000000 --min-seconds 0.1`
// at d6e021e, grouped from the dispatcher's own sweep (`scripts/gpu-check`) at 2462c5e (the same
// kernels; two device runs on H100s of the same kind):
//
//   pairs/expert   qwen3 (T)          mixtral (T)        deepseek (T)         glm (T)
//   2              234 | 256 (32)     451 | 523 (8)      3092 | 3527 (64)     727 | 770 (32)
//   4              403 | 287 (64)     733 | 573 (16)     --                   1233 | 870 (64)
//                  (decode | grouped)
//
// At 2 pairs per expert the decode path now wins everywhere (by 6-14%), at 4 the grouped path does
// (by 1.3-1.4x); the earlier table (decode path of fbf3e1c, CUDA cores) had its crossover between 1
// and 2. The switch sits at 3: every listed token count takes its faster path, and each shape's
// time still rises with T across the switch (qwen3 32 -> 64: 234 -> 287, mixtral 8 -> 16: 451 ->
// 573, deepseek 64 -> 128: 3092 -> 3993, glm 32 -> 64: 727 -> 870). Not measured: 2..3 pairs per
// expert at token counts off the list (e.g. mixtral 10 or 11 tokens).
inline constexpr double kGroupedMinPairsPerExpert = 3.0;

// True when a batch of `tokens` x `top_k` over `experts` experts should take the grouped path.
// `forced_min_tokens` >= 0 overrides the rule (CudaMoeOptions::grouped_min_tokens).
inline bool use_grouped_path(int64_t tokens, int top_k, int64_t experts, int64_t forced_min_tokens) {
  if (forced_min_tokens >= 0) return tokens >= forced_min_tokens;
  const double pairs_per_expert = static_cast<double>(tokens) * top_k / static_cast<double>(experts);
  return pairs_per_expert >= kGroupedMinPairsPerExpert;
}

}  // namespace tmoe::cuda

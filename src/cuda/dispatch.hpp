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
// Measured (H100 80GB HBM3, 3-bit, group 128; us), session 6 (v13 decode kernels with the dense
// 8-row variant, commit after 9ad26f3): both paths forced in one run, `tmoe bench --backend cuda
// --shape <all four> --tokens 16,24,32,64,96,128,192,256 --min-seconds 0.1` with
// --grouped-min-tokens 1000000000 (decode) and 0 (grouped); the session-4 table (v11 kernels) had
// decode losing at 4 pairs per expert on three shapes and the switch at 3.
//
//   pairs/expert   qwen3 (T)           mixtral (T)        deepseek (T)          glm (T)
//   4              248 | 268  (64)     396 | 530  (16)    3103 | 3831 (128)     675 | 815  (64)
//   6              305 | 277  (96)     478 | 537  (24)    3742 | 3887 (192)     814 | 853  (96)
//   8              430 | 277  (128)    728 | 541  (32)    5843 | 3991 (256)     1319 | 864 (128)
//                  (decode | grouped)
//
// At 4 pairs per expert the decode path wins on every shape (by 7-25%); at 6 the two are within
// 12% (decode ahead on mixtral, deepseek, glm by 4-11%, grouped on qwen3 by 9%); at 8 (items of 16
// rows, 2 blocks per SM) the grouped path wins by 1.35-1.55x. The switch is at 5: every shape's time
// still rises across it (decode at 4 -> grouped at 6: qwen3 248 -> 277, mixtral 396 -> 537,
// deepseek 3103 -> 3887, glm 675 -> 853). Not measured: 4..6 pairs per expert off the list.
inline constexpr double kGroupedMinPairsPerExpert = 5.0;

// True when a batch of `tokens` x `top_k` over `experts` experts should take the grouped path.
// `forced_min_tokens` >= 0 overrides the rule (CudaMoeOptions::grouped_min_tokens).
inline bool use_grouped_path(int64_t tokens, int top_k, int64_t experts, int64_t forced_min_tokens) {
  if (forced_min_tokens >= 0) return tokens >= forced_min_tokens;
  const double pairs_per_expert = static_cast<double>(tokens) * top_k / static_cast<double>(experts);
  return pairs_per_expert >= kGroupedMinPairsPerExpert;
}

}  // namespace tmoe::cuda

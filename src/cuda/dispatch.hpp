// Which CUDA path runs a batch: the decode / small-batch kernels (CUDA-core FMAs, bandwidth-bound)
// or the tensor-core grouped path (src/cuda/grouped/). Host code; no CUDA types.
#pragma once

#include <cstdint>

namespace tmoe::cuda {

// Expected (token, slot) pairs per expert at which the grouped path becomes the faster one.
// The grouped path decodes each weight tile once per 32-row tile of an expert's tokens and feeds
// tensor cores; the decode path does one FMA per weight and token on CUDA cores, so its cost grows
// with the pairs per expert and the grouped path's barely does until an expert has 32 rows.
// Measured crossover (H100 80GB HBM3, 3-bit, group 128, both paths forced in one run of
// `tmoe bench --backend cuda --grouped-min-tokens 0 | 1000000000`, times in us, docs/notes-cuda.md):
//
//   pairs/expert   qwen3 (T)        mixtral (T)       deepseek (T)        glm (T)
//   0.5            136 | 250 (8)    --                1841 | 3734 (16)    428 | 784 (8)
//   1              267 | 373 (16)   532 | 996 (4)     3909 | 5894 (32)    815 | 1202 (16)
//   2              513 | 500 (32)   1045 | 1132 (8)   7976 | 7947 (64)    1648 | 1614 (32)
//   4              792 | 548 (64)   1619 | 1172 (16)  13225 | 8962 (128)  2687 | 1831 (64)
//   8              1397 | 560       2997 | 1180       24500 | 9248        4860 | 1892
//                  (decode | grouped)
//
// At 2 pairs per expert the two are within 8% either way; from 4 on grouped wins everywhere, by
// 1.4x to 2.7x. Switching at 4 costs at most 3% at 2 and leaves no cliff in the sweep.
inline constexpr double kGroupedMinPairsPerExpert = 4.0;

// True when a batch of `tokens` x `top_k` over `experts` experts should take the grouped path.
// `forced_min_tokens` >= 0 overrides the rule (CudaMoeOptions::grouped_min_tokens).
inline bool use_grouped_path(int64_t tokens, int top_k, int64_t experts, int64_t forced_min_tokens) {
  if (forced_min_tokens >= 0) return tokens >= forced_min_tokens;
  const double pairs_per_expert = static_cast<double>(tokens) * top_k / static_cast<double>(experts);
  return pairs_per_expert >= kGroupedMinPairsPerExpert;
}

}  // namespace tmoe::cuda

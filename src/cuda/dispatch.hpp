// Which CUDA path runs a batch: the decode / small-batch kernels (CUDA-core FMAs, bandwidth-bound)
// or the tensor-core grouped path (src/cuda/grouped/). Host code; no CUDA types.
#pragma once

#include <cstdint>

namespace tmoe::cuda {

// Expected (token, slot) pairs per expert at which the grouped path becomes the faster one.
// The grouped path decodes each weight once per row tile of an expert's tokens and feeds tensor
// cores; the decode path does one FMA per weight and token on CUDA cores, so its cost grows with
// the pairs per expert and the grouped path's barely does until an expert fills a row tile.
// Measured crossover (H100 80GB HBM3, 3-bit, group 128, both paths forced in one run of
// `tmoe bench --backend cuda --grouped-min-tokens 0 | 1000000000 --min-seconds 0.15`: the grouped
// path v7 of commit 5f45cc4 (mixtral 2 and 4 tokens: v7b, 5a7c0b4) against the decode /
// small-batch path of main at fbf3e1c; times in us):
//
//   pairs/expert   qwen3 (T)        mixtral (T)       deepseek (T)        glm (T)
//   0.25           --               --                784 | 1085 (8)      --
//   0.5            125 | 158 (8)    230 | 285 (2)     1515 | 1825 (16)    351 | 427 (8)
//   1              209 | 209 (16)   393 | 433 (4)     3125 | 2853 (32)    662 | 621 (16)
//   2              434 | 268 (32)   859 | 541 (8)     7188 | 3812 (64)    1475 | 838 (32)
//   4              632 | 299 (64)   1320 | 607 (16)   --                  2194 | 954 (64)
//                  (decode | grouped)
//
// Below 1 pair per expert the decode path wins (by 1.2-1.4x); at 1 it is mixed (decode 10% ahead
// for mixtral, a tie for qwen3, grouped 6-9% ahead for glm and deepseek); from 2 on grouped wins
// everywhere, by 1.6x to 1.9x. Switching at 2 costs at most 9% between 1 and 2 pairs per expert,
// keeps the decode path's fp32-exact results for those small batches, and leaves no time drop at
// the switch (each shape's time rises with T across it).
inline constexpr double kGroupedMinPairsPerExpert = 2.0;

// True when a batch of `tokens` x `top_k` over `experts` experts should take the grouped path.
// `forced_min_tokens` >= 0 overrides the rule (CudaMoeOptions::grouped_min_tokens).
inline bool use_grouped_path(int64_t tokens, int top_k, int64_t experts, int64_t forced_min_tokens) {
  if (forced_min_tokens >= 0) return tokens >= forced_min_tokens;
  const double pairs_per_expert = static_cast<double>(tokens) * top_k / static_cast<double>(experts);
  return pairs_per_expert >= kGroupedMinPairsPerExpert;
}

}  // namespace tmoe::cuda

// Which CUDA path runs a batch: the decode / small-batch kernels (CUDA-core FMAs, bandwidth-bound)
// or the tensor-core grouped path (src/cuda/grouped/). Host code; no CUDA types.
#pragma once

#include <cstdint>

namespace tmoe::cuda {

// Expected (token, slot) pairs per expert at which the grouped path becomes the faster one.
// The grouped path decodes each weight tile once per 32-row tile of an expert's tokens and feeds
// tensor cores; the decode path does one FMA per weight and token on CUDA cores, so its cost grows
// with the pairs per expert and the grouped path's barely does until an expert has 32 rows.
// Measured crossover (H100, 3-bit, both paths forced in one run, docs/notes-cuda.md "Dispatch"):
// see the table there; this constant is the smallest pairs-per-expert at which grouped won on
// every shape measured.
inline constexpr double kGroupedMinPairsPerExpert = 4.0;

// True when a batch of `tokens` x `top_k` over `experts` experts should take the grouped path.
// `forced_min_tokens` >= 0 overrides the rule (CudaMoeOptions::grouped_min_tokens).
inline bool use_grouped_path(int64_t tokens, int top_k, int64_t experts, int64_t forced_min_tokens) {
  if (forced_min_tokens >= 0) return tokens >= forced_min_tokens;
  const double pairs_per_expert = static_cast<double>(tokens) * top_k / static_cast<double>(experts);
  return pairs_per_expert >= kGroupedMinPairsPerExpert;
}

}  // namespace tmoe::cuda

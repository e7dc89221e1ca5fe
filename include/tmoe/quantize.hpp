// W (K x N, per expert) -> Trellis (FORMAT.md).
#pragma once

#include <cstdint>
#include <functional>
#include <span>

#include "tmoe/format.hpp"

namespace tmoe {

enum class GridKind { uniform, fit };

struct QuantizeOptions {
  int bits = 3;
  int group_size = 128;
  // 0: no rotation, su = sv = +1, Q approximates W. b (a power of two dividing K and N, 128 is the
  // usual one): random +-1 su, sv from `seed` and Q approximates H_K diag(su) W diag(sv) H_N.
  int hadamard = 0;
  GridKind grid = GridKind::uniform;
  uint64_t seed = 0x5eed;      // for the random sign vectors
  int threads = 0;             // 0: all cores; the result does not depend on it
  // true: per group, the fp16 scale minimising the squared error (a search around the max-abs
  // scale, then least-squares refinement). false: plain max-abs scaling (a baseline to compare to).
  bool search_scales = true;
};

struct QuantizeReport {
  double relative_error = 0;   // ||W - W_hat||_F / ||W||_F over all experts
  double sqnr_db = 0;          // 10 log10(||W||^2 / ||W - W_hat||^2)
  // W_hat is the effective weight of the result (tmoe::effective_weight), i.e. the true W error.
};

// Fills `out` (count * K * N floats) with the weights of experts first .. first + count - 1,
// row-major [count][K][N]. Called from the calling thread.
using ExpertLoader = std::function<void(int64_t first, int64_t count, std::span<float> out)>;

// Quantizes W [experts, K, N] (row-major fp32; K = in, N = out). `progress`, if set, is called with
// (experts done, experts) from the calling thread. Throws tmoe::Error (bad input) on bad options,
// a W of the wrong size, a non-finite weight or one too large for an fp16 scale. With
// GridKind::fit the 2^bits levels are fitted (Lloyd-Max) on a sample of the target and kept only if
// they beat the uniform grid there.
TrellisTensor quantize(std::span<const float> w, int64_t experts, int64_t K, int64_t N,
                       const QuantizeOptions& options, QuantizeReport* report = nullptr,
                       const std::function<void(int64_t, int64_t)>& progress = {});

// The same, reading the experts through `load` a chunk at a time (~64 MB of weights held at
// once), so a projection larger than memory can be quantized; the result is bitwise the same as
// quantizing the whole W at once.
TrellisTensor quantize(const ExpertLoader& load, int64_t experts, int64_t K, int64_t N,
                       const QuantizeOptions& options, QuantizeReport* report = nullptr,
                       const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace tmoe

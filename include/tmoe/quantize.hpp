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
  int hadamard = 0;            // 0 or a power-of-two block (128 is the usual one)
  GridKind grid = GridKind::uniform;
  uint64_t seed = 0x5eed;      // for the random sign vectors
  int threads = 0;             // 0: all cores
};

struct QuantizeReport {
  double relative_error = 0;   // ||W - W_hat||_F / ||W||_F over all experts
  double sqnr_db = 0;          // 10 log10(||W||^2 / ||W - W_hat||^2)
};

// Quantizes W [experts, K, N] (row-major fp32; K = in, N = out). `progress`, if set, is called with
// (experts done, experts) from the calling thread.
TrellisTensor quantize(std::span<const float> w, int64_t experts, int64_t K, int64_t N,
                       const QuantizeOptions& options, QuantizeReport* report = nullptr,
                       const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace tmoe

// The quantizer's inner loop: rounding a group of weights to the nearest of a few sorted levels.
// SIMD (Highway, target picked at run time) because the scale search runs it ~40 times per group.
#pragma once

namespace tmoe::quant {

struct RoundingError {
  float error = 0;  // sum (v - q)^2
  float vq = 0;     // sum v q   (for a least-squares rescale)
  float qq = 0;     // sum q q
};

// Rounds each v[i], i < len, to the nearest of `levels` sorted values `level`: to level t + 1 iff
// v > threshold[t] (threshold[t] = midpoint of level[t] and level[t + 1]), and sums the error.
// levels is 4, 8 or 16; the caller scales levels and thresholds.
RoundingError round_to_grid_error(const float* v, int len, const float* level,
                                  const float* threshold, int levels);

}  // namespace tmoe::quant

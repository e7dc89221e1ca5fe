// Normalized block Walsh-Hadamard transform T (FORMAT.md): on each block of `block` consecutive
// elements, v <- H v / sqrt(block), so T . T = I. Host code; CUDA has its own kernels.
#pragma once

#include <cmath>
#include <cstdint>

namespace tmoe {

constexpr bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

template <typename Real>
void block_hadamard(Real* v, int64_t n, int block) {
  const Real norm = static_cast<Real>(1.0 / std::sqrt(static_cast<double>(block)));
  for (int64_t base = 0; base + block <= n; base += block) {
    Real* b = v + base;
    for (int len = 1; len < block; len <<= 1) {
      for (int i = 0; i < block; i += 2 * len) {
        for (int j = i; j < i + len; ++j) {
          const Real a = b[j], c = b[j + len];
          b[j] = a + c;
          b[j + len] = a - c;
        }
      }
    }
    for (int i = 0; i < block; ++i) b[i] *= norm;
  }
}

}  // namespace tmoe

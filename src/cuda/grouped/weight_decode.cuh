// Decoded weights of the grouped path: from a lane's fragment-layout words (fragment_decode.cuh)
// to scaled bf16 weight pairs. Shared by both GEMM kernels: grouped_gemm (mma.sync, the pairs
// become B fragments in registers) and grouped_gemm_wgmma (they are wgmma's A fragments in
// registers). Device code only.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "cuda/fragment_decode.cuh"

namespace tmoe::cuda::grouped {

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t hfma2_bits(uint32_t x, uint32_t a, uint32_t b) {
  const __nv_bfloat162 v = __hfma2(*reinterpret_cast<const __nv_bfloat162*>(&x),
                                   *reinterpret_cast<const __nv_bfloat162*>(&a),
                                   *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t hadd2_bits(uint32_t x, uint32_t a) {
  const __nv_bfloat162 v = __hadd2(*reinterpret_cast<const __nv_bfloat162*>(&x),
                                   *reinterpret_cast<const __nv_bfloat162*>(&a));
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t hmul2_bits(uint32_t x, uint32_t a) {
  const __nv_bfloat162 v = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x),
                                   *reinterpret_cast<const __nv_bfloat162*>(&a));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// How a projection's codebook maps to weights (read from the device grid once per block):
// affine grids (grid[i] = grid0 + step * i, the default) decode an index straight into bf16,
// centre it (i - c, c = (2^bits - 1) / 2: exact in bf16) and take one HFMA2 with
// (step * scale, center * scale), center = grid0 + c * step (0 for symmetric grids). Centring
// matters for accuracy: with (step * scale, grid0 * scale) the bf16 rounding of both
// coefficients adds up to ~(|idx| + |grid0 / step|) * 2^-9 per weight, ~2.5x a bf16 weight's.
// Other grids look the pair of levels up.
struct GridForm {
  float center, step;
  int affine;
};

// Reads a projection's grid and decides whether it is affine: every level within 1e-6 of the
// largest of grid0 + step * i (the error of treating it so is ~1e-7 relative, far below bf16's).
__device__ inline GridForm grid_form(const float* grid, int bits) {
  const int levels = 1 << bits;
  const double g0 = grid[0], step = (static_cast<double>(grid[levels - 1]) - g0) / (levels - 1);
  double largest = 0.0;
  for (int i = 0; i < levels; ++i) largest = fmax(largest, fabs(static_cast<double>(grid[i])));
  bool affine = step != 0.0;
  for (int i = 0; i < levels; ++i) affine = affine && fabs(grid[i] - (g0 + step * i)) <= 1e-6 * largest;
  const double center = g0 + step * ((levels - 1) * 0.5);
  return {static_cast<float>(center), static_cast<float>(step), affine ? 1 : 0};
}

// The (k-tile, column) coefficients: weight = X * c.x + c.y, as bf16x2 broadcasts; X = the
// centred index (affine grid: c = (step * scale, center * scale)) or the level (c = (scale, 0)).
// coef_multipliers(g) is the scale-free part (c = scale * m), for kernels that keep it in registers.
__device__ __forceinline__ float2 coef_multipliers(const GridForm& g) {
  return g.affine ? make_float2(g.step, g.center) : make_float2(1.0f, 0.0f);
}
__device__ __forceinline__ uint2 weight_coef(float2 multipliers, float scale) {
  const float a = multipliers.x * scale, b = multipliers.y * scale;
  return make_uint2(pack_bf16(a, a), pack_bf16(b, b));
}
__device__ __forceinline__ uint2 weight_coef(const GridForm& g, float scale) {
  return weight_coef(coef_multipliers(g), scale);
}

// Pair P's two fields of a lane's unit words as one 2*BITS-bit index lo | hi << BITS (the level
// table's index for grids that are not affine). Same bit positions as fragment_decode.cuh's.
template <int BITS, int P>
__device__ __forceinline__ uint32_t level_pair_index(const uint32_t (&w)[BITS]) {
  constexpr uint32_t mask = (1u << BITS) - 1u;
  constexpr int b = fragment_detail::pair_field_bit<BITS, P>();
  const uint32_t word = fragment_detail::pair_fields<BITS, P>(w);
  return ((word >> b) & mask) | ((word >> (b + 16 - BITS)) & (mask << BITS));
}

// The four weight pairs of k-tile KT of one unit for this lane, in A-fragment order
// (fragment_layout.hpp): out[q] holds column g + 8 (q & 1) at k = 16 KT + 2 t + 8 (q >> 1) and
// the next k (lane = 4 g + t). Weights are X * c.x + c.y with coef_left (column g) / coef_right
// (g + 8), times su_low (su at k = 2t, 2t+1 of the k-tile) and su_high (k = 2t+8, 2t+9) when
// with_su. AFFINE: decoded centred indices; else level pairs from the table.
template <int BITS, int KT, bool AFFINE>
__device__ __forceinline__ void scaled_weight_pairs(const uint32_t (&w)[BITS], const uint32_t* level_pairs,
                                                    uint2 coef_left, uint2 coef_right, bool with_su,
                                                    uint32_t su_low, uint32_t su_high, uint32_t (&out)[4]) {
  uint32_t x[4];
  if constexpr (AFFINE) {
    // bf16 bits of -(bias + c), c = (2^BITS - 1) / 2: -(8 + 1.5), -(8 + 3.5), -(16 + 7.5), in both
    // halves: the decoded bias + idx minus it is idx - c, exactly (fragment_decode.cuh).
    static_assert(kDecodeBias<2> == 8 && kDecodeBias<3> == 8 && kDecodeBias<4> == 16);
    constexpr uint32_t minus_center = BITS == 2 ? 0xC118u : BITS == 3 ? 0xC138u : 0xC1BCu;
    constexpr uint32_t minus_centers = minus_center | (minus_center << 16);
    x[0] = hadd2_bits(fragment_detail::decode_pair<BITS, 4 * KT + 0>(w), minus_centers);
    x[1] = hadd2_bits(fragment_detail::decode_pair<BITS, 4 * KT + 1>(w), minus_centers);
    x[2] = hadd2_bits(fragment_detail::decode_pair<BITS, 4 * KT + 2>(w), minus_centers);
    x[3] = hadd2_bits(fragment_detail::decode_pair<BITS, 4 * KT + 3>(w), minus_centers);
  } else {
    x[0] = level_pairs[level_pair_index<BITS, 4 * KT + 0>(w)];
    x[1] = level_pairs[level_pair_index<BITS, 4 * KT + 1>(w)];
    x[2] = level_pairs[level_pair_index<BITS, 4 * KT + 2>(w)];
    x[3] = level_pairs[level_pair_index<BITS, 4 * KT + 3>(w)];
  }
  out[0] = hfma2_bits(x[0], coef_left.x, coef_left.y);
  out[1] = hfma2_bits(x[1], coef_right.x, coef_right.y);
  out[2] = hfma2_bits(x[2], coef_left.x, coef_left.y);
  out[3] = hfma2_bits(x[3], coef_right.x, coef_right.y);
  if (with_su) {
    out[0] = hmul2_bits(out[0], su_low);
    out[1] = hmul2_bits(out[1], su_low);
    out[2] = hmul2_bits(out[2], su_high);
    out[3] = hmul2_bits(out[3], su_high);
  }
}

}  // namespace tmoe::cuda::grouped

// Device decoder of the fragment layout (fragment_layout.hpp): a lane's BITS words of one unit
// become its 16 pairs, each a bf16x2 holding two codebook indices exactly (integers 0..15 are exact
// in bf16), ready to be the A operand (weights as rows) or B operand (weights as columns) of
// mma.m16n8k16 bf16. Kernels apply grid, scale and signs outside the tensor-core product:
// with an affine grid (grid[i] = grid0 + step * i) sum_k x_k grid[idx_k] = grid0 sum_k x_k +
// step sum_k x_k idx_k, and the scale is constant over a 16-k tile column.
//
// How a pair is decoded: its two fields sit at the same offset b in the two 16-bit halves of a
// word. Shift the word so that b + BITS <= 7, mask both fields and OR in 0x4300 (bf16 128.0, whose
// mantissa unit is 1): each half is then 128 + idx * 2^b exactly; one fma.rn.bf16x2 with
// (2^-b, -128 * 2^-b) leaves idx. Cost per pair: one mask-OR (LOP3), one HFMA2, and a shift
// shared by 2 or 3 pairs: ~1.3 instructions per weight for 3 bits (v7's tile decode: ~7.2).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <utility>

#include "cuda/fragment_layout.hpp"

namespace tmoe::cuda {

namespace fragment_detail {

// bf16x2 of (idx_lo, idx_hi) from `word` whose fields sit at bit b of each half (b + BITS <= 7).
template <int BITS, int B>
__device__ __forceinline__ uint32_t decode_aligned_pair(uint32_t word) {
  static_assert(B + BITS <= 7, "the field must lie in the bf16 mantissa");
  constexpr uint32_t mask = ((1u << BITS) - 1u) << B;
  // (word & mask) | 0x43004300 = 128 + idx * 2^B, as ONE lop3: SASS takes one immediate per
  // instruction, so with both constants as immediates ptxas emitted an AND and an OR (ncu on v9:
  // 34 LOP3 per unit and lane); the magic number lives in a register instead. Measured 1-3% faster
  // at 1 and 4 tokens on every shape (docs/notes-cuda.md, "v10").
  uint32_t biased;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(biased) : "r"(word), "n"(mask | (mask << 16)), "r"(0x43004300u));
  // bf16 bit patterns (sign | exponent << 7) of 2^-B and -2^(7-B), in both halves.
  constexpr uint32_t scale_bits = (127u - B) << 7, offset_bits = 0x8000u | ((134u - B) << 7);
  const uint32_t scale = scale_bits | (scale_bits << 16), offset = offset_bits | (offset_bits << 16);
  const __nv_bfloat162 v = __hfma2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                                   *reinterpret_cast<const __nv_bfloat162*>(&scale),
                                   *reinterpret_cast<const __nv_bfloat162*>(&offset));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Bit offset (within a half) of pair p's fields, and the word holding them.
template <int BITS>
__device__ __forceinline__ constexpr int pair_word(int p) {
  return BITS == 3 ? p / 5 : p / (16 / BITS);
}
template <int BITS>
__device__ __forceinline__ constexpr int pair_bit(int p) {
  return BITS == 3 ? 1 + 3 * (p % 5) : BITS * (p % (16 / BITS));
}
// The shift that brings a field at bit b into [0, 7 - BITS]: multiples of 6 (2 and 3 bits: fields
// at 0..13 land at 0..4) or of 4 (4 bits), so the pairs of a word share 2 or 3 shifts.
template <int BITS>
__device__ __forceinline__ constexpr int pair_shift(int b) {
  return BITS == 4 ? b / 4 * 4 : b / 6 * 6;
}

template <int BITS, int P>
__device__ __forceinline__ uint32_t decode_pair(const uint32_t (&w)[BITS]) {
  if constexpr (BITS == 3 && P == 15) {  // the spare bits 0 and 16 of the three words
    const uint32_t m = 0x00010001u;
    const uint32_t gathered = (w[0] & m) | ((w[1] << 1) & (m << 1)) | ((w[2] << 2) & (m << 2));
    return decode_aligned_pair<3, 0>(gathered);
  } else {
    constexpr int b = pair_bit<BITS>(P), shift = pair_shift<BITS>(b);
    return decode_aligned_pair<BITS, b - shift>(w[pair_word<BITS>(P)] >> shift);
  }
}

template <int BITS, int... P>
__device__ __forceinline__ void decode_all(const uint32_t (&w)[BITS], uint32_t (&pairs)[16],
                                           std::integer_sequence<int, P...>) {
  ((pairs[P] = decode_pair<BITS, P>(w)), ...);
}

}  // namespace fragment_detail

// The 16 pairs of a lane from its BITS words of a unit. pairs[4 i + r] is A-fragment register r of
// k-tile i (weights as the A operand); as the B operand, k-tile i's left half is
// {pairs[4i], pairs[4i+2]} and its right half {pairs[4i+1], pairs[4i+3]}.
template <int BITS>
__device__ __forceinline__ void decode_unit_pairs(const uint32_t (&words)[BITS], uint32_t (&pairs)[16]) {
  fragment_detail::decode_all<BITS>(words, pairs, std::make_integer_sequence<int, 16>{});
}

}  // namespace tmoe::cuda

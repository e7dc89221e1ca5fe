// Device decoder of the fragment layout (fragment_layout.hpp): a lane's BITS words of one unit
// become its 16 pairs, each a bf16x2 holding two codebook indices PLUS A BIAS, exactly:
// kDecodeBias<BITS> + idx (integers up to 31 are exact in bf16), ready to be the A operand (weights
// as rows) or B operand (weights as columns) of mma.m16n8k16 bf16. Kernels apply the bias, grid,
// scale and signs outside the tensor-core product: with an affine grid (grid[i] = grid0 + step * i)
//   sum_k x_k grid[idx_k] = step * (sum_k x_k (bias + idx_k) + (grid0 / step - bias) sum_k x_k),
// and the scale is constant over a 16-k tile column; the grouped kernels subtract bias + centre
// from each pair with one HADD2.
//
// How a pair is decoded: its two fields sit at the same offset b in the two 16-bit halves of a
// word. Shift the word so that the fields sit at bit f = kFieldBit, mask both and OR in the bf16
// exponent of c = 2^(7 - f) (one LOP3, the exponent in a register): the bf16 c * (1 + m / 128) with
// m = idx << f is c + idx. Cost per pair: one LOP3, plus a shift per field not already at f
// (3 bits: 4 shifts per 5 pairs): ~0.9 instructions per weight. (Before: fields left where two
// shifts per word put them, then one HFMA2 per pair to scale them back to the index: ~1.3; the bias
// replaces that HFMA2 by one term per scale group.) The biases 8 and 16 cost the fp32 sums little:
// 8 / 2.3 (3 bits: 2.3 is the rms of a centred index) is 2 bits of the 24.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <utility>

#include "cuda/fragment_layout.hpp"

namespace tmoe::cuda {

namespace fragment_detail {

// Where the decoder puts each field inside a 16-bit half: the top BITS bits of the bf16 mantissa
// (bits 4..6 for 3 and 4 bits; 2 bits take bits 4..5, where one of a word's 8 fields already sits).
template <int BITS>
inline constexpr int kFieldBit = BITS == 2 ? 4 : 7 - BITS;

}  // namespace fragment_detail

// Each decoded value is kDecodeBias<BITS> + idx: 8, 8, 16 for 2, 3, 4 bits.
template <int BITS>
inline constexpr int kDecodeBias = 1 << (7 - fragment_detail::kFieldBit<BITS>);

namespace fragment_detail {

// bf16x2 of (bias + idx_lo, bias + idx_hi) from `word` whose fields sit at kFieldBit of each half.
template <int BITS>
__device__ __forceinline__ uint32_t decode_aligned_pair(uint32_t word) {
  constexpr uint32_t mask = ((1u << BITS) - 1u) << kFieldBit<BITS>;
  constexpr uint32_t exponent = (134u - kFieldBit<BITS>) << 7;  // bf16 kDecodeBias
  // (word & mask) | exponent as ONE lop3: SASS takes one immediate per instruction, so with both
  // constants as immediates ptxas emitted an AND and an OR (ncu on v9: 34 LOP3 per unit and lane);
  // the exponent lives in a register instead (1-3% faster at 1 and 4 tokens, notes-cuda.md "v10").
  uint32_t biased;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(biased) : "r"(word), "n"(mask | (mask << 16)), "r"(exponent | (exponent << 16)));
  return biased;
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

// `word` moved so that a field at bit b lands at kFieldBit (a compile-time shift, or none).
template <int BITS, int B>
__device__ __forceinline__ uint32_t align_field(uint32_t word) {
  constexpr int shift = B - kFieldBit<BITS>;
  if constexpr (shift > 0) return word >> shift;
  else if constexpr (shift < 0) return word << -shift;
  else return word;
}

// The word holding pair P's two fields (at pair_field_bit in each half): one of the lane's words,
// or for 3-bit pair 15 its spare bits 0 and 16 of the three words gathered into bits 0..2.
template <int BITS, int P>
__device__ __forceinline__ constexpr int pair_field_bit() {
  return BITS == 3 && P == 15 ? 0 : pair_bit<BITS>(P);
}
template <int BITS, int P>
__device__ __forceinline__ uint32_t pair_fields(const uint32_t (&w)[BITS]) {
  if constexpr (BITS == 3 && P == 15) {
    const uint32_t m = 0x00010001u;
    return (w[0] & m) | ((w[1] & m) << 1) | ((w[2] & m) << 2);
  } else {
    return w[pair_word<BITS>(P)];
  }
}

template <int BITS, int P>
__device__ __forceinline__ uint32_t decode_pair(const uint32_t (&w)[BITS]) {
  return decode_aligned_pair<BITS>(align_field<BITS, pair_field_bit<BITS, P>()>(pair_fields<BITS, P>(w)));
}

template <int BITS, int... P>
__device__ __forceinline__ void decode_all(const uint32_t (&w)[BITS], uint32_t (&pairs)[16],
                                           std::integer_sequence<int, P...>) {
  ((pairs[P] = decode_pair<BITS, P>(w)), ...);
}

}  // namespace fragment_detail

// The 16 pairs (kDecodeBias<BITS> + idx each) of a lane from its BITS words of a unit.
// pairs[4 i + r] is A-fragment register r of k-tile i (weights as the A operand); as the B operand,
// k-tile i's left half is {pairs[4i], pairs[4i+2]} and its right half {pairs[4i+1], pairs[4i+3]}.
template <int BITS>
__device__ __forceinline__ void decode_unit_pairs(const uint32_t (&words)[BITS], uint32_t (&pairs)[16]) {
  fragment_detail::decode_all<BITS>(words, pairs, std::make_integer_sequence<int, 16>{});
}

}  // namespace tmoe::cuda

// The fragment layout: how CudaMoe stores a projection's packed indices on the device, so that a
// warp turns them into tensor-core operands with a few logic ops per weight pair and no shared
// memory (the tile layout of FORMAT.md needs per-field shifts and masks: ncu on the v7 decode
// kernel counted ~7.2 instructions per weight, and the grouped path decoded through shared memory).
//
// Same bits per weight as FORMAT.md (only the order of the bits changes), so the bytes read per
// token are those of the file. Host code and tests use the functions here; kernels use
// fragment_decode.cuh. No CUDA types: host tests include this header.
//
// Unit. K is cut into quads of 4 k-tiles (64 k; the last quad is padded with index 0, whose
// activations the kernels zero). A unit is one (expert e, n-tile j, quad q): 1024 indices,
// 32 * BITS 32-bit words, 128 * BITS bytes. Units are stored expert-major, then n-tile, then quad:
//     unit(e, j, q) starts at word ((e * tiles_n + j) * quads + q) * 32 * BITS,
// so a warp that walks along K for one n-tile reads one contiguous stream. Inside a unit, word w
// of lane l is word w * 32 + l: each warp load of one word is 128 contiguous bytes.
//
// Lanes and values. Lane l = 4 g + t holds 32 indices, 8 per k-tile i of the quad, in the order of
// the m16n8k16 A fragment when the weights are the A operand (rows = n, columns = k):
//     value v = 8 i + r,  r = 0..7:  n = g + 8 ((r >> 1) & 1),  k = 16 i + 2 t + (r & 1) + 8 (r >> 2)
// The same lane holds exactly the B fragment of m16n8k16 when the weights are the B operand
// (k x n): for the 8 columns g of the tile's left half, registers {pair 4i, pair 4i+2}; for the
// right half (g + 8), {pair 4i+1, pair 4i+3}. Both kernel families use it.
//
// Pairs. Values 2p and 2p+1 (same n, consecutive k) form pair p = 0..15: one 32-bit register of two
// 16-bit operands. Its low value goes to the low half of a word, its high value to the high half,
// at the same bit offset, so one mask-and-OR places both into the mantissas of a bf16x2:
//   BITS 2: word p / 8, slot s = p % 8 at bit 2 s (+16 for the high value);
//   BITS 4: word p / 4, slot s = p % 4 at bit 4 s (+16);
//   BITS 3: pairs 0..14: word p / 5, slot s = p % 5 at bit 1 + 3 s (+16). Pair 15 uses the spare
//           bits 0 and 16 of the three words: bit j of its low value is bit 0 of word j, bit j of
//           its high value is bit 16 of word j.
#pragma once

#include <cstdint>
#include <vector>

#include "tmoe/config.hpp"
#include "tmoe/trellis_decode.hpp"

namespace tmoe::cuda {

inline constexpr int kQuadTiles = 4;                   // k-tiles per unit
inline constexpr int kQuadK = kQuadTiles * kTileDim;   // 64
inline constexpr int kUnitValues = 1024;
TMOE_HD constexpr int unit_words(int bits) { return 32 * bits; }
TMOE_HD constexpr int unit_bytes(int bits) { return 128 * bits; }
TMOE_HD constexpr int64_t quads_of(int64_t K) { return ceil_div(K, kQuadK); }
// Index of the first word of unit (e, j, q).
TMOE_HD constexpr int64_t unit_word_offset(int64_t e, int64_t j, int64_t q, int64_t tiles_n, int64_t quads,
                                           int bits) {
  return ((e * tiles_n + j) * quads + q) * unit_words(bits);
}

// Where value v (0..31) of lane l sits in the unit: its n and k inside (n-tile, quad).
TMOE_HD constexpr int fragment_n(int lane, int v) { return (lane >> 2) + 8 * ((v >> 1) & 1); }
TMOE_HD constexpr int fragment_k(int lane, int v) {
  return 16 * (v >> 3) + 2 * (lane & 3) + (v & 1) + 8 * ((v >> 2) & 1);
}

// The bit offset of bit `b` of the field of value v inside the lane's BITS words (word = offset / 32).
TMOE_HD constexpr int fragment_bit(int bits, int v, int b) {
  const int pair = v >> 1, high = v & 1;
  if (bits == 3 && pair == 15) return 32 * b + 16 * high;
  const int per_word = bits == 3 ? 5 : 16 / bits;
  const int first = bits == 3 ? 1 : 0;
  return 32 * (pair / per_word) + 16 * high + first + bits * (pair % per_word) + b;
}

// Index of value v of lane l in a unit (host reference of the kernels' decoder).
TMOE_HD uint32_t fragment_index(const uint32_t* unit, int bits, int lane, int v) {
  uint32_t index = 0;
  for (int b = 0; b < bits; ++b) {
    const int at = fragment_bit(bits, v, b);
    index |= ((unit[(at >> 5) * 32 + lane] >> (at & 31)) & 1u) << b;
  }
  return index;
}

// All experts of one projection in the fragment layout: E * tiles_n * quads units
// (src/cuda/fragment_layout.cpp; OpenMP over experts).
std::vector<uint32_t> pack_fragment_units(const TrellisView& t);

}  // namespace tmoe::cuda

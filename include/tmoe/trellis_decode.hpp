// The one Trellis decoder (FORMAT.md), shared by host code and every kernel.
//
// A 16x16 tile stores its 256 indices as a little-endian bit string, position
// p = (n % 16) * 16 + (k % 16). So one tile *column* (the 16 k-values of one output n) is a
// contiguous run of 16 * bits bits = 4, 6 or 8 whole bytes, byte aligned: every kernel decodes
// column words, never single scattered fields.
#pragma once

#include <cstdint>
#include <type_traits>

#include "tmoe/config.hpp"
#include "tmoe/half.hpp"

namespace tmoe {

inline constexpr int kTileDim = 16;     // tiles are kTileDim x kTileDim weights
inline constexpr int kTileElems = 256;  // weights per tile

TMOE_HD constexpr bool valid_bits(int bits) { return bits == 2 || bits == 3 || bits == 4; }
TMOE_HD constexpr int tile_bytes(int bits) { return kTileElems * bits / 8; }  // 64, 96, 128
TMOE_HD constexpr int column_bytes(int bits) { return kTileDim * bits / 8; }   // 4, 6, 8
TMOE_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TMOE_HD constexpr int position_in_tile(int k_in_tile, int n_in_tile) {
  return n_in_tile * kTileDim + k_in_tile;
}

// Byte offset of tile (k_tile, n_tile) inside one matrix's packed indices.
TMOE_HD constexpr int64_t tile_offset(int64_t k_tile, int64_t n_tile, int64_t tiles_n, int bits) {
  return (k_tile * tiles_n + n_tile) * tile_bytes(bits);
}

// The 16*BITS-bit word holding column `n_in_tile` of a tile (byte loads: works at any alignment).
template <int BITS>
TMOE_HD uint64_t load_column_word(const uint8_t* tile, int n_in_tile) {
  const uint8_t* column = tile + n_in_tile * column_bytes(BITS);
  uint64_t word = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int b = 0; b < column_bytes(BITS); ++b) word |= static_cast<uint64_t>(column[b]) << (8 * b);
  return word;
}

// Index of row k_in_tile inside a column word.
template <int BITS>
TMOE_HD uint32_t column_index(uint64_t column_word, int k_in_tile) {
  return static_cast<uint32_t>(column_word >> (k_in_tile * BITS)) & ((1u << BITS) - 1u);
}

// Index at any position of a tile (the field may cross a byte boundary). Slow path for host code.
template <int BITS>
TMOE_HD uint32_t tile_index(const uint8_t* tile, int position) {
  const int bit = position * BITS;
  const int byte = bit >> 3;
  uint32_t pair = tile[byte];
  if ((bit & 7) + BITS > 8) pair |= static_cast<uint32_t>(tile[byte + 1]) << 8;
  return (pair >> (bit & 7)) & ((1u << BITS) - 1u);
}

// Calls f(std::integral_constant<int, bits>{}) for bits in {2, 3, 4}; callers validate bits first.
template <typename F>
decltype(auto) dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 3>{});
  }
}

// A non-owning view of E stacked quantized K x N matrices (host or device pointers).
// scales, su and sv are fp16 bits; grid is fp32 (2^bits levels).
struct TrellisView {
  const uint8_t* indices = nullptr;  // [E, tiles_k, tiles_n, tile_bytes]
  const uint16_t* scales = nullptr;  // [E, groups, N]
  const uint16_t* su = nullptr;      // [E, K]
  const uint16_t* sv = nullptr;      // [E, N]
  const float* grid = nullptr;       // [2^bits]
  int64_t experts = 0, K = 0, N = 0;
  int bits = 3, group_size = 128, hadamard = 0;

  TMOE_HD int64_t tiles_k() const { return ceil_div(K, kTileDim); }
  TMOE_HD int64_t tiles_n() const { return ceil_div(N, kTileDim); }
  TMOE_HD int64_t groups() const { return ceil_div(K, group_size); }
  TMOE_HD int64_t expert_index_bytes() const { return tiles_k() * tiles_n() * tile_bytes(bits); }
  TMOE_HD const uint8_t* expert_indices(int64_t e) const { return indices + e * expert_index_bytes(); }
  TMOE_HD const uint16_t* expert_scales(int64_t e) const { return scales + e * groups() * N; }
  TMOE_HD const uint16_t* expert_su(int64_t e) const { return su + e * K; }
  TMOE_HD const uint16_t* expert_sv(int64_t e) const { return sv + e * N; }

  // Codebook index of w[k][n] of expert e.
  TMOE_HD uint32_t index(int64_t e, int64_t k, int64_t n) const {
    const uint8_t* tile =
        expert_indices(e) + tile_offset(k / kTileDim, n / kTileDim, tiles_n(), bits);
    const int p = position_in_tile(static_cast<int>(k % kTileDim), static_cast<int>(n % kTileDim));
    switch (bits) {
      case 2: return tile_index<2>(tile, p);
      case 4: return tile_index<4>(tile, p);
      default: return tile_index<3>(tile, p);
    }
  }
  // Q[k][n] = grid[index] * scale (no signs): what the kernels multiply with.
  TMOE_HD float q(int64_t e, int64_t k, int64_t n) const {
    return grid[index(e, k, n)] * half_to_float(expert_scales(e)[(k / group_size) * N + n]);
  }
  // The stored element value of FORMAT.md: grid[index] * scale * su[k] * sv[n].
  TMOE_HD float element(int64_t e, int64_t k, int64_t n) const {
    return q(e, k, n) * half_to_float(expert_su(e)[k]) * half_to_float(expert_sv(e)[n]);
  }
};

}  // namespace tmoe

// The CPU backend's copy of one projection (gate, up or down), repacked at backend construction
// for the SIMD kernels (DESIGN.md allows a load-time layout; the file format stays canonical).
//
// Layout, per expert: tile columns are n-major ([tiles_n][tiles_k] tiles), so one thread streams
// one contiguous run of bytes per 16 output columns. Inside a tile the 16 column words of the
// canonical format (trellis_decode.hpp: load_column_word) are split into 32-bit "lane words", one
// lane per output column n, so a SIMD vector holds 16 columns and each row k is decoded with one
// shift by an immediate and one table lookup, no cross-lane byte shuffles:
//   2 bits: u32 w0[16]                 rows 0..15 at bit 2*r of w0      (64 bytes, = canonical)
//   3 bits: u32 lo[16], u16 hi16[16]   column word = lo | hi16 << 32;   (96 bytes)
//           rows 0..7 at bit 3*r of lo, rows 8..15 at bit 3*(r-8) of (lo >> 24 | hi16 << 8)
//   4 bits: u32 lo[16], u32 hi[16]     rows 0..7 in lo, rows 8..15 in hi (128 bytes)
// Same byte count as the canonical tiles. Scales are regrouped per tile column as fp16
// [groups][16] (zero past N, so lanes past N compute zeros); su and sv are kept as fp32.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "tmoe/format.hpp"

namespace tmoe::cpu {

struct PackedProjection {
  int bits = 3, group_size = 128, hadamard = 0;
  int64_t experts = 0, K = 0, N = 0, tiles_k = 0, tiles_n = 0, groups = 0;
  int64_t tiles_per_group = 0;        // group_size / 16 (groups always hold whole tiles)
  std::array<float, 16> grid16{};     // grid repeated to 16 entries: entry i = grid[i % 2^bits]
  std::vector<uint8_t> words;         // [E][tiles_n][tiles_k][tile_bytes(bits)] lane-word tiles
  std::vector<uint16_t> scales;       // [E][tiles_n][groups][16] fp16
  std::vector<float> su, sv;          // [E][K], [E][N]

  int64_t padded_K() const { return tiles_k * kTileDim; }
  const uint8_t* column(int64_t e, int64_t n_tile) const {
    return words.data() + ((e * tiles_n + n_tile) * tiles_k) * tile_bytes(bits);
  }
  const uint16_t* column_scales(int64_t e, int64_t n_tile) const {
    return scales.data() + ((e * tiles_n + n_tile) * groups) * kTileDim;
  }
  const float* expert_su(int64_t e) const { return su.data() + e * K; }
  const float* expert_sv(int64_t e) const { return sv.data() + e * N; }
};

// Repacks a validated tensor. Parallel over experts (OpenMP).
PackedProjection pack_projection(const TrellisTensor& t);

}  // namespace tmoe::cpu

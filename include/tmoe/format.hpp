// Owning containers for Trellis-quantized matrices (FORMAT.md) and host-side pack / unpack / decode.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "tmoe/trellis_decode.hpp"

namespace tmoe {

inline constexpr double kDefaultGridStep = 1.24371088;

// grid[i] = (i - (2^bits - 1) / 2) * 1.24371088
std::vector<float> default_grid(int bits);

// E stacked K x N matrices sharing bits, group size, Hadamard block and grid (one projection of
// an MoE layer, or a single matrix with experts = 1). 16-bit fields hold fp16 bits.
struct TrellisTensor {
  int64_t experts = 1, K = 0, N = 0;
  int bits = 3;
  int group_size = 128;
  int hadamard = 0;                // 0: no rotation; else the block size b of T (FORMAT.md)
  std::vector<float> grid;         // [2^bits]
  std::vector<uint8_t> indices;    // [E, tiles_k, tiles_n, tile_bytes]
  std::vector<uint16_t> scales;    // [E, groups, N]
  std::vector<uint16_t> su;        // [E, K]
  std::vector<uint16_t> sv;        // [E, N]

  int64_t tiles_k() const { return ceil_div(K, kTileDim); }
  int64_t tiles_n() const { return ceil_div(N, kTileDim); }
  int64_t groups() const { return ceil_div(K, group_size); }
  // Bytes of one expert: packed indices + scales + su + sv (what a kernel reads for it).
  int64_t expert_bytes() const;

  // Allocates zeroed storage for the given geometry, default grid, unit signs.
  static TrellisTensor zeros(int64_t experts, int64_t K, int64_t N, int bits, int group_size,
                             int hadamard = 0);
  // Throws tmoe::Error (bad input) naming the first inconsistency: bits, group size, Hadamard block,
  // or a storage size that does not match the geometry.
  void validate() const;
  TrellisView view() const;
};

// Packs row-major indices [K][N] (each < 2^bits) into tiles: `packed` gets tiles_k*tiles_n*tile_bytes
// bytes; positions outside K x N hold 0.
void pack_indices(std::span<const uint8_t> indices, int64_t K, int64_t N, int bits,
                  std::span<uint8_t> packed);
// Inverse of pack_indices.
void unpack_indices(std::span<const uint8_t> packed, int64_t K, int64_t N, int bits,
                    std::span<uint8_t> indices);

// Q of expert e (grid[index] * scale: no signs, no T), row-major [K][N] in doubles: what the
// kernels multiply with. Decoded a tile column word at a time.
void decode_q(const TrellisTensor& t, int64_t e, std::span<double> q);
// Element values of expert e as FORMAT.md defines them (grid * scale * su * sv), row-major [K][N].
void decode_expert(const TrellisTensor& t, int64_t e, std::span<float> out);
// The effective weight W of expert e, row-major [K][N], such that y = x . W equals the computation
// T(T(x . su) . Q) . sv; with hadamard = 0 this equals decode_expert.
void effective_weight(const TrellisTensor& t, int64_t e, std::span<double> out);

}  // namespace tmoe

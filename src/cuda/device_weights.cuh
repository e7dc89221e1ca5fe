// A projection's weights on the device, as kernels see them.
//
// Tiles keep FORMAT.md's byte layout (one 16x16 tile = tile_bytes(bits) contiguous bytes, its
// columns 16*bits bits each), so every kernel decodes them with trellis_decode.hpp. Only the ORDER
// of tiles may differ from the file (chosen at upload for the kernels' access pattern), which is
// why addressing goes through strides. One device copy of the weights serves every kernel path.
#pragma once

#include <cstdint>

#include "cuda/fragment_layout.hpp"
#include "tmoe/trellis_decode.hpp"

namespace tmoe::cuda {

struct DeviceProjection {
  const uint8_t* tiles = nullptr;  // packed tiles of all experts (FORMAT.md byte layout)
  // The same indices in the fragment layout (fragment_layout.hpp): what tensor-core kernels read.
  // Transitional: both copies are uploaded until every kernel reads the fragment layout.
  const uint32_t* units = nullptr;
  int64_t quads = 0;               // quads_of(K): units per (expert, n-tile)
  int64_t expert_stride = 0;       // bytes between experts
  int64_t k_tile_stride = 0;       // bytes between tiles (k_tile, n) and (k_tile + 1, n)
  int64_t n_tile_stride = 0;       // bytes between tiles (k, n_tile) and (k, n_tile + 1)
  const uint16_t* scales = nullptr;  // fp16 [E, groups, N]
  const uint16_t* su = nullptr;      // fp16 [E, K]
  const uint16_t* sv = nullptr;      // fp16 [E, N]
  const float* grid = nullptr;       // [2^bits]
  int64_t experts = 0, K = 0, N = 0;
  int bits = 3, group_size = 128, hadamard = 0;

  TMOE_HD const uint8_t* tile(int64_t e, int64_t k_tile, int64_t n_tile) const {
    return tiles + e * expert_stride + k_tile * k_tile_stride + n_tile * n_tile_stride;
  }
  // First word of unit (e, n_tile, quad).
  TMOE_HD const uint32_t* unit(int64_t e, int64_t n_tile, int64_t quad) const {
    return units + unit_word_offset(e, n_tile, quad, tiles_n(), quads, bits);
  }
  TMOE_HD int64_t tiles_k() const { return ceil_div(K, kTileDim); }
  TMOE_HD int64_t tiles_n() const { return ceil_div(N, kTileDim); }
  TMOE_HD int64_t groups() const { return ceil_div(K, group_size); }
};

}  // namespace tmoe::cuda

#include "cpu/cpu_weights.hpp"

#include <cstring>

namespace tmoe::cpu {
namespace {

// One canonical tile -> one lane-word tile (layout in cpu_weights.hpp).
template <int BITS>
void repack_tile(const uint8_t* canonical, uint8_t* packed) {
  uint32_t lo[kTileDim], hi[kTileDim];
  uint16_t hi16[kTileDim];
  for (int n = 0; n < kTileDim; ++n) {
    const uint64_t word = load_column_word<BITS>(canonical, n);
    lo[n] = static_cast<uint32_t>(word);
    hi[n] = static_cast<uint32_t>(word >> 32);
    hi16[n] = static_cast<uint16_t>(word >> 32);
  }
  std::memcpy(packed, lo, sizeof lo);
  if constexpr (BITS == 3) std::memcpy(packed + sizeof lo, hi16, sizeof hi16);
  if constexpr (BITS == 4) std::memcpy(packed + sizeof lo, hi, sizeof hi);
}

}  // namespace

PackedProjection pack_projection(const TrellisTensor& t) {
  PackedProjection p;
  p.bits = t.bits;
  p.group_size = t.group_size;
  p.hadamard = t.hadamard;
  p.experts = t.experts;
  p.K = t.K;
  p.N = t.N;
  p.tiles_k = t.tiles_k();
  p.tiles_n = t.tiles_n();
  p.groups = t.groups();
  p.tiles_per_group = t.group_size / kTileDim;
  const int levels = 1 << t.bits;
  for (int i = 0; i < 16; ++i) p.grid16[i] = t.grid[i % levels];

  const int64_t tb = tile_bytes(t.bits);
  p.words.resize(t.indices.size());
  p.scales.assign(t.experts * p.tiles_n * p.groups * kTileDim, 0);
  p.su.resize(t.experts * t.K);
  p.sv.resize(t.experts * t.N);
  const TrellisView v = t.view();
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < t.experts; ++e) {
    const uint8_t* src = v.expert_indices(e);
    for (int64_t nt = 0; nt < p.tiles_n; ++nt) {
      uint8_t* dst = p.words.data() + (e * p.tiles_n + nt) * p.tiles_k * tb;
      for (int64_t kt = 0; kt < p.tiles_k; ++kt) {
        const uint8_t* tile = src + tile_offset(kt, nt, p.tiles_n, t.bits);
        dispatch_bits(t.bits, [&](auto bits) { repack_tile<bits()>(tile, dst + kt * tb); });
      }
      uint16_t* scales = p.scales.data() + (e * p.tiles_n + nt) * p.groups * kTileDim;
      for (int64_t g = 0; g < p.groups; ++g)
        for (int64_t i = 0; i < kTileDim && nt * kTileDim + i < t.N; ++i)
          scales[g * kTileDim + i] = v.expert_scales(e)[g * t.N + nt * kTileDim + i];
    }
    for (int64_t k = 0; k < t.K; ++k) p.su[e * t.K + k] = half_to_float(v.expert_su(e)[k]);
    for (int64_t n = 0; n < t.N; ++n) p.sv[e * t.N + n] = half_to_float(v.expert_sv(e)[n]);
  }
  return p;
}

}  // namespace tmoe::cpu

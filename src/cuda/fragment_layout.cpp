// Host packer of the fragment layout (see fragment_layout.hpp).
#include "cuda/fragment_layout.hpp"

#include <array>

namespace tmoe::cuda {
namespace {

// Per value v of a lane: its bit offsets in the lane's words, and (n, k) inside the unit.
struct LanePlan {
  std::array<std::array<uint8_t, 4>, 32> bit{};
  std::array<uint8_t, 32> n{}, k{};
};

template <int BITS>
void pack_expert(const TrellisView& t, int64_t e, const std::array<LanePlan, 32>& plan, uint32_t* out) {
  const int64_t tiles_n = t.tiles_n(), tiles_k = t.tiles_k(), quads = quads_of(t.K);
  uint8_t index[kQuadK][kTileDim];  // [k in quad][n in tile]
  for (int64_t j = 0; j < tiles_n; ++j)
    for (int64_t q = 0; q < quads; ++q) {
      for (int i = 0; i < kQuadTiles; ++i) {
        const int64_t kt = q * kQuadTiles + i;
        const uint8_t* tile = kt < tiles_k ? t.expert_indices(e) + tile_offset(kt, j, tiles_n, BITS) : nullptr;
        for (int n = 0; n < kTileDim; ++n) {
          const uint64_t word = tile ? load_column_word<BITS>(tile, n) : 0;  // padding: index 0
          for (int k = 0; k < kTileDim; ++k) index[16 * i + k][n] = static_cast<uint8_t>(column_index<BITS>(word, k));
        }
      }
      uint32_t* unit = out + unit_word_offset(e, j, q, tiles_n, quads, BITS);
      for (int lane = 0; lane < 32; ++lane) {
        uint32_t words[BITS] = {};
        for (int v = 0; v < 32; ++v) {
          const uint32_t idx = index[plan[lane].k[v]][plan[lane].n[v]];
          for (int b = 0; b < BITS; ++b) {
            const int at = plan[lane].bit[v][b];
            words[at >> 5] |= ((idx >> b) & 1u) << (at & 31);
          }
        }
        for (int w = 0; w < BITS; ++w) unit[w * 32 + lane] = words[w];
      }
    }
}

}  // namespace

std::vector<uint32_t> pack_fragment_units(const TrellisView& t) {
  const int64_t quads = quads_of(t.K);
  std::vector<uint32_t> out(static_cast<size_t>(t.experts * t.tiles_n() * quads * unit_words(t.bits)), 0u);
  std::array<LanePlan, 32> plan;
  for (int lane = 0; lane < 32; ++lane)
    for (int v = 0; v < 32; ++v) {
      plan[lane].n[v] = static_cast<uint8_t>(fragment_n(lane, v));
      plan[lane].k[v] = static_cast<uint8_t>(fragment_k(lane, v));
      for (int b = 0; b < t.bits; ++b) plan[lane].bit[v][b] = static_cast<uint8_t>(fragment_bit(t.bits, v, b));
    }
  dispatch_bits(t.bits, [&](auto bits) {
#pragma omp parallel for schedule(dynamic)
    for (int64_t e = 0; e < t.experts; ++e) pack_expert<bits()>(t, e, plan, out.data());
  });
  return out;
}

}  // namespace tmoe::cuda

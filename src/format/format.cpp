#include "tmoe/format.hpp"

#include <algorithm>
#include <cmath>

#include "tmoe/error.hpp"
#include "tmoe/hadamard.hpp"

namespace tmoe {

std::vector<float> default_grid(int bits) {
  require(valid_bits(bits), "bits must be 2, 3 or 4, got {}", bits);
  const int levels = 1 << bits;
  std::vector<float> grid(levels);
  for (int i = 0; i < levels; ++i) {
    grid[i] = static_cast<float>((i - (levels - 1) / 2.0) * kDefaultGridStep);
  }
  return grid;
}

int64_t TrellisTensor::expert_bytes() const {
  return tiles_k() * tiles_n() * tile_bytes(bits) + (groups() * N + K + N) * 2;
}

TrellisTensor TrellisTensor::zeros(int64_t experts, int64_t K, int64_t N, int bits, int group_size,
                                   int hadamard) {
  TrellisTensor t;
  t.experts = experts;
  t.K = K;
  t.N = N;
  t.bits = bits;
  t.group_size = group_size;
  t.hadamard = hadamard;
  t.grid = default_grid(bits);
  require(experts > 0 && K > 0 && N > 0 && group_size > 0,
          "bad tensor geometry: experts={} K={} N={} group_size={}", experts, K, N, group_size);
  t.indices.assign(experts * t.tiles_k() * t.tiles_n() * tile_bytes(bits), 0);
  t.scales.assign(experts * t.groups() * N, float_to_half(1.0f));
  t.su.assign(experts * K, float_to_half(1.0f));
  t.sv.assign(experts * N, float_to_half(1.0f));
  return t;
}

void TrellisTensor::validate() const {
  require(valid_bits(bits), "bits must be 2, 3 or 4, got {}", bits);
  require(experts > 0 && K > 0 && N > 0, "bad tensor geometry: experts={} K={} N={}", experts, K, N);
  require(group_size > 0 && group_size % kTileDim == 0,
          "group_size must be a positive multiple of 16, got {}", group_size);
  if (hadamard != 0) {
    require(is_power_of_two(hadamard), "hadamard block must be a power of two, got {}", hadamard);
    require(K % hadamard == 0 && N % hadamard == 0,
            "hadamard block {} must divide K={} and N={}", hadamard, K, N);
  }
  require(grid.size() == (size_t{1} << bits), "grid has {} levels, {} bits need {}", grid.size(),
          bits, 1 << bits);
  for (float g : grid) require(std::isfinite(g), "grid holds a non-finite level");
  auto check = [](const char* what, size_t have, int64_t want) {
    require(have == static_cast<size_t>(want), "{} holds {} elements, the geometry needs {}", what,
            have, want);
  };
  check("indices", indices.size(), experts * tiles_k() * tiles_n() * tile_bytes(bits));
  check("scales", scales.size(), experts * groups() * N);
  check("su", su.size(), experts * K);
  check("sv", sv.size(), experts * N);
}

TrellisView TrellisTensor::view() const {
  TrellisView v;
  v.indices = indices.data();
  v.scales = scales.data();
  v.su = su.data();
  v.sv = sv.data();
  v.grid = grid.data();
  v.experts = experts;
  v.K = K;
  v.N = N;
  v.bits = bits;
  v.group_size = group_size;
  v.hadamard = hadamard;
  return v;
}

void pack_indices(std::span<const uint8_t> indices, int64_t K, int64_t N, int bits,
                  std::span<uint8_t> packed) {
  require(valid_bits(bits), "bits must be 2, 3 or 4, got {}", bits);
  const int64_t tiles_n = ceil_div(N, kTileDim);
  const int64_t need = ceil_div(K, kTileDim) * tiles_n * tile_bytes(bits);
  require(indices.size() == static_cast<size_t>(K * N), "pack_indices: {} indices for K*N={}",
          indices.size(), K * N);
  require(packed.size() == static_cast<size_t>(need), "pack_indices: output holds {} bytes, needs {}",
          packed.size(), need);
  std::fill(packed.begin(), packed.end(), uint8_t{0});
  const uint32_t limit = 1u << bits;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t index = indices[k * N + n];
      require(index < limit, "index {} at ({}, {}) does not fit in {} bits", index, k, n, bits);
      uint8_t* tile = packed.data() + tile_offset(k / kTileDim, n / kTileDim, tiles_n, bits);
      const int bit = position_in_tile(static_cast<int>(k % kTileDim), static_cast<int>(n % kTileDim)) * bits;
      for (int b = 0; b < bits; ++b) {  // LSB first; a field may cross a byte boundary
        if ((index >> b) & 1u) tile[(bit + b) >> 3] |= static_cast<uint8_t>(1u << ((bit + b) & 7));
      }
    }
  }
}

void unpack_indices(std::span<const uint8_t> packed, int64_t K, int64_t N, int bits,
                    std::span<uint8_t> indices) {
  require(valid_bits(bits), "bits must be 2, 3 or 4, got {}", bits);
  const int64_t need = ceil_div(K, kTileDim) * ceil_div(N, kTileDim) * tile_bytes(bits);
  require(packed.size() == static_cast<size_t>(need), "unpack_indices: input holds {} bytes, needs {}",
          packed.size(), need);
  require(indices.size() == static_cast<size_t>(K * N), "unpack_indices: output holds {} for K*N={}",
          indices.size(), K * N);
  TrellisView v;
  v.indices = packed.data();
  v.experts = 1;
  v.K = K;
  v.N = N;
  v.bits = bits;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) indices[k * N + n] = static_cast<uint8_t>(v.index(0, k, n));
}

void decode_expert(const TrellisTensor& t, int64_t e, std::span<float> out) {
  require(e >= 0 && e < t.experts, "expert {} out of range [0, {})", e, t.experts);
  require(out.size() == static_cast<size_t>(t.K * t.N), "decode_expert: output holds {}, needs {}",
          out.size(), t.K * t.N);
  const TrellisView v = t.view();
  for (int64_t k = 0; k < t.K; ++k)
    for (int64_t n = 0; n < t.N; ++n) out[k * t.N + n] = v.element(e, k, n);
}

void decode_q(const TrellisTensor& t, int64_t e, std::span<double> q) {
  require(e >= 0 && e < t.experts, "expert {} out of range [0, {})", e, t.experts);
  require(q.size() == static_cast<size_t>(t.K * t.N), "decode_q: output holds {}, needs {}", q.size(),
          t.K * t.N);
  const TrellisView v = t.view();
  dispatch_bits(t.bits, [&](auto bits_constant) {
    constexpr int kBits = decltype(bits_constant)::value;
    for (int64_t kt = 0; kt < t.tiles_k(); ++kt) {
      for (int64_t nt = 0; nt < t.tiles_n(); ++nt) {
        const uint8_t* tile = v.expert_indices(e) + tile_offset(kt, nt, t.tiles_n(), kBits);
        for (int nn = 0; nn < kTileDim && nt * kTileDim + nn < t.N; ++nn) {
          const int64_t n = nt * kTileDim + nn;
          const uint64_t word = load_column_word<kBits>(tile, nn);
          for (int kk = 0; kk < kTileDim && kt * kTileDim + kk < t.K; ++kk) {
            const int64_t k = kt * kTileDim + kk;
            const double scale = half_to_float(v.expert_scales(e)[(k / t.group_size) * t.N + n]);
            q[k * t.N + n] = static_cast<double>(t.grid[column_index<kBits>(word, kk)]) * scale;
          }
        }
      }
    }
  });
}

void effective_weight(const TrellisTensor& t, int64_t e, std::span<double> out) {
  require(e >= 0 && e < t.experts, "expert {} out of range [0, {})", e, t.experts);
  require(out.size() == static_cast<size_t>(t.K * t.N), "effective_weight: output holds {}, needs {}",
          out.size(), t.K * t.N);
  const TrellisView v = t.view();
  // W = diag(su) H_K Q H_N diag(sv): transform Q's columns (along K), then its rows (along N).
  decode_q(t, e, out);
  if (t.hadamard) {
    std::vector<double> column(t.K);
    for (int64_t n = 0; n < t.N; ++n) {
      for (int64_t k = 0; k < t.K; ++k) column[k] = out[k * t.N + n];
      block_hadamard(column.data(), t.K, t.hadamard);
      for (int64_t k = 0; k < t.K; ++k) out[k * t.N + n] = column[k];
    }
    for (int64_t k = 0; k < t.K; ++k) block_hadamard(out.data() + k * t.N, t.N, t.hadamard);
  }
  for (int64_t k = 0; k < t.K; ++k) {
    const double su = half_to_float(v.expert_su(e)[k]);
    const uint16_t* sv = v.expert_sv(e);
    for (int64_t n = 0; n < t.N; ++n) out[k * t.N + n] *= su * half_to_float(sv[n]);
  }
}

}  // namespace tmoe

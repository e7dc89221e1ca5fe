// The fragment layout (src/cuda/fragment_layout.hpp) against FORMAT.md's indices: the host packer
// and reference reader (run without a GPU too), and the device decoder (decode_unit_pairs) on the
// GPU. Exact: indices are integers, a single wrong bit fails.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "cuda/fragment_decode.cuh"
#include "cuda/fragment_layout.hpp"
#include "cuda_test_util.hpp"
#include "tmoe/format.hpp"

namespace tmoe::cuda {
namespace {

using tmoe::testing::DeviceArray;
using tmoe::testing::fresh_seed;

TrellisTensor random_tensor(int64_t E, int64_t K, int64_t N, int bits, uint64_t seed) {
  TrellisTensor t = TrellisTensor::zeros(E, K, N, bits, 32);
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> idx(static_cast<size_t>(K * N));
  const int64_t per_expert = t.tiles_k() * t.tiles_n() * tile_bytes(bits);
  for (int64_t e = 0; e < E; ++e) {
    for (auto& i : idx) i = static_cast<uint8_t>(rng() & ((1u << bits) - 1u));
    pack_indices(idx, K, N, bits, std::span<uint8_t>(t.indices).subspan(e * per_expert, per_expert));
  }
  return t;
}

// Every (k, n) of every unit is held by exactly one (lane, value), with FORMAT.md's index; padding
// rows past K hold 0.
TEST(FragmentLayout, HostPackerMatchesTheFormat) {
  for (int bits : {2, 3, 4})
    for (auto [K, N] : {std::pair<int64_t, int64_t>{64, 16}, {80, 48}, {208, 32}}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(::testing::Message() << "bits " << bits << " K " << K << " N " << N << " seed " << seed);
      const TrellisTensor t = random_tensor(3, K, N, bits, seed);
      const TrellisView view = t.view();
      const std::vector<uint32_t> units = pack_fragment_units(view);
      const int64_t quads = quads_of(K), tiles_n = t.tiles_n();
      ASSERT_EQ(units.size(), static_cast<size_t>(3 * tiles_n * quads * unit_words(bits)));
      int mismatches = 0;
      for (int64_t e = 0; e < 3; ++e)
        for (int64_t j = 0; j < tiles_n; ++j)
          for (int64_t q = 0; q < quads; ++q) {
            const uint32_t* unit = units.data() + unit_word_offset(e, j, q, tiles_n, quads, bits);
            std::vector<int> seen(kQuadK * kTileDim, 0);
            for (int lane = 0; lane < 32; ++lane)
              for (int v = 0; v < 32; ++v) {
                const int kk = fragment_k(lane, v), nn = fragment_n(lane, v);
                ++seen[kk * kTileDim + nn];
                const int64_t k = q * kQuadK + kk, n = j * kTileDim + nn;
                const uint32_t want = k < K ? view.index(e, k, n) : 0u;
                mismatches += fragment_index(unit, bits, lane, v) != want;
              }
            for (int s : seen) ASSERT_EQ(s, 1);
          }
      EXPECT_EQ(mismatches, 0);
    }
}

// Each thread decodes its lane's words of one unit and writes the 32 indices at their (k, n).
template <int BITS>
__global__ void decode_units_kernel(const uint32_t* units, int64_t units_count, int64_t tiles_n, int64_t quads,
                                    int64_t N, float* out /* [E][quads * 64][N] */) {
  const int64_t unit = blockIdx.x;
  if (unit >= units_count) return;
  const int lane = threadIdx.x;
  uint32_t words[BITS];
#pragma unroll
  for (int w = 0; w < BITS; ++w) words[w] = units[unit * unit_words(BITS) + w * 32 + lane];
  uint32_t pairs[16];
  decode_unit_pairs<BITS>(words, pairs);
  const int64_t q = unit % quads, j = (unit / quads) % tiles_n, e = unit / quads / tiles_n;
  for (int v = 0; v < 32; ++v) {
    const uint32_t half_bits = v & 1 ? pairs[v >> 1] >> 16 : pairs[v >> 1] & 0xffffu;
    const float value = __uint_as_float(half_bits << 16) - kDecodeBias<BITS>;  // bf16 -> f32, less the bias
    const int64_t k = q * kQuadK + fragment_k(lane, v), n = j * kTileDim + fragment_n(lane, v);
    out[(e * quads * kQuadK + k) * N + n] = value;
  }
}

TEST(FragmentLayout, DeviceDecoderMatchesTheFormat) {
  TMOE_REQUIRE_GPU();
  for (int bits : {2, 3, 4}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(::testing::Message() << "bits " << bits << " seed " << seed);
    const int64_t E = 2, K = 208, N = 48;
    const TrellisTensor t = random_tensor(E, K, N, bits, seed);
    const TrellisView view = t.view();
    const int64_t quads = quads_of(K), tiles_n = t.tiles_n(), count = E * tiles_n * quads;
    DeviceArray<uint32_t> units(pack_fragment_units(view));
    DeviceArray<float> out(static_cast<size_t>(E * quads * kQuadK * N));
    out.poison();
    dispatch_bits(bits, [&](auto b) {
      decode_units_kernel<b()><<<static_cast<unsigned>(count), 32>>>(units.get(), count, tiles_n, quads, N, out.get());
    });
    TMOE_CUDA_CHECK(cudaGetLastError());
    const std::vector<float> got = out.download();
    int mismatches = 0;
    for (int64_t e = 0; e < E; ++e)
      for (int64_t k = 0; k < quads * kQuadK; ++k)
        for (int64_t n = 0; n < N; ++n) {
          const float want = k < K ? static_cast<float>(view.index(e, k, n)) : 0.0f;
          mismatches += got[(e * quads * kQuadK + k) * N + n] != want;
        }
    EXPECT_EQ(mismatches, 0);
  }
}

}  // namespace
}  // namespace tmoe::cuda

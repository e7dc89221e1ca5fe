// The Trellis format (FORMAT.md): packing, the one decoder, geometry checks and the effective weight.
// Expected bytes and values are written by hand from FORMAT.md, not produced by the code under test.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tmoe/error.hpp"
#include "tmoe/format.hpp"
#include "tmoe/hadamard.hpp"
#include "test_support.hpp"

using tmoe::TrellisTensor;

using tmoe::testing::expect_bad_input;
using tmoe::testing::fresh_seed;

namespace {


// A single-expert tensor whose packed indices come from the given row-major [K][N] indices.
TrellisTensor tensor_with_indices(int64_t K, int64_t N, int bits, int group_size,
                                  const std::vector<uint8_t>& idx, int hadamard = 0) {
  TrellisTensor t = TrellisTensor::zeros(1, K, N, bits, group_size, hadamard);
  tmoe::pack_indices(idx, K, N, bits, t.indices);
  return t;
}


}  // namespace

TEST(Format, PackUnpackRoundTripOddShapes) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int bits : {2, 3, 4}) {
    for (int64_t K : {1, 15, 16, 17, 33, 100}) {
      for (int64_t N : {1, 15, 17, 32, 33, 100}) {
        SCOPED_TRACE("bits " + std::to_string(bits) + " K " + std::to_string(K) + " N " +
                     std::to_string(N));
        std::uniform_int_distribution<int> level(0, (1 << bits) - 1);
        std::vector<uint8_t> idx(K * N);
        for (auto& i : idx) i = static_cast<uint8_t>(level(rng));
        const int64_t tiles_k = (K + 15) / 16, tiles_n = (N + 15) / 16;
        std::vector<uint8_t> packed(tiles_k * tiles_n * 32 * bits, 0x7f);  // poisoned
        tmoe::pack_indices(idx, K, N, bits, packed);
        std::vector<uint8_t> back(K * N, 0xff);  // poisoned: 0xff is no valid index
        tmoe::unpack_indices(packed, K, N, bits, back);
        ASSERT_EQ(back, idx);
        // Positions outside K x N hold index 0 (FORMAT.md), checked through the raw bit string.
        for (int64_t tk = 0; tk < tiles_k; ++tk)
          for (int64_t tn = 0; tn < tiles_n; ++tn)
            for (int p = 0; p < 256; ++p) {
              const int64_t k = tk * 16 + p % 16, n = tn * 16 + p / 16;
              if (k < K && n < N) continue;
              const uint8_t* tile = packed.data() + (tk * tiles_n + tn) * 32 * bits;
              for (int b = p * bits; b < (p + 1) * bits; ++b)
                ASSERT_EQ((tile[b / 8] >> (b % 8)) & 1, 0) << "edge position " << p;
            }
      }
    }
  }
}

// A 3-bit 16x16 tile (96 bytes) with four indices set; the bytes are worked out by hand:
// element (k, n) sits at position p = 16 n + k, bits [3p, 3p + 3), bit j in byte j/8 at j%8.
TEST(Format, ThreeBitTileHandComputedBytes) {
  std::vector<uint8_t> idx(16 * 16, 0);
  idx[0 * 16 + 0] = 5;    // p = 0:   bits 0..2 -> byte 0 = 0b101 = 0x05
  idx[2 * 16 + 0] = 7;    // p = 2:   bits 6..8 cross a byte: byte 0 bits 6,7 (0xc0), byte 1 bit 0
  idx[5 * 16 + 1] = 3;    // p = 21:  bits 63..65: 3 = 0b011 -> byte 7 bit 7 (0x80), byte 8 bit 0
  idx[15 * 16 + 15] = 6;  // p = 255: bits 765..767 = byte 95 bits 5..7; 6 = 0b110 -> 0xc0
  std::vector<uint8_t> want(96, 0);
  want[0] = 0x05 | 0xc0;
  want[1] = 0x01;
  want[7] = 0x80;
  want[8] = 0x01;
  want[95] = 0xc0;
  std::vector<uint8_t> packed(96, 0x7f);
  tmoe::pack_indices(idx, 16, 16, 3, packed);
  EXPECT_EQ(packed, want);

  // Decode from the hand-written bytes through the one decoder.
  EXPECT_EQ(tmoe::tile_index<3>(want.data(), 0), 5u);
  EXPECT_EQ(tmoe::tile_index<3>(want.data(), 2), 7u);
  EXPECT_EQ(tmoe::tile_index<3>(want.data(), 21), 3u);
  EXPECT_EQ(tmoe::tile_index<3>(want.data(), 255), 6u);
  EXPECT_EQ(tmoe::tile_index<3>(want.data(), 1), 0u);
  // Column words: column 0 is bytes 0..5 (48 bits), column 1 bytes 6..11.
  const uint64_t col0 = tmoe::load_column_word<3>(want.data(), 0);
  EXPECT_EQ(col0, 0x01c5ull);  // byte 0 = 0xc5, byte 1 = 0x01
  EXPECT_EQ(tmoe::column_index<3>(col0, 0), 5u);
  EXPECT_EQ(tmoe::column_index<3>(col0, 2), 7u);
  EXPECT_EQ(tmoe::column_index<3>(tmoe::load_column_word<3>(want.data(), 1), 5), 3u);
  EXPECT_EQ(tmoe::column_index<3>(tmoe::load_column_word<3>(want.data(), 15), 15), 6u);

  // Element values with the default 3-bit grid (i - 3.5) * 1.24371088, scale 1, unit signs.
  TrellisTensor t = TrellisTensor::zeros(1, 16, 16, 3, 128);
  t.indices = want;
  std::vector<float> w(256, NAN);
  tmoe::decode_expert(t, 0, w);
  EXPECT_FLOAT_EQ(w[0 * 16 + 0], 1.86556632f);    // i = 5:  1.5 * step
  EXPECT_FLOAT_EQ(w[2 * 16 + 0], 4.35298808f);    // i = 7:  3.5 * step
  EXPECT_FLOAT_EQ(w[5 * 16 + 1], -0.62185544f);   // i = 3: -0.5 * step
  EXPECT_FLOAT_EQ(w[15 * 16 + 15], 3.10927720f);  // i = 6:  2.5 * step
  EXPECT_FLOAT_EQ(w[1 * 16 + 0], -4.35298808f);   // i = 0: -3.5 * step
}

TEST(Format, TwoAndFourBitTileHandComputedBytes) {
  {  // 2 bits: 64-byte tile, position p at bits [2p, 2p + 2)
    std::vector<uint8_t> idx(256, 0);
    idx[3 * 16 + 0] = 2;    // p = 3: bits 6,7 of byte 0; 2 = 0b10 -> 0x80
    idx[0 * 16 + 1] = 1;    // p = 16: bit 32 -> byte 4 = 0x01
    idx[15 * 16 + 15] = 3;  // p = 255: bits 510, 511 -> byte 63 = 0xc0
    std::vector<uint8_t> want(64, 0);
    want[0] = 0x80;
    want[4] = 0x01;
    want[63] = 0xc0;
    std::vector<uint8_t> packed(64, 0x7f);
    tmoe::pack_indices(idx, 16, 16, 2, packed);
    EXPECT_EQ(packed, want);
    EXPECT_EQ(tmoe::tile_index<2>(want.data(), 3), 2u);
    EXPECT_EQ(tmoe::tile_index<2>(want.data(), 16), 1u);
    EXPECT_EQ(tmoe::tile_index<2>(want.data(), 255), 3u);
  }
  {  // 4 bits: 128-byte tile, low nibble first
    std::vector<uint8_t> idx(256, 0);
    idx[1 * 16 + 0] = 0xa;   // p = 1: high nibble of byte 0 -> 0xa0
    idx[14 * 16 + 15] = 3;   // p = 254: low nibble of byte 127
    idx[15 * 16 + 15] = 0xf; // p = 255: high nibble of byte 127 -> 0xf3
    std::vector<uint8_t> want(128, 0);
    want[0] = 0xa0;
    want[127] = 0xf3;
    std::vector<uint8_t> packed(128, 0x7f);
    tmoe::pack_indices(idx, 16, 16, 4, packed);
    EXPECT_EQ(packed, want);
    TrellisTensor t = TrellisTensor::zeros(1, 16, 16, 4, 16);
    t.indices = want;
    std::vector<float> w(256, NAN);
    tmoe::decode_expert(t, 0, w);
    // Default 4-bit grid (i - 7.5) * 1.24371088.
    EXPECT_FLOAT_EQ(w[1 * 16 + 0], 3.10927720f);    // i = 10: 2.5 * step
    EXPECT_FLOAT_EQ(w[14 * 16 + 15], -5.59669896f); // i = 3: -4.5 * step
    EXPECT_FLOAT_EQ(w[15 * 16 + 15], 9.32783160f);  // i = 15: 7.5 * step
    EXPECT_FLOAT_EQ(w[0], -9.32783160f);            // i = 0
  }
}

// K = 17, N = 18, 3 bits: 2 x 2 tiles of 96 bytes; tile (tk, tn) at byte (2 tk + tn) * 96.
TEST(Format, PartialEdgeTileHandComputedBytes) {
  std::vector<uint8_t> idx(17 * 18, 0);
  idx[16 * 18 + 17] = 5;  // tile (1,1) at 288; p = 16*1 + 0 = 16 -> bits 48..50 = byte 6 -> 294
  idx[16 * 18 + 0] = 1;   // tile (1,0) at 192; p = 0 -> byte 192
  idx[0 * 18 + 16] = 2;   // tile (0,1) at 96;  p = 0 -> byte 96
  idx[15 * 18 + 1] = 4;   // tile (0,0); p = 16 + 15 = 31 -> bits 93..95 = byte 11 bits 5..7: 0x80
  std::vector<uint8_t> want(4 * 96, 0);
  want[294] = 0x05;
  want[192] = 0x01;
  want[96] = 0x02;
  want[11] = 0x80;
  std::vector<uint8_t> packed(4 * 96, 0x7f);
  tmoe::pack_indices(idx, 17, 18, 3, packed);
  EXPECT_EQ(packed, want);
  TrellisTensor t = TrellisTensor::zeros(1, 17, 18, 3, 16);
  t.indices = want;
  const tmoe::TrellisView v = t.view();
  EXPECT_EQ(v.index(0, 16, 17), 5u);
  EXPECT_EQ(v.index(0, 16, 0), 1u);
  EXPECT_EQ(v.index(0, 0, 16), 2u);
  EXPECT_EQ(v.index(0, 15, 1), 4u);
  EXPECT_EQ(v.index(0, 3, 3), 0u);
  std::vector<uint8_t> back(17 * 18, 0xff);
  tmoe::unpack_indices(want, 17, 18, 3, back);
  EXPECT_EQ(back, idx);
}

TEST(Format, DefaultGridsByHand) {
  // (i - (2^bits - 1)/2) * 1.24371088
  const std::vector<double> two = {-1.86556632, -0.62185544, 0.62185544, 1.86556632};
  const std::vector<double> three = {-4.35298808, -3.10927720, -1.86556632, -0.62185544,
                                     0.62185544,  1.86556632,  3.10927720,  4.35298808};
  const std::vector<double> four = {-9.32783160, -8.08412072, -6.84040984, -5.59669896,
                                    -4.35298808, -3.10927720, -1.86556632, -0.62185544,
                                    0.62185544,  1.86556632,  3.10927720,  4.35298808,
                                    5.59669896,  6.84040984,  8.08412072,  9.32783160};
  for (auto [bits, want] : {std::pair{2, two}, std::pair{3, three}, std::pair{4, four}}) {
    const auto grid = tmoe::default_grid(bits);
    ASSERT_EQ(grid.size(), want.size());
    for (size_t i = 0; i < grid.size(); ++i) EXPECT_FLOAT_EQ(grid[i], static_cast<float>(want[i]));
  }
  expect_bad_input([] { tmoe::default_grid(5); }, "bits");
}

TEST(Format, CustomGridGroupScalesAndSigns) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t K = 100, N = 37;
  for (int group_size : {16, 32, 128, 256}) {
    SCOPED_TRACE("group_size " + std::to_string(group_size));
    // Group count by hand: ceil(100 / gs) = 7, 4, 1, 1.
    const int64_t groups = group_size == 16 ? 7 : group_size == 32 ? 4 : 1;
    std::uniform_int_distribution<int> level(0, 7);
    std::vector<uint8_t> idx(K * N);
    for (auto& i : idx) i = static_cast<uint8_t>(level(rng));
    TrellisTensor t = tensor_with_indices(K, N, 3, group_size, idx);
    ASSERT_EQ(t.groups(), groups);
    ASSERT_EQ(t.scales.size(), static_cast<size_t>(groups * N));
    t.grid = {-3.0f, -1.5f, -0.25f, 0.0f, 0.5f, 1.0f, 2.75f, 8.0f};  // custom, non-uniform
    // Scales (g + 1) + n / 64 and signs: exactly representable in fp16.
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t n = 0; n < N; ++n)
        t.scales[g * N + n] = tmoe::float_to_half(static_cast<float>(g + 1) + n / 64.0f);
    for (int64_t k = 0; k < K; ++k) t.su[k] = tmoe::float_to_half(k % 3 == 0 ? -1.0f : 1.0f);
    for (int64_t n = 0; n < N; ++n) t.sv[n] = tmoe::float_to_half(n % 5 == 1 ? -1.0f : 0.5f);
    t.validate();
    std::vector<float> w(K * N, NAN);
    tmoe::decode_expert(t, 0, w);
    std::vector<double> eff(K * N, NAN);
    tmoe::effective_weight(t, 0, eff);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) {
        const double scale = (k / group_size + 1) + n / 64.0;
        const double su = k % 3 == 0 ? -1.0 : 1.0, sv = n % 5 == 1 ? -1.0 : 0.5;
        const double want = t.grid[idx[k * N + n]] * scale * su * sv;  // exact in float
        ASSERT_EQ(w[k * N + n], static_cast<float>(want)) << "k " << k << " n " << n;
        ASSERT_EQ(eff[k * N + n], want) << "k " << k << " n " << n;  // no rotation: same values
      }
  }
}

TEST(Format, ZerosGeometryAndBytes) {
  const TrellisTensor t = TrellisTensor::zeros(3, 17, 33, 3, 16);
  EXPECT_EQ(t.tiles_k(), 2);
  EXPECT_EQ(t.tiles_n(), 3);
  EXPECT_EQ(t.groups(), 2);
  EXPECT_EQ(t.indices.size(), 3u * 2 * 3 * 96);
  // One expert: 6 tiles * 96 bytes + (2 groups * 33 scales + 17 su + 33 sv) * 2 bytes = 576 + 232.
  EXPECT_EQ(t.expert_bytes(), 808);
  t.validate();
  const tmoe::TrellisView v = t.view();
  EXPECT_EQ(v.expert_indices(2) - v.expert_indices(0), 2 * 576);
  EXPECT_EQ(v.expert_scales(1) - v.expert_scales(0), 66);
}

TEST(Format, ValidateRejectsBadGeometry) {
  auto good = [] { return TrellisTensor::zeros(2, 64, 32, 3, 32, 32); };
  good().validate();
  expect_bad_input([&] { auto t = good(); t.bits = 5; t.validate(); }, "bits");
  expect_bad_input([&] { auto t = good(); t.group_size = 0; t.validate(); }, "group_size");
  expect_bad_input([&] { auto t = good(); t.group_size = 24; t.validate(); }, "group_size");
  expect_bad_input([&] { auto t = good(); t.hadamard = 24; t.validate(); }, "power of two");
  expect_bad_input([&] { auto t = good(); t.hadamard = 64; t.validate(); }, "must divide");
  expect_bad_input([&] { auto t = good(); t.K = 0; t.validate(); }, "geometry");
  expect_bad_input([&] { auto t = good(); t.grid.pop_back(); t.validate(); }, "levels");
  expect_bad_input([&] { auto t = good(); t.grid[3] = NAN; t.validate(); }, "non-finite");
  expect_bad_input([&] { auto t = good(); t.indices.pop_back(); t.validate(); }, "indices");
  expect_bad_input([&] { auto t = good(); t.scales.push_back(0); t.validate(); }, "scales");
  expect_bad_input([&] { auto t = good(); t.su.pop_back(); t.validate(); }, "su");
  expect_bad_input([&] { auto t = good(); t.sv.pop_back(); t.validate(); }, "sv");
  expect_bad_input([&] { auto t = good(); t.experts = 3; t.validate(); }, "indices");
  expect_bad_input([] { TrellisTensor::zeros(1, 16, 0, 3, 16); }, "geometry");
  // pack / unpack check their buffers and index range.
  std::vector<uint8_t> idx(16 * 16, 0), packed(96);
  idx[7] = 8;
  expect_bad_input([&] { tmoe::pack_indices(idx, 16, 16, 3, packed); }, "does not fit");
  idx[7] = 0;
  std::vector<uint8_t> short_packed(95);
  expect_bad_input([&] { tmoe::pack_indices(idx, 16, 16, 3, short_packed); }, "bytes");
  expect_bad_input([&] { tmoe::unpack_indices(short_packed, 16, 16, 3, idx); }, "bytes");
  const auto t = good();
  std::vector<float> w(64 * 32);
  expect_bad_input([&] { tmoe::decode_expert(t, 2, w); }, "out of range");
  std::vector<float> small(10);
  expect_bad_input([&] { tmoe::decode_expert(t, 0, small); }, "output");
}

namespace {

// Dense normalized Walsh-Hadamard matrix of order b by the Sylvester recursion
// H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]], then divided by sqrt(b).
std::vector<double> sylvester(int b) {
  std::vector<double> h = {1.0};
  for (int m = 1; m < b; m *= 2) {
    std::vector<double> next(4 * m * m);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) {
        const double v = h[i * m + j];
        next[i * 2 * m + j] = v;
        next[i * 2 * m + j + m] = v;
        next[(i + m) * 2 * m + j] = v;
        next[(i + m) * 2 * m + j + m] = -v;
      }
    h = std::move(next);
  }
  for (double& v : h) v /= std::sqrt(static_cast<double>(b));
  return h;
}

// Block-diagonal [n x n] with blocks H_b.
std::vector<double> block_diagonal(int64_t n, int b) {
  const auto h = sylvester(b);
  std::vector<double> m(n * n, 0.0);
  for (int64_t base = 0; base < n; base += b)
    for (int i = 0; i < b; ++i)
      for (int j = 0; j < b; ++j) m[(base + i) * n + base + j] = h[i * b + j];
  return m;
}

std::vector<double> matmul(const std::vector<double>& a, const std::vector<double>& b, int64_t m,
                           int64_t inner, int64_t n) {
  std::vector<double> c(m * n, 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t l = 0; l < inner; ++l)
      for (int64_t j = 0; j < n; ++j) c[i * n + j] += a[i * inner + l] * b[l * n + j];
  return c;
}

}  // namespace

TEST(Format, SylvesterMatchesBlockHadamard) {
  // H_4 by hand: rows ++++, +-+-, ++--, +--+ over 2.
  const auto h4 = sylvester(4);
  const std::vector<double> want = {1, 1, 1, 1, 1, -1, 1, -1, 1, 1, -1, -1, 1, -1, -1, 1};
  for (int i = 0; i < 16; ++i) EXPECT_EQ(h4[i], want[i] / 2);
  for (int b : {16, 32}) {
    const auto h = sylvester(b);
    for (int i = 0; i < b; ++i) {
      std::vector<double> e(b, 0.0);
      e[i] = 1.0;
      tmoe::block_hadamard(e.data(), b, b);  // T e_i = column i of H (H is symmetric)
      for (int j = 0; j < b; ++j) ASSERT_NEAR(e[j], h[j * b + i], 1e-15);
    }
  }
}

TEST(Format, EffectiveWeightMatchesDenseRotation) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (auto [K, N, b] : {std::tuple{64, 32, 16}, std::tuple{32, 96, 32}, std::tuple{64, 64, 32}}) {
    SCOPED_TRACE("K " + std::to_string(K) + " N " + std::to_string(N) + " b " + std::to_string(b));
    std::uniform_int_distribution<int> level(0, 7);
    std::vector<uint8_t> idx(K * N);
    for (auto& i : idx) i = static_cast<uint8_t>(level(rng));
    TrellisTensor t = tensor_with_indices(K, N, 3, 16, idx, b);
    std::uniform_real_distribution<float> uniform(0.25f, 2.0f);
    std::bernoulli_distribution coin(0.5);
    for (auto& s : t.scales) s = tmoe::float_to_half(uniform(rng));
    for (auto& s : t.su) s = tmoe::float_to_half(coin(rng) ? -1.0f : 1.0f);
    for (auto& s : t.sv) s = tmoe::float_to_half(coin(rng) ? -1.0f : 1.0f);
    t.validate();

    // Dense construction: W = diag(su) H_K Q H_N diag(sv), Q[k][n] = grid[idx] * scale.
    std::vector<double> q(K * N);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n)
        q[k * N + n] = static_cast<double>(t.grid[idx[k * N + n]]) *
                       tmoe::half_to_float(t.scales[(k / 16) * N + n]);
    auto w = matmul(matmul(block_diagonal(K, b), q, K, K, N), block_diagonal(N, b), K, N, N);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n)
        w[k * N + n] *= tmoe::half_to_float(t.su[k]) * tmoe::half_to_float(t.sv[n]);

    std::vector<double> eff(K * N, NAN);
    tmoe::effective_weight(t, 0, eff);
    // Both are sums of <= K*N products of exact values; fp64 rounding stays near 1e-15 relative to
    // the largest entries (~|grid| * 2 ~ 10), so 1e-12 absolute is generous yet catches any
    // misplaced sign or transform.
    for (int i = 0; i < K * N; ++i) ASSERT_NEAR(eff[i], w[i], 1e-12) << "element " << i;

    // x . W == T(T(x . su) . Q) . sv for random x, with T = block_hadamard.
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<double> x(K);
    for (auto& v : x) v = normal(rng);
    std::vector<double> xs(K);
    for (int k = 0; k < K; ++k) xs[k] = x[k] * tmoe::half_to_float(t.su[k]);
    tmoe::block_hadamard(xs.data(), K, b);
    std::vector<double> y(N, 0.0);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) y[n] += xs[k] * q[k * N + n];
    tmoe::block_hadamard(y.data(), N, b);
    for (int n = 0; n < N; ++n) {
      y[n] *= tmoe::half_to_float(t.sv[n]);
      double direct = 0;
      for (int k = 0; k < K; ++k) direct += x[k] * eff[k * N + n];
      ASSERT_NEAR(direct, y[n], 1e-10) << "output " << n;  // O(K) terms of size ~10, fp64
    }
  }
}

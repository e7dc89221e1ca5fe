// The fp64 reference (src/reference/) against cases computed by hand / by explicit dense math here.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tmoe/error.hpp"
#include "tmoe/format.hpp"
#include "tmoe/moe.hpp"
#include "test_support.hpp"

using tmoe::MoeWeights;
using tmoe::TrellisTensor;

using tmoe::testing::expect_bad_input;
using tmoe::testing::fresh_seed;

namespace {


// A tensor of E experts whose index, scale and signs come from the given functions.
struct Spec {
  std::vector<float> grid;
  std::function<int(int64_t e, int64_t k, int64_t n)> index;
  std::function<float(int64_t e, int64_t g, int64_t n)> scale;
  std::function<float(int64_t e, int64_t k)> su;
  std::function<float(int64_t e, int64_t n)> sv;
};

TrellisTensor make_tensor(int64_t E, int64_t K, int64_t N, int group_size, const Spec& s) {
  TrellisTensor t = TrellisTensor::zeros(E, K, N, 3, group_size);
  t.grid = s.grid;
  const size_t bytes = t.indices.size() / E;
  for (int64_t e = 0; e < E; ++e) {
    std::vector<uint8_t> idx(K * N);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) idx[k * N + n] = static_cast<uint8_t>(s.index(e, k, n));
    tmoe::pack_indices(idx, K, N, 3, std::span<uint8_t>(t.indices.data() + e * bytes, bytes));
    for (int64_t g = 0; g < t.groups(); ++g)
      for (int64_t n = 0; n < N; ++n)
        t.scales[(e * t.groups() + g) * N + n] = tmoe::float_to_half(s.scale(e, g, n));
    for (int64_t k = 0; k < K; ++k) t.su[e * K + k] = tmoe::float_to_half(s.su(e, k));
    for (int64_t n = 0; n < N; ++n) t.sv[e * N + n] = tmoe::float_to_half(s.sv(e, n));
  }
  return t;
}

// Dense W_e[k][n] = grid[index] * scale * su * sv straight from the spec (no decoder involved).
std::vector<double> dense(int64_t e, int64_t K, int64_t N, int group_size, const Spec& s) {
  std::vector<double> w(K * N);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      w[k * N + n] = double(s.grid[s.index(e, k, n)]) * s.scale(e, k / group_size, n) * s.su(e, k) *
                     s.sv(e, n);
  return w;
}

// out[t] = sum_j p * down(silu(x.gate) * (x.up)) with dense per-expert matrices [E][K*N].
std::vector<double> dense_forward(const std::vector<std::vector<double>>& gate,
                                  const std::vector<std::vector<double>>& up,
                                  const std::vector<std::vector<double>>& down, int64_t H, int64_t I,
                                  int64_t T, int top_k, const std::vector<float>& x,
                                  const std::vector<int32_t>& ids, const std::vector<float>& probs) {
  std::vector<double> out(T * H, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < top_k; ++j) {
      const int32_t e = ids[t * top_k + j];
      if (e < 0) continue;
      std::vector<double> h(I);
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t c = 0; c < H; ++c) {
          g += x[t * H + c] * gate[e][c * I + i];
          u += x[t * H + c] * up[e][c * I + i];
        }
        h[i] = g / (1.0 + std::exp(-g)) * u;
      }
      for (int64_t c = 0; c < H; ++c) {
        double y = 0;
        for (int64_t i = 0; i < I; ++i) y += h[i] * down[e][i * H + c];
        out[t * H + c] += probs[t * top_k + j] * y;
      }
    }
  return out;
}


// Custom grid: index 3 is 0, index 5 is 1, 6 is 2, 7 is 4.
const std::vector<float> kSimpleGrid = {-2.0f, -1.0f, -0.5f, 0.0f, 0.5f, 1.0f, 2.0f, 4.0f};

}  // namespace

// E = 2, H = I = 16, k = 2, T = 2. Expert 0 is diagonal, so its outputs follow by hand:
//   gate_0 = diag(su) (index 5 = 1.0 on the diagonal, scale 1, su[1] = -1)
//   up_0   = diag(sv) (index 6 = 2.0, scale 0.5, sv[2] = -1)
//   down_0 = identity (index 7 = 4.0, scale 0.25)
// Token 0: x = (1, 1, 2, 0, ...), ids (0, -1), p = 0.5:
//   gate = (1, -1, 2), up = (1, 1, -2), h = silu(gate) * up
//   out = 0.5 * (silu(1), -silu(-1)... ) = 0.5 * (0.7310585786300049, -0.2689414213699951,
//         -2 * 1.7615941559557646)  with silu(v) = v / (1 + e^-v).
TEST(Reference, HandComputedDiagonalExpert) {
  const int64_t H = 16, I = 16;
  auto diagonal = [](int on) { return [on](int64_t, int64_t k, int64_t n) { return k == n ? on : 3; }; };
  auto ones = [](int64_t, int64_t) { return 1.0f; };
  MoeWeights w;
  w.gate = make_tensor(2, H, I, 16, {kSimpleGrid, diagonal(5), [](auto...) { return 1.0f; },
                                     [](int64_t, int64_t k) { return k == 1 ? -1.0f : 1.0f; }, ones});
  w.up = make_tensor(2, H, I, 16, {kSimpleGrid, diagonal(6), [](auto...) { return 0.5f; }, ones,
                                   [](int64_t, int64_t n) { return n == 2 ? -1.0f : 1.0f; }});
  w.down = make_tensor(2, I, H, 16, {kSimpleGrid, diagonal(7), [](auto...) { return 0.25f; }, ones, ones});
  std::vector<float> x(2 * H, 0.0f);
  x[0] = 1, x[1] = 1, x[2] = 2;
  x[H + 3] = 1;  // token 1 goes to expert 1 only: gate = up = down = diag as well (same functions)
  const std::vector<int32_t> ids = {0, -1, 1, -1};
  const std::vector<float> probs = {0.5f, 0.9f, 0.25f, 0.7f};
  const auto out = tmoe::reference_forward(w, 2, x, ids, probs);
  ASSERT_EQ(out.size(), size_t(2 * H));
  const double want0[3] = {0.5 * 0.7310585786300049, 0.5 * -0.2689414213699951,
                           0.5 * -2.0 * 1.7615941559557646};
  for (int c = 0; c < 3; ++c) EXPECT_NEAR(out[c], want0[c], 1e-15) << "token 0 output " << c;
  for (int64_t c = 3; c < H; ++c) EXPECT_EQ(out[c], 0.0) << "token 0 output " << c;
  // Token 1: x = e_3, gate = up = e_3, h_3 = silu(1) * 1, out = 0.25 * silu(1) e_3.
  for (int64_t c = 0; c < H; ++c)
    EXPECT_NEAR(out[H + c], c == 3 ? 0.25 * 0.7310585786300049 : 0.0, 1e-15) << "token 1 output " << c;
}

// The same geometry with dense, irregular experts: every index, scale and sign matters.
TEST(Reference, MatchesDenseConstruction) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t H = 16, I = 16, E = 2, T = 2;
  const int top_k = 2;
  // Indices from a fixed formula, scales known per (expert, group, n), some -1 signs.
  const Spec gate{tmoe::default_grid(3), [](int64_t e, int64_t k, int64_t n) { return int((3 * k + 5 * n + e) % 8); },
                  [](int64_t e, int64_t g, int64_t n) { return 0.125f * (1 + (n + g + e) % 4); },
                  [](int64_t e, int64_t k) { return (k + e) % 3 == 0 ? -1.0f : 1.0f; },
                  [](int64_t e, int64_t n) { return (n * 7 + e) % 5 == 0 ? -1.0f : 1.0f; }};
  const Spec up{kSimpleGrid, [](int64_t e, int64_t k, int64_t n) { return int((k * n + 2 * e + 1) % 8); },
                [](int64_t e, int64_t g, int64_t n) { return 0.0625f * (1 + (2 * n + e + g) % 3); },
                [](int64_t, int64_t k) { return k % 4 == 1 ? -1.0f : 1.0f; },
                [](int64_t e, int64_t) { return e == 1 ? -1.0f : 1.0f; }};
  const Spec down{tmoe::default_grid(3), [](int64_t e, int64_t k, int64_t n) { return int((k + n * n + e) % 8); },
                  [](int64_t, int64_t g, int64_t n) { return 0.25f / (1 + (n + g) % 2); },
                  [](int64_t e, int64_t k) { return k == e ? -1.0f : 1.0f; },
                  [](int64_t, int64_t n) { return n % 2 ? -1.0f : 1.0f; }};
  MoeWeights w;
  w.gate = make_tensor(E, H, I, 16, gate);
  w.up = make_tensor(E, H, I, 16, up);
  w.down = make_tensor(E, I, H, 16, down);
  std::vector<std::vector<double>> dg, du, dd;
  for (int64_t e = 0; e < E; ++e) {
    dg.push_back(dense(e, H, I, 16, gate));
    du.push_back(dense(e, H, I, 16, up));
    dd.push_back(dense(e, I, H, 16, down));
  }
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(T * H);
  for (float& v : x) v = normal(rng);
  for (const auto& ids : {std::vector<int32_t>{0, 1, 1, 0}, std::vector<int32_t>{1, -1, -1, -1},
                          std::vector<int32_t>{1, 1, 0, 0}}) {
    const std::vector<float> probs = {0.75f, 0.25f, 0.6f, 0.4f};
    const auto want = dense_forward(dg, du, dd, H, I, T, top_k, x, ids, probs);
    const auto got = tmoe::reference_forward(w, T, x, ids, probs);
    ASSERT_EQ(got.size(), want.size());
    // Both sum the same ~2*16 fp64 products per output in possibly different orders: ~1e-15
    // relative to the output scale (O(1)); 1e-12 absolute leaves room and still catches any bug.
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12) << "output " << i;
    if (ids[1] == -1 && ids[2] == -1 && ids[3] == -1)
      for (int64_t c = 0; c < H; ++c) EXPECT_EQ(got[H + c], 0.0) << "token with only -1 ids";
  }
}

// With hadamard = 16 (H = 32, I = 48, partial groups of 32), the reference applies T as FORMAT.md
// says: it must equal the dense forward over effective_weight (checked against Sylvester matrices
// in test_format).
TEST(Reference, HadamardMatchesEffectiveWeight) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  tmoe::SyntheticLayerOptions o;
  o.hadamard = 16;
  o.group_size = 32;
  o.seed = seed;
  o.custom_grid = true;
  const tmoe::MoeShape shape{"custom", 32, 48, 3, 2};
  const MoeWeights w = tmoe::random_moe_weights(shape, o);
  ASSERT_EQ(w.gate.hadamard, 16);
  std::vector<std::vector<double>> dg, du, dd;
  for (int e = 0; e < shape.experts; ++e) {
    dg.emplace_back(32 * 48);
    du.emplace_back(32 * 48);
    dd.emplace_back(48 * 32);
    tmoe::effective_weight(w.gate, e, dg.back());
    tmoe::effective_weight(w.up, e, du.back());
    tmoe::effective_weight(w.down, e, dd.back());
  }
  std::mt19937_64 rng(seed);
  const int64_t T = 5;
  std::vector<float> x(T * 32);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : x) v = normal(rng);
  const std::vector<int32_t> ids = {0, 2, 1, 1, -1, 2, 0, -1, 2, 0};
  const std::vector<float> probs = {0.5f, 0.5f, 0.3f, 0.7f, 0.2f, 0.8f, 1.0f, 0.0f, 0.1f, 0.9f};
  const auto want = dense_forward(dg, du, dd, 32, 48, T, 2, x, ids, probs);
  const auto got = tmoe::reference_forward(w, T, x, ids, probs);
  double norm = 0;
  for (double v : want) norm = std::max(norm, std::fabs(v));
  ASSERT_GT(norm, 0.0);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12 * norm) << "output " << i;
}

TEST(Reference, BadIdsAndShapesAreErrors) {
  const MoeWeights w = tmoe::random_moe_weights({"custom", 16, 16, 2, 2}, {});
  const std::vector<float> x(2 * 16, 1.0f);
  const std::vector<float> probs(4, 0.5f);
  expect_bad_input([&] { tmoe::reference_forward(w, 2, x, std::vector<int32_t>{0, 1, 2, 0}, probs); },
                   "expert id 2");
  expect_bad_input([&] { tmoe::reference_forward(w, 2, x, std::vector<int32_t>{0, -2, 1, 0}, probs); },
                   "expert id -2");
  expect_bad_input([&] { tmoe::reference_forward(w, 3, x, std::vector<int32_t>{0, 1, 1, 0}, probs); },
                   "x holds");
  expect_bad_input([&] { tmoe::reference_forward(w, 2, x, std::vector<int32_t>{0, 1, 1}, {probs.data(), 3}); },
                   "not a multiple");
  expect_bad_input([&] { tmoe::reference_forward(w, 2, x, std::vector<int32_t>{0, 1, 1, 0}, {probs.data(), 3}); },
                   "expert_probs");
  MoeWeights broken = w;
  broken.down = tmoe::TrellisTensor::zeros(2, 16, 32, 3, 16);
  expect_bad_input([&] { tmoe::reference_forward(broken, 2, x, std::vector<int32_t>{0, 1, 1, 0}, probs); },
                   "down is");
}

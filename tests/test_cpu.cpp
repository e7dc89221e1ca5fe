// The CPU backend against the fp64 reference (FORMAT.md), on shapes that hit its edges.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_kernels.hpp"
#include "tmoe/backend.hpp"
#include "tmoe/error.hpp"
#include "tmoe/hadamard.hpp"
#include "tmoe/moe.hpp"
#include "test_support.hpp"

namespace tmoe {
using tmoe::testing::expect_bad_input;
using tmoe::testing::fresh_seed;

namespace {


struct Case {
  int64_t hidden = 40, inter = 24;
  int experts = 6, top_k = 2;
  int gate_bits = 3, up_bits = 3, down_bits = 3;
  int group_size = 16;
  int hadamard = 0;
  bool custom_grid = false;
};

struct Inputs {
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<float> x;
  std::vector<int32_t> ids;
  std::vector<float> probs;
};

// Random activations and routing (distinct experts per token; a fifth of the slots -1 if `holes`).
Inputs random_inputs(int64_t tokens, int64_t hidden, int experts, int top_k, bool holes,
                     std::mt19937_64& rng) {
  Inputs in;
  in.tokens = tokens;
  in.top_k = top_k;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  in.x.resize(tokens * hidden);
  for (float& v : in.x) v = normal(rng);
  SyntheticRouting routing = random_routing(tokens, top_k, experts, rng, holes ? 0.2 : 0.0);
  in.ids = std::move(routing.expert_ids);
  in.probs = std::move(routing.expert_probs);
  return in;
}

MoeWeights make_weights(const Case& c, uint64_t seed) {
  SyntheticLayerOptions o;
  o.gate_bits = c.gate_bits;
  o.up_bits = c.up_bits;
  o.down_bits = c.down_bits;
  o.group_size = c.group_size;
  o.hadamard = c.hadamard;
  o.custom_grid = c.custom_grid;
  o.seed = seed;
  return random_moe_weights(MoeShape{"custom", c.hidden, c.inter, c.experts, c.top_k}, o);
}

// Runs the backend with x given in `x_dtype` (converted from in.x) and the output POISONED first.
std::vector<float> run(MoeBackend& backend, const Inputs& in, int64_t hidden, DType x_dtype = DType::f32,
                       DType out_dtype = DType::f32) {
  std::vector<uint8_t> x(in.x.size() * dtype_size(x_dtype));
  for (size_t i = 0; i < in.x.size(); ++i) store_from_float(x.data(), i, x_dtype, in.x[i]);
  std::vector<uint8_t> out(in.tokens * hidden * dtype_size(out_dtype), 0x7f);  // NaN in f16/bf16
  if (out_dtype == DType::f32) {
    const float nan = std::nanf("");
    for (int64_t i = 0; i < in.tokens * hidden; ++i) std::memcpy(out.data() + 4 * i, &nan, 4);
  }
  MoeBatch b;
  b.tokens = in.tokens;
  b.top_k = in.top_k;
  b.x = x.data();
  b.x_dtype = x_dtype;
  b.expert_ids = in.ids.data();
  b.expert_probs = in.probs.data();
  b.out = out.data();
  b.out_dtype = out_dtype;
  backend.forward(b);
  std::vector<float> result(in.tokens * hidden);
  for (size_t i = 0; i < result.size(); ++i) result[i] = load_as_float(out.data(), i, out_dtype);
  return result;
}

std::vector<double> reference(const MoeWeights& w, const Inputs& in) {
  return reference_forward(w, in.tokens, in.x, in.ids, in.probs);
}

// fp32 accumulation against fp64: dot products over K <= 256 terms of O(1) values accumulate about
// sqrt(K) * 2^-24 relative error each, SwiGLU and the down projection add a few more roundings;
// 2e-5 leaves 10x margin over that and is far below any decode mistake (one wrong index or scale
// gives errors of order 1e-2 and above).
constexpr double kF32Tolerance = 2e-5;

void expect_matches_reference(const Case& c, const std::vector<int64_t>& token_counts, bool holes,
                              uint64_t seed) {
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const MoeWeights w = make_weights(c, rng());
  auto backend = make_backend(BackendKind::cpu, w, {});
  for (const int64_t tokens : token_counts) {
    SCOPED_TRACE("tokens " + std::to_string(tokens));
    const Inputs in = random_inputs(tokens, c.hidden, c.experts, c.top_k, holes, rng);
    const auto ref = reference(w, in);
    const auto out = run(*backend, in, c.hidden);
    EXPECT_LT(relative_error(out, ref), kF32Tolerance);
  }
}

const std::vector<int64_t> kTokenCounts = {1, 2, 3, 17, 130};

TEST(CpuBackend, MatchesReferenceAllBitWidths) {
  for (int bits : {2, 3, 4}) {
    SCOPED_TRACE("bits " + std::to_string(bits));
    Case c;
    c.gate_bits = c.up_bits = c.down_bits = bits;
    expect_matches_reference(c, kTokenCounts, false, fresh_seed());
  }
}

TEST(CpuBackend, MixedBitsPartialTilesAndGroups) {
  // K, N not multiples of 16 (hidden 40, 56; intermediate 24, 50), group 32 (last group partial)
  // and group >= K (one scale per column).
  const int mixes[][3] = {{2, 3, 4}, {4, 2, 3}, {3, 4, 2}};
  for (const auto& m : mixes) {
    for (int group : {32, 256}) {
      Case c;
      c.hidden = 56;
      c.inter = 50;
      c.gate_bits = m[0];
      c.up_bits = m[1];
      c.down_bits = m[2];
      c.group_size = group;
      SCOPED_TRACE("bits " + std::to_string(m[0]) + std::to_string(m[1]) + std::to_string(m[2]) +
                   " group " + std::to_string(group));
      expect_matches_reference(c, {1, 3, 17}, true, fresh_seed());
    }
  }
}

TEST(CpuBackend, TinyShapesSmallerThanATile) {
  for (const auto [hidden, inter] : {std::pair<int64_t, int64_t>{8, 5}, {1, 1}, {17, 3}}) {
    Case c;
    c.hidden = hidden;
    c.inter = inter;
    c.experts = 3;
    c.top_k = 3;
    c.gate_bits = 2;
    c.up_bits = 4;
    c.down_bits = 3;
    SCOPED_TRACE("hidden " + std::to_string(hidden) + " intermediate " + std::to_string(inter));
    expect_matches_reference(c, {1, 2, 17}, true, fresh_seed());
  }
}

TEST(CpuBackend, CustomGridAndHadamard) {
  struct Variant {
    int64_t hidden, inter;
    int hadamard;
  };
  // b = 8 < 16 (units with partial tiles), 32 and 64 > 16 (units of several tiles).
  for (const Variant v : {Variant{40, 24, 8}, Variant{64, 96, 32}, Variant{128, 192, 64}}) {
    for (bool custom : {false, true}) {
      Case c;
      c.hidden = v.hidden;
      c.inter = v.inter;
      c.hadamard = v.hadamard;
      c.custom_grid = custom;
      c.group_size = 32;
      c.gate_bits = 3;
      c.up_bits = 4;
      c.down_bits = 2;
      SCOPED_TRACE("hadamard " + std::to_string(v.hadamard) + (custom ? " custom grid" : ""));
      expect_matches_reference(c, {1, 2, 17, 130}, true, fresh_seed());
    }
  }
}

TEST(CpuBackend, LargerShapeMatchesReference) {
  Case c;
  c.hidden = 256;
  c.inter = 176;
  c.experts = 8;
  c.top_k = 3;
  c.group_size = 128;
  expect_matches_reference(c, {1, 33}, false, fresh_seed());
}

TEST(CpuBackend, GateAndUpSharingInputSigns) {
  // The backend prepares T(x . su) once when gate and up share su and Hadamard: check that path.
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int hadamard : {0, 16}) {
    Case c;
    c.hidden = 96;
    c.inter = 48;
    c.hadamard = hadamard;
    MoeWeights w = make_weights(c, rng());
    w.up.su = w.gate.su;
    auto backend = make_backend(BackendKind::cpu, w, {});
    const Inputs in = random_inputs(17, c.hidden, c.experts, c.top_k, true, rng);
    EXPECT_LT(relative_error(run(*backend, in, c.hidden), reference(w, in)), kF32Tolerance);
  }
}

TEST(CpuBackend, AllTokensOnOneExpertOthersEmpty) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Case c;
  c.experts = 16;
  const MoeWeights w = make_weights(c, rng());
  auto backend = make_backend(BackendKind::cpu, w, {});
  Inputs in = random_inputs(130, c.hidden, c.experts, c.top_k, false, rng);
  for (int64_t t = 0; t < in.tokens; ++t) {
    in.ids[t * 2] = 11;  // every token on expert 11, second slot empty
    in.ids[t * 2 + 1] = -1;
  }
  EXPECT_LT(relative_error(run(*backend, in, c.hidden), reference(w, in)), kF32Tolerance);
}

TEST(CpuBackend, AllSlotsEmptyGivesZeros) {
  Case c;
  const MoeWeights w = make_weights(c, fresh_seed());
  auto backend = make_backend(BackendKind::cpu, w, {});
  std::mt19937_64 rng(fresh_seed());
  Inputs in = random_inputs(3, c.hidden, c.experts, c.top_k, false, rng);
  std::fill(in.ids.begin(), in.ids.end(), -1);
  for (float v : run(*backend, in, c.hidden)) EXPECT_EQ(v, 0.0f);
}

TEST(CpuBackend, BadExpertIdIsACleanError) {
  Case c;
  const MoeWeights w = make_weights(c, fresh_seed());
  auto backend = make_backend(BackendKind::cpu, w, {});
  std::mt19937_64 rng(fresh_seed());
  for (int32_t bad : {c.experts, -2, 1 << 30}) {
    Inputs in = random_inputs(5, c.hidden, c.experts, c.top_k, false, rng);
    in.ids[7] = bad;
    try {
      run(*backend, in, c.hidden);
      ADD_FAILURE() << "expert id " << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::bad_input);
      EXPECT_NE(std::string(e.what()).find(std::to_string(bad)), std::string::npos) << e.what();
    }
  }
  // The backend is still usable afterwards.
  const Inputs in = random_inputs(2, c.hidden, c.experts, c.top_k, false, rng);
  EXPECT_LT(relative_error(run(*backend, in, c.hidden), reference(w, in)), kF32Tolerance);
}

TEST(CpuBackend, ZeroTokensIsANoOpAndMissingPointersAreErrors) {
  Case c;
  const MoeWeights w = make_weights(c, fresh_seed());
  auto backend = make_backend(BackendKind::cpu, w, {});
  MoeBatch empty;
  empty.top_k = 2;
  EXPECT_NO_THROW(backend->forward(empty));  // nothing to read or write
  std::mt19937_64 rng(fresh_seed());
  const Inputs in = random_inputs(2, c.hidden, c.experts, c.top_k, false, rng);
  std::vector<float> out(2 * c.hidden);
  MoeBatch b;
  b.tokens = 2;
  b.top_k = 2;
  b.x = in.x.data();
  b.expert_ids = in.ids.data();
  b.expert_probs = in.probs.data();
  b.out = nullptr;
  EXPECT_THROW(backend->forward(b), Error);
  b.out = out.data();
  b.top_k = 0;
  EXPECT_THROW(backend->forward(b), Error);
}

TEST(CpuBackend, HalfPrecisionActivations) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Case c;
  c.hidden = 72;
  c.inter = 40;
  const MoeWeights w = make_weights(c, rng());
  auto backend = make_backend(BackendKind::cpu, w, {});
  for (DType dtype : {DType::f16, DType::bf16}) {
    SCOPED_TRACE(dtype == DType::f16 ? "f16" : "bf16");
    Inputs in = random_inputs(17, c.hidden, c.experts, c.top_k, true, rng);
    // The reference sees the inputs exactly as rounded to the 16-bit type.
    for (float& v : in.x) {
      uint16_t h;
      store_from_float(&h, 0, dtype, v);
      v = load_as_float(&h, 0, dtype);
    }
    const auto ref = reference(w, in);
    // Output rounding dominates: relative 2^-11 (f16) / 2^-8 (bf16) per element at worst, about
    // half that in the Frobenius norm; bounds are 2x the worst case.
    const double bound = dtype == DType::f16 ? 1e-3 : 8e-3;
    EXPECT_LT(relative_error(run(*backend, in, c.hidden, dtype, dtype), ref), bound);
    EXPECT_LT(relative_error(run(*backend, in, c.hidden, dtype, DType::f32), ref), kF32Tolerance);
  }
}

TEST(CpuBackend, BitwiseEqualForAnyThreadCountAndRepeatCalls) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Case c;
  c.hidden = 128;
  c.inter = 192;
  c.hadamard = 32;
  c.experts = 8;
  const MoeWeights w = make_weights(c, rng());
  for (int64_t tokens : {1, 17, 130}) {
    const Inputs in = random_inputs(tokens, c.hidden, c.experts, c.top_k, true, rng);
    ForwardOptions one;
    one.threads = 1;
    auto single = make_backend(BackendKind::cpu, w, one);
    const auto expected = run(*single, in, c.hidden);
    for (int threads : {2, 3, 5}) {
      ForwardOptions o;
      o.threads = threads;
      auto multi = make_backend(BackendKind::cpu, w, o);
      const auto got = run(*multi, in, c.hidden);
      EXPECT_EQ(0, std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)))
          << threads << " threads, " << tokens << " tokens";
    }
    const auto again = run(*single, in, c.hidden);
    EXPECT_EQ(0, std::memcmp(again.data(), expected.data(), again.size() * sizeof(float)));
  }
}

TEST(CpuKernels, SimdHadamardHasTheBitsOfTheScalarOne) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  struct Context {
    uint64_t seed;
  } context{seed};
  cpu::for_each_simd_target(
      [](const char* target, void* ctx) {
        SCOPED_TRACE(std::string("target ") + target);
        std::mt19937_64 rng(static_cast<Context*>(ctx)->seed);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (int block : {1, 2, 4, 8, 16, 32, 128, 256}) {
          for (int64_t blocks : {1, 3, 5}) {
            const int64_t n = block * blocks;
            std::vector<float> expected(n);
            for (float& v : expected) v = normal(rng);
            std::vector<float> got = expected;
            block_hadamard(expected.data(), n, block);
            cpu::hadamard(got.data(), n, block);
            EXPECT_EQ(0, std::memcmp(got.data(), expected.data(), n * sizeof(float)))
                << "block " << block << ", n " << n;
          }
        }
      },
      &context);
}

TEST(CpuBackend, EverySimdTargetMatchesReference) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  struct Context {
    uint64_t seed;
    int targets = 0;
  } context{seed};
  cpu::for_each_simd_target(
      [](const char* target, void* ctx) {
        auto& cx = *static_cast<Context*>(ctx);
        ++cx.targets;
        std::printf("checking SIMD target %s\n", target);
        SCOPED_TRACE(std::string("target ") + target);
        EXPECT_STREQ(target, cpu::simd_target_name());
        for (int bits : {2, 3, 4}) {
          Case c;
          c.hidden = 72;
          c.inter = 56;
          c.gate_bits = bits;
          c.up_bits = bits == 4 ? 2 : bits + 1;
          c.down_bits = bits;
          c.group_size = 32;
          expect_matches_reference(c, {1, 3, 17}, true, cx.seed + bits);
        }
      },
      &context);
  EXPECT_GE(context.targets, 1);
}

}  // namespace
}  // namespace tmoe

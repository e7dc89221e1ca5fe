// The grouped tensor-core path against the fp64 reference (reference_forward).
//
// Error bound: the GEMMs take bf16 operands (x, the decoded weights and the SwiGLU intermediate
// are each rounded to bf16, relative error <= 2^-9 per element) and accumulate in fp32. Rounding
// errors of random sign add in quadrature over the three roundings, so the relative Frobenius
// error lands near 3e-3; 1e-2 leaves room for the fp16/fp32 output rounding and fast exp, while
// any indexing, decode or routing mistake gives errors of order 1 (or non-finite values: outputs
// are poisoned with 0x7f bytes, a huge float / NaN half, before every run).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cuda/grouped/grouped_moe.cuh"
#include "cuda/grouped/grouped_upload.cuh"
#include "tmoe/backend.hpp"
#include "tmoe/moe.hpp"
#include "tmoe/routing.hpp"
#include "cuda_test_util.hpp"

namespace tmoe::cuda::grouped {
namespace {

using tmoe::testing::ScopedEnv;

constexpr double kBound = 1e-2;


template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t count = 0;
  explicit DeviceBuffer(size_t n) : count(n) {
    if (cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T) + 256) != cudaSuccess) ptr = nullptr;
  }
  DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    if (ptr && !host.empty())
      cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
};

enum class Routing { uniform, one_hot, half_empty, some_skipped, all_skipped };

struct Case {
  MoeShape shape;
  int64_t tokens = 0;
  Routing routing = Routing::uniform;
  SyntheticLayerOptions layer;
  DType x_dtype = DType::bf16;
  DType out_dtype = DType::f32;
  bool deterministic = false;
  int tile_rows = 0;  // 0: automatic
  GroupedKernel kernel = GroupedKernel::automatic;
  float x_scale = 1.0f;  // activations ~ N(0, x_scale^2)
};

// Expert ids [T, k]: distinct experts per token for the routed slots.
std::vector<int32_t> make_ids(const Case& c, std::mt19937_64& rng) {
  const int E = c.shape.experts, k = c.shape.top_k;
  std::vector<int32_t> ids(c.tokens * k);
  std::vector<int32_t> perm(E);
  for (int64_t t = 0; t < c.tokens; ++t) {
    for (int e = 0; e < E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    if (c.routing == Routing::half_empty) {  // only even experts: odd ones get no tokens
      std::stable_partition(perm.begin(), perm.end(), [](int e) { return e % 2 == 0; });
    }
    if (c.routing == Routing::one_hot && rng() % 8 != 0) {  // 7/8 of tokens use expert 0 first
      std::iter_swap(perm.begin(), std::find(perm.begin(), perm.end(), 0));
    }
    for (int j = 0; j < k; ++j) {
      int32_t id = perm[j];
      if (c.routing == Routing::some_skipped && rng() % 4 == 0) id = -1;
      if (c.routing == Routing::all_skipped) id = -1;
      ids[t * k + j] = id;
    }
  }
  return ids;
}

std::vector<uint16_t> to_16bit(const std::vector<float>& v, DType t) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = t == DType::f16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
  return out;
}

// Runs the grouped path once on a fresh output poisoned with 0x7f bytes; returns it as floats.
std::vector<float> run_grouped(const Case& c, const MoeWeights& weights,
                               const std::vector<float>& x, const std::vector<int32_t>& ids,
                               const std::vector<float>& probs) {
  const UploadedProjection gate(weights.gate), up(weights.up), down(weights.down);
  const RoutingPlan plan = make_routing_plan(ids, c.tokens, c.shape.top_k, c.shape.experts);
  DeviceBuffer<int32_t> counts(plan.counts), offsets(plan.offsets), order(plan.order);
  DeviceBuffer<float> probs_d(probs);
  const int64_t H = c.shape.hidden, n_out = c.tokens * H;
  DeviceBuffer<float> x32(x);
  DeviceBuffer<uint16_t> x16(to_16bit(x, c.x_dtype));
  DeviceBuffer<uint8_t> out(n_out * dtype_size(c.out_dtype));

  GroupedMoeArgs args;
  args.gate = gate.view();
  args.up = up.view();
  args.down = down.view();
  args.tokens = c.tokens;
  args.top_k = c.shape.top_k;
  args.x = c.x_dtype == DType::f32 ? static_cast<const void*>(x32.ptr) : x16.ptr;
  args.x_dtype = c.x_dtype;
  args.counts = counts.ptr;
  args.offsets = offsets.ptr;
  args.order = order.ptr;
  args.probs = probs_d.ptr;
  args.out = out.ptr;
  args.out_dtype = c.out_dtype;
  args.deterministic = c.deterministic;
  args.tile_rows = c.tile_rows;
  args.kernel = c.kernel;
  DeviceBuffer<uint8_t> workspace(grouped_moe_workspace_bytes(args));
  args.workspace = workspace.ptr;

  cudaMemset(out.ptr, 0x7f, n_out * dtype_size(c.out_dtype));
  grouped_moe_forward(args, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  std::vector<float> result(n_out);
  if (c.out_dtype == DType::f32) {
    cudaMemcpy(result.data(), out.ptr, n_out * sizeof(float), cudaMemcpyDeviceToHost);
  } else {
    std::vector<uint16_t> bits(n_out);
    cudaMemcpy(bits.data(), out.ptr, n_out * sizeof(uint16_t), cudaMemcpyDeviceToHost);
    for (int64_t i = 0; i < n_out; ++i)
      result[i] = c.out_dtype == DType::f16 ? half_to_float(bits[i]) : bf16_to_float(bits[i]);
  }
  return result;
}

struct Inputs {
  MoeWeights weights;
  std::vector<float> x;  // already representable in c.x_dtype
  std::vector<int32_t> ids;
  std::vector<float> probs;
};

Inputs make_inputs(Case& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  c.layer.seed = rng();
  Inputs in{random_moe_weights(c.shape, c.layer), {}, {}, {}};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  in.x.resize(c.tokens * c.shape.hidden);
  for (float& v : in.x) {
    v = normal(rng) * c.x_scale;
    if (c.x_dtype == DType::bf16) v = bf16_to_float(float_to_bf16(v));
    if (c.x_dtype == DType::f16) v = half_to_float(float_to_half(v));
  }
  in.ids = make_ids(c, rng);
  std::uniform_real_distribution<float> unit(0.05f, 1.0f);
  in.probs.resize(in.ids.size());
  for (float& p : in.probs) p = unit(rng);
  return in;
}

void expect_matches_reference(Case c) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed) + ", tokens " + std::to_string(c.tokens) +
               ", tile rows " + std::to_string(c.tile_rows));
  Inputs in = make_inputs(c, seed);
  const std::vector<float> got = run_grouped(c, in.weights, in.x, in.ids, in.probs);
  const std::vector<double> ref = reference_forward(in.weights, c.tokens, in.x, in.ids, in.probs);
  const double err = relative_error(got, ref);
  if (c.routing == Routing::all_skipped) {
    for (float v : got) ASSERT_EQ(v, 0.0f) << "a token with no routed expert must give 0";
    return;
  }
  EXPECT_LT(err, kBound);
}

MoeShape small_shape() { return {"small", 256, 128, 16, 4}; }

// Activations 200x the others': the synthetic weights keep projections O(1) for O(1) inputs (grid
// rms ~2.6), so gate values have a standard deviation of ~500 and about 4 in 10 lie below -87, where
// exp(-v) overflows and silu must give -0 (not NaN), as many above 87, where it is v. Both GEMM
// kernels' epilogues (wgmma where the device runs it; elsewhere the forced choice falls back).
TEST(Grouped, LargeActivationsSaturateSilu) {
  for (const GroupedKernel kernel : {GroupedKernel::mma_sync, GroupedKernel::wgmma}) {
    Case c;
    c.shape = small_shape();
    c.tokens = 300;
    c.x_scale = 200.0f;
    c.kernel = kernel;
    expect_matches_reference(c);
  }
}

class GroupedTokens : public ::testing::TestWithParam<int64_t> {};
TEST_P(GroupedTokens, MatchesReference) {
  Case c;
  c.shape = small_shape();
  c.tokens = GetParam();
  expect_matches_reference(c);
}
TEST_P(GroupedTokens, MatchesReferenceDeterministic) {
  Case c;
  c.shape = small_shape();
  c.tokens = GetParam();
  c.deterministic = true;
  expect_matches_reference(c);
}
INSTANTIATE_TEST_SUITE_P(Sizes, GroupedTokens, ::testing::Values(1, 65, 128, 257, 1000, 4096));

// Every row-tile height on ragged routings (automatic choice picks one per token count).
class GroupedTileRows : public ::testing::TestWithParam<int> {};
TEST_P(GroupedTileRows, RaggedRoutings) {
  for (Routing routing : {Routing::uniform, Routing::one_hot, Routing::half_empty,
                          Routing::some_skipped}) {
    Case c;
    c.shape = small_shape();
    c.tokens = 700;
    c.routing = routing;
    c.tile_rows = GetParam();
    c.deterministic = routing == Routing::half_empty;
    expect_matches_reference(c);
  }
}
TEST_P(GroupedTileRows, PartialTiles) {
  Case c;
  c.shape = {"odd", 208, 80, 12, 3};
  c.tokens = 1100;
  c.layer.group_size = 48;
  c.layer.gate_bits = 2;
  c.layer.down_bits = 4;
  c.tile_rows = GetParam();
  expect_matches_reference(c);
}
INSTANTIATE_TEST_SUITE_P(Heights, GroupedTileRows, ::testing::Values(32, 64, 128, 256));

TEST(Grouped, OneHotExpert) {
  Case c;
  c.shape = small_shape();
  c.tokens = 1000;
  c.routing = Routing::one_hot;
  expect_matches_reference(c);
}

TEST(Grouped, HalfTheExpertsEmpty) {
  Case c;
  c.shape = small_shape();
  c.tokens = 257;
  c.routing = Routing::half_empty;
  c.deterministic = true;
  expect_matches_reference(c);
}

TEST(Grouped, SkippedSlots) {
  Case c;
  c.shape = small_shape();
  c.tokens = 300;
  c.routing = Routing::some_skipped;
  expect_matches_reference(c);
  c.deterministic = true;
  expect_matches_reference(c);
}

TEST(Grouped, AllSlotsSkippedGivesZeros) {
  Case c;
  c.shape = small_shape();
  c.tokens = 70;
  c.routing = Routing::all_skipped;
  expect_matches_reference(c);
  c.deterministic = true;
  expect_matches_reference(c);
}

// Mixed bits (2 / 4 / 3), a fitted-style grid, groups of 32, fp16 in / bf16 out.
void make_mixed_bits_custom_grid_fp16(Case& c) {
  c.layer.gate_bits = 2;
  c.layer.up_bits = 4;
  c.layer.down_bits = 3;
  c.layer.group_size = 32;
  c.layer.custom_grid = true;
  c.x_dtype = DType::f16;
  c.out_dtype = DType::bf16;
}

TEST(Grouped, MixedBitsCustomGridFp16) {
  Case c;
  c.shape = small_shape();
  c.tokens = 200;
  c.kernel = GroupedKernel::mma_sync;  // 50 rows per expert take wgmma on Hopper (its own test covers it)
  make_mixed_bits_custom_grid_fp16(c);
  expect_matches_reference(c);
}

// K and N multiples of 16 but not of the 64-deep K stage or the 64/128-wide column blocks;
// group size 16; fp32 in / fp16 out.
TEST(Grouped, PartialTilesFp32) {
  Case c;
  c.shape = {"odd", 208, 80, 12, 3};
  c.tokens = 150;
  c.layer.group_size = 16;
  c.layer.gate_bits = 4;
  c.layer.up_bits = 2;
  c.x_dtype = DType::f32;
  c.out_dtype = DType::f16;
  expect_matches_reference(c);
  c.deterministic = true;
  expect_matches_reference(c);
}

TEST(Grouped, HadamardRotation) {
  Case c;
  c.shape = small_shape();
  c.tokens = 129;
  c.layer.hadamard = 32;
  c.routing = Routing::some_skipped;
  expect_matches_reference(c);
  c.shape = {"odd", 192, 96, 8, 2};
  c.layer.hadamard = 32;
  c.x_dtype = DType::f32;
  c.out_dtype = DType::bf16;
  expect_matches_reference(c);
}

// A long down projection (K = I = 4112: 65 steps of 64, the last one partial) with few column
// blocks: the atomic path splits down's K across blocks (uneven split); deterministic mode does not.
TEST(Grouped, SplitKDown) {
  Case c;
  c.shape = {"long-down", 128, 4112, 4, 2};
  c.tokens = 100;
  c.layer.group_size = 64;
  expect_matches_reference(c);
  c.out_dtype = DType::bf16;
  c.tile_rows = 32;
  expect_matches_reference(c);
  c.deterministic = true;
  expect_matches_reference(c);
}

TEST(Grouped, RealShapeFewTokens) {
  Case c;
  c.shape = model_shape("qwen3-30b-a3b");
  c.tokens = 33;
  expect_matches_reference(c);
}

// Runs case `c` in deterministic mode (all tokens on one expert: the most contended epilogue)
// once, then `repeats` more times on the same fresh inputs, and requires bitwise equal outputs.
void expect_bitwise_repeatable(Case c, int repeats) {
  c.routing = Routing::one_hot;
  c.deterministic = true;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Inputs in = make_inputs(c, seed);
  const std::vector<float> first = run_grouped(c, in.weights, in.x, in.ids, in.probs);
  for (int repeat = 0; repeat < repeats; ++repeat) {
    const std::vector<float> again = run_grouped(c, in.weights, in.x, in.ids, in.probs);
    ASSERT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * sizeof(float)))
        << "deterministic mode differs on repeat " << repeat;
  }
}

TEST(Grouped, DeterministicIsBitwiseRepeatable) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  Case c;
  c.shape = small_shape();
  c.tokens = 1000;
  expect_bitwise_repeatable(c, 3);
}

// ---- the wgmma kernel (sm_90a), forced: the same checks where it is selected -------------------
// On a Hopper device it must be selected (the default build has an sm_90a target); elsewhere the
// forced choice falls back to the mma.sync kernel and these tests check that one again.
Case wgmma_case(int64_t tokens) {
  Case c;
  c.shape = small_shape();
  c.tokens = tokens;
  c.kernel = GroupedKernel::wgmma;
  return c;
}

TEST(GroupedWgmma, SelectedOnHopper) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  const Case c = wgmma_case(512);
  MoeWeights weights = random_moe_weights(c.shape, c.layer);
  const UploadedProjection gate(weights.gate), up(weights.up), down(weights.down);
  GroupedMoeArgs args;
  args.gate = gate.view();
  args.up = up.view();
  args.down = down.view();
  args.tokens = c.tokens;
  args.top_k = c.shape.top_k;
  args.kernel = GroupedKernel::wgmma;
  if (prop.major == 9 && prop.minor == 0) {
    EXPECT_TRUE(grouped_uses_wgmma(args));
    args.kernel = GroupedKernel::automatic;
    // The rule at 128, 64, 32 and 24 average rows per expert (512 x 4 pairs over 16 experts: 128).
    const int64_t min_rows = wgmma_min_rows_per_expert(c.shape.experts);
    for (const int64_t tokens : {512, 256, 128, 96}) {
      args.tokens = tokens;
      const int64_t rows = tokens * c.shape.top_k / c.shape.experts;
      EXPECT_EQ(grouped_uses_wgmma(args), kWgmmaAutomatic && rows >= min_rows) << tokens << " tokens";
    }
    args.tokens = 512;
    args.tile_rows = 64;  // a forced tile height keeps the mma.sync kernel
    EXPECT_FALSE(grouped_uses_wgmma(args));
    args.tile_rows = 0;
  } else {
    EXPECT_FALSE(grouped_uses_wgmma(args));
  }
  args.kernel = GroupedKernel::mma_sync;
  EXPECT_FALSE(grouped_uses_wgmma(args));
}

class GroupedWgmmaTokens : public ::testing::TestWithParam<int64_t> {};
TEST_P(GroupedWgmmaTokens, MatchesReference) {
  Case c = wgmma_case(GetParam());
  expect_matches_reference(c);
  c.deterministic = true;
  c.out_dtype = DType::bf16;
  expect_matches_reference(c);
}
INSTANTIATE_TEST_SUITE_P(Sizes, GroupedWgmmaTokens, ::testing::Values(1, 65, 128, 257, 1000, 4096));

TEST(GroupedWgmma, RaggedRoutings) {
  for (Routing routing : {Routing::uniform, Routing::one_hot, Routing::half_empty,
                          Routing::some_skipped, Routing::all_skipped}) {
    Case c = wgmma_case(700);
    c.routing = routing;
    c.deterministic = routing == Routing::half_empty;
    expect_matches_reference(c);
  }
}

// Every bit width alone (one decode variant per warp), then mixed widths with a fitted-style grid
// (the level-table variant) and fp16 in / bf16 out.
TEST(GroupedWgmma, BitWidthsAndGrids) {
  for (int bits : {2, 3, 4}) {
    Case c = wgmma_case(600);
    c.layer.gate_bits = c.layer.up_bits = c.layer.down_bits = bits;
    expect_matches_reference(c);
  }
  Case c = wgmma_case(600);
  make_mixed_bits_custom_grid_fp16(c);
  expect_matches_reference(c);
}

// K and N multiples of 16 but not of the 64-deep step or the 128/256-wide column blocks, small
// groups, fp32 in / fp16 out, and a K of 65 steps (the last one partial).
TEST(GroupedWgmma, PartialTiles) {
  Case c = wgmma_case(1100);
  c.shape = {"odd", 208, 80, 12, 3};
  c.layer.group_size = 48;
  c.layer.gate_bits = 2;
  c.layer.down_bits = 4;
  c.x_dtype = DType::f32;
  c.out_dtype = DType::f16;
  expect_matches_reference(c);
  c.deterministic = true;
  expect_matches_reference(c);
  c = wgmma_case(300);
  c.shape = {"long-down", 128, 4112, 4, 2};
  c.layer.group_size = 64;
  expect_matches_reference(c);
}

TEST(GroupedWgmma, DeterministicIsBitwiseRepeatable) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  expect_bitwise_repeatable(wgmma_case(1000), 2);
}

// The wgmma kernel's run-time variants (environment variables, each its own instantiation): 256-token
// tiles, the producer warpgroup, down's X tile by TMA, in every combination, on a partial tile, ragged
// routings, odd shapes with partial K steps and a contiguous (down) TMA source, and determinism.
TEST(GroupedWgmma, RunTimeVariants) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (const char* tile256 : {"0", "1"})
    for (const char* producer : {"0", "1"})
      for (const char* tma_x : {"0", "1"}) {
        SCOPED_TRACE(std::string("TILE256_MIN_ROWS=") + tile256 + " PRODUCER=" + producer + " TMA_X=" + tma_x);
        const ScopedEnv e1("TMOE_WGMMA_TILE256_MIN_ROWS", tile256), e2("TMOE_WGMMA_PRODUCER", producer),
            e3("TMOE_WGMMA_TMA_X", tma_x);
        expect_matches_reference(wgmma_case(65));
        Case c = wgmma_case(700);
        c.routing = Routing::one_hot;
        expect_matches_reference(c);
        c = wgmma_case(1100);
        c.shape = {"odd", 208, 80, 12, 3};
        c.layer.group_size = 48;
        c.layer.down_bits = 4;
        c.x_dtype = DType::f32;
        c.deterministic = true;
        expect_matches_reference(c);
        if (HasFailure()) return;  // one failing variant is enough to read
      }
}

TEST(Grouped, RejectsBadShapes) {
  GroupedMoeArgs args;
  DeviceProjection w;
  w.experts = 4;
  w.K = 64;
  w.N = 40;  // not a multiple of 16
  args.gate = args.up = w;
  args.down = w;
  args.down.K = 40;
  args.down.N = 64;
  args.tokens = 10;
  args.top_k = 2;
  EXPECT_THROW(grouped_moe_workspace_bytes(args), Error);
  args.gate.N = args.up.N = args.down.K = 48;
  args.gate.group_size = 24;  // not a multiple of 16
  EXPECT_THROW(grouped_moe_workspace_bytes(args), Error);
  args.gate.group_size = 32;
  EXPECT_NO_THROW(grouped_moe_workspace_bytes(args));
  args.tile_rows = 96;  // not a supported tile height
  EXPECT_THROW(grouped_moe_workspace_bytes(args), Error);
  args.tile_rows = 0;
  args.up.K = 80;  // gate and up disagree
  EXPECT_THROW(grouped_moe_workspace_bytes(args), Error);
}

}  // namespace
}  // namespace tmoe::cuda::grouped

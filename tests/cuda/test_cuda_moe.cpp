// CudaMoe against the fp64 reference, device routing against the host plan, errors, determinism
// and graph capture. Each test draws fresh random inputs (seed printed on failure) and poisons the
// outputs with NaN first, so an unwritten element fails.
//
// Error bound: the kernels accumulate in fp32 (h and the pair outputs stay fp32 in the workspace);
// over K <= 2048 terms with random signs that costs ~1e-6 relative, so 1e-4 is a wide margin.
// The tensor-core kernel (affine grids) multiplies exact codebook indices by x = hi + lo (two
// bf16): |x - hi - lo| <= 2^-17 |x| (7.6e-6 relative), the products are exact and the sums fp32,
// so its error is ~1e-5 at most: the same 1e-4 bound holds and still catches any wrong index,
// scale, group boundary or fragment position (errors of order 0.1 to 1).
// The output is then rounded once to its dtype, a relative error of at most its unit roundoff per
// element (so also in Frobenius norm). Bound = unit_roundoff(out) + 1e-4. A wrong index, scale,
// sign, group or transform gives errors of order 0.1 to 1.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <regex>
#include <string>

#include "cuda/dispatch.hpp"
#include "cuda/fragment_layout.hpp"
#include "cuda/grouped/grouped_moe.cuh"
#include "cuda/routing.hpp"
#include "cuda_test_util.hpp"
#include "tmoe/cuda.hpp"
#include "tmoe/error.hpp"
#include "tmoe/routing.hpp"

namespace tmoe::testing {
namespace {

struct MoeCase {
  int64_t H = 256, I = 160;
  int E = 16, k = 4;
  int gate_bits = 3, up_bits = 3, down_bits = 3;
  int group = 96;  // 256 and 160 are not multiples: partial last groups
  int up_group = 0, down_group = 0;  // other group sizes for up / down (0: `group`)
  int hadamard = 0;
  bool custom_grid = false;
  float x_offset = 0;  // added to every activation (exact in f32 for the offsets used)
  DType x_dtype = DType::f32, out_dtype = DType::f32;
  RoutingKind routing = RoutingKind::distinct;
};

std::string describe(const MoeCase& c, int64_t T, uint64_t seed) {
  return "H=" + std::to_string(c.H) + " I=" + std::to_string(c.I) + " E=" + std::to_string(c.E) +
         " k=" + std::to_string(c.k) + " bits=" + std::to_string(c.gate_bits) + "/" +
         std::to_string(c.up_bits) + "/" + std::to_string(c.down_bits) + " group=" +
         std::to_string(c.group) + "/" + std::to_string(c.up_group) + "/" + std::to_string(c.down_group) + " hadamard=" + std::to_string(c.hadamard) +
         (c.custom_grid ? " custom-grid" : "") + " x=" + dtype_name(c.x_dtype) + " out=" +
         dtype_name(c.out_dtype) + " routing=" + std::to_string(static_cast<int>(c.routing)) +
         " T=" + std::to_string(T) + " seed=" + std::to_string(seed);
}

MoeWeights make_weights(const MoeCase& c, uint64_t seed) {
  SyntheticLayerOptions o;
  o.gate_bits = c.gate_bits;
  o.up_bits = c.up_bits;
  o.down_bits = c.down_bits;
  o.group_size = c.group;
  o.hadamard = c.hadamard;
  o.custom_grid = c.custom_grid;
  o.seed = seed;
  const MoeShape shape{"test", c.H, c.I, c.E, c.k};
  MoeWeights w = random_moe_weights(shape, o);
  if (c.up_group != 0) {
    o.group_size = c.up_group;
    w.up = random_moe_weights(shape, o).up;
  }
  if (c.down_group != 0) {
    o.group_size = c.down_group;
    w.down = random_moe_weights(shape, o).down;
  }
  return w;
}

// Runs CudaMoe on device pointers; returns the output as floats.
std::vector<float> run_device(const cuda::CudaMoe& moe, const MoeCase& c, const RandomBatch& b,
                              int64_t T, cudaStream_t stream = nullptr) {
  DeviceArray<uint8_t> x(T * c.H * dtype_size(c.x_dtype));
  TMOE_CUDA_CHECK(cudaMemcpy(x.get(), x_bytes(b, c.x_dtype), x.size(), cudaMemcpyHostToDevice));
  DeviceArray<int32_t> ids(b.ids);
  DeviceArray<float> probs(b.probs);
  DeviceArray<uint8_t> out(T * c.H * dtype_size(c.out_dtype));
  out.poison();
  const size_t ws_bytes = moe.workspace_bytes(T, c.k);
  DeviceArray<uint8_t> ws(ws_bytes);
  ws.poison();
  MoeBatch batch{T, c.k, x.get(), c.x_dtype, ids.get(), probs.get(), out.get(), c.out_dtype};
  moe.forward(batch, ws.get(), ws_bytes, stream);
  TMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return to_floats(out.download(), c.out_dtype, T * c.H);
}

// The decode / small-batch kernels whatever the batch size (the dispatcher would hand larger
// batches of these small shapes to the grouped path, which GroupedPathThroughCudaMoe covers).
cuda::CudaMoeOptions decode_kernels_only() {
  cuda::CudaMoeOptions o;
  o.grouped_min_tokens = std::numeric_limits<int64_t>::max();
  return o;
}
// The one-launch decode at one token (fused_decode.cuh; off by default), where the layer allows it.
cuda::CudaMoeOptions one_launch_decode() {
  cuda::CudaMoeOptions o = decode_kernels_only();
  o.fused_decode = true;
  return o;
}

void check_against_reference(const MoeCase& c, int64_t T,
                             const cuda::CudaMoeOptions& options = decode_kernels_only(),
                             double bound = -1, std::string* plan = nullptr) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(describe(c, T, seed));
  const MoeWeights w = make_weights(c, seed);
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  RandomBatch b = random_batch(T, c.H, c.E, c.k, c.x_dtype, c.routing, rng);
  if (c.x_offset != 0) {
    if (c.x_dtype != DType::f32) throw std::invalid_argument("x_offset: f32 activations only");
    for (float& v : b.x) v += c.x_offset;
  }
  const std::vector<double> ref = reference_forward(w, T, b.x, b.ids, b.probs);
  cuda::CudaMoe moe(w, options);
  if (plan != nullptr) *plan = moe.plan_summary(T, c.k);
  const std::vector<float> got = run_device(moe, c, b, T);
  moe.check_errors();
  EXPECT_LE(relative_error(got, ref), bound >= 0 ? bound : unit_roundoff(c.out_dtype) + 1e-4);
}

// The number a plan_summary() pattern's first group captures, -1 when the pattern does not match.
int plan_number(const std::string& plan, const char* pattern) {
  std::smatch m;
  return std::regex_search(plan, m, std::regex(pattern)) ? std::stoi(m[1].str()) : -1;
}

class CudaMoeTokens : public ::testing::TestWithParam<int64_t> {};

TEST_P(CudaMoeTokens, AllBitsMatchReference) {
  TMOE_REQUIRE_GPU();
  for (int bits : {2, 3, 4}) {
    MoeCase c;
    c.gate_bits = c.up_bits = c.down_bits = bits;
    check_against_reference(c, GetParam());
  }
}

TEST_P(CudaMoeTokens, MixedBitsHadamardHalfPrecision) {
  TMOE_REQUIRE_GPU();
  MoeCase c;
  c.gate_bits = 4;
  c.up_bits = 3;
  c.down_bits = 2;
  c.hadamard = 32;
  c.x_dtype = DType::f16;
  c.out_dtype = DType::bf16;
  c.routing = RoutingKind::some_minus;
  check_against_reference(c, GetParam());
}

TEST_P(CudaMoeTokens, CustomGridBf16In) {
  TMOE_REQUIRE_GPU();
  MoeCase c;
  c.custom_grid = true;
  c.x_dtype = DType::bf16;
  c.out_dtype = DType::f16;
  c.group = 32;
  check_against_reference(c, GetParam());
}

INSTANTIATE_TEST_SUITE_P(Tokens, CudaMoeTokens, ::testing::Values(1, 2, 3, 5, 8, 16, 33, 64));

TEST(CudaMoe, AllTokensOnOneExpert) {
  TMOE_REQUIRE_GPU();
  MoeCase c;
  c.routing = RoutingKind::one_expert;
  for (int64_t T : {1, 7, 64}) check_against_reference(c, T);
}

TEST(CudaMoe, FewExpertsManyUnused) {
  TMOE_REQUIRE_GPU();
  MoeCase c;
  c.routing = RoutingKind::few_experts;
  c.E = 64;
  for (int64_t T : {1, 5, 40}) check_against_reference(c, T);
}

// K = 1024 and 640 (64 and 40 k-tiles: several K splits per pass, a partial last unit of the down
// projection), N = 640 (40 n-tiles: a partial column group of 8), 8 experts, k = 2.
MoeCase several_splits_case() {
  MoeCase c;
  c.H = 1024;
  c.I = 640;
  c.E = 8;
  c.k = 2;
  return c;
}

// Larger K: several K splits per pass, Hadamard 128 (finish groups of two column groups).
TEST(CudaMoe, SplitKAndWideHadamard) {
  TMOE_REQUIRE_GPU();
  MoeCase c = several_splits_case();
  c.group = 128;
  c.hadamard = 128;
  for (int64_t T : {1, 3, 16}) check_against_reference(c, T);
  c.hadamard = 0;
  c.group = 48;
  c.x_dtype = DType::bf16;
  for (int64_t T : {1, 4}) check_against_reference(c, T);
}

// The finishing blocks load in batches (projection.cu, pass_routing.cuh): K splits 4 at a time,
// a token's slots 8 at a time. k = 12 gives the combine a full and a partial batch of slots (with
// skipped slots inside them: some_minus), and K = 1024 a down pass of many splits at one token (a
// full and a partial batch of split loads; the plan is checked so the case cannot silently vanish).
TEST(CudaMoe, ManySlotsAndSplits) {
  TMOE_REQUIRE_GPU();
  MoeCase c{.H = 256, .I = 1024, .E = 16, .k = 12, .group = 128};
  for (RoutingKind routing : {RoutingKind::distinct, RoutingKind::some_minus}) {
    c.routing = routing;
    for (int64_t T : {1, 2, 5, 16}) {
      std::string plan;
      check_against_reference(c, T, decode_kernels_only(), -1, &plan);
      if (T == 1) EXPECT_GE(plan_number(plan, R"(down \(tensor cores\): (\d+) splits)"), 6) << plan;
      if (T == 1) check_against_reference(c, T, one_launch_decode());
    }
  }
}

// The gate+up finish deferred to the down pass's staging (projection.cuh, GateUpSums) against the
// counted finish, on the same weights and batch: both against the reference, and bitwise equal to
// each other (the staging does the finishing block's operations in its order). Cases: a gate+up
// pass of many K splits at one token (a full and a partial batch of split loads: checked through
// the plan), partial scale groups, mixed bits, half precision, skipped slots, the CUDA-core kernel
// (custom grids), items of 1 to 16 rows, a 4-bit layer (its kernels load one split at a time).
// TMOE_DEFER_FINISH_WAVES picks the path (0: never; a large number: whenever the layer and the
// down kernel allow it) and the plan must say which one ran.
TEST(CudaMoe, DeferredGateUpFinishMatchesCounted) {
  TMOE_REQUIRE_GPU();
  const MoeCase cases[] = {
      {.H = 2048, .I = 256, .E = 16, .k = 4, .group = 128},
      {.H = 1024, .I = 640, .E = 8, .k = 2, .gate_bits = 2, .up_bits = 4, .down_bits = 3, .group = 96,
       .x_dtype = DType::bf16, .out_dtype = DType::f16, .routing = RoutingKind::some_minus},
      {.H = 256, .I = 160, .E = 16, .k = 4, .group = 32, .custom_grid = true},
      {.H = 512, .I = 256, .E = 8, .k = 2, .gate_bits = 4, .up_bits = 4, .down_bits = 4, .group = 128},
  };
  for (const MoeCase& c : cases)
    for (const int64_t T : {1, 3, 5, 16, 40}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(describe(c, T, seed));
      const MoeWeights w = make_weights(c, seed);
      std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
      const RandomBatch b = random_batch(T, c.H, c.E, c.k, c.x_dtype, c.routing, rng);
      const std::vector<double> ref = reference_forward(w, T, b.x, b.ids, b.probs);
      std::vector<float> out[2];
      for (int deferred = 0; deferred < 2; ++deferred) {
        const ScopedEnv env("TMOE_DEFER_FINISH_WAVES", deferred ? "1000000" : "0");
        const cuda::CudaMoe moe(w, decode_kernels_only());
        const std::string plan = moe.plan_summary(T, c.k);
        // The 8- and 16-row tensor-core kernels never defer (cuda::deferred_staging_built).
        const bool deferrable = c.custom_grid || plan_number(plan, R"(items of (\d+) rows)") <= 4;
        EXPECT_EQ(plan.find("SwiGLU in the down pass") != std::string::npos, deferred == 1 && deferrable) << plan;
        if (&c == &cases[0] && T == 1)
          EXPECT_GE(plan_number(plan, R"(gate\+up \(tensor cores\): (\d+) splits)"), 5) << plan;
        out[deferred] = run_device(moe, c, b, T);
        moe.check_errors();
        EXPECT_LE(relative_error(out[deferred], ref), unit_roundoff(c.out_dtype) + 1e-4) << "deferred " << deferred;
      }
      EXPECT_EQ(0, std::memcmp(out[0].data(), out[1].data(), out[0].size() * sizeof(float)));
    }
}

// Activations with a large common part (x = 16 + N(0, 1)) over long K ranges: sums of x then grow
// linearly along K, so an accumulator that carries them loses the groups' small parts to fp32
// rounding (the tensor-core kernel's flush, projection.cu). A float32 model of that flush over this
// plan's 88 k-tile blocks: ~3e-6 with the decode bias folded into the accumulator at each flush (the
// code), ~2.4e-5 with the bias kept outside it, ~1.3e-4 with a bias of 64 kept outside: the bound
// catches the last kind (a larger bias or longer ranges), not the second. The test checks through
// the launch plan that the gate+up blocks do cover long ranges (>= 64 k-tiles).
TEST(CudaMoe, ActivationsFarFromZeroMean) {
  TMOE_REQUIRE_GPU();
  const MoeCase c{.H = 4096, .I = 8192, .E = 2, .k = 2, .group = 128, .x_offset = 16.0f};
  std::string plan;
  check_against_reference(c, 1, decode_kernels_only(), -1, &plan);
  EXPECT_GE(plan_number(plan, R"(gate\+up \(tensor cores\): \d+ splits x (\d+) k-tiles)"), 64) << plan;
  // The one-launch decode flushes per scale group the same way, over whole strips (K = 4096).
  check_against_reference(c, 1, one_launch_decode());
}

// The tensor-core kernel's scale-group flushes: groups of 16 (a flush after every k-tile), 48 (flushes
// inside units, groups straddling K splits) and 64 (whole units), with several K splits, partial last
// units (K = 640: 40 k-tiles) and column groups (I = 640: 40 n-tiles, 8 per block), full items
// (T up to 64 on 8 experts, k = 2: up to 16 pairs per expert, items of up to kMaxMmaItemTokens
// rows), Hadamard, half inputs.
TEST(CudaMoe, TensorCoreGroupsSplitsAndItemRows) {
  TMOE_REQUIRE_GPU();
  MoeCase c = several_splits_case();
  for (int group : {16, 48, 64}) {
    c.group = group;
    c.hadamard = group == 64 ? 64 : 0;
    c.x_dtype = group == 16 ? DType::bf16 : group == 48 ? DType::f16 : DType::f32;
    c.out_dtype = group == 48 ? DType::bf16 : DType::f32;
    for (int64_t T : {1, 2, 3, 5, 8, 16, 33, 64}) check_against_reference(c, T);
  }
  c.group = 128;
  c.hadamard = 0;
  c.routing = RoutingKind::one_expert;  // 64 pairs of one expert: every item full
  check_against_reference(c, 64);
}

// Gate and up with different scale groups share one block layout sized for the smaller (the kernel
// stages each block's scales in shared memory): gate 48 (groups inside units), up 128, down 64.
TEST(CudaMoe, ProjectionsWithDifferentGroups) {
  TMOE_REQUIRE_GPU();
  MoeCase c = several_splits_case();
  c.group = 48;
  c.up_group = 128;
  c.down_group = 64;
  for (int64_t T : {1, 3, 16}) check_against_reference(c, T);
}

// From grouped_min_tokens tokens on, CudaMoe hands its device routing plan to the tensor-core
// grouped path (src/cuda/grouped/). Its operands are bf16 (x, decoded weights, the intermediate),
// so its bound is test_grouped.cu's: 1e-2 (a few bf16 roundings of 2^-9 each, with margin).
TEST(CudaMoe, GroupedPathThroughCudaMoe) {
  TMOE_REQUIRE_GPU();
  MoeCase c;
  cuda::CudaMoeOptions always_grouped;
  always_grouped.grouped_min_tokens = 1;
  for (int64_t T : {3, 40}) check_against_reference(c, T, always_grouped, 1e-2);
  c.routing = RoutingKind::some_minus;
  c.out_dtype = DType::bf16;
  check_against_reference(c, 200, cuda::CudaMoeOptions{}, 1e-2);  // the dispatcher picks grouped
}

// The dispatcher's rule (src/cuda/dispatch.hpp): grouped from kGroupedMinPairsPerExpert expected
// pairs per expert on; a forced threshold overrides it.
TEST(CudaMoe, PathFollowsTheDispatchRule) {
  TMOE_REQUIRE_GPU();
  MoeCase c;  // E = 16, k = 4: pairs per expert = T / 4
  cuda::CudaMoe automatic(make_weights(c, 1));
  for (int64_t T : {1, 2, 8, 16, 19, 20, 21, 64, 1000}) {
    const bool grouped = static_cast<double>(T) * c.k / c.E >= cuda::kGroupedMinPairsPerExpert;
    EXPECT_EQ(std::string(automatic.path(T, c.k)) == "grouped", grouped) << "T=" << T;
  }
  EXPECT_STREQ(automatic.path(1, c.k), "decode");
  // Inside the grouped path: mma.sync below wgmma_min_rows_per_expert (32 for these 16 experts: 96
  // tokens give 24), the sm_90a wgmma kernel from there on Hopper (1000 tokens: 250), named with
  // its tile height.
  constexpr int64_t kMmaTokens = 96;
  ASSERT_LT(kMmaTokens * c.k / c.E, cuda::grouped::wgmma_min_rows_per_expert(c.E));
  ASSERT_STREQ(automatic.path(kMmaTokens, c.k), "grouped");
  const std::regex grouped_plan(
      R"(grouped: (wgmma \(sm_90a\), \d+-token tiles(, producer warpgroup)?(, down's X by TMA)?|mma\.sync, \d+-row tiles))");
  EXPECT_TRUE(std::regex_match(automatic.plan_summary(kMmaTokens, c.k), grouped_plan))
      << automatic.plan_summary(kMmaTokens, c.k);
  EXPECT_NE(automatic.plan_summary(kMmaTokens, c.k).find("mma.sync"), std::string::npos);
  cudaDeviceProp prop{};
  ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
  if (prop.major == 9 && prop.minor == 0)  // 128 or 256-token tiles; TMOE_WGMMA_PRODUCER, TMOE_WGMMA_TMA_X
    EXPECT_TRUE(std::regex_match(automatic.plan_summary(1000, c.k),
                                 std::regex(R"(grouped: wgmma \(sm_90a\), (128|256)-token tiles(, producer warpgroup)?(, down's X by TMA)?)")))
        << automatic.plan_summary(1000, c.k);
  cuda::CudaMoeOptions forced;
  forced.grouped_min_tokens = 2;
  cuda::CudaMoe always(make_weights(c, 1), forced);
  EXPECT_STRNE(always.path(1, c.k), "grouped");
  EXPECT_STREQ(always.path(2, c.k), "grouped");
}

// One device copy of the indices (the fragment layout) with the default grids; the tile layout is
// added only for custom grids, which the CUDA-core kernel reads. K = 160 pads down's last unit.
TEST(CudaMoe, DeviceBytesHoldOneCopyOfTheIndices) {
  TMOE_REQUIRE_GPU();
  for (bool custom : {false, true}) {
    MoeCase c;
    c.custom_grid = custom;
    const MoeWeights w = make_weights(c, fresh_seed());
    int64_t want = 0;
    for (const TrellisTensor* t : {&w.gate, &w.up, &w.down}) {
      want += t->experts * t->tiles_n() * cuda::quads_of(t->K) * cuda::unit_bytes(t->bits) +
              2 * static_cast<int64_t>(t->scales.size() + t->su.size() + t->sv.size());
      if (custom) want += static_cast<int64_t>(t->indices.size());
    }
    EXPECT_EQ(cuda::CudaMoe(w).device_bytes(), want) << (custom ? "custom grids" : "default grids");
  }
}

TEST(CudaMoe, BackendOverHostPointers) {
  TMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  MoeCase c;
  SCOPED_TRACE(describe(c, 6, seed));
  const MoeWeights w = make_weights(c, seed);
  std::mt19937_64 rng(seed);
  const RandomBatch b = random_batch(6, c.H, c.E, c.k, DType::f32, RoutingKind::some_minus, rng);
  const auto backend = make_backend(BackendKind::cuda, w);
  EXPECT_EQ(backend->name(), "cuda");
  std::vector<float> out(6 * c.H, std::nanf(""));
  backend->forward(MoeBatch{6, c.k, b.x.data(), DType::f32, b.ids.data(), b.probs.data(), out.data(), DType::f32});
  EXPECT_LE(relative_error(out, reference_forward(w, 6, b.x, b.ids, b.probs)), 1e-4);
}

// Ids outside [0, E) are skipped (never read as memory) and reported; the other slots still count.
TEST(CudaMoe, BadIdsAreReported) {
  TMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  MoeCase c;
  SCOPED_TRACE(describe(c, 5, seed));
  const MoeWeights w = make_weights(c, seed);
  std::mt19937_64 rng(seed);
  RandomBatch b = random_batch(5, c.H, c.E, c.k, DType::f32, RoutingKind::distinct, rng);
  std::vector<int32_t> skipped = b.ids;
  for (int i : {3, 9}) {
    b.ids[i] = i == 3 ? c.E : -7;
    skipped[i] = -1;
  }
  cuda::CudaMoe moe(w);
  const std::vector<float> got = run_device(moe, c, b, 5);
  try {
    moe.check_errors();
    ADD_FAILURE() << "bad ids were not reported";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::bad_input);
    EXPECT_NE(std::string(e.what()).find("token 0, slot 3"), std::string::npos) << e.what();
  }
  moe.check_errors();  // cleared
  EXPECT_LE(relative_error(got, reference_forward(w, 5, b.x, skipped, b.probs)), 1e-4);

  const auto backend = make_backend(BackendKind::cuda, w);
  std::vector<float> out(5 * c.H);
  EXPECT_THROW(backend->forward(MoeBatch{5, c.k, b.x.data(), DType::f32, b.ids.data(), b.probs.data(),
                                         out.data(), DType::f32}),
               Error);
}

TEST(CudaMoe, RejectsShapesTheKernelsDoNotTake) {
  TMOE_REQUIRE_GPU();
  MoeCase c;
  c.H = 72;  // not a multiple of 16
  EXPECT_THROW(cuda::CudaMoe(make_weights(c, 1)), Error);
  MoeCase d;
  cuda::CudaMoe moe(make_weights(d, 1));
  MoeBatch batch{4, d.k, nullptr, DType::f32, nullptr, nullptr, nullptr, DType::f32};
  EXPECT_THROW(moe.forward(batch, nullptr, 0, nullptr), Error);
  DeviceArray<uint8_t> tiny(16);
  DeviceArray<float> buf(4 * d.H);
  DeviceArray<int32_t> ids(4 * d.k);
  batch.x = buf.get();
  batch.out = buf.get();
  batch.expert_ids = ids.get();
  batch.expert_probs = buf.get();
  EXPECT_THROW(moe.forward(batch, tiny.get(), tiny.size(), nullptr), Error);  // workspace too small
}

// Determinism: repeated runs (and a CUDA graph replay) give the same bits.
TEST(CudaMoe, RepeatsBitwiseAndReplaysInAGraph) {
  TMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  MoeCase c;
  c.H = 1024;
  c.I = 512;
  c.E = 8;
  c.k = 2;
  c.out_dtype = DType::f32;
  for (const int64_t T : {1, 3}) {
    SCOPED_TRACE(describe(c, T, seed));
    const MoeWeights w = make_weights(c, seed);
    std::mt19937_64 rng(seed);
    const RandomBatch b = random_batch(T, c.H, c.E, c.k, c.x_dtype, c.routing, rng);
    cuda::CudaMoeOptions options;
    options.deterministic = true;
    options.fused_decode = T == 1;  // 1: the one-launch decode; 3: the projection passes
    cuda::CudaMoe moe(w, options);
    const std::vector<float> first = run_device(moe, c, b, T);
    for (int i = 0; i < 3; ++i) {
      const std::vector<float> again = run_device(moe, c, b, T);
      EXPECT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * sizeof(float))) << "run " << i;
    }
    // Graph capture of forward(), replayed twice.
    cudaStream_t stream;
    TMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    DeviceArray<float> x(b.x);
    DeviceArray<int32_t> ids(b.ids);
    DeviceArray<float> probs(b.probs);
    DeviceArray<float> out(T * c.H);
    const size_t ws_bytes = moe.workspace_bytes(T, c.k);
    DeviceArray<uint8_t> ws(ws_bytes);
    MoeBatch batch{T, c.k, x.get(), DType::f32, ids.get(), probs.get(), out.get(), DType::f32};
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    TMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    moe.forward(batch, ws.get(), ws_bytes, stream);
    TMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    TMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 2; ++i) {
      out.poison();
      TMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      TMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
      const std::vector<float> replay = out.download();
      EXPECT_EQ(0, std::memcmp(first.data(), replay.data(), first.size() * sizeof(float))) << "replay " << i;
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
  }
}

// The one-launch decode (fused_decode.cuh) at its edges, against the reference: K = 208 (13 k-tiles:
// a padded last quad, chunks ending mid-quad) with groups of 48 (groups straddling chunk bounds)
// and 16 (a flush every k-tile), 16 slots some of them -1, duplicate experts in one token, mixed
// bits, half precision in and out; a shape whose blocks each take several units spanning two slots
// in phase A while some blocks have no phase B unit; one with all slots skipped (a zero output).
// Where the device has sm_90 the plan must say it is the one-launch kernel.
bool expect_one_launch() {
  int device = 0, major = 0;
  TMOE_CUDA_CHECK(cudaGetDevice(&device));
  TMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major == 9;
}

void check_one_launch(const MoeCase& c) {
  std::string plan;
  check_against_reference(c, 1, one_launch_decode(), -1, &plan);
  if (expect_one_launch()) EXPECT_NE(plan.find("one launch"), std::string::npos) << plan;
}

TEST(FusedDecode, EdgesMatchReference) {
  TMOE_REQUIRE_GPU();
  check_one_launch({.H = 208, .I = 144, .E = 16, .k = 16, .group = 48, .x_dtype = DType::bf16,
                    .out_dtype = DType::f16, .routing = RoutingKind::some_minus});
  check_one_launch({.H = 208, .I = 144, .E = 16, .k = 5, .gate_bits = 2, .up_bits = 4, .down_bits = 3,
                    .group = 16, .x_dtype = DType::f16, .out_dtype = DType::bf16});
  check_one_launch({.H = 256, .I = 160, .E = 4, .k = 6, .group = 32, .routing = RoutingKind::few_experts});
  check_one_launch({.H = 1024, .I = 1024, .E = 32, .k = 8, .group = 128});
  check_one_launch({.H = 512, .I = 256, .E = 128, .k = 8, .group = 64, .up_group = 128, .down_group = 32});
}

// The one-launch decode's run-time variants (plan_fused_decode's knobs), each against the reference
// on a layer whose blocks have more chunks than ring slots (1-unit chunks: many rounds per slot,
// so the slot round tags, the producers' lockstep and the partial-row window all take part), and
// the paired-unit loop on groups of 2, 3 and 4 units with chunks of 1, 3 and 8 units (chunks that
// start and end inside a group).
TEST(FusedDecode, RunTimeVariantsMatchReference) {
  TMOE_REQUIRE_GPU();
  struct Variant {
    const char *producers, *producer_wait, *consumer_wait, *copy, *chunk_quads, *paired, *ring;
  };
  for (const Variant& v :
       {Variant{"4", "spin", "spin", "bulk", "1", "0", "128"}, Variant{"1", "spin", "spin", "bulk", "1", "1", "128"},
        Variant{"2", "hint", "hint", "cp", "1", "0", "128"}, Variant{"4", "hint", "sleep", "bulk", "2", "0", "128"},
        Variant{"4", "spin", "spin", "cp", "8", "1", "128"}, Variant{"4", "spin", "spin", "bulk", "3", "1", "128"},
        // Rings smaller than the consumer warps (a warp's slot's previous chunk often not yet issued).
        Variant{"4", "spin", "spin", "bulk", "16", "1", "8"}, Variant{"2", "hint", "spin", "cp", "1", "0", "4"},
        Variant{"1", "spin", "spin", "bulk", "4", "0", "8"}}) {
    SCOPED_TRACE(std::string("producers ") + v.producers + ", producer wait " + v.producer_wait + ", consumer wait " +
                 v.consumer_wait + ", copy " + v.copy + ", chunk quads " + v.chunk_quads + ", paired " + v.paired +
                 ", ring at most " + v.ring);
    const ScopedEnv e1("TMOE_FUSED_PRODUCERS", v.producers), e2("TMOE_FUSED_PRODUCER_WAIT", v.producer_wait),
        e3("TMOE_FUSED_WAIT", v.consumer_wait), e4("TMOE_FUSED_COPY", v.copy), e5("TMOE_FUSED_CHUNK_QUADS", v.chunk_quads),
        e6("TMOE_FUSED_PAIRED", v.paired), e7("TMOE_FUSED_RING_SLOTS", v.ring);
    check_one_launch({.H = 1024, .I = 1536, .E = 16, .k = 8, .group = 128});
    check_one_launch({.H = 208, .I = 144, .E = 16, .k = 16, .group = 48, .routing = RoutingKind::some_minus});
    // Groups of 3 units (a pair and one), 4 units and partial last groups (K = 1088, 704).
    check_one_launch({.H = 1088, .I = 704, .E = 8, .k = 4, .group = 192, .down_group = 256});
  }
}

TEST(FusedDecode, AllSlotsSkippedGivesZeros) {
  TMOE_REQUIRE_GPU();
  const MoeCase c{.H = 256, .I = 160, .E = 8, .k = 4};
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(describe(c, 1, seed));
  std::mt19937_64 rng(seed);
  RandomBatch b = random_batch(1, c.H, c.E, c.k, c.x_dtype, c.routing, rng);
  for (int32_t& id : b.ids) id = -1;
  cuda::CudaMoe moe(make_weights(c, seed), one_launch_decode());
  if (expect_one_launch()) EXPECT_NE(moe.plan_summary(1, c.k).find("one launch"), std::string::npos);
  EXPECT_EQ(run_device(moe, c, b, 1), std::vector<float>(c.H, 0.0f));
}

// The layers the one-launch decode does not take run the projection passes.
TEST(FusedDecode, OtherLayersTakeThePasses) {
  TMOE_REQUIRE_GPU();
  MoeCase hadamard{.hadamard = 32};
  MoeCase many_slots{.E = 32, .k = 17};
  for (const MoeCase& c : {hadamard, many_slots}) {
    std::string plan;
    check_against_reference(c, 1, one_launch_decode(), -1, &plan);
    EXPECT_EQ(plan.find("one launch"), std::string::npos) << plan;
  }
}

// The device plan equals the host plan (counts, offsets, stable order, inverse), and the work
// items cover each expert's pairs in chunks.
void check_routing(int64_t T, int k, int E, int per_item, uint64_t seed) {
  SCOPED_TRACE("T=" + std::to_string(T) + " k=" + std::to_string(k) + " E=" + std::to_string(E) +
               " per_item=" + std::to_string(per_item) + " seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(T * k);
  for (auto& id : ids) id = rng() % 5 == 0 ? -1 : static_cast<int32_t>(rng() % E);
  const RoutingPlan plan = make_routing_plan(ids, T, k, E);
  const int64_t P = T * k, max_items = cuda::max_work_items(P, E, per_item);
  DeviceArray<int32_t> d_ids(ids), counts(E), offsets(E + 1), order(P), inverse(P),
      items(max_items * cuda::kWorkItemInts), num_items(1), counters(37), error(std::vector<int32_t>{0, 1 << 30, 0});
  for (auto* a : {&counts, &offsets, &order, &inverse, &items, &num_items, &counters}) a->poison();
  cuda::RoutingOutputs out{counts.get(), offsets.get(), order.get(), inverse.get(), items.get(),
                           num_items.get(), counters.get(), 37, error.get()};
  cuda::launch_routing(d_ids.get(), T, k, E, per_item, out, nullptr);
  EXPECT_EQ(counts.download(), plan.counts);
  EXPECT_EQ(offsets.download(), plan.offsets);
  std::vector<int32_t> got_order = order.download();
  got_order.resize(plan.routed_pairs());
  EXPECT_EQ(got_order, plan.order);
  EXPECT_EQ(inverse.download(), plan.inverse);
  EXPECT_EQ(counters.download(), std::vector<int32_t>(37, 0));
  EXPECT_EQ(error.download()[0], 0);
  const int n = num_items.download()[0];
  ASSERT_LE(n, max_items);
  const std::vector<int32_t> it = items.download();
  std::vector<int32_t> covered(E, 0);
  for (int i = 0; i < n; ++i) {
    const int e = it[i * 4], first = it[i * 4 + 1], count = it[i * 4 + 2];
    ASSERT_TRUE(e >= 0 && e < E && count >= 1 && count <= per_item) << "item " << i;
    EXPECT_EQ(first, plan.offsets[e] + covered[e]);
    covered[e] += count;
  }
  EXPECT_EQ(covered, plan.counts);
}

TEST(CudaRouting, MatchesHostPlan) {
  TMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  for (int64_t T : {1, 2, 5, 33, 64, 300})
    for (int E : {8, 128, 300}) check_routing(T, 8, E, T <= 2 ? 1 : 4, seed + T * 1000 + E);
  check_routing(1000, 6, 4096, 4, seed);
}

// The small cases compute-sanitizer runs (scripts/gpu-check): every kernel, Hadamard, splits.
TEST(CudaSmall, ForwardMatchesReference) {
  TMOE_REQUIRE_GPU();
  MoeCase c;
  c.H = 512;
  c.I = 96;
  c.E = 8;
  c.k = 2;
  c.group = 80;
  c.hadamard = 32;
  c.x_dtype = DType::bf16;
  c.routing = RoutingKind::some_minus;
  // 1 and 3 tokens: items of 1 and 3 rows (4-row kernel); 16 (4 pairs per expert): 8-row items,
  // 40: 16-row items, so compute-sanitizer (scripts/gpu-check runs CudaSmall.*) sees every kernel row count.
  for (int64_t T : {1, 3, 16, 40}) check_against_reference(c, T);
  // k = 11: the combine's second, partial batch of slot loads (pass_routing.cuh); E = 16, H = 256.
  c.H = 256;
  c.E = 16;
  c.k = 11;
  c.hadamard = 0;
  for (int64_t T : {1, 6}) check_against_reference(c, T);
  check_against_reference(c, 1, one_launch_decode());  // under the sanitizers too
}

TEST(CudaSmall, Routing) {
  TMOE_REQUIRE_GPU();
  check_routing(9, 4, 16, 4, fresh_seed());
}

}  // namespace
}  // namespace tmoe::testing

// The launch-overhead work (launch.hpp, pass_routing.cuh): pass blocks that derive their work item
// from the ids, the combine fused into the down pass, and forwards chained by programmatic
// dependent launch, back to back on one workspace inside a CUDA graph. Fresh random inputs each run
// (seed printed on failure); outputs and workspaces poisoned with NaN first.
//
// Error bound (as in test_cuda_moe.cpp): fp32 accumulation over K <= 2048 random-sign terms costs
// ~1e-6 relative, so 1e-4 is a wide margin, plus one rounding to the output dtype (its unit
// roundoff). A wrong item, row, slot or missing combine gives errors of order 0.1 to 1 (or NaN).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/launch.hpp"
#include "cuda/pass_routing.cuh"
#include "cuda_test_util.hpp"
#include "tmoe/cuda.hpp"
#include "tmoe/routing.hpp"

namespace tmoe::testing {
namespace {

// --- find_pass_item against the host plan -----------------------------------------------------

__global__ void find_items_kernel(cuda::PassRouting routing, int pairs, int32_t* out) {
  __shared__ cuda::PassItem item;
  cuda::find_pass_item(routing, nullptr, nullptr, nullptr, pairs, blockIdx.x, item);
  if (threadIdx.x == 0) {
    int32_t* o = out + blockIdx.x * (3 + cuda::kMaxPassItemPairs);
    o[0] = item.count ? item.expert : -1;
    o[1] = item.count ? item.first : -1;
    o[2] = item.count;
    for (int t = 0; t < cuda::kMaxPassItemPairs; ++t) o[3 + t] = t < item.count ? item.pair[t] : -1;
  }
}

// Items the routing kernel would make (routing.cu): chunks of m consecutive pairs per expert, in
// expert order; then every launched block past the last item must report none.
void check_local_items(int64_t T, int k, int E, int m, std::mt19937_64& rng, uint64_t seed) {
  SCOPED_TRACE("T=" + std::to_string(T) + " k=" + std::to_string(k) + " E=" + std::to_string(E) +
               " per_item=" + std::to_string(m) + " seed=" + std::to_string(seed));
  const int64_t P = T * k;
  std::vector<int32_t> ids(P), host_ids(P);
  for (int64_t i = 0; i < P; ++i) {
    const int r = static_cast<int>(rng() % 8);
    ids[i] = r == 0 ? -1 : r == 1 ? E + static_cast<int>(rng() % 3) : static_cast<int>(rng() % E);  // some -1, some bad
    host_ids[i] = ids[i] >= E ? -1 : ids[i];  // bad ids are skipped like -1
  }
  const RoutingPlan plan = make_routing_plan(host_ids, T, k, E);
  std::vector<int32_t> expected;
  for (int e = 0; e < E; ++e)
    for (int c = 0; c < plan.counts[e]; c += m) {
      const int count = std::min(m, plan.counts[e] - c);
      expected.insert(expected.end(), {e, plan.offsets[e] + c, count});
      for (int t = 0; t < cuda::kMaxPassItemPairs; ++t)
        expected.push_back(t < count ? plan.order[plan.offsets[e] + c + t] : -1);
    }
  const int blocks = static_cast<int>(cuda::max_work_items(P, E, m)) + 2;
  const int row = 3 + cuda::kMaxPassItemPairs;
  expected.resize(static_cast<size_t>(blocks) * row, -1);
  for (int b = static_cast<int>(expected.size() / row); b-- > 0;)
    if (expected[b * row + 2] == -1) expected[b * row + 2] = 0;  // blocks without an item: count 0
  DeviceArray<int32_t> d_ids(ids), out(expected.size());
  out.poison();
  cuda::PassRouting routing{d_ids.get(), E, m};
  find_items_kernel<<<blocks, 128>>>(routing, static_cast<int>(P), out.get());
  TMOE_CUDA_CHECK(cudaGetLastError());
  EXPECT_EQ(out.download(), expected);
}

TEST(PassRouting, LocalItemsMatchTheRoutingPlan) {
  TMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  std::mt19937_64 rng(seed);
  for (int m : {1, 2, 4})
    for (auto [T, k, E] : {std::tuple<int64_t, int, int>{1, 8, 128}, {2, 8, 128}, {8, 8, 128}, {1, 2, 8},
                           {8, 2, 8}, {32, 2, 8}, {16, 4, 3}, {64, 1, 5}, {7, 9, 4096}})
      check_local_items(T, k, E, m, rng, seed);
}

// --- forwards through CudaMoe -------------------------------------------------------------------

struct Layer {
  MoeShape shape;
  MoeWeights w;
};

Layer make_layer(int64_t H, int64_t I, int E, int k, int hadamard, uint64_t seed) {
  SyntheticLayerOptions o;
  o.group_size = 96;  // not a divisor of H or I: partial last groups
  o.hadamard = hadamard;
  o.seed = seed;
  Layer l;
  l.shape = MoeShape{"test", H, I, E, k};
  l.w = random_moe_weights(l.shape, o);
  return l;
}

cuda::CudaMoeOptions decode_kernels_only(bool deterministic = false) {
  cuda::CudaMoeOptions o;
  o.deterministic = deterministic;
  o.grouped_min_tokens = std::numeric_limits<int64_t>::max();
  return o;
}

// One batch on the device: inputs uploaded, output poisoned.
struct DeviceBatch {
  RandomBatch host;
  DeviceArray<float> x;
  DeviceArray<int32_t> ids;
  DeviceArray<float> probs;
  DeviceArray<float> out;
  int64_t T;
  DeviceBatch(RandomBatch b, int64_t T, int64_t H)
      : host(std::move(b)), x(host.x), ids(host.ids), probs(host.probs), out(T * H), T(T) {
    out.poison();
  }
  MoeBatch batch(int k) const {
    return MoeBatch{T, k, x.get(), DType::f32, ids.get(), probs.get(), out.get(), DType::f32};
  }
};

// R forwards of different routings (some slots -1, some tokens with no routed slot at all) back to
// back on ONE workspace and stream, captured in a graph and replayed twice: each forward's first
// kernel must wait for the previous forward (it reuses the workspace), each pass for its
// predecessor. Every output is checked against the reference after each replay.
void check_chained_forwards(const Layer& l, int64_t T, const cuda::CudaMoeOptions& options, uint64_t seed) {
  SCOPED_TRACE("H=" + std::to_string(l.shape.hidden) + " I=" + std::to_string(l.shape.intermediate) +
               " E=" + std::to_string(l.shape.experts) + " k=" + std::to_string(l.shape.top_k) +
               " T=" + std::to_string(T) + " seed=" + std::to_string(seed));
  const int64_t H = l.shape.hidden;
  const int k = l.shape.top_k, E = static_cast<int>(l.shape.experts);
  std::mt19937_64 rng(seed);
  cuda::CudaMoe moe(l.w, options);
  const int R = 4;
  std::vector<std::unique_ptr<DeviceBatch>> batches;
  std::vector<std::vector<double>> refs;
  for (int r = 0; r < R; ++r) {
    RandomBatch b = random_batch(T, H, E, k, DType::f32, r % 2 ? RoutingKind::some_minus : RoutingKind::few_experts, rng);
    if (r == 1)  // a token with no routed slot: its output row must be written as zeros
      for (int j = 0; j < k; ++j) b.ids[(T - 1) * k + j] = -1;
    refs.push_back(reference_forward(l.w, T, b.x, b.ids, b.probs));
    batches.push_back(std::make_unique<DeviceBatch>(std::move(b), T, H));
  }
  const size_t ws_bytes = moe.workspace_bytes(T, k);
  DeviceArray<uint8_t> ws(ws_bytes);
  ws.poison();
  cudaStream_t stream;
  TMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  TMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < R; ++r) moe.forward(batches[r]->batch(k), ws.get(), ws_bytes, stream);
  TMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  TMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<std::vector<float>> first;
  for (int replay = 0; replay < 2; ++replay) {
    for (auto& b : batches) b->out.poison();
    TMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    TMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int r = 0; r < R; ++r) {
      const std::vector<float> got = batches[r]->out.download();
      EXPECT_LE(relative_error(got, refs[r]), 1e-4) << "replay " << replay << ", forward " << r;
      if (r == 1)
        for (int64_t n = 0; n < H; ++n) ASSERT_EQ(got[(T - 1) * H + n], 0.0f) << "unrouted token, column " << n;
      if (replay == 0) first.push_back(got);
      else EXPECT_EQ(0, std::memcmp(first[r].data(), got.data(), got.size() * sizeof(float))) << "forward " << r;
    }
  }
  moe.check_errors();
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

// Pair counts on both sides of kLocalPlanMaxPairs (items from the ids / from the routing kernel),
// 1, 2 and 4 pairs per item, Hadamard and several K splits and finish groups (H = 1024).
TEST(PassRouting, ChainedForwardsInAGraphMatchReference) {
  TMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  const Layer small = make_layer(256, 160, 16, 4, 0, seed);
  for (int64_t T : {1, 2, 3, 16, 17}) check_chained_forwards(small, T, decode_kernels_only(), seed + T);
  const Layer wide = make_layer(1024, 512, 8, 2, 64, seed + 1);
  for (int64_t T : {1, 5, 32, 33}) check_chained_forwards(wide, T, decode_kernels_only(true), seed + 100 + T);
  // Passes of more than one wave on an H100 (at 4 tokens: the gate+up grid is 2 waves of the
  // 4-row kernel), launched plainly, next to one-wave passes that are chained.
  const Layer big = make_layer(2048, 4096, 4, 2, 0, seed + 2);
  for (int64_t T : {1, 4}) check_chained_forwards(big, T, decode_kernels_only(), seed + 200 + T);
}

// A batch whose slots are all -1: no work items; every output is zero, nothing is flagged.
TEST(PassRouting, BatchWithNoRoutedSlotWritesZeros) {
  TMOE_REQUIRE_GPU();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  const Layer l = make_layer(256, 160, 16, 4, 0, seed);
  cuda::CudaMoe moe(l.w, decode_kernels_only());
  std::mt19937_64 rng(seed);
  for (int64_t T : {1, 3, 40}) {
    RandomBatch b = random_batch(T, 256, 16, 4, DType::f32, RoutingKind::distinct, rng);
    std::fill(b.ids.begin(), b.ids.end(), -1);
    DeviceBatch d(std::move(b), T, 256);
    const size_t ws_bytes = moe.workspace_bytes(T, 4);
    DeviceArray<uint8_t> ws(ws_bytes);
    ws.poison();
    moe.forward(d.batch(4), ws.get(), ws_bytes, nullptr);
    EXPECT_EQ(d.out.download(), std::vector<float>(T * 256, 0.0f)) << "T=" << T;
  }
  moe.check_errors();
}

// Informational: whether this build and device chain the kernels (sm_90 code on an sm_90 device).
TEST(PassRouting, ReportsProgrammaticLaunch) {
  TMOE_REQUIRE_GPU();
  int device = 0, major = 0;
  TMOE_CUDA_CHECK(cudaGetDevice(&device));
  TMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const bool supported = cuda::programmatic_launch_supported(reinterpret_cast<const void*>(find_items_kernel));
  if (major < 9) EXPECT_FALSE(supported);
  std::printf("programmatic dependent launch: %s (compute capability %d.x)\n", supported ? "on" : "off", major);
}

}  // namespace
}  // namespace tmoe::testing

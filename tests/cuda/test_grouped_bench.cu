// Benchmark of the grouped path against a bf16 cuBLAS MoE, run only when TMOE_GROUPED_BENCH is set
// (a benchmark, not a test: it asserts nothing about speed). Lives here so the grouped module stays
// self-contained until the lead wires it into bench/; cuBLAS is opened with dlopen so the test
// binary needs no new link dependency.
//
//   TMOE_GROUPED_BENCH=1 [TMOE_GROUPED_BENCH_SHAPES=mixtral-8x7b,...] [TMOE_GROUPED_BENCH_TOKENS=128,4096]
//   [TMOE_GROUPED_BENCH_CSV=file] tmoe_cuda_tests --gtest_filter='GroupedBench.*'
//
// Ours: grouped_moe_forward on bf16 x -> bf16 out, 3-bit weights (random bytes are valid indices),
// atomic combine, plus the deterministic mode. Baseline: the same MoE with bf16 weights through
// cuBLAS, per expert one GEMM for gate|up (N = 2I), a SwiGLU kernel, one GEMM for down, all in one
// CUDA graph; its activations are already gathered per expert and its per-pair outputs are not
// combined (both favour the baseline). TFLOP/s = 2 * routed pairs * 3 * H * I / time. Weights are
// far larger than L2 for every shape; times are medians of CUDA-event timings over repeats.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/grouped/grouped_moe.cuh"
#include "tmoe/backend.hpp"
#include "tmoe/format.hpp"
#include "tmoe/moe.hpp"
#include "tmoe/routing.hpp"

namespace tmoe::cuda::grouped {
namespace {

#define BENCH_CHECK(call)                                                                       \
  do {                                                                                          \
    const cudaError_t status_ = (call);                                                         \
    ASSERT_EQ(status_, cudaSuccess) << #call << ": " << cudaGetErrorString(status_);            \
  } while (0)

__device__ uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ float unit(uint64_t seed, uint64_t i) {  // uniform in [0, 1)
  return static_cast<float>(mix(seed * 0x9e3779b97f4a7c15ull + i) >> 40) * (1.0f / 16777216.0f);
}
__global__ void fill_bytes(uint8_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = static_cast<uint8_t>(mix(seed + i));
}
// fp16 values: scale * (0.5 + u) with a random sign when `signs`
__global__ void fill_half(uint16_t* p, int64_t n, uint64_t seed, float scale, bool signs) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float u = unit(seed, i);
    float v = signs ? (u < 0.5f ? -scale : scale) : scale * (0.5f + u);
    p[i] = float_to_half(v);
  }
}
__global__ void fill_bf16(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = __float2bfloat16_rn(scale * (2.0f * unit(seed, i) - 1.0f));
}
__global__ void swiglu_rows(const __nv_bfloat16* gu, int64_t rows, int64_t I, __nv_bfloat16* h) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * I; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / I, c = i % I;
    const float g = __bfloat162float(gu[r * 2 * I + c]), u = __bfloat162float(gu[r * 2 * I + I + c]);
    h[i] = __float2bfloat16_rn(g / (1.0f + __expf(-g)) * u);
  }
}

template <typename T>
T* device_alloc(size_t count) {
  void* p = nullptr;
  if (cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)) != cudaSuccess) return nullptr;
  return static_cast<T*>(p);
}

struct Cublas {
  void* lib = nullptr;
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int,
                                    int, const void*, const void*, cudaDataType, int, const void*,
                                    cudaDataType, int, const void*, void*, cudaDataType, int,
                                    cublasComputeType_t, cublasGemmAlgo_t);
  GemmEx gemm = nullptr;
  bool open() {
    for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
      if (lib) break;
    }
    if (!lib) return false;
    create = reinterpret_cast<decltype(create)>(dlsym(lib, "cublasCreate_v2"));
    set_stream = reinterpret_cast<decltype(set_stream)>(dlsym(lib, "cublasSetStream_v2"));
    set_workspace = reinterpret_cast<decltype(set_workspace)>(dlsym(lib, "cublasSetWorkspace_v2"));
    gemm = reinterpret_cast<decltype(gemm)>(dlsym(lib, "cublasGemmEx"));
    return create && set_stream && set_workspace && gemm;
  }
};

// Median of `repeats` timings of `body` (after 2 warm-up calls), in microseconds.
template <typename F>
double median_us(cudaStream_t stream, int repeats, F&& body) {
  body();
  body();
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    cudaEventRecord(start, stream);
    body();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    times.push_back(ms * 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

std::vector<std::string> split(const char* env, std::vector<std::string> fallback) {
  if (!env || !*env) return fallback;
  std::vector<std::string> out;
  std::stringstream ss(env);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

TEST(GroupedBench, VersusCublas) {
  if (!std::getenv("TMOE_GROUPED_BENCH")) GTEST_SKIP() << "set TMOE_GROUPED_BENCH=1 to run";
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  Cublas blas;
  ASSERT_TRUE(blas.open()) << "could not dlopen cuBLAS";
  cublasHandle_t handle;
  ASSERT_EQ(blas.create(&handle), CUBLAS_STATUS_SUCCESS);
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  void* blas_ws = device_alloc<uint8_t>(64 << 20);
  blas.set_stream(handle, stream);
  blas.set_workspace(handle, blas_ws, 64 << 20);

  const auto shapes = split(std::getenv("TMOE_GROUPED_BENCH_SHAPES"),
                            {"qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v3", "glm-4.5-air"});
  std::vector<int64_t> token_counts;
  for (const auto& s : split(std::getenv("TMOE_GROUPED_BENCH_TOKENS"),
                             {"128", "256", "512", "1024", "2048", "4096", "8192", "16384"}))
    token_counts.push_back(std::stoll(s));
  FILE* csv = nullptr;
  if (const char* path = std::getenv("TMOE_GROUPED_BENCH_CSV")) csv = std::fopen(path, "w");
  if (csv) std::fprintf(csv, "shape,tokens,bits,ours_us,ours_tflops,det_us,cublas_us,cublas_tflops,speedup\n");
  std::vector<std::string> table;

  for (const std::string& shape_name : shapes) {
    const MoeShape shape = model_shape(shape_name);
    const int64_t H = shape.hidden, I = shape.intermediate, E = shape.experts;
    const int bits = 3;
    // Trellis weights, canonical tile order.
    DeviceProjection proj[3];
    std::vector<void*> owned;
    const std::vector<float> grid = default_grid(bits);
    for (int q = 0; q < 3; ++q) {
      DeviceProjection& w = proj[q];
      w.experts = E;
      w.K = q < 2 ? H : I;
      w.N = q < 2 ? I : H;
      w.bits = bits;
      w.group_size = 128;
      w.n_tile_stride = tile_bytes(bits);
      w.k_tile_stride = w.tiles_n() * w.n_tile_stride;
      w.expert_stride = w.tiles_k() * w.k_tile_stride;
      auto* tiles = device_alloc<uint8_t>(E * w.expert_stride);
      auto* scales = device_alloc<uint16_t>(E * w.groups() * w.N);
      auto* su = device_alloc<uint16_t>(E * w.K);
      auto* sv = device_alloc<uint16_t>(E * w.N);
      auto* g = device_alloc<float>(grid.size());
      ASSERT_TRUE(tiles && scales && su && sv && g) << "out of device memory";
      owned.insert(owned.end(), {tiles, scales, su, sv, g});
      fill_bytes<<<1024, 256>>>(tiles, E * w.expert_stride, 11 + q);
      fill_half<<<1024, 256>>>(scales, E * w.groups() * w.N, 21 + q, 1.0f / std::sqrt(float(w.K)), false);
      fill_half<<<1024, 256>>>(su, E * w.K, 31 + q, 1.0f, true);
      fill_half<<<1024, 256>>>(sv, E * w.N, 41 + q, 1.0f, true);
      cudaMemcpy(g, grid.data(), grid.size() * sizeof(float), cudaMemcpyHostToDevice);
      w.tiles = tiles;
      w.scales = scales;
      w.su = su;
      w.sv = sv;
      w.grid = g;
    }
    // bf16 baseline weights: gate|up [E][H][2I], down [E][I][H].
    auto* w_gu = device_alloc<__nv_bfloat16>(E * H * 2 * I);
    auto* w_d = device_alloc<__nv_bfloat16>(E * I * H);
    ASSERT_TRUE(w_gu && w_d) << "out of device memory for the bf16 baseline";
    fill_bf16<<<4096, 256>>>(w_gu, E * H * 2 * I, 51, 1.0f / std::sqrt(float(H)));
    fill_bf16<<<4096, 256>>>(w_d, E * I * H, 52, 1.0f / std::sqrt(float(I)));
    BENCH_CHECK(cudaDeviceSynchronize());

    for (const int64_t T : token_counts) {
      const int k = shape.top_k;
      std::mt19937_64 rng(T * 7919 + E);
      std::vector<int32_t> ids(T * k);
      std::vector<int32_t> perm(E);
      for (int64_t t = 0; t < T; ++t) {
        for (int e = 0; e < E; ++e) perm[e] = e;
        for (int j = 0; j < k; ++j) std::swap(perm[j], perm[j + rng() % (E - j)]);
        for (int j = 0; j < k; ++j) ids[t * k + j] = perm[j];
      }
      const RoutingPlan plan = make_routing_plan(ids, T, k, static_cast<int>(E));
      const int64_t pairs = plan.routed_pairs();
      std::vector<float> probs(T * k, 1.0f / k);
      auto* offsets = device_alloc<int32_t>(E + 1);
      auto* order = device_alloc<int32_t>(pairs);
      auto* probs_d = device_alloc<float>(T * k);
      auto* x = device_alloc<__nv_bfloat16>(T * H);
      auto* out = device_alloc<__nv_bfloat16>(T * H);
      cudaMemcpy(offsets, plan.offsets.data(), (E + 1) * 4, cudaMemcpyHostToDevice);
      cudaMemcpy(order, plan.order.data(), pairs * 4, cudaMemcpyHostToDevice);
      cudaMemcpy(probs_d, probs.data(), T * k * 4, cudaMemcpyHostToDevice);
      fill_bf16<<<1024, 256>>>(x, T * H, 61 + T, 1.0f);

      GroupedMoeArgs args;
      args.gate = proj[0];
      args.up = proj[1];
      args.down = proj[2];
      args.tokens = T;
      args.top_k = k;
      args.x = x;
      args.x_dtype = DType::bf16;
      args.offsets = offsets;
      args.order = order;
      args.probs = probs_d;
      args.out = out;
      args.out_dtype = DType::bf16;
      if (const char* rows = std::getenv("TMOE_GROUPED_BENCH_TILE_ROWS")) args.tile_rows = std::atoi(rows);
      GroupedMoeArgs det_args = args;
      det_args.deterministic = true;
      const size_t ws_bytes =
          std::max(grouped_moe_workspace_bytes(args), grouped_moe_workspace_bytes(det_args));
      auto* ws = device_alloc<uint8_t>(ws_bytes);
      ASSERT_TRUE(ws) << "out of device memory for the workspace";
      args.workspace = det_args.workspace = ws;
      const int repeats = T >= 8192 ? 7 : 15;
      const double ours = median_us(stream, repeats, [&] { grouped_moe_forward(args, stream); });
      const double det = median_us(stream, repeats, [&] { grouped_moe_forward(det_args, stream); });
      BENCH_CHECK(cudaStreamSynchronize(stream));
      BENCH_CHECK(cudaGetLastError());

      // Baseline buffers and graph.
      auto* xs = device_alloc<__nv_bfloat16>(pairs * H);
      auto* gu = device_alloc<__nv_bfloat16>(pairs * 2 * I);
      auto* hb = device_alloc<__nv_bfloat16>(pairs * I);
      auto* y = device_alloc<__nv_bfloat16>(pairs * H);
      ASSERT_TRUE(xs && gu && hb && y) << "out of device memory for the baseline";
      fill_bf16<<<1024, 256>>>(xs, pairs * H, 71 + T, 1.0f);
      const float one = 1.0f, zero = 0.0f;
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      BENCH_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      for (int e = 0; e < E; ++e) {
        const int m = plan.counts[e];
        if (!m) continue;
        const int64_t r0 = plan.offsets[e];
        blas.gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, int(2 * I), m, int(H), &one, w_gu + e * H * 2 * I,
                  CUDA_R_16BF, int(2 * I), xs + r0 * H, CUDA_R_16BF, int(H), &zero, gu + r0 * 2 * I,
                  CUDA_R_16BF, int(2 * I), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      }
      swiglu_rows<<<4096, 256, 0, stream>>>(gu, pairs, I, hb);
      for (int e = 0; e < E; ++e) {
        const int m = plan.counts[e];
        if (!m) continue;
        const int64_t r0 = plan.offsets[e];
        blas.gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, int(H), m, int(I), &one, w_d + e * I * H,
                  CUDA_R_16BF, int(H), hb + r0 * I, CUDA_R_16BF, int(I), &zero, y + r0 * H,
                  CUDA_R_16BF, int(H), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      }
      BENCH_CHECK(cudaStreamEndCapture(stream, &graph));
      BENCH_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      const double base = median_us(stream, repeats, [&] { cudaGraphLaunch(exec, stream); });
      BENCH_CHECK(cudaStreamSynchronize(stream));
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);

      const double flop = 2.0 * pairs * 3.0 * H * I;
      char line[256];
      std::snprintf(line, sizeof line, "%-14s %6lld %10.1f %8.1f %10.1f %10.1f %8.1f %7.2fx",
                    shape_name.c_str(), static_cast<long long>(T), ours, flop / ours * 1e-6, det,
                    base, flop / base * 1e-6, base / ours);
      table.push_back(line);
      std::printf("%s\n", line);
      std::fflush(stdout);
      if (csv)
        std::fprintf(csv, "%s,%lld,%d,%.2f,%.2f,%.2f,%.2f,%.2f,%.3f\n", shape_name.c_str(),
                     static_cast<long long>(T), bits, ours, flop / ours * 1e-6, det, base,
                     flop / base * 1e-6, base / ours);
      for (void* p : std::initializer_list<void*>{offsets, order, probs_d, x, out, ws, xs, gu, hb, y})
        cudaFree(p);
    }
    cudaFree(w_gu);
    cudaFree(w_d);
    for (void* p : owned) cudaFree(p);
  }
  if (csv) std::fclose(csv);
  std::printf("\n%-14s %6s %10s %8s %10s %10s %8s %8s\n", "shape", "tokens", "ours_us", "TFLOP/s",
              "det_us", "cublas_us", "TFLOP/s", "speedup");
  for (const auto& line : table) std::printf("%s\n", line.c_str());
}

}  // namespace
}  // namespace tmoe::cuda::grouped

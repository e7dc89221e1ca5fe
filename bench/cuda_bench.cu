// The CUDA benchmark (tmoe::bench::run_cuda_bench): CudaMoe against a bf16 cuBLAS MoE, both as
// CUDA graphs of R forwards with R different routings, so the selected experts change every
// forward and the weights are not in L2 (several layer copies too, cycled, for the small layers).
//
// Per case: median over graph replays of (replay time / R); bytes = the distinct selected experts'
// packed weights + scales + su + sv, averaged over the R routings; GB/s and its fraction of a
// device-to-device copy measured in the same run (bytes read + written / time); the bf16
// baseline = gather rows by expert, one cuBLAS GEMM per used expert for gate|up (fused [H, 2I]
// weights), a SwiGLU kernel, one GEMM per expert for down, a weighted combine kernel.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_report.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/launch.hpp"
#include "cuda/pass_trace.hpp"
#include "tmoe/cuda.hpp"
#include "tmoe/error.hpp"
#include "tmoe/routing.hpp"

namespace tmoe::bench {
namespace {

void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(ErrorKind::internal, std::string("cuBLAS error in ") + what + ": " + std::to_string(static_cast<int>(s)));
}
#define CUBLAS_CHECK(call) check_cublas((call), #call)

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A random layer, fast enough for deepseek-v3's 4 GB (random_moe_weights draws byte by byte).
TrellisTensor random_tensor(int64_t E, int64_t K, int64_t N, int bits, int group, uint64_t seed) {
  TrellisTensor t = TrellisTensor::zeros(E, K, N, bits, group);
  const int64_t words = static_cast<int64_t>(t.indices.size() / 8);

  for (int64_t i = 0; i < words; ++i) {
    const uint64_t v = splitmix(seed ^ (i * 0x632be59bd9b4e019ull));
    std::memcpy(t.indices.data() + i * 8, &v, 8);
  }
  const float base = 1.0f / std::sqrt(static_cast<float>(K));

  for (int64_t i = 0; i < static_cast<int64_t>(t.scales.size()); ++i)
    t.scales[i] = float_to_half(base * (0.5f + (splitmix(seed + 7 * i) >> 40) * 0x1p-24f));
  for (size_t i = 0; i < t.su.size(); ++i) t.su[i] = float_to_half(splitmix(seed + 3 * i) & 1 ? 1.0f : -1.0f);
  for (size_t i = 0; i < t.sv.size(); ++i) t.sv[i] = float_to_half(splitmix(seed + 5 * i) & 1 ? 1.0f : -1.0f);
  return t;
}

__global__ void fill_bf16(__nv_bfloat16* p, int64_t n, float scale, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t x = seed ^ (i * 0x9e3779b97f4a7c15ull);
    x = (x ^ (x >> 29)) * 0xbf58476d1ce4e5b9ull;
    x ^= x >> 32;
    p[i] = __float2bfloat16(scale * ((x & 0xffffff) * 0x1p-23f - 1.0f));
  }
}

__global__ void gather_rows(const __nv_bfloat16* x, const int32_t* row_token, int64_t rows, int64_t H,
                            __nv_bfloat16* dst) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x) dst[r * H + c] = x[row_token[r] * H + c];
}

__global__ void swiglu_rows(const __nv_bfloat16* gu, int64_t rows, int64_t I, __nv_bfloat16* h) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
    for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
      const float g = __bfloat162float(gu[r * 2 * I + c]), u = __bfloat162float(gu[r * 2 * I + I + c]);
      h[r * I + c] = __float2bfloat16(g / (1.0f + __expf(-g)) * u);
    }
}

__global__ void combine_rows(const __nv_bfloat16* y, const int32_t* pair_row, const float* probs, int64_t T,
                             int k, int64_t H, __nv_bfloat16* out) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x)
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
      float s = 0;
      for (int j = 0; j < k; ++j) {
        const int32_t r = pair_row[t * k + j];
        if (r >= 0) s += probs[t * k + j] * __bfloat162float(y[r * H + c]);
      }
      out[t * H + c] = __float2bfloat16(s);
    }
}

// The stream floor (BenchRow::floor_us, stream_us): kernels that only read a case's bytes, no decode,
// no arithmetic. One block of kStreamThreads per SM per phase, so a dependent phase's blocks fit
// beside the phase before it (launch bounds of 2 blocks per SM; ptxas gives them 32 registers) and
// start reading while it still runs.
constexpr int kStreamThreads = 512, kStreamLoads = 8;  // 16-byte loads in flight per thread

// Reads n16 16-byte words (kStreamLoads in flight per thread, streaming: not kept in L1) and folds
// them into a word stored only if it equals a constant, so no load can be dropped. kAfterPhase: the
// down pass's order: read first, then wait for the phase before it (programmatic dependent launch)
// and fold in what it wrote.
template <bool kAfterPhase>
__global__ void __launch_bounds__(kStreamThreads, 2) stream_phase(const uint4* __restrict__ src, int64_t n16,
                                                               uint32_t* sink) {
  cuda::allow_dependents();
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  uint32_t fold = 0;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n16; i += kStreamLoads * stride) {
    uint4 v[kStreamLoads];
#pragma unroll
    for (int u = 0; u < kStreamLoads; ++u)
      v[u] = i + u * stride < n16 ? __ldcs(src + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < kStreamLoads; ++u) fold ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if constexpr (kAfterPhase) {
    cuda::wait_for_predecessor();
    fold ^= *static_cast<volatile uint32_t*>(sink);
  }
  if (fold == 0x9e3779b9u) sink[kAfterPhase ? 1 : 0] = fold;
}

template <typename T>
T* device_alloc(size_t n, std::vector<void*>& owned) {
  void* p = nullptr;
  TMOE_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)));
  owned.push_back(p);
  return static_cast<T*>(p);
}

struct Owned {
  std::vector<void*> ptrs;
  ~Owned() {
    for (void* p : ptrs) cudaFree(p);
  }
};

// Median time of one graph replay in microseconds (replays until min_seconds, at least 5).
double time_graph(cudaGraphExec_t exec, cudaStream_t stream, double min_seconds) {
  cudaEvent_t start, stop;
  TMOE_CUDA_CHECK(cudaEventCreate(&start));
  TMOE_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 2; ++i) TMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  TMOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> samples;
  const auto begin = std::chrono::steady_clock::now();
  while (samples.size() < 5 ||
         std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count() < min_seconds) {
    TMOE_CUDA_CHECK(cudaEventRecord(start, stream));
    TMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    TMOE_CUDA_CHECK(cudaEventRecord(stop, stream));
    TMOE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    TMOE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(ms * 1e3);
    if (samples.size() > 2000) break;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return median(samples);
}

// Captures what `record` launches on `stream` into a CUDA graph and times its replays (time_graph).
// `after` runs on the instantiated graph before it is destroyed (the pass trace replays it once more).
template <typename Record, typename After>
double time_captured(cudaStream_t stream, double min_seconds, Record&& record, After&& after) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  TMOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  record();
  TMOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  TMOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double us = time_graph(exec, stream, min_seconds);
  after(exec);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return us;
}

template <typename Record>
double time_captured(cudaStream_t stream, double min_seconds, Record&& record) {
  return time_captured(stream, min_seconds, std::forward<Record>(record), [](cudaGraphExec_t) {});
}

struct StreamFloor {
  double floor_us = 0;   // gate+up bytes, then the down bytes in a dependent launch (the passes' order)
  double stream_us = 0;  // all the bytes in one kernel: no dependency at all
};

// The stream floor of one case (see BenchRow::floor_us), timed like the forwards it is compared with:
// a graph of R skeleton forwards, each on its own slot of a pool so that no forward finds its bytes
// in L2 (at least 256 MB of other slots between two reads of one slot).
StreamFloor time_stream_floor(cudaStream_t stream, double min_seconds, int sms, int R, double gate_up_bytes,
                              double down_bytes) {
  const int64_t gate_up16 = std::max<int64_t>(1, std::llround(gate_up_bytes / 16));
  const int64_t down16 = std::max<int64_t>(1, std::llround(down_bytes / 16));
  const int64_t slot16 = gate_up16 + down16;
  const int64_t slots = std::clamp<int64_t>(ceil_div(int64_t{256} << 20, slot16 * 16) + 1, 2, R);
  Owned o;
  auto* pool = device_alloc<uint4>(size_t(slots * slot16), o.ptrs);
  auto* sink = device_alloc<uint32_t>(2, o.ptrs);
  TMOE_CUDA_CHECK(cudaMemsetAsync(pool, 0, size_t(slots * slot16) * 16, stream));
  const dim3 grid(sms), block(kStreamThreads);
  StreamFloor f;
  f.floor_us = time_captured(stream, min_seconds, [&] {
    for (int r = 0; r < R; ++r) {
      const uint4* slot = pool + (r % slots) * slot16;
      stream_phase<false><<<grid, block, 0, stream>>>(slot, gate_up16, sink);
      cuda::launch_dependent(stream_phase<true>, grid, block, 0, stream, true, slot + gate_up16, down16, sink);
    }
  }) / R;
  f.stream_us = time_captured(stream, min_seconds, [&] {
    for (int r = 0; r < R; ++r)
      stream_phase<false><<<grid, block, 0, stream>>>(pool + (r % slots) * slot16, slot16, sink);
  }) / R;
  TMOE_CUDA_CHECK(cudaGetLastError());
  return f;
}

double copy_bandwidth_gbps(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  Owned o;
  char* a = device_alloc<char>(bytes, o.ptrs);
  char* b = device_alloc<char>(bytes, o.ptrs);
  TMOE_CUDA_CHECK(cudaMemsetAsync(a, 1, bytes, stream));
  const double us = time_captured(stream, 0.3, [&] {
    TMOE_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
  });
  return 2.0 * bytes / (us * 1e3);  // read + written
}

double gemm_tflops(cublasHandle_t handle, cudaStream_t stream) {
  const int n = 8192;
  Owned o;
  auto* a = device_alloc<__nv_bfloat16>(size_t(n) * n, o.ptrs);
  auto* b = device_alloc<__nv_bfloat16>(size_t(n) * n, o.ptrs);
  auto* c = device_alloc<__nv_bfloat16>(size_t(n) * n, o.ptrs);
  fill_bf16<<<1024, 256, 0, stream>>>(a, int64_t(n) * n, 1.0f, 1);
  fill_bf16<<<1024, 256, 0, stream>>>(b, int64_t(n) * n, 1.0f, 2);
  const float alpha = 1, beta = 0;
  const double us = time_captured(stream, 0.3, [&] {
    CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b,
                              CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  return 2.0 * n * n * double(n) / (us * 1e-6) / 1e12;
}

// R routings of T tokens (tmoe::random_routing: distinct experts per token).
struct Routings {
  int R = 0;
  std::vector<int32_t> ids;      // [R][T*k]
  std::vector<float> probs;      // [R][T*k]
  std::vector<int32_t> row_token, pair_row;  // baseline: rows sorted by expert -> token; pair -> row
  std::vector<std::vector<std::pair<int, int>>> segments;  // per routing: (expert, rows) in row order
  double mean_distinct = 0;
};

Routings make_routings(int R, int64_t T, int k, int E, std::mt19937_64& rng) {
  Routings r;
  r.R = R;
  for (int i = 0; i < R; ++i) {
    const SyntheticRouting drawn = random_routing(T, k, E, rng);
    // The baseline's row order is the routing plan's: pairs grouped by expert, stable.
    const RoutingPlan plan = make_routing_plan(drawn.expert_ids, T, k, E);
    std::vector<std::pair<int, int>> seg;
    for (int e = 0; e < E; ++e)
      if (plan.counts[e] > 0) seg.push_back({e, plan.counts[e]});
    for (int32_t pair : plan.order) r.row_token.push_back(pair / k);
    r.mean_distinct += double(seg.size()) / R;
    r.segments.push_back(std::move(seg));
    r.ids.insert(r.ids.end(), drawn.expert_ids.begin(), drawn.expert_ids.end());
    r.pair_row.insert(r.pair_row.end(), plan.inverse.begin(), plan.inverse.end());
    r.probs.insert(r.probs.end(), drawn.expert_probs.begin(), drawn.expert_probs.end());
  }
  return r;
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

// One more replay of a timed graph with the pass trace on (pass_trace.hpp): its blocks as CSV rows,
// times in ns from the replay's first block.
void write_trace(std::FILE* file, cudaGraphExec_t exec, cudaStream_t stream, const std::string& shape, int64_t tokens) {
  cuda::pass_trace_begin();
  TMOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  uint64_t dropped = 0;
  const std::vector<cuda::PassTraceRecord> records = cuda::pass_trace_end(&dropped);  // synchronizes
  uint64_t t0 = UINT64_MAX;
  for (const auto& r : records) t0 = std::min(t0, r.begin);
  for (const auto& r : records)
    std::fprintf(file, "%s,%lld,%u,%u,%u,%u,%llu,%llu,%llu,%llu\n", shape.c_str(), static_cast<long long>(tokens),
                 r.pass, r.block, r.blocks, r.sm, static_cast<unsigned long long>(r.begin - t0),
                 static_cast<unsigned long long>(r.staged - t0), static_cast<unsigned long long>(r.looped - t0),
                 static_cast<unsigned long long>(r.end - t0));
  std::fprintf(stderr, "cuda bench:   trace: %zu blocks%s\n", records.size(),
               dropped ? (", " + std::to_string(dropped) + " more not kept").c_str() : "");
}

}  // namespace

std::vector<BenchRow> run_cuda_bench(const BenchConfig& config, DeviceReport& device) {
  std::unique_ptr<std::FILE, FileCloser> trace;
  if (!config.trace_path.empty()) {
    if (!cuda::pass_trace_built())
      throw Error(ErrorKind::bad_input, "--trace: this build records no trace; configure with "
                                        "-DCMAKE_CUDA_FLAGS=-DTMOE_PASS_TRACE=1");
    trace.reset(std::fopen(config.trace_path.c_str(), "w"));
    if (!trace) throw Error(ErrorKind::bad_input, "--trace: cannot write '" + config.trace_path + "'");
    std::fprintf(trace.get(), "shape,tokens,pass,block,blocks,sm,begin_ns,staged_ns,looped_ns,end_ns\n");
  }
  int dev = 0;
  TMOE_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  TMOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  cudaStream_t stream;
  TMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t handle;
  CUBLAS_CHECK(cublasCreate(&handle));
  CUBLAS_CHECK(cublasSetStream(handle, stream));
  Owned global;
  void* cublas_ws = device_alloc<char>(64 << 20, global.ptrs);
  CUBLAS_CHECK(cublasSetWorkspace(handle, cublas_ws, 64 << 20));

  device.backend = "cuda";
  device.name = prop.name;
  device.threads = prop.multiProcessorCount;
  device.bandwidth_gbps = copy_bandwidth_gbps(stream);
  device.gemm_tflops = gemm_tflops(handle, stream);
  device.notes = "L2 " + std::to_string(prop.l2CacheSize >> 20) + " MB; bandwidth = device-to-device copy (read + write); "
                 "GEMM = cuBLAS bf16 8192^3";
  std::fprintf(stderr, "cuda bench: %s, %d SMs, copy %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", prop.name,
               prop.multiProcessorCount, device.bandwidth_gbps, device.gemm_tflops);

  std::vector<BenchRow> rows;
  std::mt19937_64 rng(config.seed);
  const int R = 16;  // routings per graph
  for (const MoeShape& shape : config.shapes) {
    const int64_t H = shape.hidden, I = shape.intermediate;
    const int E = shape.experts, k = shape.top_k;
    // Quantized layer copies: together at least ~1 GB (20x L2), cycled forward by forward.
    std::vector<std::unique_ptr<cuda::CudaMoe>> copies;
    cuda::CudaMoeOptions moe_options;
    moe_options.deterministic = config.deterministic;
    moe_options.grouped_min_tokens = config.grouped_min_tokens;
    int64_t expert_bytes = 0, layer_bytes = 0, gate_up_expert_bytes = 0, down_expert_bytes = 0;
    {
      MoeWeights w;
      w.gate = random_tensor(E, H, I, config.bits, config.group_size, config.seed * 3 + 1);
      w.up = random_tensor(E, H, I, config.bits, config.group_size, config.seed * 3 + 2);
      w.down = random_tensor(E, I, H, config.bits, config.group_size, config.seed * 3 + 3);
      expert_bytes = w.expert_bytes();
      gate_up_expert_bytes = w.gate.expert_bytes() + w.up.expert_bytes();
      down_expert_bytes = w.down.expert_bytes();
      layer_bytes = expert_bytes * E;
      const int n = static_cast<int>(std::clamp<int64_t>(ceil_div(int64_t{1} << 30, layer_bytes), 1, 8));
      for (int i = 0; i < n; ++i) copies.push_back(std::make_unique<cuda::CudaMoe>(w, moe_options));
    }
    // The bf16 baseline's weights: gate|up fused [E][H][2I], down [E][I][H].
    Owned o;
    auto* w_gu = device_alloc<__nv_bfloat16>(size_t(E) * H * 2 * I, o.ptrs);
    auto* w_dn = device_alloc<__nv_bfloat16>(size_t(E) * I * H, o.ptrs);
    fill_bf16<<<4096, 256, 0, stream>>>(w_gu, int64_t(E) * H * 2 * I, 1.0f / std::sqrt(float(H)), 11);
    fill_bf16<<<4096, 256, 0, stream>>>(w_dn, int64_t(E) * I * H, 1.0f / std::sqrt(float(I)), 12);
    TMOE_CUDA_CHECK(cudaGetLastError());
    std::fprintf(stderr, "cuda bench: %s: %zu layer copies of %.1f MB, bf16 baseline %.1f GB\n",
                 shape.name.c_str(), copies.size(), layer_bytes / 1e6, 3.0 * E * H * I * 2 / 1e9);

    for (int64_t T : config.tokens) {
      const int64_t P = T * k;
      const Routings routing = make_routings(R, T, k, E, rng);
      Owned c;
      auto* x = device_alloc<__nv_bfloat16>(T * H, c.ptrs);
      fill_bf16<<<256, 256, 0, stream>>>(x, T * H, 1.0f, rng());
      auto* ids = device_alloc<int32_t>(routing.ids.size(), c.ptrs);
      auto* probs = device_alloc<float>(routing.probs.size(), c.ptrs);
      auto* row_token = device_alloc<int32_t>(routing.row_token.size(), c.ptrs);
      auto* pair_row = device_alloc<int32_t>(routing.pair_row.size(), c.ptrs);
      TMOE_CUDA_CHECK(cudaMemcpy(ids, routing.ids.data(), routing.ids.size() * 4, cudaMemcpyHostToDevice));
      TMOE_CUDA_CHECK(cudaMemcpy(probs, routing.probs.data(), routing.probs.size() * 4, cudaMemcpyHostToDevice));
      TMOE_CUDA_CHECK(cudaMemcpy(row_token, routing.row_token.data(), routing.row_token.size() * 4, cudaMemcpyHostToDevice));
      TMOE_CUDA_CHECK(cudaMemcpy(pair_row, routing.pair_row.data(), routing.pair_row.size() * 4, cudaMemcpyHostToDevice));
      auto* out = device_alloc<__nv_bfloat16>(T * H, c.ptrs);
      const size_t ws_bytes = copies[0]->workspace_bytes(T, k);
      void* ws = device_alloc<char>(ws_bytes, c.ptrs);

      // Ours: R forwards, forward r on copy r % copies with routing r.
      const auto forwards = [&] {
        for (int r = 0; r < R; ++r) {
          MoeBatch b{T, k, x, DType::bf16, ids + r * P, probs + r * P, out, DType::bf16};
          copies[r % copies.size()]->forward(b, ws, ws_bytes, stream);
        }
      };
      const auto trace_once = [&](cudaGraphExec_t exec) {
        if (trace) write_trace(trace.get(), exec, stream, shape.name, T);
      };
      const double ours_us = time_captured(stream, config.min_seconds, forwards, trace_once) / R;
      copies[0]->check_errors();

      // Baseline: the same R routings through bf16 cuBLAS.
      auto* xs = device_alloc<__nv_bfloat16>(P * H, c.ptrs);
      auto* gu = device_alloc<__nv_bfloat16>(P * 2 * I, c.ptrs);
      auto* hs = device_alloc<__nv_bfloat16>(P * I, c.ptrs);
      auto* ys = device_alloc<__nv_bfloat16>(P * H, c.ptrs);
      const float alpha = 1, beta = 0;
      const double base_us = time_captured(stream, config.min_seconds, [&] {
        for (int r = 0; r < R; ++r) {
          gather_rows<<<std::min<int64_t>(P, 1024), 256, 0, stream>>>(x, row_token + r * P, P, H, xs);
          int64_t row = 0;
          for (auto [e, n] : routing.segments[r]) {
            CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, 2 * I, n, H, &alpha,
                                      w_gu + size_t(e) * H * 2 * I, CUDA_R_16BF, 2 * I, xs + row * H, CUDA_R_16BF, H,
                                      &beta, gu + row * 2 * I, CUDA_R_16BF, 2 * I, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            row += n;
          }
          swiglu_rows<<<std::min<int64_t>(P, 1024), 256, 0, stream>>>(gu, P, I, hs);
          row = 0;
          for (auto [e, n] : routing.segments[r]) {
            CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, H, n, I, &alpha,
                                      w_dn + size_t(e) * I * H, CUDA_R_16BF, H, hs + row * I, CUDA_R_16BF, I,
                                      &beta, ys + row * H, CUDA_R_16BF, H, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            row += n;
          }
          combine_rows<<<std::min<int64_t>(T, 1024), 256, 0, stream>>>(ys, pair_row + r * P, probs + r * P, T, k, H, out);
        }
      }) / R;
      const StreamFloor floor = time_stream_floor(stream, config.min_seconds / 2, prop.multiProcessorCount, R,
                                                  routing.mean_distinct * gate_up_expert_bytes,
                                                  routing.mean_distinct * down_expert_bytes);

      BenchRow row;
      row.backend = "cuda";
      row.shape = shape.name;
      row.path = copies[0]->path(T, k);
      row.tokens = T;
      row.bits = config.bits;
      row.time_us = ours_us;
      row.weight_bytes = routing.mean_distinct * expert_bytes;
      row.gbps = row.weight_bytes / (ours_us * 1e3);
      row.bw_fraction = row.gbps / device.bandwidth_gbps;
      row.tflops = 2.0 * P * 3 * H * I / (ours_us * 1e-6) / 1e12;
      row.gemm_fraction = row.tflops / device.gemm_tflops;
      row.baseline_time_us = base_us;
      row.speedup = base_us / ours_us;
      row.floor_us = floor.floor_us;
      row.stream_us = floor.stream_us;
      rows.push_back(row);
      std::fprintf(stderr, "cuda bench: %-14s T=%-3lld %9.2f us  %7.1f GB/s (%.0f%% of copy)  bf16 %9.2f us  x%.2f\n",
                   shape.name.c_str(), static_cast<long long>(T), ours_us, row.gbps, 100 * row.bw_fraction, base_us,
                   row.speedup);
      std::fprintf(stderr, "cuda bench:   stream floor %.2f us (%.0f%% of copy; one kernel %.2f us), ours %.2fx it\n",
                   floor.floor_us, 100 * row.weight_bytes / (floor.floor_us * 1e3) / device.bandwidth_gbps,
                   floor.stream_us, ours_us / floor.floor_us);
      std::fprintf(stderr, "cuda bench:   plan: %s\n", copies[0]->plan_summary(T, k).c_str());
    }
  }
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
  if (trace) std::fprintf(stderr, "cuda bench: wrote the block timelines to '%s'\n", config.trace_path.c_str());
  return rows;
}

}  // namespace tmoe::bench

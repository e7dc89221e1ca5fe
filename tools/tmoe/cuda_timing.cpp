// Device-side timing for the demo (CUDA builds only): CudaMoe over device-resident tensors in a
// CUDA graph, so the time is the layer's, not the host copies' or the launches'.
#include "common.hpp"

#if defined(TMOE_HAVE_CUDA)
#include <cuda_runtime_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>

#include "bench_report.hpp"
#include "tmoe/cuda.hpp"
#include "tmoe/error.hpp"

namespace tmoe::cli {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::internal, fmt::format("CUDA error in {}: {}", what, cudaGetErrorString(status)));
}
#define TMOE_CLI_CUDA(call) check_cuda((call), #call)

// Device memory released on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) { TMOE_CLI_CUDA(cudaMalloc(&data_, std::max<size_t>(bytes, 1))); }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  void* data_ = nullptr;
};

template <typename T>
void upload(const DeviceBuffer& dst, size_t offset_elements, const std::vector<T>& src) {
  TMOE_CLI_CUDA(cudaMemcpy(dst.as<T>() + offset_elements, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

// Stream, events, graph and its instance, destroyed on scope exit in reverse order.
struct GraphResources {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~GraphResources() {
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    if (stop) cudaEventDestroy(stop);
    if (start) cudaEventDestroy(start);
    if (stream) cudaStreamDestroy(stream);
  }
};

}  // namespace

CudaTiming time_cuda_forward(const MoeWeights& weights, const std::vector<RandomBatch>& batches, double min_seconds) {
  require(!batches.empty(), "time_cuda_forward: no batches");
  const int64_t tokens = batches[0].tokens, hidden = weights.gate.K;
  const int top_k = batches[0].top_k;
  const size_t routings = batches.size();
  const cuda::CudaMoe moe(weights);

  const size_t x_size = tokens * hidden, pair_size = tokens * top_k;
  DeviceBuffer x(routings * x_size * sizeof(float)), ids(routings * pair_size * sizeof(int32_t)),
      probs(routings * pair_size * sizeof(float)), out(x_size * sizeof(float));
  for (size_t r = 0; r < routings; ++r) {
    require(batches[r].tokens == tokens && batches[r].top_k == top_k, "time_cuda_forward: batches differ in shape");
    upload(x, r * x_size, batches[r].x);
    upload(ids, r * pair_size, batches[r].expert_ids);
    upload(probs, r * pair_size, batches[r].expert_probs);
  }
  const size_t workspace_bytes = moe.workspace_bytes(tokens, top_k);
  DeviceBuffer workspace(workspace_bytes);

  GraphResources g;
  TMOE_CLI_CUDA(cudaStreamCreateWithFlags(&g.stream, cudaStreamNonBlocking));
  TMOE_CLI_CUDA(cudaEventCreate(&g.start));
  TMOE_CLI_CUDA(cudaEventCreate(&g.stop));
  TMOE_CLI_CUDA(cudaStreamBeginCapture(g.stream, cudaStreamCaptureModeThreadLocal));
  try {
    for (size_t r = 0; r < routings; ++r) {
      MoeBatch b;
      b.tokens = tokens;
      b.top_k = top_k;
      b.x = x.as<float>() + r * x_size;
      b.x_dtype = DType::f32;
      b.expert_ids = ids.as<int32_t>() + r * pair_size;
      b.expert_probs = probs.as<float>() + r * pair_size;
      b.out = out.as<float>();
      b.out_dtype = DType::f32;
      moe.forward(b, workspace.as<void>(), workspace_bytes, g.stream);
    }
  } catch (...) {
    cudaStreamEndCapture(g.stream, &g.graph);
    throw;
  }
  TMOE_CLI_CUDA(cudaStreamEndCapture(g.stream, &g.graph));
  TMOE_CLI_CUDA(cudaGraphInstantiate(&g.exec, g.graph, 0));

  TMOE_CLI_CUDA(cudaGraphLaunch(g.exec, g.stream));  // warm-up
  TMOE_CLI_CUDA(cudaStreamSynchronize(g.stream));
  moe.check_errors();
  std::vector<double> per_forward;
  const auto begin = std::chrono::steady_clock::now();
  while (per_forward.size() < 5 ||
         (per_forward.size() < 1000 &&
          std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count() < min_seconds)) {
    TMOE_CLI_CUDA(cudaEventRecord(g.start, g.stream));
    TMOE_CLI_CUDA(cudaGraphLaunch(g.exec, g.stream));
    TMOE_CLI_CUDA(cudaEventRecord(g.stop, g.stream));
    TMOE_CLI_CUDA(cudaEventSynchronize(g.stop));
    float ms = 0;
    TMOE_CLI_CUDA(cudaEventElapsedTime(&ms, g.start, g.stop));
    per_forward.push_back(ms * 1e-3 / static_cast<double>(routings));
  }
  moe.check_errors();

  int device = 0, l2_bytes = 0;
  TMOE_CLI_CUDA(cudaGetDevice(&device));
  TMOE_CLI_CUDA(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  const double layer_bytes = static_cast<double>(weights.expert_bytes()) * static_cast<double>(weights.gate.experts);
  CudaTiming timing;
  timing.seconds = bench::median(per_forward);
  timing.note = fmt::format("device tensors, CUDA graph of {} forwards with different routings, median of {} replays",
                            routings, per_forward.size());
  if (layer_bytes < 2.0 * l2_bytes)
    timing.note += fmt::format(" (the {} layer fits in the {} L2: bandwidth is flattered)", format_bytes(layer_bytes),
                               format_bytes(l2_bytes));
  return timing;
}

}  // namespace tmoe::cli
#endif  // TMOE_HAVE_CUDA

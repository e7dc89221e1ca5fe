// The CUDA MoeBackend: CudaMoe over host tensors (copies in, forward, copies out, checks ids).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "../backends.hpp"
#include "cuda_check.hpp"
#include "tmoe/cuda.hpp"
#include "tmoe/error.hpp"

namespace tmoe::detail {
namespace {

// A device buffer that only grows.
class DeviceBuffer {
 public:
  ~DeviceBuffer() { cudaFree(ptr_); }
  void* get(size_t bytes) {
    if (bytes > size_) {
      cudaFree(ptr_);
      ptr_ = nullptr;
      size_ = 0;
      TMOE_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
      size_ = bytes;
    }
    return ptr_;
  }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

class CudaBackend final : public MoeBackend {
 public:
  CudaBackend(const MoeWeights& weights, const ForwardOptions& options)
      : moe_(weights, cuda::CudaMoeOptions{options.deterministic}), hidden_(weights.gate.K) {
    TMOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~CudaBackend() override { cudaStreamDestroy(stream_); }

  std::string name() const override { return "cuda"; }

  void forward(const MoeBatch& batch) override {
    if (batch.tokens < 0 || batch.top_k < 1)
      throw Error(ErrorKind::bad_input, "forward: tokens = " + std::to_string(batch.tokens) +
                                            ", top_k = " + std::to_string(batch.top_k));
    if (batch.tokens == 0) return;
    const size_t x_bytes = batch.tokens * hidden_ * dtype_size(batch.x_dtype);
    const size_t out_bytes = batch.tokens * hidden_ * dtype_size(batch.out_dtype);
    const size_t slots = batch.tokens * batch.top_k;
    const size_t ws_bytes = moe_.workspace_bytes(batch.tokens, batch.top_k);
    MoeBatch d = batch;
    d.x = x_.get(x_bytes);
    d.expert_ids = static_cast<const int32_t*>(ids_.get(slots * 4));
    d.expert_probs = static_cast<const float*>(probs_.get(slots * 4));
    d.out = out_.get(out_bytes);
    void* ws = workspace_.get(ws_bytes);
    TMOE_CUDA_CHECK(cudaMemcpyAsync(const_cast<void*>(d.x), batch.x, x_bytes, cudaMemcpyHostToDevice, stream_));
    TMOE_CUDA_CHECK(cudaMemcpyAsync(const_cast<int32_t*>(d.expert_ids), batch.expert_ids, slots * 4,
                                    cudaMemcpyHostToDevice, stream_));
    TMOE_CUDA_CHECK(cudaMemcpyAsync(const_cast<float*>(d.expert_probs), batch.expert_probs, slots * 4,
                                    cudaMemcpyHostToDevice, stream_));
    moe_.forward(d, ws, ws_bytes, stream_);
    TMOE_CUDA_CHECK(cudaMemcpyAsync(batch.out, d.out, out_bytes, cudaMemcpyDeviceToHost, stream_));
    TMOE_CUDA_CHECK(cudaStreamSynchronize(stream_));
    moe_.check_errors();
  }

 private:
  cuda::CudaMoe moe_;
  int64_t hidden_;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer x_, ids_, probs_, out_, workspace_;
};

}  // namespace

bool cuda_device_present() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

std::unique_ptr<MoeBackend> make_cuda_backend(const MoeWeights& weights, const ForwardOptions& options) {
  return std::make_unique<CudaBackend>(weights, options);
}

}  // namespace tmoe::detail

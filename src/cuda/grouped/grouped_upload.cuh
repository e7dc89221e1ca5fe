// A minimal weight upload for the grouped path's own tests and benchmark: canonical tile order
// (k_tile_stride = tiles_n * tile_bytes, n_tile_stride = tile_bytes), fp16 scales and signs, fp32
// grid. CudaMoe's own upload replaces it at integration; DeviceProjection is the shared contract.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "cuda/device_weights.cuh"
#include "cuda/fragment_layout.hpp"
#include "tmoe/error.hpp"
#include "tmoe/format.hpp"

namespace tmoe::cuda::grouped {

inline void upload_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::internal, std::string(what) + ": " + cudaGetErrorString(status));
}

// Owns the device buffers behind one DeviceProjection.
class UploadedProjection {
 public:
  explicit UploadedProjection(const TrellisTensor& t) {
    view_.experts = t.experts;
    view_.K = t.K;
    view_.N = t.N;
    view_.bits = t.bits;
    view_.group_size = t.group_size;
    view_.hadamard = t.hadamard;
    view_.n_tile_stride = tile_bytes(t.bits);
    view_.k_tile_stride = t.tiles_n() * tile_bytes(t.bits);
    view_.expert_stride = t.tiles_k() * view_.k_tile_stride;
    view_.tiles = copy(t.indices);
    view_.units = copy(pack_fragment_units(t.view()));
    view_.quads = quads_of(t.K);
    view_.scales = copy(t.scales);
    view_.su = copy(t.su);
    view_.sv = copy(t.sv);
    view_.grid = copy(t.grid);
  }
  UploadedProjection(const UploadedProjection&) = delete;
  UploadedProjection& operator=(const UploadedProjection&) = delete;
  ~UploadedProjection() {
    for (void* p : owned_) cudaFree(p);
  }
  const DeviceProjection& view() const { return view_; }

 private:
  template <typename T>
  const T* copy(const std::vector<T>& host) {
    void* device = nullptr;
    upload_check(cudaMalloc(&device, host.size() * sizeof(T) + 16), "cudaMalloc");
    owned_.push_back(device);
    upload_check(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
                 "cudaMemcpy");
    return static_cast<const T*>(device);
  }
  DeviceProjection view_;
  std::vector<void*> owned_;
};

}  // namespace tmoe::cuda::grouped

// Programmatic dependent launch (Hopper): a kernel launched with launch_dependent() may start while
// the kernel before it on the stream still runs. Its blocks do their independent prologue (derive
// their work item, prefetch weights) and call wait_for_predecessor() before they touch anything the
// predecessor writes; the predecessor calls allow_dependents() once its blocks are placed, so the
// dependents fill SM slots as they free up instead of waiting for the whole grid to drain and a new
// launch to be scheduled (a few microseconds per kernel boundary, which is most of a 1-token
// forward's fixed cost). It works inside CUDA graph capture (the edges become programmatic).
//
// Rules every kernel launched this way follows:
//   - every block calls wait_for_predecessor() before it reads or writes memory the kernels before
//     it on the stream use, and on every path before it exits (a grid whose blocks all exit without
//     waiting could complete before its predecessor, and the kernel after it would then wait on the
//     wrong grid);
//   - a kernel that reads the stream's inputs (x, expert ids) before waiting is only ever launched
//     after a kernel of ours that waited first and only then allowed its dependents.
// On devices or builds without it (sm_80, or code compiled for an architecture below 9.0) the
// helpers are no-ops and launch_dependent() is an ordinary launch: the stream serialises as usual.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <utility>
#include <vector>

#include "cuda_check.hpp"

namespace tmoe::cuda {

// Blocks until every kernel this one depends on has completed and its writes are visible.
__device__ __forceinline__ void wait_for_predecessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel on the stream launch once every block of this grid has called this (or exited).
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// True when `kernel` may be launched with programmatic stream serialisation on the current device:
// the device is sm_90 or newer AND the kernel's code was compiled for 9.0 or newer (ptxVersion), so
// its wait_for_predecessor() really waits. (A binary holding only sm_80 code runs on an H100 by
// JIT; without this check its kernels would skip the wait and race.) Cached per kernel and device.
inline bool programmatic_launch_supported(const void* kernel) {
  struct Entry {
    const void* kernel;
    int device;
    bool supported;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  TMOE_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.kernel == kernel && e.device == device) return e.supported;
  int major = 0;
  TMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attributes{};
  TMOE_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const bool supported = major >= 9 && attributes.ptxVersion >= 90;
  cache.push_back({kernel, device, supported});
  return supported;
}

// kernel<<<grid, block, shared, stream>>>(args...); with `programmatic`, allowed to start before its
// predecessor ends (see the rules above) where programmatic_launch_supported() says so. Without it
// the launch is ordinary and the kernel's wait_for_predecessor() calls return at once.
template <typename... KernelArgs, typename... Args>
void launch_dependent(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                      bool programmatic, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic && programmatic_launch_supported(reinterpret_cast<const void*>(kernel)) ? 1 : 0;
  TMOE_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace tmoe::cuda

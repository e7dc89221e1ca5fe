// The CUDA MoE layer: weights uploaded once, forward() on a stream over device pointers.
//
//   CudaMoe moe(weights);                                   // uploads (validates, throws tmoe::Error)
//   void* ws; cudaMalloc(&ws, moe.workspace_bytes(T, k));   // fixed size for up to T tokens
//   moe.forward(batch, ws, bytes, stream);                  // async; no sync, no allocation:
//                                                           // capturable in a CUDA graph
//   moe.check_errors();                                     // after the stream: bad expert ids?
//
// For few pairs per expert (the dispatcher's rule, src/cuda/dispatch.hpp; path() says which path a
// batch takes), forward() runs three kernels: device routing (counts, offsets, stable order, work
// items), the gate+up pass (SwiGLU fused in its finishing step, or, when the pass is one wave of
// blocks and gate and up have no Hadamard, in the down pass's staging of its input: no finishing
// blocks at the end of gate+up) and the down pass, whose finishing step also does the fixed-order
// combine over the k slots of each token. Passes of one wave are
// chained with programmatic dependent launch (sm_90), and with <= 64 pairs their blocks derive
// their work items from the ids themselves, so they start before routing ends. With
// `fused_decode` a 1-token batch runs routing and ONE kernel instead (src/cuda/fused_decode.cuh).
// Results are bitwise repeatable whatever `deterministic` says (all float reductions run in a fixed order, the only
// atomics count integers). Larger batches feed the routing to the tensor-core grouped path
// (src/cuda/grouped/), which honours `deterministic` (default off: it is faster with atomics).
// Weights: the indices are stored once, in the fragment layout (src/cuda/fragment_layout.hpp)
// that every tensor-core kernel reads; a projection with a custom (non-affine) grid also keeps the
// tile layout for the CUDA-core decode kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "tmoe/moe.hpp"

namespace tmoe::cuda {

struct DeviceProjection;  // src/cuda/device_weights.cuh: the view every kernel path reads

struct CudaMoeOptions {
  // Bitwise repeatable results. The decode / small-batch path is deterministic either way (fixed
  // reduction order, integer counters only); the grouped path uses float atomics unless this is set.
  bool deterministic = false;
  // forward() hands batches of at least this many tokens to the tensor-core grouped path
  // (src/cuda/grouped/); smaller ones run the decode / small-batch kernels. -1 (the default):
  // the dispatcher decides from the expected pairs per expert (src/cuda/dispatch.hpp).
  int64_t grouped_min_tokens = -1;
  // One-token batches run the one-launch decode (src/cuda/fused_decode.cuh: one kernel streams
  // every weight of the forward, no K splits) where the layer allows it (affine grids, no
  // Hadamard, top_k <= 16) and the device has sm_90. Off by default: on H100 it is still slower
  // than the two projection passes (docs/notes-cuda.md, "v18" and "v19"). The environment variable
  // TMOE_FUSED_DECODE=1 or =0 overrides this (A/B timing).
  bool fused_decode = false;
};

class CudaMoe {
 public:
  // Uploads gate, up and down to the current device. Throws tmoe::Error (bad input) for shapes the
  // kernels do not take: K or N not a multiple of 16, Hadamard blocks over 256, more than 4096
  // experts.
  explicit CudaMoe(const MoeWeights& weights, const CudaMoeOptions& options = {});
  ~CudaMoe();
  CudaMoe(const CudaMoe&) = delete;
  CudaMoe& operator=(const CudaMoe&) = delete;

  MoeShape shape() const;       // hidden, intermediate, experts (top_k 0: it is per call)
  int64_t device_bytes() const;  // bytes of the uploaded weights (one copy of the indices; two for
                                 // projections with custom grids, which the CUDA-core kernel reads)

  // The kernel path forward() takes for this batch size: "decode", "small-batch" or "grouped".
  const char* path(int64_t tokens, int top_k) const;
  // One line on the launches forward() makes for this batch size (for benchmarks and tuning): the
  // path, rows per work item, and per pass its K splits, k-tiles per block, blocks per SM and
  // shared memory per block; for the grouped path, its GEMM kernel and tile height.
  std::string plan_summary(int64_t tokens, int top_k) const;

  // Workspace forward() needs for up to `tokens` tokens with `top_k` slots each.
  size_t workspace_bytes(int64_t tokens, int top_k) const;

  // out = MoE(x) for the device tensors of `batch`, enqueued on `stream`. Host-side checks only
  // (throws tmoe::Error on a bad batch or a too small workspace); nothing waits for the device.
  // Expert ids outside [0, E) other than -1 are skipped and flagged: check_errors() reports them.
  void forward(const MoeBatch& batch, void* workspace, size_t workspace_bytes,
               cudaStream_t stream) const;

  // Waits for the device, then throws tmoe::Error (bad input) if any forward() since the last
  // check saw an expert id outside [0, E) other than -1, and clears the flag.
  void check_errors() const;

  // The uploaded projections (for other kernel paths, e.g. src/cuda/grouped/).
  const DeviceProjection& gate() const;
  const DeviceProjection& up() const;
  const DeviceProjection& down() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tmoe::cuda

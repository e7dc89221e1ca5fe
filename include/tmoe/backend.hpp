// Backends behind one small interface. Each backend object owns whatever it needs between calls
// (uploaded weights, workspace), so forward() allocates nothing per call.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "tmoe/moe.hpp"

namespace tmoe {

enum class BackendKind { reference, cpu, cuda };
BackendKind parse_backend(std::string_view name);  // "reference" | "cpu" | "cuda"; throws otherwise
const char* backend_name(BackendKind kind);

struct ForwardOptions {
  // Bitwise repeatable results (fixed-order reductions, no float atomics). The CPU backend is
  // always deterministic; CUDA honours this flag.
  bool deterministic = false;
  int threads = 0;  // CPU threads; 0: all cores
};

class MoeBackend {
 public:
  virtual ~MoeBackend() = default;
  virtual std::string name() const = 0;
  // Runs the layer on host tensors (MoeBatch with host pointers). Blocks until done.
  virtual void forward(const MoeBatch& batch) = 0;
};

// The reference backend reads `weights` in place, so they must outlive it; the cpu and cuda
// backends keep their own (repacked / uploaded) copy and need them only during this call.
std::unique_ptr<MoeBackend> make_backend(BackendKind kind, const MoeWeights& weights,
                                         const ForwardOptions& options = {});

bool cuda_available();            // compiled with CUDA and a device is present
BackendKind best_backend();       // cuda if available, else cpu

}  // namespace tmoe

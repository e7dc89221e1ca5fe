// Placeholder until the CUDA backend lands (issue 4).
#include <cuda_runtime.h>

#include "../backends.hpp"
#include "tmoe/error.hpp"

namespace tmoe::detail {
bool cuda_device_present() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}
std::unique_ptr<MoeBackend> make_cuda_backend(const MoeWeights&, const ForwardOptions&) {
  throw Error(ErrorKind::internal, "the cuda backend is not built yet");
}
}  // namespace tmoe::detail

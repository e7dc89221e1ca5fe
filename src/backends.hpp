// Internal: one factory per backend, each defined in its own folder.
#pragma once

#include <memory>

#include "tmoe/backend.hpp"

namespace tmoe::detail {

std::unique_ptr<MoeBackend> make_reference_backend(const MoeWeights& weights, const ForwardOptions& options);
std::unique_ptr<MoeBackend> make_cpu_backend(const MoeWeights& weights, const ForwardOptions& options);
#if defined(TMOE_HAVE_CUDA)
std::unique_ptr<MoeBackend> make_cuda_backend(const MoeWeights& weights, const ForwardOptions& options);
bool cuda_device_present();
#endif

}  // namespace tmoe::detail

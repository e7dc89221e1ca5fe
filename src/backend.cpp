#include "backends.hpp"

#include "tmoe/error.hpp"

namespace tmoe {

BackendKind parse_backend(std::string_view name) {
  if (name == "reference") return BackendKind::reference;
  if (name == "cpu") return BackendKind::cpu;
  if (name == "cuda") return BackendKind::cuda;
  fail("unknown backend '{}' (known: reference, cpu, cuda)", name);
}

const char* backend_name(BackendKind kind) {
  switch (kind) {
    case BackendKind::reference: return "reference";
    case BackendKind::cpu: return "cpu";
    case BackendKind::cuda: return "cuda";
  }
  return "?";
}

bool cuda_available() {
#if defined(TMOE_HAVE_CUDA)
  return detail::cuda_device_present();
#else
  return false;
#endif
}

BackendKind best_backend() { return cuda_available() ? BackendKind::cuda : BackendKind::cpu; }

std::unique_ptr<MoeBackend> make_backend(BackendKind kind, const MoeWeights& weights,
                                         const ForwardOptions& options) {
  weights.validate();
  switch (kind) {
    case BackendKind::reference: return detail::make_reference_backend(weights, options);
    case BackendKind::cpu: return detail::make_cpu_backend(weights, options);
    case BackendKind::cuda:
#if defined(TMOE_HAVE_CUDA)
      require(detail::cuda_device_present(), "the cuda backend needs a CUDA device; none was found");
      return detail::make_cuda_backend(weights, options);
#else
      fail("this build of tmoe has no CUDA backend (configure with TMOE_CUDA=ON where nvcc exists)");
#endif
  }
  fail("unknown backend");
}

}  // namespace tmoe

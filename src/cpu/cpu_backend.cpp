// Placeholder until the CPU backend lands (issue 3): keeps the build linking.
#include "../backends.hpp"
#include "tmoe/error.hpp"

namespace tmoe::detail {
std::unique_ptr<MoeBackend> make_cpu_backend(const MoeWeights&, const ForwardOptions&) {
  throw Error(ErrorKind::internal, "the cpu backend is not built yet");
}
}  // namespace tmoe::detail

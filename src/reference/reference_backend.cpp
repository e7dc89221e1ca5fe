#include <vector>

#include "../backends.hpp"

namespace tmoe::detail {
namespace {

class ReferenceBackend final : public MoeBackend {
 public:
  explicit ReferenceBackend(const MoeWeights& weights) : weights_(weights) {}
  std::string name() const override { return "reference"; }

  void forward(const MoeBatch& b) override {
    const int64_t H = weights_.gate.K;
    std::vector<float> x(b.tokens * H);
    for (int64_t i = 0; i < b.tokens * H; ++i) x[i] = load_as_float(b.x, i, b.x_dtype);
    const size_t pairs = static_cast<size_t>(b.tokens * b.top_k);
    const auto out = reference_forward(weights_, b.tokens, x, {b.expert_ids, pairs},
                                       {b.expert_probs, pairs});
    for (int64_t i = 0; i < b.tokens * H; ++i) store_from_float(b.out, i, b.out_dtype, float(out[i]));
  }

 private:
  const MoeWeights& weights_;
};

}  // namespace

std::unique_ptr<MoeBackend> make_reference_backend(const MoeWeights& weights, const ForwardOptions&) {
  return std::make_unique<ReferenceBackend>(weights);
}

}  // namespace tmoe::detail

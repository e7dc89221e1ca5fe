// The fp64 reference: plain loops anyone can read, computing FORMAT.md's formula
//   y = T( T(x . su) . Q ) . sv   per projection, then the SwiGLU MoE combine.
#include <algorithm>
#include <cmath>
#include <limits>

#include "tmoe/error.hpp"
#include "tmoe/hadamard.hpp"
#include "tmoe/moe.hpp"
#include "tmoe/routing.hpp"

namespace tmoe {
namespace {

std::vector<double> decode_q(const TrellisTensor& t, int64_t e) {
  std::vector<double> q(t.K * t.N);
  tmoe::decode_q(t, e, q);
  return q;
}

// y = T(T(x . su) . Q) . sv for one vector x of length K.
std::vector<double> apply(const TrellisTensor& t, int64_t e, const std::vector<double>& q,
                          std::vector<double> x) {
  const TrellisView v = t.view();
  for (int64_t k = 0; k < t.K; ++k) x[k] *= half_to_float(v.expert_su(e)[k]);
  if (t.hadamard) block_hadamard(x.data(), t.K, t.hadamard);
  std::vector<double> y(t.N, 0.0);
  for (int64_t k = 0; k < t.K; ++k)
    for (int64_t n = 0; n < t.N; ++n) y[n] += x[k] * q[k * t.N + n];
  if (t.hadamard) block_hadamard(y.data(), t.N, t.hadamard);
  for (int64_t n = 0; n < t.N; ++n) y[n] *= half_to_float(v.expert_sv(e)[n]);
  return y;
}

}  // namespace

std::vector<double> reference_forward(const MoeWeights& weights, int64_t tokens,
                                      std::span<const float> x, std::span<const int32_t> expert_ids,
                                      std::span<const float> expert_probs) {
  weights.validate();
  const MoeShape shape = weights.shape();
  const int64_t H = shape.hidden, I = shape.intermediate;
  require(x.size() == static_cast<size_t>(tokens * H), "x holds {} values, tokens x hidden = {}",
          x.size(), tokens * H);
  require(expert_probs.size() == expert_ids.size(), "expert_probs holds {}, expert_ids {}",
          expert_probs.size(), expert_ids.size());
  require(tokens > 0 ? expert_ids.size() % tokens == 0 && !expert_ids.empty() : expert_ids.empty(),
          "expert_ids holds {} ids, not a multiple of {} tokens", expert_ids.size(), tokens);
  const int top_k = tokens ? static_cast<int>(expert_ids.size() / tokens) : 1;
  const RoutingPlan plan = make_routing_plan(expert_ids, tokens, top_k, shape.experts);

  // Contribution of each (token, slot) pair, summed afterwards in slot order.
  std::vector<double> pair_out(tokens * top_k * H, 0.0);
#pragma omp parallel for schedule(dynamic, 1)
  for (int e = 0; e < shape.experts; ++e) {
    if (plan.counts[e] == 0) continue;
    const auto gate_q = decode_q(weights.gate, e), up_q = decode_q(weights.up, e),
               down_q = decode_q(weights.down, e);
    for (int32_t slot = plan.offsets[e]; slot < plan.offsets[e + 1]; ++slot) {
      const int32_t pair = plan.order[slot];
      const int64_t t = pair / top_k;
      std::vector<double> xt(x.begin() + t * H, x.begin() + (t + 1) * H);
      const auto g = apply(weights.gate, e, gate_q, xt);
      const auto u = apply(weights.up, e, up_q, xt);
      std::vector<double> h(I);
      for (int64_t i = 0; i < I; ++i) h[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      const auto d = apply(weights.down, e, down_q, h);
      for (int64_t c = 0; c < H; ++c) pair_out[pair * H + c] = expert_probs[pair] * d[c];
    }
  }
  std::vector<double> out(tokens * H, 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < top_k; ++j)
      for (int64_t c = 0; c < H; ++c) out[t * H + c] += pair_out[(t * top_k + j) * H + c];
  return out;
}

double relative_error(std::span<const float> a, std::span<const double> ref) {
  require(a.size() == ref.size(), "relative_error: sizes {} and {} differ", a.size(), ref.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    diff += (a[i] - ref[i]) * (a[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  if (norm == 0) return diff == 0 ? 0 : std::numeric_limits<double>::infinity();
  return std::sqrt(diff / norm);
}

}  // namespace tmoe

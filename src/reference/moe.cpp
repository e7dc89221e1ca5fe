#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <random>

#include "tmoe/error.hpp"
#include "tmoe/moe.hpp"

namespace tmoe {

std::span<const MoeShape> model_shapes() {
  static const std::array<MoeShape, 4> shapes = {{
      {"qwen3-30b-a3b", 2048, 768, 128, 8},
      {"mixtral-8x7b", 4096, 14336, 8, 2},
      {"deepseek-v3", 7168, 2048, 256, 8},
      {"glm-4.5-air", 4096, 1408, 128, 8},
  }};
  return shapes;
}

MoeShape model_shape(std::string_view name) {
  std::string known;
  for (const MoeShape& s : model_shapes()) {
    if (s.name == name) return s;
    known += (known.empty() ? "" : ", ") + s.name;
  }
  fail("unknown shape '{}' (known: {})", name, known);
}

MoeShape MoeWeights::shape() const {
  return MoeShape{"custom", gate.K, gate.N, static_cast<int>(gate.experts), 0};
}

void MoeWeights::validate() const {
  gate.validate();
  up.validate();
  down.validate();
  require(gate.experts == up.experts && gate.experts == down.experts,
          "gate, up and down have {}, {} and {} experts", gate.experts, up.experts, down.experts);
  require(gate.K == up.K && gate.N == up.N, "gate is {}x{} but up is {}x{}", gate.K, gate.N, up.K,
          up.N);
  require(down.K == gate.N && down.N == gate.K,
          "down is {}x{}, expected intermediate x hidden = {}x{}", down.K, down.N, gate.N, gate.K);
}

namespace {

TrellisTensor random_tensor(int64_t experts, int64_t K, int64_t N, int bits,
                            const SyntheticLayerOptions& o, std::mt19937_64& rng) {
  TrellisTensor t = TrellisTensor::zeros(experts, K, N, bits, o.group_size, o.hadamard);
  if (o.custom_grid) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& g : t.grid) g = normal(rng);
    std::sort(t.grid.begin(), t.grid.end());
  }
  // Random indices everywhere, then zero the positions outside K x N (FORMAT.md).
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : t.indices) b = static_cast<uint8_t>(byte(rng));
  if (K % kTileDim || N % kTileDim) {
    std::vector<uint8_t> idx(K * N);
    std::vector<uint8_t> packed(t.tiles_k() * t.tiles_n() * tile_bytes(bits));
    for (int64_t e = 0; e < experts; ++e) {
      std::span<uint8_t> mine(t.indices.data() + e * packed.size(), packed.size());
      unpack_indices(mine, K, N, bits, idx);
      pack_indices(idx, K, N, bits, mine);
    }
  }
  // Scales near 1/sqrt(K) keep every projection's outputs O(1) for O(1) inputs.
  std::uniform_real_distribution<float> scale(0.5f, 1.5f);
  const float base = 1.0f / std::sqrt(static_cast<float>(K));
  for (uint16_t& s : t.scales) s = float_to_half(base * scale(rng));
  std::bernoulli_distribution coin(0.5);
  for (uint16_t& s : t.su) s = float_to_half(coin(rng) ? 1.0f : -1.0f);
  for (uint16_t& s : t.sv) s = float_to_half(coin(rng) ? 1.0f : -1.0f);
  return t;
}

}  // namespace

int64_t SyntheticRouting::distinct_experts() const {
  std::vector<int32_t> ids;
  for (int32_t id : expert_ids)
    if (id >= 0) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return std::unique(ids.begin(), ids.end()) - ids.begin();
}

SyntheticRouting random_routing(int64_t tokens, int top_k, int experts, std::mt19937_64& rng,
                                double skip_probability) {
  require(top_k >= 1 && top_k <= experts, "top-k {} must be between 1 and the {} experts", top_k, experts);
  require(tokens >= 0 && skip_probability >= 0 && skip_probability <= 1,
          "bad routing request: tokens={} skip_probability={}", tokens, skip_probability);
  SyntheticRouting r;
  r.expert_ids.resize(tokens * top_k);
  r.expert_probs.resize(tokens * top_k);
  std::vector<int32_t> all(experts);
  std::iota(all.begin(), all.end(), 0);
  std::normal_distribution<double> logit(0.0, 1.0);
  std::bernoulli_distribution skip(skip_probability);
  std::vector<double> weight(top_k);
  for (int64_t t = 0; t < tokens; ++t) {
    double sum = 0;
    for (int j = 0; j < top_k; ++j) {
      std::uniform_int_distribution<int> pick(j, experts - 1);
      std::swap(all[j], all[pick(rng)]);
      sum += weight[j] = std::exp(logit(rng));
    }
    for (int j = 0; j < top_k; ++j) {
      r.expert_ids[t * top_k + j] = skip(rng) ? -1 : all[j];
      r.expert_probs[t * top_k + j] = static_cast<float>(weight[j] / sum);
    }
  }
  return r;
}

MoeWeights random_moe_weights(const MoeShape& shape, const SyntheticLayerOptions& options) {
  require(shape.hidden > 0 && shape.intermediate > 0 && shape.experts > 0,
          "bad MoE shape: hidden={} intermediate={} experts={}", shape.hidden, shape.intermediate,
          shape.experts);
  std::mt19937_64 rng(options.seed);
  MoeWeights w;
  w.gate = random_tensor(shape.experts, shape.hidden, shape.intermediate, options.gate_bits, options, rng);
  w.up = random_tensor(shape.experts, shape.hidden, shape.intermediate, options.up_bits, options, rng);
  w.down = random_tensor(shape.experts, shape.intermediate, shape.hidden, options.down_bits, options, rng);
  return w;
}

}  // namespace tmoe

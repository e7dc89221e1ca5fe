// A Mixture-of-Experts feed-forward layer over Trellis weights, and its fp64 reference.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tmoe/format.hpp"
#include "tmoe/half.hpp"

namespace tmoe {

struct MoeShape {
  std::string name;          // "qwen3-30b-a3b", ... or "custom"
  int64_t hidden = 0;        // H
  int64_t intermediate = 0;  // I (per expert)
  int experts = 0;           // E
  int top_k = 0;             // k
};

// The shapes we measure on (DESIGN.md).
std::span<const MoeShape> model_shapes();
// Looks a shape up by name; throws tmoe::Error listing the known names if there is none.
MoeShape model_shape(std::string_view name);

// gate, up: E x (H -> I); down: E x (I -> H). Bits, group size, grid and Hadamard may differ.
struct MoeWeights {
  TrellisTensor gate, up, down;

  MoeShape shape() const;  // read off the tensors (name "custom")
  // Throws tmoe::Error (bad input) if the three tensors do not form one MoE layer.
  void validate() const;
  // Bytes a kernel must read for one expert (all three projections).
  int64_t expert_bytes() const { return gate.expert_bytes() + up.expert_bytes() + down.expert_bytes(); }
};

// Options for making a synthetic layer (tests, demo, bench).
struct SyntheticLayerOptions {
  int gate_bits = 3, up_bits = 3, down_bits = 3;
  int group_size = 128;
  int hadamard = 0;
  bool custom_grid = false;  // a random non-uniform sorted grid instead of the default one
  uint64_t seed = 1;
};

// A layer with uniformly random indices, scales ~ 1/sqrt(K) (so activations stay O(1)), random
// +-1 signs. Much faster than quantizing random weights; the decoded weights are as varied.
MoeWeights random_moe_weights(const MoeShape& shape, const SyntheticLayerOptions& options);

// Synthetic routing (tests, demo, benchmarks): each token's k slots get k distinct experts drawn
// uniformly (a partial Fisher-Yates shuffle) and positive probabilities summing to 1 (softmax of
// normal logits); with skip_probability > 0, each slot is -1 (no expert) with that probability.
struct SyntheticRouting {
  std::vector<int32_t> expert_ids;  // [T, k]
  std::vector<float> expert_probs;  // [T, k]
  int64_t distinct_experts() const;  // experts selected by at least one slot
};
SyntheticRouting random_routing(int64_t tokens, int top_k, int experts, std::mt19937_64& rng,
                                double skip_probability = 0.0);

// One forward call's tensors. Pointers are host pointers for host backends and device pointers for
// CudaMoe::forward_device.
struct MoeBatch {
  int64_t tokens = 0;
  int top_k = 0;                         // k: slots per token
  const void* x = nullptr;               // [T, H], x_dtype
  DType x_dtype = DType::f32;
  const int32_t* expert_ids = nullptr;   // [T, k], -1 = no expert for this slot
  const float* expert_probs = nullptr;   // [T, k]
  void* out = nullptr;                   // [T, H], out_dtype
  DType out_dtype = DType::f32;
};

// out[t] = sum_j p[t,j] * down_e(silu(gate_e(x[t])) * up_e(x[t])) in fp64 from the decoded weights,
// with T applied as FORMAT.md says. Returns [T, H]. The oracle of every test.
// Throws tmoe::Error on ids outside [0, E) other than -1.
std::vector<double> reference_forward(const MoeWeights& weights, int64_t tokens,
                                      std::span<const float> x, std::span<const int32_t> expert_ids,
                                      std::span<const float> expert_probs);

// Relative Frobenius error ||a - ref|| / ||ref|| (inf if any value of `a` is not finite).
double relative_error(std::span<const float> a, std::span<const double> ref);

}  // namespace tmoe

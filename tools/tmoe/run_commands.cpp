// tmoe run | verify: one layer of a Trellis model on given or random tokens.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstring>
#include <limits>
#include <memory>
#include <random>

#include "common.hpp"
#include "tmoe/error.hpp"
#include "tmoe/io.hpp"

namespace tmoe::cli {
namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

// The named tensor of the input file, which must exist with the given rank.
const TensorInfo& input_tensor(const SafetensorsReader& file, const std::string& name, size_t rank,
                               const std::string& expected) {
  const TensorInfo* t = file.find(name);
  require(t != nullptr, "input '{}' has no tensor '{}' (expected {})", file.path().string(), name, expected);
  require(t->shape.size() == rank, "input tensor '{}' has shape {}, expected {}", name, shape_text(t->shape),
          expected);
  return *t;
}

// Copies a tensor's bytes into typed, aligned storage (the mapped file may not be aligned).
template <typename T>
std::vector<T> copy_values(const SafetensorsReader& file, const TensorInfo& t) {
  const std::span<const uint8_t> bytes = file.bytes(t);
  std::vector<T> values(bytes.size() / sizeof(T));
  if (!values.empty()) std::memcpy(values.data(), bytes.data(), values.size() * sizeof(T));
  return values;
}

// ---- run

struct RunCommand {
  std::string model, input, output;
  int layer = -1;
  std::string backend = "auto";
  bool deterministic = false;
  int threads = 0;
};

void run_layer(const RunCommand& c) {
  const QuantizedModel model(c.model);
  const MoeWeights weights = model.load_layer(c.layer);
  const MoeShape shape = weights.shape();
  const SafetensorsReader input(c.input);

  const std::string x_expected = fmt::format("[tokens, {}] F32, F16 or BF16", shape.hidden);
  const TensorInfo& x = input_tensor(input, "x", 2, x_expected);
  DType x_dtype = DType::f32;
  switch (x.dtype) {
    case TensorDType::F32: x_dtype = DType::f32; break;
    case TensorDType::F16: x_dtype = DType::f16; break;
    case TensorDType::BF16: x_dtype = DType::bf16; break;
    default: fail("input tensor 'x' is {}, expected {}", tensor_dtype_name(x.dtype), x_expected);
  }
  require(x.shape[1] == shape.hidden, "input tensor 'x' has shape {}, expected {} (the layer's hidden size is {})",
          shape_text(x.shape), x_expected, shape.hidden);
  const int64_t tokens = x.shape[0];

  const std::string ids_expected = fmt::format("[{}, top_k] I32", tokens);
  const TensorInfo& ids = input_tensor(input, "expert_ids", 2, ids_expected);
  require(ids.dtype == TensorDType::I32, "input tensor 'expert_ids' is {}, expected {}", tensor_dtype_name(ids.dtype),
          ids_expected);
  require(ids.shape[0] == tokens && ids.shape[1] >= 1, "input tensor 'expert_ids' has shape {}, expected {}",
          shape_text(ids.shape), ids_expected);
  const int top_k = static_cast<int>(ids.shape[1]);
  const std::string probs_expected = fmt::format("[{}, {}] F32 (like expert_ids)", tokens, top_k);
  const TensorInfo& probs = input_tensor(input, "expert_probs", 2, probs_expected);
  require(probs.dtype == TensorDType::F32 && probs.shape == ids.shape,
          "input tensor 'expert_probs' is {} {}, expected {}", tensor_dtype_name(probs.dtype), shape_text(probs.shape),
          probs_expected);

  std::vector<uint8_t> x_bytes = copy_values<uint8_t>(input, x);
  const std::vector<int32_t> expert_ids = copy_values<int32_t>(input, ids);
  const std::vector<float> expert_probs = copy_values<float>(input, probs);
  for (size_t i = 0; i < expert_ids.size(); ++i) {
    const int32_t id = expert_ids[i];
    require(id >= -1 && id < shape.experts, "expert_ids[{}, {}] = {} is outside [0, {}) (and not -1)", i / top_k,
            i % top_k, id, shape.experts);
  }

  ForwardOptions options;
  options.deterministic = c.deterministic;
  options.threads = c.threads;
  const BackendKind kind = backend_from_option(c.backend);
  const std::unique_ptr<MoeBackend> backend = make_backend(kind, weights, options);
  // NaN-filled: an element the backend fails to write shows up in the output instead of a stale value.
  std::vector<float> out(tokens * shape.hidden, std::numeric_limits<float>::quiet_NaN());
  MoeBatch batch;
  batch.tokens = tokens;
  batch.top_k = top_k;
  batch.x = x_bytes.data();
  batch.x_dtype = x_dtype;
  batch.expert_ids = expert_ids.data();
  batch.expert_probs = expert_probs.data();
  batch.out = out.data();
  batch.out_dtype = DType::f32;
  backend->forward(batch);

  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.add("out", TensorDType::F32, {tokens, shape.hidden}, std::span<const float>(out));
  writer.write(c.output);
  fmt::print("layer {}: {} tokens x top-{} on {} -> '{}' (out [{}, {}] F32)\n", c.layer, tokens, top_k,
             backend->name(), c.output, tokens, shape.hidden);
}

// ---- verify

struct VerifyCommand {
  std::string model;
  int layer = -1;  // -1: all
  int64_t tokens = 16;
  int top_k = 0;   // 0: min(8, experts)
  std::string backend = "auto";
  bool deterministic = false;
  uint64_t seed = 0;
};

void run_verify(const VerifyCommand& c) {
  const QuantizedModel model(c.model);
  std::vector<int> layers = model.layers();
  if (c.layer >= 0) layers = {c.layer};
  require(!layers.empty(), "model '{}' has no layers", c.model);
  const BackendKind kind = backend_from_option(c.backend);
  const double bound = error_bound(kind);
  const uint64_t seed = c.seed ? c.seed : std::random_device{}();
  std::mt19937_64 rng(seed);
  fmt::print("verify: backend {} vs the fp64 reference, {} random tokens per layer, bound {:.0e}, seed {}\n",
             backend_name(kind), c.tokens, bound, seed);
  ForwardOptions options;
  options.deterministic = c.deterministic;
  int failures = 0;
  for (int layer : layers) {
    const MoeWeights weights = model.load_layer(layer);
    const MoeShape shape = weights.shape();
    const int top_k = c.top_k > 0 ? c.top_k : std::min(8, shape.experts);
    const RandomBatch batch = random_batch(c.tokens, shape.hidden, shape.experts, top_k, rng);
    std::vector<float> out(c.tokens * shape.hidden, std::numeric_limits<float>::quiet_NaN());
    make_backend(kind, weights, options)->forward(batch.batch(out.data()));
    const std::vector<double> ref = reference_forward(weights, c.tokens, batch.x, batch.expert_ids, batch.expert_probs);
    const double error = relative_error(out, ref);
    const bool ok = error <= bound;
    failures += !ok;
    fmt::print("layer {}: relative error {:.3e} {}\n", layer, error, ok ? "ok" : "ABOVE BOUND");
    std::fflush(stdout);
  }
  if (failures)
    throw Error(ErrorKind::bad_input, fmt::format("{} of {} layers above the error bound {:.0e} on backend {}",
                                                  failures, layers.size(), bound, backend_name(kind)));
}

}  // namespace

void register_run_commands(CLI::App& app) {
  auto r = std::make_shared<RunCommand>();
  CLI::App* run = app.add_subcommand("run", "Run one MoE layer of a Trellis model on tokens from a safetensors file");
  run->add_option("model", r->model, "model directory")->required();
  run->add_option("--layer", r->layer, "layer number")->required()->check(CLI::NonNegativeNumber);
  run->add_option("--input", r->input,
                  "safetensors with x [T, H] (F32/F16/BF16), expert_ids [T, k] (I32, -1: none), expert_probs [T, k] (F32)")
      ->required();
  run->add_option("--output", r->output, "safetensors file to write: out [T, H] F32")->required();
  run->add_option("--backend", r->backend, "auto, reference, cpu or cuda")
      ->check(CLI::IsMember({"auto", "reference", "cpu", "cuda"}))
      ->capture_default_str();
  run->add_flag("--deterministic", r->deterministic, "bitwise repeatable results (CUDA; the CPU always is)");
  run->add_option("--threads", r->threads, "CPU threads (0: all cores)")->check(CLI::NonNegativeNumber);
  run->callback([r] { run_layer(*r); });

  auto v = std::make_shared<VerifyCommand>();
  CLI::App* verify = app.add_subcommand("verify", "Check a backend against the fp64 reference on random tokens");
  verify->add_option("model", v->model, "model directory")->required();
  verify->add_option("--layer", v->layer, "layer number (default: every layer)")->check(CLI::NonNegativeNumber);
  verify->add_option("--tokens", v->tokens, "random tokens per layer")->check(CLI::PositiveNumber)->capture_default_str();
  verify->add_option("--top-k", v->top_k, "experts per token (default: min(8, experts))")->check(CLI::PositiveNumber);
  verify->add_option("--backend", v->backend, "auto, reference, cpu or cuda")
      ->check(CLI::IsMember({"auto", "reference", "cpu", "cuda"}))
      ->capture_default_str();
  verify->add_flag("--deterministic", v->deterministic, "bitwise repeatable results (CUDA)");
  verify->add_option("--seed", v->seed, "random seed (0: a fresh one, printed)");
  verify->callback([v] { run_verify(*v); });
}

}  // namespace tmoe::cli

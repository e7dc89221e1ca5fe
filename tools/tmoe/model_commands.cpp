// tmoe quantize | inspect | dequantize: Hugging Face checkpoint -> Trellis model -> fp32 again.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <filesystem>
#include <memory>

#include "common.hpp"
#include "tmoe/error.hpp"
#include "tmoe/io.hpp"
#include "tmoe/quantize.hpp"

namespace tmoe::cli {
namespace {

const char* const kProjections[] = {"gate", "up", "down"};

TrellisTensor& projection(MoeWeights& w, int p) { return p == 0 ? w.gate : p == 1 ? w.up : w.down; }

// ---- quantize

struct QuantizeCommand {
  std::string in, out;
  int bits = 3;
  int group_size = 128;
  int hadamard = 0;
  std::string grid = "uniform";
  int threads = 0;
};

void run_quantize(const QuantizeCommand& c) {
  const HfCheckpoint checkpoint(c.in);
  const std::vector<int> layers = checkpoint.layers();
  require(!layers.empty(), "no MoE expert weights found in '{}' (expected names like "
          "model.layers.0.mlp.experts.0.gate_proj.weight or "
          "model.layers.0.block_sparse_moe.experts.0.w1.weight)", c.in);
  QuantizeOptions options;
  options.bits = c.bits;
  options.group_size = c.group_size;
  options.hadamard = c.hadamard;
  options.grid = c.grid == "fit" ? GridKind::fit : GridKind::uniform;
  options.threads = c.threads;

  int64_t total_experts = 0;  // progress unit: one expert of one projection
  for (int layer : layers) total_experts += 3 * checkpoint.layer_shape(layer).experts;
  fmt::print("quantizing {} MoE layers of '{}' to {} bits (group size {}, hadamard {}, grid {}) into '{}'\n",
             layers.size(), c.in, c.bits, c.group_size, c.hadamard, c.grid, c.out);
  std::fflush(stdout);

  ProgressBar progress(total_experts);
  int64_t experts_done = 0, bytes_written = 0, weights_written = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const int layer = layers[l];
    MoeWeights weights;
    for (int p = 0; p < 3; ++p) {
      const char* name = kProjections[p];
      const HfCheckpoint::ProjectionShape s = checkpoint.projection_shape(layer, name);
      const std::string label = fmt::format("layer {} ({}/{}) {}", layer, l + 1, layers.size(), name);
      progress.update(experts_done, label + ": loading");
      // Streamed a chunk of experts at a time: a projection's fp32 weights (DeepSeek-V3: 15 GB)
      // never sit in memory at once.
      const ExpertLoader load = [&](int64_t first, int64_t count, std::span<float> out) {
        checkpoint.load_experts(layer, name, first, count, out);
      };
      QuantizeReport report;
      try {
        projection(weights, p) =
            quantize(load, s.experts, s.K, s.N, options, &report, [&](int64_t done, int64_t total) {
              progress.update(experts_done + done, fmt::format("{}: expert {}/{}", label, done, total));
            });
      } catch (const Error& e) {  // say which tensor the options do not fit
        throw Error(e.kind(), fmt::format("layer {} {} [{} x {} x {}]: {}", layer, name, s.experts, s.K, s.N, e.what()));
      }
      experts_done += s.experts;
      progress.clear();
      fmt::print("{}  [{} x {} x {}]  rel. error {:.4f}  SQNR {:.2f} dB\n", stacked_name(layer, name), s.experts,
                 s.K, s.N, report.relative_error, report.sqnr_db);
      std::fflush(stdout);
      weights_written += s.experts * s.K * s.N;
    }
    progress.update(experts_done, fmt::format("layer {} ({}/{}): writing", layer, l + 1, layers.size()));
    save_quantized_layer(c.out, layer, weights);
    bytes_written += weights.expert_bytes() * weights.gate.experts;
  }
  progress.finish();
  fmt::print("wrote {} layers to '{}': {} of expert weights, {:.3f} bits per weight\n", layers.size(), c.out,
             format_bytes(static_cast<double>(bytes_written)),
             8.0 * static_cast<double>(bytes_written) / static_cast<double>(weights_written));
}

// ---- inspect

void run_inspect(const std::string& dir) {
  const QuantizedModel model(dir);
  const std::vector<QuantizedModel::TensorSummary> tensors = model.summary();
  size_t name_width = 6;
  for (const auto& t : tensors) name_width = std::max(name_width, t.name.size());
  fmt::print("model '{}': {} MoE layers, {} stacked tensors\n", dir, model.layers().size(), tensors.size());
  fmt::print("{:<{}}  {:>7}  {:>6}  {:>6}  {:>4}  {:>5}  {:>8}  {:>12}  {:>11}\n", "tensor", name_width, "experts", "K",
             "N", "bits", "group", "hadamard", "bytes", "bits/weight");
  double total_bytes = 0, total_weights = 0;
  for (const auto& t : tensors) {
    const double weights = static_cast<double>(t.experts) * static_cast<double>(t.K) * static_cast<double>(t.N);
    fmt::print("{:<{}}  {:>7}  {:>6}  {:>6}  {:>4}  {:>5}  {:>8}  {:>12}  {:>11.3f}\n", t.name, name_width, t.experts,
               t.K, t.N, t.bits, t.group_size, t.hadamard, t.bytes, 8.0 * static_cast<double>(t.bytes) / weights);
    total_bytes += static_cast<double>(t.bytes);
    total_weights += weights;
  }
  if (total_weights > 0)
    fmt::print("total: {} for {:.0f} weights, {:.3f} bits per weight\n", format_bytes(total_bytes), total_weights,
               8.0 * total_bytes / total_weights);
}

// ---- dequantize

void run_dequantize(const std::string& dir, const std::string& out) {
  const QuantizedModel model(dir);
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.set_metadata("tmoe", "dequantized effective weights W [E, K, N], x . W = y");
  for (int layer : model.layers()) {
    MoeWeights weights = model.load_layer(layer);
    for (int p = 0; p < 3; ++p) {
      const TrellisTensor& t = projection(weights, p);
      const int64_t per_expert = t.K * t.N;
      std::vector<double> expert(per_expert);
      std::vector<float> stacked(t.experts * per_expert);
      for (int64_t e = 0; e < t.experts; ++e) {
        effective_weight(t, e, expert);
        for (int64_t i = 0; i < per_expert; ++i) stacked[e * per_expert + i] = static_cast<float>(expert[i]);
      }
      writer.add(stacked_name(layer, kProjections[p]), TensorDType::F32, {t.experts, t.K, t.N},
                 std::span<const float>(stacked));
    }
  }
  writer.write(out);
  fmt::print("wrote '{}': {} layers x gate, up, down as fp32 [E, K, N]\n", out, model.layers().size());
}

}  // namespace

void register_model_commands(CLI::App& app) {
  auto q = std::make_shared<QuantizeCommand>();
  CLI::App* quantize_cmd = app.add_subcommand(
      "quantize", "Quantize the MoE experts of a Hugging Face safetensors checkpoint to a Trellis model directory");
  quantize_cmd->add_option("--in", q->in, "a .safetensors file or a checkpoint directory")->required();
  quantize_cmd->add_option("--out", q->out, "output model directory (created if needed)")->required();
  quantize_cmd->add_option("--bits", q->bits, "bits per weight")->check(CLI::IsMember({2, 3, 4}))->capture_default_str();
  quantize_cmd->add_option("--group-size", q->group_size, "weights along K sharing one scale (a multiple of 16)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  quantize_cmd->add_option("--hadamard", q->hadamard, "Hadamard block for incoherence processing (0: none)")
      ->check(CLI::IsMember({0, 128}))
      ->capture_default_str();
  quantize_cmd->add_option("--grid", q->grid, "codebook: uniform or fit (fitted to the weights)")
      ->check(CLI::IsMember({"uniform", "fit"}))
      ->capture_default_str();
  quantize_cmd->add_option("--threads", q->threads, "threads (0: all cores)")->check(CLI::NonNegativeNumber);
  quantize_cmd->callback([q] { run_quantize(*q); });

  auto model_dir = std::make_shared<std::string>();
  CLI::App* inspect = app.add_subcommand("inspect", "List a Trellis model's tensors: shapes, bits, sizes");
  inspect->add_option("model", *model_dir, "model directory")->required();
  inspect->callback([model_dir] { run_inspect(*model_dir); });

  auto deq_model = std::make_shared<std::string>();
  auto deq_out = std::make_shared<std::string>();
  CLI::App* dequantize = app.add_subcommand(
      "dequantize", "Decode every stacked projection to fp32 [E, K, N] (the W with x . W = y) into a safetensors file");
  dequantize->add_option("model", *deq_model, "model directory")->required();
  dequantize->add_option("--out", *deq_out, "output .safetensors file")->required();
  dequantize->callback([deq_model, deq_out] { run_dequantize(*deq_model, *deq_out); });
}

}  // namespace tmoe::cli

// tmoe demo: quantize a random layer of a real model's shape, run it on the best backend and check it
// against the fp64 reference, with timings and achieved weight bandwidth.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <limits>
#include <memory>
#include <random>
#include <thread>

#include "common.hpp"
#include "tmoe/error.hpp"
#include "tmoe/quantize.hpp"

namespace tmoe::cli {
namespace {

// Routings the timed forwards cycle through (each selects other experts: qwen3's 128 experts at
// 8 per token are all touched within 16 single-token forwards).
constexpr int kTimedRoutings = 16;

struct DemoOptions {
  std::string shape = "qwen3-30b-a3b";
  std::string tokens = "1,4,16,64";
  std::string backend = "auto";
  int bits = 3;
  int hadamard = 0;
  int experts = 0;           // 0: the shape's own count
  int64_t check_tokens = 64;  // tokens checked against the (slow) reference per token count
  uint64_t seed = 0;          // 0: random
};

// Weights like a real checkpoint's: N(0, 0.02^2), and about one in 4096 an outlier 8x larger.
// Experts are filled in parallel, each from its own seed, so the result does not depend on threads.
std::vector<float> random_checkpoint_weights(int64_t experts, int64_t K, int64_t N, uint64_t seed) {
  std::vector<float> w(experts * K * N);
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> workers;
  for (unsigned worker = 0; worker < threads; ++worker) {
    workers.emplace_back([&, worker] {
      for (int64_t e = worker; e < experts; e += threads) {
        std::mt19937_64 rng(seed * 1000003 + e);
        std::normal_distribution<float> normal(0.0f, 0.02f);
        std::bernoulli_distribution outlier(1.0 / 4096);
        float* values = w.data() + e * K * N;
        for (int64_t i = 0; i < K * N; ++i) values[i] = normal(rng) * (outlier(rng) ? 8.0f : 1.0f);
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  return w;
}

void run_demo(const DemoOptions& o) {
  MoeShape shape = model_shape(o.shape);
  if (o.experts > 0) {
    require(o.experts >= shape.top_k, "--experts {} is below the shape's top-k {}", o.experts, shape.top_k);
    shape.experts = std::min(shape.experts, o.experts);
  }
  const std::vector<int64_t> token_counts = parse_int_list(o.tokens, "--tokens");
  const BackendKind kind = backend_from_option(o.backend);
  const uint64_t seed = o.seed ? o.seed : std::random_device{}();
  fmt::print("demo: {} (H={}, I={}, E={}, top-k={}), {}-bit weights, backend {}, seed {}\n", shape.name,
             shape.hidden, shape.intermediate, shape.experts, shape.top_k, o.bits, backend_name(kind),
             seed);
  std::fflush(stdout);

  // Quantize one projection at a time so only one fp32 copy is ever in memory.
  QuantizeOptions qopt;
  qopt.bits = o.bits;
  qopt.hadamard = o.hadamard;
  MoeWeights weights;
  struct Projection {
    const char* name;
    TrellisTensor* tensor;
    int64_t K, N;
  };
  const Projection projections[] = {{"gate", &weights.gate, shape.hidden, shape.intermediate},
                                    {"up", &weights.up, shape.hidden, shape.intermediate},
                                    {"down", &weights.down, shape.intermediate, shape.hidden}};
  std::vector<std::string> quant_lines;
  {
    ProgressBar progress(3 * shape.experts);
    for (int p = 0; p < 3; ++p) {
      const Projection& proj = projections[p];
      progress.update(p * shape.experts, fmt::format("generating {} weights", proj.name));
      const std::vector<float> w = random_checkpoint_weights(shape.experts, proj.K, proj.N, seed + p);
      QuantizeReport report;
      *proj.tensor = quantize(w, shape.experts, proj.K, proj.N, qopt, &report,
                              [&](int64_t done, int64_t total) {
                                progress.update(p * shape.experts + done,
                                                fmt::format("quantizing {}: expert {}/{}", proj.name, done, total));
                              });
      quant_lines.push_back(fmt::format("  {:<4} [{} x {} x {}]  rel. error {:.4f}  SQNR {:.2f} dB", proj.name,
                                        shape.experts, proj.K, proj.N, report.relative_error, report.sqnr_db));
    }
  }
  fmt::print("quantized ({} per expert):\n", format_bytes(static_cast<double>(weights.expert_bytes())));
  for (const std::string& line : quant_lines) fmt::print("{}\n", line);

  ForwardOptions fopt;
  const std::unique_ptr<MoeBackend> backend = make_backend(kind, weights, fopt);
  const double bound = error_bound(kind);
  fmt::print("{:>6}  {:<9}  {:>10}  {:>8}  {:>11}  {:>8}  {}\n", "tokens", "backend", "rel_error", "bound",
             "time", "GB/s", "checked");
  std::fflush(stdout);
  std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
  bool all_within = true;
  bool subset_checked = false;
  std::string timing_note = kind == BackendKind::reference
                                ? "median of runs"
                                : fmt::format("median over forwards cycling through {} routings", kTimedRoutings);
  for (const int64_t tokens : token_counts) {
    // Timed forwards cycle through several routings so the selected experts change every call and
    // are not served from cache (DESIGN.md); batch 0 is the one checked.
    const int routings = kind == BackendKind::reference ? 1 : kTimedRoutings;
    std::vector<RandomBatch> batches;
    double bytes = 0;
    for (int r = 0; r < routings; ++r) {
      batches.push_back(random_batch(tokens, shape.hidden, shape.experts, shape.top_k, rng));
      bytes += static_cast<double>(batches.back().distinct_experts()) * static_cast<double>(weights.expert_bytes());
    }
    bytes /= routings;
    std::vector<float> out(tokens * shape.hidden, std::numeric_limits<float>::quiet_NaN());
    double seconds = 0;
#if defined(TMOE_HAVE_CUDA)
    if (kind == BackendKind::cuda) {
      const CudaTiming timing = time_cuda_forward(weights, batches, 0.5);
      seconds = timing.seconds;
      timing_note = timing.note;
    }
#endif
    if (seconds == 0) {
      size_t next = 0;
      std::vector<MoeBatch> calls;
      for (const RandomBatch& b : batches) calls.push_back(b.batch(out.data()));
      const bool slow = kind == BackendKind::reference;
      seconds = median_seconds([&] { backend->forward(calls[next++ % calls.size()]); }, slow ? 1 : 5, slow ? 0 : 0.5);
    }
    const RandomBatch& batch = batches.front();
    std::fill(out.begin(), out.end(), std::numeric_limits<float>::quiet_NaN());
    backend->forward(batch.batch(out.data()));

    // Each token's output depends only on that token: check the first check_tokens rows.
    const int64_t checked = std::min(tokens, o.check_tokens);
    subset_checked |= checked < tokens;
    const RandomBatch subset = first_tokens(batch, shape.hidden, checked);
    const std::vector<double> ref =
        reference_forward(weights, checked, subset.x, subset.expert_ids, subset.expert_probs);
    const double error = relative_error({out.data(), static_cast<size_t>(checked * shape.hidden)}, ref);
    const bool within = error <= bound;
    all_within &= within;
    fmt::print("{:>6}  {:<9}  {:>10.3e}  {:>8.0e}  {:>11}  {:>8.1f}  {}{}\n", tokens, backend->name(), error,
               bound, format_duration(seconds), bytes / seconds / 1e9,
               checked < tokens ? fmt::format("first {} tokens", checked) : std::string("all tokens"),
               within ? "" : "  ABOVE BOUND");
    std::fflush(stdout);
  }
  fmt::print("time: {}; GB/s: packed weights + scales + signs of the experts each batch selects, over that "
             "time.\n", timing_note);
  if (subset_checked)
    fmt::print("the fp64 reference is slow: large batches are checked on their first {} tokens (--check-tokens).\n",
               o.check_tokens);
  if (!all_within)
    throw Error(ErrorKind::bad_input, fmt::format("backend {} is above its error bound {:.0e}", backend_name(kind), bound));
}

}  // namespace

void register_demo(CLI::App& app) {
  auto options = std::make_shared<DemoOptions>();
  CLI::App* demo = app.add_subcommand(
      "demo", "Quantize a random layer of a model's shape, run it on the best backend, check it against the fp64 reference");
  demo->add_option("--shape", options->shape, "model shape (qwen3-30b-a3b, mixtral-8x7b, deepseek-v3, glm-4.5-air)")
      ->capture_default_str();
  demo->add_option("--tokens", options->tokens, "token counts, comma separated")->capture_default_str();
  demo->add_option("--backend", options->backend, "auto (CUDA if a GPU is present, else CPU), cpu, cuda, reference")
      ->check(CLI::IsMember({"auto", "cpu", "cuda", "reference"}))
      ->capture_default_str();
  demo->add_option("--bits", options->bits, "bits per weight")->check(CLI::IsMember({2, 3, 4}))->capture_default_str();
  demo->add_option("--hadamard", options->hadamard, "Hadamard block for incoherence processing (0: none)")
      ->check(CLI::IsMember({0, 128}))
      ->capture_default_str();
  demo->add_option("--experts", options->experts, "use only this many experts (a quicker demo; 0: all)")
      ->check(CLI::NonNegativeNumber);
  demo->add_option("--check-tokens", options->check_tokens, "tokens per batch checked against the fp64 reference")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  demo->add_option("--seed", options->seed, "random seed (0: a fresh one, printed)");
  demo->callback([options] { run_demo(*options); });
}

}  // namespace tmoe::cli

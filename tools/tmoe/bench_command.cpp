// tmoe bench: the front end of the benchmark runners (bench/bench_report.hpp): a table for people,
// JSON rows for tools (scripts/plot-bench).
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <memory>

#include "bench_report.hpp"
#include "common.hpp"
#include "tmoe/error.hpp"

namespace tmoe::cli {
namespace {

struct BenchCommand {
  std::string backend = "cpu";
  std::string shapes = "qwen3-30b-a3b";
  std::string tokens = "1,4,16";
  int bits = 3;
  int group_size = 128;
  int threads = 0;
  bool deterministic = false;
  int64_t grouped_min_tokens = -1;
  double min_seconds = 0.5;
  uint64_t seed = 1;
  std::string json;
  std::string trace;
};

void run_bench(const BenchCommand& c) {
  bench::BenchConfig config;
  for (const std::string& name : split_list(c.shapes)) config.shapes.push_back(model_shape(name));
  require(!config.shapes.empty(), "--shape: no shape names in '{}'", c.shapes);
  config.tokens = parse_int_list(c.tokens, "--tokens");
  config.bits = c.bits;
  config.group_size = c.group_size;
  config.threads = c.threads;
  config.deterministic = c.deterministic;
  config.grouped_min_tokens = c.grouped_min_tokens;
  config.min_seconds = c.min_seconds;
  config.seed = c.seed;
  config.trace_path = c.trace;
  require(c.trace.empty() || parse_backend(c.backend) == BackendKind::cuda, "--trace: CUDA only");

  bench::DeviceReport device;
  std::vector<bench::BenchRow> rows;
  const BackendKind kind = parse_backend(c.backend);
  if (kind == BackendKind::cpu) {
    rows = bench::run_cpu_bench(config, device);
  } else if (kind == BackendKind::cuda) {
#if defined(TMOE_HAVE_CUDA)
    require(cuda_available(), "--backend cuda needs a CUDA device; none was found");
    rows = bench::run_cuda_bench(config, device);
#else
    fail("this build of tmoe has no CUDA backend (configure with TMOE_CUDA=ON where nvcc exists)");
#endif
  } else {
    fail("--backend must be cpu or cuda, not '{}'", c.backend);
  }
  bench::print_table(rows, device);
  if (!c.json.empty()) {
    bench::write_json(c.json, rows, device);
    fmt::print("wrote {} rows to '{}'\n", rows.size(), c.json);
  }
}

}  // namespace

void register_bench(CLI::App& app) {
  auto b = std::make_shared<BenchCommand>();
  CLI::App* bench = app.add_subcommand("bench", "Time the MoE layer against the device's measured ceilings and a baseline");
  bench->add_option("--backend", b->backend, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  bench->add_option("--shape", b->shapes, "model shapes, comma separated (qwen3-30b-a3b, mixtral-8x7b, deepseek-v3, glm-4.5-air)")
      ->capture_default_str();
  bench->add_option("--tokens", b->tokens, "token counts, comma separated")->capture_default_str();
  bench->add_option("--bits", b->bits, "bits per weight")->check(CLI::IsMember({2, 3, 4}))->capture_default_str();
  bench->add_option("--group-size", b->group_size, "weights along K sharing one scale")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench->add_option("--threads", b->threads, "CPU threads (0: all cores)")->check(CLI::NonNegativeNumber);
  bench->add_flag("--deterministic", b->deterministic, "CUDA determinism mode");
  bench->add_option("--grouped-min-tokens", b->grouped_min_tokens,
                    "CUDA: force the tensor-core grouped path from this many tokens (-1: the dispatcher's rule)")
      ->capture_default_str();
  bench->add_option("--min-seconds", b->min_seconds, "timed repetitions per case, in seconds")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  bench->add_option("--seed", b->seed, "random seed for weights and routing")->capture_default_str();
  bench->add_option("--json", b->json, "also write the rows as JSON to this file");
  bench->add_option("--trace", b->trace,
                    "CUDA: write each case's block timeline (one replay) as CSV to this file; needs a build "
                    "with -DTMOE_PASS_TRACE=1 (scripts/trace-summary reads it)");
  bench->callback([b] { run_bench(*b); });
}

}  // namespace tmoe::cli

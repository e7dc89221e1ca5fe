// `tmoe bench --backend cpu`: the CPU backend on model shapes, judged against this machine's own
// ceilings measured in the same run (DESIGN.md, "Measuring speed honestly"):
//   - read bandwidth (a STREAM-like read of a buffer much larger than the caches), for small T;
//   - a dense fp32 GEMM (OpenBLAS) of the same FLOPs, for large T.
// One full layer per shape (qwen3-30b-a3b: 0.23 GB at 3 bits, mixtral-8x7b: 0.53 GB, both many
// times the 32 MiB L3) and fresh routing every repetition, so the selected experts' weights come
// from memory, not cache, as in real decoding.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_report.hpp"
#include "cpu/cpu_kernels.hpp"
#include "cpu_baselines.hpp"
#include "tmoe/backend.hpp"
#include "tmoe/error.hpp"

namespace tmoe::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Different routings cycled through the repetitions (fresh experts each time).
constexpr int kRoutings = 16;
// The dense baseline multiplies [T x H] by [H x n] with n = 3 * k * I (the same FLOPs), capped so
// its B matrix stays a few hundred MB (mixtral's full n would be 1.4 GB); past the cap the GEMM
// rate no longer depends on n and B is still far beyond the caches.
constexpr int64_t kMaxGemmColumns = 24576;

struct Routing {
  std::vector<int32_t> ids;
  std::vector<float> probs;
  double weight_bytes = 0;  // bytes of the distinct experts it selects
};

Routing bench_routing(int64_t tokens, const MoeShape& shape, const MoeWeights& w, std::mt19937_64& rng) {
  SyntheticRouting drawn = random_routing(tokens, shape.top_k, shape.experts, rng);
  Routing r;
  r.weight_bytes = static_cast<double>(drawn.distinct_experts()) * w.expert_bytes();
  r.ids = std::move(drawn.expert_ids);
  r.probs = std::move(drawn.expert_probs);
  return r;
}

BenchRow run_case(MoeBackend& backend, const MoeWeights& w, const MoeShape& shape, int64_t tokens,
                  const BenchConfig& config, std::mt19937_64& rng) {
  std::vector<Routing> routings;
  for (int i = 0; i < kRoutings; ++i) routings.push_back(bench_routing(tokens, shape, w, rng));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(tokens * shape.hidden), out(tokens * shape.hidden);
  for (float& v : x) v = normal(rng);

  MoeBatch batch;
  batch.tokens = tokens;
  batch.top_k = shape.top_k;
  batch.x = x.data();
  batch.out = out.data();
  auto run_once = [&](const Routing& r) {
    batch.expert_ids = r.ids.data();
    batch.expert_probs = r.probs.data();
    backend.forward(batch);
  };
  for (int i = 0; i < 2; ++i) run_once(routings[i]);  // warm-up: workspace, thread pool

  std::vector<double> times;
  double bytes = 0;
  const auto start = Clock::now();
  for (size_t i = 0; times.size() < 5 ||
                     std::chrono::duration<double>(Clock::now() - start).count() < config.min_seconds;
       ++i) {
    const Routing& r = routings[i % routings.size()];
    const auto call = Clock::now();
    run_once(r);
    times.push_back(std::chrono::duration<double>(Clock::now() - call).count());
    bytes += r.weight_bytes;
  }
  const double iterations = static_cast<double>(times.size());

  BenchRow row;
  row.backend = "cpu";
  row.shape = shape.name;
  row.path = "fused";
  row.tokens = tokens;
  row.bits = config.bits;
  const double seconds = median(times);
  row.time_us = seconds * 1e6;
  row.weight_bytes = bytes / iterations;
  row.gbps = row.weight_bytes / seconds / 1e9;
  const double flops = 2.0 * tokens * shape.top_k * 3.0 * shape.hidden * shape.intermediate;
  row.tflops = flops / seconds / 1e12;

  const int64_t gemm_n = std::min<int64_t>(3 * shape.top_k * shape.intermediate, kMaxGemmColumns);
  const double gemm_gflops = measure_sgemm_gflops(config.threads, tokens, gemm_n, shape.hidden);
  row.gemm_fraction = row.tflops * 1e3 / gemm_gflops;
  row.baseline_time_us = flops / (gemm_gflops * 1e9) * 1e6;
  row.speedup = row.baseline_time_us / row.time_us;
  std::fprintf(stderr, "  %s T=%lld: %.1f us, %.1f GB/s, %.1f GFLOP/s (dense sgemm %.1f GFLOP/s)\n",
               shape.name.c_str(), static_cast<long long>(tokens), row.time_us, row.gbps,
               row.tflops * 1e3, gemm_gflops);
  return row;
}

}  // namespace

std::vector<BenchRow> run_cpu_bench(const BenchConfig& config, DeviceReport& device) {
  require(!config.shapes.empty() && !config.tokens.empty(), "cpu bench: no shapes or no token counts");
  for (const int64_t t : config.tokens) require(t > 0, "cpu bench: token count {} must be positive", t);
  const int threads = config.threads > 0 ? config.threads : omp_get_max_threads();

  device.backend = "cpu";
  device.name = cpu_model_name();
  device.threads = threads;
  std::fprintf(stderr, "cpu bench: measuring read bandwidth and dense GEMM rate (%d threads)\n", threads);
  // The read bandwidth is measured again before every case and the best value is the ceiling
  // (other processes on a small machine can only lower a measurement, never raise it).
  device.bandwidth_gbps = measure_read_bandwidth_gbps(threads);
  device.gemm_tflops = measure_sgemm_gflops(threads, 2048, 2048, 2048) / 1e3;
  device.notes = std::string("SIMD ") + cpu::simd_target_name() +
                 "; bandwidth: best of one read measurement per case; dense baseline " +
                 cpu_gemm_note() + " [T x H].[H x min(3kI, " + std::to_string(kMaxGemmColumns) +
                 ")] at each T; GEMM rate in the header is 2048^3";

  // Other processes on a small machine distort every number: say how busy it was.
  {
    std::ifstream loadavg("/proc/loadavg");
    double one_minute = 0;
    if (loadavg >> one_minute) device.notes += "; load average at start " + std::to_string(one_minute).substr(0, 4);
  }

  std::vector<BenchRow> rows;
  std::mt19937_64 rng(config.seed);
  for (const MoeShape& shape : config.shapes) {
    std::fprintf(stderr, "cpu bench: %s, building a %d-bit layer\n", shape.name.c_str(), config.bits);
    SyntheticLayerOptions options;
    options.gate_bits = options.up_bits = options.down_bits = config.bits;
    options.group_size = config.group_size;
    options.seed = config.seed;
    const MoeWeights weights = random_moe_weights(shape, options);
    ForwardOptions forward_options;
    forward_options.threads = threads;
    auto backend = make_backend(BackendKind::cpu, weights, forward_options);
    for (const int64_t tokens : config.tokens) {
      device.bandwidth_gbps = std::max(device.bandwidth_gbps, measure_read_bandwidth_gbps(threads));
      rows.push_back(run_case(*backend, weights, shape, tokens, config, rng));
    }
  }
  for (BenchRow& row : rows) row.bw_fraction = row.gbps / device.bandwidth_gbps;
  std::fprintf(stderr, "cpu bench: best read bandwidth of the run %.1f GB/s\n", device.bandwidth_gbps);
  return rows;
}

}  // namespace tmoe::bench

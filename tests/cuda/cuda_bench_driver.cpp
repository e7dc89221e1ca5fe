// Runs the CUDA benchmark from the test binary (disabled: scripts/gpu-check runs it explicitly with
// --gtest_also_run_disabled_tests), for when the CLI's `tmoe bench --backend cuda` is not there.
// Environment: TMOE_BENCH_SHAPES (comma list), TMOE_BENCH_TOKENS (comma list), TMOE_BENCH_SECONDS,
// TMOE_BENCH_JSON (file for the rows).
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "bench_report.hpp"
#include "cuda_test_util.hpp"

namespace tmoe::testing {
namespace {

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');)
    if (!part.empty()) parts.push_back(part);
  return parts;
}

std::string env(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

TEST(CudaBenchDriver, DISABLED_Run) {
  TMOE_REQUIRE_GPU();
  bench::BenchConfig config;
  for (const auto& name : split(env("TMOE_BENCH_SHAPES", "qwen3-30b-a3b,mixtral-8x7b,deepseek-v3,glm-4.5-air")))
    config.shapes.push_back(model_shape(name));
  for (const auto& t : split(env("TMOE_BENCH_TOKENS", "1,2,4,8,16,32,64"))) config.tokens.push_back(std::stoll(t));
  config.min_seconds = std::stod(env("TMOE_BENCH_SECONDS", "0.3"));
  bench::DeviceReport device;
  const auto rows = bench::run_cuda_bench(config, device);
  std::printf("device: %s, %d SMs, copy %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", device.name.c_str(),
              device.threads, device.bandwidth_gbps, device.gemm_tflops);
  std::printf("%-14s %4s %10s %8s %6s %11s %8s\n", "shape", "T", "time_us", "GB/s", "%copy", "bf16_us", "speedup");
  for (const auto& r : rows)
    std::printf("%-14s %4lld %10.2f %8.1f %5.0f%% %11.2f %7.2fx\n", r.shape.c_str(),
                static_cast<long long>(r.tokens), r.time_us, r.gbps, 100 * r.bw_fraction, r.baseline_time_us,
                r.speedup);
  const std::string json = env("TMOE_BENCH_JSON", "");
  if (!json.empty()) {
    std::ofstream f(json);
    f << "[\n  {\"kind\": \"device\", \"backend\": \"cuda\", \"name\": \"" << device.name << "\", \"sms\": " << device.threads
      << ", \"bandwidth_gbps\": " << device.bandwidth_gbps << ", \"gemm_tflops\": " << device.gemm_tflops << "}";
    for (const auto& r : rows)
      f << ",\n  {\"backend\": \"" << r.backend << "\", \"shape\": \"" << r.shape << "\", \"path\": \"" << r.path
        << "\", \"tokens\": " << r.tokens << ", \"bits\": " << r.bits << ", \"time_us\": " << r.time_us
        << ", \"weight_bytes\": " << r.weight_bytes << ", \"gbps\": " << r.gbps << ", \"bw_fraction\": " << r.bw_fraction
        << ", \"tflops\": " << r.tflops << ", \"gemm_fraction\": " << r.gemm_fraction
        << ", \"baseline_time_us\": " << r.baseline_time_us << ", \"speedup\": " << r.speedup << "}";
    f << "\n]\n";
  }
}

}  // namespace
}  // namespace tmoe::testing

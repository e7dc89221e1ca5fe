// Runs the CUDA benchmark from the test binary (disabled: scripts/gpu-check runs it explicitly with
// --gtest_also_run_disabled_tests), for when the CLI's `tmoe bench --backend cuda` is not there.
// Environment: TMOE_BENCH_SHAPES (comma list), TMOE_BENCH_TOKENS (comma list), TMOE_BENCH_SECONDS,
// TMOE_BENCH_JSON (file for the rows).
#include <gtest/gtest.h>

#include <cstdlib>
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
  bench::print_table(rows, device);
  const std::string json = env("TMOE_BENCH_JSON", "");
  if (!json.empty()) bench::write_json(json, rows, device);
}

}  // namespace
}  // namespace tmoe::testing

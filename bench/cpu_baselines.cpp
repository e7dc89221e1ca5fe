#include "cpu_baselines.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_report.hpp"
#include "tmoe/error.hpp"

#if defined(TMOE_HAVE_BLAS)
#include <cblas.h>
#endif

namespace tmoe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int resolve_threads(int threads) { return threads > 0 ? threads : omp_get_max_threads(); }

// Size of the largest CPU cache Linux reports (bytes), 0 if unknown.
int64_t largest_cache_bytes() {
  int64_t largest = 0;
  for (int index = 0; index < 8; ++index) {
    std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    if (!file) break;
    std::string text;
    file >> text;  // e.g. "32768K"
    if (text.empty()) continue;
    int64_t value = 0;
    try {
      value = std::stoll(text);
    } catch (...) {
      continue;
    }
    const char unit = text.back();
    if (unit == 'K') value <<= 10;
    if (unit == 'M') value <<= 20;
    largest = std::max(largest, value);
  }
  return largest;
}

}  // namespace

std::string cpu_model_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const size_t start = line.find_first_not_of(' ', colon + 1);
    if (start != std::string::npos) return line.substr(start);
  }
  return "unknown CPU";
}

double measure_read_bandwidth_gbps(int threads) {
  threads = resolve_threads(threads);
  // 8x the last-level cache so no pass is served from cache; within [256 MiB, 1 GiB] so it stays
  // quick and fits next to the benchmark's own buffers.
  constexpr int64_t kMiB = int64_t{1} << 20;
  const int64_t bytes = std::clamp<int64_t>(8 * largest_cache_bytes(), 256 * kMiB, 1024 * kMiB);
  const int64_t words = bytes / static_cast<int64_t>(sizeof(uint64_t));
  std::unique_ptr<uint64_t[]> buffer(new uint64_t[words]);  // uninitialised: first touch below

  // Each thread touches (so the OS places) and later reads the same static slice.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < words; ++i) buffer[i] = static_cast<uint64_t>(i);

  constexpr int kPasses = 6;
  double best = 0;
  uint64_t sink = 0;
  for (int pass = 0; pass < kPasses; ++pass) {
    uint64_t total = 0;
    const auto start = Clock::now();
    // Integer sums vectorise without -ffast-math (no reassociation concerns), so the loop runs at
    // load speed.
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
    for (int64_t i = 0; i < words; ++i) total += buffer[i];
    const double elapsed = seconds_since(start);
    sink += total;
    if (pass > 0) best = std::max(best, static_cast<double>(bytes) / elapsed / 1e9);  // pass 0 warms up
  }
  // Keeps the sums observable so the compiler cannot drop the loop.
  if (sink == 42) std::fputs("", stderr);
  return best;
}

bool have_blas() {
#if defined(TMOE_HAVE_BLAS)
  return true;
#else
  return false;
#endif
}

std::string cpu_gemm_note() {
  return have_blas() ? "OpenBLAS cblas_sgemm" : "no BLAS: naive OpenMP sgemm (not a fair baseline)";
}

void sgemm(int64_t m, int64_t n, int64_t k, std::span<const float> a, std::span<const float> b,
           std::span<float> c, int threads) {
  require(m >= 0 && n >= 0 && k >= 0, "sgemm: negative size {}x{}x{}", m, n, k);
  require(a.size() >= static_cast<size_t>(m * k) && b.size() >= static_cast<size_t>(k * n) &&
              c.size() >= static_cast<size_t>(m * n),
          "sgemm: buffers of {}, {}, {} floats are too small for {}x{}x{}", a.size(), b.size(),
          c.size(), m, n, k);
  threads = resolve_threads(threads);
  if (m == 0 || n == 0) return;
#if defined(TMOE_HAVE_BLAS)
#if defined(OPENBLAS_VERSION)
  openblas_set_num_threads(threads);
#endif
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, a.data(), static_cast<int>(k), b.data(),
              static_cast<int>(n), 0.0f, c.data(), static_cast<int>(n));
#else
  // i-k-j order: the inner loop streams a row of B into a row of C and vectorises.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < m; ++i) {
    float* c_row = c.data() + i * n;
    std::fill(c_row, c_row + n, 0.0f);
    for (int64_t p = 0; p < k; ++p) {
      const float a_ip = a[i * k + p];
      const float* b_row = b.data() + p * n;
      for (int64_t j = 0; j < n; ++j) c_row[j] += a_ip * b_row[j];
    }
  }
#endif
}

double measure_sgemm_gflops(int threads, int64_t m, int64_t n, int64_t k) {
  require(m > 0 && n > 0 && k > 0, "measure_sgemm_gflops: bad size {}x{}x{}", m, n, k);
  std::mt19937 rng(12345);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> a(m * k), b(k * n), c(m * n);
  for (float& v : a) v = normal(rng);
  for (float& v : b) v = normal(rng);

  sgemm(m, n, k, a, b, c, threads);  // warm-up: thread pool start, page faults
  // At least 5 calls and 0.3 s, at most 200 calls.
  std::vector<double> times;
  const auto start = Clock::now();
  while (times.size() < 200 && (times.size() < 5 || seconds_since(start) < 0.3)) {
    const auto call = Clock::now();
    sgemm(m, n, k, a, b, c, threads);
    times.push_back(seconds_since(call));
  }
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) /
         median(times) / 1e9;
}

}  // namespace tmoe::bench

// Benchmark rows, the human table and the JSON file (DESIGN.md, "Benchmark output").
// Plain std types only: CUDA translation units include this header too.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tmoe/moe.hpp"

namespace tmoe::bench {

struct BenchConfig {
  std::vector<MoeShape> shapes;
  std::vector<int64_t> tokens;
  int bits = 3;
  int group_size = 128;
  int threads = 0;             // CPU threads, 0: all
  bool deterministic = false;  // CUDA determinism mode
  int64_t grouped_min_tokens = -1;  // CUDA: force the grouped path from this many tokens (-1: dispatcher)
  double min_seconds = 0.5;    // per case, time spent in timed repetitions
  uint64_t seed = 1;
  // CUDA: per case, the block timeline of one more replay of the timed graph, as CSV (a build with
  // -DTMOE_PASS_TRACE=1; src/cuda/pass_trace.hpp, scripts/trace-summary). Empty: none.
  std::string trace_path;
};

struct BenchRow {
  std::string backend, shape, path;  // path: which kernel path ran ("decode", "grouped", ...)
  int64_t tokens = 0;
  int bits = 3;
  double time_us = 0;           // median
  double weight_bytes = 0;      // bytes the case must read (selected experts' packed weights + scales + signs)
  double gbps = 0;              // weight_bytes / time
  double bw_fraction = 0;       // of the bandwidth measured in the same run
  double tflops = 0;            // 2 * T * k * 3 * H * I / time
  double gemm_fraction = 0;     // of the dense GEMM rate measured in the same run
  double baseline_time_us = 0;  // the baseline a user would otherwise run (0: none)
  double speedup = 0;           // baseline_time_us / time_us
  // CUDA (0 elsewhere): the stream floor, a forward with no decode and no arithmetic, timed the same
  // way: one kernel reads the distinct selected experts' gate and up bytes, a dependent launch reads
  // their down bytes first and then waits for it (the passes' order). What reading the bytes in the
  // order the math allows costs on this device: the time the kernels' own work is measured against.
  double floor_us = 0;
  double stream_us = 0;  // the same bytes read by one kernel, no dependency (0: not measured)
};

struct DeviceReport {
  std::string backend;            // "cpu" or "cuda"
  std::string name;               // CPU model / GPU name
  int threads = 0;                // CPU threads or SMs
  double bandwidth_gbps = 0;      // measured read (CPU) or copy (GPU) bandwidth
  double gemm_tflops = 0;         // measured dense GEMM rate (fp32 on CPU, bf16 on GPU)
  std::string notes;
};

// Runners (one per backend). They print progress to stderr and return one row per case.
std::vector<BenchRow> run_cpu_bench(const BenchConfig& config, DeviceReport& device);
#if defined(TMOE_HAVE_CUDA)
std::vector<BenchRow> run_cuda_bench(const BenchConfig& config, DeviceReport& device);
#endif

// The table for people (stdout) and the JSON rows for tools (DESIGN.md fields + one "device" row).
void print_table(const std::vector<BenchRow>& rows, const DeviceReport& device);
void write_json(const std::string& path, const std::vector<BenchRow>& rows, const DeviceReport& device);

// Median of a sample (the sample is reordered).
double median(std::vector<double>& sample);

}  // namespace tmoe::bench

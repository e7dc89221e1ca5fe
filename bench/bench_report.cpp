// The benchmark table for people and the JSON rows for tools (DESIGN.md, "Benchmark output").
#include "bench_report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tmoe/error.hpp"

namespace tmoe::bench {
namespace {

// A measured quantity in the table: "-" where there is none (0, not finite).
std::string cell(double value, int decimals) {
  if (!std::isfinite(value) || value == 0) return "-";
  return fmt::format("{:.{}f}", value, decimals);
}

std::string percent(double fraction) {
  if (!std::isfinite(fraction) || fraction == 0) return "-";
  return fmt::format("{:.1f}%", 100.0 * fraction);
}

// Time with about 4 significant digits at any magnitude.
std::string time_cell(double us) {
  if (!std::isfinite(us) || us == 0) return "-";
  return fmt::format("{:.{}f}", us, us >= 1000 ? 0 : us >= 100 ? 1 : 2);
}

}  // namespace

double median(std::vector<double>& sample) {
  if (sample.empty()) return 0;
  std::nth_element(sample.begin(), sample.begin() + sample.size() / 2, sample.end());
  return sample[sample.size() / 2];
}

void print_table(const std::vector<BenchRow>& rows, const DeviceReport& device) {
  std::string header = fmt::format("device: {} {} ({} {}), bandwidth {:.1f} GB/s, dense GEMM {:.2f} TFLOP/s",
                                   device.backend, device.name, device.threads,
                                   device.backend == "cuda" ? "SMs" : "threads",
                                   device.bandwidth_gbps, device.gemm_tflops);
  if (!device.notes.empty()) header += "; " + device.notes;
  std::puts(header.c_str());

  const std::vector<std::string> titles = {"backend", "shape",  "tokens",  "bits",
                                           "path",    "time_us", "GB/s",   "bw%",
                                           "TFLOP/s", "gemm%",  "baseline_us", "speedup", "floor_us"};
  std::vector<std::vector<std::string>> table;
  table.reserve(rows.size());
  for (const BenchRow& r : rows) {
    table.push_back({r.backend, r.shape, std::to_string(r.tokens), std::to_string(r.bits),
                     r.path.empty() ? "-" : r.path, time_cell(r.time_us), cell(r.gbps, 1),
                     percent(r.bw_fraction), cell(r.tflops, 3), percent(r.gemm_fraction),
                     time_cell(r.baseline_time_us), cell(r.speedup, 2), time_cell(r.floor_us)});
  }
  std::vector<size_t> width(titles.size());
  for (size_t c = 0; c < titles.size(); ++c) {
    width[c] = titles[c].size();
    for (const auto& line : table) width[c] = std::max(width[c], line[c].size());
  }
  // Text columns (the first five) align left, numbers right.
  auto print_line = [&](const std::vector<std::string>& line) {
    std::string text;
    for (size_t c = 0; c < line.size(); ++c) {
      if (c) text += "  ";
      text += c < 5 ? fmt::format("{:<{}}", line[c], width[c]) : fmt::format("{:>{}}", line[c], width[c]);
    }
    while (!text.empty() && text.back() == ' ') text.pop_back();
    std::puts(text.c_str());
  };
  print_line(titles);
  for (const auto& line : table) print_line(line);
  std::fflush(stdout);
}

void write_json(const std::string& path, const std::vector<BenchRow>& rows, const DeviceReport& device) {
  nlohmann::json out = nlohmann::json::array();
  for (const BenchRow& r : rows) {
    out.push_back({{"kind", "case"},
                   {"backend", r.backend},
                   {"shape", r.shape},
                   {"tokens", r.tokens},
                   {"bits", r.bits},
                   {"path", r.path},
                   {"time_us", r.time_us},
                   {"weight_bytes", r.weight_bytes},
                   {"gbps", r.gbps},
                   {"bw_fraction", r.bw_fraction},
                   {"tflops", r.tflops},
                   {"gemm_fraction", r.gemm_fraction},
                   {"baseline_time_us", r.baseline_time_us},
                   {"speedup", r.speedup},
                   {"floor_us", r.floor_us},
                   {"stream_us", r.stream_us}});
  }
  out.push_back({{"kind", "device"},
                 {"backend", device.backend},
                 {"name", device.name},
                 {"threads", device.threads},
                 {"bandwidth_gbps", device.bandwidth_gbps},
                 {"gemm_tflops", device.gemm_tflops},
                 {"notes", device.notes}});
  std::ofstream file(path);
  require(static_cast<bool>(file), "cannot open '{}' for writing", path);
  file << out.dump(2) << '\n';
  file.close();
  require(static_cast<bool>(file), "cannot write '{}'", path);
}

}  // namespace tmoe::bench

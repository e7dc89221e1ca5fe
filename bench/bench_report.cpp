// Placeholder: the table and JSON writer land with the CLI.
#include "bench_report.hpp"

#include <algorithm>

namespace tmoe::bench {
double median(std::vector<double>& sample) {
  if (sample.empty()) return 0;
  std::nth_element(sample.begin(), sample.begin() + sample.size() / 2, sample.end());
  return sample[sample.size() / 2];
}
}  // namespace tmoe::bench

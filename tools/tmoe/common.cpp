#include "common.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <set>

#include "bench_report.hpp"
#include "tmoe/error.hpp"

namespace tmoe::cli {

BackendKind backend_from_option(const std::string& name) {
  const BackendKind kind = name == "auto" ? best_backend() : parse_backend(name);
  // Say so before any slow work (loading, quantizing) rather than when the backend is made.
  require(kind != BackendKind::cuda || cuda_available(),
          "the cuda backend is not available: {}",
#if defined(TMOE_HAVE_CUDA)
          "no CUDA device was found"
#else
          "this build of tmoe has no CUDA backend (configure with TMOE_CUDA=ON where nvcc exists)"
#endif
  );
  return kind;
}

double error_bound(BackendKind kind) {
  switch (kind) {
    case BackendKind::reference: return 1e-6;
    case BackendKind::cpu: return 1e-4;
    case BackendKind::cuda: return 2e-2;
  }
  return 0;
}

MoeBatch RandomBatch::batch(float* out) const {
  MoeBatch b;
  b.tokens = tokens;
  b.top_k = top_k;
  b.x = x.data();
  b.x_dtype = DType::f32;
  b.expert_ids = expert_ids.data();
  b.expert_probs = expert_probs.data();
  b.out = out;
  b.out_dtype = DType::f32;
  return b;
}

int64_t RandomBatch::distinct_experts() const {
  return SyntheticRouting{expert_ids, expert_probs}.distinct_experts();
}

RandomBatch random_batch(int64_t tokens, int64_t hidden, int experts, int top_k, std::mt19937_64& rng) {
  RandomBatch b;
  b.tokens = tokens;
  b.top_k = top_k;
  SyntheticRouting routing = random_routing(tokens, top_k, experts, rng);
  b.expert_ids = std::move(routing.expert_ids);
  b.expert_probs = std::move(routing.expert_probs);
  b.x.resize(tokens * hidden);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : b.x) v = normal(rng);
  return b;
}

RandomBatch first_tokens(const RandomBatch& batch, int64_t hidden, int64_t tokens) {
  tokens = std::min(tokens, batch.tokens);
  RandomBatch b;
  b.tokens = tokens;
  b.top_k = batch.top_k;
  b.x.assign(batch.x.begin(), batch.x.begin() + tokens * hidden);
  b.expert_ids.assign(batch.expert_ids.begin(), batch.expert_ids.begin() + tokens * batch.top_k);
  b.expert_probs.assign(batch.expert_probs.begin(), batch.expert_probs.begin() + tokens * batch.top_k);
  return b;
}

double median_seconds(const std::function<void()>& run, int min_runs, double min_seconds, int max_runs) {
  using Clock = std::chrono::steady_clock;
  run();  // warm-up: first-touch of buffers, thread pools, device uploads
  std::vector<double> times;
  const auto start = Clock::now();
  while (static_cast<int>(times.size()) < max_runs &&
         (static_cast<int>(times.size()) < min_runs ||
          std::chrono::duration<double>(Clock::now() - start).count() < min_seconds)) {
    const auto begin = Clock::now();
    run();
    times.push_back(std::chrono::duration<double>(Clock::now() - begin).count());
  }
  return bench::median(times);
}

void ProgressBar::update(int64_t done, const std::string& label) {
  constexpr int kWidth = 30;
  const double fraction = total_ > 0 ? std::clamp(static_cast<double>(done) / total_, 0.0, 1.0) : 1.0;
  const int filled = static_cast<int>(fraction * kWidth);
  const std::string line = fmt::format("[{}{}] {:3.0f}% {}", std::string(filled, '#'),
                                       std::string(kWidth - filled, '.'), 100 * fraction, label);
  // Redraw on change, at most ~10 times a second unless finished (keeps logs small when piped).
  const auto now = std::chrono::steady_clock::now();
  if (line == last_ || (done < total_ && drawn_ && now - last_draw_ < std::chrono::milliseconds(100)))
    return;
  // Pad over a longer previous line.
  const size_t pad = last_.size() > line.size() ? last_.size() - line.size() : 0;
  std::fprintf(stderr, "\r%s%s", line.c_str(), std::string(pad, ' ').c_str());
  std::fflush(stderr);
  last_ = line;
  last_draw_ = now;
  drawn_ = true;
}

void ProgressBar::clear() {
  if (!drawn_) return;
  std::fprintf(stderr, "\r%s\r", std::string(last_.size(), ' ').c_str());
  std::fflush(stderr);
  drawn_ = false;
  last_.clear();
}

void ProgressBar::finish() {
  if (!drawn_) return;
  std::fputc('\n', stderr);
  std::fflush(stderr);
  drawn_ = false;
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    std::string item = text.substr(start, comma - start);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty()) items.push_back(item);
    start = comma + 1;
  }
  return items;
}

std::vector<int64_t> parse_int_list(const std::string& text, const std::string& what) {
  std::vector<int64_t> values;
  for (const std::string& item : split_list(text)) {
    size_t used = 0;
    int64_t value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    require(used == item.size() && value > 0, "{}: '{}' is not a positive integer", what, item);
    values.push_back(value);
  }
  require(!values.empty(), "{}: no values in '{}'", what, text);
  return values;
}

std::string format_duration(double seconds) {
  if (seconds < 1e-3) return fmt::format("{:.1f} us", seconds * 1e6);
  if (seconds < 1) return fmt::format("{:.2f} ms", seconds * 1e3);
  return fmt::format("{:.2f} s", seconds);
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 4) {
    bytes /= 1024;
    ++unit;
  }
  return unit == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.2f} {}", bytes, units[unit]);
}

}  // namespace tmoe::cli

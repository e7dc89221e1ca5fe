// Helpers shared by the tmoe commands: command registration, random batches, timing, progress.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tmoe/backend.hpp"
#include "tmoe/moe.hpp"

namespace CLI {
class App;
}

namespace tmoe::cli {

// One function per command group; each adds its subcommands to the app.
void register_demo(CLI::App& app);
void register_model_commands(CLI::App& app);  // quantize, inspect, dequantize
void register_run_commands(CLI::App& app);    // run, verify
void register_bench(CLI::App& app);

// "auto" -> best_backend(), else parse_backend(name); throws tmoe::Error (bad input) for cuda where
// no CUDA device is usable.
BackendKind backend_from_option(const std::string& name);

// The largest relative error (vs the fp64 reference over the same quantized weights) a backend may
// show before verify / demo call it wrong. The reference computes in fp64 and rounds the output to
// fp32 (~6e-8 relative). The CPU backend accumulates in fp32 over K <= 14336 terms: rounding grows
// like sqrt(K) * 2^-24 ~ 1e-5, so 1e-4 leaves margin without hiding a wrong element (one wrong
// expert moves the error to O(1)). The CUDA tensor-core paths round activations to 16 bits
// (bf16: 2^-9 relative) before two chained GEMMs: a few 1e-3, so 2e-2 there.
double error_bound(BackendKind kind);

// A random batch: x ~ N(0, 1) [T, H]; for each token k distinct experts, probabilities a softmax
// over random logits of the chosen experts (they sum to 1).
struct RandomBatch {
  int64_t tokens = 0;
  int top_k = 0;
  std::vector<float> x;
  std::vector<int32_t> expert_ids;
  std::vector<float> expert_probs;
  // MoeBatch over these host tensors, writing fp32 to `out` ([T, H]).
  MoeBatch batch(float* out) const;
  // Distinct experts the batch selects (each is read once per forward).
  int64_t distinct_experts() const;
};
RandomBatch random_batch(int64_t tokens, int64_t hidden, int experts, int top_k, std::mt19937_64& rng);

// The first `tokens` tokens of a batch (the reference on a subset when the whole batch is slow).
RandomBatch first_tokens(const RandomBatch& batch, int64_t hidden, int64_t tokens);

// Calls `run` repeatedly (once to warm up, then at least `min_runs` times and until `min_seconds`
// have passed, at most `max_runs`) and returns the median time of one call in seconds.
double median_seconds(const std::function<void()>& run, int min_runs = 5, double min_seconds = 0.5,
                      int max_runs = 100);

#if defined(TMOE_HAVE_CUDA)
// The device time of CudaMoe::forward over device-resident tensors: one forward per batch (same
// token count and top-k), captured in a CUDA graph and replayed; the median replay time over the
// batches, after a warm-up, for at least `min_seconds`. Unlike MoeBackend::forward it excludes the
// host-device copies, as a model running on the GPU would. `note` says how it was measured (and
// whether the layer is small enough to stay in L2, which flatters the bandwidth).
struct CudaTiming {
  double seconds = 0;
  std::string note;
};
CudaTiming time_cuda_forward(const MoeWeights& weights, const std::vector<RandomBatch>& batches, double min_seconds);
#endif

// A one-line progress bar on stderr, redrawn in place with '\r'.
class ProgressBar {
 public:
  explicit ProgressBar(int64_t total) : total_(total) {}
  ~ProgressBar() { finish(); }
  // Shows `done` of `total` with a label ("layer 3 up: expert 17/128").
  void update(int64_t done, const std::string& label);
  // Ends the line (once).
  void finish();
  // Erases the bar so a result line can be printed; the next update draws it again.
  void clear();

 private:
  int64_t total_;
  bool drawn_ = false;
  std::string last_;
  std::chrono::steady_clock::time_point last_draw_{};
};

// "1,4,16" -> {1, 4, 16}; throws tmoe::Error on anything but positive integers.
std::vector<int64_t> parse_int_list(const std::string& text, const std::string& what);
// "a,b" -> {"a", "b"} (empty items dropped).
std::vector<std::string> split_list(const std::string& text);

// Seconds to a human time ("812 us", "3.2 ms", "1.40 s").
std::string format_duration(double seconds);
// Bytes to a human size ("1.2 GiB").
std::string format_bytes(double bytes);

}  // namespace tmoe::cli

// The quantizer: W [E, K, N] fp32 -> TrellisTensor (FORMAT.md).
//
// Per expert:
//   1. Target. Without rotation the target is W itself and su = sv = +1. With hadamard = b the
//      target is R = H_K diag(su) W diag(sv) H_N with random +-1 signs su, sv drawn from the seed,
//      so that the effective weight diag(su) H_K Q H_N diag(sv) (format.cpp) approximates W.
//      R is stored transposed, [N][K], so the K-values of one column's group are contiguous.
//   2. Per group (group_size values of K, one column n): search the fp16 scale that minimises
//      the squared error of nearest-level rounding (candidates 0.5x..1.2x of the max-abs scale,
//      the max-abs scale itself, then least-squares refinement), errors measured with the scale
//      already rounded to fp16, so what we minimise is what is stored.
//   3. Pack each column's indices straight into its tile column words.
// GridKind::fit first fits the 2^bits levels (weighted Lloyd-Max, alternating with the scale
// search) on a sample of the rotated columns, keeping the fitted grid only if it beats the uniform
// one on that sample.
//
// Parallel over (expert, column block) with OpenMP; every group's result depends only on its own
// data, and all sums are taken in a fixed order, so the output is the same for any thread count.
#include "tmoe/quantize.hpp"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "tmoe/error.hpp"
#include "tmoe/hadamard.hpp"
#include "quant/round_to_grid.hpp"

namespace tmoe {
namespace {

constexpr float kMaxHalf = 65504.0f;
// Scale candidates: kCandidates values evenly from kLowest to kHighest times the max-abs scale.
constexpr int kCandidates = 36;
constexpr float kLowest = 0.5f, kHighest = 1.2f;
constexpr int kRefinements = 3;         // least-squares rescale steps after the candidate search
constexpr int kFitIterations = 8;       // Lloyd-Max / scale-search alternations for GridKind::fit
constexpr int64_t kFitSampleValues = int64_t{1} << 20;  // weights the grid fit looks at
constexpr int kFitSampleExperts = 8;
constexpr int64_t kChunkFloats = int64_t{16} << 20;  // rotated-target buffer per batch of experts

float round_to_half(float v) { return half_to_float(float_to_half(v)); }

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// +-1 signs of expert e: su[k] for k < K, then sv[n]; a pure function of (seed, e, position).
float random_sign(uint64_t seed, int64_t e, int64_t position) {
  const uint64_t h = splitmix64(splitmix64(seed ^ splitmix64(static_cast<uint64_t>(e))) +
                                static_cast<uint64_t>(position));
  return (h >> 63) ? -1.0f : 1.0f;
}

// A sorted grid prepared for nearest-level rounding: v is rounded to level t + 1 iff it lies above
// threshold t (the midpoint of levels t and t + 1). Works for any sorted grid.
template <int L>
struct Levels {
  std::array<float, L> level{};
  std::array<float, L - 1> threshold{};
  float max_abs = 0;  // largest |level|: the max-abs scale maps the group's largest |v| onto it

  explicit Levels(const std::vector<float>& grid) {
    for (int i = 0; i < L; ++i) level[i] = grid[i];
    for (int i = 0; i + 1 < L; ++i) threshold[i] = 0.5f * (grid[i] + grid[i + 1]);
    max_abs = std::max(std::fabs(grid.front()), std::fabs(grid.back()));
  }
  // The levels and thresholds times `scale`: rounding v against them avoids a divide per weight.
  Levels scaled(float scale) const {
    Levels s = *this;
    for (float& l : s.level) l *= scale;
    for (float& t : s.threshold) t *= scale;
    return s;
  }
};

// Squared error of rounding v[0, len) to the nearest of the (already scaled) levels, plus
// sum(v q) and sum(q q) for a least-squares rescale (SIMD, round_to_grid.cpp).
template <int L>
quant::RoundingError evaluate(const float* v, int len, const Levels<L>& s) {
  return quant::round_to_grid_error(v, len, s.level.data(), s.threshold.data(), L);
}

template <int L>
void assign(const float* v, int len, const Levels<L>& s, uint8_t* idx) {
  for (int i = 0; i < len; ++i) {
    int index = 0;
    for (int t = 0; t < L - 1; ++t) index += v[i] > s.threshold[t];
    idx[i] = static_cast<uint8_t>(index);
  }
}

struct GroupChoice {
  float scale = 0;  // fp16-representable
  float error = 0;  // squared error with that scale
};

// The fp16 scale minimising the squared error of group v[0, len) on the grid.
template <int L>
GroupChoice choose_scale(const float* v, int len, const Levels<L>& grid, bool search) {
  float max_abs = 0;
  for (int i = 0; i < len; ++i) max_abs = std::max(max_abs, std::fabs(v[i]));
  const float base = std::min(max_abs / grid.max_abs, kMaxHalf);
  GroupChoice best{0.0f, std::numeric_limits<float>::infinity()};
  quant::RoundingError best_sums;  // of the best scale so far: seeds the least-squares step
  auto consider = [&](float candidate) {
    const float scale = round_to_half(std::min(candidate, kMaxHalf));
    const quant::RoundingError e = evaluate(v, len, grid.scaled(scale));
    if (e.error < best.error) {
      best = {scale, e.error};
      best_sums = e;
    }
  };
  consider(base);  // plain max-abs scaling: the baseline the search must beat
  if (!search || base == 0) return best;
  for (int c = 0; c < kCandidates; ++c)
    consider(base * (kLowest + (kHighest - kLowest) * c / (kCandidates - 1)));
  // Least squares with the assignment fixed: with q the scaled levels, the best unit-scale factor
  // is sum(v q) / sum(q q), i.e. scale' = scale * vq / qq. Repeat while it improves.
  for (int r = 0; r < kRefinements && best_sums.qq > 0 && best_sums.vq > 0; ++r) {
    const float current = best.scale;
    consider(current * best_sums.vq / best_sums.qq);
    if (best.scale == current) break;
  }
  return best;
}

// Writes the 16 indices of column word (tile, n_in_tile), LSB first: the inverse of
// load_column_word (trellis_decode.hpp). idx holds `count` <= 16 values; the rest are 0.
void store_column_word(uint8_t* tile, int n_in_tile, int bits, const uint8_t* idx, int count) {
  uint64_t word = 0;
  for (int k = 0; k < count; ++k) word |= static_cast<uint64_t>(idx[k]) << (k * bits);
  uint8_t* column = tile + n_in_tile * column_bytes(bits);
  for (int b = 0; b < column_bytes(bits); ++b) column[b] = static_cast<uint8_t>(word >> (8 * b));
}

struct Problem {
  const ExpertLoader& load_experts;
  int64_t experts, K, N;
  const QuantizeOptions& options;

  // Experts first .. first + count - 1 into out (count * K * N floats), checked finite.
  void load(int64_t first, int64_t count, float* out) const {
    load_experts(first, count, std::span<float>(out, static_cast<size_t>(count * K * N)));
    for (int64_t i = 0; i < count * K * N; ++i) {
      if (!std::isfinite(out[i])) {
        const int64_t per = K * N, e = first + i / per, r = i % per;
        fail("quantize: W[{}][{}][{}] is not finite ({})", e, r / N, r % N, out[i]);
      }
    }
  }

  int64_t groups() const { return ceil_div(K, options.group_size); }
  // Sign vectors of expert e (all +1 without rotation).
  void signs(int64_t e, std::vector<float>& su, std::vector<float>& sv) const {
    su.assign(K, 1.0f);
    sv.assign(N, 1.0f);
    if (!options.hadamard) return;
    for (int64_t k = 0; k < K; ++k) su[k] = random_sign(options.seed, e, k);
    for (int64_t n = 0; n < N; ++n) sv[n] = random_sign(options.seed, e, K + n);
  }
  // The quantization target of expert e (weights `we`), transposed: out[n * K + k] = R[k][n].
  void target(int64_t e, const float* we, float* out) const {
    std::vector<float> su, sv;
    signs(e, su, sv);
    constexpr int kRows = 16;  // rows per pass: each transposed write fills 64 contiguous bytes
    std::vector<float> rows(kRows * N);
    for (int64_t k0 = 0; k0 < K; k0 += kRows) {
      const int count = static_cast<int>(std::min<int64_t>(kRows, K - k0));
      for (int r = 0; r < count; ++r) {
        float* row = rows.data() + r * N;
        for (int64_t n = 0; n < N; ++n) row[n] = we[(k0 + r) * N + n] * su[k0 + r] * sv[n];
        if (options.hadamard) block_hadamard(row, N, options.hadamard);
      }
      for (int64_t n = 0; n < N; ++n)
        for (int r = 0; r < count; ++r) out[n * K + k0 + r] = rows[r * N + n];
    }
    if (options.hadamard)
      for (int64_t n = 0; n < N; ++n) block_hadamard(out + n * K, K, options.hadamard);
  }
};

// Picks the scale of every group of column `column` (K values) and writes scales and tile words.
template <int L>
void quantize_column(const Problem& p, const float* column, const Levels<L>& grid, int64_t e,
                     int64_t n, TrellisTensor& t, uint8_t* idx /* K scratch */) {
  const int gs = p.options.group_size;
  for (int64_t g = 0; g < p.groups(); ++g) {
    const int len = static_cast<int>(std::min<int64_t>(gs, p.K - g * gs));
    const GroupChoice c = choose_scale(column + g * gs, len, grid, p.options.search_scales);
    t.scales[(e * p.groups() + g) * p.N + n] = float_to_half(c.scale);
    assign(column + g * gs, len, grid.scaled(c.scale), idx + g * gs);
  }
  uint8_t* expert_tiles = t.indices.data() + e * t.tiles_k() * t.tiles_n() * tile_bytes(t.bits);
  for (int64_t kt = 0; kt < t.tiles_k(); ++kt) {
    uint8_t* tile = expert_tiles + tile_offset(kt, n / kTileDim, t.tiles_n(), t.bits);
    const int count = static_cast<int>(std::min<int64_t>(kTileDim, p.K - kt * kTileDim));
    store_column_word(tile, static_cast<int>(n % kTileDim), t.bits, idx + kt * kTileDim, count);
  }
}

// Fits the grid on a sample of rotated columns (GridKind::fit): weighted Lloyd-Max alternating with
// the scale search. Returns the grid with the lowest sample error, the uniform start included.
template <int L>
std::vector<float> fit_grid(const Problem& p, std::vector<float> grid, int threads) {
  // Sample: columns of up to kFitSampleExperts evenly spaced experts, evenly spaced columns.
  const int64_t sample_experts = std::min<int64_t>(p.experts, kFitSampleExperts);
  const int64_t columns_per_expert = std::clamp<int64_t>(
      kFitSampleValues / (sample_experts * p.K), 1, p.N);
  std::vector<float> sample;  // columns of K values
  {
    std::vector<float> we(p.K * p.N), rotated(p.K * p.N);
    for (int64_t s = 0; s < sample_experts; ++s) {
      const int64_t e = s * p.experts / sample_experts;
      p.load(e, 1, we.data());
      p.target(e, we.data(), rotated.data());
      for (int64_t c = 0; c < columns_per_expert; ++c) {
        const float* col = rotated.data() + (c * p.N / columns_per_expert) * p.K;
        sample.insert(sample.end(), col, col + p.K);
      }
    }
  }
  const int64_t columns = static_cast<int64_t>(sample.size()) / p.K;
  const int gs = p.options.group_size;
  const int64_t groups = p.groups();
  std::vector<GroupChoice> choice(columns * groups);

  std::vector<float> best_grid = grid;
  double best_error = std::numeric_limits<double>::infinity();
  for (int iteration = 0; iteration <= kFitIterations; ++iteration) {
    const Levels<L> levels(grid);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t i = 0; i < columns * groups; ++i) {
      const int64_t c = i / groups, g = i % groups;
      const int len = static_cast<int>(std::min<int64_t>(gs, p.K - g * gs));
      choice[i] = choose_scale(sample.data() + c * p.K + g * gs, len, levels, true);
    }
    double error = 0;
    for (const GroupChoice& c : choice) error += c.error;
    if (error < best_error) {
      best_error = error;
      best_grid = grid;
    }
    if (iteration == kFitIterations) break;
    // Lloyd step with scales and assignments fixed: the error sum_g s_g^2 (v/s_g - level)^2 is
    // minimised by level_j = sum(s v) / sum(s^2) over the weights assigned to level j.
    std::array<double, L> numerator{}, denominator{};
    for (int64_t i = 0; i < columns * groups; ++i) {
      const float s = choice[i].scale;
      if (s == 0) continue;
      const int64_t c = i / groups, g = i % groups;
      const int len = static_cast<int>(std::min<int64_t>(gs, p.K - g * gs));
      const Levels<L> scaled = levels.scaled(s);
      for (int j = 0; j < len; ++j) {
        const float v = sample[c * p.K + g * gs + j];
        int index = 0;
        for (int t = 0; t < L - 1; ++t) index += v > scaled.threshold[t];
        numerator[index] += static_cast<double>(s) * v;
        denominator[index] += static_cast<double>(s) * s;
      }
    }
    for (int j = 0; j < L; ++j)
      if (denominator[j] > 0) grid[j] = static_cast<float>(numerator[j] / denominator[j]);
    std::sort(grid.begin(), grid.end());
  }
  return best_grid;
}

// Squared error ||W_e - W_hat_e||^2 and ||W_e||^2 of expert e, W_hat the effective weight
// (format.cpp) of what was stored: the true error, rotation included.
void expert_error(const Problem& p, const TrellisTensor& t, int64_t e, const float* we,
                  std::vector<double>& w_hat, double& error, double& norm) {
  effective_weight(t, e, w_hat);
  error = norm = 0;
  for (int64_t i = 0; i < p.K * p.N; ++i) {
    const double d = we[i] - w_hat[i];
    error += d * d;
    norm += static_cast<double>(we[i]) * we[i];
  }
}

// Per-expert sums, added in expert order at the end: the same totals for any thread count.
struct ErrorSums {
  std::vector<double> error, norm;
};

template <int L>
void quantize_all(const Problem& p, TrellisTensor& t, int threads, ErrorSums* sums,
                  const std::function<void(int64_t, int64_t)>& progress) {
  if (p.options.grid == GridKind::fit) t.grid = fit_grid<L>(p, t.grid, threads);
  const Levels<L> grid(t.grid);
  // Experts are loaded a chunk at a time: the weights of one projection never need to fit in memory
  // at once (DeepSeek-V3: 256 x 7168 x 2048 fp32 = 15 GB).
  const int64_t chunk = std::clamp<int64_t>(kChunkFloats / (p.K * p.N), 1, p.experts);
  std::vector<float> raw(chunk * p.K * p.N), rotated(chunk * p.K * p.N);
  const int64_t blocks = t.tiles_n();  // a column block = the 16 columns of one tile column
  for (int64_t first = 0; first < p.experts; first += chunk) {
    const int64_t count = std::min(chunk, p.experts - first);
    p.load(first, count, raw.data());
    float max_w = 0;
    for (int64_t i = 0; i < count * p.K * p.N; ++i) max_w = std::max(max_w, std::fabs(raw[i]));
    require(max_w <= kMaxHalf * grid.max_abs,
            "quantize: max |W| = {} needs a scale above the fp16 maximum {}", max_w, kMaxHalf);
    std::vector<float> su, sv;
    for (int64_t e = first; e < first + count; ++e) {
      p.signs(e, su, sv);
      for (int64_t k = 0; k < p.K; ++k) t.su[e * p.K + k] = float_to_half(su[k]);
      for (int64_t n = 0; n < p.N; ++n) t.sv[e * p.N + n] = float_to_half(sv[n]);
    }
#pragma omp parallel num_threads(threads)
    {
      // Targets: one expert per thread (the transforms need the whole matrix).
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < count; ++i)
        p.target(first + i, raw.data() + i * p.K * p.N, rotated.data() + i * p.K * p.N);
      std::vector<uint8_t> idx(t.tiles_k() * kTileDim);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < count * blocks; ++task) {
        const int64_t i = task / blocks, block = task % blocks;
        for (int64_t n = block * kTileDim; n < std::min(p.N, (block + 1) * kTileDim); ++n)
          quantize_column(p, rotated.data() + (i * p.N + n) * p.K, grid, first + i, n, t, idx.data());
      }
      if (sums) {
        std::vector<double> w_hat(p.K * p.N);
#pragma omp for schedule(dynamic, 1)
        for (int64_t e = first; e < first + count; ++e)
          expert_error(p, t, e, raw.data() + (e - first) * p.K * p.N, w_hat, sums->error[e], sums->norm[e]);
      }
    }
    if (progress)
      for (int64_t e = first; e < first + count; ++e) progress(e + 1, p.experts);
  }
}

void validate(int64_t experts, int64_t K, int64_t N, const QuantizeOptions& o) {
  require(valid_bits(o.bits), "quantize: bits must be 2, 3 or 4, got {}", o.bits);
  require(o.group_size > 0 && o.group_size % kTileDim == 0,
          "quantize: group_size must be a positive multiple of 16, got {}", o.group_size);
  require(experts > 0 && K > 0 && N > 0, "quantize: bad geometry experts={} K={} N={}", experts, K, N);
  if (o.hadamard != 0) {
    require(is_power_of_two(o.hadamard), "quantize: hadamard block must be 0 or a power of two, got {}",
            o.hadamard);
    require(K % o.hadamard == 0 && N % o.hadamard == 0,
            "quantize: hadamard block {} must divide K={} and N={}", o.hadamard, K, N);
  }
  require(o.threads >= 0, "quantize: threads must be >= 0, got {}", o.threads);
}

}  // namespace

TrellisTensor quantize(const ExpertLoader& load, int64_t experts, int64_t K, int64_t N,
                       const QuantizeOptions& options, QuantizeReport* report,
                       const std::function<void(int64_t, int64_t)>& progress) {
  validate(experts, K, N, options);
  require(static_cast<bool>(load), "quantize: no expert loader");
  const int threads = options.threads > 0 ? options.threads : omp_get_max_threads();
  const Problem p{load, experts, K, N, options};
  TrellisTensor t = TrellisTensor::zeros(experts, K, N, options.bits, options.group_size,
                                         options.hadamard);
  ErrorSums sums{std::vector<double>(report ? experts : 0), std::vector<double>(report ? experts : 0)};
  dispatch_bits(options.bits, [&](auto bits) {
    quantize_all<1 << bits>(p, t, threads, report ? &sums : nullptr, progress);
  });
  if (report) {
    double error = 0, norm = 0;
    for (int64_t e = 0; e < experts; ++e) {
      error += sums.error[e];
      norm += sums.norm[e];
    }
    report->relative_error = norm > 0 ? std::sqrt(error / norm) : (error > 0 ? INFINITY : 0.0);
    report->sqnr_db = error > 0 ? 10.0 * std::log10(norm / error) : INFINITY;
  }
  return t;
}

TrellisTensor quantize(std::span<const float> w, int64_t experts, int64_t K, int64_t N,
                       const QuantizeOptions& options, QuantizeReport* report,
                       const std::function<void(int64_t, int64_t)>& progress) {
  validate(experts, K, N, options);
  require(w.size() == static_cast<size_t>(experts * K * N),
          "quantize: W holds {} values, experts x K x N = {} x {} x {} needs {}", w.size(), experts,
          K, N, experts * K * N);
  const ExpertLoader from_memory = [&](int64_t first, int64_t count, std::span<float> out) {
    std::copy_n(w.data() + first * K * N, count * K * N, out.data());
  };
  return quantize(from_memory, experts, K, N, options, report, progress);
}

}  // namespace tmoe

// The CPU backend (issue 3): the whole MoE block over repacked Trellis weights.
//
// One forward() runs these phases inside one OpenMP region:
//   1. prepare: per routed (token, slot) pair, in routing-plan order ("slot" s), the gate and up
//      inputs  T(x_t . su_e)  (fp32, zero-padded to whole tiles);
//   2. gate/up: per (expert, unit of 16 intermediate columns): both projections of all the expert's
//      tokens from one read of its weights (tiles decoded in registers, each decoded row used for
//      a block of tokens), then T, sv, SwiGLU and down's su, written to h[s];
//   3. down's input rotation T on h (only with Hadamard);
//   4. down: per unit of hidden columns: every active expert in increasing id, its tokens' outputs
//      T-rotated, times sv and the router weight, summed straight into the fp32 output rows;
//   5. conversion to the output dtype.
// Every output element is computed by one thread in a fixed order, so the bits do not depend on
// the thread count. Threads split every projection's output columns into fixed contiguous shares. Buffers live in the backend (the workspace) and only grow.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../backends.hpp"
#include "cpu/cpu_kernels.hpp"
#include "cpu/phase_barrier.hpp"
#include "cpu/cpu_weights.hpp"
#include "tmoe/error.hpp"
#include "tmoe/hadamard.hpp"
#include "tmoe/routing.hpp"

namespace tmoe::detail {
namespace {

using cpu::kMaxRowBlock;
using cpu::PackedProjection;

// Columns a work item owns: whole tiles and whole Hadamard blocks, so T stays inside one item.
int64_t unit_columns(int hadamard_a, int hadamard_b = 0) {
  return std::max<int64_t>({kTileDim, hadamard_a, hadamard_b});
}

cpu::TileColumn tile_column(const PackedProjection& p, int64_t e, int64_t n_tile) {
  return {p.column(e, n_tile), p.column_scales(e, n_tile), p.grid16.data(), p.tiles_k,
          p.tiles_per_group, p.bits};
}

// out[t][0 .. columns) for a block of rows, tile column by tile column (out row stride `stride`).
void project_unit(const PackedProjection& p, int64_t e, int64_t n0, int64_t columns,
                  const float* const* rows, int count, float* out, int64_t stride) {
  for (int64_t c = 0; c < columns; c += kTileDim)
    cpu::project_column(tile_column(p, e, (n0 + c) / kTileDim), rows, count, out + c, stride);
}

template <typename T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

class CpuBackend final : public MoeBackend {
 public:
  CpuBackend(const MoeWeights& weights, const ForwardOptions& options)
      : gate_(cpu::pack_projection(weights.gate)),
        up_(cpu::pack_projection(weights.up)),
        down_(cpu::pack_projection(weights.down)),
        hidden_(weights.gate.K),
        inter_(weights.gate.N),
        experts_(static_cast<int>(weights.gate.experts)),
        threads_(options.threads > 0 ? options.threads : omp_get_max_threads()),
        same_input_(gate_.hadamard == up_.hadamard && gate_.su == up_.su) {}

  std::string name() const override { return "cpu"; }

  void forward(const MoeBatch& b) override {
    require(b.tokens >= 0 && b.top_k > 0, "bad batch: tokens={} top_k={}", b.tokens, b.top_k);
    if (b.tokens == 0) return;
    require(b.x && b.expert_ids && b.expert_probs && b.out,
            "cpu backend: x, expert_ids, expert_probs and out must all be set");
    const int64_t T = b.tokens;
    const int k = b.top_k;
    make_routing_plan({b.expert_ids, static_cast<size_t>(T * k)}, T, k, experts_, plan_);
    const int64_t slots = plan_.routed_pairs();

    active_.clear();
    for (int e = 0; e < experts_; ++e)
      if (plan_.counts[e] > 0) active_.push_back(e);

    const int64_t hid_pad = gate_.padded_K(), inter_pad = down_.padded_K();
    const int64_t unit_i = unit_columns(gate_.hadamard, up_.hadamard);
    const int64_t unit_h = unit_columns(down_.hadamard);
    const int64_t units_i = ceil_div(inter_, unit_i), units_h = ceil_div(hidden_, unit_h);
    grow(xg_, slots * hid_pad);
    if (!same_input_) grow(xu_, slots * hid_pad);
    grow(h_, slots * inter_pad);
    grow(out32_, T * hidden_);
    const int64_t scratch_per_thread = 2 * kMaxRowBlock * unit_i + kMaxRowBlock * unit_h;
    grow(scratch_, threads_ * scratch_per_thread);
    grow(row_ptrs_, static_cast<size_t>(threads_) * 2 * kMaxRowBlock);

#pragma omp parallel num_threads(threads_)
    {
      const int me = omp_get_thread_num();
      float* scratch = scratch_.data() + me * scratch_per_thread;
      const float** row_ptr = row_ptrs_.data() + me * 2 * kMaxRowBlock;

      const int team = omp_get_num_threads();

      // 1. inputs of gate and up, per slot
#pragma omp for schedule(static) nowait
      for (int64_t s = 0; s < slots; ++s) {
        const int32_t pair = plan_.order[s];
        const int64_t t = pair / k;
        const int e = b.expert_ids[pair];
        prepare_input(gate_, e, b.x, b.x_dtype, t, xg_.data() + s * hid_pad);
        if (!same_input_) prepare_input(up_, e, b.x, b.x_dtype, t, xu_.data() + s * hid_pad);
        float* h = h_.data() + s * inter_pad;
        std::fill(h + inter_, h + inter_pad, 0.0f);
      }
      barrier_.arrive_and_wait(team);

      // Each thread owns a fixed contiguous share of the column units of every projection, so
      // it streams long runs of each expert's weights and needs no scheduling; results do not
      // depend on the share (every output element is computed whole by one thread).
      const auto share = [&](int64_t units) {
        return std::pair<int64_t, int64_t>{units * me / team, units * (me + 1) / team};
      };

      // 2. gate and up in one pass over each selected expert, SwiGLU fused
      const float* xu_base = same_input_ ? xg_.data() : xu_.data();
      const auto [gate_begin, gate_end] = share(units_i);
      for (const int e : active_) {
        for (int64_t unit = gate_begin; unit < gate_end; ++unit) {
          const int64_t n0 = unit * unit_i;
          const int64_t columns = std::min(unit_i, round_up_tile(inter_ - n0));
          const int64_t valid = std::min(unit_i, inter_ - n0);
          float* g = scratch;
          float* u = scratch + kMaxRowBlock * unit_i;
          for (int32_t s0 = plan_.offsets[e]; s0 < plan_.offsets[e + 1]; s0 += kMaxRowBlock) {
            const int count = std::min<int>(kMaxRowBlock, plan_.offsets[e + 1] - s0);
            const float** gate_rows = row_ptr;
            const float** up_rows = row_ptr + kMaxRowBlock;
            for (int r = 0; r < count; ++r) {
              gate_rows[r] = xg_.data() + (s0 + r) * hid_pad;
              up_rows[r] = xu_base + (s0 + r) * hid_pad;
            }
            project_unit(gate_, e, n0, columns, gate_rows, count, g, unit_i);
            project_unit(up_, e, n0, columns, up_rows, count, u, unit_i);
            for (int r = 0; r < count; ++r) {
              float* gr = g + r * unit_i;
              float* ur = u + r * unit_i;
              finish_output(gate_, e, n0, valid, gr);
              finish_output(up_, e, n0, valid, ur);
              cpu::swiglu(gr, ur, down_.expert_su(e) + n0, valid);
              std::memcpy(h_.data() + (s0 + r) * inter_pad + n0, gr, valid * sizeof(float));
            }
          }
        }
      }
      barrier_.arrive_and_wait(team);

      // 3. down's input rotation
      if (down_.hadamard) {
#pragma omp for schedule(static) nowait
        for (int64_t s = 0; s < slots; ++s) cpu::hadamard(h_.data() + s * inter_pad, inter_, down_.hadamard);
        barrier_.arrive_and_wait(team);
      }

      // 4. down, weighted and summed over the token's experts (in increasing id) into fp32 rows
      const auto [down_begin, down_end] = share(units_h);
      const int64_t col_begin = down_begin * unit_h, col_end = std::min(hidden_, down_end * unit_h);
      if (col_begin < col_end)
        for (int64_t t = 0; t < T; ++t)
          std::fill(out32_.data() + t * hidden_ + col_begin, out32_.data() + t * hidden_ + col_end, 0.0f);
      float* z = scratch;
      for (const int e : active_) {
        for (int64_t unit = down_begin; unit < down_end; ++unit) {
          const int64_t n0 = unit * unit_h;
          const int64_t columns = std::min(unit_h, round_up_tile(hidden_ - n0));
          const int64_t valid = std::min(unit_h, hidden_ - n0);
          const float* sv = down_.expert_sv(e) + n0;
          for (int32_t s0 = plan_.offsets[e]; s0 < plan_.offsets[e + 1]; s0 += kMaxRowBlock) {
            const int count = std::min<int>(kMaxRowBlock, plan_.offsets[e + 1] - s0);
            for (int r = 0; r < count; ++r) row_ptr[r] = h_.data() + (s0 + r) * inter_pad;
            project_unit(down_, e, n0, columns, row_ptr, count, z, unit_h);
            for (int r = 0; r < count; ++r) {
              const int32_t pair = plan_.order[s0 + r];
              float* zr = z + r * unit_h;
              if (down_.hadamard) cpu::hadamard(zr, valid, down_.hadamard);
              const float p = b.expert_probs[pair];
              float* o = out32_.data() + (pair / k) * hidden_ + n0;
              for (int64_t i = 0; i < valid; ++i) o[i] += p * sv[i] * zr[i];
            }
          }
        }
      }

      // 5. this thread's columns to the output dtype
      if (col_begin < col_end) {
        for (int64_t t = 0; t < T; ++t) {
          const float* src = out32_.data() + t * hidden_;
          if (b.out_dtype == DType::f32) {
            std::memcpy(static_cast<float*>(b.out) + t * hidden_ + col_begin, src + col_begin,
                        (col_end - col_begin) * sizeof(float));
          } else {
            for (int64_t i = col_begin; i < col_end; ++i)
              store_from_float(b.out, t * hidden_ + i, b.out_dtype, src[i]);
          }
        }
      }
    }
  }

 private:
  static int64_t round_up_tile(int64_t n) { return ceil_div(n, kTileDim) * kTileDim; }

  // dst[0 .. padded K) = T(x_t . su_e), zero past K.
  void prepare_input(const PackedProjection& p, int e, const void* x, DType x_dtype, int64_t t,
                     float* dst) const {
    const float* su = p.expert_su(e);
    for (int64_t i = 0; i < p.K; ++i) dst[i] = load_as_float(x, t * p.K + i, x_dtype) * su[i];
    std::fill(dst + p.K, dst + p.padded_K(), 0.0f);
    if (p.hadamard) cpu::hadamard(dst, p.K, p.hadamard);
  }

  // An output row of `valid` columns starting at n0: y <- T(y) . sv.
  static void finish_output(const PackedProjection& p, int e, int64_t n0, int64_t valid, float* y) {
    if (p.hadamard) cpu::hadamard(y, valid, p.hadamard);
    const float* sv = p.expert_sv(e) + n0;
    for (int64_t i = 0; i < valid; ++i) y[i] *= sv[i];
  }

  const PackedProjection gate_, up_, down_;
  const int64_t hidden_, inter_;
  const int experts_;
  const int threads_;
  const bool same_input_;  // gate and up see the same T(x . su): prepare it once
  // workspace, reused across calls
  cpu::PhaseBarrier barrier_;
  RoutingPlan plan_;
  std::vector<int> active_;
  std::vector<float> xg_, xu_, h_, out32_, scratch_;
  std::vector<const float*> row_ptrs_;
};

}  // namespace

std::unique_ptr<MoeBackend> make_cpu_backend(const MoeWeights& weights, const ForwardOptions& options) {
  weights.validate();
  return std::make_unique<CpuBackend>(weights, options);
}

}  // namespace tmoe::detail

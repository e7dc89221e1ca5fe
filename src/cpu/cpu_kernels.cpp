// SIMD kernels of the CPU backend, compiled once per Highway target (foreach_target) and picked at
// run time. Decoding follows the lane-word layout of cpu_weights.hpp: a vector holds 16 (or 8, 4)
// output columns, row k of a tile is `lane_word >> (bits * r)` looked up in the 16-entry grid, i.e.
// trellis_decode.hpp's column_index done for 16 columns at once.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/cpu_kernels.cpp"
// SSSE3/SSE4 add compile time and nothing this project needs: x86 gets AVX-512, AVX2 and the
// portable baseline; ARM gets NEON. Scalable-vector targets (SVE, RVV) are off: the kernels size
// their register blocks from the compile-time lane count, which those targets do not fix.
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS \
  (HWY_SSSE3 | HWY_SSE4 | HWY_SVE | HWY_SVE2 | HWY_SVE_256 | HWY_SVE2_128 | HWY_RVV)
#endif
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>

#include "cpu/cpu_kernels.hpp"
#include "tmoe/hadamard.hpp"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace tmoe::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// At most 16 float lanes: one vector covers (a part of) one tile column.
using DF = hn::CappedTag<float, 16>;
using DU = hn::RebindToUnsigned<DF>;
using DI = hn::RebindToSigned<DF>;
using VF = hn::Vec<DF>;
using VU = hn::Vec<DU>;

constexpr size_t kLanes = hn::MaxLanes(DF());
static_assert(16 % kLanes == 0, "a tile row must be whole vectors");
constexpr int kVecs = static_cast<int>(16 / kLanes);  // vectors per tile row

// Token rows one register-blocked pass handles: the accumulators must fit the register file
// (32 vector registers with AVX-512, 16 with AVX2/NEON) beside the decoded row.
#ifndef TMOE_CPU_AVX3_TOKENS
#define TMOE_CPU_AVX3_TOKENS 8
#endif
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
constexpr int kTokensPerPass = TMOE_CPU_AVX3_TOKENS;
#else
constexpr int kTokensPerPass = kVecs == 2 ? 4 : 2;
#endif
static_assert(kTokensPerPass <= kMaxRowBlock, "callers pass at most kMaxRowBlock rows");

// How far ahead of the tile being decoded to prefetch weights (bytes): 4 KB measured best of
// 0 / 1 / 2 / 4 / 8 KB (docs/notes-cpu.md).
#ifndef TMOE_CPU_PREFETCH_BYTES
#define TMOE_CPU_PREFETCH_BYTES 4096
#endif
constexpr int kPrefetchBytes = TMOE_CPU_PREFETCH_BYTES;

template <class F, int... I>
HWY_INLINE void UnrollImpl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
// f(integral_constant<int, i>) for i = 0 .. N-1, fully unrolled (shift counts become immediates).
template <int N, class F>
HWY_INLINE void Unroll(F&& f) {
  UnrollImpl(f, std::make_integer_sequence<int, N>{});
}

// The grid as lookup table(s): 16 entries (bits < 4 repeat the levels, so the lookup may ignore
// index bits above the field).
struct Grid {
  VF lo, hi;  // entries [0, kLanes) and [kLanes, 2 * kLanes)
};

HWY_INLINE Grid LoadGrid(const float* grid16) {
  const DF d;
  Grid g;
  g.lo = hn::LoadU(d, grid16);
  g.hi = kLanes < 16 ? hn::LoadU(d, grid16 + kLanes) : g.lo;
  return g;
}

// grid[low `BITS` bits of each lane of `index`]; the higher bits of `index` are other rows.
template <int BITS>
HWY_INLINE VF Lookup(const Grid& grid, const float* grid16, VU index) {
  const DF d;
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  // vpermps reads only the low 4 index bits; grid16 repeats levels, so no mask is needed.
  (void)grid16;
  return VF{_mm512_permutexvar_ps(index.raw, grid.lo.raw)};
#else
  const DU du;
  const DI di;
  constexpr uint32_t kLevels = 1u << BITS;
  if constexpr (kLevels <= kLanes) {
    const VU masked = hn::And(index, hn::Set(du, kLanes - 1));
    return hn::TableLookupLanes(grid.lo, hn::IndicesFromVec(d, hn::BitCast(di, masked)));
  } else if constexpr (kLevels == 2 * kLanes) {
    const VU masked = hn::And(index, hn::Set(du, kLanes - 1));
    const auto lanes = hn::IndicesFromVec(d, hn::BitCast(di, masked));
    const auto upper = hn::RebindMask(d, hn::TestBit(index, hn::Set(du, kLanes)));
    return hn::IfThenElse(upper, hn::TableLookupLanes(grid.hi, lanes),
                          hn::TableLookupLanes(grid.lo, lanes));
  } else {
    const VU masked = hn::And(index, hn::Set(du, kLevels - 1));
    return hn::GatherIndex(d, grid16, hn::BitCast(di, masked));
  }
#endif
}

// TOKENS rows against one tile column, with CHAINS independent accumulators per row (split by
// k row) so a short token block still keeps several FMAs in flight. The scale is applied once per
// group: out += scale * (sum over the group's rows).
template <int BITS, int TOKENS, int CHAINS>
HWY_NOINLINE void ProjectBlock(const TileColumn& col, const float* const* rows, float* out,
                               int64_t out_stride) {
  const DF d;
  const DU du;
  const hn::Rebind<hwy::float16_t, DF> dh;
  const Grid grid = LoadGrid(col.grid16);
  constexpr int kTileBytes = 256 * BITS / 8;
  constexpr int kRowsPerWord = BITS == 2 ? 16 : 8;

  for (int t = 0; t < TOKENS; ++t)
    for (int j = 0; j < kVecs; ++j) hn::StoreU(hn::Zero(d), d, out + t * out_stride + j * kLanes);

  // One pointer per token row, advanced a tile at a time, so the 16 row reads of a tile are
  // constant offsets from it (GCC otherwise keeps 16 induction pointers and spills them).
  const float* x[TOKENS];
  for (int t = 0; t < TOKENS; ++t) x[t] = rows[t];
  const uint8_t* tile = col.words;
  for (int64_t k_tile = 0, group = 0; k_tile < col.tiles_k; ++group) {
    const int64_t group_end = std::min(col.tiles_k, k_tile + col.tiles_per_group);
    VF sum[CHAINS][TOKENS][kVecs];
    for (int c = 0; c < CHAINS; ++c)
      for (int t = 0; t < TOKENS; ++t)
        for (int j = 0; j < kVecs; ++j) sum[c][t][j] = hn::Zero(d);

    for (; k_tile < group_end; ++k_tile, tile += kTileBytes) {
      // Weights stream from memory: ask for them early (the next columns of this thread's share
      // follow this one contiguously). Prefetches past the end are harmless.
      hwy::Prefetch(tile + kPrefetchBytes);
      for (int j = 0; j < kVecs; ++j) {
        const uint32_t* lo_words = reinterpret_cast<const uint32_t*>(tile) + j * kLanes;
        const VU lo = hn::LoadU(du, lo_words);
        VU hi = lo;
        if constexpr (BITS == 3) {
          const hn::Rebind<uint16_t, DU> du16;
          const uint16_t* hi16 = reinterpret_cast<const uint16_t*>(tile + 64) + j * kLanes;
          hi = hn::Or(hn::ShiftRight<24>(lo), hn::ShiftLeft<8>(hn::PromoteTo(du, hn::LoadU(du16, hi16))));
        } else if constexpr (BITS == 4) {
          hi = hn::LoadU(du, reinterpret_cast<const uint32_t*>(tile + 64) + j * kLanes);
        }
        Unroll<16>([&](auto r) {
          constexpr int kRow = decltype(r)::value;
          constexpr int kShift = (kRow % kRowsPerWord) * BITS;
          const VU word = kRow < kRowsPerWord ? lo : hi;
          const VF w = Lookup<BITS>(grid, col.grid16, hn::ShiftRight<kShift>(word));
          for (int t = 0; t < TOKENS; ++t) {
            VF& s = sum[kRow % CHAINS][t][j];
            s = hn::MulAdd(w, hn::Set(d, x[t][kRow]), s);
          }
        });
      }
      for (int t = 0; t < TOKENS; ++t) x[t] += 16;
    }
    const uint16_t* scales = col.scales + (group * 16);
    for (int j = 0; j < kVecs; ++j) {
      const VF scale = hn::PromoteTo(
          d, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(scales) + j * kLanes));
      for (int t = 0; t < TOKENS; ++t) {
        VF total = sum[0][t][j];
        for (int c = 1; c < CHAINS; ++c) total = hn::Add(total, sum[c][t][j]);
        float* o = out + t * out_stride + j * kLanes;
        hn::StoreU(hn::MulAdd(total, scale, hn::LoadU(d, o)), d, o);
      }
    }
  }
}

template <int BITS, int TOKENS>
HWY_INLINE void ProjectBlockFor(const TileColumn& col, const float* const* rows, float* out,
                                int64_t out_stride) {
  // Enough independent FMA chains to cover the FMA latency: 2 FMA pipes x 4 cycles = 8 in flight.
  // (With 4 chains, one token ran at one tile row per FMA latency: 16 cycles a tile.)
  constexpr int kAccumulators = TOKENS * kVecs;
  constexpr int kChains = kAccumulators >= 8 ? 1 : kAccumulators >= 4 ? 2 : kAccumulators >= 2 ? 4 : 8;
  ProjectBlock<BITS, TOKENS, kChains>(col, rows, out, out_stride);
}

// Calls ProjectBlockFor<BITS, n> for a runtime n in [1, kTokensPerPass].
template <int BITS, int N = 1>
HWY_INLINE void ProjectBlockOf(int n, const TileColumn& col, const float* const* rows, float* out,
                               int64_t out_stride) {
  if constexpr (N <= kTokensPerPass) {
    if (n == N) return ProjectBlockFor<BITS, N>(col, rows, out, out_stride);
    ProjectBlockOf<BITS, N + 1>(n, col, rows, out, out_stride);
  }
}

template <int BITS>
void ProjectColumnBits(const TileColumn& col, const float* const* rows, int count, float* out,
                       int64_t out_stride) {
  while (count > 0) {
    const int n = std::min(count, kTokensPerPass);
    ProjectBlockOf<BITS>(n, col, rows, out, out_stride);
    rows += n;
    out += n * out_stride;
    count -= n;
  }
}

void ProjectColumn(const TileColumn& col, const float* const* rows, int count, float* out,
                   int64_t out_stride) {
  switch (col.bits) {
    case 2: return ProjectColumnBits<2>(col, rows, count, out, out_stride);
    case 4: return ProjectColumnBits<4>(col, rows, count, out, out_stride);
    default: return ProjectColumnBits<3>(col, rows, count, out, out_stride);
  }
}

void SwiGlu(float* gate, const float* up, const float* post, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const auto one = hn::Set(d, 1.0f);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto g = hn::LoadU(d, gate + i);
    const auto silu = hn::Div(g, hn::Add(one, hn::Exp(d, hn::Neg(g))));
    hn::StoreU(hn::Mul(hn::Mul(silu, hn::LoadU(d, up + i)), hn::LoadU(d, post + i)), d, gate + i);
  }
  if (i < n) {  // tail through a padded copy, so every element sees the same arithmetic
    HWY_ALIGN float g[hn::MaxLanes(d)] = {}, u[hn::MaxLanes(d)] = {}, p[hn::MaxLanes(d)] = {};
    for (int64_t j = i; j < n; ++j) g[j - i] = gate[j], u[j - i] = up[j], p[j - i] = post[j];
    const auto gv = hn::Load(d, g);
    const auto silu = hn::Div(gv, hn::Add(one, hn::Exp(d, hn::Neg(gv))));
    hn::Store(hn::Mul(hn::Mul(silu, hn::Load(d, u)), hn::Load(d, p)), d, g);
    for (int64_t j = i; j < n; ++j) gate[j] = g[j - i];
  }
}

// The normalized block Walsh-Hadamard transform of hadamard.hpp, same butterflies in the same
// order (so the same bits), vectorized: stages whose pairs are `len` < kLanes apart run inside a
// vector (lane i meets lane i ^ len), wider stages pair whole vectors.
void Hadamard(float* v, int64_t n, int block) {
  const DF d;
  const DI di;
  const int64_t whole = block >= static_cast<int>(kLanes) ? n / block * block
                                                          : n / kLanes * kLanes;
  for (int len = 1; len < block && len < static_cast<int>(kLanes); len <<= 1) {
    HWY_ALIGN int32_t partner[kLanes];
    HWY_ALIGN float sign[kLanes];
    for (size_t i = 0; i < kLanes; ++i) {
      partner[i] = static_cast<int32_t>(i ^ static_cast<size_t>(len));
      sign[i] = (i & static_cast<size_t>(len)) ? -1.0f : 1.0f;
    }
    const auto lanes = hn::IndicesFromVec(d, hn::Load(di, partner));
    const VF signs = hn::Load(d, sign);
    for (int64_t i = 0; i < whole; i += kLanes) {
      const VF x = hn::LoadU(d, v + i);
      // lower lane: x + partner; upper lane: partner - x (a - c with a the lower element)
      hn::StoreU(hn::MulAdd(signs, x, hn::TableLookupLanes(x, lanes)), d, v + i);
    }
  }
  for (int len = static_cast<int>(kLanes); len < block; len <<= 1) {
    for (int64_t base = 0; base < whole; base += block) {
      for (int i = 0; i < block; i += 2 * len) {
        for (int j = i; j < i + len; j += static_cast<int>(kLanes)) {
          const VF a = hn::LoadU(d, v + base + j), c = hn::LoadU(d, v + base + j + len);
          hn::StoreU(hn::Add(a, c), d, v + base + j);
          hn::StoreU(hn::Sub(a, c), d, v + base + j + len);
        }
      }
    }
  }
  const VF norm = hn::Set(d, static_cast<float>(1.0 / std::sqrt(static_cast<double>(block))));
  for (int64_t i = 0; i < whole; i += kLanes) hn::StoreU(hn::Mul(hn::LoadU(d, v + i), norm), d, v + i);
  if (whole < n) block_hadamard(v + whole, n - whole, block);  // blocks < kLanes past the last vector
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace tmoe::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tmoe::cpu {
HWY_EXPORT(ProjectColumn);
HWY_EXPORT(SwiGlu);
HWY_EXPORT(Hadamard);
HWY_EXPORT(TargetName);

void project_column(const TileColumn& column, const float* const* rows, int count, float* out,
                    int64_t out_stride) {
  HWY_DYNAMIC_DISPATCH(ProjectColumn)(column, rows, count, out, out_stride);
}
void swiglu(float* gate, const float* up, const float* post, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SwiGlu)(gate, up, post, n);
}
void hadamard(float* v, int64_t n, int block) { HWY_DYNAMIC_DISPATCH(Hadamard)(v, n, block); }
const char* simd_target_name() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }

void for_each_simd_target(void (*f)(const char* target, void* context), void* context) {
  for (const int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    f(hwy::TargetName(target), context);
  }
  hwy::SetSupportedTargetsForTest(0);
}
}  // namespace tmoe::cpu
#endif

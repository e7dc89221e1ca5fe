// round_to_grid.hpp, compiled once per Highway target (foreach_target) and dispatched at run time.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "quant/round_to_grid.cpp"
#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_SSE4)  // AVX-512, AVX2 and the portable baseline
#endif
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "hwy/highway.h"
#include "quant/round_to_grid.hpp"

HWY_BEFORE_NAMESPACE();
namespace tmoe::quant {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <int L>
RoundingError RoundImpl(const float* HWY_RESTRICT v, int len, const float* level,
                        const float* threshold) {
  const hn::ScalableTag<float> d;
  const int lanes = static_cast<int>(hn::Lanes(d));
  auto err = hn::Zero(d), vq = hn::Zero(d), qq = hn::Zero(d);
  int i = 0;
  for (; i + lanes <= len; i += lanes) {
    const auto x = hn::LoadU(d, v + i);
    auto q = hn::Set(d, level[0]);
    for (int t = 0; t < L - 1; ++t)  // a select chain: exact levels, any sorted grid
      q = hn::IfThenElse(hn::Gt(x, hn::Set(d, threshold[t])), hn::Set(d, level[t + 1]), q);
    const auto diff = hn::Sub(x, q);
    err = hn::MulAdd(diff, diff, err);
    vq = hn::MulAdd(x, q, vq);
    qq = hn::MulAdd(q, q, qq);
  }
  RoundingError r{hn::GetLane(hn::SumOfLanes(d, err)), hn::GetLane(hn::SumOfLanes(d, vq)),
                  hn::GetLane(hn::SumOfLanes(d, qq))};
  for (; i < len; ++i) {  // tail (only a last group of a K that is not a multiple of 16)
    float q = level[0];
    for (int t = 0; t < L - 1; ++t) q = v[i] > threshold[t] ? level[t + 1] : q;
    r.error += (v[i] - q) * (v[i] - q);
    r.vq += v[i] * q;
    r.qq += q * q;
  }
  return r;
}

RoundingError Round(const float* v, int len, const float* level, const float* threshold,
                    int levels) {
  switch (levels) {
    case 4: return RoundImpl<4>(v, len, level, threshold);
    case 16: return RoundImpl<16>(v, len, level, threshold);
    default: return RoundImpl<8>(v, len, level, threshold);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace tmoe::quant
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tmoe::quant {
HWY_EXPORT(Round);

RoundingError round_to_grid_error(const float* v, int len, const float* level,
                                  const float* threshold, int levels) {
  return HWY_DYNAMIC_DISPATCH(Round)(v, len, level, threshold, levels);
}

}  // namespace tmoe::quant
#endif

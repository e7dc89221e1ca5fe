// fp16 / bf16 <-> fp32 conversions, usable from host and device code.
// Host code keeps 16-bit floats as raw uint16_t bits; device code may reinterpret them as
// __half / __nv_bfloat16. Rounding is to nearest, ties to even (IEEE 754 default).
#pragma once

#include <cstdint>
#include <cstring>

#include "tmoe/config.hpp"

namespace tmoe {

TMOE_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

TMOE_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

TMOE_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

TMOE_HD uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u);  // inf, nan
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  const uint32_t biased = ax >> 23;
  if (biased < 113) {  // |f| < 2^-14: half subnormal (or zero), value = round(f * 2^24)
    if (biased < 102) return sign;  // below half the smallest subnormal
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - biased;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t h = ((biased - 112u) << 10) | ((ax >> 13) & 0x3ffu);
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carry may bump the exponent: correct
  return static_cast<uint16_t>(sign | h);
}

TMOE_HD float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

TMOE_HD uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Activation element types accepted at the API.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

TMOE_HD int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

TMOE_HD float load_as_float(const void* base, int64_t i, DType t) {
  if (t == DType::f32) return static_cast<const float*>(base)[i];
  const uint16_t v = static_cast<const uint16_t*>(base)[i];
  return t == DType::f16 ? half_to_float(v) : bf16_to_float(v);
}

TMOE_HD void store_from_float(void* base, int64_t i, DType t, float v) {
  if (t == DType::f32) {
    static_cast<float*>(base)[i] = v;
  } else {
    static_cast<uint16_t*>(base)[i] = t == DType::f16 ? float_to_half(v) : float_to_bf16(v);
  }
}

}  // namespace tmoe

// fp16 / bf16 conversions (include/tmoe/half.hpp) against IEEE 754 written out by hand.
// Every expected bit pattern below was derived from the IEEE 754 binary16 / bfloat16 layouts
// (sign | exponent | mantissa, round to nearest, ties to even), not from the code under test.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "tmoe/half.hpp"

using tmoe::bf16_to_float;
using tmoe::float_to_bf16;
using tmoe::float_to_half;
using tmoe::half_to_float;

namespace {

// The value of an fp16 bit pattern computed straight from the IEEE 754 definition (binary16:
// 1 sign, 5 exponent bits with bias 15, 10 mantissa bits).
double ieee_half_value(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 31, mantissa = h & 1023;
  const double s = sign ? -1.0 : 1.0;
  if (exponent == 0) return s * std::ldexp(mantissa, -24);  // subnormal: m * 2^-14 * 2^-10
  if (exponent == 31) return mantissa ? std::numeric_limits<double>::quiet_NaN()
                                      : s * std::numeric_limits<double>::infinity();
  return s * std::ldexp(1024 + mantissa, exponent - 15 - 10);
}

bool is_half_nan(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0; }
bool is_bf16_nan(uint16_t b) { return (b & 0x7f80) == 0x7f80 && (b & 0x007f) != 0; }

}  // namespace

TEST(Half, AllFp16PatternsDecodeToIeeeValueAndRoundTrip) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = half_to_float(h);
    const double want = ieee_half_value(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << "pattern 0x" << std::hex << bits;
      ASSERT_TRUE(is_half_nan(float_to_half(f))) << "NaN must stay NaN, pattern 0x" << std::hex << bits;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), want) << "pattern 0x" << std::hex << bits;
    ASSERT_EQ(std::signbit(f), (bits & 0x8000) != 0) << "pattern 0x" << std::hex << bits;
    ASSERT_EQ(float_to_half(f), h) << "round trip of pattern 0x" << std::hex << bits;
  }
}

TEST(Half, Fp16RoundingTiesToEven) {
  // Normal numbers near 1: the fp16 spacing is 2^-10 there.
  EXPECT_EQ(float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half(0.5f), 0x3800);
  EXPECT_EQ(float_to_half(0.1f), 0x2e66);  // 0.1 = 1.6 * 2^-4; 0.6*1024 = 614.4 -> 614 = 0x266
  // 1 + 2^-11 is exactly halfway between 0x3c00 (even mantissa) and 0x3c01: goes to the even one.
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  // 1 + 3*2^-11 is halfway between 0x3c01 (odd) and 0x3c02 (even): goes up.
  EXPECT_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  // Just above / below the halfway point rounds to nearest.
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01);
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11) - std::ldexp(1.0f, -20)), 0x3c00);
  EXPECT_EQ(float_to_half(-(1.0f + 3 * std::ldexp(1.0f, -11))), 0xbc02);
  // A mantissa carry into the exponent: 2 - 2^-11 is halfway between 0x3bff (odd, 2 - 2^-10)
  // and 2.0 = 0x4000 (even).
  EXPECT_EQ(float_to_half(2.0f - std::ldexp(1.0f, -11)), 0x4000);
  EXPECT_EQ(float_to_half(0.0f), 0x0000);
  EXPECT_EQ(float_to_half(-0.0f), 0x8000);
}

TEST(Half, Fp16Subnormals) {
  // Subnormals are m * 2^-24, m = 1..1023.
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);         // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1023.0f, -24)), 0x03ff);      // largest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400);         // smallest normal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);         // tie between 0 and 1 -> 0 (even)
  EXPECT_EQ(float_to_half(std::ldexp(1.5f, -25)), 0x0001);         // 0.75 units -> 1
  EXPECT_EQ(float_to_half(std::ldexp(3.0f, -25)), 0x0002);         // 1.5 units: tie -> 2 (even)
  EXPECT_EQ(float_to_half(std::ldexp(5.0f, -25)), 0x0002);         // 2.5 units: tie -> 2 (even)
  EXPECT_EQ(float_to_half(std::ldexp(2047.0f, -25)), 0x0400);      // 1023.5 units: tie -> 1024 = normal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -26)), 0x0000);         // far below: zero
  EXPECT_EQ(float_to_half(-std::ldexp(1.0f, -26)), 0x8000);        // keeps its sign
  EXPECT_EQ(float_to_half(-std::ldexp(7.0f, -24)), 0x8007);
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x83ff), -std::ldexp(1023.0f, -24));
}

TEST(Half, Fp16OverflowAndSpecials) {
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);  // largest finite fp16
  EXPECT_EQ(float_to_half(65519.0f), 0x7bff);  // below the halfway point to 65536
  // 65520 is halfway between 65504 (odd mantissa 0x3ff) and 65536 (even, but not representable):
  // ties-to-even picks 65536, which overflows to infinity.
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_half(1.0e6f), 0x7c00);
  EXPECT_EQ(float_to_half(-1.0e6f), 0xfc00);
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(float_to_half(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(float_to_half(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_TRUE(is_half_nan(float_to_half(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(is_half_nan(float_to_half(-std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload sits only in the low float mantissa bits must not become infinity.
  EXPECT_TRUE(is_half_nan(float_to_half(tmoe::bits_float(0x7f800001u))));
  EXPECT_TRUE(std::isinf(half_to_float(0x7c00)) && half_to_float(0x7c00) > 0);
  EXPECT_TRUE(std::isinf(half_to_float(0xfc00)) && half_to_float(0xfc00) < 0);
  EXPECT_TRUE(std::isnan(half_to_float(0x7e00)));
  EXPECT_TRUE(std::isnan(half_to_float(0xfc01)));
}

TEST(Bf16, AllPatternsRoundTrip) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t b = static_cast<uint16_t>(bits);
    const float f = bf16_to_float(b);
    if (is_bf16_nan(b)) {
      ASSERT_TRUE(std::isnan(f)) << "pattern 0x" << std::hex << bits;
      ASSERT_TRUE(is_bf16_nan(float_to_bf16(f))) << "NaN must stay NaN, pattern 0x" << std::hex << bits;
      continue;
    }
    // bf16 is the top half of an fp32: 1 sign, 8 exponent (bias 127), 7 mantissa bits.
    const int exponent = (bits >> 7) & 255, mantissa = bits & 127;
    const double s = (bits & 0x8000) ? -1.0 : 1.0;
    const double want = exponent == 255 ? s * std::numeric_limits<double>::infinity()
                        : exponent == 0 ? s * std::ldexp(mantissa, -126 - 7)
                                        : s * std::ldexp(128 + mantissa, exponent - 127 - 7);
    ASSERT_EQ(static_cast<double>(f), want) << "pattern 0x" << std::hex << bits;
    ASSERT_EQ(float_to_bf16(f), b) << "round trip of pattern 0x" << std::hex << bits;
  }
}

TEST(Bf16, RoundingOverflowSubnormals) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  // Spacing near 1 is 2^-7. 1 + 2^-8 is a tie between 0x3f80 (even) and 0x3f81: stays.
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie, odd 0x3f81 -> 0x3f82
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  // FLT_MAX = (2 - 2^-23) 2^127 is above the halfway point between the largest bf16 0x7f7f and
  // 2^128: rounds to infinity.
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(float_to_bf16(std::ldexp(255.0f, 120)), 0x7f7f);  // (2 - 2^-7) 2^127: largest finite
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  // Subnormals: m * 2^-133.
  EXPECT_EQ(float_to_bf16(std::ldexp(1.0f, -133)), 0x0001);
  EXPECT_EQ(float_to_bf16(std::ldexp(1.0f, -134)), 0x0000);  // tie -> even 0
  EXPECT_EQ(float_to_bf16(std::ldexp(3.0f, -134)), 0x0002);  // 1.5 units: tie -> 2
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_TRUE(is_bf16_nan(float_to_bf16(tmoe::bits_float(0x7f800001u))));
}

TEST(Half, LoadStoreByDtype) {
  float f32[2] = {0, 0};
  uint16_t h[2] = {0, 0};
  tmoe::store_from_float(f32, 1, tmoe::DType::f32, 1.5f);
  tmoe::store_from_float(h, 0, tmoe::DType::f16, 1.5f);   // 1.5 = 0x3e00 in fp16
  tmoe::store_from_float(h, 1, tmoe::DType::bf16, 1.5f);  // 1.5 = 0x3fc0 in bf16
  EXPECT_EQ(f32[1], 1.5f);
  EXPECT_EQ(h[0], 0x3e00);
  EXPECT_EQ(h[1], 0x3fc0);
  EXPECT_EQ(tmoe::load_as_float(h, 0, tmoe::DType::f16), 1.5f);
  EXPECT_EQ(tmoe::load_as_float(h, 1, tmoe::DType::bf16), 1.5f);
  EXPECT_EQ(tmoe::load_as_float(f32, 1, tmoe::DType::f32), 1.5f);
  EXPECT_EQ(tmoe::dtype_size(tmoe::DType::f32), 4);
  EXPECT_EQ(tmoe::dtype_size(tmoe::DType::bf16), 2);
}

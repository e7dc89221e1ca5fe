// Helpers shared by the host tests: fresh seeds and clean-error expectations.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>

#include "tmoe/error.hpp"
#include "tmoe/format.hpp"
#include "tmoe/half.hpp"

namespace tmoe::testing {

// A new 64-bit seed every call (tests print it on failure so a failing draw can be replayed).
inline uint64_t fresh_seed() {
  return std::random_device{}() * 0x9e3779b97f4a7c15ull ^ std::random_device{}();
}

// Expects `f` to throw a bad-input tmoe::Error whose message contains `needle`.
template <typename F>
void expect_bad_input(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected a tmoe::Error mentioning '" << needle << "'";
  } catch (const tmoe::Error& e) {
    EXPECT_EQ(e.kind(), tmoe::ErrorKind::bad_input);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not mention '" << needle << "'";
  }
}

// Expects two quantized tensors to be the same bit for bit (shape, format fields, grid, indices,
// scales and signs).
inline void expect_tensor_equal(const TrellisTensor& a, const TrellisTensor& b) {
  EXPECT_EQ(a.experts, b.experts);
  EXPECT_EQ(a.K, b.K);
  EXPECT_EQ(a.N, b.N);
  EXPECT_EQ(a.bits, b.bits);
  EXPECT_EQ(a.group_size, b.group_size);
  EXPECT_EQ(a.hadamard, b.hadamard);
  ASSERT_EQ(a.grid.size(), b.grid.size());
  for (size_t i = 0; i < a.grid.size(); ++i) EXPECT_EQ(float_bits(a.grid[i]), float_bits(b.grid[i]));
  EXPECT_EQ(a.indices, b.indices);
  EXPECT_EQ(a.scales, b.scales);
  EXPECT_EQ(a.su, b.su);
  EXPECT_EQ(a.sv, b.sv);
}

}  // namespace tmoe::testing

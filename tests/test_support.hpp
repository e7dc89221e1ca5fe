// Helpers shared by the host tests: fresh seeds and clean-error expectations.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>

#include "tmoe/error.hpp"

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

}  // namespace tmoe::testing

// Shared helpers for CUDA tests live in tests/cuda; each test skips itself without a GPU.
#include <gtest/gtest.h>

#include "tmoe/backend.hpp"

TEST(CudaEnvironment, ReportsDevice) {
  if (!tmoe::cuda_available()) GTEST_SKIP() << "no CUDA device";
  SUCCEED();
}

// CUDA status checks that throw tmoe::Error (internal): usable from .cu and .cpp files.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "tmoe/error.hpp"

namespace tmoe::cuda {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Error(ErrorKind::internal,
                std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
}

}  // namespace tmoe::cuda

#define TMOE_CUDA_CHECK(call) ::tmoe::cuda::check_cuda((call), #call)

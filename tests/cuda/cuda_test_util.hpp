// Helpers shared by the CUDA tests: device arrays, fresh seeds, random batches.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_check.hpp"
#include "tmoe/backend.hpp"
#include "tmoe/moe.hpp"

#define TMOE_REQUIRE_GPU() \
  if (!tmoe::cuda_available()) GTEST_SKIP() << "no CUDA device"

namespace tmoe::testing {

// Sets an environment variable for a scope and restores it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_.c_str(), old_->c_str(), 1);
    else unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  std::optional<std::string> old_;
};

inline uint64_t fresh_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

// Owning device array; poison() fills every byte with 0xff (NaN in f32, f16 and bf16).
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) {
    void* raw = nullptr;
    TMOE_CUDA_CHECK(cudaMalloc(&raw, std::max<size_t>(n, 1) * sizeof(T)));
    p_ = static_cast<T*>(raw);
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() { cudaFree(p_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return p_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    TMOE_CUDA_CHECK(cudaMemcpy(p_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    TMOE_CUDA_CHECK(cudaDeviceSynchronize());
    TMOE_CUDA_CHECK(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  // Synchronous: cudaMemset is asynchronous to the host and runs on the legacy default stream, which
  // does not order against non-blocking streams, so a kernel launched next on such a stream could
  // write before the poison lands (seen once: PassRouting.ChainedForwardsInAGraphMatchReference
  // read NaN from forward 0 of a replay).
  void poison() {
    TMOE_CUDA_CHECK(cudaMemset(p_, 0xff, std::max<size_t>(n_, 1) * sizeof(T)));
    TMOE_CUDA_CHECK(cudaDeviceSynchronize());
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

enum class RoutingKind {
  distinct,    // k distinct experts per token
  one_expert,  // slot 0 of every token on the same expert
  some_minus,  // distinct, about a quarter of the slots -1
  few_experts  // only experts 0 and 1 used (many unused experts)
};

struct RandomBatch {
  std::vector<float> x;           // [T, H], values exactly representable in x_dtype
  std::vector<uint16_t> x16;      // x in x_dtype when 16-bit
  std::vector<int32_t> ids;       // [T, k]
  std::vector<float> probs;       // [T, k]
};

inline RandomBatch random_batch(int64_t T, int64_t H, int E, int k, DType x_dtype, RoutingKind kind,
                                std::mt19937_64& rng) {
  RandomBatch b;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  b.x.resize(T * H);
  b.x16.resize(x_dtype == DType::f32 ? 0 : T * H);
  for (int64_t i = 0; i < T * H; ++i) {
    float v = normal(rng);
    if (x_dtype == DType::f16) {
      b.x16[i] = float_to_half(v);
      v = half_to_float(b.x16[i]);
    } else if (x_dtype == DType::bf16) {
      b.x16[i] = float_to_bf16(v);
      v = bf16_to_float(b.x16[i]);
    }
    b.x[i] = v;
  }
  std::uniform_real_distribution<float> prob(0.05f, 1.0f);
  std::uniform_int_distribution<int> coin(0, 3);
  const int first_expert = static_cast<int>(rng() % E);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> experts(E);
    for (int e = 0; e < E; ++e) experts[e] = e;
    std::shuffle(experts.begin(), experts.end(), rng);
    if (kind == RoutingKind::one_expert) {
      auto it = std::find(experts.begin(), experts.end(), first_expert);
      std::iter_swap(experts.begin(), it);
    }
    for (int j = 0; j < k; ++j) {
      int id = experts[j % E];
      if (kind == RoutingKind::few_experts) id = static_cast<int>((t + j) % 2);
      if (kind == RoutingKind::some_minus && coin(rng) == 0) id = -1;
      b.ids.push_back(id);
      b.probs.push_back(prob(rng));
    }
  }
  return b;
}

// Bytes of x in x_dtype.
inline const void* x_bytes(const RandomBatch& b, DType x_dtype) {
  return x_dtype == DType::f32 ? static_cast<const void*>(b.x.data()) : static_cast<const void*>(b.x16.data());
}

// Output in out_dtype, as floats.
inline std::vector<float> to_floats(const std::vector<uint8_t>& raw, DType d, size_t n) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = load_as_float(raw.data(), static_cast<int64_t>(i), d);
  return out;
}

// Unit roundoff of a dtype: the relative error of rounding one value to it.
inline double unit_roundoff(DType d) {
  return d == DType::f32 ? 0x1p-24 : d == DType::f16 ? 0x1p-11 : 0x1p-8;
}

inline const char* dtype_name(DType d) { return d == DType::f32 ? "f32" : d == DType::f16 ? "f16" : "bf16"; }

}  // namespace tmoe::testing

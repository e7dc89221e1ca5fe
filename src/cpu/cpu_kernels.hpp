// SIMD kernels of the CPU backend (Highway, runtime dispatch to the best target of this CPU).
#pragma once

#include <cstdint>

namespace tmoe::cpu {

// One expert's tile column (16 output columns, all K) of a PackedProjection.
struct TileColumn {
  const uint8_t* words = nullptr;    // tiles_k lane-word tiles (cpu_weights.hpp)
  const uint16_t* scales = nullptr;  // [groups][16] fp16
  const float* grid16 = nullptr;     // [16]
  int64_t tiles_k = 0, tiles_per_group = 0;
  int bits = 3;
};

// Most rows one project_column call takes; callers loop over blocks of this many tokens.
inline constexpr int kMaxRowBlock = 16;

// out[t * out_stride + i] = sum_k rows[t][k] * Q[k][n0 + i]  for t < count, i < 16, where
// Q = grid[index] * scale. rows[t] holds tiles_k * 16 floats (zero past K). count <= kMaxRowBlock.
// Sums run in a fixed order per SIMD target, so the bits depend only on the inputs and the target
// (not on the calling thread).
void project_column(const TileColumn& column, const float* const* rows, int count, float* out,
                    int64_t out_stride);

// gate[i] = silu(gate[i]) * up[i] * post[i], silu(v) = v / (1 + exp(-v)).
void swiglu(float* gate, const float* up, const float* post, int64_t n);

// block_hadamard (tmoe/hadamard.hpp) with SIMD: the same butterflies in the same order, so the
// same bits. n is a multiple of block (FORMAT.md); block a power of two.
void hadamard(float* v, int64_t n, int block);

// Name of the SIMD target the dispatcher picks on this CPU ("AVX3", "AVX2", ...).
const char* simd_target_name();

}  // namespace tmoe::cpu

namespace tmoe::cpu {
// Calls f(target name) once per SIMD target compiled in and supported by this CPU, with the
// dispatcher forced to that target, then restores normal dispatch. For tests and benchmarks.
void for_each_simd_target(void (*f)(const char* target, void* context), void* context);
}  // namespace tmoe::cpu

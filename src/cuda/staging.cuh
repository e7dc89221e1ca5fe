// Device helpers the decode kernels share (the pass kernels in projection.cu and the one-launch
// decode in fused_decode.cu): activation k-tile rows loaded with vector loads, turned into the
// B operand of mma.m16n8k16 as hi + lo bf16 halves, the mma itself and SwiGLU; and the fp16
// conversion the grouped kernels use too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "tmoe/half.hpp"
#include "tmoe/trellis_decode.hpp"

namespace tmoe::cuda {

// fp16 bits -> float with the hardware conversion (half_to_float is the portable bit-exact one;
// both are exact, this one is a single instruction). Every CUDA kernel family uses it.
__device__ __forceinline__ float half_bits_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

// v[j] = src[index + j] * su[j] * norm for a whole, 16-byte aligned k-tile row: vector loads and
// one dtype switch for the 16 values (the callers' per-value fallback costs ~50 instructions per
// value: a dtype switch and the portable half conversion each time; sass-loops on v8: an
// 818-instruction staging loop). False (nothing loaded) for a partial row or misaligned pointers.
// from_l2: fp32 rows another block of the same kernel wrote load through L2 (ld.cg), not the
// read-only path.
__device__ __forceinline__ bool load_whole_tile_row(const void* src, int64_t index, DType dtype, const uint16_t* su,
                                                    float norm, bool whole, float (&v)[kTileDim],
                                                    bool from_l2 = false) {
  const int size = dtype_size(dtype);
  const char* x = static_cast<const char*>(src) + index * size;
  if (!whole || (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(su)) % 16 != 0) return false;
  const uint4* s4 = reinterpret_cast<const uint4*>(su);
  uint32_t su_words[8];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint4 u = __ldg(s4 + q);
    su_words[4 * q] = u.x, su_words[4 * q + 1] = u.y, su_words[4 * q + 2] = u.z, su_words[4 * q + 3] = u.w;
  }
  if (dtype == DType::f32) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float4* row = reinterpret_cast<const float4*>(x) + q;
      const float4 f = from_l2 ? __ldcg(row) : __ldg(row);
      v[4 * q] = f.x, v[4 * q + 1] = f.y, v[4 * q + 2] = f.z, v[4 * q + 3] = f.w;
    }
  } else {
    uint32_t words[8];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(x) + q);
      words[4 * q] = u.x, words[4 * q + 1] = u.y, words[4 * q + 2] = u.z, words[4 * q + 3] = u.w;
    }
#pragma unroll
    for (int j = 0; j < kTileDim; ++j) {
      const uint16_t h = static_cast<uint16_t>(words[j / 2] >> (16 * (j % 2)));
      v[j] = dtype == DType::f16 ? half_bits_to_float(h) : __uint_as_float(static_cast<uint32_t>(h) << 16);
    }
  }
#pragma unroll
  for (int j = 0; j < kTileDim; ++j)
    v[j] *= half_bits_to_float(static_cast<uint16_t>(su_words[j / 2] >> (16 * (j % 2)))) * norm;
  return true;
}

// d += a . b, m16n8k16, bf16 operands, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// bf16x2 bits of (x0, x1) (low half x0): their hi parts (part 0) or lo parts (part 1), where
// hi = bf16(x) and lo = bf16(x - hi): hi + lo = x to within 2^-17 |x| (x - hi is exact in fp32 and
// has at most 16 significant bits left after hi's 8; lo keeps 8 of them, rounded).
__device__ __forceinline__ uint32_t split_pair(float x0, float x1, int part) {
  const __nv_bfloat162 hi = __floats2bfloat162_rn(x0, x1);
  __nv_bfloat162 v = hi;
  if (part) v = __floats2bfloat162_rn(x0 - __low2float(hi), x1 - __high2float(hi));
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One k-tile row of an item row in B-fragment order, in place of (or instead of) its fp32 values:
// column c = 2 r + part of an 8-column mma block (item row r, hi or lo) is held by lane (g = c, tq) as
// {x[2tq], x[2tq+1]} and {x[2tq+8], x[2tq+9]}; stored as words [tq][part][2], so a lane reads its two
// registers with one 8-byte load. Returns the row's sum of what the mma multiplies (hi + lo, not
// x): the bias term then cancels exactly the bias the products carry, up to fp32 rounding.
__device__ __forceinline__ float store_b_fragments(const float (&v)[kTileDim], float* row) {
  uint32_t out[kTileDim];
#pragma unroll
  for (int tq = 0; tq < 4; ++tq)
#pragma unroll
    for (int part = 0; part < 2; ++part)
#pragma unroll
      for (int h = 0; h < 2; ++h) out[(tq * 2 + part) * 2 + h] = split_pair(v[2 * tq + 8 * h], v[2 * tq + 8 * h + 1], part);
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < kTileDim; ++j) sum += __uint_as_float(out[j] << 16) + __uint_as_float(out[j] & 0xffff0000u);
#pragma unroll
  for (int q = 0; q < 4; ++q)
    reinterpret_cast<uint4*>(row)[q] = make_uint4(out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3]);
  return sum;
}

// SwiGLU of one output: silu(gate) * up, with the IEEE division and expf (the decode kernels' h
// stays fp32).
__device__ __forceinline__ float swiglu(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

}  // namespace tmoe::cuda

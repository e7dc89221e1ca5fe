// Hopper (sm_90a) building blocks of the grouped path's wgmma kernel (grouped_gemm_wgmma in
// grouped_moe.cu): shared-memory matrix descriptors for the 128-byte-swizzled K-major layout,
// wgmma.mma_async m64n128k16 with A from registers (bf16 in, fp32 accumulators), the group
// fences and the async proxy fence. tests/cuda/test_grouped_wgmma.cu checks the layouts on a plain
// GEMM.//
// Every wrapper compiles to nothing outside the sm_90a device pass (TMOE_WGMMA_DEVICE): the sm_80
// and plain sm_90 passes still compile the callers, whose kernels then do nothing; the host picks
// the kernel only where it was built for the device (wgmma_kernel_built in grouped_moe.cu).
//
// The K-major SW128 layout (one operand tile of R rows x 64 k of bf16): row r is 128 bytes
// (64 k) at r * 128 from a 1024-byte aligned base; its 16-byte chunk c (k = 8c .. 8c+7) sits at
// chunk position c ^ (r % 8). A descriptor covers 8-row groups 1024 bytes apart (SBO); the k16
// slice kk of the tile starts kk * 32 bytes after the base (the hardware applies the XOR to the
// final address, so the offset start stays valid).
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TMOE_WGMMA_DEVICE 1
#endif

namespace tmoe::cuda::grouped::wgmma {

inline constexpr int kRowBytes = 128;  // one row of a K-major SW128 tile: 64 bf16
inline constexpr int kTileAlign = 1024;

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a SW128 K-major tile.
__host__ __device__ constexpr uint32_t sw128_offset(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Descriptor of a K-major SW128 tile starting at shared address `addr` (1024-byte aligned base,
// plus kk * 32 for k16 slice kk): start >> 4 in bits 0-13, LBO (unused for this layout) = 1,
// SBO = 1024 bytes >> 4 in bits 32-45, layout type 1 (128-byte swizzle) in bits 62-63.
__device__ __forceinline__ uint64_t sw128_descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(kTileAlign >> 4) << 32) | (uint64_t{1} << 62);
}

// Before a wgmma whose accumulators or A registers other instructions wrote.
__device__ __forceinline__ void fence_operands() {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit_group() {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wait_group() {  // at most N committed groups still pending
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// d[64 x 128] (+)= A[64 x 16] * B[16 x 128]: A (the weights, rows = output features) from
// registers, B (the activations, 128 token rows of 16 k) K-major SW128 in shared memory.
// A registers (per warpgroup thread; warp w = 0..3, lane = 4 g + t): the m16n8k16 A fragment of
// rows 16 w .. 16 w + 15: a[0] = (row g, k 2t, 2t+1), a[1] = (row g + 8, same k), a[2] = (row g,
// k 2t+8, 2t+9), a[3] = (row g + 8, same k): the order of scaled_weight_pairs (weight_decode.cuh).
// Accumulators: d[4 j + i] holds row 16 w + g + 8 (i >> 1), column 8 j + 2 t + (i & 1), j = 0..15.
// The registers of a must not change until the wgmma group holding this instruction has retired
// (wait_group).
__device__ __forceinline__ void mma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                  int accumulate) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
#endif
}

// Orders this thread's earlier generic-proxy shared-memory writes (st.shared, cp.async after its
// wait) before later async-proxy reads (wgmma operands).
__device__ __forceinline__ void fence_proxy_async() {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace tmoe::cuda::grouped::wgmma

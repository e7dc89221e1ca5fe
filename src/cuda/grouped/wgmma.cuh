// Hopper (sm_90a) building blocks of the grouped path's wgmma kernel (grouped_gemm_wgmma in
// gemm_wgmma.cu): shared-memory matrix descriptors for the 128-byte-swizzled K-major layout,
// wgmma.mma_async m64n128k16 / m64n256k16 with A from registers (bf16 in, fp32 accumulators), the
// group fences and the async proxy fence, mbarriers and 2D TMA loads. tests/cuda/test_grouped_wgmma.cu
// checks the layouts on a plain GEMM.
//
// Every wrapper compiles to nothing outside the sm_90a device pass (TMOE_WGMMA_DEVICE): the sm_80
// and plain sm_90 passes still compile the callers, whose kernels then do nothing; the host picks
// the kernel only where it was built for the device (wgmma_kernel_built in gemm_wgmma.cu).
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

// d[64 x N] (+)= A[64 x 16] * B[16 x N], N = 128 or 256: A (the weights, rows = output features)
// from registers, B (the activations, N token rows of 16 k) K-major SW128 in shared memory.
// A registers (per warpgroup thread; warp w = 0..3, lane = 4 g + t): the m16n8k16 A fragment of
// rows 16 w .. 16 w + 15: a[0] = (row g, k 2t, 2t+1), a[1] = (row g + 8, same k), a[2] = (row g,
// k 2t+8, 2t+9), a[3] = (row g + 8, same k): the order of scaled_weight_pairs (weight_decode.cuh).
// Accumulators: d[4 j + i] holds row 16 w + g + 8 (i >> 1), column 8 j + 2 t + (i & 1), j < N / 8.
// The registers of a must not change until the wgmma group holding this instruction has retired
// (wait_group).
// The accumulator operands of the wrappers below: d[i] .. d[i + 63] as "+f" operands.
#define TMOE_WGMMA_ACC8(i)                                                                            \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define TMOE_WGMMA_ACC64(i)                                                                           \
  TMOE_WGMMA_ACC8(i), TMOE_WGMMA_ACC8(i + 8), TMOE_WGMMA_ACC8(i + 16), TMOE_WGMMA_ACC8(i + 24),       \
      TMOE_WGMMA_ACC8(i + 32), TMOE_WGMMA_ACC8(i + 40), TMOE_WGMMA_ACC8(i + 48), TMOE_WGMMA_ACC8(i + 56)
#define TMOE_WGMMA_A_DESC_SCALE \
  "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate)

template <int N>
__device__ __forceinline__ void mma_m64k16_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                              int accumulate) {
  static_assert(N == 128 || N == 256);
#ifdef TMOE_WGMMA_DEVICE
  if constexpr (N == 128) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : TMOE_WGMMA_ACC64(0)
        : TMOE_WGMMA_A_DESC_SCALE);
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : TMOE_WGMMA_ACC64(0), TMOE_WGMMA_ACC64(64)
        : TMOE_WGMMA_A_DESC_SCALE);
  }
#endif
}
#undef TMOE_WGMMA_ACC8
#undef TMOE_WGMMA_ACC64
#undef TMOE_WGMMA_A_DESC_SCALE

// ---- mbarriers and TMA (the X tile's bulk tensor copies, -DTMOE_WGMMA_TMA_X=1) ----
// Initialises `bar` for `count` arrivals per phase. Before other threads (or the async proxy) use
// it: fence_mbarrier_init() once after all of a block's inits, then a barrier.
__device__ __forceinline__ void mbarrier_init_unfenced(uint64_t* bar, int count) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void fence_mbarrier_init() {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// Both in one (for a handful of barriers; each fence is a release at cluster scope).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  mbarrier_init_unfenced(bar, count);
  fence_mbarrier_init();
}
// Arrives on `bar` and adds `bytes` to the transaction count its phase waits for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
#endif
}
// The box of a 2D tensor map at (c0 = k, c1 = row) into shared memory at `dst` (the map's swizzle
// applied by the hardware from dst's address bits); its bytes count toward `bar`'s transactions.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* tensor_map, int c0, int c1, uint64_t* bar) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(smem_address(bar))
      : "memory");
#endif
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory at `dst`
// in one bulk copy; its bytes count toward `bar`'s transactions.
__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_address(dst)),
               "l"(src), "r"(bytes), "r"(smem_address(bar))
               : "memory");
#endif
}

// The PTX of a barrier wait that retries WAIT (an mbarrier test or try instruction setting the
// predicate `done`) up to MAX_TRIES times and then traps, so that a protocol bug fails the test that
// hit it instead of hanging the whole run. The loop is all PTX: a C++ loop (clock64, __trap)
// around try_wait made ptxas serialize the wgmma pipeline (CUDA 13.0). Its labels are local to
// the braces, so every inlined copy may reuse them.
#define TMOE_MBARRIER_WAIT_LOOP(WAIT, MAX_TRIES)                                  \
  "{\n.reg .pred done;\n.reg .u32 tries;\nmov.u32 tries, 0;\nwait_loop:\n" WAIT \
  "@done bra wait_done;\n"                                                       \
  "add.u32 tries, tries, 1;\n"                                                   \
  "setp.lt.u32 done, tries, " MAX_TRIES ";\n"                                    \
  "@done bra wait_loop;\n"                                                       \
  "trap;\n"                                                                      \
  "wait_done:\n}\n"

// Waits until the phase with this parity has completed (try_wait: the thread may suspend until the
// phase changes); traps after 2^22 unsuccessful tries (each may suspend for a while: well over
// 0.1 s in all).
__device__ __forceinline__ void mbarrier_wait_or_trap(uint64_t* bar, uint32_t parity) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile(TMOE_MBARRIER_WAIT_LOOP("mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n", "4194304")
               ::"r"(smem_address(bar)), "r"(parity)
               : "memory");
#endif
}
// The same wait by polling (mbarrier.test_wait never suspends the thread); traps after 2^27 tries.
// The one-launch decode waits this way: with try_wait its forward took ~10 us per chunk each
// consumer warp waited for, on every shape (notes-cuda.md "v18": a suspended warp seems to sleep
// long past the phase change there; a hypothesis, not yet timed).
__device__ __forceinline__ void mbarrier_spin_or_trap(uint64_t* bar, uint32_t parity) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile(TMOE_MBARRIER_WAIT_LOOP("mbarrier.test_wait.parity.shared::cta.b64 done, [%0], %1;\n", "134217728")
               ::"r"(smem_address(bar)), "r"(parity)
               : "memory");
#endif
}
// The same wait by try_wait with a suspend-time hint: a suspended thread wakes at the phase change
// or after about `ns` nanoseconds, whichever is first (a bound on the oversleep without the issue
// slots a polling loop takes from the warps that have work); traps after 2^26 tries.
__device__ __forceinline__ void mbarrier_wait_hinted_or_trap(uint64_t* bar, uint32_t parity, uint32_t ns) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile(TMOE_MBARRIER_WAIT_LOOP("mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1, %2;\n", "67108864")
               ::"r"(smem_address(bar)), "r"(parity), "r"(ns)
               : "memory");
#endif
}
#undef TMOE_MBARRIER_WAIT_LOOP
// Arrives on `bar` (one of its expected arrivals).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}
// Arrives on `bar` once all of this thread's earlier cp.async copies have landed (the arrival is
// one of the barrier's expected ones: .noinc).
__device__ __forceinline__ void cp_async_mbarrier_arrive(uint64_t* bar) {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}
// Hands registers between warpgroups (every thread of the warpgroup runs it): the per-thread
// count becomes N.
template <int N>
__device__ __forceinline__ void increase_registers() {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void decrease_registers() {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
// Synchronises `threads` threads (whole warps) at named barrier `id` (1..15; 0 is __syncthreads').
__device__ __forceinline__ void sync_threads_at(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Synchronises the first `threads` threads of the block (named barrier 1), not the rest.
__device__ __forceinline__ void sync_threads(int threads) { sync_threads_at(1, threads); }

// Orders this thread's earlier generic-proxy shared-memory writes (st.shared, cp.async after its
// wait) before later async-proxy reads (wgmma operands).
__device__ __forceinline__ void fence_proxy_async() {
#ifdef TMOE_WGMMA_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

}  // namespace tmoe::cuda::grouped::wgmma

// The CPU's own ceilings, measured in the same run as the benchmark they judge (DESIGN.md,
// "Measuring speed honestly"): the memory read bandwidth a bandwidth-bound kernel can at best
// reach, and the dense fp32 GEMM rate a user would otherwise get from BLAS.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace tmoe::bench {

// The CPU's model name from /proc/cpuinfo ("unknown CPU" if absent), for DeviceReport::name.
std::string cpu_model_name();

// Read bandwidth in GB/s (1e9 bytes/s): OpenMP threads each sum their slice of a buffer several
// times the last-level cache (8x L3, at least 256 MiB, at most 1 GiB), several passes, best pass.
// threads <= 0: all cores.
double measure_read_bandwidth_gbps(int threads);

// Whether this build has a BLAS sgemm (OpenBLAS); without it the GEMM baseline is a plain OpenMP
// loop nest, much slower than BLAS, and reports say so (cpu_gemm_note()).
bool have_blas();
// "OpenBLAS cblas_sgemm" or "no BLAS: naive OpenMP sgemm (not a fair baseline)".
std::string cpu_gemm_note();

// C[m x n] = A[m x k] . B[k x n], all row-major fp32: the "dense fp32 GEMM of the same FLOPs"
// baseline the CPU bench times. threads <= 0: all cores.
void sgemm(int64_t m, int64_t n, int64_t k, std::span<const float> a, std::span<const float> b,
           std::span<float> c, int threads);

// Dense fp32 GEMM rate in GFLOP/s (2*m*n*k per call) over random matrices of the given size,
// median of several timed calls after a warm-up.
double measure_sgemm_gflops(int threads, int64_t m, int64_t n, int64_t k);

}  // namespace tmoe::bench

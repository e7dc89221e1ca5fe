// The building blocks of the grouped path's wgmma kernel (src/cuda/grouped/wgmma.cuh) on their
// own, so that a layout mistake shows here and not as a wrong MoE: (1) one plain bf16 GEMM tile,
// A from registers in the documented fragment order, B through the SW128 K-major layout and its
// descriptors, wgmma m64n128k16, against a host fp64 product; (2) the kernel's decode of
// fragment-layout units (scaled_weight_pairs) straight into A registers, multiplied by an identity
// B, against FORMAT.md's weights. The whole kernel is checked against the fp64 MoE reference in
// test_grouped.cu (GroupedWgmma*).
//
// Both kernels set a flag only in their sm_90a body: on a device and build without it the tests
// skip (the grouped path then never selects the kernel, see grouped_uses_wgmma).
#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cuda/device_weights.cuh"
#include "cuda/fragment_layout.hpp"
#include "cuda/grouped/weight_decode.cuh"
#include "cuda/grouped/wgmma.cuh"
#include "cuda_test_util.hpp"
#include "tmoe/format.hpp"
#include "tmoe/half.hpp"

namespace tmoe::cuda::grouped {
namespace {

using tmoe::testing::DeviceArray;
using tmoe::testing::fresh_seed;

constexpr int kM = 64, kN = 128, kK = 64;  // kN: the decode test's B; the plain GEMM runs N = 128 and 256

#ifdef TMOE_WGMMA_DEVICE  // helpers of the sm_90a kernel bodies below
// The four A registers of k16 slice kk for this thread (warp w of the warpgroup, lane = 4 g + t)
// from a row-major [64][kK] bf16 matrix, in mma_m64k16_rs's documented order.
__device__ void a_fragment(const uint16_t* a, int warp, int lane, int kk, uint32_t (&frag)[4]) {
  const int g = lane / 4, t = lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int row = 16 * warp + g + 8 * (q & 1), k = 16 * kk + 2 * t + 8 * (q >> 1);
    frag[q] = a[row * kK + k] | (static_cast<uint32_t>(a[row * kK + k + 1]) << 16);
  }
}

// The B tile [N][kK] (row = n, k contiguous) from global into SW128 layout.
template <int N>
__device__ void load_b_tile(uint8_t* tile, const uint16_t* b) {
  for (int i = threadIdx.x; i < N * kK; i += blockDim.x) {
    const int row = i / kK, k = i % kK;
    *reinterpret_cast<uint16_t*>(tile + wgmma::sw128_offset(row, k / 8) + 2 * (k % 8)) = b[i];
  }
  wgmma::fence_proxy_async();
  __syncthreads();
}

// D [64][N] = A B^T: four wgmma k16 slices (A from this thread's fragments, B from the SW128 tile),
// out through the accumulators' documented layout.
template <int N>
__device__ __forceinline__ void multiply_and_store(const uint32_t (&frags)[kK / 16][4], const uint8_t* b_tile, float* d) {
  float acc[N / 2];
  wgmma::fence_operands();
  const uint32_t b_base = wgmma::smem_address(b_tile);
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk)
    wgmma::mma_m64k16_rs<N>(acc, frags[kk], wgmma::sw128_descriptor(b_base + 32 * kk), kk > 0);
  wgmma::commit_group();
  wgmma::wait_group<0>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int j = 0; j < N / 8; ++j)
    for (int i = 0; i < 4; ++i) d[(16 * warp + g + 8 * (i >> 1)) * N + 8 * j + 2 * t + (i & 1)] = acc[4 * j + i];
}
#endif

// One warpgroup: A [64][64] from registers, B [N][64] (row = n, k contiguous) through an SW128
// tile, four wgmma k16 slices, D [64][N] fp32.
template <int N>
__global__ void plain_gemm_kernel(const uint16_t* a, const uint16_t* b, float* d, int* built) {
#ifdef TMOE_WGMMA_DEVICE
  __shared__ __align__(1024) uint8_t b_tile[N * wgmma::kRowBytes];
  load_b_tile<N>(b_tile, b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t frags[kK / 16][4];
  for (int kk = 0; kk < kK / 16; ++kk) a_fragment(a, warp, lane, kk, frags[kk]);
  multiply_and_store<N>(frags, b_tile, d);
  if (threadIdx.x == 0) *built = 1;
#endif
}

bool skip_without_sm90a(int built) {
  if (built) return false;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  if (prop.major == 9 && prop.minor == 0)
    ADD_FAILURE() << "sm_90 device but no sm_90a kernel body: build with TMOE_CUDA_ARCHITECTURES "
                     "containing 90a (the default)";
  return true;
}

template <int N>
void check_plain_gemm() {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("N = " + std::to_string(N) + ", seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> a(kM * kK), b(N * kK);
  for (auto& v : a) v = float_to_bf16(normal(rng));
  for (auto& v : b) v = float_to_bf16(normal(rng));
  DeviceArray<uint16_t> a_d(a), b_d(b);
  DeviceArray<float> d_d(kM * N);
  DeviceArray<int> built_d(std::vector<int>{0});
  d_d.poison();
  plain_gemm_kernel<N><<<1, 128>>>(a_d.get(), b_d.get(), d_d.get(), built_d.get());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (skip_without_sm90a(built_d.download()[0])) GTEST_SKIP() << "no sm_90a kernel for this device";
  const std::vector<float> d = d_d.download();
  // bf16 products are exact in fp32; 64 fp32 additions err by < 64 * 2^-24 of the sum of |terms|:
  // 1e-5 of that sum is a safe bound, and any layout error is O(1).
  int bad = 0;
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < N; ++n) {
      double want = 0.0, magnitude = 0.0;
      for (int k = 0; k < kK; ++k) {
        const double term = double(bf16_to_float(a[m * kK + k])) * bf16_to_float(b[n * kK + k]);
        want += term;
        magnitude += std::fabs(term);
      }
      const double got = d[m * N + n];
      if (!(std::fabs(got - want) <= 1e-5 * magnitude + 1e-6) && bad++ < 5)
        ADD_FAILURE() << "D[" << m << "][" << n << "] = " << got << ", want " << want;
    }
  EXPECT_EQ(bad, 0);
}

TEST(GroupedWgmmaLayout, PlainGemmMatchesHost) {
  TMOE_REQUIRE_GPU();
  check_plain_gemm<128>();
  check_plain_gemm<256>();
}

// One warpgroup: warp u decodes unit (expert 0, n-tile u, quad 0) of a K = 64, N = 64 projection
// with the kernel's code (grid form, coefficients, su folded) into A registers, and wgmma multiplies
// them by the identity (B[n][k] = 1 where n == k), so D[column][n] is the decoded weight (k = n,
// column), exactly: one product by 1 per element, no rounding.
template <int BITS>
__global__ void decode_tile_kernel(DeviceProjection w, const uint16_t* su_bf16, const uint16_t* identity,
                                   float* out, int* built) {
#ifdef TMOE_WGMMA_DEVICE
  __shared__ __align__(1024) uint8_t b_tile[kN * wgmma::kRowBytes];
  __shared__ uint32_t level_pairs[256];
  __shared__ GridForm form;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  if (tid == 0) form = grid_form(w.grid, BITS);
  for (int i = tid; i < (1 << (2 * BITS)); i += blockDim.x)
    level_pairs[i] = pack_bf16(w.grid[i & ((1 << BITS) - 1)], w.grid[i >> BITS]);
  load_b_tile<kN>(b_tile, identity);
  uint32_t words[BITS];
  for (int b = 0; b < BITS; ++b) words[b] = w.unit(0, warp, 0)[b * 32 + lane];
  auto coef = [&](int kt, int col) {
    return weight_coef(form, half_to_float(w.scales[(kt * kTileDim / w.group_size) * w.N + col]));
  };
  auto su_pair = [&](int k) { return *reinterpret_cast<const uint32_t*>(su_bf16 + k); };
  uint32_t frags[kK / 16][4];
  auto decode = [&](auto kt_constant, auto affine_constant) {
    constexpr int kt = decltype(kt_constant)::value;
    const int col = warp * kTileDim + g;
    scaled_weight_pairs<BITS, kt, decltype(affine_constant)::value>(
        words, level_pairs, coef(kt, col), coef(kt, col + 8), true, su_pair(16 * kt + 2 * t),
        su_pair(16 * kt + 2 * t + 8), frags[kt]);
  };
  auto all_tiles = [&](auto affine_constant) {
    decode(std::integral_constant<int, 0>{}, affine_constant);
    decode(std::integral_constant<int, 1>{}, affine_constant);
    decode(std::integral_constant<int, 2>{}, affine_constant);
    decode(std::integral_constant<int, 3>{}, affine_constant);
  };
  if (form.affine) all_tiles(std::true_type{});
  else all_tiles(std::false_type{});
  multiply_and_store<kN>(frags, b_tile, out);
  if (tid == 0) *built = 1;
#endif
}

template <int BITS>
void check_decoded_tile(bool custom_grid) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("bits " + std::to_string(BITS) + (custom_grid ? ", custom grid" : "") + ", seed " +
               std::to_string(seed));
  std::mt19937_64 rng(seed);
  TrellisTensor t = TrellisTensor::zeros(1, kK, kM, BITS, 32);  // 2 groups per quad
  std::vector<uint8_t> idx(kK * kM);
  for (auto& i : idx) i = static_cast<uint8_t>(rng() & ((1u << BITS) - 1u));
  pack_indices(idx, kK, kM, BITS, t.indices);
  std::uniform_real_distribution<float> unit(0.5f, 2.0f);
  for (auto& s : t.scales) s = float_to_half(unit(rng) * 0.01f);
  for (auto& s : t.su) s = float_to_half(rng() % 2 ? 1.0f : -1.0f);
  if (custom_grid)  // increasing, not affine
    for (size_t i = 0; i < t.grid.size(); ++i) t.grid[i] = std::sinh(0.4f * (float(i) - t.grid.size() / 2.0f));
  const TrellisView view = t.view();
  DeviceArray<uint32_t> units(pack_fragment_units(view));
  DeviceArray<uint16_t> scales(t.scales);
  DeviceArray<float> grid(t.grid);
  std::vector<uint16_t> su16(kK);
  for (int k = 0; k < kK; ++k) su16[k] = float_to_bf16(half_to_float(t.su[k]));
  DeviceArray<uint16_t> su_d(su16);
  std::vector<uint16_t> identity(kN * kK, 0);
  for (int k = 0; k < kK; ++k) identity[k * kK + k] = float_to_bf16(1.0f);
  DeviceArray<uint16_t> identity_d(identity);
  DeviceArray<float> out(kM * kN);
  DeviceArray<int> built(std::vector<int>{0});
  out.poison();
  DeviceProjection w;
  w.units = units.get();
  w.quads = quads_of(kK);
  w.scales = scales.get();
  w.grid = grid.get();
  w.experts = 1;
  w.K = kK;
  w.N = kM;
  w.bits = BITS;
  w.group_size = 32;
  decode_tile_kernel<BITS><<<1, 128>>>(w, su_d.get(), identity_d.get(), out.get(), built.get());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (skip_without_sm90a(built.download()[0])) GTEST_SKIP() << "no sm_90a kernel for this device";
  const std::vector<float> got = out.download();
  // Weight = bf16(X * bf16(a) + bf16(b)) * su (X: the centred index, exact, or the bf16 level):
  // up to three bf16 roundings (unit roundoff 2^-8 each) of terms no larger than |grid|max * scale,
  // so 2^-6 of that bounds the error (2^-7 failed once: a 2-bit fitted grid lost 0.85% on its
  // largest level); a wrong index moves a weight by at least one grid step, more than 2^-6 of the
  // largest level for every grid here (4 bits, default grid: step = 1/7.5 of the largest).
  float largest_level = 0.0f;
  for (float v : t.grid) largest_level = std::max(largest_level, std::fabs(v));
  int bad = 0;
  for (int n = 0; n < kM; ++n)
    for (int k = 0; k < kK; ++k) {  // D[n][k]: the decoded weight (k, n); columns >= kK multiply zeros
      const double scale = half_to_float(t.scales[(k / 32) * kM + n]);
      const double want = double(view.q(0, k, n)) * half_to_float(t.su[k]);
      const double bound = std::ldexp(largest_level * scale, -6);
      if (!(std::fabs(got[n * kN + k] - want) <= bound) && bad++ < 5)
        ADD_FAILURE() << "w[k=" << k << "][n=" << n << "] = " << got[n * kN + k] << ", want " << want;
    }
  for (int n = 0; n < kM; ++n)
    for (int c = kK; c < kN; ++c)
      if (got[n * kN + c] != 0.0f && bad++ < 5) ADD_FAILURE() << "D[" << n << "][" << c << "] = " << got[n * kN + c];
  EXPECT_EQ(bad, 0);
}

TEST(GroupedWgmmaLayout, DecodedUnitsMatchWeights) {
  TMOE_REQUIRE_GPU();
  for (bool custom : {false, true}) {
    check_decoded_tile<2>(custom);
    check_decoded_tile<3>(custom);
    check_decoded_tile<4>(custom);
  }
}

}  // namespace
}  // namespace tmoe::cuda::grouped

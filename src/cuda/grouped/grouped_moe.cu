// The grouped tensor-core MoE path (see grouped_moe.cuh for the contract).
//
// Kernels, in launch order:
//   build_work_items      one block: the flat list of (expert, first row) tiles of BM rows, so
//                         that one launch covers every expert however ragged the groups are
//   scatter_inverse       pair id -> row in `order` (for the fixed-order combine)
//   convert_to_bf16 / transform_pair_rows     the A operand of gate/up
//   grouped_gemm<2, ...>  gate and up for the same columns in one block, SwiGLU epilogue
//                         (gemm_mma.cu; or grouped_gemm_wgmma<2>, gemm_wgmma.cu, the sm_90a kernel
//                         with the weights as wgmma's register operand, where use_wgmma picks it;
//                         same for down with grouped_gemm_wgmma<1>)
//   transform_intermediate (Hadamard only)
//   grouped_gemm<1, ...>  down, with the router weight and the combine in the epilogue
//   finish_rows / combine_rows / convert_from_f32
//
// What both GEMM kernels share is in gemm_common.cuh; this file holds the routing and row-wise
// kernels around them and the host side (validation, workspace, the choice of kernel and tile).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda/grouped/gemm_common.cuh"
#include "cuda/grouped/grouped_moe.cuh"
#include "cuda/knobs.hpp"
#include "tmoe/error.hpp"
#include "tmoe/trellis_decode.hpp"

namespace tmoe::cuda::grouped {
namespace {

// ---- routing helpers ------------------------------------------------------------------------
constexpr int kScanThreads = 1024;

// items[i] = (expert, first row) for every tile of `tile_rows` rows of every expert, in order.
__global__ void __launch_bounds__(kScanThreads)
    build_work_items(const int32_t* offsets, int experts, int tile_rows, int32_t* items,
                     int32_t* num_items) {
  __shared__ int32_t scan[kScanThreads];
  __shared__ int32_t base;
  const int tid = threadIdx.x;
  if (tid == 0) base = 0;
  __syncthreads();
  for (int e0 = 0; e0 < experts; e0 += kScanThreads) {
    const int e = e0 + tid;
    const int begin = e < experts ? offsets[e] : 0;
    const int count = e < experts ? offsets[e + 1] - begin : 0;
    const int tiles = (count + tile_rows - 1) / tile_rows;
    scan[tid] = tiles;
    __syncthreads();
    for (int off = 1; off < kScanThreads; off <<= 1) {
      const int v = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += v;
      __syncthreads();
    }
    const int first = base + scan[tid] - tiles;
    for (int m = 0; m < tiles; ++m) {
      items[2 * (first + m)] = e;
      items[2 * (first + m) + 1] = begin + m * tile_rows;
    }
    __syncthreads();
    if (tid == kScanThreads - 1) base += scan[tid];
    __syncthreads();
  }
  if (tid == 0) *num_items = base;
}

// inverse[pair] = its row in `order` (inverse was filled with -1: skipped slots stay -1).
__global__ void scatter_inverse(const int32_t* offsets, int experts, const int32_t* order,
                                int64_t max_pairs, int32_t* inverse) {
  const int64_t pairs = offsets[experts];
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < pairs && r < max_pairs;
       r += int64_t(gridDim.x) * blockDim.x)
    inverse[order[r]] = static_cast<int32_t>(r);
}

__global__ void convert_to_bf16(const void* x, DType dtype, int64_t count, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(load_as_float(x, i, dtype));
}

__global__ void su_to_bf16(const uint16_t* su, int64_t count, __nv_bfloat16* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __float2bfloat16_rn(half_bits_to_float(su[i]));
}

__global__ void convert_from_f32(const float* in, int64_t count, void* out, DType dtype) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    store_from_float(out, i, dtype, in[i]);
}

// ---- the Hadamard path's row-wise kernels (one block per pair row, the row in shared memory) --
constexpr int kRowThreads = 256;

// In place: v <- T v on each block of `block` elements (block 0: identity), T normalized.
__device__ void block_hadamard_shared(float* v, int64_t n, int block) {
  if (block <= 1) return;
  const int half = block / 2;
  for (int len = 1; len < block; len <<= 1) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n / 2; i += blockDim.x) {
      const int64_t blk = i / half;
      const int j = static_cast<int>(i % half);
      const int64_t pos = blk * block + (j / len) * 2 * len + (j % len);
      const float a = v[pos], c = v[pos + len];
      v[pos] = a + c;
      v[pos + len] = a - c;
    }
  }
  __syncthreads();
  const float norm = rsqrtf(static_cast<float>(block));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[i] *= norm;
  __syncthreads();
}

// The expert that owns row r of `order` (binary search over offsets).
__device__ int expert_of_row(const int32_t* offsets, int experts, int64_t r) {
  int lo = 0, hi = experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// a_g[r] = T_g(x[t] . su_g[e]), a_u[r] = T_u(x[t] . su_u[e]) as bf16, t = order[r] / k.
__global__ void transform_pair_rows(const void* x, DType x_dtype, int top_k, const int32_t* offsets,
                                    const int32_t* order, DeviceProjection gate, DeviceProjection up,
                                    __nv_bfloat16* a_gate, __nv_bfloat16* a_up) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x, H = gate.K;
  if (r >= offsets[gate.experts]) return;
  const int e = expert_of_row(offsets, static_cast<int>(gate.experts), r);
  const int64_t t = order[r] / top_k;
  for (int which = 0; which < 2; ++which) {
    const DeviceProjection& w = which ? up : gate;
    __nv_bfloat16* dst = (which ? a_up : a_gate) + r * H;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
      row[i] = load_as_float(x, t * H + i, x_dtype) * half_to_float(w.su[e * H + i]);
    block_hadamard_shared(row, H, w.hadamard);
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) dst[i] = __float2bfloat16_rn(row[i]);
    __syncthreads();
  }
}

// h[r] = T_d(su_d . silu(T_g(G[r]) . sv_g) * (T_u(U[r]) . sv_u)) as bf16.
__global__ void transform_intermediate(const int32_t* offsets, DeviceProjection gate,
                                       DeviceProjection up, DeviceProjection down, const float* g_raw,
                                       const float* u_raw, __nv_bfloat16* h) {
  extern __shared__ float rows[];
  const int64_t r = blockIdx.x, I = gate.N;
  if (r >= offsets[gate.experts]) return;
  const int e = expert_of_row(offsets, static_cast<int>(gate.experts), r);
  float* g = rows;
  float* u = rows + I;
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
    g[i] = g_raw[r * I + i];
    u[i] = u_raw[r * I + i];
  }
  block_hadamard_shared(g, I, gate.hadamard);
  block_hadamard_shared(u, I, up.hadamard);
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) {
    const float gv = g[i] * half_to_float(gate.sv[e * I + i]);
    const float uv = u[i] * half_to_float(up.sv[e * I + i]);
    g[i] = silu(gv) * uv * half_to_float(down.su[e * I + i]);
  }
  block_hadamard_shared(g, I, down.hadamard);
  for (int64_t i = threadIdx.x; i < I; i += blockDim.x) h[r * I + i] = __float2bfloat16_rn(g[i]);
}

// rows[r] = p[pair] * T_d(rows[r]) . sv_d, in place.
__global__ void finish_rows(const int32_t* offsets, const int32_t* order, const float* probs,
                            DeviceProjection down, float* rows_out) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x, H = down.N;
  if (r >= offsets[down.experts]) return;
  const int e = expert_of_row(offsets, static_cast<int>(down.experts), r);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) row[i] = rows_out[r * H + i];
  block_hadamard_shared(row, H, down.hadamard);
  const float prob = probs[order[r]];
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x)
    rows_out[r * H + i] = row[i] * half_to_float(down.sv[e * H + i]) * prob;
}

// out[t] = sum over slots j in order of rows[inverse[t*k+j]] (skipped slots add nothing).
__global__ void combine_rows(const float* rows, const int32_t* inverse, int top_k, int64_t H,
                             void* out, DType out_dtype) {
  const int64_t t = blockIdx.x;
  for (int64_t n = threadIdx.x; n < H; n += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {
      const int32_t r = inverse[t * top_k + j];
      if (r >= 0) sum += rows[static_cast<int64_t>(r) * H + n];
    }
    store_from_float(out, t * H + n, out_dtype, sum);
  }
}

// ---- host side -------------------------------------------------------------------------------
bool any_hadamard(const GroupedMoeArgs& a) {
  return a.gate.hadamard || a.up.hadamard || a.down.hadamard;
}
int64_t max_work_items(const GroupedMoeArgs& a, int tile_rows) {
  const int64_t pairs = a.tokens * a.top_k;
  return ceil_div(pairs, tile_rows) + std::min<int64_t>(a.gate.experts, pairs);
}
// Row tile height from the average rows per expert (the Hadamard path keeps one configuration);
// the 256-row tile only where the device's shared memory holds it (Hopper).
int tile_rows_for(const GroupedMoeArgs& a) {
  const size_t limit = device_shared_limit();
  if (any_hadamard(a)) {
    if (mma_gemm_smem_bytes(2, true, kRows128) > limit)
      bad("the Hadamard path needs " + std::to_string(mma_gemm_smem_bytes(2, true, kRows128)) +
          " bytes of shared memory per block; this device allows " + std::to_string(limit));
    return kRows128;
  }
  const bool huge_fits = mma_gemm_smem_bytes(2, false, kRows256) <= limit &&
                         mma_gemm_smem_bytes(1, false, kRows256) <= limit;
  if (a.tile_rows) {
    if (a.tile_rows == kRows256 && !huge_fits)
      bad("tile_rows = 256 needs more shared memory per block than this device allows");
    return a.tile_rows;
  }
  // 32-row tiles only up to 16 rows per expert on average: beyond, random routing gives many
  // experts a second 32-row tile (every weight decoded twice), and one 128-row tile is faster.
  // Measured (H100, mixtral, us): 32-row tiles 1172 / 1914 / 2892 at 16 / 32 / 64 rows per expert,
  // 128-row tiles 1707 / 2589 at 64 / 128; switching at 64 or 32 made time fall as T rose.
  const int64_t pairs = a.tokens * a.top_k;
  if (pairs <= 16 * a.gate.experts) return kRows32;
  // 64-row tiles up to 48 rows per expert on average: random routing then rarely gives an expert a
  // second tile, and 3 blocks per SM stream weights where 128-row tiles hold 2 (ncu, mixtral 256
  // tokens on 128-row tiles: 1.95 active warps per scheduler, latency-bound).
  if (pairs <= 48 * a.gate.experts) return kRows64;
  return pairs >= 256 * a.gate.experts && huge_fits ? kRows256 : kRows128;
}

bool use_wgmma(const GroupedMoeArgs& a) {
  if (any_hadamard(a)) return false;
  GroupedKernel choice = a.kernel;
  if (choice == GroupedKernel::automatic) {
    switch (env_choice("TMOE_GROUPED_KERNEL", {"mma", "wgmma"}, -1)) {
      case 0: choice = GroupedKernel::mma_sync; break;
      case 1: choice = GroupedKernel::wgmma; break;
      default: break;
    }
  }
  if (choice == GroupedKernel::mma_sync || !wgmma_kernel_built()) return false;
  if (choice == GroupedKernel::wgmma) return true;
  return kWgmmaAutomatic && a.tile_rows == 0 &&
         a.tokens * a.top_k >= wgmma_min_rows_per_expert(a.gate.experts) * a.gate.experts;
}

// Split-K for down (atomic combine only: the partial sums meet in the float atomics): when the
// column blocks x row tiles fill fewer than two waves of blocks, e.g. mixtral at 128 tokens
// (8 experts x 32 column blocks of H = 4096), each block would stream a whole K = 14336 alone.
int down_k_splits(const GroupedMoeArgs& a, int tile_rows, int64_t max_items) {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t slots = int64_t{sms} * blocks_per_sm_for(tile_rows);
  const int64_t blocks = ceil_div(a.down.N, kBN) * max_items;
  const int64_t steps = ceil_div(a.down.K, kBK);
  int splits = 1;
  while (splits < 8 && blocks * splits < 2 * slots && steps >= 16 * splits) splits *= 2;
  return splits;
}

// Workspace carve-up; the same function sizes and places the buffers.
struct Workspace {
  int32_t* items = nullptr;
  int32_t* num_items = nullptr;
  int32_t* inverse = nullptr;
  __nv_bfloat16* x16 = nullptr;     // [T, H]   hadamard = 0 and x not bf16
  __nv_bfloat16* a_gate = nullptr;  // [pairs, H] Hadamard path
  __nv_bfloat16* a_up = nullptr;
  __nv_bfloat16* h = nullptr;       // [pairs, I]
  float* g_raw = nullptr;           // [pairs, I] Hadamard path
  float* u_raw = nullptr;
  float* rows = nullptr;            // [pairs, H] fixed-order combine / Hadamard path
  float* out_acc = nullptr;         // [T, H]   atomic combine into a 16-bit output
  __nv_bfloat16* su16[2] = {};      // gate, up su as bf16 (hadamard = 0; down's is folded into h)
  size_t bytes = 0;
};

Workspace carve(const GroupedMoeArgs& a, uint8_t* base) {
  Workspace w;
  size_t at = 0;
  auto take = [&](auto*& ptr, int64_t count) {
    using T = std::remove_reference_t<decltype(*ptr)>;
    at = (at + 255) / 256 * 256;
    ptr = reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(base) + at);
    at += static_cast<size_t>(count) * sizeof(T);
  };
  const int64_t T = a.tokens, pairs = a.tokens * a.top_k, H = a.gate.K, I = a.gate.N;
  const bool hadamard = any_hadamard(a);
  const bool fixed_order = a.deterministic || hadamard;
  take(w.items, 2 * max_work_items(a, kRows32));  // the longest list of any tile height
  take(w.num_items, 1);
  if (fixed_order) take(w.inverse, pairs);
  if (!hadamard && a.x_dtype != DType::bf16) take(w.x16, T * H);
  if (hadamard) {
    take(w.a_gate, pairs * H);
    take(w.a_up, pairs * H);
    take(w.g_raw, pairs * I);
    take(w.u_raw, pairs * I);
  }
  take(w.h, pairs * I);
  if (fixed_order) take(w.rows, pairs * H);
  if (!fixed_order && a.out_dtype != DType::f32) take(w.out_acc, T * H);
  if (!hadamard) {
    const int64_t E = a.gate.experts;
    take(w.su16[0], E * H);
    take(w.su16[1], E * H);
  }
  w.bytes = (at + 255) / 256 * 256;
  return w;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void validate_projection(const DeviceProjection& w, const char* name, bool check_pointers) {
  const std::string n = name;
  if (!valid_bits(w.bits)) bad(n + ": bits must be 2, 3 or 4, got " + std::to_string(w.bits));
  if (w.K <= 0 || w.N <= 0 || w.K % kTileDim || w.N % kTileDim)
    bad(n + ": K and N must be positive multiples of 16, got K=" + std::to_string(w.K) +
        " N=" + std::to_string(w.N));
  if (w.group_size <= 0 || w.group_size % kTileDim)
    bad(n + ": group size must be a positive multiple of 16, got " + std::to_string(w.group_size));
  if (w.hadamard) {
    const int b = w.hadamard;
    if (b < 2 || (b & (b - 1)) || w.K % b || w.N % b)
      bad(n + ": Hadamard block " + std::to_string(b) + " must be a power of two dividing K and N");
  }
  if (!check_pointers) return;
  if (!w.units || !w.scales || !w.su || !w.sv || !w.grid) bad(n + ": null device pointer");
  if (!aligned16(w.units) || !aligned16(w.scales) || !aligned16(w.su))
    bad(n + ": units, scales and su must be 16-byte aligned");
  if (w.quads != quads_of(w.K))
    bad(n + ": quads is " + std::to_string(w.quads) + ", expected " + std::to_string(quads_of(w.K)) +
        " (fragment layout of K = " + std::to_string(w.K) + ")");
}

void validate(const GroupedMoeArgs& a, bool check_pointers) {
  validate_projection(a.gate, "gate", check_pointers);
  validate_projection(a.up, "up", check_pointers);
  validate_projection(a.down, "down", check_pointers);
  const DeviceProjection &g = a.gate, &u = a.up, &d = a.down;
  if (u.K != g.K || u.N != g.N || d.K != g.N || d.N != g.K || g.experts <= 0 ||
      u.experts != g.experts || d.experts != g.experts)
    bad("gate, up and down do not form one MoE layer (gate " + std::to_string(g.K) + "x" +
        std::to_string(g.N) + ", up " + std::to_string(u.K) + "x" + std::to_string(u.N) +
        ", down " + std::to_string(d.K) + "x" + std::to_string(d.N) + ")");
  if (a.tokens < 0 || a.top_k <= 0) bad("tokens must be >= 0 and top_k > 0");
  if (a.tile_rows != 0 && a.tile_rows != kRows32 && a.tile_rows != kRows64 && a.tile_rows != kRows128 &&
      a.tile_rows != kRows256)
    bad("tile_rows must be 0, 32, 64, 128 or 256, got " + std::to_string(a.tile_rows));
  if (a.tokens * a.top_k >= (int64_t{1} << 31)) bad("too many (token, slot) pairs");
  if (max_work_items(a, kRows32) > 65535) bad("too many row tiles for one launch's grid");
  if (any_hadamard(a)) {
    const int64_t max_row = std::max(2 * g.N, g.K) * int64_t(sizeof(float));
    if (max_row > 200 * 1024) bad("Hadamard path: rows too long for shared memory");
  }
  if (check_pointers && a.tokens > 0) {
    if (!a.x || !a.offsets || !a.order || !a.probs || !a.out || !a.workspace)
      bad("null pointer among x, offsets, order, probs, out, workspace");
    if (!aligned16(a.x) || reinterpret_cast<uintptr_t>(a.workspace) % 256)
      bad("x must be 16-byte aligned and the workspace 256-byte aligned");
  }
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(bytes)),
               "cudaFuncSetAttribute");
}

unsigned elementwise_blocks(int64_t count) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(count, 256), 1, 4096));
}

}  // namespace

void validate_grouped_moe(const GroupedMoeArgs& args) { validate(args, true); }

bool grouped_uses_wgmma(const GroupedMoeArgs& args) {
  validate(args, false);
  return use_wgmma(args);
}

std::string grouped_plan_summary(const GroupedMoeArgs& args) {
  validate(args, false);
  if (use_wgmma(args))
    return "grouped: wgmma (sm_90a), " + std::to_string(wgmma_tokens(args)) + "-token tiles" +
           (wgmma_producer() ? ", producer warpgroup" : "") + (wgmma_tma_x() ? ", down's X by TMA" : "");
  return "grouped: mma.sync, " + std::to_string(tile_rows_for(args)) + "-row tiles" +
         (any_hadamard(args) ? ", Hadamard" : "");
}

size_t grouped_moe_workspace_bytes(const GroupedMoeArgs& args) {
  validate(args, false);
  return carve(args, nullptr).bytes;
}

void grouped_moe_forward(const GroupedMoeArgs& a, cudaStream_t stream) {
  validate(a, true);
  if (a.tokens == 0) return;
  const Workspace ws = carve(a, static_cast<uint8_t*>(a.workspace));
  const int experts = static_cast<int>(a.gate.experts);
  const int64_t T = a.tokens, pairs = T * a.top_k, H = a.gate.K, I = a.gate.N;
  const bool wgmma_path = use_wgmma(a);
  const int tile_rows = wgmma_path ? wgmma_tokens(a) : tile_rows_for(a);
  const int64_t max_items = max_work_items(a, tile_rows);
  const bool hadamard = any_hadamard(a);
  const bool fixed_order = a.deterministic || hadamard;

  build_work_items<<<1, kScanThreads, 0, stream>>>(a.offsets, experts, tile_rows, ws.items,
                                                   ws.num_items);
  check_cuda(cudaGetLastError(), "build_work_items launch");
  if (fixed_order) {
    check_cuda(cudaMemsetAsync(ws.inverse, 0xff, pairs * sizeof(int32_t), stream), "memset");
    scatter_inverse<<<elementwise_blocks(pairs), 256, 0, stream>>>(a.offsets, experts, a.order,
                                                                   pairs, ws.inverse);
    check_cuda(cudaGetLastError(), "scatter_inverse launch");
  }

  GemmParams p{};
  p.items = ws.items;
  p.num_items = ws.num_items;
  p.offsets = a.offsets;
  p.order = a.order;
  p.probs = a.probs;
  p.top_k = a.top_k;
  p.k_splits = 1;
  // Launches grouped_gemm_wgmma or grouped_gemm for NUM_PROJ projections (p's current ones).
  auto launch = [&](int num_proj) {
    if (wgmma_path) {
      // Rows of the A source: x's tokens (gate/up) or h's pairs (down).
      launch_gemm_wgmma(p, num_proj, tile_rows, max_items, p.gather_tokens ? T : pairs, stream);
    } else {
      launch_gemm_mma(p, num_proj, false, tile_rows, max_items, stream);
    }
  };

  // gate + up
  p.proj[0] = a.gate;
  p.proj[1] = a.up;
  p.K = H;
  p.N = I;
  if (!hadamard) {
    const __nv_bfloat16* x16 = static_cast<const __nv_bfloat16*>(a.x);
    if (a.x_dtype != DType::bf16) {
      convert_to_bf16<<<elementwise_blocks(T * H), 256, 0, stream>>>(a.x, a.x_dtype, T * H, ws.x16);
      check_cuda(cudaGetLastError(), "convert_to_bf16 launch");
      x16 = ws.x16;
    }
    p.a[0] = p.a[1] = x16;
    p.gather_tokens = true;
    const DeviceProjection* projections[2] = {&a.gate, &a.up};
    for (int q = 0; q < 2; ++q) {
      const int64_t count = projections[q]->experts * projections[q]->K;
      su_to_bf16<<<elementwise_blocks(count), 256, 0, stream>>>(projections[q]->su, count,
                                                                ws.su16[q]);
      check_cuda(cudaGetLastError(), "su_to_bf16 launch");
    }
    p.su16[0] = ws.su16[0];
    p.su16[1] = ws.su16[1];
    p.epilogue = kSwiglu;
    p.h = ws.h;
    p.h_su = a.down.su;
    launch(2);
  } else {
    const size_t row_bytes = H * sizeof(float);
    allow_shared(transform_pair_rows, row_bytes);
    transform_pair_rows<<<static_cast<unsigned>(pairs), kRowThreads, row_bytes, stream>>>(
        a.x, a.x_dtype, a.top_k, a.offsets, a.order, a.gate, a.up, ws.a_gate, ws.a_up);
    check_cuda(cudaGetLastError(), "transform_pair_rows launch");
    p.a[0] = ws.a_gate;
    p.a[1] = ws.a_up;
    p.gather_tokens = false;
    p.epilogue = kRawPair;
    p.g_raw = ws.g_raw;
    p.u_raw = ws.u_raw;
    launch_gemm_mma(p, 2, true, kRows128, max_items, stream);
    const size_t mid_bytes = 2 * I * sizeof(float);
    allow_shared(transform_intermediate, mid_bytes);
    transform_intermediate<<<static_cast<unsigned>(pairs), kRowThreads, mid_bytes, stream>>>(
        a.offsets, a.gate, a.up, a.down, ws.g_raw, ws.u_raw, ws.h);
    check_cuda(cudaGetLastError(), "transform_intermediate launch");
  }

  // down
  p.proj[0] = a.down;
  p.proj[1] = DeviceProjection{};
  p.a[0] = p.a[1] = ws.h;
  p.gather_tokens = false;
  p.su16[0] = p.su16[1] = nullptr;  // down's su is in h (or applied by the Hadamard path)
  p.K = I;
  p.N = H;
  if (!fixed_order) {
    float* acc = a.out_dtype == DType::f32 ? static_cast<float*>(a.out) : ws.out_acc;
    check_cuda(cudaMemsetAsync(acc, 0, T * H * sizeof(float), stream), "memset");
    p.epilogue = kAtomic;
    p.out_acc = acc;
    p.k_splits = wgmma_path ? 1 : down_k_splits(a, tile_rows, max_items);
    launch(1);
    if (a.out_dtype != DType::f32) {
      convert_from_f32<<<elementwise_blocks(T * H), 256, 0, stream>>>(acc, T * H, a.out,
                                                                      a.out_dtype);
      check_cuda(cudaGetLastError(), "convert_from_f32 launch");
    }
    return;
  }
  p.epilogue = hadamard ? kRowsRaw : kRowsScaled;
  p.rows = ws.rows;
  launch(1);
  if (hadamard) {
    const size_t row_bytes = H * sizeof(float);
    allow_shared(finish_rows, row_bytes);
    finish_rows<<<static_cast<unsigned>(pairs), kRowThreads, row_bytes, stream>>>(
        a.offsets, a.order, a.probs, a.down, ws.rows);
    check_cuda(cudaGetLastError(), "finish_rows launch");
  }
  combine_rows<<<static_cast<unsigned>(T), 256, 0, stream>>>(ws.rows, ws.inverse, a.top_k, H,
                                                            a.out, a.out_dtype);
  check_cuda(cudaGetLastError(), "combine_rows launch");
}

}  // namespace tmoe::cuda::grouped

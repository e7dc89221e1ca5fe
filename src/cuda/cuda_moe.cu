// CudaMoe: upload, workspace plan and the launches of forward(): routing, gate+up pass, down pass
// (with the combine fused into its finish), each a programmatic dependent of the one before
// (launch.hpp), or routing and the grouped path.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/dispatch.hpp"
#include "cuda_check.hpp"
#include "device_weights.cuh"
#include "fragment_layout.hpp"
#include "grouped/grouped_moe.cuh"
#include "projection.cuh"
#include "routing.hpp"
#include "tmoe/cuda.hpp"
#include "tmoe/error.hpp"

namespace tmoe::cuda {
namespace {

[[noreturn]] void bad_input(const std::string& what) { throw Error(ErrorKind::bad_input, what); }

template <typename T>
T* upload(const std::vector<T>& host, std::vector<void*>& owned) {
  void* p = nullptr;
  const size_t bytes = std::max<size_t>(host.size() * sizeof(T), 16);
  TMOE_CUDA_CHECK(cudaMalloc(&p, bytes));
  owned.push_back(p);
  if (!host.empty()) TMOE_CUDA_CHECK(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return static_cast<T*>(p);
}

// grid[i] == grid[0] + step * i to within 1e-6 of the largest level: the affine fast path. (The
// default grid is affine; the error of treating it so is ~1e-7 relative, far below any output
// rounding.) The pass's weights (p.w) are set once uploaded: the upload depends on this answer.
PassProjection describe(const TrellisTensor& t) {
  PassProjection p;
  const int levels = 1 << t.bits;
  const double step = (static_cast<double>(t.grid[levels - 1]) - t.grid[0]) / (levels - 1);
  double largest = 0;
  for (float g : t.grid) largest = std::max(largest, std::fabs(static_cast<double>(g)));
  bool affine = step != 0.0;
  for (int i = 0; i < levels && affine; ++i)
    affine = std::fabs(t.grid[i] - (t.grid[0] + step * i)) <= 1e-6 * largest;
  p.affine = affine;
  p.step = affine ? static_cast<float>(step) : 1.0f;
  p.grid0_over_step = affine ? static_cast<float>(t.grid[0] / step) : 0.0f;
  return p;
}

void check_projection(const TrellisTensor& t, const char* name) {
  if (t.K % kTileDim || t.N % kTileDim)
    bad_input(std::string("cuda backend: ") + name + " is " + std::to_string(t.K) + "x" + std::to_string(t.N) +
              "; K and N must be multiples of 16");
  if (t.hadamard > kMaxHadamard)
    bad_input(std::string("cuda backend: ") + name + " uses Hadamard blocks of " + std::to_string(t.hadamard) +
              "; the CUDA kernels take blocks up to " + std::to_string(kMaxHadamard));
}

size_t align_up(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

// A pass is chained to the kernel before it (programmatic dependent launch, launch.hpp; items from
// the ids, pass_routing.cuh) when its grid is at most this many waves of resident blocks. Measured
// on H100 (docs/notes-cuda.md, "Latency"): chaining every pass saved 5 us at qwen3 1-2 tokens (one
// wave) but made many-wave passes slower (mixtral 8 tokens, ~50 waves: 871 -> 1015 us).
constexpr int64_t kChainMaxWaves = 1;

// Launch geometry and workspace layout of one forward call; a function of (T, k) and the shape
// only, so a captured graph replays the same launches.
struct PassPlan {
  int k_splits = 1, k_tiles_per_block = 1, col_groups = 1, finish_cols = kColsPerBlock,
      num_finish_groups = 1;
  bool dense = false;  // 4- or 8-row tensor-core items: the kernel variant with more blocks per SM
  size_t shared = 0;
};

struct ForwardPlan {
  bool grouped = false;  // the tensor-core grouped path runs this call
  int tokens_per_item = 1;
  int64_t pairs = 0, max_items = 0;
  PassPlan gate_up, down;
  size_t counts = 0, offsets = 0, order = 0, inverse = 0, items = 0, num_items = 0, counters = 0,
         h = 0, y = 0, partial_gate_up = 0, partial_down = 0, grouped_workspace = 0, total = 0;
  int64_t num_counters = 0;
};

// Blocks of the pass kernels resident per SM: the register limit (queried once per kernel), then
// shared memory (the device's per-SM pool, 1 KB of it reserved per block).
struct Occupancy {
  int sms = 132;
  size_t shared_per_sm = 228 * 1024;
  int register_blocks[3][2] = {};   // CUDA-core kernel: [tokens per item 1, 2, 4][affine]
  int mma_register_blocks[3] = {};  // tensor-core kernel: [item rows 4, 8, 16]
  int mma_dense_register_blocks[2] = {};  // the dense variants of its 4- and 8-row kernels
  int blocks_per_sm(bool tensor_core, int tokens_per_item, bool affine, size_t shared, bool dense = false) const {
    const int rows = mma_item_rows(tokens_per_item);
    const int by_registers =
        tensor_core ? (dense && rows <= 8 ? mma_dense_register_blocks[rows == 4 ? 0 : 1]
                                          : mma_register_blocks[rows == 4 ? 0 : rows == 8 ? 1 : 2])
                    : register_blocks[tokens_per_item == 1 ? 0 : tokens_per_item == 2 ? 1 : 2][affine];
    const int by_shared = static_cast<int>(shared_per_sm / (shared + 1024));
    return std::max(1, std::min(by_registers, by_shared));
  }
};

// A block's fixed work (staging, group sums, finish test) in k-tile rows of its main loop. CUDA-core
// kernel: ncu on v6 counted ~1400 instructions per thread outside the decode steps, ~3 steps of 4
// rows. Tensor-core kernel: measured (H100, one run, each value twice, us; `tmoe bench --tokens
// 1,2,4 --grouped-min-tokens 1000000000` with the constant overridden):
//   fixed rows   qwen3 1 / 4 tokens   mixtral 1 / 2 / 4     glm 1 / 2 tokens   deepseek 1 / 4
//   16           30.6 / 74.2          130.9 / 209 / 322     65.4 / 116         136.2 / 436.5
//   40           30.3 / 72.0          129.3 / 209 / 319     62.9 / 115         --
//   96           30.1 / 72.1          128.8 / 219 / 329     62.8 / 118         140.6 / 431.2
//   256          30.4 / 72.2          152.4 / 221 / 325     62.8 / 117         --
// 40 is best or within 1% everywhere (glm 1 token -4%, qwen3 4 tokens -3% against 16).
inline constexpr int kFixedRowsCudaCore = 12;
// -DTMOE_FIXED_ROWS_TENSOR_CORE=N: another value, for A/B runs (scripts/gpu-ab).
#ifndef TMOE_FIXED_ROWS_TENSOR_CORE
#define TMOE_FIXED_ROWS_TENSOR_CORE 40
#endif
inline constexpr int kFixedRowsTensorCore = TMOE_FIXED_ROWS_TENSOR_CORE;
// A block of the dense 4-row variant (4 blocks per SM, 64 registers) against one of the 3-block
// kernel: more blocks at once, each slower (more warps share the schedulers; a few spills). From one
// H100 run (docs/notes-cuda.md, "v11"), 4 blocks against 3 at 1 / 4 / 16 tokens, us: mixtral 84 vs
// 93 / 219 vs 226, deepseek 88.5 vs 101 / 286 vs 313 / 874 vs 944, glm 44 vs 47 / 129 vs 141 /
// 334 vs 363, qwen3 47.5 vs 55 / 117 vs 133 at 4 / 16, but 27.4 vs 24.5 at 1 token (one wave both
// ways: the dense plan took 5 shorter splits). A block runs ~(4/3) / 1.1 = 1.2x as long when the
// SM is full (4/3 the warps, ~10% more throughput). Applied to the fixed work too: with it on the
// k-tile rows only, qwen3's 1-token down pass took the dense variant and was 1.5 us slower.
inline constexpr double kDenseBlockCost = 1.2;
// The dense 8-row variant (3 blocks per SM, 80 registers) against the 2-block one (128 registers):
// 1.5x the warps; assumed, like the 4-row pair, to run a block ~1.2x as long when the SM is full.
// -DTMOE_DENSE_8ROW_COST=N: another value for A/B runs (100: never the dense 8-row variant).
#ifndef TMOE_DENSE_8ROW_COST
#define TMOE_DENSE_8ROW_COST 1.2
#endif
inline constexpr double kDense8RowBlockCost = TMOE_DENSE_8ROW_COST;
// The tensor-core kernel's dynamic shared memory limit (prepare_projection_kernels raises it).
inline constexpr size_t kMaxPassShared = 96 * 1024;

// w: the pass's first projection (K, N); min_group_size: the smallest scale group of its projections.
PassPlan plan_pass(const DeviceProjection& w, int nproj, int min_group_size, int hadamard_out, int stage_bytes, bool affine,
                   bool tensor_core, int64_t busy_items, int tokens_per_item, const Occupancy& occupancy) {
  PassPlan p;
  const int64_t tiles_k = w.tiles_k();
  const int cols_per_block = tensor_core ? kMmaColsPerBlock : kColsPerBlock;
  p.col_groups = static_cast<int>(ceil_div(w.tiles_n() * kTileDim, cols_per_block));
  p.finish_cols = std::max(cols_per_block, hadamard_out);
  p.num_finish_groups = static_cast<int>(ceil_div(p.col_groups, p.finish_cols / cols_per_block));
  // K ranges hold whole Hadamard blocks, and for the tensor-core kernel whole units (4 k-tiles).
  const int align = std::max(tensor_core ? kQuadTiles : 1, w.hadamard / kTileDim);
  auto shared_of = [&](int64_t kr) {
    return tensor_core ? mma_pass_shared_bytes(tokens_per_item, static_cast<int>(kr), p.finish_cols, min_group_size)
                       : pass_shared_bytes(tokens_per_item, static_cast<int>(kr), p.finish_cols, stage_bytes);
  };
  // CUDA-core: at most 128 k-tile rows per block (staged activations <= tokens_per_item x 8 KB).
  // Tensor-core: up to 256 while the staged rows fit the shared memory limit.
  int64_t max_kr = std::max<int64_t>(align, (tensor_core ? 256 : 128) / align * align);
  while (tensor_core && max_kr > align && shared_of(max_kr) > kMaxPassShared) max_kr -= align;
  const int64_t per_split = std::max<int64_t>(1, busy_items * p.col_groups * nproj);
  const int fixed_rows = tensor_core ? kFixedRowsTensorCore : kFixedRowsCudaCore;
  // Pick the split count whose waves of blocks cost least: ceil(blocks / blocks-at-once) times a
  // block's length (its k-tile rows plus its fixed work). Whole waves matter: a last wave of a few
  // blocks costs as much as a full one (ncu on v4: 2.26 waves).
  const int64_t ks_min = ceil_div(tiles_k, max_kr);
  const int64_t ks_max = std::max(ks_min, std::min<int64_t>(ks_min + 64, ceil_div(tiles_k, 4)));
  // 4- and 8-row tensor-core items weigh the dense kernel variant too (ties go to the other one).
  const bool try_dense = tensor_core && mma_item_rows(tokens_per_item) <= 8;
  double best = 0;
  bool first = true;
  for (int dense = 0; dense <= (try_dense ? 1 : 0); ++dense)
    for (int64_t ks = ks_min; ks <= ks_max; ++ks) {
      const int64_t kr = ceil_div(ceil_div(tiles_k, ks), align) * align;
      const int64_t splits = ceil_div(tiles_k, kr);
      const size_t shared = shared_of(kr);
      const int64_t at_once =
          static_cast<int64_t>(occupancy.blocks_per_sm(tensor_core, tokens_per_item, affine, shared, dense != 0)) *
          occupancy.sms;
      const double block_cost =
          dense ? (mma_item_rows(tokens_per_item) == 4 ? kDenseBlockCost : kDense8RowBlockCost) : 1.0;
      const double cost = static_cast<double>(ceil_div(per_split * splits, at_once)) * (kr + fixed_rows) * block_cost;
      if (first || cost < best) {
        first = false;
        best = cost;
        p.k_tiles_per_block = static_cast<int>(kr);
        p.k_splits = static_cast<int>(splits);
        p.shared = shared;
        p.dense = dense != 0;
      }
    }
  return p;
}

}  // namespace

struct CudaMoe::Impl {
  MoeShape shape;
  CudaMoeOptions options;
  std::vector<void*> owned;
  DeviceProjection gate, up, down;
  PassProjection gate_pass, up_pass, down_pass;
  int32_t* error = nullptr;  // [3], see routing.hpp
  Occupancy occupancy;
  int64_t bytes = 0;

  ~Impl() {
    for (void* p : owned) cudaFree(p);
  }

  // `with_tiles`: also upload the tile layout, which only the CUDA-core general path (custom,
  // non-affine grids) reads. Every other kernel reads the fragment layout, so a model with the
  // default grids holds ONE copy of its indices on the device.
  DeviceProjection upload_projection(const TrellisTensor& t, bool with_tiles) {
    DeviceProjection d;
    const int64_t tb = tile_bytes(t.bits), tk = t.tiles_k(), tn = t.tiles_n();
    if (with_tiles) {
      // Tiles n-tile-major (each column strip's tiles contiguous along K): a projection block then
      // reads one contiguous region front to back. The tiles themselves keep FORMAT.md's bytes.
      std::vector<uint8_t> strips(t.indices.size());
      for (int64_t e = 0; e < t.experts; ++e)
        for (int64_t k = 0; k < tk; ++k)
          for (int64_t n = 0; n < tn; ++n)
            std::memcpy(strips.data() + ((e * tn + n) * tk + k) * tb,
                        t.indices.data() + ((e * tk + k) * tn + n) * tb, tb);
      d.tiles = upload(strips, owned);
    }
    const std::vector<uint32_t> units = pack_fragment_units(t.view());
    d.units = upload(units, owned);
    d.quads = quads_of(t.K);
    d.k_tile_stride = tb;
    d.n_tile_stride = tk * tb;
    d.expert_stride = tk * tn * tb;
    d.scales = upload(t.scales, owned);
    d.su = upload(t.su, owned);
    d.sv = upload(t.sv, owned);
    d.grid = upload(t.grid, owned);
    d.experts = t.experts;
    d.K = t.K;
    d.N = t.N;
    d.bits = t.bits;
    d.group_size = t.group_size;
    d.hadamard = t.hadamard;
    bytes += static_cast<int64_t>(units.size() * 4 + (with_tiles ? t.indices.size() : 0) +
                                  2 * (t.scales.size() + t.su.size() + t.sv.size()));
    return d;
  }

  grouped::GroupedMoeArgs grouped_args(int64_t tokens, int top_k) const {
    grouped::GroupedMoeArgs a;
    a.gate = gate;
    a.up = up;
    a.down = down;
    a.tokens = tokens;
    a.top_k = top_k;
    a.deterministic = options.deterministic;
    return a;
  }

  ForwardPlan plan(int64_t tokens, int top_k) const {
    ForwardPlan f;
    f.grouped = use_grouped_path(tokens, top_k, shape.experts, options.grouped_min_tokens);
    f.pairs = tokens * top_k;
    const double load = static_cast<double>(tokens * top_k) / shape.experts;
    const bool gu_tensor_core = tensor_core_pass(&gate_pass, 1) && tensor_core_pass(&up_pass, 1);
    const bool down_tensor_core = tensor_core_pass(&down_pass, 1);
    if (gu_tensor_core && down_tensor_core) {
      // mma columns are nearly free: items of up to 4 rows cost a 1-row item's loop, so one item
      // takes all of an expert's pairs up to 16 (4, 8 or 16 rows: 1, 2 or 4 mma blocks).
      f.tokens_per_item = std::min(kMaxMmaItemTokens, load <= 2 ? 4 : load <= 6 ? 8 : 16);
      // An expert gets at most one pair per token (unless a token lists it twice: then it just runs
      // more items), so items of more rows than tokens only stage rows of zeros (1 token: 4 rows
      // staged for 1 used; the kernel keeps 4 rows per mma block either way).
      f.tokens_per_item = static_cast<int>(std::min<int64_t>(f.tokens_per_item, std::max<int64_t>(tokens, 1)));
    } else {
      // Rows per item from the expected pairs per expert: with one pair per expert on average
      // (qwen3 at 8 tokens), items of 4 rows would run the 168-register kernel at 3 blocks per SM
      // for nothing; an expert that does get several pairs then runs several items (the extra
      // reads of its tiles hit L2: items of one expert run side by side).
      f.tokens_per_item = tokens <= 1 || load <= 0.5 ? 1 : tokens <= 2 || load <= 1.5 ? 2 : kMaxItemTokens;
    }
    f.max_items = max_work_items(f.pairs, shape.experts, f.tokens_per_item);
    const int64_t busy = std::min<int64_t>(f.max_items, std::min<int64_t>(f.pairs, shape.experts));
    const bool gu_affine = gate_pass.affine && up_pass.affine;
    f.gate_up = plan_pass(gate, 2, std::min(gate.group_size, up.group_size), std::max(gate.hadamard, up.hadamard),
                          ring_stage_bytes(std::max(gate.bits, up.bits)), gu_affine, gu_tensor_core, busy,
                          f.tokens_per_item, occupancy);
    f.down = plan_pass(down, 1, down.group_size, down.hadamard, ring_stage_bytes(down.bits), down_pass.affine != 0, down_tensor_core,
                       busy, f.tokens_per_item, occupancy);
    const int64_t E = shape.experts, P = f.pairs, H = shape.hidden, I = shape.intermediate;
    // Finish counters per (item, finish group) of each pass, then the fused combine's per (token,
    // finish group of the down pass).
    f.num_counters = f.max_items * (f.gate_up.num_finish_groups + f.down.num_finish_groups) +
                     tokens * f.down.num_finish_groups;
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t here = at;
      at = align_up(at + std::max<size_t>(bytes, 4));
      return here;
    };
    f.counts = take(E * 4);
    f.offsets = take((E + 1) * 4);
    f.order = take(P * 4);
    f.inverse = take(P * 4);
    f.items = take(f.max_items * kWorkItemInts * 4);
    f.num_items = take(4);
    f.counters = take(f.num_counters * 4);
    if (f.grouped) {  // its workspace depends on the dtypes: size it for the largest
      size_t most = 0;
      grouped::GroupedMoeArgs a = grouped_args(tokens, top_k);
      for (DType xd : {DType::f32, DType::f16, DType::bf16})
        for (DType od : {DType::f32, DType::f16, DType::bf16}) {
          a.x_dtype = xd;
          a.out_dtype = od;
          most = std::max(most, grouped::grouped_moe_workspace_bytes(a));
        }
      f.grouped_workspace = take(most);
      f.total = at;
      return f;
    }
    f.h = take(P * I * 4);
    f.y = take(P * H * 4);
    f.partial_gate_up = take(2 * static_cast<size_t>(f.gate_up.k_splits) * P * I * 4);
    f.partial_down = take(static_cast<size_t>(f.down.k_splits) * P * H * 4);
    f.total = at;
    return f;
  }
};

CudaMoe::CudaMoe(const MoeWeights& weights, const CudaMoeOptions& options) : impl_(std::make_unique<Impl>()) {
  weights.validate();
  check_projection(weights.gate, "gate");
  check_projection(weights.up, "up");
  check_projection(weights.down, "down");
  Impl& m = *impl_;
  m.shape = weights.shape();
  m.options = options;
  if (m.shape.experts > kMaxRoutingExperts)
    bad_input("cuda backend: " + std::to_string(m.shape.experts) + " experts; at most " +
              std::to_string(kMaxRoutingExperts));
  int device = 0;
  TMOE_CUDA_CHECK(cudaGetDevice(&device));
  TMOE_CUDA_CHECK(cudaDeviceGetAttribute(&m.occupancy.sms, cudaDevAttrMultiProcessorCount, device));
  int shared_per_sm = 0;
  TMOE_CUDA_CHECK(cudaDeviceGetAttribute(&shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  m.occupancy.shared_per_sm = static_cast<size_t>(shared_per_sm);
  prepare_projection_kernels();
  const int rows[3] = {1, 2, kMaxItemTokens};
  for (int r = 0; r < 3; ++r)
    for (int affine = 0; affine < 2; ++affine)
      m.occupancy.register_blocks[r][affine] = projection_blocks_per_sm(rows[r], affine != 0, 0);
  for (int r = 0; r < 3; ++r) m.occupancy.mma_register_blocks[r] = mma_projection_blocks_per_sm(4 << r, false, 0);
  for (int r = 0; r < 2; ++r) m.occupancy.mma_dense_register_blocks[r] = mma_projection_blocks_per_sm(4 << r, true, 0);
  m.gate_pass = describe(weights.gate);
  m.up_pass = describe(weights.up);
  m.down_pass = describe(weights.down);
  // gate and up share a pass, so they take the CUDA-core kernel together when either grid is custom.
  const bool gate_up_affine = m.gate_pass.affine && m.up_pass.affine;
  m.gate_pass.w = m.gate = m.upload_projection(weights.gate, !gate_up_affine);
  m.up_pass.w = m.up = m.upload_projection(weights.up, !gate_up_affine);
  m.down_pass.w = m.down = m.upload_projection(weights.down, !m.down_pass.affine);
  m.error = upload(std::vector<int32_t>{0, INT_MAX, 0}, m.owned);
}

CudaMoe::~CudaMoe() = default;

MoeShape CudaMoe::shape() const { return impl_->shape; }
const char* CudaMoe::path(int64_t tokens, int top_k) const {
  if (use_grouped_path(tokens, top_k, impl_->shape.experts, impl_->options.grouped_min_tokens)) return "grouped";
  // "decode": one token (one row per item); "small-batch": items of several rows.
  return tokens == 1 || impl_->plan(tokens, top_k).tokens_per_item == 1 ? "decode" : "small-batch";
}
std::string CudaMoe::plan_summary(int64_t tokens, int top_k) const {
  const Impl& m = *impl_;
  const ForwardPlan f = m.plan(tokens, top_k);
  if (f.grouped) return "grouped";
  std::string s = std::string(path(tokens, top_k)) + ": items of " + std::to_string(f.tokens_per_item) + " rows";
  auto pass = [&](const char* name, const PassPlan& p, const PassProjection* proj, int nproj) {
    const bool tc = tensor_core_pass(proj, nproj);  // = every grid of the pass is affine
    s += std::string("; ") + name + (tc ? " (tensor cores)" : " (CUDA cores)") + ": " + std::to_string(p.k_splits) +
         " splits x " + std::to_string(p.k_tiles_per_block) + " k-tiles, " + std::to_string(p.col_groups) +
         " column groups, " + std::to_string(m.occupancy.blocks_per_sm(tc, f.tokens_per_item, tc, p.shared, p.dense)) +
         " blocks/SM, " + std::to_string((p.shared + 1023) / 1024) + " KB shared";
  };
  const PassProjection gu[2] = {m.gate_pass, m.up_pass};
  pass("gate+up", f.gate_up, gu, 2);
  pass("down", f.down, &m.down_pass, 1);
  return s;
}
int64_t CudaMoe::device_bytes() const { return impl_->bytes; }
const DeviceProjection& CudaMoe::gate() const { return impl_->gate; }
const DeviceProjection& CudaMoe::up() const { return impl_->up; }
const DeviceProjection& CudaMoe::down() const { return impl_->down; }

size_t CudaMoe::workspace_bytes(int64_t tokens, int top_k) const {
  if (tokens < 0 || top_k < 1) bad_input("workspace_bytes: tokens must be >= 0 and top_k >= 1");
  // Splits shrink as tokens grow, so take the largest plan up to `tokens` (small counts first).
  size_t most = impl_->plan(tokens, top_k).total;
  for (int64_t t = 1; t < std::min<int64_t>(tokens, 1024); ++t) most = std::max(most, impl_->plan(t, top_k).total);
  return most;
}

void CudaMoe::forward(const MoeBatch& b, void* workspace, size_t bytes, cudaStream_t stream) const {
  const Impl& m = *impl_;
  if (b.tokens < 0 || b.top_k < 1)
    bad_input("forward: tokens = " + std::to_string(b.tokens) + ", top_k = " + std::to_string(b.top_k));
  if (b.tokens == 0) return;
  if (!b.x || !b.expert_ids || !b.expert_probs || !b.out) bad_input("forward: a batch pointer is null");
  for (DType d : {b.x_dtype, b.out_dtype})
    if (d != DType::f32 && d != DType::f16 && d != DType::bf16) bad_input("forward: unknown dtype");
  const ForwardPlan f = m.plan(b.tokens, b.top_k);
  if (!workspace || bytes < f.total)
    bad_input("forward: the workspace holds " + std::to_string(bytes) + " bytes; " +
              std::to_string(b.tokens) + " tokens need " + std::to_string(f.total) +
              " (workspace_bytes())");
  char* ws = static_cast<char*>(workspace);
  auto at = [&](size_t offset) { return reinterpret_cast<int32_t*>(ws + offset); };
  auto at_f = [&](size_t offset) { return reinterpret_cast<float*>(ws + offset); };

  RoutingOutputs r;
  r.counts = at(f.counts);
  r.offsets = at(f.offsets);
  r.order = at(f.order);
  r.inverse = at(f.inverse);
  r.items = at(f.items);
  r.num_items = at(f.num_items);
  r.counters = at(f.counters);
  r.num_counters = f.grouped ? 0 : f.num_counters;  // only the decode passes count arrivals
  r.error = m.error;
  launch_routing(b.expert_ids, b.tokens, b.top_k, m.shape.experts, f.tokens_per_item, r, stream);

  if (f.grouped) {
    grouped::GroupedMoeArgs a = m.grouped_args(b.tokens, b.top_k);
    a.x = b.x;
    a.x_dtype = b.x_dtype;
    a.counts = r.counts;
    a.offsets = r.offsets;
    a.order = r.order;
    a.probs = b.expert_probs;
    a.out = b.out;
    a.out_dtype = b.out_dtype;
    a.workspace = ws + f.grouped_workspace;
    grouped::grouped_moe_forward(a, stream);
    return;
  }

  PassArgs gu;
  gu.proj[0] = m.gate_pass;
  gu.proj[1] = m.up_pass;
  gu.nproj = 2;
  gu.src = b.x;
  gu.src_dtype = b.x_dtype;
  gu.src_by_token = 1;
  gu.top_k = b.top_k;
  gu.items = r.items;
  gu.num_items = r.num_items;
  gu.order = r.order;
  gu.pairs = f.pairs;
  gu.k_splits = f.gate_up.k_splits;
  gu.mma_dense = f.gate_up.dense;
  gu.k_tiles_per_block = f.gate_up.k_tiles_per_block;
  gu.col_groups = f.gate_up.col_groups;
  gu.finish_groups_cols = f.gate_up.finish_cols;
  gu.num_finish_groups = f.gate_up.num_finish_groups;
  gu.stage_bytes = ring_stage_bytes(std::max(m.gate.bits, m.up.bits));
  gu.partial = at_f(f.partial_gate_up);
  gu.counters = r.counters;
  gu.dst = at_f(f.h);
  gu.routing.experts = static_cast<int>(m.shape.experts);
  gu.routing.tokens_per_item = f.tokens_per_item;
  // One-wave passes start while the kernel before drains; with few pairs their blocks derive their
  // work items from the ids, so they need the routing kernel's plan only for the finish counters.
  auto chain = [&](PassArgs& a, const PassPlan& p, bool affine) {
    const int64_t blocks = f.max_items * p.col_groups * a.nproj * p.k_splits;
    const bool tensor_core = tensor_core_pass(a.proj, a.nproj);
    const int64_t at_once =
        static_cast<int64_t>(m.occupancy.blocks_per_sm(tensor_core, f.tokens_per_item, affine, p.shared, p.dense)) *
        m.occupancy.sms;
    a.routing.programmatic = blocks <= kChainMaxWaves * at_once;
    a.routing.expert_ids = a.routing.programmatic && f.pairs <= kLocalPlanMaxPairs ? b.expert_ids : nullptr;
  };
  chain(gu, f.gate_up, m.gate_pass.affine && m.up_pass.affine);
  launch_projection_pass(gu, f.tokens_per_item, f.max_items, f.gate_up.shared, stream);

  PassArgs dn = gu;
  dn.proj[0] = m.down_pass;
  dn.proj[1] = m.down_pass;
  dn.nproj = 1;
  dn.src = at_f(f.h);
  dn.src_dtype = DType::f32;
  dn.src_by_token = 0;
  dn.k_splits = f.down.k_splits;
  dn.mma_dense = f.down.dense;
  dn.k_tiles_per_block = f.down.k_tiles_per_block;
  dn.col_groups = f.down.col_groups;
  dn.finish_groups_cols = f.down.finish_cols;
  dn.num_finish_groups = f.down.num_finish_groups;
  dn.stage_bytes = ring_stage_bytes(m.down.bits);
  dn.partial = at_f(f.partial_down);
  dn.counters = r.counters + f.max_items * f.gate_up.num_finish_groups;
  dn.dst = at_f(f.y);
  dn.combine.out = b.out;
  dn.combine.out_dtype = b.out_dtype;
  dn.combine.probs = b.expert_probs;
  dn.combine.expert_ids = b.expert_ids;
  dn.combine.inverse = r.inverse;
  dn.combine.counters = dn.counters + f.max_items * f.down.num_finish_groups;
  dn.combine.tokens = b.tokens;
  dn.combine.experts = static_cast<int>(m.shape.experts);
  chain(dn, f.down, m.down_pass.affine != 0);
  launch_projection_pass(dn, f.tokens_per_item, f.max_items, f.down.shared, stream);
}

void CudaMoe::check_errors() const {
  TMOE_CUDA_CHECK(cudaDeviceSynchronize());
  int32_t error[3];
  TMOE_CUDA_CHECK(cudaMemcpy(error, impl_->error, sizeof error, cudaMemcpyDeviceToHost));
  if (error[0] == 0) return;
  const int32_t reset[3] = {0, INT_MAX, 0};
  TMOE_CUDA_CHECK(cudaMemcpy(impl_->error, reset, sizeof reset, cudaMemcpyHostToDevice));
  const int top_k = std::max(1, error[2]);
  bad_input("expert_ids: " + std::to_string(error[0]) + " id(s) outside [0, " +
            std::to_string(impl_->shape.experts) + ") other than -1 (first at token " +
            std::to_string(error[1] / top_k) + ", slot " + std::to_string(error[1] % top_k) +
            "); those slots were skipped");
}

}  // namespace tmoe::cuda

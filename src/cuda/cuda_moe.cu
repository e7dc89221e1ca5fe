// CudaMoe: upload, workspace plan and the launches of forward(): routing, gate+up pass, down pass
// (with the combine fused into its finish), each a programmatic dependent of the one before
// (launch.hpp), or routing and the grouped path.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/dispatch.hpp"
#include "cuda_check.hpp"
#include "device_weights.cuh"
#include "fragment_layout.hpp"
#include "fused_decode.cuh"
#include "grouped/grouped_moe.cuh"
#include "knobs.hpp"
#include "pass_plan.hpp"
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
// The gate+up pass defers its finish to the down pass's staging (projection.cuh, GateUpSums) when
// its grid is at most this many waves: there its finishing blocks are the pass's tail; in a pass of
// many waves they overlap other blocks' work, while every down block would still load 2 x splits
// sums per h value instead of one (mixtral at 16 tokens: ~6x the staging's ~60 MB of L2 reads). The
// environment variable TMOE_DEFER_FINISH_WAVES=N overrides it (0: never), for A/B runs and tests.
constexpr int64_t kDeferFinishMaxWaves = 1;

// Launch geometry and workspace layout of one forward call; a function of (T, k) and the shape
// only, so a captured graph replays the same launches.
struct ForwardPlan {
  bool grouped = false;  // the tensor-core grouped path runs this call
  bool fused = false;    // the one-launch decode runs this call (one token; fused_decode.cuh)
  int tokens_per_item = 1;
  int64_t pairs = 0, max_items = 0;
  PassPlan gate_up, down;
  bool chain_gate_up = false, chain_down = false;  // launched as programmatic dependents (kChainMaxWaves)
  bool defer_gate_up_finish = false;                // the down pass forms h (kDeferFinishMaxWaves)
  size_t counts = 0, offsets = 0, order = 0, inverse = 0, items = 0, num_items = 0, counters = 0,
         h = 0, y = 0, partial_gate_up = 0, partial_down = 0, grouped_workspace = 0, total = 0;
  int64_t num_counters = 0;
};

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
  // The one-launch decode's plan per top_k (index top_k; 0 unused), made at upload.
  FusedDecodePlan fused[kFusedMaxSlots + 1];
  PassTraceSink trace;  // where its blocks record in -DTMOE_PASS_TRACE=1 builds (pass_trace.hpp)
  int64_t defer_finish_waves = kDeferFinishMaxWaves;  // TMOE_DEFER_FINISH_WAVES, read at upload

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
    f.fused = !f.grouped && tokens == 1 && top_k <= kFusedMaxSlots && fused[top_k].ok;
    const bool gu_tensor_core = tensor_core_pass(&gate_pass, 1) && tensor_core_pass(&up_pass, 1);
    const bool down_tensor_core = tensor_core_pass(&down_pass, 1);
    const ItemPlan items = plan_items(tokens, top_k, shape.experts, gu_tensor_core && down_tensor_core);
    f.tokens_per_item = items.tokens_per_item;
    f.max_items = items.max_items;
    const int64_t busy = items.busy;
    const bool gu_affine = gate_pass.affine && up_pass.affine;
    f.gate_up = plan_pass(gate, 2, std::min(gate.group_size, up.group_size), std::max(gate.hadamard, up.hadamard),
                          ring_stage_bytes(std::max(gate.bits, up.bits)), gu_affine, gu_tensor_core, busy,
                          f.tokens_per_item, occupancy);
    f.down = plan_pass(down, 1, down.group_size, down.hadamard, ring_stage_bytes(down.bits), down_pass.affine != 0, down_tensor_core,
                       busy, f.tokens_per_item, occupancy);
    // Whether a pass's grid fits `waves` waves of resident blocks.
    auto within_waves = [&](const PassPlan& p, int nproj, bool tensor_core, bool affine, int64_t waves) {
      const int64_t blocks = f.max_items * p.col_groups * nproj * p.k_splits;
      const int64_t at_once =
          static_cast<int64_t>(occupancy.blocks_per_sm(tensor_core, f.tokens_per_item, affine, p.shared, p.dense)) *
          occupancy.sms;
      return blocks <= waves * at_once;
    };
    const bool down_affine = down_pass.affine != 0;
    f.chain_gate_up = within_waves(f.gate_up, 2, gu_tensor_core, gu_affine, kChainMaxWaves);
    f.chain_down = within_waves(f.down, 1, down_tensor_core, down_affine, kChainMaxWaves);
    f.defer_gate_up_finish = can_defer_gate_up_finish(gate.hadamard, up.hadamard) &&
                             deferred_staging_built(down_tensor_core, f.tokens_per_item, down.bits) &&
                             within_waves(f.gate_up, 2, gu_tensor_core, gu_affine, defer_finish_waves);
    const int64_t E = shape.experts, P = f.pairs, H = shape.hidden, I = shape.intermediate;
    // Finish counters per (item, finish group) of each pass, then the fused combine's per (token,
    // finish group of the down pass).
    f.num_counters = f.fused ? 1  // the phase arrivals
                             : f.max_items * (f.gate_up.num_finish_groups + f.down.num_finish_groups) +
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
    if (f.fused) {
      f.total = at;
      return f;
    }
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
  m.defer_finish_waves = std::max<int64_t>(0, env_knob("TMOE_DEFER_FINISH_WAVES", kDeferFinishMaxWaves));
  // TMOE_FUSED_DECODE=1 / =0 in the environment overrides the option (A/B timing: scripts/gpu-env-ab).
  const char* fused_knob = std::getenv("TMOE_FUSED_DECODE");
  const bool fused_allowed = fused_knob != nullptr && *fused_knob != '\0' ? std::string(fused_knob) != "0" : options.fused_decode;
  if (fused_allowed && fused_decode_built()) {
    int shared_optin = 0;
    TMOE_CUDA_CHECK(cudaDeviceGetAttribute(&shared_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    // Less the kernel's static shared memory (the slot tables: well under 1 KB).
    const size_t budget = static_cast<size_t>(shared_optin) - 1024;
    prepare_fused_decode(budget);
    m.trace = pass_trace_sink();
    for (int k = 1; k <= kFusedMaxSlots; ++k)
      m.fused[k] = plan_fused_decode(m.gate_pass, m.up_pass, m.down_pass, k, m.occupancy.sms, budget);
  }
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
  if (f.grouped) return grouped::grouped_plan_summary(m.grouped_args(tokens, top_k));
  if (f.fused) {
    const FusedDecodePlan& p = m.fused[top_k];
    return "decode: one launch, " + std::to_string(p.blocks) + " blocks, ring of " +
           std::to_string(p.layout.ring_slots) + " x " + std::to_string(p.layout.slot_bytes) + " bytes, " +
           std::to_string(p.layout.producer_warps) + " producer warps, " +
           std::to_string((p.shared + 1023) / 1024) + " KB shared";
  }
  std::string s = std::string(path(tokens, top_k)) + ": items of " + std::to_string(f.tokens_per_item) + " rows";
  auto pass = [&](const char* name, const PassPlan& p, const PassProjection* proj, int nproj) {
    const bool tc = tensor_core_pass(proj, nproj);  // = every grid of the pass is affine
    s += std::string("; ") + name + (tc ? " (tensor cores)" : " (CUDA cores)") + ": " + std::to_string(p.k_splits) +
         " splits x " + std::to_string(p.k_tiles_per_block) + " k-tiles, " + std::to_string(p.col_groups) +
         " column groups, " + std::to_string(m.occupancy.blocks_per_sm(tc, f.tokens_per_item, tc, p.shared, p.dense)) +
         " blocks/SM, " + std::to_string((p.shared + 1023) / 1024) + " KB shared";
    if (nproj == 2 && f.defer_gate_up_finish) s += ", SwiGLU in the down pass's staging";
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

  if (f.fused) {
    FusedDecodeArgs a;
    a.proj[0] = m.gate_pass;
    a.proj[1] = m.up_pass;
    a.proj[2] = m.down_pass;
    a.x = b.x;
    a.x_dtype = b.x_dtype;
    a.expert_ids = b.expert_ids;
    a.probs = b.expert_probs;
    a.top_k = b.top_k;
    a.experts = static_cast<int>(m.shape.experts);
    a.out = b.out;
    a.out_dtype = b.out_dtype;
    a.h = at_f(f.h);
    a.arrivals = r.counters;
    a.trace = m.trace;
    launch_fused_decode(a, m.fused[b.top_k], stream);
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
  gu.defer_finish = f.defer_gate_up_finish;
  // One-wave passes start while the kernel before drains; with few pairs their blocks derive their
  // work items from the ids, so they need the routing kernel's plan only for the finish counters.
  auto chain = [&](PassArgs& a, bool chained) {
    a.routing.programmatic = chained;
    a.routing.expert_ids = chained && f.pairs <= kLocalPlanMaxPairs ? b.expert_ids : nullptr;
  };
  chain(gu, f.chain_gate_up);
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
  dn.defer_finish = 0;
  if (f.defer_gate_up_finish) {
    dn.gate_up_sums.partial = gu.partial;
    dn.gate_up_sums.k_splits = gu.k_splits;
    dn.gate_up_sums.sv[0] = m.gate.sv;
    dn.gate_up_sums.sv[1] = m.up.sv;
  }
  dn.partial = at_f(f.partial_down);
  dn.counters = r.counters + f.max_items * f.gate_up.num_finish_groups;
  dn.dst = at_f(f.y);
  dn.combine.out = b.out;
  dn.combine.out_dtype = b.out_dtype;
  dn.combine.probs = b.expert_probs;
  dn.combine.expert_ids = b.expert_ids;
  dn.combine.counters = dn.counters + f.max_items * f.down.num_finish_groups;
  dn.combine.tokens = b.tokens;
  dn.combine.experts = static_cast<int>(m.shape.experts);
  chain(dn, f.chain_down);
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

// safetensors files and quantized models on disk.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "tmoe/moe.hpp"

namespace tmoe {

// safetensors dtypes we read and write (F8_*: 8-bit floats, e.g. DeepSeek-V3's E4M3 weights).
enum class TensorDType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, U64, U32, U16, F8_E4M3, F8_E5M2 };
int tensor_dtype_size(TensorDType t);
const char* tensor_dtype_name(TensorDType t);  // "F32", ...

struct TensorInfo {
  std::string name;
  TensorDType dtype = TensorDType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range inside the data section
  int64_t elements() const;
};

// Read-only view of one safetensors file over mmap. The constructor validates everything (header
// length, JSON, dtypes, shape x dtype size = byte range, ranges inside the file and not overlapping)
// and throws tmoe::Error (bad input) naming the file and the problem; it never crashes on bad files.
class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::filesystem::path& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(const std::string& name) const;  // nullptr if absent
  const TensorInfo& at(const std::string& name) const;    // throws if absent
  std::span<const uint8_t> bytes(const TensorInfo& t) const;
  // Converts an F32/F16/BF16/F64/F8_E4M3/F8_E5M2 tensor to fp32 (throws on other dtypes).
  std::vector<float> read_float(const std::string& name) const;

 private:
  std::filesystem::path path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  const uint8_t* data_ = nullptr;  // start of the data section
  const uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
};

// Collects tensors, then writes them to a temporary file beside `path` and renames it into place,
// so a crash never leaves a half-written file.
class SafetensorsWriter {
 public:
  void add(const std::string& name, TensorDType dtype, std::vector<int64_t> shape,
           std::span<const uint8_t> bytes);  // copies the bytes
  template <typename T>
  void add(const std::string& name, TensorDType dtype, std::vector<int64_t> shape,
           std::span<const T> values) {
    add(name, dtype, std::move(shape),
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(values.data()), values.size_bytes()));
  }
  // Like add, without a copy: `bytes` must stay alive and unchanged until write() returns (saves
  // a second copy of a large shard in memory).
  void add_borrowed(const std::string& name, TensorDType dtype, std::vector<int64_t> shape,
                    std::span<const uint8_t> bytes);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  void write(const std::filesystem::path& path) const;

 private:
  struct Entry {
    std::string name;
    TensorDType dtype;
    std::vector<int64_t> shape;
    bool borrowed = false;
    std::vector<uint8_t> owned;         // add(): the copy
    std::span<const uint8_t> borrowed_bytes;  // add_borrowed(): the caller's bytes
    std::span<const uint8_t> bytes() const { return borrowed ? borrowed_bytes : std::span<const uint8_t>(owned); }
  };
  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

// Stacked names of a quantized MoE projection: "model.layers.{L}.mlp.experts.{proj}_proj", with
// suffixes .indices .scales .su .sv .grid. proj is "gate", "up" or "down".
std::string stacked_name(int layer, const std::string& proj);

// A quantized model directory:
//   layer-<L>.safetensors  per stacked name: .indices U8 [E, tiles_k, tiles_n, B], .scales F16
//                          [E, G, N], .su F16 [E, K], .sv F16 [E, N], .grid F32 [2^bits]
//                          (scales/su/sv may be F32 and grid F16 in files written by others)
//   trellis.json           {"format": "trellis", "version": 1, "tensors": {<stacked name>: {"bits",
//                          "group_size", "hadamard", "experts", "K", "N", "file"}}}
// The constructor checks trellis.json against every shard (names, dtypes, shapes implied by
// bits/K/N/group_size, grid of 2^bits) and keeps the shards mapped; layers load on demand.
class QuantizedModel {
 public:
  explicit QuantizedModel(const std::filesystem::path& dir);  // validates; throws tmoe::Error
  ~QuantizedModel();
  QuantizedModel(const QuantizedModel&) = delete;
  QuantizedModel& operator=(const QuantizedModel&) = delete;
  const std::filesystem::path& dir() const;
  std::vector<int> layers() const;           // layer numbers present, ascending
  MoeShape layer_shape(int layer) const;     // hidden, intermediate, experts (top_k 0); throws if absent
  MoeWeights load_layer(int layer) const;    // throws tmoe::Error if absent or malformed
  struct TensorSummary {
    std::string name;  // stacked name
    int64_t experts, K, N;
    int bits, group_size, hadamard;
    int64_t bytes;     // bytes on disk of all its parts
  };
  std::vector<TensorSummary> summary() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes layers to `dir` (created if needed): one shard per layer plus trellis.json, each written
// atomically (temporary file + rename).
void save_quantized_layer(const std::filesystem::path& dir, int layer, const MoeWeights& weights);

// Writes `bytes` to a temporary file `<path>.tmp-<pid>` beside `path`, fsyncs it and renames it
// over `path`; on any error removes the temporary file and throws tmoe::Error.
void write_file_atomically(const std::filesystem::path& path, std::span<const uint8_t> bytes);

// The MoE expert weights of a Hugging Face checkpoint: one .safetensors file, or a directory of
// them (model-0000x-of-0000y.safetensors, optionally with model.safetensors.index.json, whose
// weight_map then names the files to read). Recognised names:
//   model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight            (Qwen, DeepSeek, GLM, ...)
//   model.layers.{L}.block_sparse_moe.experts.{E}.{w1,w3,w2}.weight        (Mixtral: w1=gate, w3=up, w2=down)
// The constructor finds them all, groups them per layer and projection and checks that every
// expert 0..E-1 of each projection is present with one shape and an F32/F16/BF16 dtype, and that
// gate/up are [I, H] and down is [H, I]; otherwise it throws tmoe::Error naming the tensor.
// FP8 weights (F8_E4M3/F8_E5M2, DeepSeek-V3) are accepted with their `<name>_scale_inv` tensor of
// per-128x128-block multipliers, [ceil(out/128), ceil(in/128)]; loading applies them.
// Files stay mapped (read-only) while the object lives; loading a projection converts on demand.
class HfCheckpoint {
 public:
  explicit HfCheckpoint(const std::filesystem::path& file_or_dir);
  ~HfCheckpoint();
  HfCheckpoint(const HfCheckpoint&) = delete;
  HfCheckpoint& operator=(const HfCheckpoint&) = delete;

  // The safetensors files opened, in name order.
  std::vector<std::filesystem::path> files() const;
  // Layer numbers that hold MoE experts, ascending (empty if the checkpoint has none).
  std::vector<int> layers() const;
  // One projection as our format sees it: `experts` stacked K x N matrices, K = in, N = out.
  struct ProjectionShape {
    int64_t experts = 0, K = 0, N = 0;
  };
  // proj is "gate", "up" or "down"; throws tmoe::Error for an unknown layer or projection.
  ProjectionShape projection_shape(int layer, const std::string& proj) const;
  // hidden, intermediate and experts of a layer (name "custom"); top_k is num_experts_per_tok of
  // the config.json beside the weights, 0 if there is none (the weights do not say it).
  MoeShape layer_shape(int layer) const;
  // The projection's weights stacked over experts and transposed to [E, K, N] = (in, out), fp32
  // (Hugging Face stores each expert as [out, in]).
  std::vector<float> load_stacked(int layer, const std::string& proj) const;
  // Experts first .. first + count - 1 of the same, into `out` (count * K * N floats): what the
  // quantizer streams, so a projection never has to fit in memory at once.
  void load_experts(int layer, const std::string& proj, int64_t first, int64_t count, std::span<float> out) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tmoe

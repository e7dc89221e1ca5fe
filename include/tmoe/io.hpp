// safetensors files and quantized models on disk.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tmoe/moe.hpp"

namespace tmoe {

// safetensors dtypes we read and write.
enum class TensorDType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };
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
  // Converts an F32/F16/BF16/F64 tensor to fp32 (throws on other dtypes).
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
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  void write(const std::filesystem::path& path) const;

 private:
  struct Entry {
    std::string name;
    TensorDType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Stacked names of a quantized MoE projection: "model.layers.{L}.mlp.experts.{proj}_proj", with
// suffixes .indices .scales .su .sv .grid. proj is "gate", "up" or "down".
std::string stacked_name(int layer, const std::string& proj);

// A quantized model directory: safetensors shards plus trellis.json (bits, group size, hadamard and
// shape per tensor). Layers load on demand.
class QuantizedModel {
 public:
  explicit QuantizedModel(const std::filesystem::path& dir);  // validates; throws tmoe::Error
  ~QuantizedModel();
  std::vector<int> layers() const;           // layer numbers present, ascending
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

}  // namespace tmoe

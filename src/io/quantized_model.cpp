// The quantized model directory: layer-<L>.safetensors shards plus trellis.json.
//
// trellis.json: {"format": "trellis", "version": 1, "tensors": {<stacked name>: {"bits",
// "group_size", "hadamard", "experts", "K", "N", "file"}}}. The shards hold, per stacked name,
// .indices (U8 [E, tiles_k, tiles_n, B]), .scales ([E, G, N]), .su ([E, K]), .sv ([E, N]) as F16
// (F32 accepted on load, FORMAT.md) and .grid ([2^bits], F32 or F16).
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "io/io_internal.hpp"
#include "tmoe/error.hpp"
#include "tmoe/io.hpp"

namespace tmoe {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kIndexFile = "trellis.json";
constexpr const char* kProjections[] = {"gate", "up", "down"};
constexpr const char* kParts[] = {"indices", "scales", "su", "sv", "grid"};

std::string shard_name(int layer) { return fmt::format("layer-{}.safetensors", layer); }

std::span<const uint8_t> as_bytes(const auto& vec) {
  return {reinterpret_cast<const uint8_t*>(vec.data()), vec.size() * sizeof(vec[0])};
}

// Reads trellis.json; returns an empty index if the file does not exist.
json read_index(const fs::path& path, bool must_exist) {
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    require(!must_exist, "{}: missing (not a quantized model directory?)", path.string());
    return json{{"format", "trellis"}, {"version", 1}, {"tensors", json::object()}};
  }
  std::ifstream in(path);
  require(bool(in), "{}: cannot open", path.string());
  json index;
  try {
    index = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", path.string(), e.what());
  }
  require(index.is_object(), "{}: not a JSON object", path.string());
  require(index.value("format", json()) == "trellis", "{}: \"format\" is not \"trellis\"", path.string());
  require(index.value("version", json()) == 1, "{}: unsupported \"version\" {} (expected 1)", path.string(),
          index.value("version", json()).dump());
  require(index.contains("tensors") && index["tensors"].is_object(), "{}: no \"tensors\" object",
          path.string());
  return index;
}

// One entry of trellis.json, checked for types and ranges.
struct IndexEntry {
  int layer = 0, projection = 0;  // projection: 0 gate, 1 up, 2 down
  int64_t experts = 0, K = 0, N = 0;
  int bits = 0, group_size = 0, hadamard = 0;
  std::string file;
};

IndexEntry parse_entry(const fs::path& index_path, const std::string& name, const json& entry) {
  const std::string where = fmt::format("{}: tensor '{}'", index_path.string(), name);
  static const std::regex stacked(R"(model\.layers\.(\d{1,9})\.mlp\.experts\.(gate|up|down)_proj)");
  std::smatch m;
  require(std::regex_match(name, m, stacked), "{}: not a stacked expert projection name", where);
  IndexEntry e;
  e.layer = std::stoi(m[1]);
  e.projection = m[2] == "gate" ? 0 : m[2] == "up" ? 1 : 2;
  require(entry.is_object(), "{}: entry is not an object", where);
  auto integer = [&](const char* key, int64_t lo, int64_t hi) {
    require(entry.contains(key) && entry[key].is_number_integer(), "{}: \"{}\" missing or not an integer",
            where, key);
    const json& v = entry[key];
    require(!v.is_number_unsigned() || v.get<uint64_t>() <= static_cast<uint64_t>(hi),
            "{}: \"{}\" = {} is out of range [{}, {}]", where, key, v.dump(), lo, hi);
    const int64_t x = v.get<int64_t>();
    require(x >= lo && x <= hi, "{}: \"{}\" = {} is out of range [{}, {}]", where, key, x, lo, hi);
    return x;
  };
  constexpr int64_t kMaxDim = int64_t{1} << 31;  // far beyond any model; keeps products in int64
  e.bits = static_cast<int>(integer("bits", 2, 4));
  e.group_size = static_cast<int>(integer("group_size", 1, kMaxDim));
  e.hadamard = static_cast<int>(integer("hadamard", 0, kMaxDim));
  e.experts = integer("experts", 1, 1 << 20);
  e.K = integer("K", 1, kMaxDim);
  e.N = integer("N", 1, kMaxDim);
  require(entry.contains("file") && entry["file"].is_string(), "{}: \"file\" missing or not a string", where);
  e.file = entry["file"].get<std::string>();
  require(!e.file.empty() && fs::path(e.file).filename() == e.file && e.file != "." && e.file != "..",
          "{}: \"file\" = '{}' is not a file name inside the model directory", where, e.file);
  return e;
}

std::string stacked_for(const IndexEntry& e) { return stacked_name(e.layer, kProjections[e.projection]); }

// Expected shape of each part of a stacked projection.
std::vector<int64_t> expected_shape(const IndexEntry& e, int part) {
  switch (part) {
    case 0: return {e.experts, ceil_div(e.K, kTileDim), ceil_div(e.N, kTileDim), tile_bytes(e.bits)};
    case 1: return {e.experts, ceil_div(e.K, e.group_size), e.N};
    case 2: return {e.experts, e.K};
    case 3: return {e.experts, e.N};
    default: return {int64_t{1} << e.bits};
  }
}

std::string shape_string(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

// Copies an F16 or F32 tensor into fp16 bits.
std::vector<uint16_t> read_half(const SafetensorsReader& file, const TensorInfo& t) {
  const std::span<const uint8_t> bytes = file.bytes(t);
  std::vector<uint16_t> out(static_cast<size_t>(t.elements()));
  if (t.dtype == TensorDType::F16) {
    if (!out.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  } else {
    std::vector<float> values(out.size());
    convert_to_float(bytes, t.dtype, values, file.path().string() + ": tensor '" + t.name + "'");
    for (size_t i = 0; i < out.size(); ++i) out[i] = float_to_half(values[i]);
  }
  return out;
}

// An exclusive flock(2) on a directory, held for the object's lifetime.
class DirectoryLock {
 public:
  explicit DirectoryLock(const fs::path& dir) : fd_(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) {
    require(fd_ >= 0, "{}: cannot open the model directory: {}", dir.string(), std::strerror(errno));
    int result;
    while ((result = ::flock(fd_, LOCK_EX)) != 0 && errno == EINTR) {
    }
    if (result != 0) {
      const std::string reason = std::strerror(errno);
      ::close(fd_);
      fail("{}: cannot lock the model directory: {}", dir.string(), reason);
    }
  }
  ~DirectoryLock() { ::close(fd_); }  // closing releases the lock
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

 private:
  int fd_;
};

}  // namespace

std::string stacked_name(int layer, const std::string& proj) {
  require(proj == "gate" || proj == "up" || proj == "down", "unknown projection '{}'", proj);
  return fmt::format("model.layers.{}.mlp.experts.{}_proj", layer, proj);
}

// ------------------------------------------------------------------------------------------ save

void save_quantized_layer(const fs::path& dir, int layer, const MoeWeights& weights) {
  require(layer >= 0, "layer number must be >= 0, got {}", layer);
  weights.validate();
  std::error_code ec;
  fs::create_directories(dir, ec);
  require(!ec && fs::is_directory(dir), "{}: cannot create the model directory: {}", dir.string(),
          ec.message());
  // Several processes may save layers of one model at once (one per layer): the read-modify-write
  // of trellis.json happens under an exclusive lock on the directory.
  DirectoryLock lock(dir);
  // Read the index first so that a malformed trellis.json fails before anything is written.
  const fs::path index_path = dir / kIndexFile;
  json index = read_index(index_path, /*must_exist=*/false);

  const std::string file = shard_name(layer);
  SafetensorsWriter writer;
  writer.set_metadata("format", "trellis");
  const TrellisTensor* tensors[] = {&weights.gate, &weights.up, &weights.down};
  for (int p = 0; p < 3; ++p) {
    const TrellisTensor& t = *tensors[p];
    const std::string name = stacked_name(layer, kProjections[p]);
    IndexEntry e{layer, p, t.experts, t.K, t.N, t.bits, t.group_size, t.hadamard, file};
    writer.add_borrowed(name + ".indices", TensorDType::U8, expected_shape(e, 0), as_bytes(t.indices));
    writer.add_borrowed(name + ".scales", TensorDType::F16, expected_shape(e, 1), as_bytes(t.scales));
    writer.add_borrowed(name + ".su", TensorDType::F16, expected_shape(e, 2), as_bytes(t.su));
    writer.add_borrowed(name + ".sv", TensorDType::F16, expected_shape(e, 3), as_bytes(t.sv));
    writer.add_borrowed(name + ".grid", TensorDType::F32, expected_shape(e, 4), as_bytes(t.grid));
    index["tensors"][name] = {{"bits", t.bits},       {"group_size", t.group_size},
                              {"hadamard", t.hadamard}, {"experts", t.experts},
                              {"K", t.K},             {"N", t.N},
                              {"file", file}};
  }
  // Shard first, then the index: the index never names a shard that is not complete.
  writer.write(dir / file);
  const std::string text = index.dump(2) + "\n";
  write_file_atomically(index_path, {reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

// ------------------------------------------------------------------------------------------ load

struct QuantizedModel::Impl {
  fs::path dir;
  std::map<std::string, std::unique_ptr<SafetensorsReader>> files;  // file name -> shard
  std::map<int, std::array<IndexEntry, 3>> layers;                  // layer -> gate, up, down

  const std::array<IndexEntry, 3>& layer(int l) const {
    auto it = layers.find(l);
    require(it != layers.end(), "{}: no layer {} (layers present: {})", dir.string(), l,
            fmt::join(layer_numbers(), ", "));
    return it->second;
  }
  std::vector<int> layer_numbers() const {
    std::vector<int> out;
    for (const auto& [l, _] : layers) out.push_back(l);
    return out;
  }
  const TensorInfo& part(const IndexEntry& e, int p) const {
    return files.at(e.file)->at(stacked_for(e) + "." + kParts[p]);
  }
};

QuantizedModel::QuantizedModel(const fs::path& dir) : impl_(std::make_unique<Impl>()) {
  impl_->dir = dir;
  std::error_code ec;
  require(fs::is_directory(dir, ec), "{}: no such model directory", dir.string());
  const fs::path index_path = dir / kIndexFile;
  const json index = read_index(index_path, /*must_exist=*/true);

  std::map<int, std::array<std::optional<IndexEntry>, 3>> found;
  for (const auto& [name, entry] : index["tensors"].items()) {
    IndexEntry e = parse_entry(index_path, name, entry);
    found[e.layer][e.projection] = e;
  }
  for (auto& [layer, projections] : found) {
    std::array<IndexEntry, 3> entries;
    for (int p = 0; p < 3; ++p) {
      require(projections[p].has_value(), "{}: layer {} has no {} projection", index_path.string(), layer,
              kProjections[p]);
      entries[p] = *projections[p];
      const IndexEntry& e = entries[p];
      const std::string name = stacked_for(e);
      auto file = impl_->files.find(e.file);
      if (file == impl_->files.end()) {
        require(fs::is_regular_file(dir / e.file, ec), "{}: shard '{}' of '{}' is missing",
                dir.string(), e.file, name);
        file = impl_->files.emplace(e.file, std::make_unique<SafetensorsReader>(dir / e.file)).first;
      }
      // The geometry rules of TrellisTensor::validate (checked here without allocating storage).
      require(e.group_size % kTileDim == 0, "{}: tensor '{}': group_size {} is not a multiple of 16",
              index_path.string(), name, e.group_size);
      require(e.hadamard == 0 || (std::has_single_bit(static_cast<unsigned>(e.hadamard)) &&
                                  e.K % e.hadamard == 0 && e.N % e.hadamard == 0),
              "{}: tensor '{}': hadamard block {} is not a power of two dividing K={} and N={}",
              index_path.string(), name, e.hadamard, e.K, e.N);
      for (int part = 0; part < 5; ++part) {
        const std::string part_name = name + "." + kParts[part];
        const TensorInfo* t = file->second->find(part_name);
        require(t != nullptr, "{}: tensor '{}' is missing", (dir / e.file).string(), part_name);
        const std::vector<int64_t> want = expected_shape(e, part);
        require(t->shape == want, "{}: tensor '{}' has shape {}, trellis.json (bits {}, K {}, N {}, group_size {}) "
                "implies {}", (dir / e.file).string(), part_name, shape_string(t->shape), e.bits, e.K, e.N,
                e.group_size, shape_string(want));
        const bool ok = part == 0 ? t->dtype == TensorDType::U8
                                  : t->dtype == TensorDType::F16 || t->dtype == TensorDType::F32;
        require(ok, "{}: tensor '{}' has dtype {} (expected {})", (dir / e.file).string(), part_name,
                tensor_dtype_name(t->dtype), part == 0 ? "U8" : "F16 or F32");
      }
    }
    require(entries[0].experts == entries[1].experts && entries[0].experts == entries[2].experts &&
                entries[0].K == entries[1].K && entries[0].N == entries[1].N &&
                entries[2].K == entries[0].N && entries[2].N == entries[0].K,
            "{}: layer {}: gate {}x{}x{}, up {}x{}x{} and down {}x{}x{} (experts x K x N) do not form one "
            "MoE layer", index_path.string(), layer, entries[0].experts, entries[0].K, entries[0].N,
            entries[1].experts, entries[1].K, entries[1].N, entries[2].experts, entries[2].K, entries[2].N);
    impl_->layers[layer] = entries;
  }
}

QuantizedModel::~QuantizedModel() = default;

const fs::path& QuantizedModel::dir() const { return impl_->dir; }

std::vector<int> QuantizedModel::layers() const { return impl_->layer_numbers(); }

MoeShape QuantizedModel::layer_shape(int layer) const {
  const IndexEntry& gate = impl_->layer(layer)[0];
  MoeShape shape;
  shape.name = "custom";
  shape.hidden = gate.K;
  shape.intermediate = gate.N;
  shape.experts = static_cast<int>(gate.experts);
  return shape;
}

MoeWeights QuantizedModel::load_layer(int layer) const {
  const auto& entries = impl_->layer(layer);
  MoeWeights weights;
  TrellisTensor* tensors[] = {&weights.gate, &weights.up, &weights.down};
  for (int p = 0; p < 3; ++p) {
    const IndexEntry& e = entries[p];
    const SafetensorsReader& file = *impl_->files.at(e.file);
    TrellisTensor& t = *tensors[p];
    t.experts = e.experts, t.K = e.K, t.N = e.N, t.bits = e.bits;
    t.group_size = e.group_size, t.hadamard = e.hadamard;
    const std::span<const uint8_t> indices = file.bytes(impl_->part(e, 0));
    t.indices.assign(indices.begin(), indices.end());
    t.scales = read_half(file, impl_->part(e, 1));
    t.su = read_half(file, impl_->part(e, 2));
    t.sv = read_half(file, impl_->part(e, 3));
    t.grid = file.read_float(impl_->part(e, 4).name);
  }
  try {
    weights.validate();
  } catch (const Error& error) {
    fail("{}: layer {}: {}", impl_->dir.string(), layer, error.what());
  }
  return weights;
}

std::vector<QuantizedModel::TensorSummary> QuantizedModel::summary() const {
  std::vector<TensorSummary> out;
  for (const auto& [layer, entries] : impl_->layers) {
    for (const IndexEntry& e : entries) {
      int64_t bytes = 0;
      for (int part = 0; part < 5; ++part) {
        const TensorInfo& t = impl_->part(e, part);
        bytes += static_cast<int64_t>(t.end - t.begin);
      }
      out.push_back({stacked_for(e), e.experts, e.K, e.N, e.bits, e.group_size, e.hadamard, bytes});
    }
  }
  return out;
}

}  // namespace tmoe

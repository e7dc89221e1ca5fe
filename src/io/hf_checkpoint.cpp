// Discovery of MoE expert weights in Hugging Face safetensors checkpoints.
#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "io/io_internal.hpp"
#include "tmoe/error.hpp"
#include "tmoe/io.hpp"

namespace tmoe {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kProjections[] = {"gate", "up", "down"};

int projection_slot(const std::string& proj) {
  for (int i = 0; i < 3; ++i)
    if (proj == kProjections[i]) return i;
  fail("unknown projection '{}' (expected gate, up or down)", proj);
}

// Projection slot (0 gate, 1 up, 2 down) of a Hugging Face projection name, or -1.
int hf_projection_slot(const std::string& name) {
  if (name == "gate_proj" || name == "w1") return 0;
  if (name == "up_proj" || name == "w3") return 1;
  if (name == "down_proj" || name == "w2") return 2;
  return -1;
}

// Parses a decimal number of at most 9 digits (layer and expert numbers), or returns -1.
int small_number(const std::string& digits) {
  if (digits.empty() || digits.size() > 9) return -1;
  return std::stoi(digits);
}

// FP8 checkpoints (DeepSeek-V3) scale each 128 x 128 block of [out, in] by `<name>_scale_inv`
// ([ceil(out/128), ceil(in/128)], despite its name a multiplier: w = fp8 * scale_inv).
constexpr int64_t kFp8ScaleBlock = 128;

bool is_fp8(TensorDType t) { return t == TensorDType::F8_E4M3 || t == TensorDType::F8_E5M2; }

struct ExpertTensor {
  const SafetensorsReader* file = nullptr;
  const TensorInfo* info = nullptr;
  const SafetensorsReader* scale_file = nullptr;  // FP8 only: its block scales
  const TensorInfo* scale = nullptr;
};

// One projection of one layer: expert number -> tensor.
using ProjectionTensors = std::map<int, ExpertTensor>;

std::vector<fs::path> checkpoint_files(const fs::path& file_or_dir) {
  std::error_code ec;
  require(fs::exists(file_or_dir, ec), "{}: no such file or directory", file_or_dir.string());
  if (!fs::is_directory(file_or_dir, ec)) return {file_or_dir};

  const fs::path index_path = file_or_dir / "model.safetensors.index.json";
  std::vector<fs::path> files;
  if (fs::exists(index_path, ec)) {
    // The index names the shards; a directory may also hold unrelated .safetensors files.
    json index;
    try {
      std::ifstream in(index_path);
      require(bool(in), "{}: cannot open", index_path.string());
      index = json::parse(in);
    } catch (const json::exception& e) {
      fail("{}: not valid JSON: {}", index_path.string(), e.what());
    }
    require(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
            "{}: no weight_map object", index_path.string());
    std::set<std::string> names;
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      require(file.is_string(), "{}: weight_map entry '{}' is not a file name", index_path.string(), tensor);
      const std::string name = file.get<std::string>();
      require(!name.empty() && fs::path(name).filename() == name && name != "." && name != "..",
              "{}: weight_map names '{}', not a file of this directory", index_path.string(), name);
      names.insert(name);
    }
    for (const auto& name : names) {
      require(fs::is_regular_file(file_or_dir / name, ec), "{}: shard '{}' named by the index is missing",
              index_path.string(), name);
      files.push_back(file_or_dir / name);
    }
  } else {
    for (const auto& entry : fs::directory_iterator(file_or_dir))
      if (entry.is_regular_file() && entry.path().extension() == ".safetensors") files.push_back(entry.path());
    std::sort(files.begin(), files.end());
  }
  require(!files.empty(), "{}: no .safetensors files", file_or_dir.string());
  return files;
}

}  // namespace

struct HfCheckpoint::Impl {
  std::vector<fs::path> paths;
  std::vector<std::unique_ptr<SafetensorsReader>> files;
  // layer -> [gate, up, down]
  std::map<int, std::array<ProjectionTensors, 3>> layers;
  int top_k = 0;  // num_experts_per_tok of config.json, 0 if unknown

  const ProjectionTensors& projection(int layer, const std::string& proj) const {
    auto it = layers.find(layer);
    require(it != layers.end(), "checkpoint has no MoE experts in layer {}", layer);
    return it->second[projection_slot(proj)];
  }
};

// num_experts_per_tok from the config.json beside the weights; 0 if there is none.
int read_top_k(const fs::path& file_or_dir) {
  std::error_code ec;
  const fs::path dir = fs::is_directory(file_or_dir, ec) ? file_or_dir : file_or_dir.parent_path();
  const fs::path path = (dir.empty() ? fs::path(".") : dir) / "config.json";
  if (!fs::is_regular_file(path, ec)) return 0;
  json config;
  try {
    std::ifstream in(path);
    config = json::parse(in);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", path.string(), e.what());
  }
  if (!config.is_object() || !config.contains("num_experts_per_tok")) return 0;
  const json& k = config["num_experts_per_tok"];
  require(k.is_number_integer() && k.get<int64_t>() > 0 && k.get<int64_t>() <= 1 << 16,
          "{}: num_experts_per_tok is {}, not a positive integer", path.string(), k.dump());
  return static_cast<int>(k.get<int64_t>());
}

HfCheckpoint::HfCheckpoint(const fs::path& file_or_dir) : impl_(std::make_unique<Impl>()) {
  impl_->paths = checkpoint_files(file_or_dir);
  impl_->top_k = read_top_k(file_or_dir);
  static const std::regex qwen_style(R"(model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight)");
  static const std::regex mixtral_style(R"(model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight)");
  std::map<std::string, ExpertTensor> scale_tensors;  // name -> tensor, for FP8 weights
  for (const fs::path& path : impl_->paths) {
    impl_->files.push_back(std::make_unique<SafetensorsReader>(path));
    const SafetensorsReader& file = *impl_->files.back();
    for (const TensorInfo& t : file.tensors()) {
      if (t.name.ends_with("_scale_inv")) scale_tensors.emplace(t.name, ExpertTensor{&file, &t});
      std::smatch m;
      if (!std::regex_match(t.name, m, qwen_style) && !std::regex_match(t.name, m, mixtral_style)) continue;
      const std::string where = fmt::format("{}: tensor '{}'", path.string(), t.name);
      const int layer = small_number(m[1]), expert = small_number(m[2]);
      require(layer >= 0 && expert >= 0, "{}: layer or expert number out of range", where);
      require(t.dtype == TensorDType::F32 || t.dtype == TensorDType::F16 || t.dtype == TensorDType::BF16 ||
                  is_fp8(t.dtype),
              "{}: dtype {} (expected F32, F16, BF16 or F8_E4M3/F8_E5M2 with _scale_inv)", where,
              tensor_dtype_name(t.dtype));
      require(t.shape.size() == 2 && t.shape[0] > 0 && t.shape[1] > 0,
              "{}: shape [{}] is not a non-empty matrix", where, fmt::join(t.shape, ", "));
      auto& slot = impl_->layers[layer][hf_projection_slot(m[3])];
      const auto [it, inserted] = slot.emplace(expert, ExpertTensor{&file, &t});
      require(inserted, "{}: found twice (also in {})", where, it->second.file->path().string());
    }
  }

  for (auto& [layer, projections] : impl_->layers)
    for (auto& tensors : projections)
      for (auto& [e, t] : tensors) {
        if (!is_fp8(t.info->dtype)) continue;
        const std::string name = t.info->name + "_scale_inv";
        auto it = scale_tensors.find(name);
        require(it != scale_tensors.end(), "{}: tensor '{}' is {} but its block scales '{}' are missing",
                t.file->path().string(), t.info->name, tensor_dtype_name(t.info->dtype), name);
        const TensorInfo& scale = *it->second.info;
        const std::vector<int64_t> want{ceil_div(t.info->shape[0], kFp8ScaleBlock),
                                        ceil_div(t.info->shape[1], kFp8ScaleBlock)};
        require(scale.shape == want && (scale.dtype == TensorDType::F32 || scale.dtype == TensorDType::BF16 ||
                                        scale.dtype == TensorDType::F16),
                "{}: tensor '{}' is {} of shape [{}], expected F32/BF16/F16 [{}] (blocks of {})",
                it->second.file->path().string(), name, tensor_dtype_name(scale.dtype),
                fmt::join(scale.shape, ", "), fmt::join(want, ", "), kFp8ScaleBlock);
        t.scale_file = it->second.file;
        t.scale = &scale;
      }

  for (const auto& [layer, projections] : impl_->layers) {
    int64_t experts = -1;
    std::array<std::vector<int64_t>, 3> shapes;
    for (int p = 0; p < 3; ++p) {
      const ProjectionTensors& tensors = projections[p];
      require(!tensors.empty(), "layer {}: no {} projection experts", layer, kProjections[p]);
      // Expert numbers are the keys of an ordered map: they are 0..E-1 iff the last is E-1.
      const int64_t count = static_cast<int64_t>(tensors.size());
      if (tensors.rbegin()->first != count - 1) {
        int missing = 0;
        while (tensors.count(missing)) ++missing;
        fail("layer {}: {} projection of expert {} is missing (found {} experts, up to expert {})",
             layer, kProjections[p], missing, count, tensors.rbegin()->first);
      }
      if (experts < 0) experts = count;
      require(count == experts, "layer {}: {} has {} experts but gate has {}", layer, kProjections[p],
              count, experts);
      shapes[p] = tensors.begin()->second.info->shape;
      for (const auto& [e, t] : tensors)
        require(t.info->shape == shapes[p], "layer {}: {} of expert {} has shape [{}], expert 0 has [{}]",
                layer, kProjections[p], e, fmt::join(t.info->shape, ", "), fmt::join(shapes[p], ", "));
    }
    // Hugging Face stores [out, in]: gate/up are [I, H], down is [H, I].
    require(shapes[1] == shapes[0], "layer {}: up is [{}] but gate is [{}]", layer,
            fmt::join(shapes[1], ", "), fmt::join(shapes[0], ", "));
    require(shapes[2][0] == shapes[0][1] && shapes[2][1] == shapes[0][0],
            "layer {}: down is [{}], expected [{}, {}] (gate transposed)", layer, fmt::join(shapes[2], ", "),
            shapes[0][1], shapes[0][0]);
  }
}

HfCheckpoint::~HfCheckpoint() = default;

std::vector<fs::path> HfCheckpoint::files() const { return impl_->paths; }

std::vector<int> HfCheckpoint::layers() const {
  std::vector<int> out;
  for (const auto& [layer, _] : impl_->layers) out.push_back(layer);
  return out;
}

HfCheckpoint::ProjectionShape HfCheckpoint::projection_shape(int layer, const std::string& proj) const {
  const ProjectionTensors& tensors = impl_->projection(layer, proj);
  const auto& shape = tensors.begin()->second.info->shape;  // [out, in]
  return {static_cast<int64_t>(tensors.size()), shape[1], shape[0]};
}

MoeShape HfCheckpoint::layer_shape(int layer) const {
  const ProjectionShape gate = projection_shape(layer, "gate");
  MoeShape shape;
  shape.name = "custom";
  shape.hidden = gate.K;
  shape.intermediate = gate.N;
  shape.experts = static_cast<int>(gate.experts);
  shape.top_k = impl_->top_k;
  return shape;
}

std::vector<float> HfCheckpoint::load_stacked(int layer, const std::string& proj) const {
  const ProjectionShape s = projection_shape(layer, proj);
  std::vector<float> out(static_cast<size_t>(s.experts * s.K * s.N));
  load_experts(layer, proj, 0, s.experts, out);
  return out;
}

void HfCheckpoint::load_experts(int layer, const std::string& proj, int64_t first, int64_t count,
                                std::span<float> out) const {
  const ProjectionTensors& tensors = impl_->projection(layer, proj);
  const ProjectionShape s = projection_shape(layer, proj);
  require(first >= 0 && count >= 0 && first + count <= s.experts,
          "load_experts: experts {} .. {} of layer {} {} (it has {})", first, first + count - 1, layer, proj,
          s.experts);
  require(out.size() == static_cast<size_t>(count * s.K * s.N),
          "load_experts: the output holds {} floats, {} experts of {} x {} need {}", out.size(), count, s.K,
          s.N, count * s.K * s.N);

  // Everything that may throw happens here, before the parallel region.
  struct Source {
    const uint8_t* bytes;
    TensorDType dtype;  // F32, F16, BF16 or F8_* (checked by the constructor)
    size_t size;
    std::vector<float> block_scales;  // FP8 only
  };
  std::vector<Source> sources;
  for (const auto& [e, t] : tensors) {
    if (e < first || e >= first + count) continue;
    const std::span<const uint8_t> bytes = t.file->bytes(*t.info);
    const size_t size = static_cast<size_t>(tensor_dtype_size(t.info->dtype));
    require(bytes.size() == static_cast<size_t>(s.K * s.N) * size, "{}: internal size mismatch", t.info->name);
    sources.push_back({bytes.data(), t.info->dtype, size,
                       t.scale ? t.scale_file->read_float(t.scale->name) : std::vector<float>{}});
  }

  // Transposes in square blocks so both the [N, K] source and the [K, N] destination are walked
  // along cache lines; each block is converted to fp32 first. One parallel loop over all experts'
  // blocks: a region per expert would pay a barrier per expert.
  constexpr int64_t kBlock = 64;
  static_assert(kFp8ScaleBlock % kBlock == 0);  // a block row lies in one FP8 scale block
  const int64_t scale_columns = ceil_div(s.K, kFp8ScaleBlock);
  const int64_t n_blocks = ceil_div(s.N, kBlock);
#pragma omp parallel
  {
    std::vector<float> rows(static_cast<size_t>(kBlock * kBlock));
#pragma omp for schedule(static)
    for (int64_t job = 0; job < count * n_blocks; ++job) {
      const int64_t e = job / n_blocks, n0 = (job % n_blocks) * kBlock, n1 = std::min(s.N, n0 + kBlock);
      const Source& src = sources[static_cast<size_t>(e)];  // e: position in the range
      float* expert_out = out.data() + static_cast<size_t>(e * s.K * s.N);
      for (int64_t k0 = 0; k0 < s.K; k0 += kBlock) {
        const int64_t k1 = std::min(s.K, k0 + kBlock), width = k1 - k0;
        for (int64_t n = n0; n < n1; ++n) {
          float* row = rows.data() + (n - n0) * kBlock;
          decode_float_values(src.bytes + static_cast<size_t>(n * s.K + k0) * src.size, src.dtype, row,
                              static_cast<size_t>(width));
          if (!src.block_scales.empty()) {
            const float scale = src.block_scales[(n / kFp8ScaleBlock) * scale_columns + k0 / kFp8ScaleBlock];
            for (int64_t k = 0; k < width; ++k) row[k] *= scale;
          }
        }
        for (int64_t k = k0; k < k1; ++k)
          for (int64_t n = n0; n < n1; ++n) expert_out[k * s.N + n] = rows[(n - n0) * kBlock + (k - k0)];
      }
    }
  }
}

}  // namespace tmoe

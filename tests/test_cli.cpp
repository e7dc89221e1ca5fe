// End-to-end tests of the tmoe command-line tool, through the built binary (TMOE_CLI_PATH): a small
// synthetic Hugging Face checkpoint goes through quantize, inspect, dequantize, run and verify; usage
// errors must exit 2 and bad models or inputs exit 1 with a clear message.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tmoe/backend.hpp"
#include "tmoe/io.hpp"
#include "tmoe/moe.hpp"

namespace fs = std::filesystem;

namespace {

struct CliResult {
  int code = -1;
  std::string out, err;
};

std::string read_text(const fs::path& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// The test's own temporary directory, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::random_device device;
    path_ = fs::temp_directory_path() / ("tmoe_cli_test_" + std::to_string(device()) + std::to_string(device()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// Runs `tmoe <args>` with stdout and stderr captured into files of `dir`.
CliResult run_cli(const fs::path& dir, const std::string& args) {
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string command = std::string("'") + TMOE_CLI_PATH + "' " + args + " >'" + out.string() + "' 2>'" +
                              err.string() + "'";
  const int status = std::system(command.c_str());
  CliResult result;
  result.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  result.out = read_text(out);
  result.err = read_text(err);
  return result;
}

std::string describe(const CliResult& r) {
  return "exit " + std::to_string(r.code) + "\n--- stdout\n" + r.out + "--- stderr\n" + r.err;
}

std::string quoted(const fs::path& p) { return "'" + p.string() + "'"; }

// A tiny MoE model in Hugging Face layout: per layer and expert, gate/up [I, H] and down [H, I]
// (HF stores [out, in]). Values ~ N(0, 0.02^2) like a real checkpoint.
constexpr int kLayers = 2, kExperts = 4, kHidden = 64, kIntermediate = 32;

struct HfLayer {
  // [projection][expert] -> row-major [out][in], exactly the values stored (after bf16 rounding).
  std::vector<float> weights[3][kExperts];
};

enum class Naming { qwen, mixtral };

std::string hf_name(Naming naming, int layer, int expert, int proj) {
  const char* qwen[] = {"gate_proj", "up_proj", "down_proj"};
  const char* mixtral[] = {"w1", "w3", "w2"};  // Mixtral: w1 = gate, w3 = up, w2 = down
  const std::string prefix = "model.layers." + std::to_string(layer);
  return naming == Naming::qwen
             ? prefix + ".mlp.experts." + std::to_string(expert) + "." + qwen[proj] + ".weight"
             : prefix + ".block_sparse_moe.experts." + std::to_string(expert) + "." + mixtral[proj] + ".weight";
}

// Writes kLayers layers: qwen naming in bf16 with one shard per layer (plus router and embedding
// tensors the discovery must skip), mixtral naming in fp32 in one file.
std::vector<HfLayer> write_checkpoint(const fs::path& dir, Naming naming, std::mt19937_64& rng) {
  fs::create_directories(dir);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<HfLayer> layers(kLayers);
  tmoe::SafetensorsWriter single;
  for (int layer = 0; layer < kLayers; ++layer) {
    tmoe::SafetensorsWriter shard;
    tmoe::SafetensorsWriter& writer = naming == Naming::qwen ? shard : single;
    for (int proj = 0; proj < 3; ++proj) {
      const int64_t out = proj == 2 ? kHidden : kIntermediate, in = proj == 2 ? kIntermediate : kHidden;
      for (int e = 0; e < kExperts; ++e) {
        std::vector<float>& w = layers[layer].weights[proj][e];
        w.resize(out * in);
        for (float& v : w) v = normal(rng);
        if (naming == Naming::qwen) {
          std::vector<uint16_t> bf16(w.size());
          for (size_t i = 0; i < w.size(); ++i) {
            bf16[i] = tmoe::float_to_bf16(w[i]);
            w[i] = tmoe::bf16_to_float(bf16[i]);
          }
          writer.add(hf_name(naming, layer, e, proj), tmoe::TensorDType::BF16, {out, in},
                     std::span<const uint16_t>(bf16));
        } else {
          writer.add(hf_name(naming, layer, e, proj), tmoe::TensorDType::F32, {out, in}, std::span<const float>(w));
        }
      }
    }
    if (naming == Naming::qwen) {
      std::vector<float> router(kExperts * kHidden, 0.5f);  // the router: not an expert weight
      writer.add("model.layers." + std::to_string(layer) + ".mlp.gate.weight", tmoe::TensorDType::F32,
                 {kExperts, kHidden}, std::span<const float>(router));
      shard.write(dir / ("model-0000" + std::to_string(layer + 1) + "-of-00002.safetensors"));
    }
  }
  if (naming == Naming::mixtral) {
    std::vector<float> embedding(16 * kHidden, 1.0f);
    single.add("model.embed_tokens.weight", tmoe::TensorDType::F32, {16, kHidden}, std::span<const float>(embedding));
    single.write(dir / "model.safetensors");
  }
  return layers;
}

// A run input: x [T, H] (F32 or BF16), expert_ids [T, k] with a -1 slot, expert_probs [T, k].
struct RunInput {
  int64_t tokens = 5;
  int top_k = 2;
  std::vector<float> x;  // the values the CLI sees (bf16-rounded when written as BF16)
  std::vector<int32_t> ids;
  std::vector<float> probs;
};

RunInput write_run_input(const fs::path& path, bool bf16, std::mt19937_64& rng) {
  RunInput in;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> expert(0, kExperts - 1);
  std::uniform_real_distribution<float> prob(0.1f, 1.0f);
  in.x.resize(in.tokens * kHidden);
  for (float& v : in.x) v = normal(rng);
  for (int64_t t = 0; t < in.tokens; ++t) {
    const int first = expert(rng);
    in.ids.push_back(first);
    in.ids.push_back(t == 1 ? -1 : (first + 1 + expert(rng) % (kExperts - 1)) % kExperts);  // distinct, or -1
    in.probs.push_back(prob(rng));
    in.probs.push_back(prob(rng));
  }
  tmoe::SafetensorsWriter writer;
  if (bf16) {
    std::vector<uint16_t> x16(in.x.size());
    for (size_t i = 0; i < x16.size(); ++i) {
      x16[i] = tmoe::float_to_bf16(in.x[i]);
      in.x[i] = tmoe::bf16_to_float(x16[i]);
    }
    writer.add("x", tmoe::TensorDType::BF16, {in.tokens, kHidden}, std::span<const uint16_t>(x16));
  } else {
    writer.add("x", tmoe::TensorDType::F32, {in.tokens, kHidden}, std::span<const float>(in.x));
  }
  writer.add("expert_ids", tmoe::TensorDType::I32, {in.tokens, in.top_k}, std::span<const int32_t>(in.ids));
  writer.add("expert_probs", tmoe::TensorDType::F32, {in.tokens, in.top_k}, std::span<const float>(in.probs));
  writer.write(path);
  return in;
}

double relative_difference(std::span<const float> a, std::span<const float> ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    norm += double(ref[i]) * ref[i];
  }
  return std::sqrt(diff / norm);
}

class CliTest : public ::testing::Test {
 protected:
  CliTest() : seed_(std::random_device{}()), rng_(seed_) {}
  uint64_t seed_;
  std::mt19937_64 rng_;
  TempDir dir_;
};

// The full pipeline for one naming scheme and dtype.
void check_pipeline(const fs::path& dir, Naming naming, std::mt19937_64& rng) {
  const fs::path checkpoint = dir / "hf", model = dir / "model";
  const std::vector<HfLayer> original = write_checkpoint(checkpoint, naming, rng);

  // quantize: one result line per stacked tensor.
  const CliResult q = run_cli(dir, "quantize --in " + quoted(checkpoint) + " --out " + quoted(model) +
                                       " --bits 3 --group-size 32 --threads 2");
  ASSERT_EQ(q.code, 0) << describe(q);
  size_t lines = 0;
  for (size_t at = q.out.find("rel. error"); at != std::string::npos; at = q.out.find("rel. error", at + 1)) ++lines;
  EXPECT_EQ(lines, size_t{3 * kLayers}) << describe(q);

  // inspect: every stacked tensor with its bits.
  const CliResult info = run_cli(dir, "inspect " + quoted(model));
  ASSERT_EQ(info.code, 0) << describe(info);
  for (int layer = 0; layer < kLayers; ++layer)
    for (const char* proj : {"gate", "up", "down"})
      EXPECT_NE(info.out.find(tmoe::stacked_name(layer, proj)), std::string::npos) << describe(info);

  // dequantize: bitwise the loaded model's effective weights (the same fp64 -> fp32 rounding), and
  // close to the original weights transposed to [E, in, out]. 3 bits with one scale per 32 weights
  // leaves a relative error near 0.15 on Gaussian weights; 0.35 passes that with margin while a
  // transposed or misassigned matrix (uncorrelated values: error ~1.4) fails.
  const fs::path dequantized = dir / "deq.safetensors";
  const CliResult d = run_cli(dir, "dequantize " + quoted(model) + " --out " + quoted(dequantized));
  ASSERT_EQ(d.code, 0) << describe(d);
  const tmoe::QuantizedModel loaded(model);
  const tmoe::SafetensorsReader deq(dequantized);
  for (int layer = 0; layer < kLayers; ++layer) {
    const tmoe::MoeWeights weights = loaded.load_layer(layer);
    const tmoe::TrellisTensor* tensors[] = {&weights.gate, &weights.up, &weights.down};
    const char* names[] = {"gate", "up", "down"};
    for (int proj = 0; proj < 3; ++proj) {
      SCOPED_TRACE(tmoe::stacked_name(layer, names[proj]));
      const tmoe::TrellisTensor& t = *tensors[proj];
      const std::vector<float> values = deq.read_float(tmoe::stacked_name(layer, names[proj]));
      ASSERT_EQ(deq.at(tmoe::stacked_name(layer, names[proj])).shape, (std::vector<int64_t>{t.experts, t.K, t.N}));
      std::vector<double> w(t.K * t.N);
      for (int64_t e = 0; e < t.experts; ++e) {
        tmoe::effective_weight(t, e, w);
        std::vector<float> transposed(t.K * t.N);
        const std::vector<float>& hf = original[layer].weights[proj][e];  // [out = N][in = K]
        for (int64_t k = 0; k < t.K; ++k)
          for (int64_t n = 0; n < t.N; ++n) {
            ASSERT_EQ(values[(e * t.K + k) * t.N + n], static_cast<float>(w[k * t.N + n])) << "e " << e << " k " << k;
            transposed[k * t.N + n] = hf[n * t.K + k];
          }
        EXPECT_LT(relative_difference({values.data() + e * t.K * t.N, size_t(t.K * t.N)}, transposed), 0.35)
            << "expert " << e;
      }
    }
  }

  // run: the reference backend and the CPU backend against reference_forward, F32 and BF16 inputs.
  // Bounds: the reference rounds fp64 to fp32 once (< 1e-7 relative, 1e-6 leaves margin); the CPU
  // accumulates in fp32 over K <= 64 terms (~1e-6), 1e-4 as tmoe verify uses.
  for (const bool bf16 : {false, true}) {
    const fs::path input = dir / "in.safetensors", output = dir / "out.safetensors";
    const RunInput in = write_run_input(input, bf16, rng);
    const tmoe::MoeWeights weights = loaded.load_layer(1);
    const std::vector<double> expected = tmoe::reference_forward(weights, in.tokens, in.x, in.ids, in.probs);
    // CUDA where a device is present: 2e-2 as tmoe verify uses (bf16 operands on the tensor-core
    // path, a few 1e-3 in practice).
    std::vector<std::pair<const char*, double>> backends = {{"reference", 1e-6}, {"cpu", 1e-4}};
    if (tmoe::cuda_available()) backends.emplace_back("cuda", 2e-2);
    for (const auto& [backend, bound] : backends) {
      SCOPED_TRACE(std::string(backend) + (bf16 ? " bf16 x" : " f32 x"));
      fs::remove(output);
      const CliResult r = run_cli(dir, "run " + quoted(model) + " --layer 1 --input " + quoted(input) + " --output " +
                                           quoted(output) + " --backend " + backend);
      ASSERT_EQ(r.code, 0) << describe(r);
      const tmoe::SafetensorsReader out(output);
      ASSERT_EQ(out.at("out").dtype, tmoe::TensorDType::F32);
      ASSERT_EQ(out.at("out").shape, (std::vector<int64_t>{in.tokens, kHidden}));
      const std::vector<float> values = out.read_float("out");
      EXPECT_LE(tmoe::relative_error(values, expected), bound);
    }
  }

  // verify: every layer, within the bound.
  for (const char* backend : {"cpu", "cuda"}) {
    if (std::string(backend) == "cuda" && !tmoe::cuda_available()) continue;
    const CliResult v = run_cli(dir, "verify " + quoted(model) + " --tokens 6 --backend " + backend + " --seed " +
                                         std::to_string(rng() | 1));
    ASSERT_EQ(v.code, 0) << describe(v);
    EXPECT_NE(v.out.find("layer 0"), std::string::npos) << describe(v);
    EXPECT_NE(v.out.find("layer 1"), std::string::npos) << describe(v);
  }
}

TEST_F(CliTest, QwenNamingBf16Shards) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_pipeline(dir_.path(), Naming::qwen, rng_);
}

TEST_F(CliTest, MixtralNamingF32SingleFile) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_pipeline(dir_.path(), Naming::mixtral, rng_);
}

TEST_F(CliTest, UsageErrorsExit2) {
  for (const std::string args : {"", "frobnicate", "quantize --out x", "demo --bits 5", "inspect",
                                 "verify m --tokens 0", "bench --backend tpu"}) {
    const CliResult r = run_cli(dir_.path(), args);
    EXPECT_EQ(r.code, 2) << "tmoe " << args << "\n" << describe(r);
    EXPECT_NE(r.err.find("tmoe: error:"), std::string::npos) << "tmoe " << args << "\n" << describe(r);
  }
  const CliResult help = run_cli(dir_.path(), "--help");
  EXPECT_EQ(help.code, 0) << describe(help);
  EXPECT_NE(help.out.find("quantize"), std::string::npos) << describe(help);
}

TEST_F(CliTest, BadModelExits1) {
  const fs::path missing = dir_.path() / "no_such_model";
  for (const std::string args : {"inspect " + quoted(missing), "verify " + quoted(missing),
                                 "dequantize " + quoted(missing) + " --out " + quoted(dir_.path() / "x.safetensors")}) {
    const CliResult r = run_cli(dir_.path(), args);
    EXPECT_EQ(r.code, 1) << "tmoe " << args << "\n" << describe(r);
    EXPECT_EQ(r.err.rfind("tmoe: error: ", 0), 0u) << describe(r);
  }
  // A checkpoint without expert weights.
  const fs::path empty = dir_.path() / "empty";
  fs::create_directories(empty);
  tmoe::SafetensorsWriter writer;
  std::vector<float> values(8, 1.0f);
  writer.add("model.embed_tokens.weight", tmoe::TensorDType::F32, {2, 4}, std::span<const float>(values));
  writer.write(empty / "model.safetensors");
  const CliResult q = run_cli(dir_.path(), "quantize --in " + quoted(empty) + " --out " + quoted(dir_.path() / "m"));
  EXPECT_EQ(q.code, 1) << describe(q);
  EXPECT_NE(q.err.find("tmoe: error:"), std::string::npos) << describe(q);
  // A file that is not safetensors.
  std::ofstream(dir_.path() / "junk.safetensors") << "this is not a safetensors file";
  const CliResult j = run_cli(dir_.path(), "quantize --in " + quoted(dir_.path() / "junk.safetensors") + " --out " +
                                               quoted(dir_.path() / "m"));
  EXPECT_EQ(j.code, 1) << describe(j);
}

TEST_F(CliTest, CudaWithoutDeviceExits1Early) {
  if (tmoe::cuda_available()) GTEST_SKIP() << "a CUDA device is present";
  // Fails before quantizing anything (a full-size demo would take a minute to get there).
  const CliResult r = run_cli(dir_.path(), "demo --backend cuda");
  EXPECT_EQ(r.code, 1) << describe(r);
  EXPECT_NE(r.err.find("tmoe: error: the cuda backend is not available"), std::string::npos) << describe(r);
  EXPECT_EQ(r.err.find("quantizing"), std::string::npos) << describe(r);
}

TEST_F(CliTest, MalformedRunInputExits1) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const fs::path checkpoint = dir_.path() / "hf", model = dir_.path() / "model";
  write_checkpoint(checkpoint, Naming::mixtral, rng_);
  const CliResult q = run_cli(dir_.path(), "quantize --in " + quoted(checkpoint) + " --out " + quoted(model));
  ASSERT_EQ(q.code, 0) << describe(q);

  const fs::path input = dir_.path() / "bad.safetensors", output = dir_.path() / "out.safetensors";
  auto run_bad = [&](const std::string& expected_words) {
    const CliResult r = run_cli(dir_.path(), "run " + quoted(model) + " --layer 0 --input " + quoted(input) +
                                                 " --output " + quoted(output) + " --backend reference");
    EXPECT_EQ(r.code, 1) << describe(r);
    EXPECT_NE(r.err.find(expected_words), std::string::npos) << "expected '" << expected_words << "'\n" << describe(r);
    EXPECT_FALSE(fs::exists(output));
  };
  std::vector<float> x(3 * kHidden, 0.5f), wrong_x(3 * (kHidden + 1), 0.5f), probs(6, 0.5f);
  std::vector<int32_t> ids = {0, 1, 2, 3, 1, 0}, bad_ids = {0, 1, 2, kExperts, 1, 0};
  {
    tmoe::SafetensorsWriter w;  // no expert_probs
    w.add("x", tmoe::TensorDType::F32, {3, kHidden}, std::span<const float>(x));
    w.add("expert_ids", tmoe::TensorDType::I32, {3, 2}, std::span<const int32_t>(ids));
    w.write(input);
    run_bad("expert_probs");
  }
  {
    tmoe::SafetensorsWriter w;  // x of the wrong hidden size
    w.add("x", tmoe::TensorDType::F32, {3, kHidden + 1}, std::span<const float>(wrong_x));
    w.add("expert_ids", tmoe::TensorDType::I32, {3, 2}, std::span<const int32_t>(ids));
    w.add("expert_probs", tmoe::TensorDType::F32, {3, 2}, std::span<const float>(probs));
    w.write(input);
    run_bad("hidden size");
  }
  {
    tmoe::SafetensorsWriter w;  // an expert id out of range
    w.add("x", tmoe::TensorDType::F32, {3, kHidden}, std::span<const float>(x));
    w.add("expert_ids", tmoe::TensorDType::I32, {3, 2}, std::span<const int32_t>(bad_ids));
    w.add("expert_probs", tmoe::TensorDType::F32, {3, 2}, std::span<const float>(probs));
    w.write(input);
    run_bad("outside");
  }
  {
    tmoe::SafetensorsWriter w;  // ids as F32
    w.add("x", tmoe::TensorDType::F32, {3, kHidden}, std::span<const float>(x));
    w.add("expert_ids", tmoe::TensorDType::F32, {3, 2}, std::span<const float>(probs));
    w.add("expert_probs", tmoe::TensorDType::F32, {3, 2}, std::span<const float>(probs));
    w.write(input);
    run_bad("I32");
  }
  std::ofstream(input, std::ios::trunc) << "garbage";
  run_bad("tmoe: error:");
}

TEST_F(CliTest, DemoChecksAgainstReference) {
  // A qwen3-shaped layer cut to 8 experts keeps quantization quick on a small machine.
  const CliResult r = run_cli(dir_.path(), "demo --shape qwen3-30b-a3b --experts 8 --tokens 1,3 --backend cpu "
                                           "--check-tokens 2 --seed " + std::to_string(seed_ | 1));
  ASSERT_EQ(r.code, 0) << describe(r);
  EXPECT_NE(r.out.find("first 2 tokens"), std::string::npos) << describe(r);
  EXPECT_NE(r.out.find("SQNR"), std::string::npos) << describe(r);
}

TEST_F(CliTest, BenchWritesTableAndJson) {
  const fs::path json_path = dir_.path() / "bench.json";
  const CliResult r = run_cli(dir_.path(), "bench --backend cpu --shape qwen3-30b-a3b --tokens 1,2 --min-seconds 0.01 "
                                           "--json " + quoted(json_path));
  ASSERT_EQ(r.code, 0) << describe(r);
  EXPECT_NE(r.out.find("device: cpu"), std::string::npos) << describe(r);
  EXPECT_NE(r.out.find("baseline_us"), std::string::npos) << describe(r);
  const nlohmann::json rows = nlohmann::json::parse(read_text(json_path));
  ASSERT_TRUE(rows.is_array());
  int cases = 0, devices = 0;
  for (const auto& row : rows) {
    if (row.value("kind", "") == "device") {
      ++devices;
      EXPECT_GT(row.at("bandwidth_gbps").get<double>(), 0);
      continue;
    }
    ++cases;
    for (const char* key : {"backend", "shape", "tokens", "bits", "time_us", "weight_bytes", "gbps", "bw_fraction",
                            "tflops", "gemm_fraction", "baseline_time_us", "speedup"})
      EXPECT_TRUE(row.contains(key)) << key;
    EXPECT_EQ(row.at("shape"), "qwen3-30b-a3b");
    EXPECT_GT(row.at("time_us").get<double>(), 0);
  }
  EXPECT_EQ(devices, 1);
  EXPECT_GE(cases, 2);
}

}  // namespace

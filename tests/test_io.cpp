// Tests of safetensors I/O, the quantized model directory and Hugging Face checkpoint discovery.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <tuple>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <atomic>
#include <vector>

#include "tmoe/error.hpp"
#include "tmoe/half.hpp"
#include "tmoe/io.hpp"
#include "tmoe/moe.hpp"
#include "test_support.hpp"

namespace tmoe {
namespace {

namespace fs = std::filesystem;
using tmoe::testing::expect_tensor_equal;
using json = nlohmann::json;

// Gives each test a fresh directory and a random seed (printed on failure).
class IoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = std::random_device{}();
    rng_.seed(seed_);
    dir_ = fs::temp_directory_path() /
           fmt::format("tmoe-io-{}-{}", ::testing::UnitTest::GetInstance()->current_test_info()->name(), seed_);
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<uint8_t> random_bytes(size_t n) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = static_cast<uint8_t>(byte(rng_));
    return v;
  }
  std::vector<fs::path> files_in_dir() const {
    std::vector<fs::path> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename());
    std::sort(out.begin(), out.end());
    return out;
  }

  uint32_t seed_ = 0;
  std::mt19937_64 rng_;
  fs::path dir_;
};

#define TRACE_SEED() SCOPED_TRACE(::testing::Message() << "seed " << seed_)

void write_raw(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// A safetensors file from a header text and a data section; `header_length` overrides the prefix.
std::vector<uint8_t> raw_file(const std::string& header, size_t data_bytes,
                              std::optional<uint64_t> header_length = {}) {
  std::vector<uint8_t> file(8 + header.size() + data_bytes, 0x7f);
  const uint64_t n = header_length.value_or(header.size());
  std::memcpy(file.data(), &n, 8);
  std::memcpy(file.data() + 8, header.data(), header.size());
  return file;
}

std::vector<uint8_t> read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// ------------------------------------------------------------------------------ safetensors basics

TEST_F(IoTest, RoundTripEveryDtypeWithMetadataAndEmptyTensors) {
  TRACE_SEED();
  const TensorDType dtypes[] = {TensorDType::F64, TensorDType::F32, TensorDType::F16, TensorDType::BF16,
                                TensorDType::I64, TensorDType::I32, TensorDType::I16, TensorDType::I8,
                                TensorDType::U8,  TensorDType::BOOL, TensorDType::U64, TensorDType::U32,
                                TensorDType::U16, TensorDType::F8_E4M3, TensorDType::F8_E5M2};
  std::uniform_int_distribution<int64_t> dim(1, 7);
  struct Expected {
    std::string name;
    TensorDType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Expected> expected;
  for (TensorDType dt : dtypes) {
    std::vector<int64_t> shape{dim(rng_), dim(rng_), dim(rng_)};
    int64_t n = shape[0] * shape[1] * shape[2];
    expected.push_back({fmt::format("t.{}", tensor_dtype_name(dt)), dt, shape,
                        random_bytes(static_cast<size_t>(n * tensor_dtype_size(dt)))});
  }
  expected.push_back({"empty", TensorDType::F32, {3, 0, 2}, {}});
  expected.push_back({"scalar", TensorDType::I32, {}, random_bytes(4)});  // shape [] = one element
  expected.push_back({"odd", TensorDType::U8, {3}, random_bytes(3)});      // leaves data unaligned
  expected.push_back({"after_odd", TensorDType::F64, {2}, random_bytes(16)});

  SafetensorsWriter writer;
  for (const auto& e : expected) writer.add(e.name, e.dtype, e.shape, std::span<const uint8_t>(e.bytes));
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "quoted \" and unicode \u00e9");
  const fs::path path = dir_ / "a.safetensors";
  writer.write(path);

  const std::vector<uint8_t> raw = read_all(path);
  uint64_t header_length;
  std::memcpy(&header_length, raw.data(), 8);
  EXPECT_EQ(header_length % 8, 0u) << "the data section must start 8-byte aligned";

  SafetensorsReader reader(path);
  EXPECT_EQ(reader.tensors().size(), expected.size());
  EXPECT_EQ(reader.metadata().at("format"), "pt");
  EXPECT_EQ(reader.metadata().at("note"), "quoted \" and unicode \u00e9");
  for (const auto& e : expected) {
    SCOPED_TRACE(e.name);
    const TensorInfo& t = reader.at(e.name);
    EXPECT_EQ(t.dtype, e.dtype);
    EXPECT_EQ(t.shape, e.shape);
    const auto bytes = reader.bytes(t);
    EXPECT_EQ(std::vector<uint8_t>(bytes.begin(), bytes.end()), e.bytes);
  }
  EXPECT_EQ(reader.find("absent"), nullptr);
  EXPECT_THROW(reader.at("absent"), Error);
  EXPECT_EQ(reader.at("empty").elements(), 0);
  EXPECT_EQ(reader.at("scalar").elements(), 1);
}

// A file written by the reference implementation (Python safetensors 0.8.0, numpy): guards against
// a reader and writer that agree with each other but not with the format.
TEST_F(IoTest, ReadsFileWrittenByReferenceImplementation) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("ids":{"dtype":"I32","shape":[2],"data_offsets":[16,24]},"half":{"dtype":"F16","shape":[3],)"
      R"("data_offsets":[24,30]}})";
  ASSERT_EQ(header.size(), 0xd0u);
  const std::vector<uint8_t> data = {0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x00,
                                     0x80, 0x3e, 0x00, 0x00, 0x80, 0x44, 0x07, 0x00, 0x00, 0x00,
                                     0xff, 0xff, 0xff, 0xff, 0x00, 0x3c, 0x00, 0xb8, 0xff, 0x7b};
  std::vector<uint8_t> file = raw_file(header, 0);
  file.insert(file.end(), data.begin(), data.end());
  write_raw(dir_ / "golden.safetensors", file);

  SafetensorsReader r(dir_ / "golden.safetensors");
  EXPECT_EQ(r.metadata().at("format"), "pt");
  EXPECT_EQ(r.at("weight").shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(r.read_float("weight"), (std::vector<float>{1.5f, -2.0f, 0.25f, 1024.0f}));
  EXPECT_EQ(r.read_float("half"), (std::vector<float>{1.0f, -0.5f, 65504.0f}));
  const auto ids = r.bytes(r.at("ids"));
  int32_t id[2];
  std::memcpy(id, ids.data(), 8);
  EXPECT_EQ(id[0], 7);
  EXPECT_EQ(id[1], -1);
}

TEST_F(IoTest, ZeroTensorsAndNoMetadata) {
  const fs::path path = dir_ / "none.safetensors";
  SafetensorsWriter().write(path);
  SafetensorsReader reader(path);
  EXPECT_TRUE(reader.tensors().empty());
  EXPECT_TRUE(reader.metadata().empty());

  SafetensorsWriter only_metadata;
  only_metadata.set_metadata("k", "v");
  only_metadata.write(path);
  SafetensorsReader again(path);
  EXPECT_TRUE(again.tensors().empty());
  EXPECT_EQ(again.metadata().at("k"), "v");
}

TEST_F(IoTest, ReadFloatConvertsEveryFloatDtype) {
  TRACE_SEED();
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const size_t n = 37;
  std::vector<float> f32(n);
  for (auto& v : f32) v = normal(rng_);
  std::vector<double> f64(f32.begin(), f32.end());
  std::vector<uint16_t> f16(n), bf16(n);
  for (size_t i = 0; i < n; ++i) f16[i] = float_to_half(f32[i]), bf16[i] = float_to_bf16(f32[i]);
  std::vector<int32_t> ints(n, 1);

  SafetensorsWriter w;
  w.add("f32", TensorDType::F32, {static_cast<int64_t>(n)}, std::span<const float>(f32));
  w.add("f64", TensorDType::F64, {static_cast<int64_t>(n)}, std::span<const double>(f64));
  w.add("f16", TensorDType::F16, {static_cast<int64_t>(n)}, std::span<const uint16_t>(f16));
  w.add("bf16", TensorDType::BF16, {static_cast<int64_t>(n)}, std::span<const uint16_t>(bf16));
  w.add("i32", TensorDType::I32, {static_cast<int64_t>(n)}, std::span<const int32_t>(ints));
  const fs::path path = dir_ / "f.safetensors";
  w.write(path);

  SafetensorsReader r(path);
  const auto a = r.read_float("f32"), b = r.read_float("f64"), c = r.read_float("f16"), d = r.read_float("bf16");
  for (size_t i = 0; i < n; ++i) {
    // All conversions are exact or a single rounding whose result we compute the same way.
    EXPECT_EQ(float_bits(a[i]), float_bits(f32[i])) << i;
    EXPECT_EQ(float_bits(b[i]), float_bits(f32[i])) << i;
    EXPECT_EQ(float_bits(c[i]), float_bits(half_to_float(f16[i]))) << i;
    EXPECT_EQ(float_bits(d[i]), float_bits(bf16_to_float(bf16[i]))) << i;
  }
  try {
    r.read_float("i32");
    ADD_FAILURE() << "read_float of I32 must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a floating-point"), std::string::npos) << e.what();
  }
}

TEST_F(IoTest, WriterRejectsBadTensors) {
  SafetensorsWriter w;
  const std::vector<uint8_t> eight(8);
  EXPECT_THROW(w.add("x", TensorDType::F32, {3}, std::span<const uint8_t>(eight)), Error);  // 12 bytes needed
  EXPECT_THROW(w.add("x", TensorDType::F32, {-2}, std::span<const uint8_t>(eight)), Error);
  EXPECT_THROW(w.add("__metadata__", TensorDType::U8, {8}, std::span<const uint8_t>(eight)), Error);
  w.add("x", TensorDType::F32, {2}, std::span<const uint8_t>(eight));
  EXPECT_THROW(w.add("x", TensorDType::U8, {8}, std::span<const uint8_t>(eight)), Error);  // duplicate
}

// add() copies (later changes to the source do not show, and a copied writer stays valid);
// add_borrowed() writes the caller's bytes as they are at write().
TEST_F(IoTest, WriterCopiesOrBorrows) {
  TRACE_SEED();
  std::vector<uint8_t> copied = random_bytes(16), borrowed = random_bytes(16);
  const std::vector<uint8_t> copied_original = copied;
  std::optional<SafetensorsWriter> first(std::in_place);
  first->add("copied", TensorDType::U8, {16}, std::span<const uint8_t>(copied));
  first->add_borrowed("borrowed", TensorDType::U8, {4, 4}, borrowed);
  EXPECT_THROW(first->add_borrowed("copied", TensorDType::U8, {16}, borrowed), Error);
  copied.assign(16, 0);
  borrowed[3] ^= 0xff;
  const SafetensorsWriter second = *first;
  first.reset();
  second.write(dir_ / "w.safetensors");
  SafetensorsReader r(dir_ / "w.safetensors");
  auto bytes = [&](const char* name) {
    const auto span = r.bytes(r.at(name));
    return std::vector<uint8_t>(span.begin(), span.end());
  };
  EXPECT_EQ(bytes("copied"), copied_original);
  EXPECT_EQ(bytes("borrowed"), borrowed);
}

TEST_F(IoTest, AtomicWriteReplacesAndLeavesNoTempFile) {
  const fs::path path = dir_ / "m.safetensors";
  const std::vector<uint8_t> one(4, 1), two(12, 2);
  SafetensorsWriter first;
  first.add("a", TensorDType::U8, {4}, std::span<const uint8_t>(one));
  first.write(path);
  SafetensorsWriter second;
  second.add("b", TensorDType::U8, {12}, std::span<const uint8_t>(two));
  second.write(path);
  EXPECT_EQ(files_in_dir(), std::vector<fs::path>{"m.safetensors"});
  SafetensorsReader r(path);
  EXPECT_EQ(r.find("a"), nullptr);
  ASSERT_NE(r.find("b"), nullptr);
  EXPECT_EQ(r.bytes(r.at("b"))[11], 2);

  // A write that fails (rename onto a non-empty directory) throws and removes its temporary file.
  fs::create_directories(dir_ / "occupied" / "x");
  EXPECT_THROW(second.write(dir_ / "occupied"), Error);
  EXPECT_EQ(files_in_dir(), (std::vector<fs::path>{"m.safetensors", "occupied"}));
  // So does one into a directory that does not exist.
  EXPECT_THROW(second.write(dir_ / "no-such-dir" / "f.safetensors"), Error);
}

// ----------------------------------------------------------------------------- malformed files

struct MalformedCase {
  const char* name;
  std::vector<uint8_t> bytes;
  const char* message;  // a fragment the error must contain
};

std::vector<MalformedCase> malformed_cases() {
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  return {
      {"empty file", {}, "too short"},
      {"truncated length", {1, 0, 0}, "too short"},
      {"huge header length", raw_file("{}", 0, uint64_t{1} << 63), "absurd"},
      {"header past end", raw_file("{}", 0, 1000), "exceeds"},
      {"truncated header", [] {
         auto f = raw_file("{" + std::string(R"("t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})") + "}", 1);
         f.resize(20);
         return f;
       }(), "exceeds"},
      {"bad json", raw_file(R"({"t": {"dtype": )", 0), "not valid JSON"},
      {"non-object json", raw_file("[1, 2]", 0), "not a JSON object"},
      {"entry not object", raw_file(R"({"t": 5})", 0), "is not an object"},
      {"missing dtype", raw_file(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8), "has no 'dtype'"},
      {"missing shape", raw_file(R"({"t":{"dtype":"F32","data_offsets":[0,8]}})", 8), "has no 'shape'"},
      {"missing offsets", raw_file(R"({"t":{"dtype":"F32","shape":[2]}})", 8), "has no 'data_offsets'"},
      {"dtype not string", raw_file(R"({"t":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
       "dtype is not a string"},
      {"bad dtype", raw_file(R"({"t":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype"},
      {"shape not array", raw_file(R"({"t":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", 8),
       "shape is not an array"},
      {"fractional dim", raw_file(R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8),
       "non-integer"},
      {"negative dim", raw_file(R"({"t":{"dtype":"F32","shape":[-2, -1],"data_offsets":[0,8]}})", 8),
       "negative dimension"},
      {"huge dim", raw_file(R"({"t":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,8]}})", 8),
       "too large"},
      {"overflowing shape",
       raw_file(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8),
       "overflows"},
      {"shape size mismatch", raw_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "needs 12 bytes"},
      {"reversed offsets", raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "reversed"},
      {"range past end", raw_file(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
       "past the end"},
      {"negative offset", raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8),
       "negative data offset"},
      {"three offsets", raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", 8),
       "not an array of two"},
      {"overlapping ranges",
       raw_file("{" + ok_entry + R"(,"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlap"},
      {"metadata not object", raw_file(R"({"__metadata__":[1]})", 0), "__metadata__ is not an object"},
      {"metadata value not string", raw_file(R"({"__metadata__":{"a":1}})", 0), "is not a string"},
      {"duplicate name", raw_file("{" + ok_entry + "," + ok_entry + "}", 8), "twice"},
      {"deep nesting", raw_file(std::string(5000, '[') + std::string(5000, ']'), 0), "nested deeper"},
  };
}

TEST_F(IoTest, MalformedFilesGiveCleanErrors) {
  for (const auto& c : malformed_cases()) {
    SCOPED_TRACE(c.name);
    const fs::path path = dir_ / "bad.safetensors";
    write_raw(path, c.bytes);
    try {
      SafetensorsReader reader(path);
      ADD_FAILURE() << "no error for " << c.name;
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_EQ(e.kind(), ErrorKind::bad_input);
      EXPECT_NE(what.find(path.string()), std::string::npos) << "message does not name the file: " << what;
      EXPECT_NE(what.find(c.message), std::string::npos) << "expected '" << c.message << "' in: " << what;
    }
  }
  EXPECT_THROW(SafetensorsReader(dir_ / "missing.safetensors"), Error);
  EXPECT_THROW(SafetensorsReader{dir_}, Error);  // a directory
}

// Random corruption of a valid file: each variant either opens (and then every range lies inside
// the file) or throws tmoe::Error; it never crashes (run under ASan/valgrind to see reads).
TEST_F(IoTest, CorruptedFilesNeverCrash) {
  TRACE_SEED();
  SafetensorsWriter w;
  const auto a = random_bytes(24), b = random_bytes(6);
  w.add("alpha", TensorDType::F32, {2, 3}, std::span<const uint8_t>(a));
  w.add("beta", TensorDType::F16, {3}, std::span<const uint8_t>(b));
  w.set_metadata("m", "v");
  const fs::path good = dir_ / "good.safetensors";
  w.write(good);
  const std::vector<uint8_t> original = read_all(good);
  std::uniform_int_distribution<size_t> position(0, original.size() - 1);
  int opened = 0, rejected = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<uint8_t> bytes = original;
    if (trial % 4 == 0) {
      bytes.resize(position(rng_));
    } else if (trial % 4 == 1) {
      // JSON-shaped damage inside the header: digits, signs and brackets keep it parseable often,
      // so the semantic checks (offsets, shapes, overlaps) are exercised, not only the parser.
      const char alphabet[] = "0123456789-[]{},:\"e.9";
      uint64_t header_length;
      std::memcpy(&header_length, bytes.data(), 8);
      std::uniform_int_distribution<size_t> in_header(8, 8 + header_length - 1);
      std::uniform_int_distribution<size_t> letter(0, sizeof alphabet - 2);
      for (int edits = 0; edits < 1 + trial % 3; ++edits) bytes[in_header(rng_)] = alphabet[letter(rng_)];
    } else {
      for (int flips = 0; flips <= trial % 3; ++flips) bytes[position(rng_)] = random_bytes(1)[0];
    }
    const fs::path path = dir_ / "corrupt.safetensors";
    write_raw(path, bytes);
    try {
      SafetensorsReader r(path);
      for (const auto& t : r.tensors()) {
        EXPECT_NO_THROW(r.bytes(t));
        ASSERT_LE(t.end, bytes.size());
      }
      ++opened;
    } catch (const Error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 0);
  EXPECT_GT(opened, 0);
  EXPECT_EQ(opened + rejected, 2000);
}

// ------------------------------------------------------------------------------ quantized models

void expect_weights_equal(const MoeWeights& a, const MoeWeights& b) {
  {
    SCOPED_TRACE("gate");
    expect_tensor_equal(a.gate, b.gate);
  }
  {
    SCOPED_TRACE("up");
    expect_tensor_equal(a.up, b.up);
  }
  {
    SCOPED_TRACE("down");
    expect_tensor_equal(a.down, b.down);
  }
}

// H and I not multiples of 16 (partial tiles) and not of the group size (partial groups).
MoeShape odd_shape() { return MoeShape{"custom", 40, 24, 3, 2}; }

SyntheticLayerOptions mixed_options(uint64_t seed) {
  SyntheticLayerOptions o;
  o.gate_bits = 2;
  o.up_bits = 3;
  o.down_bits = 4;
  o.group_size = 32;
  o.hadamard = 8;
  o.custom_grid = true;
  o.seed = seed;
  return o;
}

template <typename F>
void expect_error_containing(F&& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos)
        << "expected '" << fragment << "' in: " << e.what();
  }
}

TEST_F(IoTest, QuantizedModelRoundTripAndSecondLayer) {
  TRACE_SEED();
  const MoeWeights five = random_moe_weights(odd_shape(), mixed_options(seed_));
  const fs::path model = dir_ / "model";
  save_quantized_layer(model, 5, five);
  {
    QuantizedModel m(model);
    EXPECT_EQ(m.layers(), std::vector<int>{5});
    expect_weights_equal(m.load_layer(5), five);
    EXPECT_EQ(m.layer_shape(5).hidden, 40);
    EXPECT_EQ(m.layer_shape(5).intermediate, 24);
    EXPECT_EQ(m.layer_shape(5).experts, 3);
  }

  SyntheticLayerOptions plain;
  plain.seed = seed_ + 1;
  plain.group_size = 16;
  const MoeWeights two = random_moe_weights(MoeShape{"custom", 17, 33, 2, 1}, plain);
  save_quantized_layer(model, 2, two);
  QuantizedModel m(model);
  EXPECT_EQ(m.layers(), (std::vector<int>{2, 5}));
  expect_weights_equal(m.load_layer(2), two);
  expect_weights_equal(m.load_layer(5), five);
  expect_error_containing([&] { m.load_layer(7); }, "no layer 7");
  EXPECT_EQ(files_in_dir(), std::vector<fs::path>{"model"});

  const auto summary = m.summary();
  ASSERT_EQ(summary.size(), 6u);
  EXPECT_EQ(summary[0].name, "model.layers.2.mlp.experts.gate_proj");
  EXPECT_EQ(summary[3].name, "model.layers.5.mlp.experts.gate_proj");
  EXPECT_EQ(summary[5].name, "model.layers.5.mlp.experts.down_proj");
  const TrellisTensor& down = five.down;
  EXPECT_EQ(summary[5].bits, 4);
  EXPECT_EQ(summary[5].K, 24);
  EXPECT_EQ(summary[5].N, 40);
  EXPECT_EQ(summary[5].hadamard, 8);
  EXPECT_EQ(summary[5].bytes, static_cast<int64_t>(down.indices.size() + 2 * (down.scales.size() + down.su.size() +
                                                   down.sv.size()) + 4 * down.grid.size()));
  // Only shards and the index, no temporary files.
  std::vector<fs::path> names;
  for (const auto& e : fs::directory_iterator(model)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<fs::path>{"layer-2.safetensors", "layer-5.safetensors", "trellis.json"}));
}

// Layers saved at once (as parallel quantize jobs would) all end up in trellis.json: its
// read-modify-write is serialized by a lock on the directory (flock locks per open file, so
// threads exercise it as processes would).
TEST_F(IoTest, LayersSavedConcurrentlyAreAllIndexed) {
  TRACE_SEED();
  constexpr int kLayers = 8;
  std::vector<MoeWeights> layers;
  for (int l = 0; l < kLayers; ++l) {
    SyntheticLayerOptions o;
    o.group_size = 16;
    o.seed = seed_ + l;
    layers.push_back(random_moe_weights(MoeShape{"custom", 32, 16, 2, 1}, o));
  }
  const fs::path model = dir_ / "model";
  fs::create_directories(model);
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int l = 0; l < kLayers; ++l)
    threads.emplace_back([&, l] {
      try {
        save_quantized_layer(model, l, layers[l]);
      } catch (const Error&) {
        ++errors;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  QuantizedModel m(model);
  ASSERT_EQ(m.layers().size(), static_cast<size_t>(kLayers));
  for (int l = 0; l < kLayers; ++l) expect_weights_equal(m.load_layer(l), layers[l]);
}

// Rewrites a shard through `edit`, which gets each tensor and may add it (changed) or drop it.
void rewrite_shard(const fs::path& path,
                   const std::function<void(SafetensorsWriter&, const SafetensorsReader&, const TensorInfo&)>& edit) {
  SafetensorsWriter w;
  {
    SafetensorsReader r(path);
    for (const auto& t : r.tensors()) edit(w, r, t);
  }
  w.write(path);
}

TEST_F(IoTest, QuantizedModelAcceptsF32ScalesAndSigns) {
  TRACE_SEED();
  const MoeWeights weights = random_moe_weights(odd_shape(), mixed_options(seed_));
  const fs::path model = dir_ / "model";
  save_quantized_layer(model, 0, weights);
  rewrite_shard(model / "layer-0.safetensors", [](SafetensorsWriter& w, const SafetensorsReader& r,
                                                  const TensorInfo& t) {
    if (t.dtype == TensorDType::F16) {
      const auto values = r.read_float(t.name);  // fp16 -> fp32 -> fp16 is exact
      w.add(t.name, TensorDType::F32, t.shape, std::span<const float>(values));
    } else {
      w.add(t.name, t.dtype, t.shape, r.bytes(t));
    }
  });
  QuantizedModel m(model);
  expect_weights_equal(m.load_layer(0), weights);
}

TEST_F(IoTest, QuantizedModelErrors) {
  TRACE_SEED();
  const MoeWeights weights = random_moe_weights(odd_shape(), mixed_options(seed_));
  const fs::path model = dir_ / "model";
  expect_error_containing([&] { QuantizedModel m(dir_ / "nowhere"); }, "no such model directory");
  expect_error_containing([&] { QuantizedModel m(dir_); }, "trellis.json: missing");
  save_quantized_layer(model, 1, weights);
  const fs::path index_path = model / "trellis.json";
  const fs::path shard = model / "layer-1.safetensors";
  const std::vector<uint8_t> good_index = read_all(index_path), good_shard = read_all(shard);
  auto edit_index = [&](const std::function<void(json&)>& edit) {
    json j = json::parse(good_index);
    edit(j);
    const std::string text = j.dump();
    write_raw(index_path, std::vector<uint8_t>(text.begin(), text.end()));
  };

  // Missing tensor in the shard.
  rewrite_shard(shard, [](SafetensorsWriter& w, const SafetensorsReader& r, const TensorInfo& t) {
    if (t.name != "model.layers.1.mlp.experts.up_proj.sv") w.add(t.name, t.dtype, t.shape, r.bytes(t));
  });
  expect_error_containing([&] { QuantizedModel m(model); }, "'model.layers.1.mlp.experts.up_proj.sv' is missing");
  write_raw(shard, good_shard);

  // trellis.json disagreeing with the shard.
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.gate_proj"]["group_size"] = 16; });
  expect_error_containing([&] { QuantizedModel m(model); }, "has shape");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.down_proj"]["bits"] = 3; });
  expect_error_containing([&] { QuantizedModel m(model); }, "has shape");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.down_proj"]["bits"] = 5; });
  expect_error_containing([&] { QuantizedModel m(model); }, "\"bits\" = 5 is out of range");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.up_proj"]["hadamard"] = 3; });
  expect_error_containing([&] { QuantizedModel m(model); }, "not a power of two");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.up_proj"]["K"] = "40"; });
  expect_error_containing([&] { QuantizedModel m(model); }, "\"K\" missing or not an integer");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.sideways_proj"] = j["tensors"]["model.layers.1.mlp.experts.up_proj"]; });
  expect_error_containing([&] { QuantizedModel m(model); }, "not a stacked expert projection name");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.up_proj"]["group_size"] = 24; });
  expect_error_containing([&] { QuantizedModel m(model); }, "not a multiple of 16");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.up_proj"]["file"] = "../layer-1.safetensors"; });
  expect_error_containing([&] { QuantizedModel m(model); }, "not a file name");
  edit_index([](json& j) { j["tensors"]["model.layers.1.mlp.experts.up_proj"]["file"] = "layer-9.safetensors"; });
  expect_error_containing([&] { QuantizedModel m(model); }, "'layer-9.safetensors' of 'model.layers.1.mlp.experts.up_proj' is missing");
  edit_index([](json& j) { j["tensors"].erase("model.layers.1.mlp.experts.down_proj"); });
  expect_error_containing([&] { QuantizedModel m(model); }, "layer 1 has no down projection");
  edit_index([](json& j) { j["format"] = "gguf"; });
  expect_error_containing([&] { QuantizedModel m(model); }, "\"format\"");
  write_raw(index_path, {'{', '"'});
  expect_error_containing([&] { QuantizedModel m(model); }, "not valid JSON");
  // A malformed index is never overwritten by a save.
  expect_error_containing([&] { save_quantized_layer(model, 2, weights); }, "not valid JSON");
  write_raw(index_path, good_index);

  // Layer shapes that do not form one MoE layer are refused on save.
  MoeWeights broken = weights;
  broken.down = weights.gate;
  EXPECT_THROW(save_quantized_layer(model, 3, broken), Error);
  QuantizedModel m(model);
  expect_weights_equal(m.load_layer(1), weights);
}

// ------------------------------------------------------------------------------ HF checkpoints

// Synthetic HF expert weights: W[l][p][e] is [out, in]; values are multiples of 1/8 below 16 in
// magnitude, exact in F16, BF16 and F32, so the loaded fp32 values can be compared exactly.
struct SyntheticCheckpoint {
  int64_t hidden, intermediate;
  int experts;
  std::map<std::tuple<int, int, int>, std::vector<float>> weights;  // (layer, proj, expert) -> [out, in]

  std::pair<int64_t, int64_t> out_in(int proj) const {
    return proj == 2 ? std::pair{hidden, intermediate} : std::pair{intermediate, hidden};
  }
};

SyntheticCheckpoint make_checkpoint(std::mt19937_64& rng, const std::vector<int>& layers) {
  SyntheticCheckpoint c{20, 12, 3, {}};
  std::uniform_int_distribution<int> value(-127, 127);
  for (int l : layers)
    for (int p = 0; p < 3; ++p)
      for (int e = 0; e < c.experts; ++e) {
        auto [out, in] = c.out_in(p);
        std::vector<float> w(static_cast<size_t>(out * in));
        for (auto& v : w) v = static_cast<float>(value(rng)) / 8.0f;
        c.weights[{l, p, e}] = std::move(w);
      }
  return c;
}

void add_hf_tensor(SafetensorsWriter& w, const std::string& name, const std::vector<float>& values,
                   std::vector<int64_t> shape, TensorDType dtype) {
  if (dtype == TensorDType::F32) {
    w.add(name, dtype, std::move(shape), std::span<const float>(values));
    return;
  }
  std::vector<uint16_t> bits(values.size());
  for (size_t i = 0; i < values.size(); ++i)
    bits[i] = dtype == TensorDType::F16 ? float_to_half(values[i]) : float_to_bf16(values[i]);
  w.add(name, dtype, std::move(shape), std::span<const uint16_t>(bits));
}

void expect_loaded_transposed(const HfCheckpoint& ckpt, const SyntheticCheckpoint& c, int layer) {
  const char* projections[] = {"gate", "up", "down"};
  for (int p = 0; p < 3; ++p) {
    SCOPED_TRACE(fmt::format("layer {} {}", layer, projections[p]));
    auto [out, in] = c.out_in(p);
    const auto shape = ckpt.projection_shape(layer, projections[p]);
    EXPECT_EQ(shape.experts, c.experts);
    EXPECT_EQ(shape.K, in);
    EXPECT_EQ(shape.N, out);
    std::vector<float> stacked = ckpt.load_stacked(layer, projections[p]);
    ASSERT_EQ(stacked.size(), static_cast<size_t>(c.experts * in * out));
    int mismatches = 0;
    for (int e = 0; e < c.experts; ++e) {
      const auto& w = c.weights.at({layer, p, e});
      for (int64_t k = 0; k < in; ++k)
        for (int64_t n = 0; n < out; ++n)
          mismatches += stacked[(e * in + k) * out + n] != w[n * in + k];
    }
    EXPECT_EQ(mismatches, 0);
    // Any range of experts loads the same values as the stacked whole (the quantizer streams them).
    for (int64_t first = 0; first < c.experts; ++first)
      for (int64_t count : {int64_t{1}, c.experts - first}) {
        std::vector<float> part(static_cast<size_t>(count * in * out), std::nanf(""));
        ckpt.load_experts(layer, projections[p], first, count, part);
        EXPECT_TRUE(std::equal(part.begin(), part.end(), stacked.begin() + first * in * out))
            << "experts " << first << " + " << count;
      }
    std::vector<float> one(static_cast<size_t>(in * out));
    expect_error_containing([&] { ckpt.load_experts(layer, projections[p], c.experts, 1, one); }, "load_experts");
    expect_error_containing([&] { ckpt.load_experts(layer, projections[p], 0, 2, one); }, "the output holds");
  }
}

TEST_F(IoTest, HfDiscoveryQwenStyleShardedWithIndex) {
  TRACE_SEED();
  const SyntheticCheckpoint c = make_checkpoint(rng_, {0, 3});
  const char* hf_names[] = {"gate_proj", "up_proj", "down_proj"};
  const TensorDType dtypes[] = {TensorDType::BF16, TensorDType::F16, TensorDType::F32};
  // Layer 0 in shard 1, layer 3 in shard 2, plus non-expert tensors and an unrelated file.
  json weight_map;
  for (int shard = 0; shard < 2; ++shard) {
    const int layer = shard == 0 ? 0 : 3;
    const std::string file = fmt::format("model-0000{}-of-00002.safetensors", shard + 1);
    SafetensorsWriter w;
    for (int p = 0; p < 3; ++p)
      for (int e = 0; e < c.experts; ++e) {
        const std::string name = fmt::format("model.layers.{}.mlp.experts.{}.{}.weight", layer, e, hf_names[p]);
        auto [out, in] = c.out_in(p);
        add_hf_tensor(w, name, c.weights.at({layer, p, e}), {out, in}, dtypes[(p + shard) % 3]);
        weight_map[name] = file;
      }
    const std::vector<float> router(static_cast<size_t>(c.experts * c.hidden), 0.5f);
    const std::string router_name = fmt::format("model.layers.{}.mlp.gate.weight", layer);
    add_hf_tensor(w, router_name, router, {c.experts, c.hidden}, TensorDType::F32);
    weight_map[router_name] = file;
    w.write(dir_ / file);
  }
  SafetensorsWriter stray;
  stray.add("model.layers.9.mlp.experts.0.gate_proj.weight", TensorDType::U8, {1}, std::span<const uint8_t>(std::vector<uint8_t>{1}));
  stray.write(dir_ / "stray.safetensors");  // not in the index: ignored
  const std::string index = json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump();
  write_raw(dir_ / "model.safetensors.index.json", std::vector<uint8_t>(index.begin(), index.end()));

  const std::string config = R"({"model_type": "qwen3_moe", "num_experts_per_tok": 2})";
  write_raw(dir_ / "config.json", std::vector<uint8_t>(config.begin(), config.end()));
  HfCheckpoint ckpt(dir_);
  EXPECT_EQ(ckpt.layer_shape(0).top_k, 2);
  EXPECT_EQ(ckpt.files().size(), 2u);
  EXPECT_EQ(ckpt.layers(), (std::vector<int>{0, 3}));
  EXPECT_EQ(ckpt.layer_shape(3).hidden, c.hidden);
  EXPECT_EQ(ckpt.layer_shape(3).intermediate, c.intermediate);
  EXPECT_EQ(ckpt.layer_shape(3).experts, c.experts);
  expect_loaded_transposed(ckpt, c, 0);
  expect_loaded_transposed(ckpt, c, 3);
  expect_error_containing([&] { ckpt.load_stacked(1, "gate"); }, "no MoE experts in layer 1");
  expect_error_containing([&] { ckpt.projection_shape(0, "w1"); }, "unknown projection");

  // An index naming a shard that is not there.
  weight_map["extra"] = "model-00003-of-00002.safetensors";
  const std::string broken = json{{"weight_map", weight_map}}.dump();
  write_raw(dir_ / "model.safetensors.index.json", std::vector<uint8_t>(broken.begin(), broken.end()));
  expect_error_containing([&] { HfCheckpoint h(dir_); }, "missing");
}

// Mixtral names in one file given directly: w1 = gate, w3 = up, w2 = down (checked by value).
TEST_F(IoTest, HfDiscoveryMixtralStyleSingleFile) {
  TRACE_SEED();
  const SyntheticCheckpoint c = make_checkpoint(rng_, {1});
  const char* hf_names[] = {"w1", "w3", "w2"};
  SafetensorsWriter w;
  for (int p = 0; p < 3; ++p)
    for (int e = 0; e < c.experts; ++e) {
      auto [out, in] = c.out_in(p);
      add_hf_tensor(w, fmt::format("model.layers.1.block_sparse_moe.experts.{}.{}.weight", e, hf_names[p]),
                    c.weights.at({1, p, e}), {out, in}, TensorDType::BF16);
    }
  w.write(dir_ / "model.safetensors");
  HfCheckpoint from_file(dir_ / "model.safetensors");
  EXPECT_EQ(from_file.layers(), std::vector<int>{1});
  EXPECT_EQ(from_file.layer_shape(1).top_k, 0);  // no config.json
  expect_loaded_transposed(from_file, c, 1);
  HfCheckpoint from_dir(dir_);  // no index: every .safetensors file of the directory
  expect_loaded_transposed(from_dir, c, 1);
  const std::string config = R"({"num_experts_per_tok": "two"})";
  write_raw(dir_ / "config.json", std::vector<uint8_t>(config.begin(), config.end()));
  expect_error_containing([&] { HfCheckpoint h(dir_); }, "num_experts_per_tok is \"two\"");
}

TEST_F(IoTest, HfDiscoveryErrors) {
  TRACE_SEED();
  const SyntheticCheckpoint c = make_checkpoint(rng_, {0});
  auto write_checkpoint = [&](const std::function<bool(int p, int e)>& keep, TensorDType dtype,
                              int64_t odd_expert_extra = 0) {
    fs::remove_all(dir_ / "ckpt");
    fs::create_directories(dir_ / "ckpt");
    SafetensorsWriter w;
    const char* names[] = {"gate_proj", "up_proj", "down_proj"};
    for (int p = 0; p < 3; ++p)
      for (int e = 0; e < c.experts; ++e) {
        if (!keep(p, e)) continue;
        auto [out, in] = c.out_in(p);
        std::vector<float> values = c.weights.at({0, p, e});
        if (e == 2 && p == 0 && odd_expert_extra) {
          values.resize(values.size() + static_cast<size_t>(in * odd_expert_extra));
          out += odd_expert_extra;
        }
        if (dtype == TensorDType::I32) {
          std::vector<int32_t> ints(values.size());
          w.add(fmt::format("model.layers.0.mlp.experts.{}.{}.weight", e, names[p]), dtype, {out, in},
                std::span<const int32_t>(ints));
        } else {
          add_hf_tensor(w, fmt::format("model.layers.0.mlp.experts.{}.{}.weight", e, names[p]), values,
                        {out, in}, dtype);
        }
      }
    w.write(dir_ / "ckpt" / "model.safetensors");
  };
  write_checkpoint([](int p, int e) { return !(p == 1 && e == 1); }, TensorDType::F32);
  expect_error_containing([&] { HfCheckpoint h(dir_ / "ckpt"); }, "up projection of expert 1 is missing");
  write_checkpoint([](int p, int e) { return !(p == 2 && e == 2); }, TensorDType::F32);
  expect_error_containing([&] { HfCheckpoint h(dir_ / "ckpt"); }, "down has 2 experts but gate has 3");
  write_checkpoint([](int p, int) { return p != 2; }, TensorDType::F32);
  expect_error_containing([&] { HfCheckpoint h(dir_ / "ckpt"); }, "no down projection experts");
  write_checkpoint([](int, int) { return true; }, TensorDType::F32, 1);
  expect_error_containing([&] { HfCheckpoint h(dir_ / "ckpt"); }, "gate of expert 2 has shape [13, 20]");
  write_checkpoint([](int, int) { return true; }, TensorDType::I32);
  expect_error_containing([&] { HfCheckpoint h(dir_ / "ckpt"); }, "dtype I32");
  // The same expert in two shards of a directory.
  write_checkpoint([](int, int) { return true; }, TensorDType::BF16);
  fs::copy_file(dir_ / "ckpt" / "model.safetensors", dir_ / "ckpt" / "model-copy.safetensors");
  expect_error_containing([&] { HfCheckpoint h(dir_ / "ckpt"); }, "found twice");
  fs::remove_all(dir_ / "ckpt");
  fs::create_directories(dir_ / "ckpt");
  expect_error_containing([&] { HfCheckpoint h(dir_ / "ckpt"); }, "no .safetensors files");
  expect_error_containing([&] { HfCheckpoint h(dir_ / "nothing"); }, "no such file or directory");
}

}  // namespace
}  // namespace tmoe

namespace tmoe {
namespace {

TEST_F(IoTest, Fp8ValuesAreOcpE4M3AndE5M2) {
  std::vector<uint8_t> all(256);
  for (int i = 0; i < 256; ++i) all[i] = static_cast<uint8_t>(i);
  SafetensorsWriter w;
  w.add("e4m3", TensorDType::F8_E4M3, {256}, std::span<const uint8_t>(all));
  w.add("e5m2", TensorDType::F8_E5M2, {256}, std::span<const uint8_t>(all));
  w.write(dir_ / "fp8.safetensors");
  SafetensorsReader r(dir_ / "fp8.safetensors");
  const auto e4m3 = r.read_float("e4m3"), e5m2 = r.read_float("e5m2");
  // Anchors from the OCP FP8 specification.
  EXPECT_EQ(e4m3[0x38], 1.0f);
  EXPECT_EQ(e4m3[0xb8], -1.0f);
  EXPECT_EQ(e4m3[0x7e], 448.0f);               // largest finite
  EXPECT_EQ(e4m3[0x01], std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(e4m3[0x08], std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(e4m3[0x07], std::ldexp(7.0f, -9));  // largest subnormal
  EXPECT_TRUE(std::isnan(e4m3[0x7f]) && std::isnan(e4m3[0xff]));
  EXPECT_EQ(e5m2[0x3c], 1.0f);
  EXPECT_EQ(e5m2[0x7b], 57344.0f);
  EXPECT_EQ(e5m2[0x01], std::ldexp(1.0f, -16));
  EXPECT_TRUE(std::isinf(e5m2[0x7c]) && std::isnan(e5m2[0x7d]));
  // Positive codes increase strictly; negative codes mirror them.
  for (int v = 0; v < 0x7f; ++v) {
    if (v + 1 < 0x7f) EXPECT_LT(e4m3[v], e4m3[v + 1]) << v;
    EXPECT_EQ(e4m3[v | 0x80], -e4m3[v]) << v;
    if (v + 1 < 0x7c) EXPECT_LT(e5m2[v], e5m2[v + 1]) << v;
  }
}

// DeepSeek-V3 style: F8_E4M3 weights with per-128x128-block multipliers `weight_scale_inv`. The
// shapes span two scale blocks along both out and in so a wrong block index shows.
TEST_F(IoTest, HfDiscoveryFp8WithBlockScales) {
  TRACE_SEED();
  const int64_t hidden = 136, intermediate = 24;
  const int experts = 2;
  std::uniform_int_distribution<int> code(0, 0x7e), power(-4, 4);
  const char* names[] = {"gate_proj", "up_proj", "down_proj"};
  std::map<std::pair<int, int>, std::pair<std::vector<uint8_t>, std::vector<float>>> stored;
  SafetensorsWriter w;
  for (int p = 0; p < 3; ++p)
    for (int e = 0; e < experts; ++e) {
      const int64_t out = p == 2 ? hidden : intermediate, in = p == 2 ? intermediate : hidden;
      std::vector<uint8_t> codes(static_cast<size_t>(out * in));
      for (auto& c : codes) c = static_cast<uint8_t>(code(rng_) | (code(rng_) & 1 ? 0x80 : 0));
      const std::vector<int64_t> scale_shape{(out + 127) / 128, (in + 127) / 128};
      std::vector<float> scales(static_cast<size_t>(scale_shape[0] * scale_shape[1]));
      for (auto& s : scales) s = std::ldexp(1.0f, power(rng_));  // powers of two: products are exact
      const std::string name = fmt::format("model.layers.0.mlp.experts.{}.{}.weight", e, names[p]);
      w.add(name, TensorDType::F8_E4M3, {out, in}, std::span<const uint8_t>(codes));
      if (!(p == 1 && e == 1)) w.add(name + "_scale_inv", TensorDType::F32, scale_shape, std::span<const float>(scales));
      stored[{p, e}] = {codes, scales};
    }
  w.write(dir_ / "model.safetensors");
  expect_error_containing([&] { HfCheckpoint h(dir_ / "model.safetensors"); },
                          "'model.layers.0.mlp.experts.1.up_proj.weight_scale_inv' are missing");
  w.add("model.layers.0.mlp.experts.1.up_proj.weight_scale_inv", TensorDType::F32, {1, 2},
        std::span<const float>(stored[{1, 1}].second));
  w.write(dir_ / "model.safetensors");

  HfCheckpoint ckpt(dir_ / "model.safetensors");
  SafetensorsReader raw(dir_ / "model.safetensors");
  for (int p = 0; p < 3; ++p) {
    SCOPED_TRACE(names[p]);
    const auto shape = ckpt.projection_shape(0, p == 0 ? "gate" : p == 1 ? "up" : "down");
    const std::vector<float> stacked = ckpt.load_stacked(0, p == 0 ? "gate" : p == 1 ? "up" : "down");
    int mismatches = 0;
    for (int e = 0; e < experts; ++e) {
      const auto values = raw.read_float(fmt::format("model.layers.0.mlp.experts.{}.{}.weight", e, names[p]));
      const auto& scales = stored[{p, e}].second;
      const int64_t out = shape.N, in = shape.K, scale_cols = (in + 127) / 128;
      for (int64_t k = 0; k < in; ++k)
        for (int64_t n = 0; n < out; ++n)
          mismatches += stacked[(e * in + k) * out + n] != values[n * in + k] * scales[(n / 128) * scale_cols + k / 128];
    }
    EXPECT_EQ(mismatches, 0);
  }
}

}  // namespace
}  // namespace tmoe

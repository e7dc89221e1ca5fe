// safetensors reader (mmap, fully validated) and atomic writer.
//
// File layout: u64 little-endian header length n, n bytes of JSON header, then the data section.
// The header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets are
// relative to the data section) plus an optional "__metadata__" string->string map.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "io/io_internal.hpp"
#include "tmoe/error.hpp"
#include "tmoe/half.hpp"
#include "tmoe/io.hpp"

namespace tmoe {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

using json = nlohmann::json;

// A header larger than this is not a real checkpoint (the largest real headers are a few MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
// Deepest nesting a valid header has: object -> entry object -> shape array.
constexpr int kMaxHeaderDepth = 3;

struct DTypeName {
  TensorDType dtype;
  const char* name;
  int size;
};
constexpr DTypeName kDTypes[] = {
    {TensorDType::F64, "F64", 8}, {TensorDType::F32, "F32", 4},   {TensorDType::F16, "F16", 2},
    {TensorDType::BF16, "BF16", 2}, {TensorDType::I64, "I64", 8}, {TensorDType::I32, "I32", 4},
    {TensorDType::I16, "I16", 2}, {TensorDType::I8, "I8", 1},     {TensorDType::U8, "U8", 1},
    {TensorDType::BOOL, "BOOL", 1}, {TensorDType::U64, "U64", 8},   {TensorDType::U32, "U32", 4},
    {TensorDType::U16, "U16", 2}, {TensorDType::F8_E4M3, "F8_E4M3", 1}, {TensorDType::F8_E5M2, "F8_E5M2", 1},
};

const DTypeName& dtype_entry(TensorDType t) {
  for (const auto& d : kDTypes)
    if (d.dtype == t) return d;
  throw Error(ErrorKind::internal, "unknown TensorDType " + std::to_string(static_cast<int>(t)));
}

std::string system_error(const char* what) { return fmt::format("{}: {}", what, std::strerror(errno)); }

// Byte count of a tensor of `shape` x `dtype`; throws (naming `what`) on a negative dimension or
// an overflow of uint64.
uint64_t checked_byte_size(const std::vector<int64_t>& shape, TensorDType dtype,
                           const std::string& what) {
  uint64_t bytes = static_cast<uint64_t>(tensor_dtype_size(dtype));
  for (int64_t d : shape) {
    require(d >= 0, "{}: negative dimension {} in shape", what, d);
    require(!__builtin_mul_overflow(bytes, static_cast<uint64_t>(d), &bytes),
            "{}: shape product overflows", what);
  }
  return bytes;
}

std::string shape_string(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

}  // namespace

int tensor_dtype_size(TensorDType t) { return dtype_entry(t).size; }
const char* tensor_dtype_name(TensorDType t) { return dtype_entry(t).name; }

int64_t TensorInfo::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // the reader checked that this cannot overflow
  return n;
}

// ---------------------------------------------------------------------------------------- reader

namespace {

// Parses and validates the header; `data_bytes` is the size of the data section.
void parse_header(const std::string& where, std::string_view text, uint64_t data_bytes,
                  std::vector<TensorInfo>& tensors, std::map<std::string, std::string>& metadata) {
  // The callback rejects duplicate top-level keys (nlohmann would keep the last one silently) and
  // absurd nesting (which no valid header has).
  std::set<std::string> top_level_keys;
  std::string duplicate;
  auto callback = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxHeaderDepth) fail("{}: header JSON nested deeper than {} levels", where, kMaxHeaderDepth);
    if (event == json::parse_event_t::key && depth == 1 &&
        !top_level_keys.insert(parsed.get<std::string>()).second && duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  json header;
  try {
    header = json::parse(text.begin(), text.end(), callback);
  } catch (const json::exception& e) {
    fail("{}: header is not valid JSON: {}", where, e.what());
  }
  require(header.is_object(), "{}: header is not a JSON object but {}", where, header.type_name());
  require(duplicate.empty(), "{}: header names '{}' twice", where, duplicate);

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      require(entry.is_object(), "{}: __metadata__ is not an object but {}", where, entry.type_name());
      for (const auto& [key, value] : entry.items()) {
        require(value.is_string(), "{}: __metadata__ value of '{}' is not a string but {}", where,
                key, value.type_name());
        metadata[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string what = fmt::format("{}: tensor '{}'", where, name);
    require(entry.is_object(), "{} is not an object but {}", what, entry.type_name());
    for (const char* key : {"dtype", "shape", "data_offsets"})
      require(entry.contains(key), "{} has no '{}'", what, key);
    const json& dtype = entry["dtype"];
    const json& shape = entry["shape"];
    const json& offsets = entry["data_offsets"];

    TensorInfo t;
    t.name = name;
    require(dtype.is_string(), "{}: dtype is not a string but {}", what, dtype.type_name());
    const std::string dtype_name = dtype.get<std::string>();
    const auto* found = std::find_if(std::begin(kDTypes), std::end(kDTypes),
                                     [&](const DTypeName& d) { return dtype_name == d.name; });
    require(found != std::end(kDTypes), "{}: unknown dtype '{}'", what, dtype_name);
    t.dtype = found->dtype;

    require(shape.is_array(), "{}: shape is not an array but {}", what, shape.type_name());
    for (const json& d : shape) {
      require(d.is_number_integer(), "{}: shape holds a non-integer {}", what, d.dump());
      require(!d.is_number_unsigned() || d.get<uint64_t>() <= uint64_t{std::numeric_limits<int64_t>::max()},
              "{}: dimension {} is too large", what, d.dump());
      t.shape.push_back(d.get<int64_t>());
    }
    const uint64_t bytes = checked_byte_size(t.shape, t.dtype, what);
    // Each element count must also fit int64 (TensorInfo::elements); bytes >= elements, and
    // bytes <= data section <= file size, so the check below implies it.

    require(offsets.is_array() && offsets.size() == 2, "{}: data_offsets is not an array of two "
            "integers: {}", what, offsets.dump());
    for (const json& o : offsets) {
      require(o.is_number_integer(), "{}: data_offsets holds a non-integer {}", what, o.dump());
      require(o.is_number_unsigned(), "{}: negative data offset {}", what, o.dump());
    }
    t.begin = offsets[0].get<uint64_t>();
    t.end = offsets[1].get<uint64_t>();
    require(t.begin <= t.end, "{}: data_offsets are reversed ({} > {})", what, t.begin, t.end);
    require(t.end <= data_bytes, "{}: data range [{}, {}) is past the end of the data section ({} bytes)",
            what, t.begin, t.end, data_bytes);
    require(bytes == t.end - t.begin, "{}: shape {} of {} needs {} bytes but its data range holds {}",
            what, shape_string(t.shape), dtype_name, bytes, t.end - t.begin);
    tensors.push_back(std::move(t));
  }

  // No two non-empty ranges may share a byte.
  std::vector<const TensorInfo*> by_begin;
  for (const auto& t : tensors)
    if (t.end > t.begin) by_begin.push_back(&t);
  std::sort(by_begin.begin(), by_begin.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_begin.size(); ++i)
    require(by_begin[i]->begin >= by_begin[i - 1]->end,
            "{}: data ranges of '{}' [{}, {}) and '{}' [{}, {}) overlap", where, by_begin[i - 1]->name,
            by_begin[i - 1]->begin, by_begin[i - 1]->end, by_begin[i]->name, by_begin[i]->begin,
            by_begin[i]->end);
  std::sort(tensors.begin(), tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
}

// Owns a file descriptor; closes it on scope exit.
struct FileDescriptor {
  int fd = -1;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

SafetensorsReader::SafetensorsReader(const std::filesystem::path& path) : path_(path) {
  const std::string where = path.string();
  FileDescriptor file{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  require(file.fd >= 0, "{}: cannot open: {}", where, std::strerror(errno));
  struct stat st {};
  require(::fstat(file.fd, &st) == 0, "{}: cannot stat: {}", where, std::strerror(errno));
  require(S_ISREG(st.st_mode), "{}: not a regular file", where);
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  require(file_size >= 8, "{}: file is {} bytes, too short for the 8-byte header length", where, file_size);

  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, file.fd, 0);
  require(map != MAP_FAILED, "{}: cannot mmap: {}", where, std::strerror(errno));
  map_ = static_cast<const uint8_t*>(map);
  map_size_ = file_size;
  try {
    uint64_t header_bytes;
    std::memcpy(&header_bytes, map_, 8);
    require(header_bytes <= kMaxHeaderBytes, "{}: header length {} is absurd (limit {} bytes)", where,
            header_bytes, kMaxHeaderBytes);
    require(header_bytes <= file_size - 8, "{}: header length {} exceeds the {} bytes after it "
            "(truncated file?)", where, header_bytes, file_size - 8);
    const std::string_view text(reinterpret_cast<const char*>(map_ + 8), header_bytes);
    data_ = map_ + 8 + header_bytes;
    parse_header(where, text, file_size - 8 - header_bytes, tensors_, metadata_);
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(map_), map_size_);
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

const TensorInfo* SafetensorsReader::find(const std::string& name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorInfo& t, const std::string& n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

const TensorInfo& SafetensorsReader::at(const std::string& name) const {
  const TensorInfo* t = find(name);
  require(t != nullptr, "{}: no tensor '{}'", path_.string(), name);
  return *t;
}

std::span<const uint8_t> SafetensorsReader::bytes(const TensorInfo& t) const {
  // Guards against a TensorInfo that did not come from this file.
  const uint64_t data_bytes = map_size_ - static_cast<uint64_t>(data_ - map_);
  require(t.begin <= t.end && t.end <= data_bytes, "{}: tensor '{}' range [{}, {}) is outside the file",
          path_.string(), t.name, t.begin, t.end);
  return {data_ + t.begin, static_cast<size_t>(t.end - t.begin)};
}

std::vector<float> SafetensorsReader::read_float(const std::string& name) const {
  const TensorInfo& t = at(name);
  std::vector<float> out(static_cast<size_t>(t.elements()));
  convert_to_float(bytes(t), t.dtype, out, path_.string() + ": tensor '" + name + "'");
  return out;
}

float fp8_e4m3_to_float(uint8_t v) noexcept {
  // OCP "E4M3FN": bias 7, no infinities, S.1111.111 is NaN.
  const float sign = v & 0x80 ? -1.0f : 1.0f;
  const int exponent = (v >> 3) & 0xf, mantissa = v & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);  // subnormal: m/8 * 2^-6
  return sign * std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);      // (1 + m/8) * 2^(e-7)
}

float fp8_e5m2_to_float(uint8_t v) noexcept {
  return half_to_float(static_cast<uint16_t>(v << 8));  // E5M2 is the top byte of an fp16
}

bool decode_float_values(const uint8_t* bytes, TensorDType dtype, float* out, size_t count) noexcept {
  switch (dtype) {  // the bytes may be unaligned: memcpy each value
    case TensorDType::F32:
      std::memcpy(out, bytes, count * 4);
      return true;
    case TensorDType::F64:
      for (size_t i = 0; i < count; ++i) {
        double v;
        std::memcpy(&v, bytes + 8 * i, 8);
        out[i] = static_cast<float>(v);
      }
      return true;
    case TensorDType::F16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        out[i] = half_to_float(v);
      }
      return true;
    case TensorDType::BF16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        out[i] = bf16_to_float(v);
      }
      return true;
    case TensorDType::F8_E4M3:
      for (size_t i = 0; i < count; ++i) out[i] = fp8_e4m3_to_float(bytes[i]);
      return true;
    case TensorDType::F8_E5M2:
      for (size_t i = 0; i < count; ++i) out[i] = fp8_e5m2_to_float(bytes[i]);
      return true;
    default:
      return false;
  }
}

void convert_to_float(std::span<const uint8_t> bytes, TensorDType dtype, std::span<float> out,
                      const std::string& what) {
  const size_t size = static_cast<size_t>(tensor_dtype_size(dtype));
  require(bytes.size() == out.size() * size, "{}: {} bytes of {} do not make {} values", what,
          bytes.size(), tensor_dtype_name(dtype), out.size());
  require(decode_float_values(bytes.data(), dtype, out.data(), out.size()),
          "{}: dtype {} is not a floating-point type (F32, F16, BF16, F64 or F8_* expected)", what,
          tensor_dtype_name(dtype));
}

// ---------------------------------------------------------------------------------------- writer

void write_file_atomically(const std::filesystem::path& path, std::span<const uint8_t> bytes) {
  const std::span<const uint8_t> pieces[] = {bytes};
  write_file_atomically(path, pieces);
}

void write_file_atomically(const std::filesystem::path& path,
                           std::span<const std::span<const uint8_t>> pieces) {
  const std::filesystem::path temp = path.string() + ".tmp-" + std::to_string(::getpid());
  const std::string where = path.string();
  int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  require(fd >= 0, "{}: cannot create temporary file {}: {}", where, temp.string(), std::strerror(errno));
  auto abandon = [&](const std::string& problem) {
    if (fd >= 0) ::close(fd);
    ::unlink(temp.c_str());
    fail("{}: {}", where, problem);
  };
  for (std::span<const uint8_t> piece : pieces) {
    size_t written = 0;
    while (written < piece.size()) {
      const ssize_t n = ::write(fd, piece.data() + written, piece.size() - written);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) abandon(system_error("write failed"));
      written += static_cast<size_t>(n);
    }
  }
  if (::fsync(fd) != 0) abandon(system_error("fsync failed"));
  const int closed = ::close(fd);
  fd = -1;
  if (closed != 0) abandon(system_error("close failed"));
  if (::rename(temp.c_str(), path.c_str()) != 0) abandon(system_error("rename failed"));
  // Make the rename itself durable (best effort: some file systems refuse to fsync a directory).
  const std::filesystem::path parent = path.has_parent_path() ? path.parent_path() : ".";
  FileDescriptor dir{::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dir.fd >= 0) ::fsync(dir.fd);
}

void SafetensorsWriter::add_borrowed(const std::string& name, TensorDType dtype, std::vector<int64_t> shape,
                                     std::span<const uint8_t> bytes) {
  const std::string what = fmt::format("safetensors writer: tensor '{}'", name);
  require(!name.empty() && name != "__metadata__", "{}: invalid tensor name", what);
  require(!names_.contains(name), "{} added twice", what);
  const uint64_t size = checked_byte_size(shape, dtype, what);
  require(size == bytes.size(), "{}: shape {} of {} needs {} bytes, got {}", what, shape_string(shape),
          tensor_dtype_name(dtype), size, bytes.size());
  names_.insert(name);
  entries_.push_back(Entry{name, dtype, std::move(shape), true, {}, bytes});
}

void SafetensorsWriter::add(const std::string& name, TensorDType dtype, std::vector<int64_t> shape,
                            std::span<const uint8_t> bytes) {
  add_borrowed(name, dtype, std::move(shape), bytes);  // validates
  Entry& e = entries_.back();
  e.owned.assign(bytes.begin(), bytes.end());
  e.borrowed = false;
  e.borrowed_bytes = {};
}

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  json header = json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const Entry& e : entries_) {  // data in the order the tensors were added
    header[e.name] = {{"dtype", tensor_dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + e.bytes().size()}}};
    offset += e.bytes().size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data section starts 8-byte aligned

  const uint64_t header_bytes = text.size();
  uint8_t length[8];
  std::memcpy(length, &header_bytes, 8);
  // Written piece by piece: a shard may be hundreds of MB, so no second copy in memory.
  std::vector<std::span<const uint8_t>> pieces{
      length, {reinterpret_cast<const uint8_t*>(text.data()), text.size()}};
  for (const Entry& e : entries_) pieces.push_back(e.bytes());
  write_file_atomically(path, pieces);
}

}  // namespace tmoe

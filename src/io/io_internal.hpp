// Helpers shared by the files of src/io (not part of the public API).
#pragma once

#include <filesystem>
#include <span>
#include <string>

#include "tmoe/io.hpp"

namespace tmoe {

// Converts `out.size()` values of `dtype` (F32, F16, BF16, F64, F8_E4M3 or F8_E5M2; any alignment) to fp32; throws
// tmoe::Error naming `what` for another dtype or a size mismatch.
void convert_to_float(std::span<const uint8_t> bytes, TensorDType dtype, std::span<float> out,
                      const std::string& what);

// 8-bit floats (OCP FP8): E4M3 with bias 7 and no infinities (NaN = S.1111.111); E5M2 = top byte of fp16.
float fp8_e4m3_to_float(uint8_t v) noexcept;
float fp8_e5m2_to_float(uint8_t v) noexcept;

// Unchecked core of convert_to_float for hot loops (no exceptions: usable inside OpenMP regions):
// converts `count` values; returns false, writing nothing, for a non-floating dtype.
bool decode_float_values(const uint8_t* bytes, TensorDType dtype, float* out, size_t count) noexcept;

// write_file_atomically for a file made of several consecutive pieces.
void write_file_atomically(const std::filesystem::path& path,
                           std::span<const std::span<const uint8_t>> pieces);

}  // namespace tmoe

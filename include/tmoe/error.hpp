// One exception type for the whole library. `kind` lets the CLI map errors to exit codes:
// bad input (a malformed file, an expert id out of range, a shape mismatch) is the user's to fix;
// internal errors (a CUDA failure, a broken invariant) are ours.
#pragma once

#include <stdexcept>
#include <string>

#if !defined(__CUDACC__)
#include <fmt/format.h>  // nvcc's C++20 host pass rejects fmt 9: .cu files build messages themselves
#endif

namespace tmoe {

enum class ErrorKind { bad_input, internal };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

#if !defined(__CUDACC__)
// Throws a bad-input Error with a fmt-formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(ErrorKind::bad_input, fmt::format(format, std::forward<Args>(args)...));
}

// Throws a bad-input Error unless `condition` holds.
template <typename... Args>
void require(bool condition, fmt::format_string<Args...> format, Args&&... args) {
  if (!condition) fail(format, std::forward<Args>(args)...);
}
#endif

}  // namespace tmoe

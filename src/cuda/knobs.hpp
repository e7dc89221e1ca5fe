// Run-time knobs for A/B timing and tests: environment variables that override a build's or a
// plan's default, so that one build can time and test every setting (scripts/gpu-env-ab).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace tmoe::cuda {

// The variable's value as an integer, or `fallback` when it is unset.
inline int64_t env_knob(const char* name, int64_t fallback) {
  if (const char* env = std::getenv(name)) return std::atoll(env);
  return fallback;
}

// The index of the variable's value among `choices`, or `fallback` when it is unset or none of them.
inline int env_choice(const char* name, std::initializer_list<const char*> choices, int fallback) {
  const char* env = std::getenv(name);
  if (env == nullptr) return fallback;
  int index = 0;
  for (const char* choice : choices) {
    if (std::strcmp(env, choice) == 0) return index;
    ++index;
  }
  return fallback;
}

}  // namespace tmoe::cuda

// The value types of our kernels: float (fp32) or uint16_t (bf16's bits: c10::BFloat16's class
// keeps loops of it from vectorizing), and their conversions, rounded as torch rounds.
#pragma once

#include <cstdint>
#include <cstring>

namespace xtuner_lite {

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// T's value of fp32 x, rounded to nearest even as torch rounds it (branch-free, so loops vectorize)
template <typename T>
inline T round_to(float x);

template <>
inline float round_to<float>(float x) {
  return x;
}

template <>
inline uint16_t round_to<uint16_t>(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7fc0u : rounded);
}

inline float widen(float x) { return x; }
inline float widen(uint16_t x) { return bits_float(static_cast<uint32_t>(x) << 16); }

}  // namespace xtuner_lite

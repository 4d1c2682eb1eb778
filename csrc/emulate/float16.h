// Bit-exact conversions between float and the 16-bit formats (IEEE half, bfloat16), as the
// CUDA intrinsics do them: round to nearest even, with subnormals, infinities and NaN.
// Shared by the emulated CUDA types (device.h) and the emulated mma.sync (runtime.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace distattn {
namespace emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 2^16: inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal half, value = n * 2^-24
    // The host's own round-to-nearest-even of |f| * 2^24 to an integer (exact scaling).
    const float n = std::nearbyint(std::ldexp(bits_float(a), 24));
    return uint16_t(sign | uint16_t(n));  // n <= 1024 (= the smallest normal)
  }
  // Normal: drop 13 mantissa bits with round to nearest even; the carry may bump the exponent.
  const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | uint16_t((rounded - (112u << 23)) >> 13));
}

}  // namespace emu
}  // namespace distattn

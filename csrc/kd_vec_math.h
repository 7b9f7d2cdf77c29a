// Branch-free exp/log that GCC and Clang auto-vectorise inside `#pragma omp simd` loops
// (AVX2/FMA with -march=native on x86_64, NEON on aarch64, SSE2 otherwise).
//
// float: Cephes-style range reduction and minimax polynomials, max error about 1 ulp over the
// range used here (arguments <= 0 for exp, [1, 2] for log). Results below ~1.6e-38 (x < -87)
// are flushed to 0, which is exactly what a softmax term that small contributes to a float sum.
// double: std::exp / std::log (the float64 path is the accurate one, not the fast one).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ddk {

// Bit casts usable inside vectorised loops (memcpy for compilers without __builtin_bit_cast).
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define DDK_HAS_BIT_CAST 1
#endif
#endif

static inline float bits_to_float(uint32_t u) {
#ifdef DDK_HAS_BIT_CAST
  return __builtin_bit_cast(float, u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

static inline uint32_t float_to_bits(float f) {
#ifdef DDK_HAS_BIT_CAST
  return __builtin_bit_cast(uint32_t, f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// exp(x) for float, vectorisable. NaN propagates; -inf and x < -87 give 0; x > 88.37 saturates.
// Only min/max and one select, so compilers if-convert it into blends inside simd loops.
static inline float fast_exp(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float xc = std::min(std::max(x, -87.0f), 88.37f);  // NaN stays NaN
  const float kf = xc * 1.44269504088896341f + shifter;
  const float k = kf - shifter;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const uint32_t ki = float_to_bits(kf) - float_to_bits(shifter);  // k as a two's-complement int
  const float scale = bits_to_float((ki + 127u) << 23);
  const float y = p * scale;
  return x < -87.0f ? 0.0f : y;
}

// log(x) for positive normal float x, vectorisable (Cephes logf).
static inline float fast_log(float x) {
  const uint32_t u = float_to_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(u >> 23) - 126);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

static inline double fast_exp(double x) { return std::exp(x); }
static inline double fast_log(double x) { return std::log(x); }

}  // namespace ddk

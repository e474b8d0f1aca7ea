// Row load/store between storage dtypes and float32 scratch, vectorised where the ISA allows.
#pragma once

#include <cstdint>

#include "vita/dtype.h"

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

namespace vita::cpu {

inline void load_row(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void load_row(const bf16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_float(uint32_t(s[i]) << 16);
}
inline void load_row(const half_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

inline void store_row(const float* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void store_row(const float* src, bf16_t* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = float_to_bits(src[i]);
    // round to nearest even; NaN keeps a quiet payload
    uint32_t r = ((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x400000u) : u + 0x7fffu + ((u >> 16) & 1u);
    d[i] = uint16_t(r >> 16);
  }
}
inline void store_row(const float* src, half_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = from_float<half_t>(src[i]);
}

// exp(x) for float32 in straight-line code the compiler vectorises (libm's expf does not
// vectorise without -ffast-math). Cephes polynomial after range reduction; max rel error ~2 ulp.
inline float exp_vec(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  return y * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

// Round-trip through the storage dtype (what torch does between two ops in that dtype).
template <class T>
inline void round_row(float* x, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) x[i] = to_float(from_float<T>(x[i]));
  }
}

}  // namespace vita::cpu

// Fixed-width float32 vectors and their loads/stores from/to the storage dtypes, for the kernels
// that are built once per vector width and chosen at run time (cpu_isa.h): VITA_VW 8 (AVX2 + FMA +
// F16C, the baseline build) or 16 (AVX-512F/BW/VL/DQ, built under a target pragma).
//
// bfloat16 stores round to nearest even with a quiet NaN, bit-identical to from_float<bf16_t>
// (integer rounding rather than AVX512-BF16's vcvtneps2bf16, which flushes subnormals to zero and
// which most AVX-512 CPUs lack); half uses F16C / AVX-512F conversions (round to nearest even).
//
// Included inside a private namespace after <immintrin.h> (x86) and "vec.h", with VITA_VW set by the
// includer. No include guard on purpose.

constexpr int VW = VITA_VW;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

inline vf ldv(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void stv(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
// Broadcast (x - 0 keeps -0.0 and NaN payloads; vf{} + x would turn -0.0 into +0.0).
inline vf splat(float x) { return x - vf{}; }

inline vf loadv(const float* p) { return ldv(p); }
inline vf loadv(const bf16_t* p) {
#if VITA_VW == 16
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif VITA_VW == 8 && defined(__AVX2__)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}
inline vf loadv(const half_t* p) {
#if VITA_VW == 16
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif VITA_VW == 8 && defined(__AVX2__) && defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}

inline void storev(float* p, vf x) { stv(p, x); }
inline void storev(bf16_t* p, vf x) {
#if VITA_VW == 16
  const __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
#elif VITA_VW == 8 && defined(__AVX2__)
  const __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  r = _mm256_srli_epi32(r, 16);
  const __m256i pk = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // qwords 0 and 2: lanes 0-3, 4-7
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(pk));
#else
  for (int i = 0; i < VW; ++i) p[i] = from_float<bf16_t>(x[i]);
#endif
}
inline void storev(half_t* p, vf x) {
#if VITA_VW == 16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif VITA_VW == 8 && defined(__AVX2__) && defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < VW; ++i) p[i] = from_float<half_t>(x[i]);
#endif
}

// Partial vectors (n < VW elements): through a small buffer, the missing lanes read as zero.
template <class T>
inline vf loadv_n(const T* p, int64_t n) {
  T b[VW] = {};
  for (int64_t i = 0; i < n; ++i) b[i] = p[i];
  return loadv(b);
}
template <class T>
inline void storev_n(T* p, vf x, int64_t n) {
  T b[VW];
  storev(b, x);
  for (int64_t i = 0; i < n; ++i) p[i] = b[i];
}

// Round-trip through T (what torch does between two ops in that dtype).
template <class T>
inline vf roundv(vf x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    T b[VW];
    storev(b, x);
    return loadv(b);
  }
}

inline float hsum(vf x) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += x[i];
  return s;
}

// exp(x) on a whole vector, relative error ~2e-7 (Cephes polynomial after range reduction); x is
// clamped to [-87.3, 88.0], so the result is finite and > 0 for any input (NaN stays NaN).
inline vf expv(vf x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  // round(x / ln2) with the 1.5 * 2^23 trick: the integer lands in the low mantissa bits of t
  const vf t = x * 1.44269504088896341f + 12582912.0f;
  const vf n = t - 12582912.0f;
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const vi e = ((vi)t - 0x4B400000 + 127) << 23;
  return p * (vf)e;
}

// tanh(x): odd polynomial for |x| < 0.625 (Cephes tanhf), 1 - 2 / (exp(2|x|) + 1) above, sign
// restored; relative error ~3e-7.
inline vf tanhv(vf x) {
  const vf ax = x < 0.f ? -x : x;
  const vf z = x * x;
  vf p = splat(-5.70498872745E-3f);
  p = p * z + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  const vf small = p * z * x + x;
  vf big = 1.0f - 2.0f / (expv(ax + ax) + 1.0f);
  big = x < 0.f ? -big : big;
  return ax < 0.625f ? small : big;
}

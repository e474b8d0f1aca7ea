// AVX-512 build of the row-wise ops in rowops_impl.h (16-float vectors), chosen at run time by
// rowops.cpp. Every header is included before the target pragma so that only this file's own
// (namespace-private) functions are compiled for AVX-512 (see attention_avx512.cpp).
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vec.h"
#include "vita/kernels/elementwise.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace vita::cpu::rows_avx512 {
namespace {
// GCC 12's masked-intrinsic wrappers (cvtph_ps, ...) pass an internal _mm512_undefined that trips
// -Wmaybe-uninitialized once inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define VITA_VW 16
#include "vecw_impl.h"
#include "rowops_impl.h"
#undef VITA_VW
#pragma GCC diagnostic pop
}  // namespace

void rms_norm(const RmsNormArgs& a) { rms_norm_entry(a); }
void silu_and_mul(const SiluMulArgs& a) { silu_and_mul_entry(a); }
void rotary_embedding(const RopeArgs& a) { rotary_embedding_entry(a); }
}  // namespace vita::cpu::rows_avx512

#pragma GCC pop_options
#endif

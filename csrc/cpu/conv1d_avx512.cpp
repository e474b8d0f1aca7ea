// AVX-512 build of the codec convolutions in conv1d_impl.h (16-float vectors, 8-channel x 48-step
// micro tiles), chosen at run time by conv1d.cpp. Every header is included before the target
// pragma so that only this file's own (namespace-private) functions are compiled for AVX-512
// (see attention_avx512.cpp).
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vec.h"
#include "vita/kernels/codec.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace vita::cpu::conv_avx512 {
namespace {
// GCC 12's masked-intrinsic wrappers (cvtph_ps, ...) pass an internal _mm512_undefined that trips
// -Wmaybe-uninitialized once inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define VITA_VW 16
#include "vecw_impl.h"
#include "conv1d_impl.h"
#undef VITA_VW
#pragma GCC diagnostic pop
}  // namespace

void conv1d(const Conv1dArgs& a) { conv1d_entry(a); }
void conv_transpose1d(const ConvTranspose1dArgs& a) { conv_transpose1d_entry(a); }
}  // namespace vita::cpu::conv_avx512

#pragma GCC pop_options
#endif

// AVX-512 build of the small-M projection in linear_small_m_impl.h (16-float vectors), chosen at
// run time by linear_small_m.cpp. Every header is included before the target pragma so that only
// this file's own (namespace-private) functions are compiled for AVX-512 (see attention_avx512.cpp).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vec.h"
#include "vita/kernels/linear.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace vita::cpu::linear_avx512 {
namespace {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define VITA_VW 16
#include "vecw_impl.h"
#include "linear_small_m_impl.h"
#undef VITA_VW
#pragma GCC diagnostic pop
}  // namespace

void linear_small_m(const LinearArgs& a) { linear_small_m_entry(a); }
}  // namespace vita::cpu::linear_avx512

#pragma GCC pop_options
#endif

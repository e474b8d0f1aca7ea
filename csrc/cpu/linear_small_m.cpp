// CPU small-M projection (decode steps): the baseline build of linear_small_m_impl.h (8-float
// vectors: AVX2 + FMA) and the run-time choice between it and the AVX-512 build
// (linear_small_m_avx512.cpp).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "vec.h"
#include "vita/kernels/linear.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define VITA_LINEAR_HAVE_AVX512 1
#endif

namespace vita::cpu {
namespace linear_base {
namespace {
#define VITA_VW 8
#include "vecw_impl.h"
#include "linear_small_m_impl.h"
#undef VITA_VW
}  // namespace
void linear_small_m(const LinearArgs& a) { linear_small_m_entry(a); }
}  // namespace linear_base

#if defined(VITA_LINEAR_HAVE_AVX512)
namespace linear_avx512 {
void linear_small_m(const LinearArgs& a);
}  // namespace linear_avx512
#endif

void linear_small_m(const LinearArgs& a) {
#if defined(VITA_LINEAR_HAVE_AVX512)
  if (cpu_isa() >= Isa::kAvx512) return linear_avx512::linear_small_m(a);
#endif
  linear_base::linear_small_m(a);
}

}  // namespace vita::cpu

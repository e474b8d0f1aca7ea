// CPU codec kernels (conv1d, conv_transpose1d): the baseline build of conv1d_impl.h (8-float
// vectors: AVX2 + FMA) and the run-time choice between it and the AVX-512 build (conv1d_avx512.cpp).
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "vec.h"
#include "vita/kernels/codec.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define VITA_CONV_HAVE_AVX512 1
#endif

namespace vita::cpu {
namespace conv_base {
namespace {
#define VITA_VW 8
#include "vecw_impl.h"
#include "conv1d_impl.h"
#undef VITA_VW
}  // namespace
void conv1d(const Conv1dArgs& a) { conv1d_entry(a); }
void conv_transpose1d(const ConvTranspose1dArgs& a) { conv_transpose1d_entry(a); }
}  // namespace conv_base

#if defined(VITA_CONV_HAVE_AVX512)
namespace conv_avx512 {
void conv1d(const Conv1dArgs& a);
void conv_transpose1d(const ConvTranspose1dArgs& a);
}  // namespace conv_avx512
#endif

void conv1d(const Conv1dArgs& a) {
#if defined(VITA_CONV_HAVE_AVX512)
  if (cpu_isa() >= Isa::kAvx512) return conv_avx512::conv1d(a);
#endif
  conv_base::conv1d(a);
}

void conv_transpose1d(const ConvTranspose1dArgs& a) {
#if defined(VITA_CONV_HAVE_AVX512)
  if (cpu_isa() >= Isa::kAvx512) return conv_avx512::conv_transpose1d(a);
#endif
  conv_base::conv_transpose1d(a);
}

}  // namespace vita::cpu

// CPU row-wise LLM ops (rms_norm / fused_add_rms_norm, silu_and_mul, rotary_embedding): the
// baseline build of rowops_impl.h (8-float vectors) and the run-time choice between it and the
// AVX-512 build (rowops_avx512.cpp).
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "vec.h"
#include "vita/kernels/elementwise.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define VITA_ROWS_HAVE_AVX512 1
#endif

namespace vita::cpu {
namespace rows_base {
namespace {
#define VITA_VW 8
#include "vecw_impl.h"
#include "rowops_impl.h"
#undef VITA_VW
}  // namespace
void rms_norm(const RmsNormArgs& a) { rms_norm_entry(a); }
void silu_and_mul(const SiluMulArgs& a) { silu_and_mul_entry(a); }
void rotary_embedding(const RopeArgs& a) { rotary_embedding_entry(a); }
}  // namespace rows_base

#if defined(VITA_ROWS_HAVE_AVX512)
namespace rows_avx512 {
void rms_norm(const RmsNormArgs& a);
void silu_and_mul(const SiluMulArgs& a);
void rotary_embedding(const RopeArgs& a);
}  // namespace rows_avx512
#define VITA_ROWS_DISPATCH(fn, a)                                 \
  do {                                                            \
    if (cpu_isa() >= Isa::kAvx512) return rows_avx512::fn(a);     \
    return rows_base::fn(a);                                      \
  } while (0)
#else
#define VITA_ROWS_DISPATCH(fn, a) return rows_base::fn(a)
#endif

void rms_norm(const RmsNormArgs& a) { VITA_ROWS_DISPATCH(rms_norm, a); }
void silu_and_mul(const SiluMulArgs& a) { VITA_ROWS_DISPATCH(silu_and_mul, a); }
void rotary_embedding(const RopeArgs& a) { VITA_ROWS_DISPATCH(rotary_embedding, a); }

}  // namespace vita::cpu

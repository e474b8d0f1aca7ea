// AVX-512 + AVX512-BF16 build of the attention kernels in attention_impl.h: bfloat16 query blocks
// (chunked prefill, varlen without bias) use vdpbf16ps for Q.K^T and P.V (attend_dp); everything
// else is the same code as attention_avx512.cpp. Selected at run time by attention.cpp for bf16
// queries when the CPU has avx512_bf16. Headers come before the target pragma (see
// attention_avx512.cpp).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "vec.h"
#include "vita/kernels/attention.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,fma,f16c")

namespace vita::cpu::avx512bf16 {
namespace {
// GCC 12's masked-intrinsic wrappers (roundscale, scalef, reduce_max) pass an internal
// _mm512_undefined that trips -Wmaybe-uninitialized once inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define VITA_ATTN_VW 16
#define VITA_ATTN_BF16DP 1
#include "attention_impl.h"
#undef VITA_ATTN_BF16DP
#undef VITA_ATTN_VW
#undef VITA_ATTN_TRANSPOSE
#pragma GCC diagnostic pop
}  // namespace

void paged_attention(const PagedAttentionArgs& a) { paged_attention_entry(a); }
void varlen_attention(const VarlenAttentionArgs& a) { varlen_attention_entry(a); }
}  // namespace vita::cpu::avx512bf16

#pragma GCC pop_options
#endif

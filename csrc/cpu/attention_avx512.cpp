// AVX-512 build of the attention kernels in attention_impl.h (16-float vectors), selected at run
// time by attention.cpp when the CPU supports it. Every header is included before the target
// pragma so that only this file's own (namespace-private) functions are compiled for AVX-512.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "vec.h"
#include "vita/kernels/attention.h"
#include "vita/parallel.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace vita::cpu::avx512 {
namespace {
#define VITA_ATTN_VW 16
#include "attention_impl.h"
#undef VITA_ATTN_VW
#undef VITA_ATTN_TRANSPOSE
}  // namespace

void paged_attention(const PagedAttentionArgs& a) { paged_attention_entry(a); }
void varlen_attention(const VarlenAttentionArgs& a) { varlen_attention_entry(a); }
}  // namespace vita::cpu::avx512

#pragma GCC pop_options
#endif

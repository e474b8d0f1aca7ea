// CPU attention entry points: dispatch to the AVX-512 or the baseline build of attention_impl.h.
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
#define VITA_ATTN_HAVE_AVX512 1
#endif

namespace vita::cpu {
namespace base {
namespace {
#define VITA_ATTN_VW 8
#include "attention_impl.h"
#undef VITA_ATTN_VW
#undef VITA_ATTN_TRANSPOSE
}  // namespace
}  // namespace base

#if defined(VITA_ATTN_HAVE_AVX512)
namespace avx512 {
void paged_attention(const PagedAttentionArgs& a);
void varlen_attention(const VarlenAttentionArgs& a);
}  // namespace avx512
namespace avx512bf16 {
void paged_attention(const PagedAttentionArgs& a);
void varlen_attention(const VarlenAttentionArgs& a);
}  // namespace avx512bf16
#endif

namespace {
// AVX-512 path when the CPU has it, unless VITA_CPU_ISA=avx2 (the tests use it to cover both).
bool use_avx512() {
#if defined(VITA_ATTN_HAVE_AVX512)
  static const bool have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* e = std::getenv("VITA_CPU_ISA");
  return have && !(e && std::strcmp(e, "avx2") == 0);
#else
  return false;
#endif
}
// bf16 queries on an AVX512-BF16 CPU take the vdpbf16ps build, unless VITA_CPU_ISA=avx512
// (plain AVX-512 path) or avx2.
bool use_bf16dp(DType dt) {
#if defined(VITA_ATTN_HAVE_AVX512)
  static const bool have = __builtin_cpu_supports("avx512bf16");
  const char* e = std::getenv("VITA_CPU_ISA");
  return dt == DType::kBFloat16 && have && !(e && std::strcmp(e, "avx512") == 0);
#else
  return false;
#endif
}
}  // namespace

void paged_attention(const PagedAttentionArgs& a) {
#if defined(VITA_ATTN_HAVE_AVX512)
  if (use_avx512()) return use_bf16dp(a.q.dtype) ? avx512bf16::paged_attention(a) : avx512::paged_attention(a);
#endif
  base::paged_attention_entry(a);
}

void varlen_attention(const VarlenAttentionArgs& a) {
#if defined(VITA_ATTN_HAVE_AVX512)
  if (use_avx512()) return use_bf16dp(a.q.dtype) ? avx512bf16::varlen_attention(a) : avx512::varlen_attention(a);
#endif
  base::varlen_attention_entry(a);
}

}  // namespace vita::cpu

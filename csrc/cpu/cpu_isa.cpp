#include "cpu_isa.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#endif

namespace vita::cpu {
namespace {

Isa detect() {
#if defined(__GNUC__) && defined(__x86_64__)
  // __builtin_cpu_supports also checks that the OS saves the AVX-512 state (XCR0 via xgetbv).
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")))
    return Isa::kBaseline;
  if (!__builtin_cpu_supports("avx512bf16")) return Isa::kAvx512;
  unsigned a, b, c, d;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1) && ((d >> 24) & 1)) return Isa::kAmx;  // AMX-BF16, AMX-TILE
  return Isa::kAvx512Bf16;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace

Isa cpu_isa_detected() {
  static const Isa isa = detect();
  return isa;
}

Isa cpu_isa() {
  const Isa have = cpu_isa_detected();
  const char* e = std::getenv("VITA_CPU_ISA");
  if (!e || !*e) return have;
  Isa cap = have;
  if (std::strcmp(e, "avx2") == 0)
    cap = Isa::kBaseline;
  else if (std::strcmp(e, "avx512") == 0)
    cap = Isa::kAvx512;
  else if (std::strcmp(e, "avx512bf16") == 0)
    cap = Isa::kAvx512Bf16;
  return std::min(have, cap);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    default: return "avx2";
  }
}

}  // namespace vita::cpu

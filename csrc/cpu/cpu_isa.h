// Run-time choice of the CPU code path. The library is compiled for the VITA_CPU_ARCH baseline
// (x86-64-v3: AVX2, FMA, F16C); kernels with wider builds (AVX-512 translation units compiled under
// target pragmas) ask cpu_isa() on every call and take the best build the CPU and OS support.
//
// VITA_CPU_ISA=avx2|avx512|avx512bf16|amx caps the choice (read on every call, so tests can run
// every path the CPU has in one process); the attention kernels read the same variable.
#pragma once

namespace vita::cpu {

enum class Isa : int { kBaseline = 0, kAvx512 = 1, kAvx512Bf16 = 2, kAmx = 3 };

Isa cpu_isa_detected();  // what the CPU and OS support (cached)
Isa cpu_isa();           // cpu_isa_detected(), capped by VITA_CPU_ISA
const char* isa_name(Isa isa);

}  // namespace vita::cpu

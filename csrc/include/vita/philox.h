// Counter-based RNG (Philox4x32-10) shared by the CPU and CUDA sampling kernels, so that a
// stream seeded with `seed` draws the same numbers at decode step `step` on either backend,
// whatever the batch composition. The Python reference implements the same function.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VITA_HD __host__ __device__ __forceinline__
#else
#define VITA_HD inline
#endif

namespace vita {

struct Philox4 {
  uint32_t v[4];
};

VITA_HD uint32_t mulhi32(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * uint64_t(b)) >> 32); }

// counter = (index lo, index hi, step lo, step hi), key = seed (lo, hi).
VITA_HD Philox4 philox4x32(uint64_t seed, uint64_t step, uint64_t index) {
  uint32_t c0 = uint32_t(index), c1 = uint32_t(index >> 32), c2 = uint32_t(step), c3 = uint32_t(step >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = mulhi32(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform in (0, 1), never 0 or 1: 23 random bits, centred in their bucket. (With 24 bits the top
// bucket's centre, 16777215.5, is not a float: it rounded to 2^24, so u was exactly 1 once in 2^24
// draws and the Gumbel noise -log(-log u) was +inf: a full-vocabulary draw then took that token
// whatever its logit, about once per 110 draws over a 152k vocabulary.)
VITA_HD float philox_uniform(uint64_t seed, uint64_t step, uint64_t index) {
  return (float(philox4x32(seed, step, index).v[0] >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

}  // namespace vita

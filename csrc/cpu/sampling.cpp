#include <algorithm>
#include <type_traits>

#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>

#include "vita/dtype.h"
#include "vita/kernels/sampling.h"
#include "vita/parallel.h"
#include "vita/philox.h"

namespace vita::cpu {
namespace {

inline float gumbel(uint64_t seed, uint64_t step, uint64_t idx) {
  return -std::log(-std::log(philox_uniform(seed, step, idx)));
}

// Strictly-better ordering used everywhere: larger value, then smaller index.
inline bool better(float a, int64_t ia, float b, int64_t ib) { return a > b || (a == b && ia < ib); }

// The top-2 of a row (ties -> smaller index) in one branch-light pass, for the TTS's top_k = 2. The
// scan runs in increasing index, so a later value displaces a kept one only if strictly larger: the
// same result as the general insertion below. Returns false for a row with a NaN, whose order is
// left to the general path so that every row keeps its existing result.
template <class T>
bool top2(const T* row, int64_t V, int64_t (&out)[2]) {
  float v0 = to_float(row[0]), v1 = to_float(row[1]);
  int64_t i0 = 0, i1 = 1;
  bool nan = v0 != v0 || v1 != v1;
  if (v1 > v0) std::swap(v0, v1), std::swap(i0, i1);
  auto scan = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float v = to_float(row[i]);
      nan |= v != v;
      if (v > v1) {
        if (v > v0) {
          v1 = v0, i1 = i0, v0 = v, i0 = i;
        } else {
          v1 = v, i1 = i;
        }
      }
    }
  };
  // Blocks whose maximum does not beat the runner-up change nothing: a vectorizable max (and NaN
  // test) skips them, and only the few blocks that do are scanned element by element.
  constexpr int64_t kBlock = 32;
  int64_t i = 2;
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    for (; i + kBlock <= V; i += kBlock) {
      const __m256 a = _mm256_loadu_ps(row + i), b = _mm256_loadu_ps(row + i + 8), c = _mm256_loadu_ps(row + i + 16),
                   d = _mm256_loadu_ps(row + i + 24);
      const __m256 un = _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q));
      // A block with a NaN, or any lane beating the runner-up, is scanned in full.
      const __m256 m = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
      if (_mm256_movemask_ps(_mm256_or_ps(un, _mm256_cmp_ps(m, _mm256_set1_ps(v1), _CMP_GT_OQ)))) scan(i, i + kBlock);
    }
  }
#endif
  for (; i + kBlock <= V; i += kBlock) {
    float m = -INFINITY;
    bool bn = false;
    for (int64_t j = i; j < i + kBlock; ++j) {
      const float v = to_float(row[j]);
      m = v > m ? v : m;
      bn |= v != v;
    }
    nan |= bn;
    if (m > v1) scan(i, i + kBlock);
  }
  scan(i, V);
  out[0] = i0, out[1] = i1;
  return !nan;
}

// The largest Gumbel noise philox_uniform can give (u at its top bucket), plus a margin that
// covers any rounding of the bound test below.
inline float gumbel_max() {
  static const float g = -std::log(-std::log((float(0x7FFFFF) + 0.5f) * (1.0f / 8388608.0f))) + 1e-3f;
  return g;
}

// Whole-vocabulary draw: argmax over i of (x_i / temp + gumbel(i)), ties -> smaller index, the same
// winner as scoring every token. A token whose x_i / temp + gumbel_max() is below the best score
// so far cannot win, so its noise (10 Philox rounds and two logs, nearly all of the cost) is never
// computed: starting from the largest logit's score, only the tokens within gumbel_max() (~16.6)
// of it in x / temp are scored (a fifth of a 152k vocabulary of N(0, 3^2) logits at t = 0.7).
// The test runs on whole vectors of x against a threshold in x space, x < (best - gmax) * temp,
// loosened by a relative margin far above float rounding. Returns -1 where the bound does not
// apply (NaN / infinite best score or temperature); the caller then scores every token.
template <class T>
int64_t sample_full_bounded(const T* row, int64_t V, float temp, uint64_t seed, uint64_t step) {
  if (!(temp > 0.f) || !std::isfinite(temp)) return -1;
  // a start: the first largest logit (NaNs ignored)
  float mx = -INFINITY;
  int64_t im = -1;
  for (int64_t i = 0; i < V; ++i) {
    const float v = to_float(row[i]);
    if (v > mx) mx = v, im = i;
  }
  if (im < 0) return -1;
  float bv = mx / temp + gumbel(seed, step, uint64_t(im));
  int64_t best = im;
  if (!std::isfinite(bv)) return -1;
  const float gmax = gumbel_max();
  auto threshold = [&] {
    const float lo = bv - gmax;
    const float xt = (lo - 1e-4f * (1.f + std::fabs(lo))) * temp;
    return xt - 1e-4f * std::fabs(xt);
  };
  float xthr = threshold();
  auto score = [&](int64_t i) {
    const float v = to_float(row[i]) / temp + gumbel(seed, step, uint64_t(i));
    if (better(v, i, bv, best)) {
      bv = v, best = i;
      xthr = threshold();
    }
  };
  int64_t i = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 16 <= V; i += 16) {
      const __m256 t = _mm256_set1_ps(xthr);
      unsigned m = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i), t, _CMP_GE_OQ))) |
                   (unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + i + 8), t, _CMP_GE_OQ))) << 8);
      while (m) {
        const int j = __builtin_ctz(m);
        m &= m - 1;
        if (i + j != im) score(i + j);
      }
    }
  }
#endif
  for (; i < V; ++i)
    if (to_float(row[i]) >= xthr && i != im) score(i);
  return best;
}

template <class T>
void sample_impl(const SampleArgs& a) {
  const int64_t B = a.logits.size(0), V = a.logits.size(1), ls = a.logits.stride(0);
  // At least ~64k logits per chunk: below that, waking a worker costs more than the rows it would
  // take (the TTS's 16 x 1028 runs on the calling thread).
  parallel_for(B, std::max<int64_t>(1, (int64_t(1) << 16) / V), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cand;
    int64_t best2[2];
    for (int64_t b = b0; b < b1; ++b) {
      const T* row = a.logits.ptr<T>() + b * ls;
      const float temp = a.temperature.ptr<float>()[b];
      const int64_t k = a.top_k.ptr<int32_t>()[b];
      const uint64_t seed = uint64_t(a.seed.ptr<int64_t>()[b]), step = uint64_t(a.step.ptr<int64_t>()[b]);
      int64_t best = 0;
      if (!(temp > 0.f)) {  // greedy (NaN temperature counts as greedy)
        float bv = to_float(row[0]);
        for (int64_t i = 1; i < V; ++i) {
          const float v = to_float(row[i]);
          if (better(v, i, bv, best)) bv = v, best = i;
        }
      } else if (k == 2 && V > 2 && top2(row, V, best2)) {
        // The same two candidates the general path below keeps, in the same order, so the draw is the same.
        float bv = -INFINITY;
        best = best2[0];
        for (int64_t i : best2) {
          const float v = to_float(row[i]) / temp + gumbel(seed, step, uint64_t(i));
          if (better(v, i, bv, best)) bv = v, best = i;
        }
      } else if (k > 0 && k < V) {
        // k largest (ties -> smaller index), kept sorted in a small array: k is 2 for the TTS.
        cand.clear();
        for (int64_t i = 0; i < V; ++i) {
          const float v = to_float(row[i]);
          if (int64_t(cand.size()) == k && !better(v, i, to_float(row[cand.back()]), cand.back())) continue;
          auto pos = std::upper_bound(cand.begin(), cand.end(), i, [&](int64_t x, int64_t y) {
            return better(to_float(row[x]), x, to_float(row[y]), y);
          });
          cand.insert(pos, i);
          if (int64_t(cand.size()) > k) cand.pop_back();
        }
        float bv = -INFINITY;
        best = cand[0];
        for (int64_t i : cand) {
          const float v = to_float(row[i]) / temp + gumbel(seed, step, uint64_t(i));
          if (better(v, i, bv, best)) bv = v, best = i;
        }
      } else if ((best = sample_full_bounded(row, V, temp, seed, step)) < 0) {
        float bv = -INFINITY;
        best = 0;
        for (int64_t i = 0; i < V; ++i) {
          const float v = to_float(row[i]) / temp + gumbel(seed, step, uint64_t(i));
          if (better(v, i, bv, best)) bv = v, best = i;
        }
      }
      a.out.ptr<int64_t>()[b * a.out.stride(0)] = best;
    }
  });
}

}  // namespace

void sample_tokens(const SampleArgs& a) {
  dispatch_float(a.logits.dtype, "sample_tokens", "logits", [&](auto d) { sample_impl<typename CpuType<decltype(d)::value>::type>(a); });
}

}  // namespace vita::cpu

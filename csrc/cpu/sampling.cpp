#include <algorithm>
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

template <class T>
void sample_impl(const SampleArgs& a) {
  const int64_t B = a.logits.size(0), V = a.logits.size(1), ls = a.logits.stride(0);
  parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cand;
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
      } else {
        float bv = -INFINITY;
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

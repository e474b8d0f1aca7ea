#include <cmath>
#include <vector>

#include "vec.h"
#include "vita/kernels/elementwise.h"
#include "vita/parallel.h"

namespace vita::cpu {
namespace {

template <class T>
void silu_mul_impl(const SiluMulArgs& a) {
  const int64_t N = a.out.size(-1);
  const int64_t rows = a.out.numel() / (N ? N : 1);
  const int64_t sx = a.x.ndim >= 2 ? a.x.stride(-2) : 0, so = a.out.ndim >= 2 ? a.out.stride(-2) : 0;
  parallel_for(rows, std::max<int64_t>(1, 16384 / (N + 1)), [&](int64_t b, int64_t e) {
    std::vector<float> g(N), u(N);
    for (int64_t r = b; r < e; ++r) {
      const T* x = a.x.ptr<T>() + r * sx;
      load_row(x, g.data(), N);
      load_row(x + N, u.data(), N);
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) g[i] = g[i] / (1.0f + exp_vec(-g[i])) * u[i];
      store_row(g.data(), a.out.ptr<T>() + r * so, N);
    }
  });
}

}  // namespace

void silu_and_mul(const SiluMulArgs& a) {
  dispatch_float(a.x.dtype, "silu_and_mul", "x", [&](auto d) { silu_mul_impl<typename CpuType<decltype(d)::value>::type>(a); });
}

}  // namespace vita::cpu

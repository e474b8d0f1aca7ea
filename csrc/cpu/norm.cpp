#include <cmath>
#include <vector>

#include "vec.h"
#include "vita/kernels/elementwise.h"
#include "vita/parallel.h"

namespace vita::cpu {
namespace {

template <class T>
void rms_norm_impl(const RmsNormArgs& a) {
  const int64_t H = a.x.size(-1);
  const int64_t rows = a.x.numel() / (H ? H : 1);
  const auto row_stride = [](const TensorRef& t) { return t.ndim >= 2 ? t.stride(-2) : int64_t(0); };
  const int64_t sx = row_stride(a.x), so = row_stride(a.out);
  const int64_t sr = a.fused_add ? row_stride(a.residual) : 0, sro = a.fused_add ? row_stride(a.residual_out) : 0;
  const T* X = a.x.ptr<T>();
  const T* R = a.fused_add ? a.residual.ptr<T>() : nullptr;
  T* O = a.out.ptr<T>();
  T* RO = a.fused_add ? a.residual_out.ptr<T>() : nullptr;
  std::vector<float> wf(H);
  load_row(a.weight.ptr<T>(), wf.data(), H);
  parallel_for(rows, std::max<int64_t>(1, 16384 / (H + 1)), [&](int64_t b, int64_t e) {
    std::vector<float> buf(H), tmp(a.fused_add ? H : 0);
    for (int64_t r = b; r < e; ++r) {
      load_row(X + r * sx, buf.data(), H);
      if (a.fused_add) {
        load_row(R + r * sr, tmp.data(), H);
        for (int64_t i = 0; i < H; ++i) buf[i] += tmp[i];
        round_row<T>(buf.data(), H);  // the residual stream lives in the storage dtype
        store_row(buf.data(), RO + r * sro, H);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += buf[i] * buf[i];
      const float inv = 1.0f / std::sqrt(ss / float(H) + a.eps);
      for (int64_t i = 0; i < H; ++i) buf[i] *= inv;
      round_row<T>(buf.data(), H);
      for (int64_t i = 0; i < H; ++i) buf[i] *= wf[i];
      store_row(buf.data(), O + r * so, H);
    }
  });
}

}  // namespace

void rms_norm(const RmsNormArgs& a) {
  dispatch_float(a.x.dtype, "rms_norm", "x", [&](auto d) { rms_norm_impl<typename CpuType<decltype(d)::value>::type>(a); });
}

}  // namespace vita::cpu

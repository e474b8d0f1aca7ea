#include <cmath>
#include <vector>

#include "vec.h"
#include "vita/kernels/elementwise.h"
#include "vita/parallel.h"

namespace vita::cpu {
namespace {

// One head row: NeoX layout rotates (x[i], x[i + rd/2]) pairs; channels past rotary_dim pass through.
template <class T>
inline void rotate(const T* src, T* dst, const float* cs, const float* sn, int half, int D, float* buf) {
  load_row(src, buf, D);
  for (int i = 0; i < half; ++i) {
    float x1 = buf[i], x2 = buf[i + half];
    // q*cos + rotate_half(q)*sin with cos/sin rounded to the dtype, as the HF reference does
    buf[i] = x1 * cs[i] - x2 * sn[i];
    buf[i + half] = x2 * cs[i] + x1 * sn[i];
  }
  store_row(buf, dst, D);
}

template <class T, class I>
void rope_impl(const RopeArgs& a) {
  const int64_t T_ = a.q.size(0);
  const int Hq = int(a.q.size(1)), Hk = int(a.k.size(1)), D = int(a.q.size(2));
  const int rd = a.rotary_dim, half = rd / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i)  // float32 like HF: 1 / theta ** (arange(0, rd, 2).float() / rd)
    inv_freq[i] = 1.0f / float(std::pow(double(a.theta), double(float(2 * i) / float(rd))));
  const I* pos = a.positions.ptr<I>();
  const int64_t pst = a.positions.stride(0);
  parallel_for(T_, std::max<int64_t>(1, 256 / (Hq + Hk)), [&](int64_t b, int64_t e) {
    std::vector<float> cs(half), sn(half), buf(D);
    for (int64_t t = b; t < e; ++t) {
      const float p = float(pos[t * pst]);
      for (int i = 0; i < half; ++i) {
        const float ang = p * inv_freq[i];
        cs[i] = to_float(from_float<T>(std::cos(ang)));
        sn[i] = to_float(from_float<T>(std::sin(ang)));
      }
      for (int h = 0; h < Hq; ++h)
        rotate(a.q.ptr<T>() + t * a.q.stride(0) + h * a.q.stride(1), a.q_out.ptr<T>() + t * a.q_out.stride(0) + h * a.q_out.stride(1),
               cs.data(), sn.data(), half, D, buf.data());
      for (int h = 0; h < Hk; ++h)
        rotate(a.k.ptr<T>() + t * a.k.stride(0) + h * a.k.stride(1), a.k_out.ptr<T>() + t * a.k_out.stride(0) + h * a.k_out.stride(1),
               cs.data(), sn.data(), half, D, buf.data());
    }
  });
}

}  // namespace

void rotary_embedding(const RopeArgs& a) {
  dispatch_float(a.q.dtype, "rotary_embedding", "q", [&](auto d) {
    using T = typename CpuType<decltype(d)::value>::type;
    dispatch_index(a.positions.dtype, "rotary_embedding", "positions", [&](auto i) { rope_impl<T, decltype(i)>(a); });
  });
}

}  // namespace vita::cpu

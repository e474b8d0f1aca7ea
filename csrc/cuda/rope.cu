#include "common.cuh"
#include "vita/kernels/elementwise.h"

namespace vita::cuda {
namespace {

// One block per token; threads stride over (head, pair). cos/sin are computed in float32 from a
// float32 angle and rounded to the storage dtype, matching the HF reference.
template <class T, class I>
__global__ void rope_kernel(const T* q, int64_t sqt, int64_t sqh, const T* k, int64_t skt, int64_t skh, T* qo, int64_t sqot,
                            int64_t sqoh, T* ko, int64_t skot, int64_t skoh, const I* pos, int64_t sp, int Hq, int Hk, int half,
                            double theta, int rd) {
  const int64_t t = blockIdx.x;
  const float p = float(pos[t * sp]);
  const int total = (Hq + Hk) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int h = idx / half, i = idx % half;
    // float32 frequency and angle exactly as the HF reference; cos/sin in double because the
    // module is built with --use_fast_math, whose sincosf is inaccurate for angles of ~1e4 rad.
    // 1 / fl(theta ** fl(2i / rd)) with IEEE division (fast-math would approximate it), as torch.
    const float inv_freq = __fdiv_rn(1.0f, float(pow(theta, double(__fdiv_rn(float(2 * i), float(rd))))));
    double sd, cd;
    sincos(double(p * inv_freq), &sd, &cd);
    const float c = round_to<T>(float(cd));
    const float s = round_to<T>(float(sd));
    const T* src;
    T* dst;
    if (h < Hq) {
      src = q + t * sqt + h * sqh;
      dst = qo + t * sqot + h * sqoh;
    } else {
      src = k + t * skt + (h - Hq) * skh;
      dst = ko + t * skot + (h - Hq) * skoh;
    }
    const float x1 = to_f(src[i]), x2 = to_f(src[i + half]);
    dst[i] = from_f<T>(x1 * c - x2 * s);
    dst[i + half] = from_f<T>(x2 * c + x1 * s);
  }
}

// Channels beyond rotary_dim pass through when writing out of place.
template <class T>
__global__ void copy_tail_kernel(const T* src, int64_t st, int64_t sh, T* dst, int64_t dt, int64_t dh, int H, int rd, int D) {
  const int64_t t = blockIdx.x;
  const int w = D - rd;
  for (int idx = threadIdx.x; idx < H * w; idx += blockDim.x) {
    const int h = idx / w, i = rd + idx % w;
    dst[t * dt + h * dh + i] = src[t * st + h * sh + i];
  }
}

}  // namespace

void rotary_embedding(const RopeArgs& a, int64_t stream) {
  const int64_t T_ = a.q.size(0);
  if (T_ == 0) return;
  const int Hq = int(a.q.size(1)), Hk = int(a.k.size(1)), D = int(a.q.size(2)), rd = a.rotary_dim;
  auto s = as_stream(stream);
  dispatch_cuda_float(a.q.dtype, "rotary_embedding", "q", [&](auto tag) {
    using T = decltype(tag);
    dispatch_index(a.positions.dtype, "rotary_embedding", "positions", [&](auto itag) {
      using I = decltype(itag);
      rope_kernel<T, I><<<unsigned(T_), 128, 0, s>>>(a.q.ptr<T>(), a.q.stride(0), a.q.stride(1), a.k.ptr<T>(), a.k.stride(0), a.k.stride(1),
                                                     a.q_out.ptr<T>(), a.q_out.stride(0), a.q_out.stride(1), a.k_out.ptr<T>(),
                                                     a.k_out.stride(0), a.k_out.stride(1), a.positions.ptr<I>(), a.positions.stride(0),
                                                     Hq, Hk, rd / 2, double(a.theta), rd);
    });
    if (rd < D) {
      if (a.q_out.data != a.q.data)
        copy_tail_kernel<T><<<unsigned(T_), 128, 0, s>>>(a.q.ptr<T>(), a.q.stride(0), a.q.stride(1), a.q_out.ptr<T>(), a.q_out.stride(0),
                                                         a.q_out.stride(1), Hq, rd, D);
      if (a.k_out.data != a.k.data)
        copy_tail_kernel<T><<<unsigned(T_), 128, 0, s>>>(a.k.ptr<T>(), a.k.stride(0), a.k.stride(1), a.k_out.ptr<T>(), a.k_out.stride(0),
                                                         a.k_out.stride(1), Hk, rd, D);
    }
  });
  check_launch("rotary_embedding");
}

}  // namespace vita::cuda

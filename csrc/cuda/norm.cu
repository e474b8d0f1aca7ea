#include "common.cuh"
#include "vita/kernels/elementwise.h"

namespace vita::cuda {
namespace {

// One block per row. The row is read once into shared memory (as float) so the normalise pass
// does not re-read global memory; rows up to 16K channels fit (64 KB dynamic smem).
template <class T, bool kAdd>
__global__ void rms_norm_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ res, int64_t sr, const T* __restrict__ w,
                                T* out, int64_t so, T* res_out, int64_t sro, int H, float eps) {
  extern __shared__ float row[];
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * sx;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v = to_f(xr[i]);
    if constexpr (kAdd) {
      v = round_to<T>(v + to_f(res[r * sr + i]));
      res_out[r * sro + i] = from_f<T>(v);
    }
    row[i] = v;
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / float(H) + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) out[r * so + i] = from_f<T>(round_to<T>(row[i] * inv) * to_f(w[i]));
}

}  // namespace

void rms_norm(const RmsNormArgs& a, int64_t stream) {
  const int H = int(a.x.size(-1));
  const int64_t rows = a.x.numel() / (H ? H : 1);
  if (rows == 0 || H == 0) return;
  if (H > 16384) throw ValueError("rms_norm: hidden size " + std::to_string(H) + " exceeds the CUDA kernel's 16384 limit");
  const auto rs = [](const TensorRef& t) { return t.ndim >= 2 ? t.stride(-2) : int64_t(0); };
  const int threads = H >= 4096 ? 1024 : H >= 1024 ? 512 : 128;
  const size_t smem = size_t(H) * sizeof(float);
  dispatch_cuda_float(a.x.dtype, "rms_norm", "x", [&](auto tag) {
    using T = decltype(tag);
    auto* k = a.fused_add ? rms_norm_kernel<T, true> : rms_norm_kernel<T, false>;
    if (smem > 48 * 1024) VITA_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    k<<<unsigned(rows), threads, smem, as_stream(stream)>>>(
        a.x.ptr<T>(), rs(a.x), a.fused_add ? a.residual.ptr<T>() : nullptr, a.fused_add ? rs(a.residual) : 0, a.weight.ptr<T>(),
        a.out.ptr<T>(), rs(a.out), a.fused_add ? a.residual_out.ptr<T>() : nullptr, a.fused_add ? rs(a.residual_out) : 0, H, a.eps);
  });
  check_launch("rms_norm");
}

}  // namespace vita::cuda

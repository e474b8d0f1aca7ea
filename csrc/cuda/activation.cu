#include "common.cuh"
#include "vita/kernels/elementwise.h"

namespace vita::cuda {
namespace {

template <class T>
__global__ void silu_mul_kernel(const T* __restrict__ x, int64_t sx, T* __restrict__ out, int64_t so, int N) {
  const int64_t r = blockIdx.y;
  const T* xr = x + r * sx;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < N; i += gridDim.x * blockDim.x) {
    const float g = to_f(xr[i]), u = to_f(xr[i + N]);
    out[r * so + i] = from_f<T>(g / (1.0f + __expf(-g)) * u);
  }
}

}  // namespace

void silu_and_mul(const SiluMulArgs& a, int64_t stream) {
  const int N = int(a.out.size(-1));
  const int64_t rows = a.out.numel() / (N ? N : 1);
  if (rows == 0 || N == 0) return;
  if (rows > 65535) throw ValueError("silu_and_mul: more than 65535 rows is not supported on CUDA; got " + std::to_string(rows));
  const int threads = 256;
  dim3 grid(unsigned(std::min<int64_t>(ceil_div(N, threads), 64)), unsigned(rows));
  dispatch_cuda_float(a.x.dtype, "silu_and_mul", "x", [&](auto tag) {
    using T = decltype(tag);
    silu_mul_kernel<T><<<grid, threads, 0, as_stream(stream)>>>(a.x.ptr<T>(), a.x.ndim >= 2 ? a.x.stride(-2) : 0, a.out.ptr<T>(),
                                                               a.out.ndim >= 2 ? a.out.stride(-2) : 0, N);
  });
  check_launch("silu_and_mul");
}

}  // namespace vita::cuda

// Shared CUDA helpers: error checks, dtype mapping and float conversion for the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "vita/dtype.h"
#include "vita/tensor.h"

#define VITA_CUDA_CHECK(expr)                                                                              \
  do {                                                                                                     \
    cudaError_t err__ = (expr);                                                                            \
    if (err__ != cudaSuccess)                                                                              \
      throw ::vita::RuntimeError(std::string("CUDA error: ") + cudaGetErrorString(err__) + " at " #expr); \
  } while (0)

namespace vita::cuda {

inline void check_launch(const char* op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw RuntimeError(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(e));
}

inline cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <DType D>
struct CudaType;
template <>
struct CudaType<DType::kFloat32> {
  using type = float;
};
template <>
struct CudaType<DType::kFloat16> {
  using type = __half;
};
template <>
struct CudaType<DType::kBFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <class T>
__device__ __forceinline__ float round_to(float x) {
  return to_f(from_f<T>(x));
}

template <class F>
decltype(auto) dispatch_cuda_float(DType d, const char* op, const char* arg, F&& f) {
  return dispatch_float(d, op, arg, [&](auto tag) { return f(typename CudaType<decltype(tag)::value>::type{}); });
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; `shared` must hold 32 floats. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < nwarps ? shared[lane] : 0.f;
  return warp_sum(v);
}

}  // namespace vita::cuda

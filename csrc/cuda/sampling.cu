#include <cfloat>

#include "common.cuh"
#include "vita/kernels/sampling.h"
#include "vita/philox.h"

namespace vita::cuda {
namespace {

struct Cand {
  float v;
  int64_t i;
};
__device__ __forceinline__ bool better(const Cand& a, const Cand& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }
__device__ __forceinline__ Cand pick(const Cand& a, const Cand& b) { return better(a, b) ? a : b; }

template <int kThreads>
__device__ Cand block_best(Cand c, Cand* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Cand other{__shfl_xor_sync(0xffffffffu, c.v, o), __shfl_xor_sync(0xffffffffu, c.i, o)};
    c = pick(c, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = c;
  __syncthreads();
  if (warp == 0) {
    c = lane < kThreads / 32 ? red[lane] : Cand{-FLT_MAX, INT64_MAX};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      Cand other{__shfl_xor_sync(0xffffffffu, c.v, o), __shfl_xor_sync(0xffffffffu, c.i, o)};
      c = pick(c, other);
    }
    if (lane == 0) red[0] = c;
  }
  __syncthreads();
  return red[0];
}

__device__ __forceinline__ float gumbel(uint64_t seed, uint64_t step, uint64_t idx) {
  // precise logf: the draw should match the CPU kernel's up to rounding
  return -logf(-logf(philox_uniform(seed, step, idx)));
}

// One block per row. Top-k (k small: 2 for the TTS) by k rounds of block argmax that skip the
// already-chosen ids; then Gumbel-max among them. k = 0 / greedy: a single pass.
template <class T, int kThreads>
__global__ void sample_kernel(const T* logits, int64_t ls, int64_t V, int64_t* out, int64_t os, const float* temperature,
                              const int* top_k, const int64_t* seed, const int64_t* step) {
  __shared__ Cand red[32];
  __shared__ int64_t chosen[kMaxTopKCuda];
  const int64_t b = blockIdx.x;
  const T* row = logits + b * ls;
  const float temp = temperature[b];
  const int64_t k = min(int64_t(top_k[b]), int64_t(kMaxTopKCuda));
  const uint64_t sd = uint64_t(seed[b]), st = uint64_t(step[b]);
  Cand c{-FLT_MAX, INT64_MAX};
  if (!(temp > 0.f)) {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) c = pick(c, Cand{to_f(row[i]), i});
    c = block_best<kThreads>(c, red);
  } else if (k > 0 && k < V) {
    for (int r = 0; r < k; ++r) {
      c = Cand{-FLT_MAX, INT64_MAX};
      for (int64_t i = threadIdx.x; i < V; i += kThreads) {
        bool taken = false;
        for (int j = 0; j < r; ++j) taken |= chosen[j] == i;
        if (!taken) c = pick(c, Cand{to_f(row[i]), i});
      }
      c = block_best<kThreads>(c, red);
      if (threadIdx.x == 0) chosen[r] = c.i;
      __syncthreads();
    }
    c = Cand{-FLT_MAX, INT64_MAX};
    for (int j = threadIdx.x; j < k; j += kThreads) {
      const int64_t i = chosen[j];
      c = pick(c, Cand{to_f(row[i]) / temp + gumbel(sd, st, uint64_t(i)), i});
    }
    c = block_best<kThreads>(c, red);
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) c = pick(c, Cand{to_f(row[i]) / temp + gumbel(sd, st, uint64_t(i)), i});
    c = block_best<kThreads>(c, red);
  }
  if (threadIdx.x == 0) out[b * os] = c.i;
}

}  // namespace

void sample_tokens(const SampleArgs& a, int64_t stream) {
  const int64_t B = a.logits.size(0);
  if (B == 0) return;
  constexpr int kThreads = 512;
  dispatch_cuda_float(a.logits.dtype, "sample_tokens", "logits", [&](auto tag) {
    using T = decltype(tag);
    sample_kernel<T, kThreads><<<unsigned(B), kThreads, 0, as_stream(stream)>>>(
        a.logits.ptr<T>(), a.logits.stride(0), a.logits.size(1), a.out.ptr<int64_t>(), a.out.stride(0), a.temperature.ptr<float>(),
        a.top_k.ptr<int>(), a.seed.ptr<int64_t>(), a.step.ptr<int64_t>());
  });
  check_launch("sample_tokens");
}

}  // namespace vita::cuda

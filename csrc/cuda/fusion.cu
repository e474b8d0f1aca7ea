#include "common.cuh"
#include "vita/kernels/elementwise.h"

namespace vita::cuda {
namespace {

// Single block: prefix-count the placeholder rows so each one knows which mm row it takes,
// and record [placeholders, first bad id index + 1] for the host-side check.
template <class I>
__global__ void fuse_scan_kernel(const I* ids, int64_t sid, int T, int64_t V, int* src, int* status) {
  __shared__ int warp_tot[32];
  __shared__ int carry;
  __shared__ int bad;
  if (threadIdx.x == 0) {
    carry = 0;
    bad = 0;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int base = 0; base < T; base += blockDim.x) {
    const int t = base + threadIdx.x;
    int64_t id = t < T ? int64_t(ids[t * sid]) : 0;
    if (t < T && id >= V) {
      // keep the smallest bad index (+1 so 0 means none)
      int cur = bad;
      while ((cur == 0 || cur > t + 1) && atomicCAS(&bad, cur, t + 1) != cur) cur = bad;
    }
    const int flag = (t < T && id < 0) ? 1 : 0;
    int incl = flag;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int w = lane < int(blockDim.x >> 5) ? warp_tot[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += v;
      }
      warp_tot[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const int before = carry + (warp ? warp_tot[warp - 1] : 0) + incl - flag;
    if (t < T) src[t] = flag ? -1 - before : int(id);
    __syncthreads();
    if (threadIdx.x == 0) carry += warp_tot[(blockDim.x >> 5) - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    status[0] = carry;
    status[1] = bad;
  }
}

// Rows are copied in 16-byte words when alignment allows; the gather is pure bandwidth.
template <class W>
__global__ void fuse_gather_kernel(const int* src, const char* embed, int64_t se, const char* mm, int64_t sm, char* out, int64_t so,
                                   int words) {
  const int64_t t = blockIdx.x;
  const int s = src[t];
  const W* from = reinterpret_cast<const W*>(s >= 0 ? embed + int64_t(s) * se : mm + int64_t(-1 - s) * sm);
  W* to = reinterpret_cast<W*>(out + t * so);
  for (int i = threadIdx.x; i < words; i += blockDim.x) to[i] = from[i];
}

}  // namespace

void fuse_embeddings(const FuseArgs& a, int64_t stream) {
  const int64_t T = a.ids.size(0);
  if (T == 0) return;
  if (T > (int64_t(1) << 30)) throw ValueError("fuse_embeddings: too many tokens");
  auto s = as_stream(stream);
  int* scratch = a.scratch.ptr<int>();
  int* status = scratch + T;
  dispatch_index(a.ids.dtype, "fuse_embeddings", "input_ids", [&](auto itag) {
    using I = decltype(itag);
    fuse_scan_kernel<I><<<1, 1024, 0, s>>>(a.ids.ptr<I>(), a.ids.stride(0), int(T), a.embed.size(0), scratch, status);
  });
  check_launch("fuse_embeddings");
  int host[2];
  VITA_CUDA_CHECK(cudaMemcpyAsync(host, status, sizeof(host), cudaMemcpyDeviceToHost, s));
  VITA_CUDA_CHECK(cudaStreamSynchronize(s));
  const int64_t M = a.mm.ndim < 0 ? 0 : a.mm.size(0);
  if (host[1])
    throw ValueError("fuse_embeddings: input_ids[" + std::to_string(host[1] - 1) + "] is out of range for embed_weight with " +
                     std::to_string(a.embed.size(0)) + " rows");
  if (host[0] != M)
    throw ValueError("fuse_embeddings: input_ids has " + std::to_string(host[0]) +
                     " multimodal placeholder rows (id < 0) but mm_features has " + std::to_string(M) + " rows");
  const int64_t es = dtype_size(a.out.dtype), bytes = a.out.size(1) * es;
  const int64_t se = a.embed.stride(0) * es, sm = M ? a.mm.stride(0) * es : 0, so = a.out.stride(0) * es;
  const char* E = static_cast<const char*>(a.embed.data);
  const char* F = M ? static_cast<const char*>(a.mm.data) : E;
  char* O = static_cast<char*>(a.out.data);
  auto aligned = [&](int64_t v) { return v % 16 == 0; };
  const bool wide = aligned(bytes) && aligned(se) && aligned(sm) && aligned(so) && aligned(reinterpret_cast<uintptr_t>(E)) &&
                    aligned(reinterpret_cast<uintptr_t>(F)) && aligned(reinterpret_cast<uintptr_t>(O));
  if (wide)
    fuse_gather_kernel<int4><<<unsigned(T), 128, 0, s>>>(scratch, E, se, F, sm, O, so, int(bytes / 16));
  else
    fuse_gather_kernel<char><<<unsigned(T), 256, 0, s>>>(scratch, E, se, F, sm, O, so, int(bytes));
  check_launch("fuse_embeddings");
}

}  // namespace vita::cuda

// What the CUDA attention kernels share (attention_decode.cu: SIMT decode + merge; attention_prefill.cu:
// tensor-core prefill / decode): where the tensors are (AttnLayout, filled once for the paged and the
// contiguous-varlen layouts), the cp.async wrappers, and the small host helpers of the launchers.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "vita/kernels/attention.h"

namespace vita::cuda {

// Tensor addresses and strides (elements) of one launch. Paged: k/v are [blocks, block_size, Hkv, D]
// (sk_b, sk_o, sk_h = block, in-block offset, head); contiguous varlen: k/v are [T, Hkv, D] with
// sk_b = 0 and sk_o = the token stride. Each kernel family's parameter struct derives from it.
struct AttnLayout {
  const void* q;
  int64_t sq_t, sq_h;
  void* out;
  int64_t so_t, so_h;
  const void* k;
  const void* v;
  int64_t sk_b, sk_o, sk_h;
  int64_t sv_b, sv_o, sv_h;
  const int* block_table;
  int64_t sbt_b, sbt_i;
  int block_size;
  int bs_shift;  // log2(block_size) when it is a power of two, else -1
  const int* kv_lens;  // paged only
  int64_t skv;
  const int* cu_q;
  int64_t scu;
  const void* bias;  // varlen key_bias [Hq, T] or nullptr
  int64_t sb_h, sb_t;
  bool bias_f32;  // key_bias stored as float32 (otherwise the dtype of q)
};

// log2(n) when n is a power of two, else -1 (page lookups use a shift instead of a division).
inline int pow2_shift(int n) {
  if (n <= 0 || (n & (n - 1))) return -1;
  int s = 0;
  while ((1 << s) < n) ++s;
  return s;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline void set_paged_layout(AttnLayout& p, const PagedAttentionArgs& a) {
  p.q = a.q.data;
  p.sq_t = a.q.stride(0), p.sq_h = a.q.stride(1);
  p.out = a.out.data;
  p.so_t = a.out.stride(0), p.so_h = a.out.stride(1);
  p.k = a.k_cache.data;
  p.v = a.v_cache.data;
  p.sk_b = a.k_cache.stride(0), p.sk_o = a.k_cache.stride(1), p.sk_h = a.k_cache.stride(2);
  p.sv_b = a.v_cache.stride(0), p.sv_o = a.v_cache.stride(1), p.sv_h = a.v_cache.stride(2);
  p.block_table = a.block_table.ptr<int>();
  p.sbt_b = a.block_table.stride(0);
  p.sbt_i = a.block_table.ndim > 1 ? a.block_table.stride(1) : 1;
  p.block_size = int(a.k_cache.size(1));
  p.bs_shift = pow2_shift(p.block_size);
  p.kv_lens = a.kv_lens.ptr<int>();
  p.skv = a.kv_lens.stride(0);
  p.cu_q = a.cu_q_lens.ptr<int>();
  p.scu = a.cu_q_lens.stride(0);
  p.bias = nullptr;
}

inline void set_varlen_layout(AttnLayout& p, const VarlenAttentionArgs& a) {
  const bool has_bias = a.key_bias.ndim >= 0 && a.key_bias.data != nullptr;
  p.q = a.q.data;
  p.sq_t = a.q.stride(0), p.sq_h = a.q.stride(1);
  p.out = a.out.data;
  p.so_t = a.out.stride(0), p.so_h = a.out.stride(1);
  p.k = a.k.data;
  p.v = a.v.data;
  p.sk_b = 0, p.sk_o = a.k.stride(0), p.sk_h = a.k.stride(1);
  p.sv_b = 0, p.sv_o = a.v.stride(0), p.sv_h = a.v.stride(1);
  p.block_table = nullptr;
  p.block_size = 1;
  p.bs_shift = 0;
  p.kv_lens = nullptr;
  p.cu_q = a.cu_seqlens.ptr<int>();
  p.scu = a.cu_seqlens.stride(0);
  p.bias = has_bias ? a.key_bias.data : nullptr;
  p.sb_h = has_bias ? a.key_bias.stride(0) : 0;
  p.sb_t = has_bias ? a.key_bias.stride(1) : 0;
  p.bias_f32 = has_bias && a.key_bias.dtype == DType::kFloat32;
}

// Key range [kbeg, kend) of split `split` of num_splits over kv_len keys, in whole tiles of `tile`
// keys so that split boundaries align with the key tiles (empty when the split starts past the end).
__device__ __forceinline__ void split_key_range(int kv_len, int num_splits, int split, int tile, int& kbeg, int& kend) {
  kbeg = 0, kend = 0;
  if (kv_len > 0) {
    const int per = (kv_len + num_splits - 1) / num_splits;
    const int chunk = (per + tile - 1) / tile * tile;
    kbeg = min(split * chunk, kv_len);
    kend = min(kbeg + chunk, kv_len);
  }
}

// 16-byte global -> shared copy, zero-filled when !ok (the source is then not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = ok ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace vita::cuda

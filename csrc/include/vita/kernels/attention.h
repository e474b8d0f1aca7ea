// Attention over a paged KV cache (chunked prefill, batched decode, cross-turn continuation),
// the KV-cache write, and encoder (varlen) attention. Semantics: DESIGN.md §4 and
// python/vita_engine/ops/reference.py. Arguments are validated in csrc/bind/attention.cpp.
#pragma once

#include <cstdint>

#include "vita/tensor.h"

namespace vita {

// k, v: [T, Hkv, D]; caches: [num_blocks, block_size, Hkv, D] (same dtype as k);
// slot_mapping: int32/int64 [T], slot = block * block_size + offset, -1 skips the row.
struct StoreKvArgs {
  TensorRef k, v, k_cache, v_cache, slot_mapping;
};

// q, out: [T, Hq, D] packed over B sequences; block_table int32 [B, max_blocks];
// kv_lens int32 [B] (cached length including this step's tokens); cu_q_lens int32 [B+1].
// Causal is bottom-right aligned: query j of a sequence sees keys < kv_len - q_len + j + 1.
struct PagedAttentionArgs {
  TensorRef q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, out;
  TensorRef workspace;  // float32 scratch for split-KV partials (CUDA); ndim == -1 when absent
  float scale = 1.f;
  bool causal = true;
  int max_q_len = 0;   // host-known upper bound on q_len over the batch (sizes CUDA grids)
  int num_splits = 1;  // split-KV partitions per (sequence, kv head), chosen by the plan
};

// q: [T, Hq, D], k/v: [T, Hkv, D] contiguous packed sequences; cu_seqlens int32 [B+1];
// key_bias: [Hq, T] added to every score of that key (ndim == -1 when absent).
struct VarlenAttentionArgs {
  TensorRef q, k, v, cu_seqlens, key_bias, out;
  float scale = 1.f;
  bool causal = false;
  int max_seqlen = 0;  // host-known upper bound on sequence length
};

// Floats of workspace the CUDA paged kernel needs for this layout (0 when num_splits == 1).
inline int64_t paged_attention_workspace_floats(int64_t total_q, int64_t num_q_heads, int64_t head_dim, int num_splits) {
  return num_splits <= 1 ? 0 : total_q * num_q_heads * int64_t(num_splits) * (head_dim + 2);
}

namespace cpu {
void store_kv(const StoreKvArgs& a);
void paged_attention(const PagedAttentionArgs& a);
void varlen_attention(const VarlenAttentionArgs& a);
}  // namespace cpu

namespace cuda {
void store_kv(const StoreKvArgs& a, int64_t stream);
void paged_attention(const PagedAttentionArgs& a, int64_t stream);
void varlen_attention(const VarlenAttentionArgs& a, int64_t stream);
// Split-KV partition count for a layout: enough (sequence, kv head, split) blocks to fill the GPU.
int paged_attention_num_splits(int64_t batch, int64_t num_kv_heads, int64_t max_kv_len, int max_q_len, int device);
}  // namespace cuda

}  // namespace vita

// Row-wise fused ops: RMSNorm, fused residual-add + RMSNorm, rotary embedding, SiLU-and-mul,
// and the cross-modal embedding fusion. Arguments are validated by the caller (csrc/bind).
#pragma once

#include <cstdint>

#include "vita/tensor.h"

namespace vita {

// x, out: [rows, hidden] (rows may be strided, last dim dense); w: [hidden].
// out = round(round(x * rsqrt(mean(x^2) + eps)) * w)   (the Qwen2RMSNorm rounding order)
struct RmsNormArgs {
  TensorRef x, residual, weight, out, residual_out;  // residual/residual_out only for the fused add
  float eps;
  bool fused_add;
};

// q: [T, Hq, D], k: [T, Hkv, D] (last dim dense, others any stride), positions [T].
// NeoX rotation of the first rotary_dim channels; q_out/k_out may alias q/k.
struct RopeArgs {
  TensorRef q, k, positions, q_out, k_out;
  float theta;
  int rotary_dim;
};

// x: [rows, 2N] gate|up -> out [rows, N].
struct SiluMulArgs {
  TensorRef x, out;
};

// ids [T]; embed [V, H]; mm [M, H] (ndim == -1 when absent); out [T, H];
// mm_index: scratch int32 [T] on the device of out (CUDA only).
struct FuseArgs {
  TensorRef ids, embed, mm, out, scratch;
};

namespace cpu {
void rms_norm(const RmsNormArgs& a);
void rotary_embedding(const RopeArgs& a);
void silu_and_mul(const SiluMulArgs& a);
void fuse_embeddings(const FuseArgs& a);
}  // namespace cpu

namespace cuda {
void rms_norm(const RmsNormArgs& a, int64_t stream);
void rotary_embedding(const RopeArgs& a, int64_t stream);
void silu_and_mul(const SiluMulArgs& a, int64_t stream);
// Validates counts and id range on the device, then synchronizes the stream to report errors
// (fusion runs once per prefill, never inside a captured decode step).
void fuse_embeddings(const FuseArgs& a, int64_t stream);
}  // namespace cuda

}  // namespace vita

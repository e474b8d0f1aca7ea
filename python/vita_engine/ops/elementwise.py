"""Row-wise fused ops on torch tensors: norms, RoPE, SiLU-and-mul, cross-modal embedding fusion.

Each public function calls `_C` directly in eager mode (lean: a few microseconds of Python), and
goes through a `torch.library` custom op while `torch.compile` traces, so compiled graphs and
CUDA graphs see an opaque op with a fake (meta) implementation.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._lib import _C, dl, dl_opt, is_compiling, stream_of

__all__ = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "fuse_embeddings"]

Tensor = torch.Tensor


def _dense(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


# ---- eager implementations ---------------------------------------------------------------------

def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x = _dense(x)
    out = torch.empty_like(x)
    _C.rms_norm(dl(x), dl(weight), dl(out), eps, stream_of(x))
    return out


def _fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    x = _dense(x)
    residual = _dense(residual)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    _C.fused_add_rms_norm(dl(x), dl(residual), dl(weight), dl(out), dl(res_out), eps, stream_of(x))
    return out, res_out


def _rope(q: Tensor, k: Tensor, positions: Tensor, theta: float, rotary_dim: int) -> Tuple[Tensor, Tensor]:
    qo = torch.empty_like(q)
    ko = torch.empty_like(k)
    _C.rotary_embedding(dl(q), dl(k), dl(positions), dl(qo), dl(ko), theta, rotary_dim, stream_of(q))
    return qo, ko


def _silu_and_mul(x: Tensor) -> Tensor:
    x = _dense(x)
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    _C.silu_and_mul(dl(x), dl(out), stream_of(x))
    return out


def _fuse(input_ids: Tensor, embed_weight: Tensor, mm_features: Optional[Tensor]) -> Tensor:
    if input_ids.device != embed_weight.device:
        raise TypeError(f"fuse_embeddings: input_ids must be on the device of embed_weight ({embed_weight.device}), got {input_ids.device}")
    out = embed_weight.new_empty(input_ids.shape[0], embed_weight.shape[-1]) if input_ids.dim() == 1 and embed_weight.dim() == 2 else embed_weight.new_empty(0, 0)
    scratch = None
    if embed_weight.device.type == "cuda":
        scratch = torch.empty(input_ids.shape[0] + 2, dtype=torch.int32, device=embed_weight.device)
    _C.fuse_embeddings(dl(input_ids), dl(embed_weight), dl_opt(mm_features), dl(out), dl_opt(scratch), stream_of(embed_weight))
    return out


# ---- torch.library registration (used while compiling) --------------------------------------------

@torch.library.custom_op("vita::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _rms_norm(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("vita::fused_add_rms_norm", mutates_args=())
def _fused_add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    return _fused_add_rms_norm(x, residual, weight, eps)


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    e = torch.empty_like(x, memory_format=torch.contiguous_format)
    return e, torch.empty_like(e)


@torch.library.custom_op("vita::rotary_embedding", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, positions: Tensor, theta: float, rotary_dim: int) -> Tuple[Tensor, Tensor]:
    return _rope(q, k, positions, theta, rotary_dim)


@_rope_op.register_fake
def _(q, k, positions, theta, rotary_dim):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("vita::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: Tensor) -> Tensor:
    return _silu_and_mul(x)


@_silu_and_mul_op.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("vita::fuse_embeddings", mutates_args=())
def _fuse_op(input_ids: Tensor, embed_weight: Tensor, mm_features: Optional[Tensor]) -> Tensor:
    return _fuse(input_ids, embed_weight, mm_features)


@_fuse_op.register_fake
def _(input_ids, embed_weight, mm_features):
    return embed_weight.new_empty(input_ids.shape[0], embed_weight.shape[-1])


# ---- public API (DESIGN §4) ------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y = RMSNorm(x) * weight over the last dim (Qwen2 rounding order). x: [..., hidden]."""
    if is_compiling():
        return _rms_norm_op(x, weight, eps)
    return _rms_norm(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """Returns (RMSNorm(x + residual) * weight, x + residual) in one pass."""
    if is_compiling():
        return _fused_add_rms_norm_op(x, residual, weight, eps)
    return _fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, theta: float, *, rotary_dim: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """NeoX-layout RoPE (as Qwen2). q: [T, Hq, D], k: [T, Hkv, D] (strided views such as slices of
    a fused qkv projection are fine), positions: [T] int32/int64. Returns new (q, k)."""
    rd = 0 if rotary_dim is None else int(rotary_dim)
    if is_compiling():
        return _rope_op(q, k, positions, float(theta), rd)
    return _rope(q, k, positions, float(theta), rd)


def silu_and_mul(x: Tensor) -> Tensor:
    """silu(x[..., :N]) * x[..., N:] for x = [..., 2N] (gate | up)."""
    if is_compiling():
        return _silu_and_mul_op(x)
    return _silu_and_mul(x)


def fuse_embeddings(input_ids: Tensor, embed_weight: Tensor, mm_features: Optional[Tensor] = None) -> Tensor:
    """Cross-modal token fusion: rows with id >= 0 gather embed_weight[id], rows with id < 0 take the
    next row of mm_features in order. ValueError on count mismatch or out-of-range id."""
    if is_compiling():
        return _fuse_op(input_ids, embed_weight, mm_features)
    return _fuse(input_ids, embed_weight, mm_features)

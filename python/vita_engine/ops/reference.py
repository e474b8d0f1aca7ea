"""Pure-torch references for every kernel in vita_engine.ops.

They define the semantics the kernels must match, are used by the tests (in float64 or float32),
and serve as the fallback path when the model runs with `use_reference=True`.
Written for clarity, not speed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "rope_inv_freq",
    "silu_and_mul",
    "linear_small_m",
    "fuse_embeddings",
    "store_kv",
    "gather_kv",
    "paged_attention",
    "varlen_attention",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Qwen2RMSNorm: normalise in float32 (float64 stays float64), round to x's dtype, times weight."""
    dt = x.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    xf = x.to(acc)
    var = xf.pow(2).mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(var + eps)).to(dt)
    return weight * y


def fused_add_rms_norm(x, residual, weight, eps: float = 1e-6):
    """Returns (rms_norm(x + residual), x + residual); the sum is kept in x's dtype."""
    s = x + residual
    return rms_norm(s, weight, eps), s


def rope_inv_freq(theta: float, rotary_dim: int, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim))


def rotary_embedding(q, k, positions, theta: float, *, rotary_dim: Optional[int] = None):
    """NeoX-style rotary embedding as in HF Qwen2 (rotate_half on the first rotary_dim channels).

    q: [T, Hq, D], k: [T, Hkv, D], positions: [T] integer. cos/sin are computed in float32 and
    cast to q's dtype, then applied in that dtype (the HF order)."""
    D = q.shape[-1]
    rd = D if rotary_dim is None else rotary_dim
    inv = rope_inv_freq(theta, rd, device=q.device)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # [T, rd/2] float32
    emb = torch.cat([ang, ang], dim=-1)
    cos = emb.cos().to(q.dtype)[:, None, :]
    sin = emb.sin().to(q.dtype)[:, None, :]

    def rot(x):
        xr, xp = x[..., :rd], x[..., rd:]
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        rh = torch.cat([-x2, x1], dim=-1)
        return torch.cat([xr * cos + rh * sin, xp], dim=-1)

    return rot(q), rot(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    return F.silu(x[..., :n]) * x[..., n:]


def fuse_embeddings(input_ids, embed_weight, mm_features=None) -> torch.Tensor:
    """Rows with id >= 0 gather embed_weight[id]; rows with id < 0 take mm_features rows in order."""
    ids = input_ids.long()
    neg = ids < 0
    n_mm = int(neg.sum())
    have = 0 if mm_features is None else mm_features.shape[0]
    if n_mm != have:
        raise ValueError(f"fuse_embeddings: input_ids has {n_mm} multimodal placeholder rows (id < 0) but mm_features has {have} rows")
    if ids.numel() and int(ids.max()) >= embed_weight.shape[0]:
        raise ValueError("fuse_embeddings: input_ids out of range for embed_weight")
    out = embed_weight[ids.clamp(min=0)].clone()
    if n_mm:
        out[neg] = mm_features.to(out.dtype)
    return out


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """In place: k_cache.view(-1, Hkv, D)[slot] = k[t] for every slot >= 0."""
    bs = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    s = slots[keep]
    k_cache[s // bs, s % bs] = k[keep].to(k_cache.dtype)
    v_cache[s // bs, s % bs] = v[keep].to(v_cache.dtype)


def gather_kv(cache, block_table_row, kv_len: int) -> torch.Tensor:
    """The dense [kv_len, Hkv, D] rows of one sequence, read through its block table."""
    bs = cache.shape[1]
    nblk = (kv_len + bs - 1) // bs
    blocks = block_table_row[:nblk].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:kv_len]


def _attend(q, k, v, scale, mask=None, bias=None):
    # q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D]; math in q's dtype (use float64 for references)
    Hq, Hkv = q.shape[1], k.shape[1]
    g = Hq // Hkv
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if bias is not None:
        s = s + bias[:, None, :]
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows -> 0 output
    return torch.einsum("hqk,khd->qhd", p, v)


def paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, *, causal: bool = True, scale: Optional[float] = None):
    """Attention of packed queries over a paged KV cache (see docs/architecture.md §5).

    Query j of a sequence with q_len tokens and kv_len cached keys sees keys < kv_len - q_len + j + 1
    when causal (bottom-right alignment)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros_like(q)
    cu = cu_q_lens.tolist()
    lens = kv_lens.tolist()
    for b in range(len(lens)):
        q0, q1 = cu[b], cu[b + 1]
        ql, kl = q1 - q0, lens[b]
        if ql == 0:
            continue
        k = gather_kv(k_cache, block_table[b], kl).to(q.dtype)
        v = gather_kv(v_cache, block_table[b], kl).to(q.dtype)
        mask = None
        if causal:
            qi = torch.arange(ql, device=q.device)[:, None]
            ki = torch.arange(kl, device=q.device)[None, :]
            mask = ki < (kl - ql + qi + 1)
        out[q0:q1] = _attend(q[q0:q1], k, v, scale, mask)
    return out


def varlen_attention(q, k, v, cu_seqlens, *, causal: bool = False, key_bias=None, scale: Optional[float] = None):
    """Encoder attention over contiguous packed sequences. key_bias [Hq, T] is added to every score
    of that key (per head)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.zeros_like(q)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        s0, s1 = cu[b], cu[b + 1]
        L = s1 - s0
        if L == 0:
            continue
        mask = None
        if causal:
            i = torch.arange(L, device=q.device)
            mask = i[None, :] <= i[:, None]
        bias = None if key_bias is None else key_bias[:, s0:s1].to(q.dtype)
        out[s0:s1] = _attend(q[s0:s1], k[s0:s1], v[s0:s1], scale, mask, bias)
    return out


# ---- sampling --------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def philox_uniform(seed: int, step: int, index: torch.Tensor) -> torch.Tensor:
    """Philox-4x32-10 uniform in (0, 1) for counter (index, step) and key seed, as float32
    (the same function as csrc/include/vita/philox.h). index: int64 tensor."""
    idx = index.to(torch.int64)
    c0 = idx & _M32
    c1 = (idx >> 32) & _M32
    c2 = torch.full_like(idx, step & _M32)
    c3 = torch.full_like(idx, (step >> 32) & _M32)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        p0 = c0 * 0xD2511F53  # < 2^64 but may exceed int64: split via 16-bit halves
        p1 = c2 * 0xCD9E8D57
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        del p0, p1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return ((c0 >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)  # 23 bits: never exactly 0 or 1


def _mulhilo(a: torch.Tensor, b: int):
    # 32x32 -> 64-bit product without int64 overflow: split a into 16-bit halves.
    a_lo, a_hi = a & 0xFFFF, a >> 16
    lo_part = a_lo * b  # < 2^48
    hi_part = a_hi * b  # < 2^48
    total_lo = (lo_part & _M32) + ((hi_part & 0xFFFF) << 16)
    carry = total_lo >> 32
    lo = total_lo & _M32
    hi = ((lo_part >> 32) + (hi_part >> 16) + carry) & _M32
    return hi, lo


def sample_tokens(logits, *, temperature=1.0, top_k=0, seed=0, step=0):
    """Reference for ops.sample_tokens (scalar arguments): greedy if temperature <= 0, else the
    Gumbel-max draw among the top_k largest logits (ties -> smaller id) or the whole vocabulary."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64)
    for b in range(B):
        row = logits[b].float().cpu()
        if not temperature > 0:
            out[b] = int(torch.argmax(row))  # torch.argmax returns the first maximum
            continue
        if 0 < top_k < V:
            order = sorted(range(V), key=lambda i: (-row[i].item(), i))[:top_k]
            cand = torch.tensor(order, dtype=torch.int64)
        else:
            cand = torch.arange(V, dtype=torch.int64)
        g = -torch.log(-torch.log(philox_uniform(seed, step, cand)))
        score = row[cand] / temperature + g
        best = torch.nonzero(score == score.max())[0, 0]
        out[b] = cand[best]
    return out


# =====================================================================================================
# Codec references (pure torch.nn.functional; see ops/codec.py and docs/codec_ops.md)
# =====================================================================================================

def conv1d_ref(x, weight, bias=None, *, padding=0, dilation: int = 1, lrelu_slope=None, residual=None, alpha: float = 1.0,
               accum=None, beta: float = 1.0, tanh: bool = False):
    """out = post(alpha * (conv1d(act(x)) + bias + residual) + beta * accum), computed in x's dtype."""
    import torch.nn.functional as F

    k = weight.shape[-1]
    if isinstance(padding, str):
        span = dilation * (k - 1)
        padding = (span // 2, span - span // 2)
    pl, pr = (padding, padding) if isinstance(padding, int) else padding
    h = x if lrelu_slope is None else F.leaky_relu(x, lrelu_slope)
    h = F.pad(h, (pl, pr))
    y = F.conv1d(h, weight, bias, dilation=dilation)
    if residual is not None:
        y = y + residual
    if alpha != 1.0:
        y = y * alpha
    if accum is not None:
        y = y + beta * accum
    return torch.tanh(y) if tanh else y


def conv_transpose1d_ref(x, weight, bias=None, *, stride: int = 1, padding=0, output_padding: int = 0, lrelu_slope=None):
    """conv_transpose1d(act(x)) with (left, right) padding cropped from the full output."""
    import torch.nn.functional as F

    pl, pr = (padding, padding) if isinstance(padding, int) else padding
    h = x if lrelu_slope is None else F.leaky_relu(x, lrelu_slope)
    y = F.conv_transpose1d(h, weight, bias, stride=stride)
    full = y.shape[-1]
    end = full - pr
    if output_padding:
        if end + output_padding > full:
            y = F.pad(y, (0, end + output_padding - full))
            if bias is not None:
                y[..., full:] = bias[:, None].to(y.dtype)
        end += output_padding
    return y[..., pl:end]


def linear_small_m(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference of ops.linear_small_m: torch's own F.linear."""
    return F.linear(x, weight, bias)

"""Row-wise ops at Qwen2.5-7B widths over a 256-token prefill chunk (hidden 3584, 28/4 heads x 128,
FFN 18944). References: the torch formulas the model code would use, and torch's fused op where one
exists (F.rms_norm), fastest counted."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case
from ._spec import Spec, dtype_name, randn, rel_err

T, H, HQ, HKV, D, FFN, VOCAB = 256, 3584, 28, 4, 128, 18944, 152064
EPS, THETA = 1e-6, 1e6
# fuse_embeddings gathers T rows: a table of 32768 of the 152064 rows (already far beyond cache) keeps
# memory modest without changing the work.
TABLE_ROWS, MM_ROWS = 32768, 64


def _rms_formula(x, w, eps=EPS):  # Qwen2RMSNorm
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _has_f_rms_norm() -> bool:
    return hasattr(F, "rms_norm")


def _rms_norm(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(0)
    x, w = randn(g, T, H, device=device, dtype=dtype), randn(g, H, device=device, dtype=dtype)
    refs = {"formula": lambda: _rms_formula(x, w)}
    if _has_f_rms_norm():
        refs["F.rms_norm"] = lambda: F.rms_norm(x, (H,), w, EPS)
    return Case("rms_norm", "rms_norm", dtype_name(dtype), f"[{T}, {H}]", lambda: ops.rms_norm(x, w, EPS), refs,
                bytes=2 * x.numel() * x.element_size(), check=lambda: rel_err(ops.rms_norm(x, w, EPS), _rms_formula(x, w)))


def _fused_add_rms_norm(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(1)
    x, r, w = randn(g, T, H, device=device, dtype=dtype), randn(g, T, H, device=device, dtype=dtype), randn(g, H, device=device, dtype=dtype)

    def formula():
        s = x + r
        return _rms_formula(s, w), s

    refs = {"formula": formula}
    if _has_f_rms_norm():
        def fused():
            s = x + r
            return F.rms_norm(s, (H,), w, EPS), s
        refs["F.rms_norm"] = fused
    return Case("fused_add_rms_norm", "fused_add_rms_norm", dtype_name(dtype), f"[{T}, {H}] + residual",
                lambda: ops.fused_add_rms_norm(x, r, w, EPS), refs, bytes=4 * x.numel() * x.element_size(),
                check=lambda: rel_err(ops.fused_add_rms_norm(x, r, w, EPS), formula()))


def _silu_and_mul(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(2)
    gu = randn(g, T, 2 * FFN, device=device, dtype=dtype)
    gate, up = gu[:, :FFN], gu[:, FFN:]
    ref = lambda: F.silu(gate).mul_(up)  # noqa: E731
    return Case("silu_and_mul", "silu_and_mul", dtype_name(dtype), f"[{T}, 2x{FFN}]", lambda: ops.silu_and_mul(gu), {"F.silu*up": ref},
                bytes=3 * T * FFN * gu.element_size(), check=lambda: rel_err(ops.silu_and_mul(gu), ref()))


def _rotary_embedding(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(3)
    q, k = randn(g, T, HQ, D, device=device, dtype=dtype), randn(g, T, HKV, D, device=device, dtype=dtype)
    pos = torch.arange(T, device=device) + 1000
    inv = 1.0 / (THETA ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))

    def rot_half(x):
        return torch.cat([-x[..., D // 2:], x[..., : D // 2]], -1)

    def apply(cos, sin):
        return q * cos + rot_half(q) * sin, k * cos + rot_half(k) * sin

    def hf():  # HF Qwen2RotaryEmbedding: cos/sin of this forward's positions, then apply_rotary_pos_emb
        ang = pos.float()[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        return apply(emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None])

    # vLLM-native style: a cos/sin table for every position, gathered (table built once, untimed)
    ang_all = torch.arange(4096, device=device, dtype=torch.float32)[:, None] * inv[None]
    emb_all = torch.cat([ang_all, ang_all], -1)
    cos_t, sin_t = emb_all.cos().to(dtype), emb_all.sin().to(dtype)

    def cached():
        return apply(cos_t[pos][:, None], sin_t[pos][:, None])

    n = (q.numel() + k.numel()) * q.element_size()
    return Case("rotary_embedding", "rotary_embedding", dtype_name(dtype), f"q [{T}, {HQ}, {D}], k [{T}, {HKV}, {D}]",
                lambda: ops.rotary_embedding(q, k, pos, THETA), {"hf": hf, "cos_sin_cache": cached}, bytes=2 * n,
                check=lambda: rel_err(ops.rotary_embedding(q, k, pos, THETA), hf()))


def _fuse_embeddings(device, dtype):
    from ... import ops

    g = torch.Generator().manual_seed(4)
    emb = randn(g, TABLE_ROWS, H, device=device, dtype=dtype)
    mm = randn(g, MM_ROWS, H, device=device, dtype=dtype)
    ids = torch.randint(0, TABLE_ROWS, (T,), generator=g)
    ids[10:10 + MM_ROWS] = -200  # an image's placeholder run, as VITA's prompt has
    ids = ids.to(device)
    neg = ids < 0
    mm_pos = neg.nonzero().squeeze(1)  # known to a torch runtime from its prompt (untimed)

    def masked():  # VITA's prepare_inputs_labels_for_multimodal: embed the clamped ids, overwrite the image rows
        e = F.embedding(ids.clamp(min=0), emb)
        e[ids < 0] = mm
        return e

    def index_copy():
        return F.embedding(ids.clamp(min=0), emb).index_copy_(0, mm_pos, mm)

    return Case("fuse_embeddings", "fuse_embeddings", dtype_name(dtype), f"{T} ids ({MM_ROWS} image rows), table [{TABLE_ROWS}, {H}]",
                lambda: ops.fuse_embeddings(ids, emb, mm), {"masked": masked, "index_copy": index_copy},
                bytes=2 * T * H * emb.element_size(), check=lambda: rel_err(ops.fuse_embeddings(ids, emb, mm), masked()))


SPECS = [
    Spec("rms_norm", "rms_norm", _rms_norm),
    Spec("fused_add_rms_norm", "fused_add_rms_norm", _fused_add_rms_norm),
    Spec("silu_and_mul", "silu_and_mul", _silu_and_mul),
    Spec("rotary_embedding", "rotary_embedding", _rotary_embedding),
    Spec("fuse_embeddings", "fuse_embeddings", _fuse_embeddings),
]

"""Attention ops on torch tensors: KV-cache write, paged attention, varlen (encoder) attention.

`paged_attention` is stateless: it builds a `PagedAttentionPlan` and runs it. Decode loops that
replay CUDA graphs build the plan once (metadata converted to int32 on the right device, max_q_len,
split count and split-KV workspace fixed), then call `plan.update(...)` (in-place copies) and
`plan.run(q, k_cache, v_cache, out=out)` (no host sync, no allocation when `out` is given).

Validation lives in `_C`. On CPU the metadata values are checked (monotone cu_q_lens, kv_len >=
q_len, block table long enough, block ids in range); on CUDA the metadata lives on the device and
only shapes / dtypes / devices are checked.
"""
from __future__ import annotations

import warnings

from typing import Optional

import torch

from . import reference as _ref
from ._lib import _C, dl, dl_opt, is_compiling, plain, stream_of

__all__ = ["store_kv", "paged_attention", "varlen_attention", "PagedAttentionPlan"]

Tensor = torch.Tensor


def _index32(t, device: torch.device, name: str, op: str) -> Tensor:
    """int32, contiguous, on `device` (int64 / lists accepted; other dtypes are a TypeError)."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.dtype != torch.int32 or t.device != device:
        t = t.to(device=device, dtype=torch.int32)
    return t.contiguous()


class PagedAttentionPlan:
    """Metadata and launch parameters of one paged-attention layout (plan/run split).

    block_table [B, max_blocks], kv_lens [B], cu_q_lens [B+1]: int32 or int64, any device (converted
    once to int32 on `device`, default block_table's device). max_q_len: exact when cu_q_lens is on
    the CPU; otherwise the given hint or the safe bound T (total query tokens, `num_tokens` or read
    once from cu_q_lens[-1]). num_splits comes from `_C.paged_attention_num_splits` (CUDA; 1 on CPU)
    and the split-KV workspace is allocated here, once.
    """

    def __init__(self, block_table, kv_lens, cu_q_lens, *, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 causal: bool = True, max_q_len: Optional[int] = None, num_tokens: Optional[int] = None, device=None,
                 _op: str = "PagedAttentionPlan"):
        op = _op  # errors name the public entry point (paged_attention when it builds the plan)
        if device is None:
            device = block_table.device if isinstance(block_table, torch.Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        host_cu = isinstance(cu_q_lens, torch.Tensor) and cu_q_lens.device.type == "cpu" or not isinstance(cu_q_lens, torch.Tensor)
        host_kv = isinstance(kv_lens, torch.Tensor) and kv_lens.device.type == "cpu" or not isinstance(kv_lens, torch.Tensor)
        self.block_table = _index32(block_table, self.device, "block_table", op)
        self.kv_lens = _index32(kv_lens, self.device, "kv_lens", op)
        self.cu_q_lens = _index32(cu_q_lens, self.device, "cu_q_lens", op)
        if self.cu_q_lens.dim() != 1 or self.kv_lens.dim() != 1 or self.block_table.dim() != 2:
            raise ValueError(f"{op}: expected block_table [B, max_blocks], kv_lens [B], cu_q_lens [B+1], got "
                             f"{tuple(self.block_table.shape)}, {tuple(self.kv_lens.shape)}, {tuple(self.cu_q_lens.shape)}")
        if num_q_heads % max(num_kv_heads, 1) or num_kv_heads < 1:
            if op == "paged_attention":
                raise ValueError(f"{op}: q heads ({num_q_heads}) must be a multiple of k_cache kv_heads ({num_kv_heads}) (GQA)")
            raise ValueError(f"{op}: num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_q_heads, self.num_kv_heads, self.head_dim, self.block_size = int(num_q_heads), int(num_kv_heads), int(head_dim), int(block_size)
        self.causal = bool(causal)
        B = self.kv_lens.shape[0]
        if host_cu:
            cu = torch.as_tensor(cu_q_lens).to(torch.int64)
            self.num_tokens = int(cu[-1]) if cu.numel() else 0
            self.max_q_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        elif max_q_len is not None and num_tokens is not None:
            self.num_tokens, self.max_q_len = int(num_tokens), int(max_q_len)
        else:
            # Device-resident lengths: one host copy at plan time (never in run()). The exact
            # max_q_len matters: it selects the decode (split-KV) or the prefill kernel.
            cu = cu_q_lens.to("cpu", torch.int64)
            self.num_tokens = int(cu[-1]) if cu.numel() else 0
            self.max_q_len = int(max_q_len) if max_q_len is not None else (int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0)
        if host_kv:
            kv = torch.as_tensor(kv_lens)
            max_kv = int(kv.max()) if kv.numel() else 0
        else:
            max_kv = self.block_table.shape[1] * self.block_size  # safe bound, no sync
        dev = self.device.index if self.device.type == "cuda" else -1
        if dev is not None and dev < 0 and self.device.type == "cuda":
            dev = torch.cuda.current_device()
        self.num_splits = int(_C.paged_attention_num_splits(B, self.num_kv_heads, max_kv, max(self.max_q_len, 1), dev))
        self.workspace = None
        if self.device.type == "cuda" and self.num_splits > 1:
            n = _C.paged_attention_workspace_floats(self.num_tokens, self.num_q_heads, self.head_dim, self.num_splits)
            self.workspace = torch.empty(n, dtype=torch.float32, device=self.device)

    def update(self, *, block_table=None, kv_lens=None, cu_q_lens=None) -> "PagedAttentionPlan":
        """Copy new metadata values in place (same shapes; the tensors the plan holds stay the same
        objects, so captured CUDA graphs see the new values). On CUDA the caller keeps every q_len
        <= max_q_len and the token count unchanged."""
        for name, new in (("block_table", block_table), ("kv_lens", kv_lens), ("cu_q_lens", cu_q_lens)):
            if new is None:
                continue
            cur = getattr(self, name)
            new_t = new if isinstance(new, torch.Tensor) else torch.as_tensor(new)
            if tuple(new_t.shape) != tuple(cur.shape):
                raise ValueError(f"PagedAttentionPlan.update: {name} must keep shape {tuple(cur.shape)}, got {tuple(new_t.shape)}")
            if new_t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"PagedAttentionPlan.update: {name} must be int32 or int64, got {new_t.dtype}")
            cur.copy_(new_t, non_blocking=True)
            if name == "cu_q_lens" and self.device.type == "cpu":
                cu = cur.to(torch.int64)
                self.num_tokens = int(cu[-1]) if cu.numel() else 0
                self.max_q_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        return self

    def run(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, scale: Optional[float] = None, out: Optional[Tensor] = None) -> Tensor:
        """o [T, Hq, D] (dtype of q). No host sync; no allocation when `out` is given."""
        if _cuda_fallback(q, "paged_attention"):
            o = _ref.paged_attention(q.float(), k_cache, v_cache, self.block_table, self.kv_lens, self.cu_q_lens, causal=self.causal,
                                     scale=scale).to(q.dtype)
            return o if out is None else out.copy_(o)
        q = plain(q)
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        _C.paged_attention(dl(q), dl(k_cache), dl(v_cache), dl(self.block_table), dl(self.kv_lens), dl(self.cu_q_lens), dl(out), scale,
                           self.causal, self.max_q_len, self.num_splits, dl_opt(self.workspace), stream_of(q))
        return out


# ---- eager implementations ---------------------------------------------------------------------

def _store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    _C.store_kv(dl(k), dl(v), dl(k_cache), dl(v_cache), dl(slot_mapping), stream_of(k))


CUDA_HEAD_DIMS = (64, 128)
_warned = set()


def _cuda_fallback(q: Tensor, op: str) -> bool:
    """Head dims without a CUDA kernel (the tiny test model's 16/32) run the torch reference on the
    GPU, with a one-time warning, so every model still runs there; real VITA-1.5 dims never do."""
    if q.is_cuda and q.dim() == 3 and q.shape[-1] not in CUDA_HEAD_DIMS:
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"{op}: head_dim {q.shape[-1]} has no CUDA kernel (64, 128); using the torch reference", stacklevel=3)
        return True
    return False


def _paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, causal: bool, scale: Optional[float]) -> Tensor:
    if _cuda_fallback(q, "paged_attention"):
        return _ref.paged_attention(q.float(), k_cache, v_cache, block_table, kv_lens, cu_q_lens, causal=causal, scale=scale).to(q.dtype)
    if q.dim() != 3 or k_cache.dim() != 4:
        # let _C produce the precise message
        out = torch.empty_like(q)
        _C.paged_attention(plain(q), plain(k_cache), plain(v_cache), plain(block_table), plain(kv_lens), plain(cu_q_lens), out, scale, causal)
        return out
    plan = PagedAttentionPlan(block_table, kv_lens, cu_q_lens, num_q_heads=q.shape[1], num_kv_heads=k_cache.shape[2],
                              head_dim=q.shape[2], block_size=k_cache.shape[1], causal=causal, num_tokens=q.shape[0], device=q.device,
                              _op="paged_attention")
    return plan.run(q, k_cache, v_cache, scale=scale)


def _varlen_attention(q, k, v, cu_seqlens, causal: bool, key_bias: Optional[Tensor], scale: Optional[float]) -> Tensor:
    if _cuda_fallback(q, "varlen_attention"):
        kb = None if key_bias is None else key_bias.float()
        return _ref.varlen_attention(q.float(), k.float(), v.float(), cu_seqlens, causal=causal, key_bias=kb, scale=scale).to(q.dtype)
    q = plain(q)
    cu = _index32(cu_seqlens, q.device, "cu_seqlens", "varlen_attention")
    max_seqlen = 0
    if q.device.type == "cuda":
        src = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.as_tensor(cu_seqlens)
        if src.device.type == "cpu":
            c = src.to(torch.int64)
            max_seqlen = int((c[1:] - c[:-1]).max()) if c.numel() > 1 else 0
        else:
            max_seqlen = q.shape[0]  # safe bound, no sync
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _C.varlen_attention(dl(q), dl(k), dl(v), dl(cu), dl(out), causal, dl_opt(key_bias), scale, max_seqlen, stream_of(q))
    return out


# ---- torch.library registration (used while compiling) --------------------------------------------

@torch.library.custom_op("vita::store_kv", mutates_args=("k_cache", "v_cache"))
def _store_kv_op(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    _store_kv(k, v, k_cache, v_cache, slot_mapping)


@_store_kv_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("vita::paged_attention", mutates_args=())
def _paged_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor, cu_q_lens: Tensor,
                        causal: bool, scale: Optional[float]) -> Tensor:
    return _paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, causal, scale)


@_paged_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("vita::varlen_attention", mutates_args=())
def _varlen_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, causal: bool, key_bias: Optional[Tensor],
                         scale: Optional[float]) -> Tensor:
    return _varlen_attention(q, k, v, cu_seqlens, causal, key_bias, scale)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, causal, key_bias, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---- public API (DESIGN §4) ------------------------------------------------------------------------

def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """In place: k_cache.view(-1, Hkv, D)[slot] = k[t] (same for v) for every slot >= 0; slot -1 skips.
    k, v [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]; slot_mapping int32/int64 [T]."""
    if is_compiling():
        return _store_kv_op(k, v, k_cache, v_cache, slot_mapping)
    _store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor, cu_q_lens: Tensor, *,
                    causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Attention of packed queries q [T, Hq, D] over a paged KV cache (DESIGN §4). Causal is
    bottom-right aligned: query j of a sequence with q_len tokens sees keys < kv_len - q_len + j + 1.
    Index tensors may be int32 or int64. Returns o [T, Hq, D] in q's dtype."""
    if is_compiling():
        return _paged_attention_op(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, causal, scale)
    return _paged_attention(q, k_cache, v_cache, block_table, kv_lens, cu_q_lens, causal, scale)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, causal: bool = False, key_bias: Optional[Tensor] = None,
                     scale: Optional[float] = None) -> Tensor:
    """Attention over contiguous packed sequences: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1].
    key_bias [Hq, T] is added to every score of that key."""
    if is_compiling():
        return _varlen_attention_op(q, k, v, cu_seqlens, causal, key_bias, scale)
    return _varlen_attention(q, k, v, cu_seqlens, causal, key_bias, scale)

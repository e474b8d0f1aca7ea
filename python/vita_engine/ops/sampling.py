"""Token sampling: greedy, top-k or full-vocabulary, reproducible per stream.

A stream's draw at decode step `step` depends only on (seed, step, logits): the kernels use the
Gumbel-max trick with a Philox-4x32-10 counter RNG keyed by (seed, step, token id), identical on
CPU and CUDA, so batching streams together never changes what any of them samples.
"""
from __future__ import annotations

from typing import Union

import torch

from ._lib import _C, dl, is_compiling, stream_of

__all__ = ["sample_tokens", "MAX_TOP_K_CUDA"]

MAX_TOP_K_CUDA = 64
Tensor = torch.Tensor


# Per-row tensors for Python scalars on the CPU, reused across calls: a TTS decode step passes the same
# temperature / top_k / seed every time, and torch.full costs ~1.5 us apiece. Only `_C` ever sees them
# (it reads, never writes), and the cache stays small (cleared past _CACHE_MAX entries).
_scalar_rows: dict = {}
_CACHE_MAX = 64


def _per_row(v, B, dtype, device, name):
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            v = v.reshape(1).expand(B)
        return v.to(device=device, dtype=dtype).contiguous()
    if device.type != "cpu" or is_compiling():
        return torch.full((B,), v, dtype=dtype, device=device)
    key = (type(v), v, B, dtype)
    t = _scalar_rows.get(key)
    if t is None:
        if len(_scalar_rows) >= _CACHE_MAX:
            _scalar_rows.clear()
        t = _scalar_rows[key] = torch.full((B,), v, dtype=dtype, device=device)
    return t


def _sample(logits: Tensor, temperature: Tensor, top_k: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _C.sample_tokens(dl(logits), dl(out), dl(temperature), dl(top_k), dl(seed), dl(step), stream_of(logits))
    return out


@torch.library.custom_op("vita::sample_tokens", mutates_args=())
def _sample_op(logits: Tensor, temperature: Tensor, top_k: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    return _sample(logits, temperature, top_k, seed, step)


@_sample_op.register_fake
def _(logits, temperature, top_k, seed, step):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


Num = Union[int, float, Tensor]


def sample_tokens(logits: Tensor, *, temperature: Num = 1.0, top_k: Num = 0, seed: Num = 0, step: Num = 0) -> Tensor:
    """Sample one token id per row of logits [B, V] -> int64 [B].

    temperature <= 0: greedy (ties -> smallest id). top_k <= 0: whole vocabulary (on CUDA, 1..64 or
    whole vocabulary). Each argument is a scalar or a per-row tensor; pass tensors (already on the
    logits' device) to stay CUDA-graph capturable."""
    if logits.dim() != 2:
        raise ValueError(f"sample_tokens: logits must be 2-D [batch, vocab], got {tuple(logits.shape)}")
    B, V, dev = logits.shape[0], logits.shape[1], logits.device
    if logits.is_cuda and isinstance(top_k, int) and MAX_TOP_K_CUDA < top_k < V:
        raise ValueError(f"sample_tokens: top_k must be <= {MAX_TOP_K_CUDA} (or >= vocab for no cut) on CUDA, got {top_k}")
    t = _per_row(temperature, B, torch.float32, dev, "temperature")
    k = _per_row(top_k, B, torch.int32, dev, "top_k")
    s = _per_row(seed, B, torch.int64, dev, "seed")
    st = _per_row(step, B, torch.int64, dev, "step")
    if is_compiling():
        return _sample_op(logits, t, k, s, st)
    return _sample(logits, t, k, s, st)

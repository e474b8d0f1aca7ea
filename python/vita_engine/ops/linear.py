"""Small-row dense projection on CPU (decode steps): y = x @ weight^T (+ bias).

torch's CPU GEMM reaches a fraction of the memory bandwidth at 1-16 rows; `linear_small_m` reads
each weight row once and keeps a block of rows in cache while every input row passes over it
(csrc/cpu/linear_small_m_impl.h). Same arguments and rounding as F.linear (float32 accumulate, one
rounding to the dtype), for CPU float32/bfloat16 inputs with at most `LINEAR_SMALL_M_MAX_ROWS` rows.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._lib import _C, dl, dl_opt, is_compiling

__all__ = ["linear_small_m", "LINEAR_SMALL_M_MAX_ROWS"]

Tensor = torch.Tensor
LINEAR_SMALL_M_MAX_ROWS = int(_C.LINEAR_SMALL_M_MAX_ROWS)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"linear_small_m: x must be a tensor [..., in_features], got {getattr(x, 'shape', type(x).__name__)}")
    lead = x.shape[:-1]
    rows = 1
    for d in lead:
        rows *= d
    x2 = x.reshape(rows, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:  # strided rows are read in place; a strided last dim is not
        x2 = x2.contiguous()
    n = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() >= 1 else 0
    out = x2.new_empty(x2.shape[0], n)
    _C.linear_small_m(dl(x2), dl(weight), dl_opt(bias), dl(out))
    return out.view(*lead, n)


@torch.library.custom_op("vita::linear_small_m", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _linear(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def linear_small_m(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) for CPU x [..., K] with at most LINEAR_SMALL_M_MAX_ROWS rows in all,
    weight [N, K] contiguous, one dtype (float32 or bfloat16). ValueError/TypeError otherwise."""
    if is_compiling():
        return _linear_op(x, weight, bias)
    return _linear(x, weight, bias)

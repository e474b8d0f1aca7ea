"""The decode-step projections on CPU: `ops.linear_small_m` against F.linear (torch's GEMM) at the
TTS's real widths (hidden 896, FFN 4864, 14 heads x 64 with as many KV heads: qkv N = 2688) and the
LLM's (Qwen2.5-7B qkv: 3584 -> 4608; --full), at 1 row (bf16), 4 rows (fp32) and 16 rows (one stream / a batch of 16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case
from ._spec import Spec, dtype_name, randn, rel_err


def _linear(M: int, K: int, N: int):
    def build(device, dtype):
        from ... import ops

        g = torch.Generator().manual_seed(M * 100003 + K * 101 + N)
        x = randn(g, M, K, device=device, dtype=dtype)
        w = randn(g, N, K, device=device, dtype=dtype, scale=K ** -0.5)
        es = w.element_size()
        return Case(f"linear_m{M}_k{K}_n{N}", "linear_small_m", dtype_name(dtype), f"[{M}, {K}] x [{N}, {K}]^T",
                    lambda: ops.linear_small_m(x, w), {"F.linear": lambda: F.linear(x, w)},
                    bytes=(N * K + M * K + M * N) * es, flops=2 * M * K * N,
                    check=lambda: rel_err(ops.linear_small_m(x, w), F.linear(x, w)))
    return build


# The row counts the model sends here (model/layers.py, _SMALL_M_ROWS): bfloat16 from 1 row,
# float32 from 4 (at 1-3 rows MKL's sgemv streams float32 weights ~5-10 % faster, so the model keeps
# F.linear there; `--only linear_m1_*` with a float32 build is still one line away in Python).
_SHAPES = [(896, 4864, False), (896, 2688, False), (4864, 896, False), (3584, 4608, True)]
_ROWS = [(1, ("bfloat16",)), (4, ("float32",)), (16, None)]


def _rows_for_isa():
    # the AVX2 build sends float32 only up to 8 rows to the kernel (model/layers.py): bench what it sends
    from ... import _C

    if _C.cpu_isa() != "avx2":
        return _ROWS
    return [(1, ("bfloat16",)), (4, ("float32",)), (16, ("bfloat16",)), (8, ("float32",))]


SPECS = [Spec(f"linear_m{M}_k{K}_n{N}", "linear_small_m", _linear(M, K, N), dtypes=dts, full_only=full, devices=("cpu",))
         for K, N, full in _SHAPES for M, dts in _rows_for_isa()]

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

__all__ = ["Spec", "DTYPES", "dtype_name", "rel_err", "randn"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Spec:
    name: str
    family: str
    build: Callable  # (device: str, dtype: torch.dtype) -> Case
    dtypes: Optional[Tuple[str, ...]] = None  # None: every requested dtype; else only these (e.g. fp32 logits)
    full_only: bool = False  # more shapes of a family already covered: run with --full or when named in --only
    devices: Optional[Tuple[str, ...]] = None  # None: every device; else only these (CPU-only kernels)


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def randn(g: torch.Generator, *shape, device="cpu", dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    """Drawn on the host from `g` (same values on every device), then moved."""
    t = torch.randn(*shape, generator=g)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(device=device, dtype=dtype)


def rel_err(got, want) -> float:
    """max |got - want| / max(1, max |want|), in float32."""
    if isinstance(got, (tuple, list)):
        return max(rel_err(a, b) for a, b in zip(got, want))
    g, w = got.float(), want.float()
    return float((g - w).abs().max()) / max(1.0, float(w.abs().max()))

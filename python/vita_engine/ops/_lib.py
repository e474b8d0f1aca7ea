"""Plumbing shared by the op wrappers: the extension module and the caller's CUDA stream."""
from __future__ import annotations

import torch

from .. import _C

__all__ = ["_C", "stream_of", "plain"]


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device as an int (0 for CPU tensors)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def plain(t):
    """Detach tensors that require grad (DLPack refuses them); pass anything else through."""
    if isinstance(t, torch.Tensor) and t.requires_grad:
        return t.detach()
    return t


def is_compiling() -> bool:
    return torch.compiler.is_compiling()

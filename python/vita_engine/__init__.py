"""vita-engine: a kernel-centric real-time inference engine for VITA-1.5 speech-and-vision LLMs.

`vita_engine._C` holds the compiled kernels (CPU always, CUDA when built with nvcc) behind a
torch-free DLPack ABI; `vita_engine.ops` wraps them for torch tensors.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import _C  # noqa: F401  (fail early and loudly if the extension is missing)


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a usable GPU + driver is present."""
    return bool(_C.built_with_cuda()) and _C.cuda_device_count() > 0


def built_with_cuda() -> bool:
    return bool(_C.built_with_cuda())


def cuda_arch_list() -> list[str]:
    s = _C.cuda_arch_list()
    return [a for a in s.split(",") if a]


_LAZY = {"ops": None, "testing": None, "VitaModel": "model", "LLM": "model", "Engine": "runtime"}


def __getattr__(name):  # lazy: keep `import vita_engine` free of torch
    if name in _LAZY:
        import importlib

        from ._errors import require_torch

        require_torch(f"vita_engine.{name}")  # all of these run on torch tensors
        sub = _LAZY[name]
        mod = importlib.import_module(f"{__name__}.{sub or name}")
        return mod if sub is None else getattr(mod, name)
    raise AttributeError(f"module 'vita_engine' has no attribute {name!r}")

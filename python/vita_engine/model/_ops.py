"""The one place where the model layer resolves its kernels.

Every layer calls attention, norms, RoPE, activation and fusion through an `OpsHandle`, which
forwards to `vita_engine.ops` (fast C++/CUDA kernels) or, when `use_reference` is set, to the
pure-torch `vita_engine.ops.reference`. Ops that have not landed yet in `vita_engine.ops`
(`store_kv`, `paged_attention`, `varlen_attention` while they are being written) fall back to the
reference here and nowhere else.
"""
from __future__ import annotations

import contextlib

from .. import ops as _fast
from ..ops import reference as _ref

__all__ = ["OpsHandle", "OP_NAMES", "resolve"]

OP_NAMES = (
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "fuse_embeddings",
    "store_kv",
    "paged_attention",
    "varlen_attention",
)


def resolve(name: str, use_reference: bool = False):
    """The function implementing op `name` (the reference when asked for, or when not built yet)."""
    if use_reference:
        return getattr(_ref, name)
    return getattr(_fast, name, None) or getattr(_ref, name)


class OpsHandle:
    """Shared by all components of one model; flip `use_reference` to switch every layer at once."""

    def __init__(self, use_reference: bool = False):
        self.set_reference(use_reference)

    def set_reference(self, flag: bool) -> None:
        self.use_reference = bool(flag)
        for n in OP_NAMES:
            setattr(self, n, resolve(n, self.use_reference))

    @contextlib.contextmanager
    def reference(self, flag: bool = True):
        """`with handle.reference(): ...` runs the pure-torch path temporarily."""
        old = self.use_reference
        self.set_reference(flag)
        try:
            yield self
        finally:
            self.set_reference(old)

    def paged_attention_plan(self, block_table, kv_lens, cu_q_lens, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                             block_size: int, causal: bool = True, device=None, max_q_len=None, num_tokens=None):
        """plan/run split: returns `run(q, k_cache, v_cache)` for every layer of one forward. Build
        it from host (CPU) metadata: the plan copies it to the device once and picks the kernel
        (decode split-KV vs prefill) from the exact lengths, with no host sync in the layers."""
        if self.use_reference or not hasattr(_fast, "PagedAttentionPlan"):
            fn = self.paged_attention
            return lambda q, kc, vc: fn(q, kc, vc, block_table, kv_lens, cu_q_lens, causal=causal)
        plan = _fast.PagedAttentionPlan(block_table, kv_lens, cu_q_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                        head_dim=head_dim, block_size=block_size, causal=causal, device=device,
                                        max_q_len=max_q_len, num_tokens=num_tokens)
        return plan.run

    def backend(self) -> dict:
        """Which implementation each op resolves to (module name), for logs and tests."""
        return {n: getattr(self, n).__module__ for n in OP_NAMES}

"""Building blocks shared by the LLM (Qwen2) and the TTS decoders (Llama layers): a pre-RMSNorm
decoder layer with fused qkv / gate|up projections, and a small paged KV cache.

GEMMs go through `linear` (F.linear, or `ops.linear_small_m` for the CPU decode shapes where it
wins); norms, RoPE, SiLU-and-mul and attention go through the model's `OpsHandle`. Attention is a callable `attn(layer_index, q, k, v) -> o` so one layer stack serves
full forwards (varlen), prefill + decode (paged) and prefix-LMs alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .. import _C
from .. import ops as _fast

__all__ = ["DecoderLayer", "run_decoder_stack", "PagedKVCache", "SequenceKV", "linear"]

# Row counts where ops.linear_small_m beats F.linear (torch 2.13, MKL/oneDNN) on CPU. Measured on an
# Intel Xeon (family 6 model 207, AVX-512, no AVX512-BF16/AMX), one thread, CPU clock, min of 60:
# - bfloat16: every row count 1-32 (1.4-1.8x at 1 row: ~24 GB/s of weights against torch's
#   ~13; 2.3-3.4x at 2-32 rows), so all of them;
# - float32: 0.83-0.98x at 1-3 rows (MKL's sgemv already streams the weights at ~28 GB/s, ours
#   ~26), 1.4-1.7x at 4-8 rows, 1.1-1.45x at 16, 0.97-1.17x at 24-32, so 4-16 rows only.
# - float32 on the AVX2 build (VITA_CPU_ISA=avx2, torch held to AVX2 too): 1.35-1.9x at 4-8 rows,
#   0.92-1.12x at 12-16, so 4-8 rows there (bf16 stays 1.4-3.6x at every row count).
_SMALL_M_ROWS = {torch.bfloat16: (1, 32), torch.float32: (4, 16)}
_SMALL_M_ROWS_FP32_AVX2 = (4, 8)


def linear(ops, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, w, b); CPU decode shapes (2-D x, few rows, see _SMALL_M_ROWS) take
    `ops.linear_small_m`. The reference path (`ops.use_reference`) and anything needing autograd
    stay on F.linear."""
    rows = _SMALL_M_ROWS.get(x.dtype)
    if rows is not None and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] > _SMALL_M_ROWS_FP32_AVX2[1] \
            and _C.cpu_isa() == "avx2":
        rows = _SMALL_M_ROWS_FP32_AVX2
    if (rows is not None and x.dim() == 2 and rows[0] <= x.shape[0] <= rows[1] and x.device.type == "cpu"
            and w.dtype == x.dtype and w.device.type == "cpu" and w.is_contiguous()
            and (b is None or (b.dtype == x.dtype and b.device.type == "cpu" and b.is_contiguous()))
            and not getattr(ops, "use_reference", False)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)))):
        return _fast.linear_small_m(x, w, b)
    return F.linear(x, w, b)


@dataclass
class DecoderLayer:
    """One Qwen2/Llama layer. qkv_w = cat(q, k, v) rows; gate_up_w = cat(gate, up) rows."""

    input_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: Optional[torch.Tensor]
    o_w: torch.Tensor
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor

    @classmethod
    def from_tensors(cls, t: dict, prefix: str, bias: bool) -> "DecoderLayer":
        """Fuse the checkpoint's separate projections (the originals are dropped from `t`)."""
        a, m = prefix + "self_attn.", prefix + "mlp."
        qkv = torch.cat([t.pop(a + "q_proj.weight"), t.pop(a + "k_proj.weight"), t.pop(a + "v_proj.weight")], 0)
        qkv_b = torch.cat([t.pop(a + "q_proj.bias"), t.pop(a + "k_proj.bias"), t.pop(a + "v_proj.bias")], 0) if bias else None
        gu = torch.cat([t.pop(m + "gate_proj.weight"), t.pop(m + "up_proj.weight")], 0)
        return cls(
            input_norm=t.pop(prefix + "input_layernorm.weight"),
            qkv_w=qkv,
            qkv_b=qkv_b,
            o_w=t.pop(a + "o_proj.weight"),
            post_norm=t.pop(prefix + "post_attention_layernorm.weight"),
            gate_up_w=gu,
            down_w=t.pop(m + "down_proj.weight"),
        )

    @staticmethod
    def expected_shapes(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, bias: bool) -> dict:
        a, m = prefix + "self_attn.", prefix + "mlp."
        e = {
            a + "q_proj.weight": (heads * head_dim, hidden),
            a + "k_proj.weight": (kv_heads * head_dim, hidden),
            a + "v_proj.weight": (kv_heads * head_dim, hidden),
            a + "o_proj.weight": (hidden, heads * head_dim),
            m + "gate_proj.weight": (inter, hidden),
            m + "up_proj.weight": (inter, hidden),
            m + "down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
        if bias:
            e.update({a + "q_proj.bias": (heads * head_dim,), a + "k_proj.bias": (kv_heads * head_dim,), a + "v_proj.bias": (kv_heads * head_dim,)})
        return e


def run_decoder_stack(
    ops,
    layers: List[DecoderLayer],
    x: torch.Tensor,
    positions: torch.Tensor,
    attn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rope_theta: float,
    eps: float,
    final_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [T, hidden] -> hidden states after the last layer (after `final_norm` if given, else the
    plain residual stream x + last layer output)."""
    T = x.shape[0]
    qd, kd = num_heads * head_dim, num_kv_heads * head_dim
    residual = None
    for i, L in enumerate(layers):
        if residual is None:
            residual = x
            h = ops.rms_norm(x, L.input_norm, eps)
        else:
            h, residual = ops.fused_add_rms_norm(x, residual, L.input_norm, eps)
        qkv = linear(ops, h, L.qkv_w, L.qkv_b)
        q = qkv[:, :qd].view(T, num_heads, head_dim)
        k = qkv[:, qd : qd + kd].view(T, num_kv_heads, head_dim)
        v = qkv[:, qd + kd :].view(T, num_kv_heads, head_dim)
        q, k = ops.rotary_embedding(q, k, positions, rope_theta)
        o = attn(i, q, k, v.contiguous())
        x = linear(ops, o.reshape(T, qd), L.o_w)
        h, residual = ops.fused_add_rms_norm(x, residual, L.post_norm, eps)
        x = linear(ops, ops.silu_and_mul(linear(ops, h, L.gate_up_w)), L.down_w)
    if final_norm is not None:
        y, _ = ops.fused_add_rms_norm(x, residual, final_norm, eps)
        return y
    return x + residual


class PagedKVCache:
    """Per-layer paged K/V pools `[num_blocks, block_size, Hkv, D]` with a free list of blocks.

    Minimal on purpose (the runtime owns the real allocator): enough for `LLM.generate`, the TTS AR
    decoder and tests of the paged path."""

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.free = list(range(num_blocks - 1, -1, -1))
        self.device = device

    def new_sequence(self) -> "SequenceKV":
        return SequenceKV(self)


class SequenceKV:
    """One sequence's block list and length inside a PagedKVCache."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.blocks: List[int] = []
        self.length = 0

    def reserve(self, n_new: int) -> torch.Tensor:
        """Grow by n_new tokens; returns their slot indices (int64 [n_new])."""
        bs = self.cache.block_size
        need = (self.length + n_new + bs - 1) // bs
        while len(self.blocks) < need:
            if not self.cache.free:
                raise RuntimeError(f"PagedKVCache: out of blocks ({len(self.blocks)} held, {need} needed)")
            self.blocks.append(self.cache.free.pop())
        pos = torch.arange(self.length, self.length + n_new)
        blk = torch.tensor(self.blocks, dtype=torch.int64)[pos // bs]
        self.length += n_new
        return (blk * bs + pos % bs).to(self.cache.device)

    def block_table(self) -> torch.Tensor:
        return torch.tensor([self.blocks], dtype=torch.int32, device=self.cache.device)

    def release(self) -> None:
        self.cache.free.extend(reversed(self.blocks))
        self.blocks, self.length = [], 0

    def attn_fn(self, ops, slots: torch.Tensor, q_len: int, causal: bool = True):
        """An `attn(i, q, k, v)` that stores this step's k/v at `slots` and attends over the cache."""
        c = self.cache
        bt = torch.tensor([self.blocks], dtype=torch.int32)  # host metadata: the plan copies it once
        kv_lens = torch.tensor([self.length], dtype=torch.int32)
        cu = torch.tensor([0, q_len], dtype=torch.int32)
        run = None

        def attn(i, q, k, v):
            nonlocal run
            ops.store_kv(k, v, c.k[i], c.v[i], slots)
            if run is None:  # heads known from the first layer's q
                run = ops.paged_attention_plan(bt, kv_lens, cu, num_q_heads=q.shape[1], num_kv_heads=c.k[i].shape[2],
                                               head_dim=q.shape[2], block_size=c.k[i].shape[1], causal=causal, device=q.device)
            return run(q, c.k[i], c.v[i])

        return attn

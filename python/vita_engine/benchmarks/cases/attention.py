"""KV-cache write, paged decode and chunked prefill (Qwen2.5-7B attention: 28 query / 4 KV heads x
128, block 16; decode also at the TTS's 14/14 heads x 64), and varlen encoder attention (audio encoder: 16 heads x 64 with the rel-PE key bias;
InternViT: 16 heads x 64 over 1025-token tiles).

References: torch SDPA on the dense equivalent (K/V gathered out of the pages beforehand, untimed),
the faster of enable_gqa=True and pre-expanded heads; for chunked prefill also the lower-right causal
bias object instead of a boolean mask. KV write: index_copy_ / index_put_ on the flattened cache."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..harness import Case
from ._spec import Spec, dtype_name, randn, rel_err

HQ, HKV, D, BS = 28, 4, 128, 16
POOL_BLOCKS = 1024  # store_kv: a 16k-token pool
EXPAND_LIMIT = 2 << 30  # bytes of pre-expanded K/V for the sdpa_expanded variant


def _working(fns: dict) -> dict:
    """Drop reference variants this torch build cannot run (e.g. no enable_gqa before 2.5)."""
    ok = {}
    for k, f in fns.items():
        try:
            f()
            ok[k] = f
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return ok


def _store_kv(rows):
    def build(device, dtype):
        from ... import ops

        g = torch.Generator().manual_seed(10)
        k, v = randn(g, rows, HKV, D, device=device, dtype=dtype), randn(g, rows, HKV, D, device=device, dtype=dtype)
        kc = torch.zeros(POOL_BLOCKS, BS, HKV, D, device=device, dtype=dtype)
        vc = torch.zeros_like(kc)
        slots = torch.randperm(POOL_BLOCKS * BS, generator=g)[:rows].to(device)
        kf, vf = kc.view(-1, HKV, D), vc.view(-1, HKV, D)

        def index_copy():
            kf.index_copy_(0, slots, k)
            vf.index_copy_(0, slots, v)

        def index_put():
            kf[slots] = k
            vf[slots] = v

        def check():
            ops.store_kv(k, v, kc, vc, slots)
            a, b = kc.clone(), vc.clone()
            kc.zero_(), vc.zero_()
            index_copy()
            return max(rel_err(a, kc), rel_err(b, vc))

        return Case(f"store_kv_t{rows}", "store_kv", dtype_name(dtype), f"{rows} rows x {HKV}x{D} into [{POOL_BLOCKS}, {BS}, {HKV}, {D}]",
                    lambda: ops.store_kv(k, v, kc, vc, slots), {"index_copy_": index_copy, "index_put_": index_put},
                    bytes=4 * k.numel() * k.element_size(), check=check)
    return build


def _paged(batch, q_len, kv_len, name, HQ=HQ, HKV=HKV, D=D):
    def build(device, dtype):
        from ... import ops

        g = torch.Generator().manual_seed(11)
        nblk = -(-kv_len // BS)
        kc = randn(g, batch * nblk, BS, HKV, D, device=device, dtype=dtype)
        vc = randn(g, batch * nblk, BS, HKV, D, device=device, dtype=dtype)
        bt = torch.randperm(batch * nblk, generator=g).to(torch.int32).view(batch, nblk)
        kvl = torch.full((batch,), kv_len, dtype=torch.int32)
        cu = torch.arange(batch + 1, dtype=torch.int32) * q_len
        q = randn(g, batch * q_len, HQ, D, device=device, dtype=dtype)
        # host metadata, as the model layers build it: one plan per forward, run by every layer
        plan = ops.PagedAttentionPlan(bt, kvl, cu, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=BS, device=device)
        out = torch.empty_like(q)
        btd = bt.long().to(device)
        kd = kc[btd].reshape(batch, nblk * BS, HKV, D)[:, :kv_len].transpose(1, 2).contiguous()
        vd = vc[btd].reshape(batch, nblk * BS, HKV, D)[:, :kv_len].transpose(1, 2).contiguous()
        qd = q.view(batch, q_len, HQ, D).transpose(1, 2).contiguous()
        # pre-expanded heads cost (HQ/HKV)x the dense K/V: skipped where that would not fit comfortably
        expand = 2 * kd.numel() * (HQ // HKV) * kd.element_size() <= EXPAND_LIMIT
        kr, vr = (kd.repeat_interleave(HQ // HKV, 1), vd.repeat_interleave(HQ // HKV, 1)) if expand else (None, None)
        mask = None
        refs = {}
        if q_len > 1:  # bottom-right causal: query j sees keys < kv_len - q_len + j + 1
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
            try:
                from torch.nn.attention.bias import causal_lower_right

                lr = causal_lower_right(q_len, kv_len)
                if expand:
                    refs["sdpa_lower_right_expanded"] = lambda: F.scaled_dot_product_attention(qd, kr, vr, attn_mask=lr)
            except ImportError:
                pass
        refs["sdpa_gqa"] = lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)
        if expand:
            refs["sdpa_expanded"] = lambda: F.scaled_dot_product_attention(qd, kr, vr, attn_mask=mask)
        refs = _working(refs)
        if not refs:
            raise RuntimeError("no SDPA variant runs on this torch build")
        ref0 = refs.get("sdpa_expanded") or refs.get("sdpa_gqa") or next(iter(refs.values()))
        pairs = batch * HQ * sum(kv_len - q_len + j + 1 for j in range(q_len))
        es = kc.element_size()
        kind = "decode" if q_len == 1 else "prefill"

        def check():
            return rel_err(plan.run(q, kc, vc, out=out), ref0().transpose(1, 2).reshape(batch * q_len, HQ, D))

        return Case(name, f"paged_{kind}", dtype_name(dtype), f"b{batch} q{q_len} kv{kv_len}, {HQ}/{HKV}x{D}, block {BS}",
                    lambda: plan.run(q, kc, vc, out=out), refs,
                    bytes=2 * batch * kv_len * HKV * D * es + 2 * q.numel() * es, flops=4 * pairs * D, check=check)
    return build


def _varlen(name, seqs, heads, dim, key_bias):
    def build(device, dtype):
        from ... import ops

        g = torch.Generator().manual_seed(12)
        L, B = seqs
        T = L * B
        q, k, v = (randn(g, T, heads, dim, device=device, dtype=dtype) for _ in range(3))
        cu = torch.arange(B + 1, dtype=torch.int32) * L
        scale = 1.0 / math.sqrt(dim)
        kb = randn(g, heads, T, device=device, dtype=dtype, scale=0.5) if key_bias else None
        qd, kd, vd = (t.view(B, L, heads, dim).transpose(1, 2).contiguous() for t in (q, k, v))
        # the key bias as an additive SDPA mask broadcast over queries: [B, H, 1, L]
        md = kb.view(heads, B, L).transpose(0, 1)[:, :, None, :].contiguous() if key_bias else None
        ours = lambda: ops.varlen_attention(q, k, v, cu, causal=False, key_bias=kb, scale=scale)  # noqa: E731
        ref = lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=md, scale=scale)  # noqa: E731
        shape = f"{B}x{L} tokens, {heads}x{dim}" + (", key bias" if key_bias else "")
        return Case(name, "varlen_attention", dtype_name(dtype), shape, ours, {"sdpa": ref}, flops=4 * B * heads * L * L * dim,
                    bytes=4 * q.numel() * q.element_size(),
                    check=lambda: rel_err(ours(), ref().transpose(1, 2).reshape(T, heads, dim)))
    return build


SPECS = [
    Spec("store_kv_t16", "store_kv", _store_kv(16)),
    Spec("store_kv_t256", "store_kv", _store_kv(256)),
    *[Spec(f"paged_decode_b{b}_kv{kv // 1024}k", "paged_decode", _paged(b, 1, kv, f"paged_decode_b{b}_kv{kv // 1024}k"),
           full_only=(b, kv) not in ((1, 4096), (16, 4096)))
      for b in (1, 16, 64) for kv in (1024, 4096, 16384)],
    # the TTS AR decoder's attention: 14 query = 14 KV heads x 64, a segment's prefix + generated tokens
    Spec("paged_decode_tts_b16_kv128", "paged_decode", _paged(16, 1, 128, "paged_decode_tts_b16_kv128", 14, 14, 64)),
    Spec("paged_prefill_c64_kv4k", "paged_prefill", _paged(1, 64, 4096 + 64, "paged_prefill_c64_kv4k")),
    Spec("paged_prefill_c256_kv4k", "paged_prefill", _paged(1, 256, 4096 + 256, "paged_prefill_c256_kv4k")),
    # audio encoder: a 10 s utterance (1000 fbank frames -> 248 encoder frames), rel-PE key bias
    Spec("varlen_audio_t248", "varlen_attention", _varlen("varlen_audio_t248", (248, 1), 16, 64, True)),
    # InternViT-300M: two 448 px tiles of 1025 tokens
    Spec("varlen_vision_2x1025", "varlen_attention", _varlen("varlen_vision_2x1025", (1025, 2), 16, 64, False), full_only=True),
]

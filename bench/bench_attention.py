"""pytest-benchmark: paged attention (decode and chunked prefill) vs torch SDPA on the gathered
dense equivalent, same shapes, same run; the ratio sdpa_ms / ours_ms is printed and stored in
extra_info (>= 1 means we are at least as fast).

Run: PYTHONPATH=python pytest bench/bench_attention.py -s --benchmark-group-by=param:case
CPU runs a reduced grid by default (VITA_BENCH_FULL=1 for all shapes); CUDA runs every shape and
reports GB/s (decode: K/V bytes read) and TFLOP/s (prefill: 4 * visible pairs * D).
Model shapes: Qwen2.5-7B attention, 28 query heads / 4 KV heads x 128, block size 16.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import vita_engine  # noqa: E402
from vita_engine import ops  # noqa: E402

CUDA_OK = torch.cuda.is_available() and vita_engine.cuda_available()
FULL = os.environ.get("VITA_BENCH_FULL") == "1"
HQ, HKV, D, BS = 28, 4, 128, 16

# (name, batch, q_len per sequence, kv_len incl. the chunk)
DECODE = [(f"decode-b{b}-kv{kv // 1024}k", b, 1, kv) for b in (1, 16, 64) for kv in (1024, 4096, 16384)]
PREFILL = [(f"prefill-c{c}-hist4k", 1, c, 4096 + c) for c in (64, 256)]
CPU_REDUCED = {"decode-b1-kv4k", "decode-b16-kv4k", "prefill-c64-hist4k", "prefill-c256-hist4k"}


def cases(device: str):
    allc = DECODE + PREFILL
    if device == "cpu" and not FULL:
        return [c for c in allc if c[0] in CPU_REDUCED]
    return allc


def default_dtype(device: str):
    # CPU models run in float32 (torch's bf16 CPU SDPA uses AMX tiles we do not target); GPU in bf16
    return torch.float32 if device == "cpu" else torch.bfloat16


def build(batch, q_len, kv_len, device, dtype, seed=0):
    """Paged problem (shuffled pages) + its dense equivalent for SDPA ([B, H, L, D])."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-kv_len // BS)
    kc = torch.randn(batch * nblk, BS, HKV, D, generator=g).to(device=device, dtype=dtype)
    vc = torch.randn(batch * nblk, BS, HKV, D, generator=g).to(device=device, dtype=dtype)
    bt = torch.randperm(batch * nblk, generator=g).to(torch.int32).view(batch, nblk).to(device)
    kvl = torch.full((batch,), kv_len, dtype=torch.int32)
    cu = torch.arange(batch + 1, dtype=torch.int32) * q_len
    q = torch.randn(batch * q_len, HQ, D, generator=g).to(device=device, dtype=dtype)
    plan = ops.PagedAttentionPlan(bt, kvl.to(device), cu, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=BS,
                                  max_q_len=q_len, num_tokens=batch * q_len, device=device)
    out = torch.empty_like(q)
    kd = kc[bt.long()].reshape(batch, nblk * BS, HKV, D)[:, :kv_len].transpose(1, 2).contiguous()
    vd = vc[bt.long()].reshape(batch, nblk * BS, HKV, D)[:, :kv_len].transpose(1, 2).contiguous()
    qd = q.view(batch, q_len, HQ, D).transpose(1, 2).contiguous()
    mask = None
    if q_len > 1:  # bottom-right causal: query j sees keys < kv_len - q_len + j + 1
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    kr, vr = kd.repeat_interleave(HQ // HKV, 1), vd.repeat_interleave(HQ // HKV, 1)
    ours = lambda: plan.run(q, kc, vc, out=out)  # noqa: E731
    sdpa_gqa = lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)  # noqa: E731
    sdpa_rep = lambda: F.scaled_dot_product_attention(qd, kr, vr, attn_mask=mask)  # noqa: E731  (expansion not timed)
    pairs = batch * HQ * sum(kv_len - q_len + j + 1 for j in range(q_len))
    work = dict(kv_bytes=2 * batch * kv_len * HKV * D * kc.element_size(), flops=4 * pairs * D)
    return ours, [sdpa_gqa, sdpa_rep], work


def time_ms(fn, device, reps=7, min_time_s=0.3):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(max(reps, 20)):
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        return statistics.median(ts)
    ts = []
    t_end = time.perf_counter() + min_time_s
    while len(ts) < reps or (time.perf_counter() < t_end and len(ts) < 200):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def compare(ours, refs, device, rounds=3):
    """Interleaved rounds (ours, then each torch variant); medians. Returns (ours_ms, best torch ms)."""
    o, r = [], []
    for _ in range(rounds):
        o.append(time_ms(ours, device))
        r.append(min(time_ms(f, device) for f in refs))
    return statistics.median(o), statistics.median(r)


DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])
PARAMS = [pytest.param(dev, c, id=f"{dev}-{c[0]}", marks=[pytest.mark.cuda] if dev == "cuda" else []) for dev in DEVICES for c in cases(dev)]


@pytest.mark.parametrize("device,case", PARAMS)
def test_paged_attention(benchmark, device, case):
    name, batch, q_len, kv_len = case
    dtype = default_dtype(device)
    ours, refs, work = build(batch, q_len, kv_len, device, dtype)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    ours_ms, torch_ms = compare(ours, refs, device, rounds=2)

    def run():
        ours()
        sync()

    benchmark.group = f"attention-{device}"
    benchmark.pedantic(run, rounds=5 if device == "cpu" else 50, warmup_rounds=1)
    ratio = torch_ms / ours_ms
    benchmark.extra_info.update(case=name, ours_ms=ours_ms, sdpa_ms=torch_ms, ratio=ratio, dtype=str(dtype))
    extra = ""
    if device == "cuda":
        if q_len == 1:
            extra = f"  {work['kv_bytes'] / (ours_ms * 1e-3) / 1e9:7.0f} GB/s"
        else:
            extra = f"  {work['flops'] / (ours_ms * 1e-3) / 1e12:6.1f} TFLOP/s"
        benchmark.extra_info["metric"] = extra.strip()
    print(f"\n{device} {name} {str(dtype)[6:]}: ours {ours_ms:.3f} ms  sdpa {torch_ms:.3f} ms  ratio {ratio:.2f}{extra}")

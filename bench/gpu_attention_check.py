#!/usr/bin/env python
"""GPU check of the CUDA attention kernels: correctness sweep + timing (standalone, no pytest).

    PYTHONPATH=python python bench/gpu_attention_check.py [--quick] [--no-bench] [--no-check]

(1) Correctness of vita_engine.ops.paged_attention / PagedAttentionPlan / varlen_attention /
    store_kv against vita_engine.ops.reference computed in float64: shuffled block tables, ragged
    q_len (1/2/7/64/200 mixed), kv lengths 1..4100 incl. page-boundary cases, GQA 1/2/4/7/8, head
    dim 64/128, bf16/fp16/fp32, block sizes 16/32, NaN-poisoned outputs and NaN-poisoned unused
    pages / slots past kv_len, split-KV decode, CUDA-graph capture of a planned decode.
(2) Timing with CUDA events (median over reps after warm-up, inputs rotated beyond L2 where
    feasible) against torch scaled_dot_product_attention (best backend) on the dense equivalent:
    decode (batch 1/16/64 x kv 1k/4k/16k, 28/4 heads x 128, bf16) as ms / GB/s / % of measured
    device-to-device copy bandwidth, chunked prefill (chunk 64/256 on 4k history) as ms / TFLOP/s,
    and InternViT-shaped varlen attention.
Each case catches its own exceptions and the script keeps going; a summary line ends the run.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

try:
    import vita_engine.ops as ops
    from vita_engine.ops import reference as ref
except Exception:  # pragma: no cover - reported below
    print("FAIL import vita_engine.ops:\n" + traceback.format_exc())
    sys.exit(1)

DEV = "cuda"
RESULTS = {"pass": 0, "fail": 0, "error": 0}
TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # x max(1, max|ref|)
DT_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def report(name, err, tol, extra="", scale=1.0):
    tol = tol * max(1.0, scale)
    ok = err is not None and math.isfinite(err) and err <= tol
    RESULTS["pass" if ok else "fail"] += 1
    print(f"{'PASS' if ok else 'FAIL'} {name}: max_err={err:.3e} tol={tol:.1e} {extra}", flush=True)
    return ok


def run_case(name, fn):
    try:
        fn()
    except Exception as e:  # keep going
        RESULTS["error"] += 1
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        print(f"FAIL {name}: exception {msg}", flush=True)


def amax(t):
    return float(t.abs().max()) if t.numel() else 0.0


def max_err(out, expect):
    o = out.double()
    e = expect.double()
    if o.shape != e.shape:
        return float("inf")
    if o.numel() == 0:
        return 0.0
    d = (o - e).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max())


# ------------------------------------------------------------------------------------------------
# paged cache construction
# ------------------------------------------------------------------------------------------------
def build_paged(q_lens, kv_lens, hq, hkv, d, bs, dtype, gen, extra_blocks=7, poison=True):
    """Random q + a paged cache with shuffled block ids; every cache row not holding a valid key
    (unused pages and rows past kv_len in the last page) is NaN when poison. Built on the device."""
    B = len(q_lens)
    nblk = [(kv + bs - 1) // bs for kv in kv_lens]
    total = sum(nblk) + extra_blocks
    max_blocks = max(max(nblk), 1) + 1
    perm = torch.randperm(total, generator=gen)
    bt = torch.full((B, max_blocks), int(perm[-1]), dtype=torch.int32)  # unused entries: a poisoned block
    fill = float("nan") if poison else 0.0
    k_cache = torch.full((total, bs, hkv, d), fill, dtype=dtype, device=DEV)
    v_cache = torch.full((total, bs, hkv, d), fill, dtype=dtype, device=DEV)
    kflat, vflat = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    used = 0
    for b in range(B):
        ids = perm[used : used + nblk[b]]
        used += nblk[b]
        bt[b, : len(ids)] = ids.to(torch.int32)
        kv = kv_lens[b]
        if kv == 0:
            continue
        pos = torch.arange(kv)
        slots = (ids[pos // bs] * bs + pos % bs).to(DEV)
        kflat[slots] = torch.randn(kv, hkv, d, device=DEV).to(dtype)
        vflat[slots] = torch.randn(kv, hkv, d, device=DEV).to(dtype)
    T = sum(q_lens)
    q = torch.randn(T, hq, d, device=DEV).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    kvl = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, bt.to(DEV), kvl, cu


def paged_ref(q, kc, vc, bt, kvl, cu, causal=True, scale=None):
    return ref.paged_attention(q.double(), kc.double(), vc.double(), bt, kvl, cu, causal=causal, scale=scale)


def check_paged(name, q_lens, kv_lens, hq, hkv, d, bs, dtype, gen, *, causal=True, use_plan=True, scale=None):
    q, kc, vc, bt, kvl, cu = build_paged(q_lens, kv_lens, hq, hkv, d, bs, dtype, gen)
    expect = paged_ref(q, kc, vc, bt, kvl, cu, causal=causal, scale=scale)
    tol = TOL[dtype]
    if use_plan:
        plan = ops.PagedAttentionPlan(bt, kvl, cu, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, causal=causal)
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        res = plan.run(q, kc, vc, scale=scale, out=out)
        if res is None:
            res = out
        splits = getattr(plan, "num_splits", "?")
        torch.cuda.synchronize()
        report(f"{name} [plan]", max_err(res, expect), tol, f"splits={splits}", scale=amax(expect))
    out2 = ops.paged_attention(q, kc, vc, bt, kvl, cu, causal=causal, scale=scale)
    torch.cuda.synchronize()
    report(f"{name} [call]", max_err(out2, expect), tol, scale=amax(expect))


def correctness(quick=False):
    gen = torch.Generator().manual_seed(1234)
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    groups = [1, 2, 4, 7, 8]
    # mixed batch: decode, short spec-decode, chunked prefill, page-boundary kv lengths
    mixed_q = [1, 2, 7, 64, 200, 1, 1, 3]
    mixed_kv = [1, 16, 33, 4100, 200, 17, 256, 1000]
    decode_q = [1] * 6
    decode_kv = [1, 15, 16, 257, 4100, 2048]
    spec_q = [4, 2, 3, 4]
    spec_kv = [4, 31, 32, 1500]
    t0 = time.time()
    for dtype in dtypes:
        for d in (64, 128):
            for gi, grp in enumerate(groups):
                if quick and grp not in (1, 7):
                    continue
                hkv = 2 if grp != 8 else 1
                hq = hkv * grp
                bs = (16, 32)[(gi + d // 64) % 2]
                tag = f"paged {DT_NAME[dtype]} D={d} Hq/Hkv={hq}/{hkv} bs={bs}"
                run_case(tag + " mixed", lambda: check_paged(tag + " mixed", mixed_q, mixed_kv, hq, hkv, d, bs, dtype, gen))
                run_case(tag + " decode", lambda: check_paged(tag + " decode", decode_q, decode_kv, hq, hkv, d, bs, dtype, gen))
                if grp in (1, 7):
                    run_case(tag + " spec q<=4", lambda: check_paged(tag + " spec q<=4", spec_q, spec_kv, hq, hkv, d, bs, dtype, gen))
    # non-causal, explicit scale, Qwen2.5-7B head layout, single long sequence decode (max splits)
    for dtype in (torch.bfloat16, torch.float32):
        tag = f"paged {DT_NAME[dtype]} D=128 28/4 bs=16"
        run_case(tag + " noncausal", lambda: check_paged(tag + " noncausal", [1, 64, 5], [300, 64, 900], 28, 4, 128, 16, dtype, gen,
                                                         causal=False))
        run_case(tag + " scale=0.3", lambda: check_paged(tag + " scale=0.3", [1, 100], [100, 513], 28, 4, 128, 16, dtype, gen, scale=0.3))
        run_case(tag + " B=1 kv=4100", lambda: check_paged(tag + " B=1 kv=4100", [1], [4100], 28, 4, 128, 16, dtype, gen))
    # both fp16/bf16 chunked-prefill kernels, forced (the default picks one by grid size)
    for tile in ("64", "16"):
        os.environ["VITA_ATTN_PREFILL_TILE"] = tile
        try:
            for dtype in (torch.bfloat16, torch.float16):
                for d in (64, 128):
                    for grp in (1, 7, 8):
                        hkv = 2 if grp != 8 else 1
                        hq = hkv * grp
                        tag = f"paged[prefill tile {tile}] {DT_NAME[dtype]} D={d} Hq/Hkv={hq}/{hkv} bs=16"
                        run_case(tag, lambda: check_paged(tag, mixed_q, mixed_kv, hq, hkv, d, 16, dtype, gen))
                        if grp == 7:
                            tag2 = tag + " noncausal"
                            run_case(tag2, lambda: check_paged(tag2, mixed_q, mixed_kv, hq, hkv, d, 16, dtype, gen, causal=False))
        finally:
            os.environ.pop("VITA_ATTN_PREFILL_TILE", None)
    # the SIMT decode kernel for fp16/bf16 (normally the tensor-core one): VITA_ATTN_SIMT_DECODE=1
    os.environ["VITA_ATTN_SIMT_DECODE"] = "1"
    try:
        for dtype in (torch.bfloat16, torch.float16):
            for d in (64, 128):
                for hq, hkv in ((28, 4), (8, 8), (16, 2)):
                    tag = f"paged[SIMT decode] {DT_NAME[dtype]} D={d} Hq/Hkv={hq}/{hkv} bs=16"
                    run_case(tag + " decode", lambda: check_paged(tag + " decode", decode_q, decode_kv, hq, hkv, d, 16, dtype, gen))
                    run_case(tag + " spec q<=4", lambda: check_paged(tag + " spec q<=4", spec_q, spec_kv, hq, hkv, d, 16, dtype, gen))
    finally:
        os.environ.pop("VITA_ATTN_SIMT_DECODE", None)
    print(f"-- paged sweep {time.time() - t0:.1f}s", flush=True)

    # varlen
    t0 = time.time()
    for dtype in dtypes:
        for d in (64, 128):
            for hq, hkv in ((16, 16), (8, 4)):
                for causal in (False, True):
                    for bias in (False, True):
                        if quick and (hq, hkv) == (8, 4) and bias:
                            continue
                        lens = [1025, 1, 17, 300, 64] if d == 64 else [129, 1, 64, 513]
                        tag = f"varlen {DT_NAME[dtype]} D={d} Hq/Hkv={hq}/{hkv} causal={causal} bias={bias}"

                        def case(lens=lens, dtype=dtype, d=d, hq=hq, hkv=hkv, causal=causal, bias=bias, tag=tag):
                            T = sum(lens)
                            q = torch.randn(T, hq, d, generator=gen).to(dtype).to(DEV)
                            k = torch.randn(T, hkv, d, generator=gen).to(dtype).to(DEV)
                            v = torch.randn(T, hkv, d, generator=gen).to(dtype).to(DEV)
                            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
                            kb = (torch.randn(hq, T, generator=gen) * 2).to(dtype).to(DEV) if bias else None
                            expect = ref.varlen_attention(q.double(), k.double(), v.double(), cu, causal=causal,
                                                          key_bias=None if kb is None else kb.double())
                            out = ops.varlen_attention(q, k, v, cu, causal=causal, key_bias=kb)
                            torch.cuda.synchronize()
                            report(tag, max_err(out, expect), TOL[dtype], scale=amax(expect))

                        run_case(tag, case)
    print(f"-- varlen sweep {time.time() - t0:.1f}s", flush=True)

    # store_kv
    for dtype in dtypes:
        for idt in (torch.int32, torch.int64):
            for bs in (16, 32):
                tag = f"store_kv {DT_NAME[dtype]} slots={str(idt).split('.')[-1]} bs={bs}"

                def case(dtype=dtype, idt=idt, bs=bs, tag=tag):
                    T, hkv, d, nb = 37, 4, 128, 9
                    k = torch.randn(T, hkv, d, generator=gen).to(dtype).to(DEV)
                    v = torch.randn(T, hkv, d, generator=gen).to(dtype).to(DEV)
                    slots = torch.randperm(nb * bs, generator=gen)[:T].to(idt)
                    slots[::5] = -1
                    slots = slots.to(DEV)
                    kc = torch.full((nb, bs, hkv, d), float("nan"), dtype=dtype, device=DEV)
                    vc = kc.clone()
                    kc2, vc2 = kc.clone(), vc.clone()
                    ops.store_kv(k, v, kc, vc, slots)
                    ref.store_kv(k, v, kc2, vc2, slots)
                    torch.cuda.synchronize()
                    same = torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0)) and torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
                    report(tag, 0.0 if same else float("inf"), 0.0, "(bit-exact, skipped slots untouched)")

                run_case(tag, case)
    # store_kv with a non-16-byte-aligned row view (scalar path): head_dim 6 slice of a wider tensor
    def store_unaligned():
        T, hkv, d, nb, bs = 11, 2, 8, 4, 16
        big = torch.randn(T, hkv, d + 1, generator=gen).to(torch.bfloat16).to(DEV)
        k = big[..., 1:]  # last dim dense, rows start 2 bytes off 16-byte alignment
        v = big[..., :d]
        slots = torch.arange(T, dtype=torch.int64, device=DEV) * 3
        kc = torch.zeros(nb, bs, hkv, d, dtype=torch.bfloat16, device=DEV)
        vc = kc.clone()
        kc2, vc2 = kc.clone(), vc.clone()
        ops.store_kv(k, v, kc, vc, slots)
        ref.store_kv(k, v, kc2, vc2, slots)
        torch.cuda.synchronize()
        report("store_kv unaligned view", 0.0 if (torch.equal(kc, kc2) and torch.equal(vc, vc2)) else float("inf"), 0.0)

    run_case("store_kv unaligned view", store_unaligned)

    # CUDA graph capture of a planned decode (no host sync / allocation inside run)
    def graph_case():
        q, kc, vc, bt, kvl, cu = build_paged([1] * 4, [700, 33, 4100, 1], 28, 4, 128, 16, torch.bfloat16, gen)
        plan = ops.PagedAttentionPlan(bt, kvl, cu, num_q_heads=28, num_kv_heads=4, head_dim=128, block_size=16)
        out = torch.empty_like(q)
        plan.run(q, kc, vc, out=out)  # warm-up (sets smem attributes)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                plan.run(q, kc, vc, out=out)
        torch.cuda.current_stream().wait_stream(s)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        report("paged decode CUDA-graph replay", max_err(out, paged_ref(q, kc, vc, bt, kvl, cu)), TOL[torch.bfloat16],
               f"splits={getattr(plan, 'num_splits', '?')}")

    run_case("paged decode CUDA-graph replay", graph_case)

    # head_dim outside {64, 128} must be a clear error
    def bad_d():
        q, kc, vc, bt, kvl, cu = build_paged([1], [10], 4, 4, 96, 16, torch.bfloat16, gen, poison=False)
        try:
            ops.paged_attention(q, kc, vc, bt, kvl, cu)
            torch.cuda.synchronize()
            print("INFO paged_attention D=96 ran without error (no restriction, or a fallback)", flush=True)
            RESULTS["pass"] += 1
        except (ValueError, TypeError) as e:
            print(f"PASS paged_attention D=96 raises {type(e).__name__}: {e}", flush=True)
            RESULTS["pass"] += 1

    run_case("paged_attention D=96", bad_d)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def time_fn(fns, reps=50, warmup=8, per_graph=10, use_graph=True):
    """Median ms of one call; fns is a list of thunks cycled through (input rotation).

    The calls are captured into a CUDA graph (per_graph calls per replay) so host launch overhead
    does not leak into the device time; if capture fails (a host sync in the call), the calls are
    queued eagerly behind a device sleep and timed in batches."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    graph = None
    try:
        if not use_graph:
            raise RuntimeError("eager timing requested")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                for i in range(per_graph):
                    fns[i % len(fns)]()
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        torch.cuda.synchronize()
        graph = g
    except Exception:
        torch.cuda.synchronize()
        graph = None
    if graph is not None:
        for i in range(reps):
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) / per_graph
    try:
        torch.cuda._sleep(2_000_000)  # let the host run ahead of the device
    except Exception:
        pass
    for i in range(reps):
        starts[i].record()
        for j in range(per_graph):
            fns[(i * per_graph + j) % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends)) / per_graph


def copy_bandwidth():
    n = 512 * 1024 * 1024  # bytes per buffer
    a = torch.empty(n, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = time_fn([lambda: b.copy_(a)], reps=20, warmup=3, per_graph=2)
    del a, b
    return 2 * n / (ms * 1e-3) / 1e9  # read + write GB/s


def sdpa_best(q, k, v, mask=None, is_causal=False, enable_gqa=False):
    """(best ms thunk name, thunk) over the SDPA backends that accept the problem."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cands = []
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):

        def f(be=be):
            with sdpa_kernel([be]):
                kw = {"enable_gqa": True} if enable_gqa else {}
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kw)

        try:
            f()
            torch.cuda.synchronize()
            cands.append((be.name, f))
        except Exception:
            continue
    return cands


def bench_sdpa(cands, reps):
    best = (float("inf"), "none")
    for name, f in cands:
        try:
            ms = time_fn([f], reps=reps)
            if ms < best[0]:
                best = (ms, name)
        except Exception:
            continue
    return best


def bench_decode(bw, quick=False):
    hq, hkv, d, bs, dtype = 28, 4, 128, 16, torch.bfloat16
    es = 2
    l2_bytes = 4 * torch.cuda.get_device_properties(0).L2_cache_size if hasattr(torch.cuda.get_device_properties(0), "L2_cache_size") else 256 << 20
    print(f"\n== decode: paged bf16, Hq/Hkv = {hq}/{hkv}, D = {d}, block_size = {bs}; copy BW {bw:.0f} GB/s", flush=True)
    for B in (1, 16, 64):
        for kv in (1024, 4096, 16384):
            name = f"decode B={B:<3d} kv={kv:<6d}"

            def case(B=B, kv=kv, name=name):
                kv_bytes = 2 * B * kv * hkv * d * es
                rot = max(1, min(128, -(-l2_bytes // kv_bytes)))
                nblk = -(-kv // bs)
                pool = rot * B * nblk
                kc = torch.randn(pool, bs, hkv, d, device=DEV, dtype=dtype)
                vc = torch.randn(pool, bs, hkv, d, device=DEV, dtype=dtype)
                perm = torch.randperm(pool, device=DEV).to(torch.int32).view(rot, B, nblk)
                kvl = torch.full((B,), kv, dtype=torch.int32, device=DEV)
                cu = torch.arange(B + 1, dtype=torch.int32, device=DEV)
                qs = [torch.randn(B, hq, d, device=DEV, dtype=dtype) for _ in range(rot)]
                outs = [torch.empty_like(qs[0]) for _ in range(rot)]
                plans = [ops.PagedAttentionPlan(perm[r].contiguous(), kvl, cu, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                                block_size=bs) for r in range(rot)]
                fns = [lambda r=r: plans[r].run(qs[r], kc, vc, out=outs[r]) for r in range(rot)]
                ms = time_fn(fns, reps=50)
                moved = kv_bytes + 2 * B * hq * d * es
                gbs = moved / (ms * 1e-3) / 1e9
                os.environ["VITA_ATTN_SIMT_DECODE"] = "1"
                try:
                    ms_simt = time_fn(fns, reps=30)
                except Exception:
                    ms_simt = float("nan")
                finally:
                    os.environ.pop("VITA_ATTN_SIMT_DECODE", None)
                gbs_simt = moved / (ms_simt * 1e-3) / 1e9
                del kc, vc
                # dense SDPA equivalent (GQA): q [B, Hq, 1, D], k/v [B, Hkv, kv, D]
                drot = max(1, min(rot, (8 << 30) // max(kv_bytes, 1)))
                ks = [torch.randn(B, hkv, kv, d, device=DEV, dtype=dtype) for _ in range(drot)]
                vs = [torch.randn(B, hkv, kv, d, device=DEV, dtype=dtype) for _ in range(drot)]
                qd = [x.view(B, hq, 1, d) for x in qs[:drot]]
                gqa = True
                cands = sdpa_best(qd[0], ks[0], vs[0], enable_gqa=True)
                if not cands:  # no backend takes GQA: expand the kv heads (copies)
                    gqa = False
                    ks = [x.repeat_interleave(hq // hkv, dim=1) for x in ks]
                    vs = [x.repeat_interleave(hq // hkv, dim=1) for x in vs]
                    cands = sdpa_best(qd[0], ks[0], vs[0])
                best = (float("inf"), "none")
                for bname, _ in cands:
                    from torch.nn.attention import SDPBackend, sdpa_kernel

                    be = getattr(SDPBackend, bname)

                    def mk(r, be=be):
                        def f():
                            with sdpa_kernel([be]):
                                if gqa:
                                    F.scaled_dot_product_attention(qd[r], ks[r], vs[r], enable_gqa=True)
                                else:
                                    F.scaled_dot_product_attention(qd[r], ks[r], vs[r])
                        return f

                    try:
                        t = time_fn([mk(r) for r in range(drot)], reps=30)
                        if t < best[0]:
                            best = (t, bname)
                    except Exception:
                        pass
                ratio = best[0] / ms if math.isfinite(best[0]) else float("nan")
                print(f"{name}: {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s  {100 * gbs / bw:5.1f}% of copy BW  splits={plans[0].num_splits if hasattr(plans[0], 'num_splits') else '?'}"
                      f" | simt {ms_simt * 1e3:8.1f} us ({100 * gbs_simt / bw:5.1f}%)"
                      f" | sdpa[{best[1]}] {best[0] * 1e3:8.1f} us  speedup x{ratio:.2f}", flush=True)

            run_case(name, case)
            torch.cuda.empty_cache()


def bench_prefill():
    hq, hkv, d, bs, dtype = 28, 4, 128, 16, torch.bfloat16
    hist = 4096
    print(f"\n== chunked prefill: paged bf16, Hq/Hkv = {hq}/{hkv}, D = {d}, history {hist}", flush=True)
    for B in (1, 4, 16):
        for chunk in (64, 256):
            name = f"prefill B={B} chunk={chunk:<4d}"

            def case(B=B, chunk=chunk, name=name):
                kv = hist + chunk
                nblk = -(-kv // bs)
                kc = torch.randn(B * nblk, bs, hkv, d, device=DEV, dtype=dtype)
                vc = torch.randn(B * nblk, bs, hkv, d, device=DEV, dtype=dtype)
                bt = torch.randperm(B * nblk, device=DEV).to(torch.int32).view(B, nblk).contiguous()
                kvl = torch.full((B,), kv, dtype=torch.int32, device=DEV)
                cu = torch.arange(B + 1, dtype=torch.int32, device=DEV) * chunk
                q = torch.randn(B * chunk, hq, d, device=DEV, dtype=dtype)
                out = torch.empty_like(q)
                plan = ops.PagedAttentionPlan(bt, kvl, cu, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs)
                ms = time_fn([lambda: plan.run(q, kc, vc, out=out)], reps=50)
                # causal bottom-right: query j sees hist + j + 1 keys
                pairs = B * hq * sum(hist + j + 1 for j in range(chunk))
                flops = 4 * pairs * d
                tf = flops / (ms * 1e-3) / 1e12
                forced = {}
                for tile in ("64", "16"):
                    os.environ["VITA_ATTN_PREFILL_TILE"] = tile
                    try:
                        forced[tile] = time_fn([lambda: plan.run(q, kc, vc, out=out)], reps=30)
                    except Exception:
                        forced[tile] = float("nan")
                    finally:
                        os.environ.pop("VITA_ATTN_PREFILL_TILE", None)
                # dense equivalent
                kd = torch.randn(B, hkv, kv, d, device=DEV, dtype=dtype)
                vd = torch.randn(B, hkv, kv, d, device=DEV, dtype=dtype)
                qd = q.view(B, chunk, hq, d).transpose(1, 2).contiguous()
                best = (float("inf"), "none")
                try:
                    from torch.nn.attention.bias import causal_lower_right

                    mask = causal_lower_right(chunk, kv)
                    cands = sdpa_best(qd, kd, vd, mask=mask, enable_gqa=True)
                    # expanded heads for backends that refuse GQA
                    ke = kd.repeat_interleave(hq // hkv, dim=1)
                    ve = vd.repeat_interleave(hq // hkv, dim=1)
                    cands += [(n + "+expand", f) for n, f in sdpa_best(qd, ke, ve, mask=mask)]
                    best = bench_sdpa(cands, reps=30)
                except Exception as e:
                    print(f"  (sdpa failed: {e})")
                ratio = best[0] / ms if math.isfinite(best[0]) else float("nan")
                print(f"{name}: {ms * 1e3:8.1f} us  {tf:6.1f} TFLOP/s (tile64 {forced['64'] * 1e3:.1f} us, tile16 {forced['16'] * 1e3:.1f} us)"
                      f" | sdpa[{best[1]}] {best[0] * 1e3:8.1f} us  "
                      f"({flops / (best[0] * 1e-3) / 1e12:6.1f} TFLOP/s)  speedup x{ratio:.2f}", flush=True)

            run_case(name, case)
            torch.cuda.empty_cache()


def bench_varlen():
    print("\n== varlen (InternViT shape): bf16, 1025 tokens/seq, 16 heads x 64, bidirectional", flush=True)
    for B in (1, 8):
        name = f"varlen B={B}"

        def case(B=B, name=name):
            L, h, d, dtype = 1025, 16, 64, torch.bfloat16
            T = B * L
            q = torch.randn(T, h, d, device=DEV, dtype=dtype)
            k = torch.randn(T, h, d, device=DEV, dtype=dtype)
            v = torch.randn(T, h, d, device=DEV, dtype=dtype)
            cu = torch.arange(B + 1, dtype=torch.int32, device=DEV) * L
            ms = time_fn([lambda: ops.varlen_attention(q, k, v, cu)], reps=30, use_graph=False)
            flops = 4 * B * h * L * L * d
            qd, kd, vd = (x.view(B, L, h, d).transpose(1, 2).contiguous() for x in (q, k, v))
            best = bench_sdpa(sdpa_best(qd, kd, vd), reps=30)
            ratio = best[0] / ms if math.isfinite(best[0]) else float("nan")
            print(f"{name}: {ms * 1e3:8.1f} us  {flops / (ms * 1e-3) / 1e12:6.1f} TFLOP/s (incl. host call) | sdpa[{best[1]}] "
                  f"{best[0] * 1e3:8.1f} us  speedup x{ratio:.2f}", flush=True)

        run_case(name, case)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller correctness sweep and benchmark set")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        sys.exit(1)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    t0 = time.time()
    if not args.no_check:
        correctness(quick=args.quick)
    if not args.no_bench:
        bw = float("nan")
        try:
            bw = copy_bandwidth()
        except Exception as e:
            print(f"FAIL copy bandwidth: {e}")
        bench_decode(bw, quick=args.quick)
        bench_prefill()
        bench_varlen()
    print(f"\nSUMMARY pass={RESULTS['pass']} fail={RESULTS['fail']} error={RESULTS['error']} ({time.time() - t0:.0f}s)", flush=True)
    sys.exit(0 if RESULTS["fail"] == 0 and RESULTS["error"] == 0 else 1)


if __name__ == "__main__":
    main()

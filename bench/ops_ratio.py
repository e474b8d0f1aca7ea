"""Prints `op | device | dtype | vita ms | torch ms | ratio` for the row-wise ops and the
Python -> kernel call overhead. Ratio = torch / vita (> 1 means vita is faster).

Usage: PYTHONPATH=python python bench/ops_ratio.py [--device cpu|cuda] [--json out.json]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import time_fn  # noqa: E402
from bench_elementwise import CASES, _inputs  # noqa: E402

import vita_engine  # noqa: E402
from vita_engine import ops  # noqa: E402


def overhead_rows(device):
    C = vita_engine._C
    x = torch.randn(1, 64, device=device)
    w = torch.randn(64, device=device)
    out = torch.empty_like(x)
    s = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    rows = []
    n = 2000

    def per_call(fn):
        import time

        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    rows.append(("_C.rms_norm (torch tensors)", device, per_call(lambda: C.rms_norm(x, w, out, 1e-6, s))))
    rows.append(("ops.rms_norm (wrapper, allocates out)", device, per_call(lambda: ops.rms_norm(x, w))))
    if device == "cpu":
        xn, wn, on = x.numpy(), w.numpy(), out.numpy()
        rows.append(("_C.rms_norm (numpy arrays)", device, per_call(lambda: C.rms_norm(xn, wn, on, 1e-6))))
        rows.append(("torch reference rms_norm", device, per_call(lambda: ops.reference.rms_norm(x, w))))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if (torch.cuda.is_available() and vita_engine.cuda_available()) else "cpu")
    p.add_argument("--json")
    args = p.parse_args()
    dev = args.device
    res = []
    print(f"{'op':<20} {'device':<6} {'dtype':<9} {'vita ms':>9} {'torch ms':>9} {'ratio':>6}")
    for dtype in (torch.float32, torch.bfloat16):
        a = _inputs(dev, dtype)
        for name, (ours, theirs) in CASES.items():
            t_v = time_fn(lambda: ours(a), device=dev)
            t_t = time_fn(lambda: theirs(a), device=dev)
            dn = str(dtype).replace("torch.", "")
            res.append(dict(op=name, device=dev, dtype=dn, vita_ms=t_v, torch_ms=t_t, ratio=t_t / t_v))
            print(f"{name:<20} {dev:<6} {dn:<9} {t_v:9.3f} {t_t:9.3f} {t_t / t_v:6.2f}")
    print()
    print(f"{'call overhead':<40} {'device':<6} {'us/call':>8}")
    ov = overhead_rows(dev)
    for name, d, us in ov:
        print(f"{name:<40} {d:<6} {us:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ops": res, "overhead_us": [dict(what=n, device=d, us=u) for n, d, u in ov]}, f, indent=1)


if __name__ == "__main__":
    main()

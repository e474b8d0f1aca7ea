"""Prints `op | device | dtype | vita ms | torch ms | ratio | min-max` for the row-wise ops (the
`vita-engine bench-kernels` cases: interleaved rounds, ratio = median of torch / vita per round,
> 1 means vita is faster) and the Python -> kernel call overhead.

Usage: python bench/ops_ratio.py [--device cpu|cuda] [--json out.json] [--rounds N]
(with the installed wheel, or PYTHONPATH=python in a source tree)
"""
import argparse
import json
import time

import torch

import vita_engine
from vita_engine import ops
from vita_engine.benchmarks.cases import all_specs, select
from vita_engine.benchmarks.runner import environment, run_cases

FAMILIES = ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "fuse_embeddings"]


def overhead_rows(device):
    C = vita_engine._C
    x = torch.randn(1, 64, device=device)
    w = torch.randn(64, device=device)
    out = torch.empty_like(x)
    s = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    n = 2000

    def per_call(fn):
        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e6

    rows = [("_C.rms_norm (torch tensors)", device, per_call(lambda: C.rms_norm(x, w, out, 1e-6, s))),
            ("ops.rms_norm (wrapper, allocates out)", device, per_call(lambda: ops.rms_norm(x, w)))]
    if device == "cpu":
        xn, wn, on = x.numpy(), w.numpy(), out.numpy()
        rows.append(("_C.rms_norm (numpy arrays)", device, per_call(lambda: C.rms_norm(xn, wn, on, 1e-6))))
        rows.append(("torch reference rms_norm", device, per_call(lambda: ops.reference.rms_norm(x, w))))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if (torch.cuda.is_available() and vita_engine.cuda_available()) else "cpu")
    p.add_argument("--json")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args()
    dev = args.device
    env = environment(dev)
    print(f"{env['device_name']}; {env['cpu']}; threads {env['threads']}")
    print(f"{'op':<20} {'device':<6} {'dtype':<9} {'vita ms':>9} {'torch ms':>9} {'ratio':>6}  min-max")
    res = []

    def show(r):
        if "error" in r:
            print(f"{r['name']:<20} {dev:<6} {r['dtype']:<9} ERROR {r['error']}", flush=True)
            return
        print(f"{r['name']:<20} {dev:<6} {r['dtype']:<9} {r['ours_ms']:9.3f} {r['ref_ms']:9.3f} {r['ratio']:6.2f}  "
              f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", flush=True)

    for r in run_cases(select(all_specs(), FAMILIES), dev, ["float32", "bfloat16"], rounds=args.rounds, progress=show):
        res.append(dict(r, op=r["name"], device=dev, vita_ms=r.get("ours_ms"), torch_ms=r.get("ref_ms")))
    print()
    print(f"{'call overhead':<40} {'device':<6} {'us/call':>8}")
    ov = overhead_rows(dev)
    for name, d, us in ov:
        print(f"{name:<40} {d:<6} {us:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": {k: v for k, v in env.items() if k != "peak"}, "ops": res,
                       "overhead_us": [dict(what=n, device=d, us=u) for n, d, u in ov]}, f, indent=1)


if __name__ == "__main__":
    main()

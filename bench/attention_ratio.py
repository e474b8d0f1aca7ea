"""Plain table `case | ours ms | sdpa ms | ratio` for paged attention vs torch SDPA on the dense
equivalent (the faster of enable_gqa=True and pre-expanded heads). Default: the reduced CPU set
(float32). Usage: PYTHONPATH=python python bench/attention_ratio.py [--device cuda] [--dtype bf16] [--full]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=[None, "fp32", "bf16", "fp16"])
    ap.add_argument("--full", action="store_true", help="every shape (VITA_BENCH_FULL=1)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.full:
        os.environ["VITA_BENCH_FULL"] = "1"
    import bench_attention as ba  # after VITA_BENCH_FULL is set

    ba.FULL = args.full
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype] or ba.default_dtype(args.device)
    from vita_engine import _C

    print(f"device {args.device}, dtype {str(dtype)[6:]}, threads vita {_C.num_threads()} / torch {torch.get_num_threads()}, "
          f"Hq {ba.HQ} / Hkv {ba.HKV} x {ba.D}, block {ba.BS}")
    print(f"{'case':<22} | {'ours ms':>9} | {'sdpa ms':>9} | {'ratio':>5}")
    print("-" * 56)
    for name, b, ql, kl in ba.cases(args.device):
        ours, refs, _ = ba.build(b, ql, kl, args.device, dtype)
        o, r = ba.compare(ours, refs, args.device, rounds=args.rounds)
        print(f"{name:<22} | {o:9.3f} | {r:9.3f} | {r / o:5.2f}", flush=True)


if __name__ == "__main__":
    main()

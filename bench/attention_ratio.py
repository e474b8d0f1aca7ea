"""Plain table `case | ours ms | sdpa ms | ratio | min-max | rate` for paged attention (decode,
chunked prefill) and varlen encoder attention vs torch SDPA on the dense equivalent (the faster of
enable_gqa=True and pre-expanded heads, expansion not timed): the `vita-engine bench-kernels`
cases; ratio = median over interleaved rounds of sdpa_ms / ours_ms (>= 1: we are at least as fast).
Default: the reduced CPU set in float32 (bf16 on CUDA).

Usage: python bench/attention_ratio.py [--device cuda] [--dtype bf16] [--full] [--rounds N]
"""
from __future__ import annotations

import argparse
import os

import torch

from vita_engine.benchmarks.cases import all_specs, select
from vita_engine.benchmarks.runner import environment, run_cases

FAMILIES = ["paged_decode", "paged_prefill", "varlen_attention"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=[None, "fp32", "bf16", "fp16"])
    ap.add_argument("--full", action="store_true", help="every shape (also VITA_BENCH_FULL=1)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    full = args.full or os.environ.get("VITA_BENCH_FULL") == "1"
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(args.dtype) or ("float32" if args.device == "cpu" else "bfloat16")
    env = environment(args.device)
    print(f"device {env['device_name']}, dtype {dtype}, threads vita {env['threads']['vita_engine']} / torch {torch.get_num_threads()}, "
          f"Hq 28 / Hkv 4 x 128, block 16")
    print(f"{'case':<24} | {'ours ms':>9} | {'sdpa ms':>9} | {'ratio':>5} | {'min-max':<9} | rate")
    print("-" * 80)

    def show(r):
        if "error" in r:
            print(f"{r['name']:<24} | ERROR {r['error']}", flush=True)
            return
        rate = f"{r['tflops']:.2f} TFLOP/s" if r.get("metric") == "tflops" else f"{r.get('gbps', 0):.0f} GB/s"
        if "peak_frac" in r:
            rate += f" ({100 * r['peak_frac']:.0f}% of peak)"
        print(f"{r['name']:<24} | {r['ours_ms']:9.3f} | {r['ref_ms']:9.3f} | {r['ratio']:5.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {rate}",
              flush=True)

    run_cases(select(all_specs(), FAMILIES, full=full), args.device, [dtype], rounds=args.rounds, progress=show)


if __name__ == "__main__":
    main()

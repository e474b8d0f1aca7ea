"""Codec decode real-time factor (seconds of audio per second of compute), ours vs the pure-torch
graph (torch.nn.functional, same weights) timed in interleaved rounds, for the FULL-size TiCodec
generator (512 -> 32 channels, x600, random weights), plus the streaming first-window latency.

    python bench/codec_rtf.py [--device cuda] [--dtype bf16] [--batches 1,8] [--tokens 40]

Prints: batch | ours RTF | torch RTF | ratio | min-max | first-window ms.
"""
from __future__ import annotations

import argparse
import os

import torch

from vita_engine.benchmarks.cases.codec import decode_case, stream_first_case
from vita_engine.benchmarks.models import cached
from vita_engine.benchmarks.runner import run_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8; 1,8,64 on CUDA or with VITA_BENCH_FULL=1)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default 40 = 1 s on CUDA, 20 on CPU)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    a = ap.parse_args()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    full = os.environ.get("VITA_BENCH_FULL") == "1" or a.device == "cuda"
    batches = [int(b) for b in (a.batches or ("1,8,64" if full else "1,8")).split(",")]
    tokens = a.tokens or (40 if a.device == "cuda" else 20)
    with torch.inference_mode():
        c = cached("codec", a.device, dt)
        fw = run_case(stream_first_case(a.device, dt), a.device, rounds=a.reps, check=False)
        sec = tokens * c.hop_length / c.sample_rate
        print(f"full-size TiCodec generator, {a.device} {dt}, {tokens} tokens/seq ({sec:.2f} s), threads {torch.get_num_threads()}, "
              f"look-ahead {c.lookahead_tokens} tokens ({c.lookahead_samples} samples)")
        print(f"{'batch':>5} | {'ours RTF':>9} | {'torch RTF':>9} | {'ratio':>6} | {'min-max':>9} | {'first-window ms':>15}")
        for B in batches:
            r = run_case(decode_case(a.device, dt, B, tokens), a.device, rounds=a.reps)
            audio = B * sec
            print(f"{B:>5} | {audio / (r['ours_ms'] * 1e-3):>9.2f} | {audio / (r['ref_ms'] * 1e-3):>9.2f} | {r['ratio']:>6.2f} | "
                  f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {fw['ours_ms']:>15.1f}", flush=True)


if __name__ == "__main__":
    main()

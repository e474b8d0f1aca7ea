"""Codec decode real-time factor (seconds of audio per second of compute), ours vs the pure-torch
reference graph, for the FULL-size TiCodec generator (512 -> 32 channels, x600, random weights),
plus the streaming first-window latency.

    PYTHONPATH=python python bench/codec_rtf.py [--device cuda] [--dtype bf16] [--batches 1,8] [--tokens 40]

Prints: batch | ours RTF | torch RTF | ratio | first-window ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

from vita_engine.model.codec import Codec  # noqa: E402

FULL = dict(upsample_rates=[8, 5, 5, 3], upsample_kernel_sizes=[16, 11, 11, 5], upsample_initial_channel=512, resblock="1",
            resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3, n_codes=1024, n_code_groups=1,
            residul_layer=1, global_code_num=8, global_tokens=[473, 975, 419, 219, 565, 121, 550, 616])


def full_codec(device="cpu", dtype=torch.float32, seed=0) -> Codec:
    c = Codec(FULL, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in c._shapes.items():
        fan = shape[1] * shape[2] if len(shape) == 3 else 1
        if "ups" in k and k.endswith("weight"):
            fan = shape[0] * shape[2] // 4
        sd[k] = torch.randn(*shape, generator=g) * (fan ** -0.5 if len(shape) == 3 else 0.05)
    return c.load_folded_state_dict(sd)


def _time(fn, device, reps, min_s=0.0):
    fn()  # warm-up
    ts = []
    t_end = time.perf_counter() + min_s
    while len(ts) < reps or time.perf_counter() < t_end:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
        if len(ts) >= 50:
            break
    return statistics.median(ts)


def first_window_ms(c: Codec, device, reps=3) -> float:
    """Fresh stream; push lookahead_tokens + 1 tokens at once -> the first final samples come back."""
    n = c.lookahead_tokens + 1
    tok = torch.randint(0, c.n_codes, (n,))

    def run():
        s = c.stream()
        y = s.push(tok)
        assert y.numel() > 0
    return _time(run, device, reps) * 1e3


def rtf_table(device="cpu", dtype=torch.float32, batches=(1, 8), tokens=40, reps=3):
    c = full_codec(device, dtype)
    rows = []
    fw = first_window_ms(c, device)
    for B in batches:
        tok = torch.randint(0, c.n_codes, (B, tokens))
        audio_s = B * tokens * c.hop_length / c.sample_rate
        t_ours = _time(lambda: c.decode_batch(tok), device, reps)
        t_ref = _time(lambda: c.decode_batch(tok, use_reference=True), device, reps)
        rows.append((B, audio_s / t_ours, audio_s / t_ref, t_ref / t_ours, fw))
    return rows, c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8; 1,8,64 on CUDA or with VITA_BENCH_FULL=1)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default 40 = 1 s on CUDA, 20 on CPU)")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    full = os.environ.get("VITA_BENCH_FULL") == "1" or a.device == "cuda"
    batches = [int(b) for b in (a.batches or ("1,8,64" if full else "1,8")).split(",")]
    tokens = a.tokens or (40 if a.device == "cuda" else 20)
    torch.manual_seed(0)
    rows, c = rtf_table(a.device, dt, batches, tokens, a.reps)
    print(f"full-size TiCodec generator, {a.device} {dt}, {tokens} tokens/seq ({tokens * c.hop_length / c.sample_rate:.2f} s), "
          f"threads {torch.get_num_threads()}, look-ahead {c.lookahead_tokens} tokens ({c.lookahead_samples} samples)")
    print(f"{'batch':>5} | {'ours RTF':>9} | {'torch RTF':>9} | {'ratio':>6} | {'first-window ms':>15}")
    for B, ro, rt, ratio, fw in rows:
        print(f"{B:>5} | {ro:>9.2f} | {rt:>9.2f} | {ratio:>6.2f} | {fw:>15.1f}")


if __name__ == "__main__":
    main()

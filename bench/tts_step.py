"""TTS AR step time (ms): TTSBatchDecoder.step vs a naive HF-style dense-KV torch step, batch 1 and 16,
for the tiny checkpoint and random weights at the real VITA-1.5 TTS dimensions.

    PYTHONPATH=python python bench/tts_step.py [--device cuda] [--dtype bf16] [--models tiny,real]

Each stream is prefilled with a `--text-len`-token segment (4x that many NAR positions + bos); a step
= one forward of all streams (q_len 1 each) + top-k sampling + the host sync returning the tokens.
eos is disabled so no stream finishes while timed. Also prints the max |logit| difference between
the engine's teacher-forced first-step logits and the naive step (a correctness check)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _timing import time_fn  # noqa: E402
from _tts_models import engine_stepper, naive_stepper, no_eos, real_tts, tiny_tts  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--models", default="tiny,real")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--text-len", type=int, default=20)
    ap.add_argument("--reps", type=int, default=None, help="timed steps per case (default 10 CPU, 50 CUDA)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    reps = a.reps or (50 if a.device == "cuda" else 10)
    warm = 3
    print(f"device {a.device}, dtype {dt}, text_len {a.text_len}, torch threads {torch.get_num_threads()}, reps {reps}")
    print(f"{'model':6} {'batch':>5} {'engine ms':>10} {'naive ms':>10} {'speedup':>8}  {'first-step |dlogit|':>20}")
    for name in a.models.split(","):
        tts = tiny_tts(a.device, dt) if name == "tiny" else real_tts(a.device, dt)
        backend = {k: v.rsplit(".", 1)[-1] for k, v in tts.ops.backend().items() if k in ("store_kv", "paged_attention")}
        ref = tts.ar_logits(list(range(a.text_len)), [])[0].float()  # = stream 0's text in the steppers
        no_eos(tts)
        for B in [int(b) for b in a.batches.split(",")]:
            step = engine_stepper(tts, B, a.text_len, steps=warm + reps * 4 + 8)
            t_eng = time_fn(step, device=a.device, warmup=warm, reps=reps, min_time_s=0, max_reps=reps)
            nv = naive_stepper(tts, B, a.text_len)
            t_nv = time_fn(nv.step, device=a.device, warmup=warm, reps=reps, min_time_s=0, max_reps=reps)
            nv1 = naive_stepper(tts, 1, a.text_len)
            # first-step logits check (eos bias change only affects the eos column)
            lg = nv1.logits_step()[0]
            mask = torch.ones_like(lg, dtype=torch.bool)
            mask[tts.eos] = False
            err = (lg[mask] - ref[mask]).abs().max().item()
            print(f"{name:6} {B:5d} {t_eng:10.3f} {t_nv:10.3f} {t_nv / t_eng:8.2f}x  {err:20.2e}")
        print(f"       ({name}: store_kv/paged_attention from {backend})")
        del tts
        if a.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

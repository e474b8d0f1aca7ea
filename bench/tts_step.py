"""TTS AR step time (ms): TTSBatchDecoder.step vs the same step in plain torch (static K/V cache +
SDPA, vita_engine.benchmarks.models.TorchTTS), batch 1 and 16, for the tiny checkpoint and random
weights at the real VITA-1.5 TTS dimensions, in interleaved rounds.

    python bench/tts_step.py [--device cuda] [--dtype bf16] [--models tiny,real]

Each stream is prefilled with a `--text-len`-token segment (4x that many NAR positions + bos); a step
= one forward of all streams (q_len 1 each) + top-k sampling + the host sync returning the tokens,
always the first step (pinned), so every timed call does the same work. eos is disabled. Also prints
the max relative logit difference between the torch step's first-step logits and the engine's
teacher-forced ones (a correctness check of the reference)."""
from __future__ import annotations

import argparse

import torch

from vita_engine.benchmarks.cases.tts import step_case
from vita_engine.benchmarks.models import no_eos, real_tts, tiny_tts
from vita_engine.benchmarks.runner import run_case


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--models", default="tiny,real")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--text-len", type=int, default=20)
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds per case (default 7 CPU, 15 CUDA)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        from vita_engine import _C

        torch.set_num_threads(a.threads)
        _C.set_num_threads(a.threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    print(f"device {a.device}, dtype {dt}, text_len {a.text_len}, torch threads {torch.get_num_threads()}")
    print(f"{'model':6} {'batch':>5} {'engine ms':>10} {'torch ms':>10} {'speedup':>8} {'min-max':>10}  {'first-step rel err':>18}")
    for name in a.models.split(","):
        with torch.inference_mode():
            tts = tiny_tts(a.device, dt) if name == "tiny" else real_tts(a.device, dt)
            backend = {k: v.rsplit(".", 1)[-1] for k, v in tts.ops.backend().items() if k in ("store_kv", "paged_attention")}
            no_eos(tts)
            for B in [int(b) for b in a.batches.split(",")]:
                r = run_case(step_case(tts, B, a.text_len), a.device, rounds=a.reps)
                print(f"{name:6} {B:5d} {r['ours_ms']:10.3f} {r['ref_ms']:10.3f} {r['ratio']:7.2f}x {r['ratio_min']:.2f}-{r['ratio_max']:.2f}  "
                      f"{r['max_err']:18.2e}", flush=True)
        print(f"       ({name}: store_kv/paged_attention from {backend})")
        del tts
        if a.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

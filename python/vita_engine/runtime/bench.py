"""`vita-engine bench`: N concurrent sessions, K spoken turns each, real-time-paced audio (asyncio),
then p50/p90/p99 of every §7 key across turns and sessions (`Engine.metrics_summary()`)."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from .events import AudioChunk, TurnEnd

__all__ = ["run_bench", "drive_sessions"]

PLOT_KEYS = ("fbank_ms", "audio_encoder_ms", "prefill_ms", "first_text_token_ms", "tts_nar_ms", "first_codec_token_ms",
             "first_codec_window_ms", "ttfa_ms", "response_ms")


async def _one_session(s, audio, sr, turns, chunk_ms, realtime, silence_ms, stagger):
    await asyncio.sleep(stagger)
    done = asyncio.Event()
    got = {"turns": 0, "samples": 0}

    async def consume():
        async for ev in s.events():
            if isinstance(ev, AudioChunk):
                got["samples"] += ev.pcm.size
            elif isinstance(ev, TurnEnd):
                got["turns"] += 1
                done.set()

    task = asyncio.create_task(consume())
    n = int(sr * chunk_ms / 1000)
    sil = np.zeros(int(sr * silence_ms / 1000), np.float32)
    for _ in range(turns):
        done.clear()
        t0 = time.perf_counter()
        pos = 0
        for buf in (audio, sil):
            for i in range(0, len(buf), n):
                s.push_audio(buf[i:i + n], sr)
                pos += len(buf[i:i + n])
                if realtime:
                    lag = t0 + pos / sr - time.perf_counter()
                    if lag > 0:
                        await asyncio.sleep(lag)
                else:
                    await asyncio.sleep(0)
        # keep streaming silence (as a live microphone does) until the answer is over
        while not done.is_set():
            chunk = np.zeros(n, np.float32)
            s.push_audio(chunk, sr)
            try:
                await asyncio.wait_for(done.wait(), timeout=chunk_ms / 1000 if realtime else 0.05)
            except asyncio.TimeoutError:
                pass
    s.close()
    await task
    return got


async def drive_sessions(engine, n_sessions, turns, audio, sr, *, chunk_ms=40.0, realtime=True):
    sessions = [engine.session() for _ in range(n_sessions)]
    silence = engine.vad_config.min_silence_ms + 200
    res = await asyncio.gather(*[_one_session(s, audio, sr, turns, chunk_ms, realtime, silence, 0.137 * i)
                                 for i, s in enumerate(sessions)])
    return res


def _engine_for(args):
    import torch

    from .engine import Engine

    dev = args.device
    dt = args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[dt]
    opts = dict(max_new_tokens=args.max_new_tokens, max_sessions=max(16, args.sessions),
                use_reference=bool(getattr(args, "use_reference", False)))
    ttsmax = getattr(args, "tts_max_tokens", None)
    if dev == "cpu":
        torch.set_num_threads(args.threads)
        opts["cpu_threads"] = args.threads
    if args.model:
        return Engine.from_pretrained(args.model, device=dev, dtype=dtype, **opts), dt
    if args.dims == "full":
        from .random_model import random_vita_model

        if not dev.startswith("cuda"):
            raise SystemExit("bench --dims full builds 8B random weights: run it on a GPU (--device cuda)")
        model, path = random_vita_model("full", device=dev, dtype=dtype)
        model.use_reference = opts["use_reference"]
        opts["session_max_tokens"] = 2048
        opts["tts_max_tokens"] = ttsmax or 120  # random weights rarely sample eos: bound each segment
        return Engine(model, path, opts), dt
    opts["tts_max_tokens"] = ttsmax or 64  # spec §10: the tiny TTS decodes at most 64 tokens per segment
    return Engine.from_pretrained("tiny", device=dev, dtype=dtype, **opts), dt


def run_bench(args) -> int:
    from . import _compat

    eng, dt = _engine_for(args)
    audio, sr = _compat.load_sample("question.wav")
    t0 = time.perf_counter()
    try:
        res = asyncio.run(drive_sessions(eng, args.sessions, args.turns, audio, sr, realtime=not args.fast))
        summary = eng.metrics_summary()
        stats = eng.stats
    finally:
        eng.close()
    wall = time.perf_counter() - t0
    out = {"sessions": args.sessions, "turns": args.turns, "dims": "model" if args.model else args.dims, "device": args.device,
           "dtype": dt, "wall_s": round(wall, 2), "turns_done": sum(r["turns"] for r in res),
           "audio_out_s": round(sum(r["samples"] for r in res) / 24000.0, 3),
           "metrics": {k: {q: round(v, 2) for q, v in d.items()} for k, d in summary.items()},
           "engine": stats}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{args.sessions} session(s) x {args.turns} turn(s), {out['dims']} on {args.device} ({dt}); "
              f"{out['turns_done']} turns in {out['wall_s']} s, {out['audio_out_s']} s of speech out")
        print(f"{'key':<24}{'n':>5}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
        for k, d in summary.items():
            print(f"{k:<24}{d['n']:>5}{d['p50']:>10.2f}{d['p90']:>10.2f}{d['p99']:>10.2f}{d['max']:>10.2f}")
    if args.plot:
        _plot(summary, args.plot, f"{args.sessions} session(s), {out['dims']}, {args.device}")
    return 0


def _plot(summary, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("bench --plot needs matplotlib: pip install matplotlib") from None
    keys = [k for k in PLOT_KEYS if k in summary]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(keys))
    for j, q in enumerate(("p50", "p90", "p99")):
        ax.bar(x + (j - 1) * 0.27, [summary[k][q] for k in keys], 0.27, label=q)
    ax.set_xticks(x)
    ax.set_xticklabels(keys, rotation=30, ha="right")
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)

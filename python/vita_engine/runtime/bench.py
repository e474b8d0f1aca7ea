"""`vita-engine bench`: N concurrent sessions, K spoken turns each, real-time-paced audio (asyncio),
then p50/p90/p99 of every §7 key across turns and sessions (`Engine.metrics_summary()`) and of the
scheduler's tick and host time (`Engine.scheduler_stats()`). `--sessions 1,4,16` sweeps the counts
one after the other in one process (one engine) and adds a summary table and, with `--plot`, a
ttfa-vs-sessions plot."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import List

import numpy as np

from .events import AudioChunk, TurnEnd
from .metrics import TICK_KEYS

__all__ = ["run_bench", "drive_sessions", "parse_sessions"]

PLOT_KEYS = ("fbank_ms", "audio_encoder_ms", "prefill_ms", "first_text_token_ms", "tts_nar_ms", "first_codec_token_ms",
             "first_codec_window_ms", "ttfa_ms", "response_ms")


async def _one_session(s, audio, sr, turns, chunk_ms, realtime, silence_ms, stagger, image=None):
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
        if image is not None:  # shown as the user starts speaking: the turn's prompt starts with it
            s.push_image(image)
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


async def drive_sessions(engine, n_sessions, turns, audio, sr, *, chunk_ms=40.0, realtime=True, image=None):
    sessions = [engine.session() for _ in range(n_sessions)]
    silence = engine.vad_config.min_silence_ms + 200
    res = await asyncio.gather(*[_one_session(s, audio, sr, turns, chunk_ms, realtime, silence, 0.137 * i, image)
                                 for i, s in enumerate(sessions)])
    return res


def parse_sessions(value) -> List[int]:
    """`--sessions`: one count ("16") or a comma-separated sweep ("1,4,16"), each >= 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        counts = [value]
    else:
        try:
            counts = [int(p) for p in str(value).split(",") if p.strip()]
        except ValueError:
            counts = []
    if not counts or any(c < 1 for c in counts):
        raise SystemExit(f"bench --sessions: expected a session count or a comma-separated list of counts >= 1 "
                         f"(e.g. 16 or 1,4,16), got {value!r}")
    return counts


def _engine_for(args, max_sessions: int):
    import torch

    from .engine import Engine

    dev = args.device
    dt = args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[dt]
    opts = dict(max_new_tokens=args.max_new_tokens, max_sessions=max(16, max_sessions),
                use_reference=bool(getattr(args, "use_reference", False)))
    if getattr(args, "scheduling", None):
        opts["scheduling"] = args.scheduling
    if getattr(args, "cuda_graphs", False):
        opts["cuda_graphs"] = True
    if getattr(args, "no_prefix_prefill", False):
        opts["prefix_prefill"] = False
    ttsmax = getattr(args, "tts_max_tokens", None)
    if dev == "cpu":
        torch.set_num_threads(args.threads)
        opts["cpu_threads"] = args.threads
    if args.model:
        return Engine.from_pretrained(args.model, device=dev, dtype=dtype, **opts), dt
    if args.dims in ("full", "mini"):
        from .random_model import random_vita_model

        if args.dims == "full" and not dev.startswith("cuda"):
            raise SystemExit("bench --dims full builds 8B random weights: run it on a GPU (--device cuda)")
        model, path = random_vita_model(args.dims, device=dev, dtype=dtype)
        model.use_reference = opts["use_reference"]
        opts["session_max_tokens"] = 2048
        opts["tts_max_tokens"] = ttsmax or 120  # random weights rarely sample eos: bound each segment
        return Engine(model, path, opts), dt
    opts["tts_max_tokens"] = ttsmax or 64  # spec §10: the tiny TTS decodes at most 64 tokens per segment
    return Engine.from_pretrained("tiny", device=dev, dtype=dtype, **opts), dt


def _r(d, nd=2):
    return {k: (round(v, nd) if isinstance(v, float) else v) for k, v in d.items()}


def run_bench(args) -> int:
    """One engine; the session counts of `--sessions` one after the other (metrics and tick statistics
    restart for each count)."""
    from . import _compat

    counts = parse_sessions(args.sessions)
    eng, dt = _engine_for(args, max(counts))
    audio, sr = _compat.load_sample("question.wav")
    dims = "model" if args.model else args.dims
    image = getattr(args, "image_data", None)
    runs = []
    try:
        _warm_up(eng, audio, sr, image)
        for n in counts:
            eng.metrics.reset()
            eng.scheduler_stats(reset=True)
            load0 = _loadavg()
            t0 = time.perf_counter()
            res = asyncio.run(drive_sessions(eng, n, args.turns, audio, sr, realtime=not args.fast, image=image))
            wall = time.perf_counter() - t0
            summary = eng.metrics_summary()
            sched = eng.scheduler_stats()
            out = {"sessions": n, "turns": args.turns, "dims": dims, "device": args.device, "dtype": dt,
                   "image": image is not None, "prefix_prefill": bool(eng.options["prefix_prefill"]),
                   "wall_s": round(wall, 2), "turns_done": sum(r["turns"] for r in res),
                   "audio_out_s": round(sum(r["samples"] for r in res) / 24000.0, 3),
                   "load_avg": [load0, _loadavg()],
                   "metrics": {k: _r(d) for k, d in summary.items()},
                   "scheduler": {k: (_r(v, 3) if isinstance(v, dict) else v) for k, v in sched.items()},
                   "engine": eng.stats}
            runs.append(out)
            if not args.json:
                _print_run(out, summary, sched)
    finally:
        eng.close()
    if args.json:
        print(json.dumps(runs[0] if len(runs) == 1 else {"sweep": runs}, indent=1))
    elif len(runs) > 1:
        _print_sweep(runs)
    if args.plot:
        title = f"{dims}, {args.device} ({dt}), {args.turns} turn(s) per session"
        if len(runs) == 1:
            _plot(summary, args.plot, f"{counts[0]} session(s), {title}")
        else:
            _plot_sweep(runs, args.plot, title)
    return 0


def _warm_up(eng, audio, sr, image=None) -> None:
    """One short text turn and one spoken turn (fed as fast as possible) before measuring, so the first
    measured turn does not pay one-time costs (first kernel calls, the VAD's and encoder's first
    shapes, allocator growth, lazy model state)."""
    s = eng.session()
    try:
        s.run_turn(text="Hello.", timeout=300)
        if image is not None:
            s.push_image(image)
        s.run_turn(audio, sr, chunk_ms=40.0, timeout=300)
    finally:
        s.close()


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def _print_run(out, summary, sched):
    n = out["sessions"]
    want = n * out["turns"]
    print(f"{n} session(s) x {out['turns']} turn(s), {out['dims']} on {out['device']} ({out['dtype']}); "
          f"{out['turns_done']} of {want} turns in {out['wall_s']} s, {out['audio_out_s']} s of speech out"
          f" (load average {out['load_avg'][0]} -> {out['load_avg'][1]})")
    if out["turns_done"] < want:
        print(f"WARNING: only {out['turns_done']} of {want} turns completed")
    print(f"{'key':<24}{'n':>5}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for k, d in summary.items():
        print(f"{k:<24}{d['n']:>5}{d['p50']:>10.2f}{d['p90']:>10.2f}{d['p99']:>10.2f}{d['max']:>10.2f}")
    print(f"scheduler: {sched['ticks']} ticks with work, {sched['idle_waits']} idle waits; per tick: "
          f"{sched['llm_forwards_per_tick']:.2f} LLM forwards ({sched['llm_rows_per_tick']:.1f} rows), "
          f"{sched['tts_steps_per_tick']:.2f} TTS steps, {sched['codec_pushes_per_tick']:.2f} codec pushes, "
          f"{sched['sessions_per_tick']:.1f} sessions")
    for k in TICK_KEYS:
        d = sched[k]
        if d.get("n"):
            print(f"  {k:<22}{d['n']:>5}{d['p50']:>10.2f}{d['p90']:>10.2f}{d['p99']:>10.2f}{d['max']:>10.2f}")
    print()


def _print_sweep(runs):
    print("sweep (ms)      ttfa p50    p90    p99 | response p50    p90    p99 |  tick p50   p90   p99 | host p90  turns")
    for r in runs:
        m, s = r["metrics"], r["scheduler"]
        t, rs = m.get("ttfa_ms", {}), m.get("response_ms", {})
        tk, h = s.get("tick_ms", {}), s.get("host_ms", {})

        def f(d, q, w):
            return f"{d[q]:>{w}.1f}" if q in d else " " * (w - 1) + "-"

        print(f"{r['sessions']:>4} session(s) {f(t, 'p50', 9)}{f(t, 'p90', 7)}{f(t, 'p99', 7)} |"
              f"{f(rs, 'p50', 13)}{f(rs, 'p90', 7)}{f(rs, 'p99', 7)} |{f(tk, 'p50', 10)}{f(tk, 'p90', 6)}{f(tk, 'p99', 6)} |"
              f"{f(h, 'p90', 9)}  {r['turns_done']}/{r['sessions'] * r['turns']}")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench --plot: matplotlib is not installed, no plot written (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _plot(summary, path, title):
    plt = _pyplot()
    if plt is None:
        return
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


def _sessions_axis(ax, ns, title) -> None:
    ax.set_xlabel("sessions")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_title(title)
    ax.legend(fontsize=7)


def _plot_sweep(runs, path, title):
    """ttfa/response percentiles vs sessions (left) and the p50 of each stage vs sessions (right)."""
    plt = _pyplot()
    if plt is None:
        return
    ns = [r["sessions"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, style in (("ttfa_ms", "-"), ("response_ms", "--")):
        for q, mk in (("p50", "o"), ("p90", "s"), ("p99", "^")):
            ys = [r["metrics"].get(key, {}).get(q, np.nan) for r in runs]
            a.plot(ns, ys, style, marker=mk, label=f"{key} {q}")
    _sessions_axis(a, ns, "first audio vs sessions")
    a.set_ylabel("ms")
    for key in PLOT_KEYS:
        if key in ("ttfa_ms", "response_ms"):
            continue
        ys = [r["metrics"].get(key, {}).get("p50", np.nan) for r in runs]
        if not all(np.isnan(ys)):
            b.plot(ns, ys, marker="o", label=key)
    ys = [r["scheduler"].get("tick_ms", {}).get("p50", np.nan) for r in runs]
    b.plot(ns, ys, "k:", marker="x", label="tick_ms")
    _sessions_axis(b, ns, "stages (p50)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

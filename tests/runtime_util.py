"""Shared helpers for the runtime tests (tiny model, CPU, 1 thread: the machine is shared)."""
import numpy as np
import pytest
import torch

from vita_engine.runtime import AudioChunk, Interrupted, Metrics, TextDelta, TurnEnd


@pytest.fixture(scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_engine(tiny_ckpt, **opts):
    from vita_engine.runtime import Engine

    opts.setdefault("max_new_tokens", 16)
    opts.setdefault("cpu_threads", 1)
    opts.setdefault("tts_max_tokens", 24)
    return Engine.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32, **opts)


def kinds(evs):
    return [type(e).__name__ for e in evs]


def check_turn_tail(evs):
    """A turn's events end with Metrics then TurnEnd; an interrupted one has no audio after Interrupted."""
    assert isinstance(evs[-1], TurnEnd) and isinstance(evs[-2], Metrics), kinds(evs)[-4:]
    if any(isinstance(e, Interrupted) for e in evs):
        i = next(i for i, e in enumerate(evs) if isinstance(e, Interrupted))
        assert not any(isinstance(e, (AudioChunk, TextDelta)) for e in evs[i:]), kinds(evs[i:])


def push_chunks(s, x, sr, chunk=1600):
    """Push PCM into a session in 100 ms chunks (at 16 kHz), as a client streams it."""
    for i in range(0, len(x), chunk):
        s.push_audio(x[i:i + chunk], sr)


def rand_image(seed, h=200, w=300):
    """A random RGB uint8 image [h, w, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def speech(seconds=1.6, sr=16000, seed=0):
    """Voiced synthetic 'speech' (harmonics + syllable modulation), float32 in [-1, 1]."""
    t = np.arange(int(seconds * sr)) / sr
    ph = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 0.7 * t)) / sr
    x = sum(np.sin(k * ph) / k for k in range(1, 6))
    env = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.1 * env * x + 0.005 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


def run_sessions(e, seeds, text, turns: int = 1, timeout: float = 120.0):
    """Sessions of engine `e` (one per seed, sampling at temperature 0.9 / top-k 20) each asking `text`
    `turns` times concurrently -> every session's events, in order."""
    import asyncio

    async def one(s):
        evs = []
        for _ in range(turns):
            s.push_text(text)
            async for ev in s.events():
                evs.append(ev)
                if isinstance(ev, TurnEnd):
                    break
        s.close()
        return evs

    async def main():
        ss = [e.session(seed=sd, temperature=0.9, top_k=20) for sd in seeds]
        return await asyncio.wait_for(asyncio.gather(*[one(s) for s in ss]), timeout)

    return asyncio.run(main())


def until(pred, what: str, timeout: float = 30.0):
    """Poll `pred` (10 ms) until it is truthy -> its value; AssertionError naming `what` after `timeout` s."""
    import time

    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def same_answers(a, b, atol: float = 0.0):
    """Two runs' per-session events (run_sessions) give the same text and the same audio (bit for bit,
    or within `atol`)."""
    for ea, eb in zip(a, b, strict=True):
        ta = "".join(ev.text for ev in ea if isinstance(ev, TextDelta))
        tb = "".join(ev.text for ev in eb if isinstance(ev, TextDelta))
        assert ta == tb and ta
        pa = np.concatenate([ev.pcm for ev in ea if isinstance(ev, AudioChunk)] or [np.zeros(0, np.float32)])
        pb = np.concatenate([ev.pcm for ev in eb if isinstance(ev, AudioChunk)] or [np.zeros(0, np.float32)])
        assert pa.shape == pb.shape and pa.size
        np.testing.assert_allclose(pa, pb, rtol=0, atol=atol)

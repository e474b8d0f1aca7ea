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


def speech(seconds=1.6, sr=16000, seed=0):
    """Voiced synthetic 'speech' (harmonics + syllable modulation), float32 in [-1, 1]."""
    t = np.arange(int(seconds * sr)) / sr
    ph = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 0.7 * t)) / sr
    x = sum(np.sin(k * ph) / k for k in range(1, 6))
    env = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.1 * env * x + 0.005 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)

"""Small speech samples shipped with the package (16 kHz mono PCM16 WAV), for the demo and tests.

- `hello.wav`: "Hello, what can you see in this picture?" (~2.2 s)
- `question.wav`: "Can you tell me what the weather is like in Paris today?" (~2.8 s)

Both were synthesised with espeak-ng 1.51 (voice en-us, 170/165 wpm), edge silence trimmed and
resampled to 16 kHz with sox (no dither), reproducibly: `scripts/make_speech_samples.sh`. They are synthetic speech: fine for VAD / plumbing / latency tests,
not for judging recognition quality.
"""
from __future__ import annotations

import wave
from pathlib import Path
from typing import Tuple

import numpy as np

__all__ = ["SAMPLES", "sample_path", "load_sample"]

_DIR = Path(__file__).resolve().parent
SAMPLES = ("hello", "question")


def sample_path(name: str) -> Path:
    """Path of a bundled sample, by name with or without `.wav` (e.g. "hello")."""
    stem = name[:-4] if name.endswith(".wav") else name
    p = _DIR / f"{stem}.wav"
    if stem not in SAMPLES or not p.is_file():
        raise FileNotFoundError(f"no bundled audio sample {name!r}; available: {', '.join(SAMPLES)}")
    return p


def load_sample(name: str) -> Tuple[np.ndarray, int]:
    """(float32 mono samples in [-1, 1], sample_rate) of a bundled sample."""
    with wave.open(str(sample_path(name)), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{name}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit")
        ch, sr = w.getnchannels(), w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1).astype(np.float32)
    return x, sr

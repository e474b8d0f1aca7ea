"""Audio input: PCM validation/conversion to float32 mono, and a streaming resampler to 16 kHz.

`to_float32_mono` is the one gate every pushed chunk goes through (Session.push_audio): it accepts
numpy or torch PCM, int16 (scaled by 1/32768) or float32/float64 in [-1, 1], mono `[n]`/`[n, 1]` or
stereo `[n, 2]` (averaged), and rejects everything else with an error that names the argument.

`Resampler` wraps `soxr.ResampleStream` (quality 'HQ'): any chunk size in, and the concatenated
output (after `flush()`) does not depend on how the input was chunked.
"""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np

__all__ = ["to_float32_mono", "check_sample_rate", "Resampler",
           "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE", "DEFAULT_MAX_CHUNK_S", "TARGET_SAMPLE_RATE"]

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
DEFAULT_MAX_CHUNK_S = 60.0
TARGET_SAMPLE_RATE = 16000
# float PCM a little outside [-1, 1] (decoder overshoot) is clipped; far outside is a scaling bug.
_FLOAT_CLIP_LIMIT = 1.5


def check_sample_rate(sample_rate, name: str = "sample_rate") -> int:
    """Return `sample_rate` as int if it is an integral rate in [8000, 192000] Hz, else raise."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
        raise TypeError(f"{name} must be an integer number of Hz, got {type(sample_rate).__name__} {sample_rate!r}")
    if not float(sample_rate).is_integer():
        raise ValueError(f"{name} must be an integer number of Hz, got {sample_rate!r}")
    sr = int(sample_rate)
    if sr <= 0:
        raise ValueError(f"{name} must be positive, got {sr}")
    if not (MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE):
        raise ValueError(f"{name}={sr} Hz is outside the supported range "
                         f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz")
    return sr


def _to_numpy(pcm, name: str) -> np.ndarray:
    if isinstance(pcm, np.ndarray):
        return pcm
    try:  # torch is optional for this module
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(pcm, torch.Tensor):
        t = pcm.detach()
        if t.dtype not in (torch.int16, torch.float32, torch.float64):
            raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected int16, float32 or float64 PCM")
        return t.cpu().numpy()
    raise TypeError(f"{name} must be a numpy array or torch tensor of PCM samples, got {type(pcm).__name__}")


def to_float32_mono(pcm, *, sample_rate, name: str = "pcm",
                    max_seconds: Optional[float] = DEFAULT_MAX_CHUNK_S) -> np.ndarray:
    """Validate one chunk of PCM and return it as a contiguous float32 mono array `[n]` in [-1, 1].

    - `pcm`: numpy array or torch tensor; dtype int16 (divided by 32768) or float32/float64 in
      [-1, 1] (values up to 1.5 in magnitude are clipped; beyond that it is rejected as mis-scaled);
      shape `[n]`, `[n, 1]` or `[n, 2]` (stereo is averaged). Other dtypes (int32, uint8, float16,
      bool, ...) raise TypeError; empty, > 2-D, NaN/inf, or longer than `max_seconds` (default 60 s,
      None = no cap) raise ValueError.
    - `sample_rate`: integer Hz in [8000, 192000] (only used for validation and the length cap).
    """
    sr = check_sample_rate(sample_rate)
    x = _to_numpy(pcm, name)
    if x.dtype not in (np.int16, np.float32, np.float64):
        raise TypeError(f"{name}: unsupported dtype {x.dtype}; expected int16, float32 or float64 PCM "
                        f"(convert e.g. int32 with (x >> 16).astype(np.int16), uint8 with (x - 128) / 128)")
    if x.ndim == 0 or x.ndim > 2:
        raise ValueError(f"{name}: expected shape [n], [n, 1] or [n, 2] (samples, channels), got {list(x.shape)}")
    if x.ndim == 2 and x.shape[1] not in (1, 2):
        hint = " (channels-first? pass x.T)" if x.shape[0] in (1, 2) else ""
        raise ValueError(f"{name}: expected shape [n, 1] or [n, 2] (samples, channels), got {list(x.shape)}{hint}")
    n = x.shape[0]
    if n == 0 or x.size == 0:
        raise ValueError(f"{name}: empty audio chunk (0 samples)")
    if max_seconds is not None and n > max_seconds * sr:
        raise ValueError(f"{name}: chunk of {n} samples ({n / sr:.1f} s at {sr} Hz) exceeds the {max_seconds:g} s "
                         f"limit per push; stream audio in small chunks as it arrives (e.g. 20-100 ms)")
    if x.dtype == np.int16:
        y = x.astype(np.float32) * np.float32(1.0 / 32768.0)
    else:
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or infinite samples")
        peak = float(np.abs(x).max())
        if peak > _FLOAT_CLIP_LIMIT:
            raise ValueError(f"{name}: float PCM must be in [-1, 1], got max |x| = {peak:g} "
                             f"(int16-scaled floats? pass int16 or divide by 32768)")
        y = x.astype(np.float32, copy=False)
        if peak > 1.0:
            y = np.clip(y, -1.0, 1.0)
    if y.ndim == 2:
        y = y[:, 0] if y.shape[1] == 1 else (y[:, 0] + y[:, 1]) * np.float32(0.5)
    return np.ascontiguousarray(y, dtype=np.float32)


class Resampler:
    """Streaming resampler (soxr 'HQ') for float32 mono audio.

    `process(x)` takes any number of samples (including 0) and returns what is ready;
    `flush()` returns the tail and resets the stream for a new signal. The concatenation of all
    outputs is independent of the chunking, and its length is round(n * out_rate / in_rate).
    When the rates are equal, input is passed through (copied) with no delay.
    """

    def __init__(self, in_rate: int, out_rate: int = TARGET_SAMPLE_RATE):
        self.in_rate = check_sample_rate(in_rate, "in_rate")
        self.out_rate = check_sample_rate(out_rate, "out_rate")
        self.identity = self.in_rate == self.out_rate
        self._stream = None
        if not self.identity:
            import soxr

            self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32", quality="HQ")
        self.samples_in = 0
        self.samples_out = 0

    def _check(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 1:
            raise ValueError(f"Resampler.process: expected 1-D mono samples, got shape {list(x.shape)}")
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"Resampler.process: expected float samples, got {x.dtype} "
                                f"(convert with to_float32_mono)")
            x = x.astype(np.float32)
        return np.ascontiguousarray(x)

    def process(self, x) -> np.ndarray:
        x = self._check(x)
        self.samples_in += x.shape[0]
        if self.identity:
            y = x.copy()
        elif x.shape[0] == 0:
            y = np.zeros(0, np.float32)
        else:
            y = np.asarray(self._stream.resample_chunk(x, last=False), dtype=np.float32).reshape(-1)
        self.samples_out += y.shape[0]
        return y

    def flush(self) -> np.ndarray:
        """Return the remaining output and reset, so the next `process` starts a new signal."""
        if self.identity:
            y = np.zeros(0, np.float32)
        else:
            y = np.asarray(self._stream.resample_chunk(np.zeros(0, np.float32), last=True),
                           dtype=np.float32).reshape(-1)
            self._stream.clear()
        self.samples_in = 0
        self.samples_out = 0
        return y

    def reset(self) -> None:
        """Drop any pending state (no output)."""
        if self._stream is not None:
            self._stream.clear()
        self.samples_in = self.samples_out = 0

    def __repr__(self) -> str:
        return f"Resampler({self.in_rate} -> {self.out_rate} Hz{', identity' if self.identity else ''})"

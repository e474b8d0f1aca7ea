"""Per-turn latency metrics (DESIGN §7) and their distributions across turns and sessions.

Times are `time.perf_counter()` seconds; values are milliseconds.
- ttfa_ms: end-of-turn decision (VAD TurnEnd processed, or push_text called) -> first output PCM
  sample handed to the session's event queue.
- response_ms: arrival of the chunk holding the last voiced input sample -> first output sample
  (includes endpointing; for text turns it equals ttfa_ms).
- stages: fbank_ms, audio_encoder_ms, vision_ms (work for this turn), prefill_ms (first prefill chunk
  start -> last chunk done), first_text_token_ms (decision -> first token sampled), tts_nar_ms (NAR +
  AR prefix prefill of the first segment), first_codec_token_ms (decision -> first codec token),
  first_codec_window_ms (decision -> first codec PCM window decoded).
Stages that did not happen in a turn (no audio, interrupted early) are absent from `values`.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Dict, List, Optional

import numpy as np

__all__ = ["KEYS", "STAGE_KEYS", "TICK_KEYS", "TurnClock", "MetricsStore", "TickStats", "distribution", "nvtx_range"]

STAGE_KEYS = ("fbank_ms", "audio_encoder_ms", "vision_ms", "prefill_ms", "first_text_token_ms", "tts_nar_ms",
              "first_codec_token_ms", "first_codec_window_ms")
KEYS = ("ttfa_ms", "response_ms") + STAGE_KEYS


class TurnClock:
    def __init__(self):
        self.decision: Optional[float] = None
        self.last_voiced: Optional[float] = None
        self.t: Dict[str, float] = {}
        self.ms: Dict[str, float] = {}

    def mark(self, key: str, t: Optional[float] = None) -> None:
        """Record the first time `key` happened."""
        if key not in self.t:
            self.t[key] = time.perf_counter() if t is None else t

    def add(self, key: str, ms: float) -> None:
        self.ms[key] = self.ms.get(key, 0.0) + float(ms)

    def values(self) -> Dict[str, float]:
        v: Dict[str, float] = dict(self.ms)
        d, t = self.decision, self.t
        if d is not None:
            if "first_audio" in t:
                v["ttfa_ms"] = (t["first_audio"] - d) * 1e3
                lv = self.last_voiced if self.last_voiced is not None else d
                v["response_ms"] = (t["first_audio"] - lv) * 1e3
            for k, name in (("first_token", "first_text_token_ms"), ("first_codec_token", "first_codec_token_ms"),
                            ("first_window", "first_codec_window_ms")):
                if k in t:
                    v[name] = (t[k] - d) * 1e3
        if "prefill_start" in t and "prefill_end" in t:
            v["prefill_ms"] = (t["prefill_end"] - t["prefill_start"]) * 1e3
        return v


TICK_KEYS = ("tick_ms", "host_ms", "turns_ms", "llm_ms", "tts_ms", "codec_ms")
COUNT_KEYS = ("sessions", "llm_forwards", "llm_rows", "tts_steps", "codec_pushes")


def distribution(xs) -> Dict[str, float]:
    """{n, mean, p50, p90, p99, max} of a sequence of numbers (empty -> {"n": 0})."""
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": float(a.max())}


class TickStats:
    """Per-tick scheduler figures (ticks that did work; idle waits are not ticks), last `maxlen` ticks.

    tick_ms: wall time of the tick. host_ms: CPU time of the scheduler thread in the tick
    (`time.thread_time`): on CUDA the Python + launch overhead (plus any spinning in a
    synchronization), on CPU it also holds the kernels the thread runs itself. turns_ms, llm_ms, tts_ms,
    codec_ms: wall time of each stage. Counts per tick: sessions, llm_forwards, llm_rows, tts_steps
    (batched AR steps), codec_pushes (streams pushed)."""

    def __init__(self, maxlen: int = 200_000):
        import collections

        self._rows = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.idle_waits = 0

    def add(self, row: tuple) -> None:
        """row: TICK_KEYS values then COUNT_KEYS values."""
        with self._lock:
            self._rows.append(row)

    def reset(self) -> None:
        with self._lock:
            self._rows.clear()
            self.idle_waits = 0

    def summary(self) -> Dict[str, object]:
        with self._lock:
            rows = np.array(self._rows, dtype=np.float64).reshape(-1, len(TICK_KEYS) + len(COUNT_KEYS))
            idle = self.idle_waits
        out: Dict[str, object] = {"ticks": int(rows.shape[0]), "idle_waits": idle}
        for j, k in enumerate(TICK_KEYS):
            out[k] = distribution(rows[:, j])
        for j, k in enumerate(COUNT_KEYS):
            col = rows[:, len(TICK_KEYS) + j]
            out[k + "_per_tick"] = float(col.mean()) if col.size else 0.0
        return out


class MetricsStore:
    """Thread-safe collection of every finished turn's values."""

    def __init__(self):
        self._rows: List[Dict[str, float]] = []
        self._lock = threading.Lock()

    def add(self, values: Dict[str, float]) -> None:
        with self._lock:
            self._rows.append(dict(values))

    def rows(self) -> List[Dict[str, float]]:
        with self._lock:
            return [dict(r) for r in self._rows]

    def summary(self) -> Dict[str, Dict[str, float]]:
        """{key: {n, mean, p50, p90, p99, max}} over all turns that reported the key."""
        out: Dict[str, Dict[str, float]] = {}
        rows = self.rows()
        keys = list(KEYS) + sorted({k for r in rows for k in r} - set(KEYS))
        for k in keys:
            xs = [r[k] for r in rows if k in r and isinstance(r[k], (int, float))]
            if xs:
                out[k] = distribution(xs)
        return out

    def reset(self) -> None:
        with self._lock:
            self._rows.clear()


_NVTX = None


def _nvtx():
    global _NVTX
    if _NVTX is None:
        try:
            import nvtx  # noqa: F401

            _NVTX = "nvtx"
        except ImportError:
            _NVTX = "torch"
    return _NVTX


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool):
    """An NVTX range (nvtx package if importable, else torch.cuda.nvtx) when `enabled` (CUDA)."""
    if not enabled:
        yield
        return
    if _nvtx() == "nvtx":
        import nvtx

        with nvtx.annotate(name):
            yield
    else:
        import torch

        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()

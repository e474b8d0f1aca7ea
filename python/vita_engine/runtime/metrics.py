"""Per-turn latency metrics (docs/architecture.md §6) and their distributions across turns and sessions.

Times are `time.perf_counter()` seconds; values are milliseconds.
- ttfa_ms: end-of-turn decision (VAD TurnEnd processed, or push_text called) -> first output PCM
  sample handed to the session's event queue.
- response_ms: arrival of the chunk holding the last voiced input sample -> first output sample
  (includes endpointing; for text turns it equals ttfa_ms).
- stages: fbank_ms, audio_encoder_ms, vision_ms (work for this turn), prefill_ms (first prefill chunk
  start -> last chunk done), first_text_token_ms (decision -> first token sampled), tts_nar_ms (NAR +
  AR prefix prefill of the first segment), first_codec_token_ms (decision -> first codec token),
  first_codec_window_ms (decision -> first codec PCM window decoded).
The work stages (WORK_KEYS: fbank, audio encoder, vision, TTS NAR) are always in a turn's `Metrics`
values, 0 where the turn had no such work (a text turn, no image); the moments after the decision
(ttfa_ms, response_ms, first_*) are there only when they happened (no audio: no ttfa_ms). The
distributions (`MetricsStore`) take a work stage only from the turns that did it.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Dict, List, Optional

import numpy as np

__all__ = ["KEYS", "STAGE_KEYS", "WORK_KEYS", "TICK_KEYS", "TurnClock", "MetricsStore", "TickStats", "TickHistograms", "distribution", "nvtx_range"]

STAGE_KEYS = ("fbank_ms", "audio_encoder_ms", "vision_ms", "prefill_ms", "first_text_token_ms", "tts_nar_ms",
              "first_codec_token_ms", "first_codec_window_ms")
KEYS = ("ttfa_ms", "response_ms") + STAGE_KEYS
WORK_KEYS = ("fbank_ms", "audio_encoder_ms", "vision_ms", "tts_nar_ms")


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


class TickHistograms:
    """Cumulative histograms of busy scheduler ticks: wall time (tick_ms) and host overhead (the
    part of it outside `nvtx_range` model stages: inbox, VAD, turn taking, bookkeeping, events).
    Written by the scheduler thread (`start`/`stop`), read by anyone (`snapshot`)."""

    BUCKETS_MS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)

    def __init__(self):
        self._lock = threading.Lock()
        n = len(self.BUCKETS_MS)
        self._counts = {"tick": [0] * n, "host": [0] * n}
        self._sum = {"tick": 0.0, "host": 0.0}
        self._n = 0

    def start(self) -> float:
        _stage.depth, _stage.s = 0, 0.0
        _stage.on = True
        return time.perf_counter()

    def stop(self, t0: float, busy: bool) -> None:
        """End the tick started at t0; only busy ticks are recorded (an idle one only waits)."""
        dt = (time.perf_counter() - t0) * 1e3
        host = max(0.0, dt - _stage.s * 1e3)
        _stage.on = False
        if not busy:
            return
        with self._lock:
            self._n += 1
            for key, v in (("tick", dt), ("host", host)):
                self._sum[key] += v
                c = self._counts[key]
                for i, b in enumerate(self.BUCKETS_MS):
                    if v <= b:
                        c[i] += 1
                        break

    def snapshot(self) -> dict:
        """{"buckets_ms", "tick"/"host": {"cumulative": counts <= each bucket, "sum_ms", "count"}}."""
        with self._lock:
            out: dict = {"buckets_ms": list(self.BUCKETS_MS)}
            for key in ("tick", "host"):
                out[key] = {"cumulative": [int(x) for x in np.cumsum(self._counts[key])],
                            "sum_ms": self._sum[key], "count": self._n}
            return out


class _StageClock(threading.local):
    on = False  # a TickStats tick is open on this thread
    depth = 0
    s = 0.0  # seconds spent in (outermost) model stages during the open tick


_stage = _StageClock()


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
    """An NVTX range (nvtx package if importable, else torch.cuda.nvtx) when `enabled` (CUDA). Its
    time counts as model work in the open TickStats tick (the rest of a tick is host overhead)."""
    timed = _stage.on and _stage.depth == 0
    _stage.depth += 1
    t0 = time.perf_counter() if timed else 0.0
    try:
        if not enabled:
            yield
        elif _nvtx() == "nvtx":
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
    finally:
        _stage.depth -= 1
        if timed:
            _stage.s += time.perf_counter() - t0

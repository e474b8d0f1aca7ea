"""Prometheus metrics of one server instance (own registry, so several apps can live in a process).

Besides the server's own counters, each scrape reads the engine's figures (KV pool, TTS streams,
scheduler tick times) through its read-only accessors: `engine.stats` (a dict) and, when the engine
has one, `engine.tick_histograms.snapshot()`. An engine without them (a stand-in) exports what it has.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterable, List, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily)

log = logging.getLogger("vita_engine.server")

# Latency buckets in seconds: fine below 0.5 s where the targets are (docs/architecture.md §7), coarse above.
_LAT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Any = None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge("vita_sessions_active", "WebSocket sessions currently open", registry=r)
        self.sessions_total = Counter("vita_sessions", "Sessions started (hello accepted)", registry=r)
        self.sessions_refused = Counter("vita_sessions_refused", "Connections refused", ["reason"], registry=r)
        self.frames_in = Counter("vita_frames_in", "Client frames received", ["kind"], registry=r)
        self.frames_out = Counter("vita_frames_out", "Frames sent to clients", ["kind"], registry=r)
        self.bytes_in = Counter("vita_bytes_in", "Bytes received from clients", registry=r)
        self.bytes_out = Counter("vita_bytes_out", "Bytes sent to clients", registry=r)
        self.turns = Counter("vita_turns", "Turns completed (TurnEnd)", registry=r)
        self.interrupted = Counter("vita_turns_interrupted", "Turns interrupted (barge-in)", registry=r)
        self.errors = Counter("vita_client_errors", "error events sent to clients", ["code"], registry=r)
        self.dropped = Counter("vita_connections_dropped", "Connections reset because their close could not go out "
                               "within slow_client_close_timeout_s (the peer did not read)", registry=r)
        self.ttfa = Histogram("vita_ttfa_seconds", "Time to first audio: end-of-turn decision to first output sample",
                              buckets=_LAT_BUCKETS, registry=r)
        self.response = Histogram("vita_response_seconds", "Last voiced input sample to first output sample",
                                  buckets=_LAT_BUCKETS, registry=r)
        if engine is not None:
            r.register(EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _pow2_bounds(top: int) -> List[int]:
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return out + [max(1, top)]


class EngineCollector:
    """The engine's memory and scheduler figures, read at scrape time."""

    def __init__(self, engine: Any):
        self.engine = engine

    def describe(self) -> Iterable:
        return []  # computed at scrape time; nothing to pre-register

    def collect(self) -> Iterable:
        try:
            st = getattr(self.engine, "stats", None)
            st = dict(st() if callable(st) else st or {})
        except Exception:  # noqa: BLE001  (a scrape never fails because of the engine)
            log.exception("engine stats failed")
            st = {}
        yield from self._kv(st)
        yield from self._tts(st)
        yield from self._scheduler(st)

    @staticmethod
    def _gauge(name: str, doc: str, value: Optional[float]):
        if value is not None:
            yield GaugeMetricFamily(name, doc, value=float(value))

    def _kv(self, st: Dict[str, Any]):
        total = st.get("kv_blocks")
        yield from self._gauge("vita_kv_blocks_total", "KV-cache pages (blocks) in the engine's pool", total)
        yield from self._gauge("vita_kv_blocks_free", "KV-cache pages not held by any session",
                               st.get("kv_free_blocks"))
        yield from self._gauge("vita_kv_blocks_reserved", "KV-cache pages reserved by open sessions (admission "
                               "control: a new session is refused when its reservation does not fit)",
                               st.get("kv_reserved_blocks"))
        yield from self._gauge("vita_kv_block_size_tokens", "Tokens per KV-cache page", st.get("kv_block_size"))
        per = st.get("kv_session_blocks")
        if per is None:
            return
        per = [int(x) for x in per]
        bounds = _pow2_bounds(int(total) if total else max(per, default=1))
        h = GaugeHistogramMetricFamily(
            "vita_kv_session_blocks", "KV-cache pages held per open session, now (a gauge histogram: "
            "_bucket{le} = sessions holding <= le pages, _gcount = sessions, _gsum = pages held by sessions)",
            buckets=[(str(b), float(sum(x <= b for x in per))) for b in bounds] + [("+Inf", float(len(per)))],
            gsum_value=float(sum(per)))
        yield h
        yield GaugeMetricFamily("vita_kv_session_blocks_max", "Most KV-cache pages held by one open session",
                                value=float(max(per, default=0)))

    def _tts(self, st: Dict[str, Any]):
        yield from self._gauge("vita_tts_streams_active", "TTS streams started and not released",
                               st.get("tts_streams_active"))
        yield from self._gauge("vita_tts_streams_max", "TTS stream slots (tts_max_streams)", st.get("tts_streams_max"))
        yield from self._gauge("vita_tts_blocks_total", "TTS KV-cache pages", st.get("tts_blocks"))
        yield from self._gauge("vita_tts_blocks_free", "TTS KV-cache pages not held by a stream",
                               st.get("tts_free_blocks"))

    def _scheduler(self, st: Dict[str, Any]):
        for key, name, doc in (("ticks", "vita_scheduler_ticks", "Scheduler ticks (busy and idle)"),
                               ("tick_errors", "vita_scheduler_tick_errors", "Scheduler ticks that raised")):
            if st.get(key) is not None:
                yield CounterMetricFamily(name, doc, value=float(st[key]))
        ts = getattr(self.engine, "tick_histograms", None)
        if ts is None:
            return
        try:
            snap = ts.snapshot()
        except Exception:  # noqa: BLE001
            log.exception("engine tick stats failed")
            return
        bounds = [b / 1e3 for b in snap["buckets_ms"]]
        for key, name, doc in (
                ("tick", "vita_scheduler_tick_seconds", "Wall time of one busy scheduler tick (tick_ms / 1000)"),
                ("host", "vita_scheduler_host_seconds", "Host overhead of one busy tick: its wall time outside the "
                                                        "model stages (LLM forward + sampling, vision, TTS, codec)")):
            h = snap[key]
            buckets = [(_le(b), float(c)) for b, c in zip(bounds, h["cumulative"])] + [("+Inf", float(h["count"]))]
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h["sum_ms"] / 1e3)


def _le(b: float) -> str:
    return repr(float(b)) if math.isfinite(b) else "+Inf"

"""Prometheus metrics of one server instance (own registry, so several apps can live in a process)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets in seconds: fine below 0.5 s where the targets are (DESIGN §8), coarse above.
_LAT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
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
        self.ttfa = Histogram("vita_ttfa_seconds", "Time to first audio: end-of-turn decision to first output sample",
                              buckets=_LAT_BUCKETS, registry=r)
        self.response = Histogram("vita_response_seconds", "Last voiced input sample to first output sample",
                                  buckets=_LAT_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

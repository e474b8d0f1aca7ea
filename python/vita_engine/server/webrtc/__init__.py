"""The WebRTC transport (`POST /v1/realtime/calls`, as OpenAI's Realtime API does it): Opus both
ways with aiortc + PyAV, events on the `oai-events` data channel through the same realtime handler
as the `/v1/realtime` WebSocket. Optional: `pip install "vita-engine[webrtc]"`. Nothing here
imports aiortc until a call comes (signalling.py checks first); docs/realtime-api.md, "WebRTC"."""
from __future__ import annotations

import importlib.util

INSTALL_HINT = 'pip install "vita-engine[webrtc]"'


def missing() -> list:
    """The WebRTC packages that are not installed (empty: available)."""
    out = []
    for m in ("aiortc", "av", "aioice"):
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except (ImportError, ValueError):
            out.append(m)
    return out

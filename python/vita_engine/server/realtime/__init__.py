"""The OpenAI-Realtime-compatible endpoint (`/v1/realtime`, docs/realtime-api.md): a transport-agnostic
`RealtimeHandler` (handler.py) driven by the WebSocket route (ws.py) or the WebRTC transport."""
from .handler import RealtimeHandler  # noqa: F401

__all__ = ["RealtimeHandler"]

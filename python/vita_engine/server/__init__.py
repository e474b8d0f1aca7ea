"""`vita-engine serve`: the real-time WebSocket server (protocol in docs/protocol.md) and its browser page."""
from __future__ import annotations

from .app import BackgroundServer, ServerConfig, VitaServer, create_app, serve

__all__ = ["BackgroundServer", "ServerConfig", "VitaServer", "create_app", "serve"]

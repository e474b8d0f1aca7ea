"""Real-time runtime (DESIGN §6): Engine, Session, events, paged KV pool, scheduler."""
from .events import AudioChunk, CapacityError, Error, Interrupted, Metrics, SessionClosedError, TextDelta, TurnEnd
from .engine import Engine
from .session import Session, TurnResult

__all__ = ["Engine", "Session", "TurnResult", "TextDelta", "AudioChunk", "TurnEnd", "Interrupted", "Metrics", "Error",
           "CapacityError", "SessionClosedError"]
